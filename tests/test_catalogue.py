"""The registry is the single source: the lists that name every method are generated from it and cannot drift, and
every method has the files CONTRIBUTING.md's change test promises (its module, test file, docs page, a contract case).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

import gradmod

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import catalogue  # noqa: E402

KEYS = list(gradmod.METHODS)


def test_the_generated_lists_are_the_registrys():
    assert catalogue.stale() == [], "run make catalogue"


def test_a_stale_list_is_reported(monkeypatch):
    monkeypatch.setattr(catalogue, "needs_table", lambda: ["| a table that is not the registry's |"])
    monkeypatch.setitem(catalogue.BLOCKS, "docs/pick-a-method.md", [(*catalogue.BLOCKS["docs/pick-a-method.md"][0][:2], catalogue.needs_table)])
    assert "docs/pick-a-method.md" in catalogue.stale()


@pytest.mark.parametrize("key", KEYS)
def test_every_method_has_its_module_test_file_page_and_place_in_every_list(key):
    info = gradmod.METHODS[key]
    module = info.preset.__module__
    assert module.startswith("gradmod.methods."), key
    name = module.rsplit(".", 1)[1]
    assert (ROOT / "tests" / "methods" / f"test_{name}.py").is_file(), f"{key}: tests/methods/test_{name}.py"
    page = ROOT / "docs" / info.page
    assert page.is_file(), f"{key}: docs/{info.page}"
    text = page.read_text(encoding="utf-8")
    cited = "## Paper and code" in text or "references.md#" in text
    assert cited, f"{key}: docs/{info.page} cites its paper nowhere"
    assert f"::: {module}" in (ROOT / "docs" / "api.md").read_text()
    assert f"`{catalogue.preset_name(info)}`" in (ROOT / "README.md").read_text()
    assert getattr(gradmod, info.preset.__name__) is info.preset  # exported at the top level
    assert info.preset.__name__ in gradmod.__all__


def test_the_cli_and_the_benchmarks_list_every_method():
    from reference_models.config import CLI_METHODS, METHODS

    assert METHODS == (*CLI_METHODS, *KEYS)
    accuracy = importlib.import_module("benchmarks.accuracy")
    assert set(METHODS) == set(accuracy.SWEPT) | set(accuracy.UNSWEPT)
    assert set(accuracy.SCALED) <= set(KEYS)


def test_the_diagnose_fit_table_covers_every_method():
    table = gradmod.diagnose.fit_table(gradmod.diagnose.Loop())
    assert [row.key for row in table.rows] == KEYS


#: BalanceBenchmark's seventeen trainers (``balancemm/trainer/<Name>_trainer.py``) by the names of its table.
BALANCEBENCHMARK = (
    "OGM", "AGM", "PMR", "AMCo", "CML", "G-Blending", "Greedy", "LFM", "MBSD", "MLA", "MMCosine", "MMPareto",
    "OPM", "ReLearning", "ReconBoost", "Sample", "UMT / UME",
)


def test_the_coverage_table_names_every_balancebenchmark_method_with_its_gradmod_preset_or_why_not():
    page = (ROOT / "docs" / "methods" / "index.md").read_text(encoding="utf-8")
    section = page.split("## BalanceBenchmark's methods", 1)[1]
    rows = {line.split("|")[1].strip(): line for line in section.splitlines() if line.startswith("| ") and "---" not in line}
    rows.pop("BalanceBenchmark")  # the header
    assert set(rows) == set(BALANCEBENCHMARK)
    presets = {f"`{catalogue.preset_name(info)}`" for info in gradmod.METHODS.values()}
    for name, row in rows.items():
        cells = [cell.strip() for cell in row.split("|")[1:-1]]
        assert len(cells) == 5 and all(cells), f"{name}: every column filled"
        if name == "Greedy":
            assert "gradmod.diagnose" in cells[2]
        else:
            named = {f"`{p.strip(' `')}`" for p in cells[2].split(",")}
            assert named <= presets, f"{name}: {cells[2]} is not a preset of gradmod.METHODS"
            assert cells[3] in {info.kind for info in gradmod.METHODS.values() if f"`{catalogue.preset_name(info)}`" in named}
