"""OPM: on-the-fly prediction modulation — Wei, Hu, Du & Wen, *On-the-fly Modulation for Balanced Multimodal
Learning*, IEEE TPAMI 2024 (arXiv 2410.11582; the journal version of OGM-GE; official code
``GeWu-Lab/BML_TPAMI2024``).

**Why.** Where OGM damps the dominant modality's *gradient*, OPM weakens its *prediction*: during training
the dominant modality's features are dropped for a share of the samples, so the fused head has to rely on
the other modalities more, at a rate that grows with the imbalance.

**The rates** (official ``calcu_q``; `opm_rates`). Scores as OGM's (split concat head, ``b/M``, detached):
``p_m = Σ_i softmax(z_m,i)[y_i]``; the ratio ``ρ_m = p_m / mean_{o≠m} p_o`` (``p_a/p_v`` for two modalities,
`gradmod.functional.discrepancy_ratios`); the drop rate

``q_m = q_base · (1 + λ · tanh(ρ_m − 1))`` for ``ρ_m > 1``, else ``q_m = 0``

(so a tie drops nothing), with ``q_base`` OPM's ``drop_rate`` and ``λ`` its ``imbalance_gain``.

**The drop** (official ``Modality_drop.execute_drop``; `drop_features`). With probability ``p_exe`` per step
(``apply_probability``), every sample ``i`` keeps modality ``m`` with probability ``1 − q_m``
(``mask_m,i ~ Bernoulli(1 − q_m)``) and

* ``rescale="modality"`` (gradmod's default): ``x̃_m = mask_m · f_m / (1 − q_m)`` — inverted dropout per
  modality, so ``E[x̃_m] = f_m`` for every modality, as the head sees them at test time;
* ``rescale="shared"`` (the official code): ``x̃_m = mask_m · f_m / (1 − θ)`` for every modality with the
  width-weighted mean rate ``θ = Σ_m d_m q_m / Σ_m d_m`` (`shared_rate`): ``E[x̃_m] = (1 − q_m)/(1 − θ) · f_m``,
  which shrinks the dropped modality and **amplifies** the kept ones (``q = (0.6, 0)``, equal widths:
  ``0.57·f`` and ``1.43·f``).

The factor is a constant in the backward pass: the gradient to ``f_m`` is ``mask_m/(1 − ·)`` times the
gradient to ``x̃_m``. Samples that lost every modality are removed (the ``keep`` mask), and the loss is the
cross-entropy of the fused head on the kept samples. With these rates no sample loses every modality, for any
``M``: the modality with the lowest score has ``ρ ≤ 1`` (it is at most the mean of the others), so ``q = 0``
and it is always kept. (The official code's removal is dead code for the same reason; ``keep`` is all true,
and returned so that a loop is written once for every ``forward`` method.)

**Warm-up.** No drop during the first ``warmup_epochs`` epochs (the official ``epoch <= 5``: six epochs);
`OPM.start_epoch` tells OPM the epoch.

**Randomness.** Counter-based: the draws of call ``n`` depend only on ``(seed, n)`` (a generator of the
features' device re-seeded per call, as gradmod's GE noise), so a run is reproducible from its seed and a
resumed run draws what the uninterrupted one would have (the state holds the call counter). CPU and CUDA
draw different numbers for one seed. Under ``torch.distributed`` every rank draws from its own stream and
computes the rates from its own batch (as each replica of the official ``DataParallel`` run does).

**Where the official code differs.** It does not run as published: ``models/Classifier.py`` line 53 ends
with an unmatched ``]`` (a ``SyntaxError`` at every commit) and ``main.py`` imports ``utils.log_file``,
which the repository does not hold. Besides the shared rescaling, its custom backward returns ``θ``'s
*value* as ``θ``'s gradient while ``θ`` carries autograd history (its scores are not detached), so a
spurious term reaches both encoders; gradmod treats ``θ`` as the constant it is in the forward pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradmod._internal import (
    check_logits_target,
    checked_ignore_index,
    distributed,
    per_modality,
    real_scalar,
)
from gradmod.functional import discrepancy_ratios, ogm_scores
from gradmod.history import History
from gradmod.kernels import NoiseKey, noise_generator
from gradmod.measures import IGNORE_INDEX
from gradmod.method import Fit, Method, MethodInfo, Option, Strength, check_units
from gradmod.modulator import _default_seed

__all__ = [
    "DEFAULT_APPLY_PROBABILITY",
    "DEFAULT_DROP_RATE",
    "DEFAULT_IMBALANCE_GAIN",
    "DEFAULT_WARMUP_EPOCHS",
    "OPM",
    "RESCALES",
    "drop_features",
    "opm_rates",
    "shared_rate",
]

#: ``q_base``: the official argparse default (its ``config.py`` says 0.4; BalanceBenchmark uses 0.4).
DEFAULT_DROP_RATE = 0.5
#: ``λ`` of ``q = q_base(1 + λ tanh(ρ − 1))`` (argparse and ``config.py``).
DEFAULT_IMBALANCE_GAIN = 0.5
#: ``p_exe``: the probability that a step drops at all (argparse and ``config.py``).
DEFAULT_APPLY_PROBABILITY = 0.7
#: Epochs without drop at the start (the official ``warm_up = 1 if epoch <= 5``: epochs 0..5).
DEFAULT_WARMUP_EPOCHS = 6
#: ``rescale=``: inverted dropout per modality (``"modality"``) or the official single ``1/(1 − θ)`` (``"shared"``).
RESCALES = ("modality", "shared")
#: What the history records per modality and call.
_RECORDED = ("score", "ratio", "rate", "kept")


def opm_rates(scores: Mapping[str, Tensor], drop_rate: float, imbalance_gain: float) -> dict[str, Tensor]:
    """Drop rates ``q_m = q_base·(1 + λ·tanh(ρ_m − 1))`` where ``ρ_m = p_m / mean_{o≠m} p_o > 1``, else 0.

    ``scores``: ``p_m ≥ 0`` per modality (two or more). A zero denominator gives ``ρ = inf`` (``q = q_base(1 + λ)``);
    all scores zero give ``q = 0``. Returns 0-d tensors in ``[0, 1]``; no host synchronisation.
    """
    drop_rate = real_scalar(drop_rate, "drop_rate")
    imbalance_gain = real_scalar(imbalance_gain, "imbalance_gain")
    ratios = discrepancy_ratios(scores)
    rates = {}
    for name, ratio in ratios.items():
        excess = torch.where(ratio > 1, ratio - 1, torch.zeros_like(ratio))  # NaN (0/0) is not > 1
        rates[name] = torch.where(ratio > 1, drop_rate * (1 + imbalance_gain * torch.tanh(excess)), 0.0).clamp(0.0, 1.0)
    return rates


def shared_rate(rates: Mapping[str, Tensor], widths: Mapping[str, int]) -> Tensor:
    """The official code's ``θ = Σ_m d_m q_m / Σ_m d_m`` (``d_m`` each modality's feature width)."""
    total = sum(widths[name] for name in rates)
    return sum(widths[name] * rates[name] for name in rates) / total


def drop_features(
    features: Mapping[str, Tensor], keep: Mapping[str, Tensor], rates: Mapping[str, Tensor], rescale: str = "modality"
) -> dict[str, Tensor]:
    """``x̃_m = keep_m · f_m / (1 − r_m)`` with ``r_m = q_m`` (``"modality"``) or ``θ`` (`shared_rate`, ``"shared"``).

    ``keep``: ``[B]`` boolean (or 0/1) masks per modality; the factor is a constant for autograd. A rate of 1
    keeps nothing, and its factor is 0.
    """
    if rescale not in RESCALES:
        raise ValueError(f"rescale must be one of {RESCALES}, got {rescale!r}")
    widths = {name: value[0].numel() for name, value in features.items()}
    shared = shared_rate(rates, widths) if rescale == "shared" else None
    dropped = {}
    for name, value in features.items():
        rate = (rates[name] if shared is None else shared).detach().to(value.device, torch.float64)
        factor = torch.where(rate < 1, 1 / (1 - rate).clamp_min(torch.finfo(torch.float64).tiny), 0.0)
        scale = keep[name].to(torch.float64) * factor
        dropped[name] = value * scale.to(value.dtype).reshape(-1, *([1] * (value.dim() - 1)))
    return dropped


class OPM(Method):
    """On-the-fly prediction modulation: drop the dominant modality's features at a rate from OGM's ratio.

    ``features, keep = opm(features={name: [B, …]}, unimodal_logits={name: [B, C]}, target=y)`` in the
    forward pass, then the fused head on ``features`` and the cross-entropy on the rows where ``keep`` is
    true (module docstring). ``start_epoch(epoch)`` before every epoch (the warm-up counts epochs).

    Args:
        modalities: the modality names, or a mapping whose keys are the names: two or more.
        drop_rate: ``q_base`` (official argparse 0.5; its ``config.py`` 0.4); larger drops more. Needs
            ``drop_rate·(1 + imbalance_gain) < 1``.
        imbalance_gain: ``λ ≥ 0``, how much the score ratio raises the rate.
        apply_probability: ``p_exe`` in ``[0, 1]``, the chance that a step drops at all.
        warmup_epochs: epochs ``0 … warmup_epochs − 1`` drop nothing.
        rescale: ``"modality"`` or ``"shared"`` (`RESCALES`).
        seed: seed of the counter-based draws; ``None`` derives one from ``torch.initial_seed()`` without drawing.
        ignore_index: targets equal to it add nothing to the scores.
        validate: check features, logits and targets for every call (one host synchronisation).
        history_size: ``None`` keeps every call in `history`; an int keeps the last ones.

    Returned features are full ``[B, …]`` tensors (a dropped sample's features are zeros); ``keep`` is a
    ``[B]`` bool tensor: the samples that kept at least one modality (module docstring: with OPM's rates that is
    every sample). The history
    records per call ``score``, ``ratio``, ``rate`` (``q``) and ``kept`` (the share of samples keeping the
    modality) per modality; status ``"outside"`` during the warm-up and on the calls the ``p_exe`` draw skipped.
    """

    kind = "forward"
    forward_inputs = ("features", "unimodal_logits", "target")
    state_version = 1

    def __init__(
        self,
        modalities: Sequence[str] | Mapping[str, Any],
        *,
        drop_rate: float = DEFAULT_DROP_RATE,
        imbalance_gain: float = DEFAULT_IMBALANCE_GAIN,
        apply_probability: float = DEFAULT_APPLY_PROBABILITY,
        warmup_epochs: int = DEFAULT_WARMUP_EPOCHS,
        rescale: str = "modality",
        seed: int | None = None,
        ignore_index: int | None = IGNORE_INDEX,
        validate: bool = True,
        history_size: int | None = None,
    ) -> None:
        names = tuple(modalities) if isinstance(modalities, (Mapping, nn.ModuleDict)) else modalities
        self.names: tuple[str, ...] = check_units(names, "modalities")
        self.drop_rate = real_scalar(drop_rate, "drop_rate")
        self.imbalance_gain = real_scalar(imbalance_gain, "imbalance_gain")
        if self.drop_rate * (1 + self.imbalance_gain) >= 1:
            raise ValueError(
                f"drop_rate·(1 + imbalance_gain) = {self.drop_rate * (1 + self.imbalance_gain):g} must be < 1: a rate of 1 "
                "drops the dominant modality for every sample"
            )
        self.apply_probability = real_scalar(apply_probability, "apply_probability")
        if self.apply_probability > 1:
            raise ValueError(f"apply_probability must lie in [0, 1], got {apply_probability!r}")
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be an int >= 0, got {warmup_epochs!r}")
        self.warmup_epochs = warmup_epochs
        if rescale not in RESCALES:
            raise ValueError(f"rescale must be one of {RESCALES}, got {rescale!r}")
        self.rescale = rescale
        self.seed = _default_seed() if seed is None else int(seed)
        self.ignore_index = checked_ignore_index(ignore_index)
        self.validate = bool(validate)
        self._history = History(self.names, history_size, fields=_RECORDED)
        self._calls = 0
        self._epoch: int | None = None
        self._warned: set[str] = set()

    @property
    def call_count(self) -> int:
        """How many times OPM was called (the counter of its draws)."""
        return self._calls

    @property
    def epoch(self) -> int | None:
        """The epoch `start_epoch` last reported (``None`` before the first call)."""
        return self._epoch

    def start_epoch(self, epoch: int) -> None:
        """Epoch ``epoch`` (0-based) starts: it drops once ``epoch >= warmup_epochs``."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self._epoch = epoch

    def __call__(
        self, *, features: Mapping[str, Tensor], unimodal_logits: Mapping[str, Tensor], target: Tensor
    ) -> tuple[dict[str, Tensor], Tensor]:
        """``(features, keep)``: the features with the drop applied and the ``[B]`` mask of samples to train on."""
        features = per_modality(features, self.names, "OPM(features=...)")
        logits = per_modality(unimodal_logits, self.names, "OPM(unimodal_logits=...)")
        batch = self._check_shapes(features, logits, target)
        if self.validate:
            self._check_values(features, logits, target)
        call = self._calls
        self._calls += 1
        scores = {name: ogm_scores(logits[name], target, self.ignore_index) for name in self.names}
        rates = opm_rates(scores, self.drop_rate, self.imbalance_gain)
        device = features[self.names[0]].device
        stacked = torch.stack([rates[name] for name in self.names]).to(device)
        warming = self._warming_up()
        if warming:
            kept = {name: torch.ones(batch, dtype=torch.bool, device=device) for name in self.names}
            executed: bool | Tensor = False
        else:
            key = NoiseKey(self.seed, call, dist.get_rank() if distributed() else 0)  # a stream per rank
            draws = torch.rand(1 + len(self.names) * batch, generator=noise_generator(device, key, 0, 1), device=device)
            executed = draws[0] < self.apply_probability
            uniform = draws[1:].reshape(len(self.names), batch)
            masks = (uniform >= stacked.unsqueeze(1)) | ~executed
            kept = dict(zip(self.names, masks.unbind(0)))
        keep = torch.stack(list(kept.values())).any(0)
        self._record(call, scores, rates, kept, executed)
        if warming:
            return dict(features), keep
        applied = torch.where(executed, stacked, 0.0)
        output = drop_features(features, kept, dict(zip(self.names, applied.unbind(0))), self.rescale)
        return output, keep

    def _warming_up(self) -> bool:
        if self.warmup_epochs == 0:
            return False
        if self._epoch is None:
            self._warn_once(
                "no_start_epoch",
                f"start_epoch() was never called: OPM counts as in its warm-up (epochs < {self.warmup_epochs}) and drops "
                "nothing; call method.start_epoch(epoch) before every epoch",
            )
            return True
        return self._epoch < self.warmup_epochs

    def _check_shapes(self, features: Mapping[str, Tensor], logits: Mapping[str, Tensor], target: Tensor) -> int:
        batch = None
        for name in self.names:
            value = features[name]
            if not isinstance(value, Tensor) or value.dim() < 2 or not value.is_floating_point():
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"features[{name!r}] must be a floating-point [batch, ...] tensor, got {shape}")
            check_logits_target(logits[name], target, name=f"unimodal_logits[{name!r}]")
            if value.shape[0] != target.shape[0]:
                raise ValueError(f"features[{name!r}] has batch {value.shape[0]}, target has {target.shape[0]}")
            batch = value.shape[0]
        if batch == 0:
            raise ValueError("OPM got an empty batch: it needs at least one sample")
        return batch

    def _check_values(self, features: Mapping[str, Tensor], logits: Mapping[str, Tensor], target: Tensor) -> None:
        """One host synchronisation: finite features and logits, targets inside the classes."""
        with torch.no_grad():
            flags = {}
            for name in self.names:
                flags[f"features[{name!r}] contain NaN or inf"] = ~torch.isfinite(features[name]).all()
                flags[f"unimodal_logits[{name!r}] contain NaN or inf"] = ~torch.isfinite(logits[name]).all()
            classes = logits[self.names[0]].shape[1]
            outside = (target < 0) | (target >= classes)
            if self.ignore_index is not None:
                outside &= target != self.ignore_index
            flags[f"target holds class indices outside [0, {classes})"] = outside.any()
            raised = torch.stack([flag.to(target.device) for flag in flags.values()]).tolist()
        found = [message for message, flag in zip(flags, raised) if flag]
        if found:
            raise ValueError(f"gradmod OPM: {'; '.join(found)}")

    def _record(
        self, call: int, scores: Mapping[str, Tensor], rates: Mapping[str, Tensor], kept: Mapping[str, Tensor], executed: bool | Tensor
    ) -> None:
        device = kept[self.names[0]].device
        ratios = discrepancy_ratios(scores)
        rows = [
            torch.stack([table[name].to(device, torch.float32) for name in self.names])
            for table in (scores, ratios, rates, {name: mask.float().mean() for name, mask in kept.items()})
        ]
        self._history.append(call, rows, in_window=executed)

    # ------------------------------------------------------------------ state
    def _extra_state(self) -> dict[str, Any]:
        """The seed, the call counter (the draws are counter-based), the epoch and the settings."""
        return {
            "settings": self._settings(),
            "seed": self.seed,
            "calls": self._calls,
            "epoch": self._epoch,
            "warned": sorted(self._warned),
        }

    def _settings(self) -> dict[str, Any]:
        return {
            "drop_rate": self.drop_rate,
            "imbalance_gain": self.imbalance_gain,
            "apply_probability": self.apply_probability,
            "warmup_epochs": self.warmup_epochs,
            "rescale": self.rescale,
        }

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        """The settings must match this OPM's; the seed is restored with the counter."""
        if dict(state["settings"]) != self._settings():
            raise ValueError(f"state_dict was written with settings {dict(state['settings'])}; this OPM has {self._settings()}")
        self.seed = int(state["seed"])
        self._calls = int(state["calls"])
        self._epoch = None if state["epoch"] is None else int(state["epoch"])
        self._warned = set(state["warned"])

    def _reset(self) -> None:
        self._calls = 0
        self._epoch = None
        self._warned = set()

    def __repr__(self) -> str:
        return (
            f"OPM(modalities={list(self.names)}, drop_rate={self.drop_rate:g}, imbalance_gain={self.imbalance_gain:g}, "
            f"apply_probability={self.apply_probability:g}, warmup_epochs={self.warmup_epochs}, rescale={self.rescale!r})"
        )


METHODS = (
    MethodInfo(
        key="opm",
        preset=OPM,
        title="OPM",
        kind="forward",
        paper="Wei, Hu, Du & Wen, On-the-fly Modulation for Balanced Multimodal Learning, TPAMI 2024",
        page="methods/opm.md",
        observes="features, decoupled logits + target",
        cost="one mask per modality and sample, one multiplication of the features",
        fit=Fit(head="decoupled", acts_on="data"),
        strength=Strength("drop_rate", DEFAULT_DROP_RATE, "q_base of the dominant modality's drop rate q = q_base(1 + λ tanh(ρ − 1))"),
        # q_base·(1 + λ) must stay below 1 (0.667 at the default λ = 0.5): the grid's top is 1.25 × the default
        sweep=(1 / 3, 1.0, 1.25),
        options=(
            Option("imbalance_gain", DEFAULT_IMBALANCE_GAIN, "λ: how much the score ratio raises the drop rate", float),
            Option("apply_probability", DEFAULT_APPLY_PROBABILITY, "p_exe: the chance that a step drops at all", float),
            Option("warmup_epochs", DEFAULT_WARMUP_EPOCHS, "epochs without drop at the start (official: six)", int),
            Option("rescale", "modality", "per-modality inverted dropout, or the official shared 1/(1 − θ)", str, RESCALES),
        ),
    ),
)
