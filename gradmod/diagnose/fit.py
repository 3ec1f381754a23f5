"""Which methods of `gradmod.METHODS` fit a training loop, from a description of the loop.

`Loop` states the loop's constraints: what its head offers (a head that splits per modality, unimodal
heads, a fusion gate, a head shared by the modalities, or none of these), multi-label targets, the
number of modalities, gradient accumulation, DDP/FSDP, a trainer, and the optimizer. `fit_table` checks
every registry entry's `gradmod.method.Fit` against it:

* **cannot** — a stated constraint of the loop that the method does not support (multi-label targets,
  more modalities than it takes, accumulation, distributed training, the trainer, an optimizer whose
  ``step(closure)`` computes the gradients after the step hook);
* **needs** — the model lacks what the method reads (`gradmod.method.HEADS`), which can be added
  (unimodal heads, a gated head, ...);
* **fits** — otherwise. For a method that acts on the gradient scale under an adaptive optimizer, the row
  carries the measured effect of a constant scale under that optimizer (`gradmod.diagnose.scaling`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from gradmod.diagnose.scaling import OPTIMIZERS, ScalingEffect, scaling_effect
from gradmod.method import HEADS, MethodInfo

__all__ = ["ADAPTIVE", "HEAD_KINDS", "STATUSES", "FitRow", "FitTable", "Loop", "fit_table"]

#: What a loop's head can be.
HEAD_KINDS = {
    "split": "a linear head over concatenated or summed features, which splits per modality (ConcatFusion, SumFusion)",
    "gated": "a gated head with a fusion gate ζ (GatedSumFusion, FiLMFusion(zeta=True))",
    "shared": "one linear head shared by every modality's features (one feature width)",
    "other": "a head that mixes modalities and cannot be split (attention, FiLM without ζ, an MLP on the concatenation)",
}
#: Optimizers that divide the gradient by a running estimate of its own magnitude (or use its sign).
ADAPTIVE = frozenset({"adam", "adamw", "adamax", "nadam", "radam", "rmsprop", "adagrad", "adadelta", "rprop", "sparseadam"})
#: Optimizers whose ``step(closure)`` computes the gradients inside the step, after every step pre-hook.
_CLOSURE = frozenset({"lbfgs"})
_KNOWN = ADAPTIVE | _CLOSURE | {"sgd", "asgd"}
#: The verdicts of a row, best first.
STATUSES = ("fits", "needs", "cannot")
_DISTRIBUTED = (None, "ddp", "fsdp")
_TRAINERS = (None, "lightning", "transformers")
#: Kinds that act in the optimizer's step pre-hook (`gradmod._hooks.StepHook`).
_HOOKED_KINDS = frozenset({"modulator", "responses", "backward"})


@dataclass(frozen=True)
class Loop:
    """A description of a training loop, as `fit_table` reads it.

    Attributes:
        head: one of `HEAD_KINDS`.
        unimodal_heads: the model has (or the loop may add) one classification head per modality.
        modalities: how many modalities.
        multilabel: multi-hot targets.
        accumulation: several backward passes per optimizer step.
        distributed: ``None``, ``"ddp"`` or ``"fsdp"``.
        trainer: ``None`` (your own loop), ``"lightning"`` or ``"transformers"``.
        optimizer: the optimizer's name (``"sgd"``, ``"adam"``, ``"adamw"``, ...) or a torch optimizer,
            whose class name is taken.
        zeroable: the model runs with any modality's input zeroed (what coalition-based methods need).
        features: the loop can reach the fused feature before the head (what feature mixup needs).
    """

    head: str = "split"
    unimodal_heads: bool = False
    modalities: int = 2
    multilabel: bool = False
    accumulation: bool = False
    distributed: str | None = None
    trainer: str | None = None
    optimizer: Any = "sgd"
    zeroable: bool = True
    features: bool = True

    def __post_init__(self) -> None:
        if self.head not in HEAD_KINDS:
            raise ValueError(f"Loop.head must be one of {sorted(HEAD_KINDS)}, got {self.head!r}")
        if isinstance(self.modalities, bool) or not isinstance(self.modalities, int) or self.modalities < 2:
            raise ValueError(f"Loop.modalities must be an int >= 2, got {self.modalities!r}")
        if self.distributed not in _DISTRIBUTED:
            raise ValueError(f"Loop.distributed must be one of {list(_DISTRIBUTED)}, got {self.distributed!r}")
        if self.trainer not in _TRAINERS:
            raise ValueError(f"Loop.trainer must be one of {list(_TRAINERS)}, got {self.trainer!r}")
        name = type(self.optimizer).__name__ if isinstance(self.optimizer, torch.optim.Optimizer) else self.optimizer
        if not isinstance(name, str) or name.lower() not in _KNOWN:
            raise ValueError(f"Loop.optimizer must name one of {sorted(_KNOWN)} (or be such an optimizer), got {self.optimizer!r}")
        object.__setattr__(self, "optimizer", name.lower())

    @property
    def adaptive(self) -> bool:
        """Whether the optimizer normalises each gradient by its own running magnitude."""
        return self.optimizer in ADAPTIVE

    def provides(self) -> frozenset[str]:
        """The `gradmod.method.HEADS` entries this loop's model offers."""
        offered = {"any", "inputs"}
        if self.head in ("split", "shared") or self.unimodal_heads:
            offered.add("decoupled")
        if self.head == "gated":
            offered.add("gate")
        if self.head == "shared":
            offered.add("shared")
        if self.unimodal_heads:
            offered.add("unimodal heads")
        if self.zeroable:
            offered.add("coalitions")
        if self.features:
            offered.add("features")
        return frozenset(offered)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Loop:
        return cls(**data)


@dataclass(frozen=True)
class FitRow:
    """One method against one loop: ``status`` (`STATUSES`), the reasons for it (each tied to a stated
    constraint of the loop or of the method's `gradmod.method.Fit`), and measured notes."""

    key: str
    title: str
    kind: str
    status: str
    reasons: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    page: str = ""


@dataclass(frozen=True)
class FitTable:
    """Every method of the registry against one `Loop`, in registry order."""

    loop: Loop
    rows: tuple[FitRow, ...]
    scaling: tuple[ScalingEffect, ...] = field(default=())

    def keys(self, status: str = "fits") -> list[str]:
        """The methods with this status."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        return [row.key for row in self.rows if row.status == status]

    def row(self, key: str) -> FitRow:
        for row in self.rows:
            if row.key == key:
                return row
        raise KeyError(f"no method {key!r} in the table; it has {[r.key for r in self.rows]}")

    def text(self) -> str:
        """A markdown table: method, status, and why."""
        lines = ["| method | fits this loop? | why |", "| --- | --- | --- |"]
        for row in self.rows:
            why = "; ".join(row.reasons + row.notes) or "every stated constraint is supported"
            lines.append(f"| {row.title} (`{row.key}`) | {row.status} | {why} |")
        return "\n".join(lines)


def _row(info: MethodInfo, loop: Loop, provided: frozenset[str], scaling: tuple[ScalingEffect, ...]) -> FitRow:
    fit = info.fit
    cannot, needs, notes = [], [], []
    if loop.multilabel and not fit.multilabel:
        cannot.append("the loop has multi-label targets; the method takes single-label class indices")
    if fit.max_modalities is not None and loop.modalities > fit.max_modalities:
        cannot.append(f"the loop has {loop.modalities} modalities; the method takes at most {fit.max_modalities}")
    if loop.accumulation and not fit.accumulation:
        cannot.append("the loop accumulates gradients over several backward passes; the method needs one per step")
    if loop.distributed is not None and not fit.distributed:
        cannot.append(f"the loop runs {loop.distributed.upper()}; the method does not support distributed training")
    if loop.trainer is not None and loop.trainer not in fit.trainers:
        supported = ", ".join(fit.trainers) or "none"
        cannot.append(f"the loop runs in {loop.trainer}; gradmod drives the method in: {supported}")
    if loop.optimizer in _CLOSURE and info.kind in _HOOKED_KINDS:
        cannot.append(
            f"{loop.optimizer}'s step(closure) computes the gradients after the step hook the method acts in"
        )
    if fit.head not in provided:
        needs.append(f"needs {HEADS[fit.head]}")
    if scaling and fit.acts_on == "gradient scale":
        notes.append(
            f"acts on the gradient scale: under {loop.optimizer} a constant k = {scaling[1].k:g} changed the encoder's "
            f"update by ×{scaling[1].after:.3f} over {scaling[1].steps} steps (sgd ×{scaling[0].after:.3f}; measured)"
        )
    status = "cannot" if cannot else "needs" if needs else "fits"
    return FitRow(info.key, info.title, info.kind, status, tuple(cannot + needs), tuple(notes), info.page)


def fit_table(loop: Loop, methods: Mapping[str, MethodInfo] | None = None) -> FitTable:
    """Every method of ``methods`` (default `gradmod.METHODS`) against ``loop`` (module docstring).

    For an adaptive optimizer that `gradmod.diagnose.scaling_effect` can run, the effect of a constant
    scale ``k = 0.1`` under it and under SGD is measured once (milliseconds) and quoted in the rows of the
    methods that act on the gradient scale.
    """
    if not isinstance(loop, Loop):
        raise TypeError(f"fit_table needs a gradmod.diagnose.Loop, got {type(loop).__name__}")
    if methods is None:
        from gradmod.methods import METHODS as methods
    measured: tuple[ScalingEffect, ...] = ()
    if loop.adaptive and loop.optimizer in OPTIMIZERS:
        measured = scaling_effect(("sgd", loop.optimizer))
    rows = tuple(_row(info, loop, loop.provides(), measured) for info in methods.values())
    return FitTable(loop, rows, measured)
