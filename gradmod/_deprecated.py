"""Old import paths that keep working for one release, each with a ``DeprecationWarning`` naming the new one."""

from __future__ import annotations

import importlib
import sys
import warnings
from types import ModuleType
from typing import Any

__all__ = ["MOVED_ATTRIBUTES", "MOVED_MODULES", "moved_attribute", "moved_module"]

#: Old module → {name: the module that defines it now}.
MOVED_ATTRIBUTES: dict[str, dict[str, str]] = {
    "gradmod.functional": {
        "dgm_evidence": "gradmod.methods.dgm",
        "zeta_evidence": "gradmod.methods.decoupling_free",
        "zeta_ratios": "gradmod.methods.decoupling_free",
        "rank_modalities": "gradmod.methods.pdmp",
        "pdmp_coefficients": "gradmod.methods.pdmp",
        "pdmp_coefficients_of": "gradmod.methods.pdmp",
        "imbalance_factor": "gradmod.methods.mixup",
        "bmm_strength": "gradmod.methods.mixup",
    },
    "gradmod.measures": {
        "DGMScore": "gradmod.methods.dgm",
        "ZetaGate": "gradmod.methods.decoupling_free",
        "StaticMetrics": "gradmod.methods.pdmp",
    },
    "gradmod.policies": {"PDMPPolicy": "gradmod.methods.pdmp"},
}
#: Old module → the module it is now.
MOVED_MODULES: dict[str, str] = {
    f"gradmod.{name}": f"gradmod.methods.{name}" for name in ("agm", "gblending", "mixup", "mla", "mmpareto")
}


def _warn(old: str, new: str) -> None:
    warnings.warn(f"{old} moved to {new}; the old path will be removed in the next release", DeprecationWarning, stacklevel=4)


def moved_attribute(module: str, name: str) -> Any:
    """A module's ``__getattr__``: a name that moved elsewhere, with a warning; else ``AttributeError``."""
    home = MOVED_ATTRIBUTES.get(module, {}).get(name)
    if home is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    _warn(f"{module}.{name}", f"{home}.{name}")
    return getattr(importlib.import_module(home), name)


def moved_module(old: str) -> ModuleType:
    """Replace the old module ``old`` by its new home in ``sys.modules`` (with a warning) and return it."""
    new = MOVED_MODULES[old]
    _warn(old, new)
    module = importlib.import_module(new)
    sys.modules[old] = module
    return module
