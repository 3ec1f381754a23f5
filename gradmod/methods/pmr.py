"""PMR: Fan, Xu, Wang, Wang & Guo, *PMR: Prototypical Modal Rebalance for Multimodal Learning*, CVPR 2023.

Every modality gets a non-parametric classifier: the class **prototypes** ``c_{m,k}``, the mean feature of
class ``k`` in modality ``m``, recomputed every epoch. The prototype scores tell which modality learns
slower, and a **prototypical cross-entropy** pulls that modality's features towards their class prototypes,
accelerating it without touching the others; a **prototypical entropy regulariser** slows the dominant
modality's early convergence. Official code ``fanyunfeng-bit/Modal-Imbalance-PMR`` (``main_Prototype_grad.py``:
``calculate_prototype``, ``train_epoch``); equations numbered here (the paper's text was not available).

* **Prototypes** (P1), once per epoch (`prototype_pass`, `class_means`): ``c_{m,k}`` = the mean of ``h_m``
  over the samples of class ``k`` in the first ``max(1, ⌊n/10⌋)`` batches of the ``n`` training batches, in eval
  mode without gradients; from epoch 2 on, with momentum: ``c ← (1 − μ)·c_new + μ·c_old``.
* **Distances** (P2) ``d_{m,i,k} = ‖h_{m,i} − c_{m,k}‖`` (`prototype_distances`); the prototype classifier's
  logits are ``−d``.
* **Scores and ratio** (P3) ``s_m = Σ_i softmax(−d_{m,i})[y_i]`` (`prototype_scores`),
  ``ρ_m = s_m / mean_{n≠m} s_n`` (for two modalities ``s_a / s_v``).
* **Loss** (P4) ``L = CE(z, y) + Σ_m w_m·CE(−d_m, y)`` with ``w_m = α`` where ``ρ_m < 1`` (the slower modality)
  and 0 elsewhere (`prototype_weights`): the official ``(β, λ) = (0, α)`` when ``ρ_a > 1``, ``(α, 0)`` when
  ``ρ_a < 1``, ``(0, 0)`` at a tie.
* **Entropy regulariser** (P5, optional, off by default: not in the released script) ``− μ_E · Σ_{m: ρ_m > 1}
  (1/B) Σ_i H(softmax(−d_{m,i}))`` during the first ``entropy_epochs`` epochs (`prototype_entropy`). The
  abstract: "a prototype-based entropy regularization term during the early training stage to prevent
  premature convergence" of the dominant modality; preventing convergence means keeping its prototype
  distribution's entropy high, so the term *rewards* entropy (a confidence penalty). Its weight and length
  are gradmod's choice.

Guards (the official code gives NaN at both): a class absent from the prototype pass keeps its previous
prototype, or, before it ever had one, is left out of the prototype classifier (its logit is −∞ and samples
of that class add no prototype loss or score), with a warning naming it; a feature equal to a prototype has
distance 0 and gradient 0 there (the norm's subgradient), not ``0/0``.

**M > 2**: ``ρ_m`` against the mean of the others, and every modality with ``ρ_m < 1`` gets the prototype
loss. (BalanceBenchmark replaces the prototype loss by OGM-style gradient scaling with noise for three
modalities.) Under ``torch.distributed`` the prototype pass and the scores are all-reduced, so every rank
holds the same prototypes and picks the same modality.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from gradmod._internal import (
    check_logits_target,
    collective_device,
    distributed,
    per_modality,
    real_scalar,
    target_problems,
)
from gradmod.functional import ratios_of
from gradmod.history import History
from gradmod.measures import IGNORE_INDEX
from gradmod.method import Fit, Method, MethodInfo, Option, Strength, check_units

__all__ = [
    "PMR",
    "ClassMeans",
    "class_means",
    "prototype_distances",
    "prototype_entropy",
    "prototype_pass",
    "prototype_scores",
    "prototype_weights",
]

#: α of (P4), the official argparse default (the authors' run script uses 2).
DEFAULT_PROTOTYPE_WEIGHT = 1.0
#: μ of the prototype momentum (P1), the official argparse default (the run script uses 0).
DEFAULT_MOMENTUM = 0.2
#: The first epoch whose prototypes are blended with the previous ones (the official ``epoch <= 0`` test,
#: evaluated after the epoch before).
MOMENTUM_FROM = 2
#: What the history records per modality and step.
_RECORDED = ("score", "ratio", "weight")

#: ``forward(model, batch) -> ({modality: [B, D_m] features}, [B] targets)``, as `prototype_pass` calls it.
Forward = Callable[[nn.Module, Any], "tuple[Mapping[str, Tensor], Tensor]"]


# ----------------------------------------------------------------------------------------- prototypes
@dataclass(frozen=True)
class ClassMeans:
    """The class means of every modality's features over some batches (P1), and the samples per class.

    ``means[m]`` is ``[C, D_m]``; a class with ``counts[k] == 0`` has a row of zeros (not a prototype).
    """

    means: Mapping[str, Tensor]
    counts: Tensor

    @property
    def missing(self) -> list[int]:
        """The classes no sample represented."""
        return [k for k, count in enumerate(self.counts.tolist()) if count == 0]


def class_means(batches: Iterable[tuple[Mapping[str, Tensor], Tensor]], num_classes: int) -> ClassMeans:
    """Class means of the features over ``batches`` of ``({modality: [B, D_m]}, [B] targets)`` (P1).

    Sums are taken in float64 (the means are returned in it); under ``torch.distributed`` the sums and
    counts are all-reduced (a collective: call it on every rank).
    """
    sums: dict[str, Tensor] | None = None
    counts: Tensor | None = None
    for features, target in batches:
        if sums is None:
            if not isinstance(features, Mapping) or len(features) < 2:
                raise ValueError("each batch must give a mapping of two or more modality names to [B, D] features")
            sums = {name: torch.zeros(num_classes, f.shape[1], dtype=torch.float64, device=f.device) for name, f in features.items()}
            counts = torch.zeros(num_classes, dtype=torch.float64, device=target.device)
        features = per_modality(features, list(sums), "the prototype pass's features")
        if target.dim() != 1 or target.dtype.is_floating_point:
            raise ValueError(f"the prototype pass's targets must be [B] class indices, got {tuple(target.shape)} {target.dtype}")
        if ((target < 0) | (target >= num_classes)).any():
            raise ValueError(f"the prototype pass's targets hold class indices outside [0, {num_classes})")
        for name, value in features.items():
            if value.dim() != 2 or value.shape[0] != target.shape[0]:
                raise ValueError(f"features[{name!r}] of the prototype pass must be [B={target.shape[0]}, D], got {tuple(value.shape)}")
            sums[name].index_add_(0, target.to(value.device), value.detach().double())
        counts.index_add_(0, target, torch.ones_like(target, dtype=torch.float64))
    if sums is None:
        raise ValueError("the prototype pass yielded no batch")
    if distributed():
        names = list(sums)
        flat = torch.cat([*(sums[n].flatten() for n in names), counts.to(sums[names[0]].device)])
        flat = flat.to(collective_device(flat.device))
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        start = 0
        for name in names:
            size = sums[name].numel()
            sums[name] = flat[start : start + size].view_as(sums[name]).to(sums[name].device)
            start += size
        counts = flat[start:].to(counts.device)
    divisor = counts.clamp_min(1.0).unsqueeze(1)
    return ClassMeans(means={name: total / divisor.to(total.device) for name, total in sums.items()}, counts=counts.long())


@torch.no_grad()
def prototype_pass(model: nn.Module, forward: Forward, loader: Iterable, num_classes: int, *, batches: int | None = None) -> ClassMeans:
    """The official prototype pass (P1): `class_means` of the first ``batches`` batches of ``loader``.

    ``batches=None``: ``max(1, len(loader) // 10)``, as the official ``calculate_prototype``. The model is put in
    eval mode (its mode is restored) and no gradient is kept. ``forward(model, batch)`` returns
    ``({modality: [B, D_m] features}, [B] class indices)``.
    """
    if batches is None:
        if not hasattr(loader, "__len__"):
            raise TypeError("the loader has no len(): give prototype_pass(..., batches=n)")
        batches = max(1, len(loader) // 10)
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ValueError(f"batches must be an int >= 1, got {batches!r}")
    was_training = model.training
    model.eval()
    try:
        def first() -> Iterable[tuple[Mapping[str, Tensor], Tensor]]:
            for index, batch in enumerate(loader):
                if index == batches:
                    return
                yield forward(model, batch)

        return class_means(first(), num_classes)
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------- equations
def prototype_distances(features: Tensor, prototypes: Tensor) -> Tensor:
    """(P2) ``d_{i,k} = ‖h_i − c_k‖`` ``[B, C]`` for features ``[B, D]`` and prototypes ``[C, D]`` (detached).

    A zero distance has gradient 0 (where the official ``sqrt`` of a zero dot product gives NaN).
    """
    difference = features.unsqueeze(1) - prototypes.detach().to(features.dtype).unsqueeze(0)
    squared = difference.square().sum(2)
    positive = squared > 0
    return torch.where(positive, squared.clamp_min(torch.finfo(squared.dtype).tiny).sqrt(), torch.zeros_like(squared))


def prototype_scores(distances: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """(P3) ``s = Σ_i softmax(−d_i)[y_i]`` over the samples with ``valid`` (all by default), detached, float32+."""
    logits = -distances.detach()
    probs = torch.softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=1)
    picked = probs.gather(1, target.clamp_min(0).unsqueeze(1)).squeeze(1)
    return (picked if valid is None else picked * valid).sum()


def prototype_weights(scores: Mapping[str, Tensor], prototype_weight: float = DEFAULT_PROTOTYPE_WEIGHT) -> dict[str, Tensor]:
    """(P4) ``w_m = α`` where ``ρ_m = s_m / mean_{n≠m} s_n < 1``, else 0 (a tie, or all scores 0: 0 everywhere)."""
    alpha = real_scalar(prototype_weight, "prototype_weight")
    names = list(scores)
    ratios = ratios_of(torch.stack([torch.as_tensor(scores[n]).double().reshape(()) for n in names]))
    return dict(zip(names, ((ratios < 1.0).double() * alpha).unbind(0)))


def prototype_entropy(distances: Tensor) -> Tensor:
    """(P5) the mean entropy ``(1/B) Σ_i H(softmax(−d_i))`` of the prototype classifier over finite distances."""
    log_probs = torch.log_softmax(-distances, dim=1)
    return -(log_probs.exp() * log_probs).sum(1).mean()


# ----------------------------------------------------------------------------------------- the method
class PMR(Method):
    """Prototypical modal rebalance: the prototype cross-entropy on the slower modality (module docstring).

    ``loss(logits=, features=, target=)`` returns ``CE(z, y) + Σ_m w_m·CE(−d_m, y)`` (P4) ``[− μ_E·H]`` (P5).
    The prototypes come from ``measure`` in `start_epoch` (e.g. ``functools.partial(prototype_pass, model,
    forward, train_loader, num_classes)``), or from `update` called by you.

    Args:
        modalities: the modality names, two or more.
        num_classes: ``C``.
        measure: ``() -> ClassMeans``; with it, ``start_epoch(epoch)`` runs it and calls ``update``.
        prototype_weight: ``α ≥ 0`` of (P4).
        momentum: ``μ ∈ [0, 1)`` of (P1), used from epoch 2 on.
        entropy_weight: ``μ_E ≥ 0`` of (P5); 0 (default) leaves it out, as the released script does.
        entropy_epochs: the epochs ``0 … entropy_epochs − 1`` that use (P5).
        ignore_index: samples whose target equals it add no loss and no score.
    """

    kind = "loss"
    state_version = 1
    loss_inputs = ("logits", "features", "target")

    def __init__(
        self,
        modalities: Sequence[str],
        num_classes: int,
        *,
        measure: Callable[[], ClassMeans] | None = None,
        prototype_weight: float = DEFAULT_PROTOTYPE_WEIGHT,
        momentum: float = DEFAULT_MOMENTUM,
        entropy_weight: float = 0.0,
        entropy_epochs: int = 10,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        self.names: tuple[str, ...] = check_units(modalities, "modalities")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if measure is not None and not callable(measure):
            raise TypeError(f"measure must be a callable () -> ClassMeans, got {type(measure).__name__}")
        self.num_classes = num_classes
        self.measure = measure
        self.prototype_weight = real_scalar(prototype_weight, "prototype_weight")
        self.momentum = real_scalar(momentum, "momentum")
        if self.momentum >= 1:
            raise ValueError(f"momentum must lie in [0, 1) (1 would never update the prototypes), got {momentum!r}")
        self.entropy_weight = real_scalar(entropy_weight, "entropy_weight")
        if isinstance(entropy_epochs, bool) or not isinstance(entropy_epochs, int) or entropy_epochs < 0:
            raise ValueError(f"entropy_epochs must be an int >= 0, got {entropy_epochs!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
        self.entropy_epochs = entropy_epochs
        self.ignore_index = ignore_index
        self._history = History(self.names, fields=_RECORDED, dtype=torch.float64)
        self._reset()

    # ------------------------------------------------------------------ prototypes
    @property
    def prototypes(self) -> dict[str, Tensor] | None:
        """``{modality: [C, D_m]}`` (float64; rows of classes without a prototype are zeros), or ``None``."""
        return None if self._prototypes is None else dict(self._prototypes)

    @property
    def missing(self) -> list[int]:
        """The classes that have no prototype yet (left out of the prototype classifier)."""
        return [] if self._present is None else [k for k, present in enumerate(self._present.tolist()) if not present]

    def start_epoch(self, epoch: int) -> None:
        """Epoch ``epoch`` (0-based) begins: with ``measure``, recompute the prototypes (`update`)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self._epoch = epoch
        if self.measure is not None:
            self.update(self.measure(), epoch)

    def update(self, means: ClassMeans, epoch: int) -> None:
        """New prototypes from ``means`` for epoch ``epoch`` (P1): blended with momentum from epoch 2 on.

        A class that ``means`` does not represent keeps its prototype; one that never had a prototype stays
        out of the prototype classifier (warned once, naming the classes).
        """
        if not isinstance(means, ClassMeans):
            raise TypeError(f"update() needs a gradmod.methods.pmr.ClassMeans, got {type(means).__name__}")
        new = per_modality(means.means, self.names, "the class means")
        counts = means.counts.reshape(-1)
        if counts.shape[0] != self.num_classes:
            raise ValueError(f"the class means count {counts.shape[0]} classes, PMR was built for {self.num_classes}")
        seen = counts > 0
        if not seen.any():
            raise ValueError("the prototype pass saw no sample: no class has a prototype")
        finite = torch.stack([torch.isfinite(new[name]).all() for name in self.names]).tolist()
        if not all(finite):
            raise ValueError(f"the class means of modalities {[n for n, f in zip(self.names, finite) if not f]} contain NaN or inf")
        blend = self._prototypes is not None and epoch >= MOMENTUM_FROM and self.momentum > 0
        old_present = torch.zeros_like(seen) if self._present is None else self._present.to(seen.device)
        updated = {}
        for name in self.names:
            fresh = new[name].detach().double()
            if fresh.dim() != 2 or fresh.shape[0] != self.num_classes:
                raise ValueError(f"the class means of {name!r} must be [{self.num_classes}, D], got {tuple(fresh.shape)}")
            old = self._prototypes[name].to(fresh.device) if self._prototypes is not None else torch.zeros_like(fresh)
            if old.shape != fresh.shape:
                raise ValueError(f"the class means of {name!r} are {tuple(fresh.shape)}, the prototypes {tuple(old.shape)}")
            value = fresh
            if blend:
                value = torch.where((seen & old_present).unsqueeze(1), (1 - self.momentum) * fresh + self.momentum * old, fresh)
            updated[name] = torch.where(seen.unsqueeze(1), value, old)
        self._prototypes = updated
        self._present = (seen | old_present).cpu()
        self._updates += 1
        if self.missing:
            self._warn_once(
                "missing",
                f"classes {self.missing} had no sample in the prototype pass and have no prototype yet: they are left out "
                "of the prototype classifier (their samples add no prototype loss); a larger prototype pass (prototype_pass("
                "..., batches=...)) or a class-balanced loader fills them",
                stacklevel=3,
            )

    # ------------------------------------------------------------------ the loss
    def loss(self, *, logits: Tensor, features: Mapping[str, Tensor], target: Tensor) -> Tensor:
        """The step's loss, (P4) and (P5): ``CE(z, y) + Σ_m w_m·CE(−d_m, y) − μ_E·Σ_{ρ_m > 1} H_m``."""
        if self._prototypes is None:
            raise RuntimeError(
                "gradmod PMR: loss() before any prototypes: give PMR(measure=...) and call pmr.start_epoch(epoch) before "
                "every epoch, or call pmr.update(class_means(...), epoch)"
            )
        features, valid, learnable = self._checked(logits, features, target)
        present = self._present.to(logits.device)
        blocked = torch.where(present, 0.0, float("inf")).to(logits.dtype)
        for name in self.names:  # once, after a state loaded on the CPU
            if self._prototypes[name].device != features[name].device:
                self._prototypes[name] = self._prototypes[name].to(features[name].device)
        distances = {name: prototype_distances(features[name], self._prototypes[name]) + blocked for name in self.names}
        scores = torch.stack([prototype_scores(distances[name], target, valid) for name in self.names]).double()
        if distributed():
            scores = scores.to(collective_device(scores.device))
            dist.all_reduce(scores, op=dist.ReduceOp.SUM)
        ratios = ratios_of(scores)
        weights = (ratios < 1.0).double() * self.prototype_weight
        total = F.cross_entropy(logits, target, ignore_index=self.ignore_index)
        if learnable:
            kept_target = torch.where(valid, target, torch.full_like(target, self.ignore_index))
            for index, name in enumerate(self.names):
                prototype_loss = F.cross_entropy(-distances[name], kept_target, ignore_index=self.ignore_index)
                total = total + weights[index].to(logits.device, logits.dtype) * prototype_loss
        if learnable and self.entropy_weight > 0 and (self._epoch or 0) < self.entropy_epochs:
            columns = present.nonzero().squeeze(1)
            rows = (target != self.ignore_index).nonzero().squeeze(1)
            for index, name in enumerate(self.names):
                entropy = prototype_entropy(distances[name][rows][:, columns])
                dominant = (ratios[index] > 1.0).to(logits.device, logits.dtype)
                total = total - dominant * self.entropy_weight * entropy
        usable = bool(torch.isfinite(ratios).all())
        self._history.append(self._step, (scores.double().cpu(), ratios.cpu(), weights.cpu()), usable=usable)
        if not usable:
            self._warn_once(
                "no_score",
                "every modality's prototype score is 0 on this batch (its samples have no prototype, or their "
                "prototypes are infinitely far): no prototype loss this step",
                stacklevel=3,
            )
        self._step += 1
        return total

    def _checked(self, logits: Tensor, features: Mapping[str, Tensor], target: Tensor) -> tuple[Mapping[str, Tensor], Tensor, bool]:
        """The features checked, the samples that count for the prototype terms, and whether there is one (one sync)."""
        check_logits_target(logits, target)
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"logits have {logits.shape[1]} classes, PMR was built for {self.num_classes}")
        if target.shape[0] == 0:
            raise ValueError("loss() got an empty batch")
        features = per_modality(features, self.names, "loss(features=...)")
        problems = target_problems("fused", logits, target, self.ignore_index)
        for name in self.names:
            value, width = features[name], self._prototypes[name].shape[1]
            if not isinstance(value, Tensor) or value.dim() != 2 or value.shape != (target.shape[0], width):
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"features[{name!r}] must be [batch={target.shape[0]}, {width}] like its prototypes, got {shape}")
            problems[f"features of modality {name!r} contain NaN or inf"] = ~torch.isfinite(value.detach()).all()
        problems["every target equals ignore_index: the batch has nothing to learn"] = (target == self.ignore_index).all()
        present = self._present.to(target.device)
        valid = (target != self.ignore_index) & present[target.clamp(0, self.num_classes - 1)]
        flags = torch.stack([flag.reshape(()).to(logits.device) for flag in [*problems.values(), valid.any()]]).tolist()
        for message, flag in zip(problems, flags):
            if flag:
                raise ValueError(message)
        return features, valid, bool(flags[-1])

    # ------------------------------------------------------------------ state
    def _extra_state(self) -> dict[str, Any]:
        """The configuration, the prototypes, which classes have one, the epoch, the counters and the warnings."""
        prototypes = None if self._prototypes is None else {n: p.detach().cpu().clone() for n, p in self._prototypes.items()}
        return {
            "num_classes": self.num_classes,
            "prototype_weight": self.prototype_weight,
            "momentum": self.momentum,
            "entropy_weight": self.entropy_weight,
            "entropy_epochs": self.entropy_epochs,
            "prototypes": prototypes,
            "present": None if self._present is None else self._present.clone(),
            "epoch": self._epoch,
            "step": self._step,
            "updates": self._updates,
            "warned": sorted(self.__dict__.get("_warned", ())),
        }

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        for key in ("num_classes", "prototype_weight", "momentum", "entropy_weight", "entropy_epochs"):
            if state[key] != getattr(self, key):
                raise ValueError(f"PMR state_dict has {key}={state[key]!r}, this PMR has {key}={getattr(self, key)!r}")
        self._prototypes = None if state["prototypes"] is None else {n: p.double().clone() for n, p in state["prototypes"].items()}
        self._present = None if state["present"] is None else torch.as_tensor(state["present"]).bool().clone()
        self._epoch = state["epoch"]
        self._step = int(state["step"])
        self._updates = int(state["updates"])
        self._warned = set(state["warned"])

    def _reset(self) -> None:
        self._prototypes: dict[str, Tensor] | None = None
        self._present: Tensor | None = None
        self._epoch: int | None = None
        self._step = 0
        self._updates = 0
        self._warned: set[str] = set()

    def __repr__(self) -> str:
        return (
            f"PMR(modalities={list(self.names)}, num_classes={self.num_classes}, prototype_weight={self.prototype_weight:g}, "
            f"momentum={self.momentum:g}, entropy_weight={self.entropy_weight:g}, prototypes={self._updates} updates)"
        )


METHODS = (
    MethodInfo(
        key="pmr",
        preset=PMR,
        title="PMR",
        kind="loss",
        paper="Fan et al., PMR: Prototypical Modal Rebalance for Multimodal Learning, CVPR 2023",
        page="methods/pmr.md",
        observes="per step: fused logits, features, targets; per epoch: class prototypes from a pass over a tenth of the training set",
        cost="B×C distances per modality and step; a forward pass over a tenth of the training set per epoch",
        fit=Fit(head="any", acts_on="loss"),
        strength=Strength("prototype_weight", DEFAULT_PROTOTYPE_WEIGHT, "α: weight of the prototype cross-entropy on the slower modality"),
        options=(
            Option("momentum", DEFAULT_MOMENTUM, "μ of the prototype momentum (from epoch 2 on)", float),
            Option("entropy_weight", 0.0, "weight of the prototype entropy reward on the dominant modality (0: off, as released)", float),
        ),
    ),
)
