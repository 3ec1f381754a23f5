"""LFM: Yang et al., *Facilitating Multimodal Classification via Dynamically Learning Modality Gap*, NeurIPS 2024
(official code ``njustkmg/NeurIPS24-LFM`` @ad44fa0: ``Crema_epoch.py`` ≈ L38–72, ``Crema_epoch_learnable.py``).

LFM trains one classification head per modality, ``o_m``, and predicts with their mean. Its loss trades the
classification of the mean prediction against the agreement of the modalities' predicted distributions, with
a weight that moves over the epochs ``t``:

``L = 2·[α₁(t)·CE((o_a + o_v)/2, y) + α₂(t)·A(o_a, o_v)]``,  ``α₂ = 1 − α₁``  (`lfm_loss`)

where ``A`` is a divergence between ``p = softmax(o_a)`` and ``q = softmax(o_v)`` around their mean
``m = (p + q)/2``:

* ``divergence="js"``: the **Jensen–Shannon divergence** ``½[KL(p‖m) + KL(q‖m)]`` (`jensen_shannon`), which the
  official code names (``js_score``) — gradmod's default;
* ``divergence="mean_kl"``: what the official code computes, ``F.kl_div(p.log(), m, reduction="batchmean")``
  for each side, i.e. ``½[KL(m‖p) + KL(m‖q)]`` (`mean_kl`): the KL of the mean distribution *from* each
  member. It is not the JS divergence (JS takes ``KL(p‖m)``): it is unbounded where ``p`` or ``q`` nears 0,
  where JS is at most ``log 2``.

Both are taken per sample (sum over the classes) and averaged over the batch, from ``log_softmax`` (the
official ``softmax(·).log()`` gives ``-inf`` and NaN where a probability underflows).

**The schedule.** ``schedule="fitted"`` (the official ``getAlpha_Learnable_Fitted``): ``α₁(t) = Σ_{k=0}^{5}
c_k t^k``, a quintic fitted to the learnable schedule's trajectory over 200 epochs (`FITTED_COEFFICIENTS`,
`fitted_classification_weight`): ``α₁(0) = 0.2046``, rising to ``≈ 0.90`` at epoch 160; it exceeds 1 for epochs
177–188 (at most 1.0105), so that ``α₂ < 0`` there and the divergence is *maximised* with a weight up to
0.0105. ``clip=True`` (default) keeps ``α₁ ≤ 1`` (``α₂ ≥ 0``, both weights of a convex combination, as the
learnable schedule that the curve fits never leaves ``[0.05, 0.95]``); ``clip=False`` is the official curve.
For a run of another length the curve is stretched, ``t = 200·epoch/epochs``.

``schedule="learnable"`` (the official ``getAlpha_Learnable``): before every epoch, on a fixed small batch
(``probe``), with ``L_tot = α₁·CE + α₂·A`` (no factor 2) and the parameter tensors ``θ`` (``parameters``):

``α₂ ← clip(α₂ − η_t · mean(H_tot·g_CE)[θ₀], 0.05, 0.95)``,  ``α₁ = 1 − α₂``  (`alignment_weight_update`)

with ``H_tot`` the Hessian of ``L_tot``, ``g_CE = ∇_θ CE`` and ``[θ₀]`` the component of the first tensor
(`hessian_vector_product`); ``η_t = η·2^{−⌊t/20⌋}`` (``rate`` 1e-4, halved every 20 epochs), starting from
``(α₁, α₂) = (0.05, 0.95)``. The official code updates ``alpha[1]``, the **alignment** weight ``α₂`` (not
``α₁``), and evaluates the batch in eval mode (train mode at epoch 0, where the model was never evaluated).
The mean is **identically 0** when ``θ₀`` feeds the logits directly (a head's weight or bias): every loss term
is a function of softmaxes, which are invariant to adding one constant to every logit, so the loss, its
gradient and the directional derivative ``g_totᵀ g_CE`` are too; the derivative of that scalar along the
direction that adds ``a·h`` to every class's row of a head weight is 0, i.e. its HVP component sums to zero
over the classes, and so does its mean. Give an encoder tensor first (the official ``model.parameters()``
starts with the audio encoder's first convolution).

**M ≥ 2 modalities.** The mean prediction ``(1/M) Σ_m o_m``, the mixture ``m = (1/M) Σ_m p_m``, JS
``(1/M) Σ_m KL(p_m‖m)`` (the Jensen–Shannon divergence of M distributions with equal weights) and ``mean_kl``
``(1/M) Σ_m KL(m‖p_m)``; for two modalities these are the equations above. BalanceBenchmark averages the
two-modality term over every pair of modalities instead (equal for M = 2).

At test time the prediction is ``(1/M) Σ_m o_m`` (`LFM.fused_logits`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gradmod._internal import checked_unimodal_logits, real_scalar
from gradmod.history import History
from gradmod.method import Fit, Method, MethodInfo, Option, check_units

__all__ = [
    "DIVERGENCES",
    "FITTED_COEFFICIENTS",
    "FITTED_EPOCHS",
    "LFM",
    "SCHEDULES",
    "alignment_weight_update",
    "fitted_classification_weight",
    "hessian_vector_product",
    "jensen_shannon",
    "lfm_loss",
    "lfm_terms",
    "mean_kl",
]

#: ``divergence=`` values: ``"js"`` (Jensen–Shannon, `jensen_shannon`) or ``"mean_kl"`` (the official term,
#: `mean_kl`).
DIVERGENCES = ("js", "mean_kl")
#: ``schedule=`` values: ``"fitted"`` (the quintic in the epoch) or ``"learnable"`` (the per-epoch HVP update).
SCHEDULES = ("fitted", "learnable")
#: ``c_0 … c_5`` of the official fitted schedule ``α₁(t) = Σ c_k t^k`` (``Crema_epoch.py``,
#: ``getAlpha_Learnable_Fitted``; its ``α₂`` coefficients are ``1 − c_0`` and ``−c_k``).
FITTED_COEFFICIENTS = (2.04623704e-01, 3.35472727e-03, 1.22989557e-04, -2.92947416e-06, 2.23835486e-08, -5.39717505e-11)
#: The epochs the fitted curve spans (the official 200-epoch run).
FITTED_EPOCHS = 200
#: The learnable schedule keeps the alignment weight in this range (the official clip).
LEARNABLE_RANGE = (0.05, 0.95)
#: The official factor in front of the loss.
_SCALE = 2.0
#: The history's units (the loss's two terms) and what it records for each per step.
_TERMS = ("classification", "alignment")
_RECORDED = ("weight", "loss")
#: An HVP whose mean is within this share of its mean absolute entry counts as identically zero (warned).
_ZERO_MEAN = 1e-5


# ----------------------------------------------------------------------------------------- the equations
def _log_probabilities(logits: Mapping[str, Tensor] | Sequence[Tensor]) -> Tensor:
    values = list(logits.values()) if isinstance(logits, Mapping) else list(logits)
    if len(values) < 2 or any(not isinstance(z, Tensor) or z.dim() != 2 or z.shape != values[0].shape for z in values):
        raise ValueError("the divergence needs two or more [batch, classes] logits of one shape")
    dtype = torch.promote_types(values[0].dtype, torch.float32)
    return torch.stack([torch.log_softmax(z.to(dtype), dim=1) for z in values])


def _log_mixture(log_p: Tensor) -> Tensor:
    """``log m`` of the mixture ``m = (1/M) Σ_m p_m`` from ``[M, B, C]`` log-probabilities."""
    return torch.logsumexp(log_p, dim=0) - math.log(log_p.shape[0])


def jensen_shannon(logits: Mapping[str, Tensor] | Sequence[Tensor]) -> Tensor:
    """The Jensen–Shannon divergence of the predicted distributions, batch mean (0-d):
    ``(1/M) Σ_m KL(p_m‖m)``, ``p_m = softmax(o_m)``, ``m = (1/M) Σ_m p_m``; ``½[KL(p‖m) + KL(q‖m)]`` for two.
    In ``[0, log M]``, 0 exactly when every ``p_m`` is the same."""
    log_p = _log_probabilities(logits)
    return (log_p.exp() * (log_p - _log_mixture(log_p))).sum(2).mean()


def mean_kl(logits: Mapping[str, Tensor] | Sequence[Tensor]) -> Tensor:
    """The official LFM term, batch mean (0-d): ``(1/M) Σ_m KL(m‖p_m)`` with ``m = (1/M) Σ_m p_m`` — for two
    modalities ``½[KL(m‖p) + KL(m‖q)]``, i.e. ``F.kl_div(p.log(), m, reduction="batchmean")`` per side. Not
    the Jensen–Shannon divergence (`jensen_shannon`); unbounded where a ``p_m`` nears 0."""
    log_p = _log_probabilities(logits)
    log_m = _log_mixture(log_p)
    return (log_m.exp() * (log_m - log_p)).sum(2).mean()


_DIVERGENCE = {"js": jensen_shannon, "mean_kl": mean_kl}


def lfm_terms(logits: Mapping[str, Tensor], target: Tensor, divergence: str = "js") -> tuple[Tensor, Tensor]:
    """``(CE((1/M) Σ_m o_m, y), A(o_1, …, o_M))``: the two terms of LFM's loss (0-d each)."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    fused = sum(logits.values()) / len(logits)
    return F.cross_entropy(fused, target), _DIVERGENCE[divergence](logits)


def lfm_loss(logits: Mapping[str, Tensor], target: Tensor, classification_weight: float, divergence: str = "js") -> Tensor:
    """LFM's loss ``2·[α₁·CE((1/M) Σ_m o_m, y) + (1 − α₁)·A]`` (`lfm_terms`), ``α₁ = classification_weight``."""
    classification, alignment = lfm_terms(logits, target, divergence)
    return _SCALE * (classification_weight * classification + (1.0 - classification_weight) * alignment)


def fitted_classification_weight(epoch: float, epochs: int = FITTED_EPOCHS, clip: bool = True) -> float:
    """The official fitted schedule ``α₁(t) = Σ_{k=0}^{5} c_k t^k`` at ``t = 200·epoch/epochs``.

    ``clip=True`` caps it at 1 (so ``α₂ = 1 − α₁ ≥ 0``); the official curve exceeds 1 for epochs 177–188 of 200.
    ``0 ≤ epoch ≤ epochs`` (the curve is not fitted beyond).
    """
    epochs = int(real_scalar(epochs, "epochs", strict=True))
    epoch = real_scalar(epoch, "epoch")
    if epoch > epochs:
        raise ValueError(f"epoch {epoch:g} is beyond the fitted curve's {epochs} epochs (epochs=...)")
    t = FITTED_EPOCHS * epoch / epochs
    weight = math.fsum(c * t**k for k, c in enumerate(FITTED_COEFFICIENTS))
    return min(weight, 1.0) if clip else weight


def hessian_vector_product(
    logits: Mapping[str, Tensor],
    target: Tensor,
    parameters: Sequence[Tensor],
    classification_weight: float,
    divergence: str = "js",
) -> Tensor:
    """``(H_tot · g_CE)[θ₀]``: the component for the first tensor of ``parameters`` of the Hessian of
    ``L_tot = α₁·CE + (1 − α₁)·A`` (`lfm_terms`, no factor 2) times ``g_CE = ∇_θ CE``, over every tensor of
    ``parameters``. ``logits`` must be computed from ``parameters`` with grad. Two backward passes, one with a
    graph (double backward)."""
    classification, alignment = lfm_terms(logits, target, divergence)
    total = classification_weight * classification + (1.0 - classification_weight) * alignment
    params = list(parameters)
    total_grads = torch.autograd.grad(total, params, create_graph=True, allow_unused=True)
    ce_grads = torch.autograd.grad(classification, params, retain_graph=True, allow_unused=True)
    pairs = [(g, v) for g, v in zip(total_grads, ce_grads) if g is not None and v is not None and g.requires_grad]
    if not pairs:
        raise ValueError("the loss does not depend on the given parameters twice over (no second derivative)")
    (product,) = torch.autograd.grad([g for g, _ in pairs], [params[0]], grad_outputs=[v for _, v in pairs], allow_unused=True)
    if product is None:
        raise ValueError("the first tensor of parameters does not reach the loss: put a tensor the probe's logits depend on first")
    return product


def alignment_weight_update(alignment_weight: float, hvp_mean: float, rate: float) -> float:
    """The learnable schedule's step ``α₂ ← clip(α₂ − η·mean(HVP), 0.05, 0.95)`` (then ``α₁ = 1 − α₂``)."""
    low, high = LEARNABLE_RANGE
    return max(low, min(high, alignment_weight - rate * hvp_mean))


# ----------------------------------------------------------------------------------------- the preset
Probe = Callable[[], "tuple[Mapping[str, Tensor], Tensor]"]


class LFM(Method):
    """LFM's loss with its epoch schedule of the two weights (module docstring).

    Args:
        modalities: the names of the modalities (two or more), each with its own classification head.
        schedule: ``"fitted"`` (the official quintic in the epoch) or ``"learnable"`` (the per-epoch update).
        divergence: ``"js"`` (Jensen–Shannon, default) or ``"mean_kl"`` (the official term).
        clip: ``"fitted"`` only: cap ``α₁`` at 1 (default) or not (``False``, the official curve, ``α₂ < 0`` for
            epochs 177–188 of 200).
        epochs: ``"fitted"`` only: the run's length; the 200-epoch curve is stretched to it.
        probe: ``"learnable"`` only: ``() -> ({modality: [B, C] logits}, [B] target)`` on the fixed small batch,
            computed with grad from ``parameters`` (the official code: 8 training samples held out of training,
            in eval mode).
        parameters: ``"learnable"`` only: the tensors of the Hessian-vector product, the first one probed (e.g.
            ``list(model.parameters())`` with an encoder's tensor first).
        rate: ``"learnable"`` only: ``η`` (1e-4), halved every ``halve_every`` epochs (20).
        initial_weight: ``"learnable"`` only: ``α₁`` before the first update (0.05; BalanceBenchmark 0.95).

    Call `start_epoch` before every epoch (it sets the weights) and backward `loss` at every step.
    """

    #: what `predict` reads (`gradmod.method.INPUTS`): the test-time prediction is the method's, not the fused head's
    predict_inputs = ("unimodal_head_logits",)

    kind = "loss"
    loss_inputs = ("unimodal_head_logits", "target")
    state_version = 1

    def __init__(
        self,
        modalities: Sequence[str],
        *,
        schedule: str = "fitted",
        divergence: str = "js",
        clip: bool = True,
        epochs: int = FITTED_EPOCHS,
        probe: Probe | None = None,
        parameters: Iterable[Tensor] | None = None,
        rate: float = 1e-4,
        halve_every: int = 20,
        initial_weight: float = 0.05,
    ) -> None:
        self.names: tuple[str, ...] = check_units(modalities, "modalities")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
        if not isinstance(clip, bool):
            raise TypeError(f"clip must be a bool, got {clip!r}")
        for name, value in (("epochs", epochs), ("halve_every", halve_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.schedule, self.divergence, self.clip, self.epochs = schedule, divergence, clip, epochs
        self.rate = real_scalar(rate, "rate")
        self.halve_every = halve_every
        self.initial_weight = real_scalar(initial_weight, "initial_weight")
        if not LEARNABLE_RANGE[0] <= 1.0 - self.initial_weight <= LEARNABLE_RANGE[1]:
            raise ValueError(f"initial_weight must lie in [0.05, 0.95] (the learnable range), got {initial_weight!r}")
        learnable = schedule == "learnable"
        if learnable and (probe is None or parameters is None):
            raise ValueError("schedule='learnable' needs probe=() -> (logits, target) and parameters=[tensors]")
        if not learnable and (probe is not None or parameters is not None):
            raise ValueError("probe and parameters are for schedule='learnable'; the fitted schedule needs neither")
        if probe is not None and not callable(probe):
            raise TypeError(f"probe must be a callable () -> (logits, target), got {type(probe).__name__}")
        self.probe = probe
        self.parameters = None if parameters is None else list(parameters)
        if self.parameters is not None and not self.parameters:
            raise ValueError("parameters is empty: give the model's parameter tensors, an encoder's first")
        self._history = History(_TERMS, fields=_RECORDED)
        self._reset()

    # ------------------------------------------------------------------ the schedule
    @property
    def classification_weight(self) -> float | None:
        """``α₁`` now (``None`` before the first `start_epoch` of the fitted schedule)."""
        return self._weight

    @property
    def alignment_weight(self) -> float | None:
        """``α₂ = 1 − α₁`` now."""
        return None if self._weight is None else 1.0 - self._weight

    @property
    def updates(self) -> list[dict[str, float]]:
        """The learnable schedule's updates, oldest first: ``{"epoch", "hvp_mean", "rate", "alignment_weight"}``."""
        return [dict(update) for update in self._updates]

    def start_epoch(self, epoch: int) -> None:
        """Set the weights of epoch ``epoch``: the fitted curve's, or one learnable update (once per epoch)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        if self.schedule == "fitted":
            if epoch > self.epochs:
                raise ValueError(f"epoch {epoch} is beyond LFM(epochs={self.epochs}): give the run's length as epochs")
            self._weight = fitted_classification_weight(epoch, self.epochs, self.clip)
            if self._weight > 1.0:
                self._warn_once(
                    "negative_alignment",
                    f"α2 = {1.0 - self._weight:.4f} < 0 at epoch {epoch} (clip=False, the official curve): the divergence "
                    "between the modalities is maximised in these epochs",
                    stacklevel=3,
                )
        elif epoch != self._epoch:
            self._update(epoch)
        self._epoch = epoch
        self._ended = False

    def end_epoch(self, epoch: int) -> None:
        """Mark the epoch finished: a `loss` before the next `start_epoch` is warned about (a forgotten call)."""
        self._ended = True

    def _update(self, epoch: int) -> None:
        logits, target = self.probe()
        logits = checked_unimodal_logits(logits, target, self.names, "probe()'s logits")
        if not all(z.requires_grad for z in logits.values()):
            raise ValueError("probe() must compute the logits with grad (not under torch.no_grad()) from parameters")
        product = hessian_vector_product(logits, target, self.parameters, self._weight, self.divergence).detach()
        mean, scale = torch.stack([product.mean(), product.abs().mean()]).double().tolist()
        if abs(mean) <= _ZERO_MEAN * scale or scale == 0.0:
            self._warn_once(
                "zero_hvp",
                "the HVP of the first tensor of parameters has mean ~0, so the learnable weights do not move: this is "
                "identically so when that tensor feeds the logits directly (a head's weight or bias); put an encoder's "
                "tensor first",
                stacklevel=4,
            )
        rate = self.rate * 0.5 ** (epoch // self.halve_every)
        alignment = alignment_weight_update(1.0 - self._weight, mean, rate)
        self._weight = 1.0 - alignment
        self._updates.append({"epoch": epoch, "hvp_mean": mean, "rate": rate, "alignment_weight": alignment})

    # ------------------------------------------------------------------ the loss
    def loss(self, unimodal_head_logits: Mapping[str, Tensor], target: Tensor) -> Tensor:
        """``2·[α₁·CE((1/M) Σ_m o_m, y) + α₂·A]`` of one batch (`lfm_loss`), the weights of this epoch."""
        if self._epoch is None:
            raise RuntimeError("gradmod LFM: no weights yet: call method.start_epoch(epoch) before every epoch")
        logits = checked_unimodal_logits(unimodal_head_logits, target, self.names, "unimodal_head_logits")
        if self._ended:
            self._warn_once(
                "stale_epoch",
                f"loss() after end_epoch() and before the next start_epoch(): the weights of epoch {self._epoch} are kept; "
                "call method.start_epoch(epoch) before every epoch",
                stacklevel=3,
            )
        classification, alignment = lfm_terms(logits, target, self.divergence)
        weight = self._weight
        weights = torch.tensor([weight, 1.0 - weight], device=target.device)
        self._history.append(self._steps, (weights, torch.stack([classification, alignment]).detach().float()))
        self._steps += 1
        return _SCALE * (weight * classification + (1.0 - weight) * alignment)

    def predict(self, unimodal_head_logits: Mapping[str, Tensor]) -> Tensor:
        """The test-time prediction ``(1/M) Σ_m o_m``."""
        logits = checked_unimodal_logits(unimodal_head_logits, None, self.names, "predict(unimodal_head_logits=...)")
        return sum(logits.values()) / len(logits)

    # ------------------------------------------------------------------ state
    def _config(self) -> dict[str, Any]:
        config = {"schedule": self.schedule, "divergence": self.divergence}
        if self.schedule == "fitted":
            return {**config, "clip": self.clip, "epochs": self.epochs}
        return {**config, "rate": self.rate, "halve_every": self.halve_every, "initial_weight": self.initial_weight}

    def _extra_state(self) -> dict[str, Any]:
        """The configuration (checked on load), the epoch, the weight, the updates, the step count, the warnings."""
        return {
            **self._config(),
            "epoch": self._epoch,
            "ended": self._ended,
            "classification_weight": self._weight,
            "updates": self.updates,
            "steps": self._steps,
            "warned": sorted(self._warned),
        }

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        for key, mine in self._config().items():
            if state.get(key) != mine:
                raise ValueError(f"state_dict has {key}={state.get(key)!r}, this LFM has {key}={mine!r}")
        self._epoch = state["epoch"]
        self._ended = bool(state["ended"])
        self._weight = state["classification_weight"]
        self._updates = [dict(update) for update in state["updates"]]
        self._steps = int(state["steps"])
        self._warned = set(state["warned"])

    def _reset(self) -> None:
        """Before the first epoch: the learnable weights at their start, no update, no step."""
        self._epoch: int | None = None
        self._ended = False
        self._weight: float | None = self.initial_weight if self.schedule == "learnable" else None
        self._updates: list[dict[str, float]] = []
        self._steps = 0
        self._warned: set[str] = set()

    def __repr__(self) -> str:
        weight = "unset" if self._weight is None else f"{self._weight:.4f}"
        return (
            f"LFM(modalities={list(self.names)}, schedule={self.schedule!r}, divergence={self.divergence!r}, "
            f"classification_weight={weight})"
        )


METHODS = (
    MethodInfo(
        key="lfm",
        preset=LFM,
        title="LFM",
        kind="loss",
        paper="Yang et al., Facilitating Multimodal Classification via Dynamically Learning Modality Gap, NeurIPS 2024",
        page="methods/lfm.md",
        observes="per step: each modality's unimodal-head logits; per epoch: the weights (learnable: a probe batch)",
        cost="one divergence over the M predictions; learnable: a double backward on a small batch per epoch",
        fit=Fit(head="unimodal heads", acts_on="loss"),
        options=(
            Option("divergence", "js", "the alignment term: js (Jensen-Shannon) or mean_kl (the official term)", str, DIVERGENCES),
        ),
    ),
)
