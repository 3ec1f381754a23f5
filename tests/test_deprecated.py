"""The old import paths and keywords keep working for one release, each with a ``DeprecationWarning`` that names the
new one (the CHANGELOG lists every move)."""

from __future__ import annotations

import importlib
import sys

import pytest
from torch import nn

import gradmod
from gradmod._deprecated import MOVED_ATTRIBUTES, MOVED_MODULES


@pytest.mark.parametrize(("old", "name"), [(old, name) for old, names in MOVED_ATTRIBUTES.items() for name in names])
def test_a_moved_name_warns_with_its_new_path_and_is_the_same_object(old, name):
    new = MOVED_ATTRIBUTES[old][name]
    with pytest.warns(DeprecationWarning, match=rf"{old}\.{name} moved to {new}\.{name}"):
        found = getattr(importlib.import_module(old), name)
    assert found is getattr(importlib.import_module(new), name)


@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_a_moved_module_warns_with_its_new_path_and_is_the_new_module(old, monkeypatch):
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning, match=rf"{old} moved to {MOVED_MODULES[old]}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(MOVED_MODULES[old])
    monkeypatch.delitem(sys.modules, old, raising=False)
    monkeypatch.delattr(gradmod, old.split(".")[1], raising=False)  # set by the import above
    with pytest.warns(DeprecationWarning, match=f"{old} moved to"):
        assert getattr(gradmod, old.split(".")[1]) is module  # gradmod.agm, as before


@pytest.mark.parametrize("module", sorted(MOVED_ATTRIBUTES))
def test_an_unknown_name_is_still_an_attribute_error_that_names_the_module(module):
    with pytest.raises(AttributeError, match=rf"^module '{module}' has no attribute 'nothing'$"):
        importlib.import_module(module).nothing  # noqa: B018
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        gradmod.nothing  # noqa: B018


def _two():
    return {"audio": nn.Linear(2, 2), "visual": nn.Linear(2, 2)}


@pytest.mark.parametrize(
    ("build", "old", "new", "read"),
    [
        (lambda: gradmod.DGM(_two(), gamma=0.3), "DGM(gamma=...)", "DGM(alpha=...)", lambda m: m.policy.strength),
        (lambda: gradmod.AGM(_two(), alpha=0.3), "AGM(alpha=...)", "AGM(sharpness=...)", lambda m: m.policy.sharpness),
        (lambda: gradmod.MLA(_two(), nn.Linear(2, 3), alpha=0.3), "MLA(alpha=...)", "MLA(regularization=...)",
         lambda m: m.regularization),
        (lambda: gradmod.MultimodalMixup(alpha=0.3), "MultimodalMixup(alpha=...)", "MultimodalMixup(concentration=...)",
         lambda m: m.concentration),
    ],
)
def test_a_renamed_keyword_warns_with_its_new_name_and_sets_it(build, old, new, read):
    with pytest.warns(DeprecationWarning, match=rf"{old.replace('(', '[(]').replace(')', '[)]')} is renamed"):
        method = build()
    assert read(method) == pytest.approx(0.3)


def test_the_old_and_the_new_keyword_together_are_refused():
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="pass alpha= only"):
        gradmod.DGM(_two(), alpha=0.5, gamma=0.3)
