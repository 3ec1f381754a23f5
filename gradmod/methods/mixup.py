"""Multimodal Mixup (MM) and Balanced Multimodal Mixup (B-MM): Ma, Ding & Chen, *Mixup Helps Understanding
Multimodal Video Better* (2025), sections 3.2–3.3.

MM and B-MM act on data, not on gradients: they build virtual (input, soft-label) pairs and are trained
with `soft_cross_entropy`. The imbalance factor κ and the mixing strength come from
`imbalance_factor` (eqs. (5)–(6)) and `bmm_strength`
(eq. (7)).

**MM** (`MultimodalMixup`, eq. (3), after Zhang et al. 2017) mixes the *fused* multimodal feature
of each sample with that of a partner ``π(i)`` drawn by a random permutation of the batch, and the one-hot
labels with the same weight. Modelling choices:

* One weight per batch, ``w ~ Beta(α, α)`` (``α`` is the preset's ``concentration``); the output is ``(1 − w)·f + w·f[π]`` with target
  ``(1 − w)·onehot(y) + w·onehot(y[π])``. Eq. (3) writes ``λ·f + (1 − λ)·f[π]``; as ``Beta(α, α)`` is
  symmetric, ``w = 1 − λ`` has the same law, so the two are the same distribution of virtual samples.
* ``α = 0`` is ERM (the paper's limit ``α → 0``): the features pass through unchanged, the target is one-hot,
  and no random number is drawn.
* Reproducibility: the permutation is ``torch.randperm`` with a CPU ``torch.Generator`` the object owns.
  torch has no public Beta sampler that takes a generator, so each call draws one 62-bit seed from that
  generator and samples ``w`` with ``numpy.random.default_rng(seed).beta(α, α)`` (numpy's documented
  Beta sampler). The whole stream is therefore a function of the torch generator's state alone, which is
  what `MultimodalMixup.state_dict` saves.

**B-MM** (`BalancedMixup`, eqs. (5)–(8)) mixes only the *weaker* modality's input across samples;
the stronger modality's input is left as it is, and the label follows the mix. (Spherical interpolation
between one sample's audio and visual features is a different method and is not done here.)

* After every training epoch the caller passes the training-set accuracy of each unimodal branch (the
  other modalities masked to zero, eqs. (5)–(6)) to `BalancedMixup.update`, which smooths it over epochs
  (`smoothed_accuracy`, below) and computes ``κ_u = ā_u / mean_{v≠u} ā_v`` from the smoothed ``ā``.
* **A stable estimate.** Which modality is weak decides what gets mixed, so a noisy estimate of two
  close accuracies mixes the *strong* one in some epochs. `BalancedMixup` therefore keeps an exponential
  moving average, ``ā_t = s·ā_{t−1} + (1 − s)·acc_t`` with ``ā_1 = acc_1`` (``smoothing = s``, default
  0.5): for noise independent across epochs it keeps ``(1 − s)/(1 + s)`` of the variance (a third for
  0.5) and lags a real change by ``s/(1 − s)`` epochs (one). ``smoothing=0`` uses each epoch's own
  accuracies, as the paper prints eq. (5). Measure the accuracies in eval mode on a fixed set (the
  whole training split, or a fixed slice of it), from decoupled per-modality logits where the head has
  them; a fresh random subset per epoch adds sampling noise that the average then has to remove.
* The strength for the next epoch is ``λ = tanh(β·(κ_max − 1))`` (eq. (7), gradmod's reading via
  ``bmm_strength``; ``β`` = ``degree``), ``κ_max`` the strongest modality's factor. Each batch draws a
  permutation ``π``; every weak modality's input becomes ``(1 − λ)·x_w + λ·x_w[π]`` (eq. (8)) and the soft
  target is ``(1 − λ)·onehot(y) + λ·onehot(y[π])``. ``λ`` is fixed for the epoch, not sampled per batch.
* Warm-up: with ``warmup_epochs = W`` the first ``W`` epochs (0-based epochs ``0 … W−1``) train without
  B-MM; mixing is active from the epoch that follows the ``W``-th call to ``update`` and uses the κ of that
  call. Epoch 0 never mixes (no κ exists yet), so ``W = 0`` and ``W = 1`` behave the same. κ is still
  computed during warm-up, for logging.
* Balanced (no κ above 1, hence all κ equal) or ``β = 0`` means ``λ = 0``: inputs pass through and the
  target is one-hot; no random number is drawn when ``λ = 0``. If every other modality has zero accuracy,
  ``κ_max = ∞`` and ``λ = 1`` (for ``β > 0``): the weak inputs and the labels are wholly the partner's.
* M > 2 modalities (the paper treats two): the weak modalities are all those with ``κ_u < 1`` (below the
  mean of the others); they are mixed with one shared ``λ`` from the strongest ``κ`` and one shared
  ``π``. Sharing ``λ`` and ``π`` is what keeps the soft label consistent with every mixed input; strong
  modalities (``κ_u ≥ 1``) are never mixed. For two modalities this is exactly eq. (8).
* Reproducibility: ``π`` comes from a CPU ``torch.Generator`` seeded with ``seed`` (or, if ``seed`` is
  None, with a seed drawn from torch's global RNG, so ``torch.manual_seed`` fixes it).
  `BalancedMixup.state_dict` saves the epoch count, the smoothed accuracies, κ and the generator
  state, so a resumed run mixes exactly as an uninterrupted one. Under ``torch.distributed`` every rank permutes only its local
  batch; equal seeds on all ranks are harmless because the ranks hold different samples.

Inputs must be floating point (any shape ``[B, …]``: spectrograms, frames, features); targets are ``[B]``
integer class indices. Soft targets are float32 on the target's device. Checking the target range costs
one host synchronisation per call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from gradmod._internal import (
    NOT_GIVEN,
    SEED_HIGH,
    check_names,
    real_scalar,
    renamed_keyword,
    seeded_generator,
)
from gradmod.functional import discrepancy_ratios
from gradmod.history import History
from gradmod.method import Fit, Method, MethodInfo, Option, Strength, check_units

__all__ = [
    "BalancedMixup",
    "MultimodalMixup",
    "bmm_strength",
    "imbalance_factor",
    "smoothed_accuracy",
    "soft_cross_entropy",
]

_REDUCTIONS = ("mean", "sum", "none")
_SUM_TOLERANCE = 1e-3


def imbalance_factor(unimodal_accuracy: Mapping[str, float]) -> dict[str, float]:
    """B-MM imbalance factor after an epoch (Ma, Ding & Chen, eqs. (5)–(6), after Peng et al. 2022).

    ``κ_u = acc_u / mean_{v≠u} acc_v``, each ``acc_u`` the training-set accuracy with every other modality
    masked to zero. For two modalities ``κ_a = acc_a / acc_v`` and ``κ_v = 1/κ_a``. Zero accuracy of the
    others gives ``inf``.
    """
    values = {n: real_scalar(a, f"unimodal accuracy of {n!r}") for n, a in unimodal_accuracy.items()}
    tensors = {n: torch.tensor(a, dtype=torch.float64) for n, a in values.items()}
    if all(a == 0 for a in values.values()):
        raise ValueError("all unimodal accuracies are zero: the imbalance factor is undefined")
    return {n: float(r) for n, r in discrepancy_ratios(tensors).items()}



def bmm_strength(kappa: float, degree: float) -> float:
    """B-MM mixing strength of the weaker modality (Ma, Ding & Chen, eq. (7)): ``λ = tanh(β · (κ − 1))``.

    ``κ ≥ 1`` is the strong modality's imbalance factor (`imbalance_factor`), ``β = degree ≥ 0``.
    Monotone non-decreasing in ``κ``, in ``[0, 1)``, and 0 when balanced (``κ ≤ 1``).
    """
    degree = real_scalar(degree, "degree")
    if math.isnan(kappa):
        raise ValueError("imbalance factor is NaN")
    excess = max(kappa - 1.0, 0.0)
    return 0.0 if degree == 0 or excess == 0 else math.tanh(degree * excess)



def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _one_hot_target(target: Tensor, batch_size: int, num_classes: int) -> Tensor:
    """Validated ``[B]`` class indices as a float32 one-hot ``[B, C]`` on the target's device."""
    if not isinstance(target, Tensor):
        raise ValueError(f"target must be a tensor of class indices, got {type(target).__name__}")
    if target.dim() != 1 or target.shape[0] != batch_size:
        raise ValueError(f"target must be [batch] = [{batch_size}] class indices, got shape {tuple(target.shape)}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")
    out_of_range = (target < 0) | (target >= num_classes)
    if bool(out_of_range.any()):
        bad = target[out_of_range].unique().tolist()
        raise ValueError(f"target holds class indices {bad} outside [0, {num_classes})")
    return F.one_hot(target.long(), num_classes).float()


def _check_features(x: Tensor, name: str) -> int:
    """Batch size of a floating-point ``[B, …]`` tensor with ``B ≥ 1``."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch [B, ...], got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be floating point to be mixed, got dtype {x.dtype}")
    return x.shape[0]


def _mix_with_partner(x: Tensor, permutation: Tensor, partner_weight: float) -> Tensor:
    """``(1 − w)·x + w·x[π]`` along the batch dimension (eqs. (3) and (8))."""
    return torch.lerp(x, x[permutation.to(x.device)], partner_weight)


def smoothed_accuracy(
    previous: Mapping[str, float] | None, current: Mapping[str, float], smoothing: float
) -> dict[str, float]:
    """One step of the exponential moving average of per-modality accuracies, B-MM's stable estimate:

    ``ā_u = s·previous_u + (1 − s)·current_u``, and ``ā_u = current_u`` when ``previous`` is ``None`` (the
    first epoch). ``s = smoothing ∈ [0, 1)``; ``s = 0`` returns ``current``. Each ``ā_u`` lies between
    ``previous_u`` and ``current_u``; the average follows the modalities under renaming and treats them
    alike. Accuracies must be finite numbers ``≥ 0``, keyed by the same modalities.
    """
    s = real_scalar(smoothing, "smoothing")
    if s >= 1.0:
        raise ValueError(f"smoothing must lie in [0, 1) (1 would never move), got {s}")
    now = _accuracies(current, "current accuracies")
    if previous is None:
        return now
    before = _accuracies(previous, "previous accuracies")
    check_names(now, before, "the current accuracies")
    return {name: s * before[name] + (1.0 - s) * value for name, value in now.items()}


def _accuracies(values: Mapping[str, float], what: str) -> dict[str, float]:
    if not isinstance(values, Mapping) or not values:
        raise ValueError(f"{what} must be a non-empty mapping modality name -> accuracy, got {values!r}")
    return {str(name): real_scalar(value, f"{what}[{name!r}]") for name, value in values.items()}


def soft_cross_entropy(logits: Tensor, soft_target: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy against a distribution: ``ℓ_i = −Σ_c q_ic · log softmax(z_i)_c``.

    The loss of MM / B-MM's virtual samples; for a one-hot ``q`` it equals ``F.cross_entropy(z, y)``.
    ``reduction`` is ``"mean"`` (over the batch), ``"sum"`` or ``"none"`` (``[B]``). Rows of ``soft_target``
    must be non-negative and sum to 1 (within 1e-3); logits must be finite. One host synchronisation.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, classes], got shape {tuple(logits.shape)}")
    if soft_target.shape != logits.shape:
        raise ValueError(
            f"soft_target must have the logits' shape {tuple(logits.shape)}, got {tuple(soft_target.shape)}"
        )
    if not (logits.dtype.is_floating_point and soft_target.dtype.is_floating_point):
        raise ValueError(f"logits and soft_target must be floating point, got {logits.dtype} and {soft_target.dtype}")
    q = soft_target.detach()
    row_sums = q.sum(dim=1)
    problems = torch.stack(
        [
            ~torch.isfinite(logits.detach()).all(),
            ~torch.isfinite(q).all() | (q < 0).any(),
            ((row_sums - 1.0).abs() > _SUM_TOLERANCE).any(),
        ]
    ).tolist()
    if problems[0]:
        raise ValueError("logits hold non-finite values")
    if problems[1]:
        raise ValueError("soft_target holds negative or non-finite probabilities")
    if problems[2]:
        raise ValueError(f"soft_target rows must sum to 1, got sums in [{row_sums.min().item()}, {row_sums.max().item()}]")
    return F.cross_entropy(logits, soft_target.to(logits.dtype), reduction=reduction)


def _mm_from_version_1(state: dict[str, Any]) -> dict[str, Any]:
    """Version 1 (no ``"version"`` key) named the concentration ``alpha`` and kept no history."""
    state["concentration"] = state.pop("alpha")
    state["history"] = {"steps": [], "rows": torch.empty(0, 4), "dropped": 0}
    return state


class MultimodalMixup(Method):
    """MM (eq. (3)): mixup of the fused multimodal features and their labels across the batch.

    Args:
        concentration: ``α ≥ 0`` of ``Beta(α, α)``; ``0`` disables mixing (ERM). ``alpha=`` is its old name.
        generator: a CPU ``torch.Generator`` to draw from (shared, not copied); None creates one seeded
            from torch's global RNG.
        history_size: ``None`` keeps every call's mixing weight in `history`; an int keeps the last ones.

    Its one unit is ``"features"``: each call records the partner weight ``w`` it drew.
    """

    kind = "data"
    state_version = 2
    _migrations = {1: _mm_from_version_1}

    def __init__(
        self, concentration: float = 0.4, generator: torch.Generator | None = None, *, history_size: int | None = None, **renamed: Any
    ) -> None:
        alpha = renamed_keyword(renamed, "alpha", "concentration", "MultimodalMixup")
        if renamed:
            raise TypeError(f"MultimodalMixup got unexpected keyword arguments {sorted(renamed)}")
        if alpha is not NOT_GIVEN:
            concentration = alpha
        concentration = real_scalar(concentration, "concentration")
        if generator is not None and not (isinstance(generator, torch.Generator) and generator.device.type == "cpu"):
            raise ValueError(f"generator must be a CPU torch.Generator, got {generator!r}")
        self.concentration = float(concentration)
        self.names = ("features",)
        self._generator = seeded_generator(None) if generator is None else generator
        self._initial = self._generator.get_state()
        self._calls = 0
        self._history = History(self.names, history_size, fields=("weight",))

    def __call__(self, features: Tensor, target: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
        """Mix ``features`` ``[B, …]`` and ``target`` ``[B]``; returns (mixed features, soft target ``[B, C]``)."""
        batch_size = _check_features(features, "features")
        one_hot = _one_hot_target(target, batch_size, _check_int(num_classes, "num_classes", 1))
        if self.concentration == 0.0:
            self._record(0.0)
            return features, one_hot
        seed = int(torch.randint(0, SEED_HIGH, (), generator=self._generator))
        partner_weight = float(np.random.default_rng(seed).beta(self.concentration, self.concentration))
        permutation = torch.randperm(batch_size, generator=self._generator)
        self._record(partner_weight)
        return (
            _mix_with_partner(features, permutation, partner_weight),
            _mix_with_partner(one_hot, permutation, partner_weight),
        )

    def _record(self, weight: float) -> None:
        self._history.append(self._calls, (torch.tensor([weight]),))
        self._calls += 1

    def _extra_state(self) -> dict[str, Any]:
        """The generator state: restoring it replays the same λ and permutations."""
        return {"concentration": self.concentration, "generator": self._generator.get_state(), "calls": self._calls}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        """``concentration`` must match this object's."""
        if float(state["concentration"]) != self.concentration:
            raise ValueError(
                f"state was saved with concentration={state['concentration']}, this MultimodalMixup has "
                f"concentration={self.concentration}"
            )
        self._generator.set_state(state["generator"])
        self._calls = int(state.get("calls", 0))

    def _reset(self) -> None:
        """Back to the generator's state at construction."""
        self._generator.set_state(self._initial)
        self._calls = 0

    def __repr__(self) -> str:
        return f"MultimodalMixup(concentration={self.concentration:g})"


def _bmm_from_version_1(state: dict[str, Any]) -> dict[str, Any]:
    """Version 1 (no ``"version"`` key) named its units ``modalities``, kept no history, and before the smoothing
    existed kept no ``smoothing`` (each epoch's own accuracies) and no ``accuracy``."""
    state["names"] = state.pop("modalities")
    state.setdefault("smoothing", 0.0)
    state.setdefault("accuracy", {})
    width = 3 * len(state["names"]) + 3
    state["history"] = {"steps": [], "rows": torch.empty(0, width), "dropped": 0}
    return state


class BalancedMixup(Method):
    """B-MM (eqs. (5)–(8)): mixup of the weaker modality's input, driven by the imbalance factor.

    Call `update` once after each training epoch with every modality's unimodal training accuracy (or give
    ``measure`` and let `end_epoch` do it: a trainer callback calls it), and call the object on each training
    batch. See the module docstring for the warm-up rule, the smoothing and M > 2. The history has one record
    per `update`: the smoothed ``accuracy``, ``kappa`` and the ``strength`` λ each modality is mixed with next.

    Args:
        modalities: the modality names (two or more), as used in the input mappings.
        num_classes: number of classes ``C`` of the soft targets.
        degree: ``β ≥ 0`` of eq. (7); larger mixes harder, ``0`` never mixes.
        warmup_epochs: number of epochs trained before mixing may start.
        seed: seed of the generator of the permutations; None draws one from torch's global RNG.
        smoothing: ``s ∈ [0, 1)`` of the moving average of the accuracies (`smoothed_accuracy`); ``0``
            uses each epoch's own.
        measure: ``() -> {modality: unimodal training accuracy}``, called by `end_epoch`.
    """

    kind = "data"
    state_version = 2
    _migrations = {1: _bmm_from_version_1}

    def __init__(
        self,
        modalities: Sequence[str],
        num_classes: int,
        degree: float,
        warmup_epochs: int,
        seed: int | None = None,
        *,
        smoothing: float = 0.5,
        measure: Callable[[], Mapping[str, float]] | None = None,
    ) -> None:
        names = check_units(modalities, "modalities")
        degree = real_scalar(degree, "degree")
        if measure is not None and not callable(measure):
            raise TypeError(f"measure must be a callable () -> {{modality: accuracy}}, got {type(measure).__name__}")
        self.modalities = self.names = names
        self.measure = measure
        self.num_classes = _check_int(num_classes, "num_classes", 1)
        self.degree = float(degree)
        self.warmup_epochs = _check_int(warmup_epochs, "warmup_epochs", 0)
        smoothed_accuracy(None, {name: 0.0 for name in names}, smoothing)  # checks the smoothing
        self.smoothing = float(smoothing)
        self._generator = seeded_generator(seed)
        self._initial = self._generator.get_state()
        self._epochs_seen = 0
        self._accuracy: dict[str, float] = {}
        self._kappa: dict[str, float] = {}
        self._history = History(names, fields=("accuracy", "kappa", "strength"), dtype=torch.float64)

    def _check_names(self, names: Sequence[str], what: str) -> None:
        missing = [m for m in self.modalities if m not in names]
        unknown = [n for n in names if n not in self.modalities]
        if missing or unknown:
            raise ValueError(
                f"{what} must be keyed by exactly {list(self.modalities)}; missing {missing}, unknown {unknown}"
            )

    def update(self, unimodal_accuracy: Mapping[str, float]) -> None:
        """Record one finished epoch: each modality's unimodal training accuracy, smoothed over epochs
        (`smoothed_accuracy`), sets κ (eqs. (5)–(6))."""
        self._check_names(list(unimodal_accuracy), "unimodal_accuracy")
        current = {m: unimodal_accuracy[m] for m in self.modalities}
        self._accuracy = smoothed_accuracy(self._accuracy or None, current, self.smoothing)
        self._kappa = imbalance_factor(self._accuracy)
        self._epochs_seen += 1
        weak = self.weak_modalities
        values = (
            [self._accuracy[m] for m in self.modalities],
            [self._kappa[m] for m in self.modalities],
            [self.strength if m in weak else 0.0 for m in self.modalities],
        )
        self._history.append(self._epochs_seen - 1, [torch.tensor(v, dtype=torch.float64) for v in values])

    def end_epoch(self, epoch: int) -> None:
        """With ``measure``: `update` with the accuracies it returns (the epoch that just ended)."""
        if self.measure is not None:
            self.update(self.measure())

    @property
    def accuracy(self) -> dict[str, float]:
        """The smoothed unimodal accuracies κ comes from (empty before the first `update`)."""
        return dict(self._accuracy)

    @property
    def epochs_seen(self) -> int:
        """Number of `update` calls so far."""
        return self._epochs_seen

    @property
    def kappa(self) -> dict[str, float]:
        """Imbalance factor of each modality from the latest `update` (empty before the first)."""
        return dict(self._kappa)

    @property
    def weak_modalities(self) -> tuple[str, ...]:
        """Modalities with ``κ < 1`` by the latest `update` while some ``κ > 1``; mixed once active.

        Requiring a ``κ > 1`` keeps equal accuracies balanced even where rounding puts every ``κ`` at 1 − ε.
        """
        if not self._kappa or max(self._kappa.values()) <= 1.0:
            return ()
        return tuple(m for m in self.modalities if self._kappa[m] < 1.0)

    @property
    def strength(self) -> float:
        """``λ`` applied now (eq. (7)): 0 before warm-up ends, when no modality is weak, or when ``β = 0``."""
        warming_up = self._epochs_seen == 0 or self._epochs_seen < self.warmup_epochs
        if warming_up or self.degree == 0.0 or not self.weak_modalities:
            return 0.0
        return bmm_strength(max(self._kappa.values()), self.degree)

    def __call__(self, inputs: Mapping[str, Tensor], target: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Mix the weak modalities' inputs ``[B, …]`` and the labels ``[B]``; returns (inputs, soft target ``[B, C]``)."""
        self._check_names(list(inputs), "inputs")
        sizes = {m: _check_features(inputs[m], f"input {m!r}") for m in self.modalities}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"inputs disagree on the batch size: {sizes}")
        batch_size = sizes[self.modalities[0]]
        one_hot = _one_hot_target(target, batch_size, self.num_classes)
        outputs = {m: inputs[m] for m in self.modalities}
        strength = self.strength
        if strength == 0.0:
            return outputs, one_hot
        permutation = torch.randperm(batch_size, generator=self._generator)
        for m in self.weak_modalities:
            outputs[m] = _mix_with_partner(inputs[m], permutation, strength)
        return outputs, _mix_with_partner(one_hot, permutation, strength)

    def _extra_state(self) -> dict[str, Any]:
        """Everything that changes the mixing: epoch count, smoothing, smoothed accuracies, κ and the generator state."""
        return {
            "epochs_seen": self._epochs_seen,
            "smoothing": self.smoothing,
            "accuracy": dict(self._accuracy),
            "kappa": dict(self._kappa),
            "generator": self._generator.get_state(),
        }

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        """The smoothing must match (a state saved before the smoothing existed restores as ``smoothing=0``)."""
        smoothing = float(state["smoothing"])
        if smoothing != self.smoothing:
            raise ValueError(f"state was saved with smoothing={smoothing}, this BalancedMixup has smoothing={self.smoothing}")
        accuracy = {str(m): float(a) for m, a in state["accuracy"].items()}
        if accuracy:
            self._check_names(list(accuracy), "saved accuracy")
        kappa = {str(m): float(k) for m, k in state["kappa"].items()}
        if kappa:
            self._check_names(list(kappa), "saved kappa")
        if any(math.isnan(k) for k in kappa.values()):
            raise ValueError(f"saved kappa holds NaN: {kappa}")
        self._epochs_seen = _check_int(state["epochs_seen"], "saved epochs_seen", 0)
        self._accuracy = accuracy
        self._kappa = kappa
        self._generator.set_state(state["generator"])

    def _reset(self) -> None:
        """No epoch seen, no κ, the generator back at its construction state."""
        self._epochs_seen = 0
        self._accuracy, self._kappa = {}, {}
        self._generator.set_state(self._initial)

    def __repr__(self) -> str:
        return (
            f"BalancedMixup(modalities={list(self.modalities)}, degree={self.degree:g}, warmup_epochs={self.warmup_epochs}, "
            f"smoothing={self.smoothing:g})"
        )


_MIXUP_PAPER = "Ma, Ding & Chen, Mixup Helps Understanding Multimodal Video Better, 2025"

METHODS = (
    MethodInfo(
        key="mm",
        preset=MultimodalMixup,
        title="MM",
        kind="data",
        paper=_MIXUP_PAPER,
        page="methods/mixup.md",
        observes="nothing: it mixes every batch's fused features",
        cost="mix one batch of features; no gradient pass",
        fit=Fit(head="features", acts_on="data"),
        strength=Strength("concentration", 0.4, "α of Beta(α, α), the law of the partner's weight: larger mixes more evenly"),
    ),
    MethodInfo(
        key="bmm",
        preset=BalancedMixup,
        title="B-MM",
        kind="data",
        paper=_MIXUP_PAPER,
        page="methods/mixup.md",
        observes="per epoch: the unimodal training accuracies",
        cost="mix one batch of inputs; after each epoch: one pass over the training set",
        fit=Fit(head="inputs", acts_on="data"),
        strength=Strength("degree", 1.0, "β of λ = tanh(β·(κ − 1)): how hard the weak modality's inputs are mixed"),
        options=(
            Option("warmup_epochs", 1, "epochs trained before mixing may start", int),
            Option("smoothing", 0.5, "weight of the past in the moving average of the unimodal accuracies (0: each epoch's own)", float),
        ),
    ),
)
