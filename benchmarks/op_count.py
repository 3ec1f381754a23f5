"""Count the device operations of gradmod's per-step bookkeeping (everything but the modulation kernels).

On a GPU every dispatched operation is a kernel launch, so the count is what a step costs beyond the
kernels, whatever the machine. Counted on the CPU with ``TorchDispatchMode`` for one ``observe()`` and one
``step()`` of a two-modality OGM modulator whose applier does nothing (so the count does not depend on the
number of gradient tensors); views (``view``, ``unbind``, ``select``, ``detach``…) are counted separately,
since they launch nothing.

``python benchmarks/op_count.py`` prints the counts; `count_bookkeeping_ops` is used by the speed
benchmark and by the regression test ``tests/test_bookkeeping.py``.
"""

from __future__ import annotations

import collections
import json
import sys
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradmod

__all__ = ["count_bookkeeping_ops"]


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


#: Operators that only make views or read metadata: they launch no kernel on any device.
_NO_KERNEL = {
    "view", "unbind", "select", "detach", "alias", "slice", "squeeze", "squeeze_", "unsqueeze", "unsqueeze_",
    "as_strided", "t", "expand", "permute", "promote_types", "result_type",
}


def _is_view(name: str) -> bool:
    return name in _NO_KERNEL


def count_bookkeeping_ops(validate: bool = False, apply: str = "params", steps: int = 3) -> dict[str, Any]:
    """Operations of one ``observe()`` + ``step()`` (the last of ``steps`` steps), the applier's work excluded.

    Returns ``{"observe": {...}, "step": {...}, "compute_ops": n, "view_ops": n}`` with per-operator counts.
    """
    torch.manual_seed(0)
    audio, visual = nn.Linear(8, 8), nn.Linear(8, 8)
    mod = gradmod.OGM({"audio": audio, "visual": visual}, alpha=0.5, validate=validate, apply=apply, seed=0)
    mod.applier.apply = lambda *args, **kwargs: None  # the kernels are measured by the speed benchmark
    logits = {"audio": torch.randn(16, 6) * 3, "visual": torch.randn(16, 6)}
    target = torch.randint(0, 6, (16,))
    features = {"audio": torch.randn(16, 8, requires_grad=True), "visual": torch.randn(16, 8, requires_grad=True)}
    observe_ops = step_ops = collections.Counter()
    for _ in range(steps):
        extra = {"features": {n: f * 1.0 for n, f in features.items()}} if apply == "features" else {}
        with _Counter() as counted_observe:
            mod.observe(logits=logits, target=target, **extra)
        with _Counter() as counted_step:
            mod.step()
        observe_ops, step_ops = counted_observe.ops, counted_step.ops
    total = observe_ops + step_ops
    return {
        "observe": dict(observe_ops),
        "step": dict(step_ops),
        "compute_ops": sum(n for name, n in total.items() if not _is_view(name)),
        "view_ops": sum(n for name, n in total.items() if _is_view(name)),
    }


def main() -> int:
    results = {f"validate={v}": count_bookkeeping_ops(validate=v) for v in (False, True)}
    json.dump(results, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
