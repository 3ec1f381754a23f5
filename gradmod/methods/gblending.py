"""G-Blending: Wang, Tran & Feiszli, *What Makes Training Multi-modal Classification Networks Hard?*,
CVPR 2020 (Gradient-Blending).

A late-fusion model gets one classification head per modality besides its fused head, and is trained on
the weighted sum of their losses, ``L = Σ_k w_k L_k``. Each weight comes from how head ``k`` generalised
and overfitted between two checkpoints, measured on the training split and on a **held-out** split
(not the test set):

* overfitting ``O = L_held-out − L_train``; its change ``ΔO = O_after − O_before``;
* generalization ``ΔG = L_held-out,before − L_held-out,after`` (positive when the held-out loss fell);
* ``w_k ∝ ΔG_k / ΔO_k²``, normalised to sum to 1 (`blending_weights`), re-estimated every super-epoch.

Guards (the paper's ratio is undefined or negative there):

* ``ΔG_k ≤ 0`` (the head's held-out loss did not fall): ``w_k = 0``. (Taking ``|ΔG|`` instead would give
  weight to a head that got worse.)
* ``|ΔO_k| ≤ tolerance``: ``ΔO_k²`` is floored at ``tolerance²`` (default ``1e-4``), so a head that
  generalised without overfitting gets the largest finite score ``ΔG_k / tolerance²`` instead of a division
  by zero.
* No head with ``ΔG > 0``: uniform weights (the plain sum of the head losses, up to scale), flagged in
  `GBlending.history` and warned once.

**How it relates to gradmod's pipeline.** Loss weights are coefficients too, one per head, renewed per
super-epoch rather than per step: the "measure" is a pair of `HeadLosses` checkpoints (`checkpoint`
computes one from a model and two loaders), the "policy" is `blending_weights`, and the "applier" is
`GBlending.loss`, which **scales the loss terms**: ``Σ_k w_k L_k``. Scaling head ``k``'s loss by ``w_k``
gives its parameters, and the features it reads, the gradient scaled by ``w_k``; nothing else is changed
and no optimizer hook is needed.

Two ways to get the two checkpoints (module docs page): *on the trajectory* — the heads of the model being
trained, measured at the start and the end of each super-epoch (one evaluation pass per split and
super-epoch) — or the paper's estimate, which trains a copy of the current model per head for one
super-epoch and measures each copy before and after (``K × n`` extra training epochs per estimate).

The authors' released code (facebookresearch/VMZ, ``loss_creator.py``, ``add_weighted_loss``) applies
given weights to the audio, visual and audio-visual losses; the estimator is not released. MultiBench
(``gradient_blend.py``) by default divides the final held-out loss by the final overfitting squared (its
``delta`` mode is the ratio above, with ``|ΔG|``), floors a negative overfitting at 1e-4 and holds out 8 %
of the training set; BalanceBenchmark takes ``|ΔG|`` and divides by zero when ``ΔO = 0``.

**Which head predicts at test time.** The paper evaluates the fused head (the blended losses train it and
the unimodal heads together; the unimodal heads are regularisers). A fused head whose weight collapsed
towards 0 is barely trained by its own loss, which `GBlending` warns about (`COLLAPSED`).

Under ``torch.distributed`` every rank must hold the same weights: `checkpoint` all-reduces its sums, and
`GBlending.update` checks that the recorded losses are identical on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from gradmod._internal import check_logits_target, check_names, collective_device, distributed, per_modality, real_scalar
from gradmod.history import History
from gradmod.measures import IGNORE_INDEX
from gradmod.method import Fit, Method, MethodInfo, Option, check_units

__all__ = ["GBlending", "HeadLosses", "blending_statistics", "blending_weights", "checkpoint"]

#: ``|ΔO|`` at or below which a head counts as not overfitting (``ΔO²`` is floored at its square); MultiBench
#: floors a negative overfitting at the same 1e-4.
DEFAULT_TOLERANCE = 1e-4
#: A head whose weight falls below this share of the uniform weight ``1/K`` is warned about: its loss no longer
#: trains it (G-Blending's weights can collapse onto one head).
COLLAPSED = 1e-2
#: What the history records per head and estimate.
_RECORDED = ("generalization", "overfitting", "weights")

#: ``forward(model, batch) -> ({head: [B, C] logits}, [B] targets)``, as `checkpoint` calls it.
Forward = Callable[[nn.Module, Any], "tuple[Mapping[str, Tensor], Tensor]"]


def _losses(values: Mapping[str, Any], what: str) -> dict[str, float]:
    if not isinstance(values, Mapping):
        raise TypeError(f"{what} must be a mapping head name -> loss, got {type(values).__name__}")
    return {str(name): real_scalar(value, f"{what} of head {name!r}") for name, value in values.items()}


@dataclass(frozen=True)
class HeadLosses:
    """The mean loss of every head on the training split and on the held-out split, at one checkpoint.

    Values are finite reals ``≥ 0`` (floats, numpy reals or 0-d tensors); both mappings name the same heads.
    """

    train: Mapping[str, float]
    held_out: Mapping[str, float]

    def __post_init__(self) -> None:
        train, held_out = _losses(self.train, "train loss"), _losses(self.held_out, "held-out loss")
        check_names(held_out, train, "the held-out losses")
        object.__setattr__(self, "train", train)
        object.__setattr__(self, "held_out", held_out)

    @property
    def heads(self) -> tuple[str, ...]:
        return tuple(self.train)


def blending_statistics(before: HeadLosses, after: HeadLosses) -> tuple[dict[str, float], dict[str, float]]:
    """``(ΔG, ΔO)`` per head between two checkpoints: ``ΔG = L^V_before − L^V_after`` and
    ``ΔO = O_after − O_before`` with the overfitting ``O = L^V − L^T`` (``V`` held-out, ``T`` train)."""
    check_names(after.heads, before.heads, "the heads of the second checkpoint")
    generalization = {k: before.held_out[k] - after.held_out[k] for k in before.heads}
    overfitting = {k: (after.held_out[k] - after.train[k]) - (before.held_out[k] - before.train[k]) for k in before.heads}
    return generalization, overfitting


def blending_weights(before: HeadLosses, after: HeadLosses, *, tolerance: float = DEFAULT_TOLERANCE) -> dict[str, float]:
    """Gradient-Blending weights ``w_k = s_k / Σ_j s_j`` with ``s_k = max(ΔG_k, 0) / max(ΔO_k², τ²)``.

    ``ΔG``, ``ΔO`` from `blending_statistics`; ``τ = tolerance > 0``. A head whose held-out loss did not
    fall gets 0; when none fell, every head gets ``1/K``. The weights are non-negative, sum to 1, follow
    the heads under renaming, are uniform when every head changed alike, and do not change when every loss
    is multiplied by the same ``c > 0`` (while no ``|ΔO|`` is within ``τ``).
    """
    tolerance = real_scalar(tolerance, "tolerance", strict=True)
    generalization, overfitting = blending_statistics(before, after)
    if len(generalization) < 2:
        raise ValueError(f"Gradient-Blending weighs two or more heads, got {list(generalization)}")
    scores = {k: max(g, 0.0) / max(overfitting[k] ** 2, tolerance**2) for k, g in generalization.items()}
    total = math.fsum(scores.values())
    if total == 0.0:
        return {k: 1.0 / len(scores) for k in scores}
    return {k: s / total for k, s in scores.items()}


@torch.no_grad()
def _mean_losses(model: nn.Module, forward: Forward, loader: Iterable, split: str, ignore_index: int) -> dict[str, float]:
    """Mean cross-entropy per head over ``loader`` (sums and counts all-reduced under torch.distributed)."""
    heads: list[str] | None = None
    sums: Tensor | None = None
    for batch in loader:
        logits, target = forward(model, batch)
        if heads is None:
            if not isinstance(logits, Mapping) or len(logits) < 2:
                raise ValueError(f"forward() must return a mapping of two or more head names to logits ({split} loader)")
            heads = list(logits)
        logits = per_modality(logits, heads, f"forward()'s logits ({split} loader)")
        for head in heads:
            check_logits_target(logits[head], target, name=f"logits of head {head!r}")
        batch_sums = [F.cross_entropy(logits[h].double(), target, reduction="sum", ignore_index=ignore_index) for h in heads]
        counted = (target != ignore_index).sum().to(batch_sums[0])
        batch_totals = torch.stack([*batch_sums, counted])
        sums = batch_totals if sums is None else sums + batch_totals.to(sums.device)
    if sums is None:
        raise ValueError(f"the {split} loader yielded no batch")
    if distributed():
        sums = sums.to(collective_device(sums.device))
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    *totals, count = sums.tolist()
    if count == 0:
        raise ValueError(f"the {split} loader yielded no sample with a target (all equal to ignore_index?)")
    means = {head: total / count for head, total in zip(heads, totals)}
    bad = [head for head, value in means.items() if not math.isfinite(value)]
    if bad:
        raise ValueError(f"the {split} loss of heads {bad} is not finite")
    return means


def checkpoint(
    model: nn.Module,
    forward: Forward,
    *,
    train: Iterable,
    held_out: Iterable,
    ignore_index: int = IGNORE_INDEX,
) -> HeadLosses:
    """The mean cross-entropy of every head on ``train`` and on ``held_out``: one `HeadLosses`.

    ``forward(model, batch)`` returns ``({head: [B, C] logits}, [B] class indices)`` for one batch of a
    loader. The model is put in eval mode (its mode is restored) and no gradient is kept. Targets equal to
    ``ignore_index`` count nowhere. Under ``torch.distributed`` the sums and counts are all-reduced (a
    collective: call it on every rank), so every rank returns the means over all ranks' samples. Costs one
    forward pass over each loader.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not callable(forward):
        raise TypeError("forward must be a callable (model, batch) -> ({head: logits}, target)")
    was_training = model.training
    model.eval()
    try:
        return HeadLosses(
            train=_mean_losses(model, forward, train, "train", ignore_index),
            held_out=_mean_losses(model, forward, held_out, "held-out", ignore_index),
        )
    finally:
        model.train(was_training)


def _from_version_1(state: dict[str, Any]) -> dict[str, Any]:
    """Version 1 named its units ``heads`` and kept its estimates as dictionaries."""
    names = state.pop("heads")
    state["names"] = names
    rows, steps = [], []
    for index, entry in enumerate(state.pop("history")):
        values = [float(entry[key][head]) for key in _RECORDED for head in names]
        rows.append(torch.tensor([*values, 0.0 if entry["fallback"] else 1.0, 1.0, 1.0]))
        steps.append(index)
    width = len(_RECORDED) * len(names) + 3
    state["history"] = {"steps": steps, "rows": torch.stack(rows) if rows else torch.empty(0, width), "dropped": 0}
    state["warned"] = ["fallback"] if state.pop("warned") else []
    return state


class GBlending(Method):
    """Gradient-Blending loss weights: the estimator (`update`, `record`) and the loss applier (`loss`).

    Args:
        heads: the names of the heads, e.g. ``("audio", "visual", "fused")``: two or more.
        tolerance: ``τ > 0`` of `blending_weights`.
        measure: ``() -> HeadLosses``, a checkpoint of the model being trained (e.g. ``functools.partial(
            gradmod.methods.gblending.checkpoint, model, forward, train=..., held_out=...)``); with it,
            `start_epoch` records one every ``super_epoch`` epochs, so a trainer callback drives the estimates.
        super_epoch: epochs per estimate when ``measure`` is given.
        validate: check every call's losses for NaN and inf (one host synchronisation).

    Before the first estimate every head weighs ``1/K``. ``update(before, after)`` estimates from any two
    checkpoints (the paper's copies, one per head); ``record(now)`` keeps the last checkpoint and
    estimates from it and ``now`` (the heads of the model being trained, every super-epoch). The history has
    one record per estimate (``step`` counts the estimates), status ``"degenerate"`` when no head generalised.
    """

    kind = "loss"
    loss_inputs = ("losses",)
    state_version = 2
    _migrations = {1: _from_version_1}

    def __init__(
        self,
        heads: Sequence[str],
        *,
        tolerance: float = DEFAULT_TOLERANCE,
        measure: Callable[[], HeadLosses] | None = None,
        super_epoch: int = 1,
        validate: bool = True,
    ) -> None:
        self.names: tuple[str, ...] = check_units(heads, "heads")
        self.validate = bool(validate)
        self.tolerance = real_scalar(tolerance, "tolerance", strict=True)
        if measure is not None and not callable(measure):
            raise TypeError(f"measure must be a callable () -> HeadLosses, got {type(measure).__name__}")
        if isinstance(super_epoch, bool) or not isinstance(super_epoch, int) or super_epoch < 1:
            raise ValueError(f"super_epoch must be an int >= 1, got {super_epoch!r}")
        self.measure = measure
        self.super_epoch = super_epoch
        self._weights = {head: 1.0 / len(self.names) for head in self.names}
        self._last: HeadLosses | None = None
        self._history = History(self.names, fields=_RECORDED, dtype=torch.float64)
        self._warned: set[str] = set()

    @property
    def heads(self) -> tuple[str, ...]:
        """The heads' names (the method's units)."""
        return self.names

    @property
    def weights(self) -> dict[str, float]:
        """The current weight of every head (they sum to 1)."""
        return dict(self._weights)

    def update(self, before: HeadLosses, after: HeadLosses) -> dict[str, float]:
        """Estimate the weights from two checkpoints (`blending_weights`) and use them from now on.

        Under ``torch.distributed`` this is a collective (call it on every rank): it raises a ``ValueError``
        when the ranks recorded different losses. Warns when no head generalised (uniform weights) and when a
        head's weight collapsed below `COLLAPSED` of the uniform weight.
        """
        for name, losses in (("before", before), ("after", after)):
            if not isinstance(losses, HeadLosses):
                raise TypeError(f"{name} must be a gradmod.methods.gblending.HeadLosses, got {type(losses).__name__}")
            check_names(losses.heads, self.names, f"the heads of the {name!r} checkpoint")
        if distributed():
            self._check_ranks_agree(before, after)
        generalization, overfitting = blending_statistics(before, after)
        self._weights = blending_weights(before, after, tolerance=self.tolerance)
        fallback = all(g <= 0.0 for g in generalization.values())
        if fallback:
            self._warn_once(
                "fallback",
                f"no head's held-out loss fell between the two checkpoints; every head weighs 1/{len(self.names)} until "
                "the next estimate",
                stacklevel=3,
            )
        collapsed = [head for head, weight in self._weights.items() if weight < COLLAPSED / len(self.names)]
        if collapsed:
            shown = ", ".join(f"{head!r} = {self._weights[head]:.2g}" for head in collapsed)
            self._warn_once(
                "collapsed",
                f"the weights of {shown} collapsed (below {COLLAPSED:g}/{len(self.names)}): their losses barely train "
                "them any more; a longer super-epoch or a larger held-out split gives steadier estimates",
                stacklevel=3,
            )
        values = [
            torch.tensor([float(table[h]) for h in self.names], dtype=torch.float64)
            for table in (generalization, overfitting, self._weights)
        ]
        self._history.append(len(self._history) + self._history.dropped, values, usable=not fallback)
        return self.weights

    def record(self, now: HeadLosses) -> dict[str, float] | None:
        """Keep the checkpoint ``now``; from the second call on, `update` from the previous one to ``now``.

        Returns the new weights, or ``None`` at the first call (the weights stay as they are).
        """
        if not isinstance(now, HeadLosses):
            raise TypeError(f"record() needs a gradmod.methods.gblending.HeadLosses, got {type(now).__name__}")
        check_names(now.heads, self.names, "the heads of the checkpoint")
        weights = None if self._last is None else self.update(self._last, now)
        self._last = now
        return weights

    def start_epoch(self, epoch: int) -> None:
        """With ``measure``: `record` a checkpoint at the start of every ``super_epoch``-th epoch (0, k, 2k, …)."""
        if self.measure is not None and epoch % self.super_epoch == 0:
            self.record(self.measure())

    def loss(self, losses: Mapping[str, Tensor]) -> Tensor:
        """The blended loss ``Σ_k w_k L_k`` of one batch: each head's (0-d) loss scaled by its weight."""
        losses = per_modality(losses, self.names, "loss(losses=...)")
        for head in self.names:
            value = losses[head]
            if not isinstance(value, Tensor) or value.dim() != 0:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"the loss of head {head!r} must be a 0-d tensor (reduced over the batch), got {shape}")
        if self.validate:
            finite = torch.stack([losses[head].detach().double() for head in self.names]).isfinite().tolist()
            bad = [head for head, ok in zip(self.names, finite) if not ok]
            if bad:
                raise ValueError(f"gradmod G-Blending: the losses of heads {bad} are NaN or inf")
        return sum(self._weights[head] * losses[head] for head in self.names)

    def _check_ranks_agree(self, before: HeadLosses, after: HeadLosses) -> None:
        heads = self.names
        values = [c.train[h] for c in (before, after) for h in heads] + [c.held_out[h] for c in (before, after) for h in heads]
        bounds = torch.tensor([values, [-v for v in values]], dtype=torch.float64, device=collective_device(torch.device("cpu")))
        dist.all_reduce(bounds, op=dist.ReduceOp.MAX)
        if not torch.equal(bounds[0], -bounds[1]):
            raise ValueError(
                "gradmod G-Blending: the ranks recorded different losses, so their weights would differ; measure them "
                "with gradmod.methods.gblending.checkpoint (which all-reduces) or all-reduce them before update()/record()"
            )

    def _extra_state(self) -> dict[str, Any]:
        """The weights, the last recorded checkpoint and the warnings shown."""
        last = None if self._last is None else {"train": dict(self._last.train), "held_out": dict(self._last.held_out)}
        return {"tolerance": self.tolerance, "weights": dict(self._weights), "last": last, "warned": sorted(self._warned)}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        weights = _losses(state["weights"], "saved weight")
        check_names(weights, self.names, "the saved weights")
        self.tolerance = real_scalar(state["tolerance"], "saved tolerance", strict=True)
        self._weights = {head: weights[head] for head in self.names}
        self._last = None if state["last"] is None else HeadLosses(**state["last"])
        self._warned = set(state["warned"])

    def _reset(self) -> None:
        self._weights = {head: 1.0 / len(self.names) for head in self.names}
        self._last = None
        self._warned = set()

    def __repr__(self) -> str:
        weights = ", ".join(f"{head}={weight:.3f}" for head, weight in self._weights.items())
        return f"GBlending(heads={list(self.names)}, weights=({weights}))"


METHODS = (
    MethodInfo(
        key="gblending",
        preset=GBlending,
        title="G-Blending",
        kind="loss",
        paper="Wang, Tran & Feiszli, What Makes Training Multi-modal Classification Networks Hard?, CVPR 2020",
        page="methods/gblending.md",
        observes="per super-epoch: train and held-out loss per head",
        cost="weigh the K head losses; an evaluation pass per super-epoch",
        fit=Fit(head="unimodal heads", acts_on="loss"),
        options=(
            Option("super_epoch", 1, "re-estimate the loss weights every this many epochs", int),
            Option("holdout", 0.08, "fraction of the training split held out to estimate the weights (MultiBench's 8%)", float, loop=True),
        ),
    ),
)
