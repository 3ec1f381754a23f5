"""ReconBoost: Hua, Xu, Bao, Yang & Huang, *ReconBoost: Boosting Can Achieve Modality Reconcilement*, ICML 2024
(official code ``huacong/ReconBoost`` @14ab57a, ``train.py`` ≈ L339–351, ``models/dynamic_net.py``).

ReconBoost trains one modality at a time, in **stages**, and keeps one *member* ``f_m`` per modality (its
encoder and classification head, a unimodal model). The ensemble predicts ``F = β·Σ_j f_j`` with a learned
**boost rate** ``β``. Stage ``s`` picks the member ``m = names[s mod M]`` and runs two phases:

* **boosting** (``boost_epochs`` epochs): only ``f_m`` learns, on the *reconcilement* loss against the
  ensemble of the other members ``p_ens = softmax(β·Σ_{j≠m} f_j)`` (detached):

  ``L_i = −(w₁ − w₂·p_ens,i[y_i]) / C · log p_m,i[y_i]``  (`boosting_loss`, ``w₁ = 5``, ``w₂ = 1``)

  — the KL-based reconcilement of the paper, which makes the stage resemble a step of gradient boosting: a
  sample the others already classify well weighs less, so ``f_m`` corrects their errors. Optionally plus
  ``α·GA``, an alignment term that keeps the new member's predictions close to the previous stage's member
  (`alignment_loss`);
* **ensemble correction** (``correct_epochs`` epochs, the paper's *global rectification*): every member and
  ``β`` learn on ``CE(β·Σ_j f_j, y)``.

The official code runs 4 + 4 epochs per stage with ``β`` starting at 1; BalanceBenchmark's port 1 + 1 with
``β = 0.01`` (`BALANCEBENCHMARK`). Members start from pretrained unimodal models in the paper (``pretrained``):
a member that is not pretrained joins the ensemble at the end of its first boosting phase, and the ensemble of
no member predicts the uniform distribution (the constant initial model of gradient boosting). At test time
the prediction is the ensemble ``β·Σ_j f_j`` (`ReconBoost.ensemble_logits`).

**How it fits a loop.** ReconBoost is kind ``"loss"``: its stages are epoch-level, so ``start_epoch(epoch)``
chooses the stage and the phase, and every step's loss comes from ``loss(unimodal_head_logits=..., target=...)``
— the logits of each member (its encoder and its head) on the batch. In a boosting phase the loss reaches only
the boosted member: the other members' parameters get no gradient (``None`` after ``zero_grad()``), which
torch's optimizers skip, so one optimizer holding every member (and ``method.extra``, the boost rate) runs the
method. The official code builds a new SGD optimizer for each phase instead (its momentum starts from zero at
every phase): rebuild yours at each phase (`ReconBoost.phase`) to match it.

**The alignment term ("GA").** The official code (and BalanceBenchmark's) adds
``α·MSE(softmax(f_m).detach(), softmax(f_prev).detach())`` from the second stage on, with ``f_prev`` the member
of the previous stage and ``α = 0.5``: both inputs are detached, so it is a constant with zero gradient.
``ga="prediction"`` (default) keeps the detach only on the previous member, ``α·MSE(softmax(f_m),
softmax(f_prev).detach())``: a gradient that pulls the new member's class probabilities towards the previous
stage's member on the same batch (the paper's "keep the new learner close to the previous one"). ``ga=None``
adds nothing to the loss: the official code's gradient exactly. The distance is recorded either way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradmod._internal import checked_unimodal_logits, real_scalar
from gradmod.history import History
from gradmod.method import Fit, Method, MethodInfo, Option, Strength, check_units

__all__ = [
    "BALANCEBENCHMARK",
    "GA_TERMS",
    "PHASES",
    "BoostRate",
    "ReconBoost",
    "alignment_loss",
    "boosting_loss",
    "boosting_weights",
    "true_class_probability",
]

#: ``ga=`` values: ``"prediction"`` (MSE of the new member's probabilities to the previous member's, with a
#: gradient) or ``None`` (no term: the official code's, whose term has zero gradient).
GA_TERMS = ("prediction", None)
#: The two phases of a stage, in order.
PHASES = ("boost", "correct")
#: BalanceBenchmark's schedule (``ReconBoost(names, **BALANCEBENCHMARK)``): one epoch of each phase per
#: modality, the boost rate starting at 0.01 (the official code: 4 + 4 epochs, 1.0).
BALANCEBENCHMARK: dict[str, float] = {"boost_epochs": 1, "correct_epochs": 1, "boost_rate": 0.01}
#: The ensemble's unit in the history (besides one unit per member).
ENSEMBLE = "ensemble"
#: What the history records per unit and step: ``trained`` (1 for the units the step trains), ``confidence``
#: (mean probability of the true class: a member's own, and under ``"ensemble"`` the ensemble the step's
#: loss used), ``alignment`` (the GA distance at the boosted member, from the second stage on) and
#: ``boost_rate`` (under ``"ensemble"``).
_RECORDED = ("trained", "confidence", "alignment", "boost_rate")
#: Below this share of its initial value (or at or below 0) the boost rate counts as collapsed (warned).
COLLAPSED = 1e-2


# ----------------------------------------------------------------------------------------- the equations
def true_class_probability(logits: Tensor, target: Tensor) -> Tensor:
    """``softmax(logits)_i[y_i]`` per sample, ``[B]``, detached (float32 or wider)."""
    z = logits.detach()
    return torch.softmax(z if z.dtype == torch.float64 else z.float(), dim=1).gather(1, target.unsqueeze(1)).squeeze(1)


def boosting_weights(
    ensemble_logits: Tensor | None, target: Tensor, classes: int, task_weight: float = 5.0, reconcilement: float = 1.0
) -> Tensor:
    """The per-sample weights ``(w₁ − w₂·p_ens,i[y_i]) / C`` of the boosting loss, ``[B]``.

    ``p_ens = softmax(ensemble_logits)`` (detached): the ensemble of the members other than the boosted one.
    ``ensemble_logits=None`` (no other member in the ensemble yet) predicts the uniform distribution,
    ``p_ens[y] = 1/C``. With ``0 ≤ w₂ ≤ w₁`` every weight lies in ``[(w₁ − w₂)/C, w₁/C]``.
    """
    if ensemble_logits is None:
        confidence = torch.full(target.shape, 1.0 / classes, device=target.device)
    else:
        confidence = true_class_probability(ensemble_logits, target)
    return (task_weight - reconcilement * confidence) / classes


def boosting_loss(
    member_logits: Tensor,
    ensemble_logits: Tensor | None,
    target: Tensor,
    task_weight: float = 5.0,
    reconcilement: float = 1.0,
) -> Tensor:
    """ReconBoost's reconcilement loss of the boosted member, averaged over the batch (0-d):

    ``L = (1/B) Σ_i −(w₁ − w₂·p_ens,i[y_i]) / C · log softmax(f_m,i)[y_i]``

    with ``p_ens = softmax(ensemble_logits)`` detached (`boosting_weights`). The gradient reaches
    ``member_logits`` only.
    """
    weights = boosting_weights(ensemble_logits, target, member_logits.shape[1], task_weight, reconcilement)
    log_p = torch.log_softmax(member_logits, dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
    return -(weights.to(log_p) * log_p).mean()


def alignment_loss(member_logits: Tensor, previous_logits: Tensor) -> Tensor:
    """The alignment ("GA") term ``MSE(softmax(f_m), softmax(f_prev))``, mean over the ``B × C`` entries (0-d),
    with the previous member's probabilities detached: its gradient pulls the new member towards them."""
    return F.mse_loss(torch.softmax(member_logits, dim=1), torch.softmax(previous_logits.detach(), dim=1))


class BoostRate(nn.Module):
    """The ensemble's learned boost rate ``β`` (a 0-d parameter, ``rate``): ``F = β·Σ_j f_j``."""

    def __init__(self, initial: float) -> None:
        super().__init__()
        self.rate = nn.Parameter(torch.tensor(float(initial)))

    def forward(self, summed_logits: Tensor) -> Tensor:
        return self.rate.to(summed_logits) * summed_logits


def _int_at_least(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class ReconBoost(Method):
    """ReconBoost's stages as a loss: boosting one member, then correcting the ensemble (module docstring).

    Args:
        modalities: the members' names, in the order the stages visit them (two or more).
        boost_epochs: epochs of the boosting phase of each stage (official 4, BalanceBenchmark 1).
        correct_epochs: epochs of the ensemble correction of each stage (official 4, BalanceBenchmark 1).
        boost_rate: the initial boost rate ``β`` (official 1.0, BalanceBenchmark 0.01); ``method.extra.rate``
            learns it in the correction phases (add ``method.extra.parameters()`` to the optimizer).
        task_weight: ``w₁`` of `boosting_loss` (5; the official AVE and ModelNet40 runs use 4).
        reconcilement: ``w₂`` of `boosting_loss`, ``0 ≤ w₂ ≤ w₁`` (1): how much a sample the other members
            already classify counts less.
        alignment: ``α ≥ 0``, the weight of the alignment term (0.5).
        ga: ``"prediction"`` (the alignment with a gradient) or ``None`` (no term: the official gradient).
        pretrained: ``True`` (the paper: every member starts from a pretrained unimodal model, so every member
            is in the ensemble from the first stage), ``False``, or the names of the pretrained members. A
            member that is not pretrained joins the ensemble at the end of its first boosting phase.

    The loop must load the pretrained unimodal models (each trained alone on its modality's cross-entropy,
    e.g. with `gradmod.methods.umt.UME`) into the members before the first epoch, call `start_epoch` before
    every epoch, and backward `loss` at every step. The history records one row per `loss` call.
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
        boost_epochs: int = 4,
        correct_epochs: int = 4,
        boost_rate: float = 1.0,
        task_weight: float = 5.0,
        reconcilement: float = 1.0,
        alignment: float = 0.5,
        ga: str | None = "prediction",
        pretrained: bool | Iterable[str] = True,
    ) -> None:
        self.names: tuple[str, ...] = check_units(modalities, "modalities")
        if ENSEMBLE in self.names:
            raise ValueError(f"{ENSEMBLE!r} names the ensemble in ReconBoost's history; rename that modality")
        self.boost_epochs = _int_at_least(boost_epochs, "boost_epochs", 1)
        self.correct_epochs = _int_at_least(correct_epochs, "correct_epochs", 0)
        self.task_weight = real_scalar(task_weight, "task_weight", strict=True)
        self.reconcilement = real_scalar(reconcilement, "reconcilement")
        if self.reconcilement > self.task_weight:
            raise ValueError(
                f"reconcilement (w2 = {self.reconcilement:g}) must not exceed task_weight (w1 = {self.task_weight:g}): "
                "a sample the other members classify well would get a negative weight and be pushed off its label"
            )
        self.alignment = real_scalar(alignment, "alignment")
        if ga not in GA_TERMS:
            raise ValueError(f"ga must be one of {GA_TERMS}, got {ga!r}")
        self.ga = ga
        self.pretrained = self._pretrained(pretrained)
        self.initial_boost_rate = real_scalar(boost_rate, "boost_rate", strict=True)
        self.extra = BoostRate(self.initial_boost_rate)
        self._epoch: int | None = None
        self._ended = False
        self._steps = 0
        self._warned: set[str] = set()
        self._history = History((*self.names, ENSEMBLE), fields=_RECORDED)

    def _pretrained(self, pretrained: bool | Iterable[str]) -> frozenset[str]:
        if isinstance(pretrained, bool):
            return frozenset(self.names if pretrained else ())
        if isinstance(pretrained, str):
            raise TypeError(f"pretrained must be a bool or a collection of modality names, got the string {pretrained!r}")
        names = frozenset(pretrained)
        unknown = sorted(names - set(self.names))
        if unknown:
            raise ValueError(f"pretrained names unknown modalities {unknown}; the modalities are {list(self.names)}")
        return names

    # ------------------------------------------------------------------ the schedule
    def start_epoch(self, epoch: int) -> None:
        """Choose the stage and the phase of epoch ``epoch`` (0-based): stage ``epoch // (boost_epochs +
        correct_epochs)``, boosting for its first ``boost_epochs`` epochs, correcting for the rest."""
        self._epoch = _int_at_least(epoch, "epoch", 0)
        self._ended = False
        rate = float(self.extra.rate.detach())
        if rate <= 0.0 or rate < COLLAPSED * self.initial_boost_rate:
            self._warn_once(
                "collapsed",
                f"the boost rate fell to {rate:.3g} (from {self.initial_boost_rate:g}) at epoch {epoch}: the ensemble's "
                "logits are scaled to ~0 or flipped; lower the correction phase's learning rate",
                stacklevel=3,
            )

    def end_epoch(self, epoch: int) -> None:
        """Mark the epoch finished: a `loss` before the next `start_epoch` is warned about (a forgotten call)."""
        self._ended = True

    def _require_epoch(self) -> int:
        if self._epoch is None:
            raise RuntimeError(
                "gradmod ReconBoost: no stage chosen: call method.start_epoch(epoch) before every epoch (it chooses "
                "the stage, the member and the phase)"
            )
        return self._epoch

    @property
    def stage(self) -> int:
        """The current stage ``s`` (``start_epoch`` chooses it)."""
        return self._require_epoch() // (self.boost_epochs + self.correct_epochs)

    @property
    def member(self) -> str:
        """The modality of the current stage, ``names[s mod M]``: boosted, then corrected with the others."""
        return self.names[self.stage % len(self.names)]

    @property
    def phase(self) -> str:
        """``"boost"`` (only `member` learns) or ``"correct"`` (every member in the ensemble and the boost rate)."""
        return PHASES[0] if self._require_epoch() % (self.boost_epochs + self.correct_epochs) < self.boost_epochs else PHASES[1]

    @property
    def ensemble(self) -> tuple[str, ...]:
        """The members in the ensemble now: the pretrained ones and those whose first boosting phase ended."""
        stage, phase = self.stage, self.phase
        return tuple(
            name
            for index, name in enumerate(self.names)
            if name in self.pretrained or index < stage or (index == stage and phase == PHASES[1])
        )

    @property
    def boost_rate(self) -> float:
        """The boost rate ``β`` now (``method.extra.rate``)."""
        return float(self.extra.rate.detach())

    # ------------------------------------------------------------------ the loss
    def loss(self, unimodal_head_logits: Mapping[str, Tensor], target: Tensor) -> Tensor:
        """This step's loss: the boosting loss of `member` (plus ``α·GA``) or the ensemble's cross-entropy.

        ``unimodal_head_logits``: ``{modality: [B, C]}``, each member's logits (its encoder and head) with grad.
        """
        logits = checked_unimodal_logits(unimodal_head_logits, target, self.names, "unimodal_head_logits")
        if self._ended:
            self._warn_once(
                "stale_epoch",
                f"loss() after end_epoch() and before the next start_epoch(): the stage of epoch {self._epoch} is kept; "
                "call method.start_epoch(epoch) before every epoch",
                stacklevel=3,
            )
        if self.phase == PHASES[0]:
            return self._boosting_step(logits, target)
        return self._correction_step(logits, target)

    def _boosting_step(self, logits: dict[str, Tensor], target: Tensor) -> Tensor:
        member, stage = self.member, self.stage
        others = [name for name in self.ensemble if name != member]
        ensemble = self.extra(sum(logits[name] for name in others)).detach() if others else None
        loss = boosting_loss(logits[member], ensemble, target, self.task_weight, self.reconcilement)
        distance = None
        if stage > 0:
            previous = self.names[(stage - 1) % len(self.names)]
            distance = alignment_loss(logits[member], logits[previous])
            if self.ga is not None:
                loss = loss + self.alignment * distance
        if ensemble is None:
            ensemble_confidence = torch.tensor(1.0 / logits[member].shape[1], device=target.device)
        else:
            ensemble_confidence = true_class_probability(ensemble, target).mean()
        self._record(logits, target, trained=(member,), ensemble_confidence=ensemble_confidence, distance=distance)
        return loss

    def _correction_step(self, logits: dict[str, Tensor], target: Tensor) -> Tensor:
        members = self.ensemble
        fused = self.extra(sum(logits[name] for name in members))
        confidence = true_class_probability(fused, target).mean()
        self._record(logits, target, trained=(*members, ENSEMBLE), ensemble_confidence=confidence, distance=None)
        return F.cross_entropy(fused, target)

    def _record(
        self, logits: dict[str, Tensor], target: Tensor, trained: Sequence[str], ensemble_confidence: Tensor, distance: Tensor | None
    ) -> None:
        device = target.device
        units = (*self.names, ENSEMBLE)
        flags = torch.tensor([1.0 if unit in trained else 0.0 for unit in units], device=device)
        own = [true_class_probability(logits[name], target).mean().float() for name in self.names]
        confidence = torch.stack([*own, ensemble_confidence.to(device, torch.float32)])
        nan = torch.tensor(math.nan, device=device)
        member = self.member
        alignment = torch.stack(
            [distance.detach().float() if (name == member and distance is not None) else nan for name in self.names] + [nan]
        )
        rate = torch.stack([nan] * len(self.names) + [self.extra.rate.detach().float().to(device)])
        self._history.append(self._steps, (flags, confidence, alignment, rate))
        self._steps += 1

    # ------------------------------------------------------------------ test time
    def predict(self, unimodal_head_logits: Mapping[str, Tensor]) -> Tensor:
        """The ensemble's prediction ``β·Σ_j f_j`` over every member (after training every member is in it).

        Before the first `start_epoch` every member counts; afterwards the members in `ensemble`.
        """
        logits = checked_unimodal_logits(unimodal_head_logits, None, self.names, "predict(unimodal_head_logits=...)")
        members = self.names if self._epoch is None else self.ensemble
        return self.extra(sum(logits[name] for name in members))

    # ------------------------------------------------------------------ state
    def _config(self) -> dict[str, Any]:
        return {
            "boost_epochs": self.boost_epochs,
            "correct_epochs": self.correct_epochs,
            "initial_boost_rate": self.initial_boost_rate,
            "task_weight": self.task_weight,
            "reconcilement": self.reconcilement,
            "alignment": self.alignment,
            "ga": self.ga,
            "pretrained": sorted(self.pretrained),
        }

    def _extra_state(self) -> dict[str, Any]:
        """The configuration (checked on load), the epoch, the step count and the warnings shown; the boost rate
        is ``state["extra"]``."""
        return {
            **self._config(),
            "epoch": self._epoch,
            "ended": self._ended,
            "steps": self._steps,
            "warned": sorted(self._warned),
        }

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        for key, mine in self._config().items():
            if state[key] != mine:
                raise ValueError(f"state_dict has {key}={state[key]!r}, this ReconBoost has {key}={mine!r}")
        self._epoch = state["epoch"]
        self._ended = bool(state["ended"])
        self._steps = int(state["steps"])
        self._warned = set(state["warned"])

    def _reset(self) -> None:
        """Back before the first epoch, the boost rate at its initial value."""
        with torch.no_grad():
            self.extra.rate.fill_(self.initial_boost_rate)
        self._epoch = None
        self._ended = False
        self._steps = 0
        self._warned = set()

    def __repr__(self) -> str:
        where = "before the first epoch" if self._epoch is None else f"stage={self.stage}, member={self.member!r}, phase={self.phase!r}"
        return f"ReconBoost(modalities={list(self.names)}, {where}, boost_rate={self.boost_rate:.4g}, ga={self.ga!r})"


METHODS = (
    MethodInfo(
        key="reconboost",
        preset=ReconBoost,
        title="ReconBoost",
        kind="loss",
        paper="Hua, Xu, Bao, Yang & Huang, ReconBoost: Boosting Can Achieve Modality Reconcilement, ICML 2024",
        page="methods/reconboost.md",
        observes="per step: every member's unimodal-head logits; per epoch: the stage and phase",
        cost="a softmax per member; one member learns per boosting epoch; pretrained unimodal members",
        fit=Fit(head="unimodal heads", acts_on="loss"),
        strength=Strength(
            "reconcilement", 1.0, "w2 of L = −(w1 − w2·p_ens[y])/C·log p_m[y]: how much the others' fit discounts a sample"
        ),
        options=(
            Option("boost_epochs", 4, "epochs of the boosting phase per stage (BalanceBenchmark: 1)", int),
            Option("correct_epochs", 4, "epochs of the ensemble correction per stage (BalanceBenchmark: 1)", int),
            Option("boost_rate", 1.0, "initial boost rate of the ensemble (BalanceBenchmark: 0.01)", float),
            Option("ga", "prediction", "the alignment term; none is the official code's (zero gradient)", str, ("prediction", "none")),
            Option("pretrain_epochs", None, "epochs each unimodal model trains alone first (default: the dataset's epochs)", int, loop=True),
        ),
    ),
)
