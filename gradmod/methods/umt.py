"""UMT and UME: Du, Teng, Li, Liu, Yuan, Wang, Yuan & Zhao, *On Uni-Modal Feature Learning in Supervised
Multi-Modal Learning*, ICML 2023 (no official code; BalanceBenchmark's ``balancemm/trainer/UMT_trainer.py``).

The paper splits what a multimodal model can learn into *uni-modal features* (learnable from one modality alone)
and *paired features* (learnable only from the modalities together), observes that joint late-fusion training
learns the uni-modal features of each modality insufficiently ("modality laziness"), and proposes two remedies,
to choose between by how much the task needs paired features:

* **UMT, the Uni-Modal Teacher** (`UMT`): first train one unimodal model per modality on its own; then train
  the multimodal model on its task loss plus the distillation of each teacher's features into the multimodal
  model's encoder of that modality:

  ``L = CE(out, y) + λ · Σ_m MSE(h_m^teacher, h_m)``,  ``λ = 10``  (`umt_loss`)

  with ``h_m`` the multimodal model's features of modality ``m`` and ``h_m^teacher`` the frozen teacher's
  features of the same batch (MSE: mean over the ``B × D_m`` entries). The teachers run in **eval mode** under
  ``torch.no_grad()``: they are fixed models. BalanceBenchmark leaves them in train mode, so their batch-norm
  layers normalise with each batch's statistics and keep moving their running statistics at every step
  (``teacher_mode="train"``; measured on the docs page).
* **UME, the Uni-Modal Ensemble** (`UME`): train the unimodal models independently and predict with the
  average of their predictions (recalled from the paper: the mean of the unimodal models' class probabilities,
  `unimodal_ensemble`; ``average="logits"`` averages the logits instead). Trained in one loop, independent
  training is the **sum** of the unimodal cross-entropies ``Σ_m CE(o_m, y)``: the gradient of the sum
  reaches each unimodal model as its own loss's gradient, nothing is shared, so with a per-parameter optimizer
  (SGD, Adam) this is M separate runs on the same batches.

UME is kind ``"loss"`` rather than ``"head"``: a head trained on the loss of the averaged prediction would
train the modalities jointly (a late-fusion sum head), the very training UME avoids; the averaging is only its
test-time prediction (`UME.predict`). Its trained unimodal models are UMT's teachers (and ReconBoost's
pretrained members).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradmod._internal import (
    check_logits_target,
    check_names,
    checked_unimodal_logits,
    per_modality,
    real_scalar,
)
from gradmod.history import History
from gradmod.method import Fit, Method, MethodInfo, Option, Strength, check_units

__all__ = ["AVERAGES", "TEACHER_MODES", "UME", "UMT", "umt_loss", "unimodal_ensemble"]

#: ``teacher_mode=`` values: ``"eval"`` (frozen teachers, fixed batch-norm statistics) or ``"train"``
#: (BalanceBenchmark: batch statistics, running statistics that drift).
TEACHER_MODES = ("eval", "train")
#: ``average=`` values of UME's prediction: the mean of the ``"probabilities"`` or of the ``"logits"``.
AVERAGES = ("probabilities", "logits")
#: UMT's history unit of the task loss (besides one unit per modality, their distillation losses).
FUSED = "fused"


# ----------------------------------------------------------------------------------------- the equations
def umt_loss(
    logits: Tensor,
    target: Tensor,
    features: Mapping[str, Tensor],
    teacher_features: Mapping[str, Tensor],
    distillation_weight: float = 10.0,
) -> Tensor:
    """UMT's loss ``CE(out, y) + λ·Σ_m MSE(h_m^teacher, h_m)`` (0-d); the teachers' features are detached."""
    check_names(teacher_features, list(features), "teacher_features")
    distillation = sum(F.mse_loss(features[m], teacher_features[m].detach()) for m in features)
    return F.cross_entropy(logits, target) + distillation_weight * distillation


def unimodal_ensemble(
    logits: Mapping[str, Tensor], average: str = "probabilities", weights: Mapping[str, float] | None = None
) -> Tensor:
    """UME's prediction from the unimodal models' logits ``{m: [B, C]}``: ``Σ_m w_m softmax(o_m)`` (class
    probabilities, ``average="probabilities"``) or ``Σ_m w_m o_m`` (``average="logits"``); ``w_m = 1/M`` unless
    ``weights`` (non-negative, normalised to sum to 1) are given."""
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")
    names = list(logits)
    shares = _shares(weights, names)
    values = [torch.softmax(logits[m], dim=1) if average == "probabilities" else logits[m] for m in names]
    return sum(shares[m] * value for m, value in zip(names, values))


def _shares(weights: Mapping[str, float] | None, names: Sequence[str]) -> dict[str, float]:
    if weights is None:
        return {m: 1.0 / len(names) for m in names}
    weights = per_modality(weights, names, "weights")
    values = {m: real_scalar(weights[m], f"weights[{m!r}]") for m in names}
    total = sum(values.values())
    if total == 0.0:
        raise ValueError("weights are all 0: give at least one modality a positive weight")
    return {m: v / total for m, v in values.items()}


# ----------------------------------------------------------------------------------------- UMT
class UMT(Method):
    """The Uni-Modal Teacher: the task loss plus the distillation of frozen unimodal teachers' features.

    Args:
        teachers: ``{modality: module}``, each the encoder of a unimodal model trained on that modality alone
            (e.g. with `UME`), mapping the modality's input batch to ``[B, D_m]`` features of the width of the
            multimodal model's encoder: separate modules (``copy.deepcopy`` them), not the multimodal model's
            own encoders. They run under ``torch.no_grad()``, so they stay as they are (keep their parameters
            out of the optimizer); move them to the model's device yourself.
        distillation_weight: ``λ ≥ 0`` (10, BalanceBenchmark's ``scaling``).
        teacher_mode: ``"eval"`` (default: fixed batch-norm statistics) or ``"train"`` (BalanceBenchmark: the
            teachers' batch-norm layers use each batch's statistics and update their running statistics).

    The history records one row per `loss` call: under ``"fused"`` the task loss, under each modality its
    distillation loss (``loss``).
    """

    kind = "loss"
    loss_inputs = ("logits", "features", "inputs", "target")
    state_version = 1

    def __init__(self, teachers: Mapping[str, nn.Module], *, distillation_weight: float = 10.0, teacher_mode: str = "eval") -> None:
        if not isinstance(teachers, Mapping):
            raise TypeError(f"teachers must be a mapping modality -> module, got {type(teachers).__name__}")
        self.names: tuple[str, ...] = check_units(list(teachers), "teachers")
        if FUSED in self.names:
            raise ValueError(f"{FUSED!r} names the task loss in UMT's history; rename that modality")
        bad = [name for name, module in teachers.items() if not isinstance(module, nn.Module)]
        if bad:
            raise TypeError(f"the teachers of {bad} are not nn.Modules")
        if teacher_mode not in TEACHER_MODES:
            raise ValueError(f"teacher_mode must be one of {TEACHER_MODES}, got {teacher_mode!r}")
        self.teachers = nn.ModuleDict({name: teachers[name] for name in self.names})
        self.distillation_weight = real_scalar(distillation_weight, "distillation_weight")
        self.teacher_mode = teacher_mode
        self._history = History((*self.names, FUSED), fields=("loss",))
        self._steps = 0

    @torch.no_grad()
    def teacher_features(self, inputs: Mapping[str, Any]) -> dict[str, Tensor]:
        """Each teacher's features of its modality's batch, in ``teacher_mode``, without grad."""
        inputs = per_modality(inputs, self.names, "inputs")
        self.teachers.train(self.teacher_mode == "train")
        features = {}
        for name in self.names:
            value = self.teachers[name](inputs[name])
            if not isinstance(value, Tensor):
                raise TypeError(f"the teacher of {name!r} returned {type(value).__name__}, not a [batch, width] tensor")
            features[name] = value
        return features

    def loss(self, logits: Tensor, features: Mapping[str, Tensor], inputs: Mapping[str, Any], target: Tensor) -> Tensor:
        """``CE(logits, target) + λ·Σ_m MSE(teacher_m(inputs[m]), features[m])`` of one batch.

        ``features`` ``{m: [B, D_m]}``: the multimodal model's encoder outputs, with grad.
        """
        check_logits_target(logits, target)
        features = per_modality(features, self.names, "features")
        taught = self.teacher_features(inputs)
        for name in self.names:
            h, t = features[name], taught[name]
            if isinstance(h, Tensor) and h.shape == t.shape and h.shape[0] != logits.shape[0]:
                raise ValueError(f"features[{name!r}] and inputs[{name!r}] have batch {h.shape[0]}, the logits {logits.shape[0]}")
            if not isinstance(h, Tensor) or h.shape != t.shape:
                shape = tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__
                raise ValueError(
                    f"features[{name!r}] must have the teacher's shape {tuple(t.shape)} (batch {logits.shape[0]}), got {shape}"
                )
        if logits.shape[0] == 0:
            raise ValueError("UMT.loss: the batch is empty")
        distillation = torch.stack([F.mse_loss(features[m], taught[m]) for m in self.names])
        flags = torch.stack(
            [~torch.isfinite(logits.detach()).all(), ((target < 0) | (target >= logits.shape[1])).any()]
            + [~torch.isfinite(features[m].detach()).all() for m in self.names]
            + [~torch.isfinite(taught[m]).all() for m in self.names]
            + list((distillation.detach() == 0).unbind(0))
        ).tolist()
        self._raise_on(flags, logits.shape[1])
        same = [name for name, flag in zip(self.names, flags[2 + 2 * len(self.names) :]) if flag]
        if same:
            self._warn_once(
                "identical",
                f"the teachers of {same} return exactly the model's own features, so nothing is distilled: is the teacher "
                "the model's own encoder? Give a separately trained copy (copy.deepcopy)",
            )
        task = F.cross_entropy(logits, target)
        self._history.append(self._steps, (torch.cat([distillation.detach(), task.detach().reshape(1)]).float(),))
        self._steps += 1
        return task + self.distillation_weight * distillation.sum()

    def _raise_on(self, flags: list[bool], classes: int) -> None:
        m = len(self.names)
        if flags[0]:
            raise ValueError("logits contain NaN or inf")
        if flags[1]:
            raise ValueError(f"target holds class indices outside [0, {classes})")
        student = [name for name, flag in zip(self.names, flags[2 : 2 + m]) if flag]
        teacher = [name for name, flag in zip(self.names, flags[2 + m : 2 + 2 * m]) if flag]
        if student:
            raise ValueError(f"features of modalities {student} contain NaN or inf")
        if teacher:
            raise ValueError(f"the teachers of {teacher} returned NaN or inf features")

    def _extra_state(self) -> dict[str, Any]:
        """The configuration (checked on load) and the step count; with ``teacher_mode="train"`` also the
        teachers' buffers (their running statistics move)."""
        state: dict[str, Any] = {"distillation_weight": self.distillation_weight, "teacher_mode": self.teacher_mode, "steps": self._steps}
        if self.teacher_mode == "train":
            state["teacher_buffers"] = {name: b.detach().cpu().clone() for name, b in self.teachers.named_buffers()}
        return state

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        for key in ("distillation_weight", "teacher_mode"):
            if state[key] != getattr(self, key):
                raise ValueError(f"state_dict has {key}={state[key]!r}, this UMT has {key}={getattr(self, key)!r}")
        self._steps = int(state["steps"])
        if self.teacher_mode == "train":
            buffers = dict(self.teachers.named_buffers())
            check_names(state["teacher_buffers"], list(buffers), "the saved teacher buffers")
            with torch.no_grad():
                for name, value in state["teacher_buffers"].items():
                    buffers[name].copy_(value)

    def _reset(self) -> None:
        """The step count (the teachers are not retrained; their buffers stay as they are)."""
        self._steps = 0

    def __repr__(self) -> str:
        return f"UMT(teachers={list(self.names)}, distillation_weight={self.distillation_weight:g}, teacher_mode={self.teacher_mode!r})"


# ----------------------------------------------------------------------------------------- UME
class UME(Method):
    """The Uni-Modal Ensemble: independent unimodal training (`loss`), averaged predictions (`predict`).

    Args:
        modalities: the names of the modalities (two or more), each with its own unimodal model.
        average: ``"probabilities"`` (default) or ``"logits"``: what `predict` averages.
        weights: optional ``{modality: weight ≥ 0}`` of the average (normalised); equal weights by default.

    The history records each modality's cross-entropy per `loss` call (``loss``).
    """

    #: what `predict` reads (`gradmod.method.INPUTS`): the test-time prediction is the method's, not the fused head's
    predict_inputs = ("unimodal_head_logits",)

    kind = "loss"
    loss_inputs = ("unimodal_head_logits", "target")
    state_version = 1

    def __init__(self, modalities: Sequence[str], *, average: str = "probabilities", weights: Mapping[str, float] | None = None) -> None:
        self.names: tuple[str, ...] = check_units(modalities, "modalities")
        if average not in AVERAGES:
            raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")
        self.average = average
        self.weights = _shares(weights, self.names)
        self._history = History(self.names, fields=("loss",))
        self._steps = 0

    def loss(self, unimodal_head_logits: Mapping[str, Tensor], target: Tensor) -> Tensor:
        """``Σ_m CE(o_m, y)``: each unimodal model trained on its own cross-entropy (no gradient is shared)."""
        logits = checked_unimodal_logits(unimodal_head_logits, target, self.names, "unimodal_head_logits")
        losses = torch.stack([F.cross_entropy(logits[m], target) for m in self.names])
        self._history.append(self._steps, (losses.detach().float(),))
        self._steps += 1
        return losses.sum()

    def predict(self, unimodal_head_logits: Mapping[str, Tensor]) -> Tensor:
        """The ensemble's prediction (`unimodal_ensemble`): class probabilities, or logits with ``average="logits"``."""
        logits = checked_unimodal_logits(unimodal_head_logits, None, self.names, "predict(unimodal_head_logits=...)")
        return unimodal_ensemble(logits, self.average, self.weights)

    def _extra_state(self) -> dict[str, Any]:
        """The configuration (checked on load) and the step count."""
        return {"average": self.average, "weights": dict(self.weights), "steps": self._steps}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        for key, mine in (("average", self.average), ("weights", self.weights)):
            if state[key] != mine:
                raise ValueError(f"state_dict has {key}={state[key]!r}, this UME has {key}={mine!r}")
        self._steps = int(state["steps"])

    def _reset(self) -> None:
        self._steps = 0

    def __repr__(self) -> str:
        return f"UME(modalities={list(self.names)}, average={self.average!r})"


METHODS = (
    MethodInfo(
        key="umt",
        preset=UMT,
        title="UMT",
        kind="loss",
        paper="Du et al., On Uni-Modal Feature Learning in Supervised Multi-Modal Learning, ICML 2023",
        page="methods/umt.md",
        observes="per step: the fused logits, each encoder's features and the raw inputs (for the teachers)",
        cost="one teacher forward pass per modality and step; unimodal teachers trained beforehand",
        fit=Fit(head="inputs", acts_on="loss"),
        strength=Strength("distillation_weight", 10.0, "λ of CE + λ·Σ_m MSE(h_m^teacher, h_m)"),
        options=(
            Option("teacher_mode", "eval", "the teachers' mode; train is BalanceBenchmark's (drifting BN)", str, TEACHER_MODES),
            Option("pretrain_epochs", None, "epochs each unimodal model trains alone first (default: the dataset's epochs)", int, loop=True),
        ),
    ),
    MethodInfo(
        key="ume",
        preset=UME,
        title="UME",
        kind="loss",
        paper="Du et al., On Uni-Modal Feature Learning in Supervised Multi-Modal Learning, ICML 2023",
        page="methods/umt.md",
        observes="per step: each modality's unimodal-head logits",
        cost="none beyond the unimodal heads; test-time prediction = average of the unimodal predictions",
        fit=Fit(head="unimodal heads", acts_on="loss"),
        options=(Option("average", "probabilities", "what the ensemble averages at test time", str, AVERAGES),),
    ),
)
