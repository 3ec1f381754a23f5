"""What the optimizer does to a per-modality gradient scale, measured on a small deterministic model.

OGM, OGM-GE, DGM and their kin multiply one encoder's gradient by a coefficient ``k < 1``. SGD moves the
parameters by ``lr·g``, so the encoder's update shrinks by ``k``. Adam-type optimizers divide the gradient
by a running estimate of its magnitude, ``m̂ / (√v̂ + ε)``: a constant ``k`` scales ``m̂`` and ``√v̂`` alike
and cancels, up to ``ε``. `scaling_effect` measures this instead of asserting it: two identical runs of a
two-encoder model on fixed batches, one with encoder ``"a"``'s gradient multiplied by ``k`` before every
step, and the ratio of how far each encoder's parameters moved in the scaled run to how far they moved in
the plain one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from gradmod._internal import real_scalar

__all__ = ["OPTIMIZERS", "ScalingEffect", "scaling_effect"]

#: The optimizers `scaling_effect` can run: class and learning rate (the ratio does not depend much on it).
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    "adam": (torch.optim.Adam, {"lr": 1e-3}),
    "adamw": (torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 1e-2}),
    "rmsprop": (torch.optim.RMSprop, {"lr": 1e-3}),
    "adagrad": (torch.optim.Adagrad, {"lr": 1e-2}),
    "nadam": (torch.optim.NAdam, {"lr": 1e-3}),
    "radam": (torch.optim.RAdam, {"lr": 1e-3}),
    "adamax": (torch.optim.Adamax, {"lr": 1e-3}),
}


@dataclass(frozen=True)
class ScalingEffect:
    """One optimizer's measured response to a constant gradient scale ``k`` on encoder ``"a"``.

    ``first_step``: ``‖Δθ_a‖`` of the first step with the scale over ``‖Δθ_a‖`` without it (SGD: ``k``);
    ``after``: the same ratio for the total movement after ``steps`` steps; ``other``: that ratio for the
    unscaled encoder ``"b"`` (how much the scale leaked into the other modality).
    """

    optimizer: str
    k: float
    steps: int
    first_step: float
    after: float
    other: float

    def sentence(self) -> str:
        """The measurement in words."""
        return (
            f"{self.optimizer}: scaling one encoder's gradient by k = {self.k:g} changed its parameter update by a "
            f"factor of {self.first_step:.3f} at the first step and {self.after:.3f} over {self.steps} steps "
            f"(the other encoder: {self.other:.3f})"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _batches(count: int, size: int, generator: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    out = []
    for _ in range(count):
        y = torch.randint(0, 4, (size,), generator=generator)
        signal = nn.functional.one_hot(y, 8).float()
        a = 2.0 * signal + torch.randn(size, 8, generator=generator)
        b = 0.5 * signal + torch.randn(size, 8, generator=generator)
        out.append((a, b, y))
    return out


def _run(optimizer: str, k: float, steps: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Parameters of encoders a and b after the first step and after ``steps`` steps (flattened), and at start."""
    generator = torch.Generator().manual_seed(seed)
    encoders = nn.ModuleDict({name: nn.Sequential(nn.Linear(8, 16), nn.Tanh()) for name in ("a", "b")})
    head = nn.Linear(32, 4)
    for module in (*encoders.values(), head):
        for p in module.parameters():  # initialised from the generator: torch's global stream is not touched
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    data = _batches(8, 32, generator)
    cls, options = OPTIMIZERS[optimizer]
    opt = cls([*encoders.parameters(), *head.parameters()], **options)
    flat = [lambda name=name: torch.cat([p.detach().reshape(-1) for p in encoders[name].parameters()]) for name in ("a", "b")]
    snapshots = [[f() for f in flat]]
    for step in range(steps):
        a, b, y = data[step % len(data)]
        logits = head(torch.cat([encoders["a"](a), encoders["b"](b)], 1))
        opt.zero_grad()
        nn.functional.cross_entropy(logits, y).backward()
        with torch.no_grad():
            for p in encoders["a"].parameters():
                p.grad.mul_(k)
        opt.step()
        if step == 0 or step == steps - 1:
            snapshots.append([f() for f in flat])
    return snapshots[0], [*snapshots[1], *snapshots[-1]]


def scaling_effect(
    optimizers: Sequence[str] = ("sgd", "adam", "adamw"), *, k: float = 0.1, steps: int = 50, seed: int = 0
) -> tuple[ScalingEffect, ...]:
    """Measure, per optimizer, how a constant gradient scale ``k`` on one encoder changes its updates.

    Two runs per optimizer from the same initialisation and batches (a two-encoder tanh MLP, four
    classes, 8 fixed batches of 32, drawn from ``seed`` on a private generator: torch's global random state
    is not used), one with encoder ``"a"``'s gradient multiplied by ``k`` before every step. Optimizers by
    name (`OPTIMIZERS`). Cost: ``2·steps`` steps of a model of 900 parameters per optimizer, milliseconds on
    a CPU. Deterministic on a given machine.
    """
    k = real_scalar(k, "k", strict=True)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    unknown = [name for name in optimizers if name not in OPTIMIZERS]
    if unknown:
        raise ValueError(f"scaling_effect cannot run the optimizers {unknown}; it knows {sorted(OPTIMIZERS)}")
    results = []
    for name in optimizers:
        start, plain = _run(name, 1.0, steps, seed)
        _, scaled = _run(name, k, steps, seed)
        ratios = [_moved_ratio(start[index % 2], plain[index], scaled[index]) for index in (0, 2, 3)]
        results.append(ScalingEffect(name, k, steps, first_step=ratios[0], after=ratios[1], other=ratios[2]))
    return tuple(results)


def _moved_ratio(start: torch.Tensor, plain: torch.Tensor, scaled: torch.Tensor) -> float:
    """``‖scaled − start‖ / ‖plain − start‖`` (NaN when the plain run did not move)."""
    base = float((plain - start).norm())
    return float((scaled - start).norm()) / base if base > 0 else math.nan
