"""The catalogue: one module per method, and `METHODS`, the registry every tool reads.

Each module holds its method's preset(s), its own measure, policy or applier and equations, and a
``METHODS`` tuple of `gradmod.method.MethodInfo` (what the training CLI, the benchmarks, the docs and
`gradmod.diagnose` need). `METHODS` here collects them: adding a method is one line in `_MODULES`.
"""

from __future__ import annotations

import importlib

from gradmod.method import MethodInfo

__all__ = ["METHODS", "MethodInfo", "key_of"]

#: The modules of the catalogue, in the order the docs list them.
_MODULES = (
    "ogm",
    "dgm",
    "decoupling_free",
    "pdmp",
    "mixup",
    "mla",
    "gblending",
    "agm",
    "mmpareto",
    "reconboost",
    "umt",
    "lfm",
    "dgl",
    "inforeg",
    "opm",
    "mbsd",
    "valuation",
    "relearning",
    "amco",
    "pmr",
    "cml",
    "mmcosine",
)


def _collect() -> dict[str, MethodInfo]:
    registry: dict[str, MethodInfo] = {}
    for name in _MODULES:
        for info in importlib.import_module(f"gradmod.methods.{name}").METHODS:
            if info.key in registry:
                raise RuntimeError(f"two methods are registered as {info.key!r}")
            registry[info.key] = info
    return registry


METHODS: dict[str, MethodInfo] = _collect()
"""Every method by its one name (the training CLI's ``--method``), in catalogue order."""


def key_of(method: object) -> str:
    """The registry key of ``method``'s class (its most derived registered class), else its class name in lower case."""
    for cls in type(method).__mro__:
        for key, info in METHODS.items():
            if info.preset is cls:
                return key
    return type(method).__name__.lower()
