"""MBSD: confidence-gated self-distillation between the modalities of one model.

Liu, Li, Song, Yang & Zeng, *Multimodal Pre-Training with Self-Distillation for Product Understanding in
E-Commerce*, WSDM 2023 (DOI 10.1145/3539597.3570423); "MBSD" is the name of its model. Its abstract: the
imbalance of multimodal pre-training is met by "a novel self-distillation strategy to transfer the knowledge
in dominated modality to weaker modality". No official code exists; the version the imbalance literature
runs is BalanceBenchmark's port (GeWu-Lab/BalanceBenchmark @4c1482f, ``balancemm/trainer/MBSD_trainer.py``
≈ L95–231), from which the equations below are read. Per batch, with a split concat head (``z_m = h_m W_mᵀ +
b/M``, `gradmod.functional.decouple_linear`), ``q_m = softmax(z_m)[y]`` the true-class confidence of
modality ``m``, and for a pair of modalities ``(a, b)``:

* the gate ``c = 1`` when either modality's argmax is the label, else 0;
* the weight ``w = c·(s − u)``, ``s = max(q_a, q_b)``, ``u = min(q_a, q_b)``: the confidence gap;
* the logit regression ``RS = (1/C)·Σ_k (z_a,k − z_b,k)²``;
* a distillation term ``D`` from the confident modality (the *teacher*, ``q = s``) to the other
  (the *student*, ``q = u``);
* the loss ``L = CE(z) + Σ_m CE(z_m) + λ·mean_pairs[mean_i(w·RS) + mean_i(w·D)]`` inside the epoch window,
  ``L = CE(z)`` outside it (the unimodal terms vanish too). ``λ = distillation_weight`` (1 in the port).

(The paper's own equations could not be read; these names are gradmod's.)

**gradmod's reading** (the defaults), and the port's behaviour as flags (`BALANCEBENCHMARK` sets all four):

* ``divergence="kl"``: ``D = KL(p_teacher ‖ p_student) = Σ_k p_t,k (log p_t,k − log p_s,k)``, a true
  divergence between the two modalities' class distributions, ≥ 0 and 0 only when they agree.
  ``"port"``: the port's ``D = u·(log u − s)`` — ``F.kl_div(s, u)`` given a probability where a
  log-probability is expected — a function of the two true-class confidences that is not a divergence:
  negative for every ``0 < u < 1`` (−0.50 for ``u = 0.2``, ``s = 0.9``), not 0 where the modalities agree,
  and decreasing in both ``u`` and ``s`` (``∂/∂u = log u + 1 − s ≤ 0`` for ``u ≤ s``), so it raises both
  confidences rather than matching the two distributions (`port_divergence`).
* ``symmetric=False``: strong → weak only — the teacher's logits are detached in ``RS`` and ``D``, so only
  the student moves, as "transfer the knowledge in dominated modality to weaker modality" says.
  ``True``: no stop-gradient, both modalities are pulled towards each other (the port).
* ``detach_weight=True``: ``w`` is a per-sample gate, not an objective. With its gradient (the port), the
  product ``w·D`` also moves the confidences through ``w``: it shrinks the gap by lowering the teacher's
  confidence where ``D > 0`` and, with the port's negative ``D``, widens it. On a small model this changes
  the distillation term's encoder gradient by about 100 % (module docs page).
* ``first_epoch``/``last_epoch``: the window (inclusive, told by `MBSD.start_epoch`); the port's is 0..80.
  gradmod's default is every epoch (the paper distils throughout pre-training).

**More than two modalities**: every pair ``(a, b)``, ``a`` before ``b`` in the modality order, gets its own
``c``, ``w``, teacher and terms, and the pair terms are averaged over the ``M(M−1)/2`` pairs (for three
modalities this is the port's ``/3``). The port computes ``RS`` on probabilities for three modalities (on
logits for two) and silently uses the first three of more; gradmod uses logits for every ``M`` and every
modality.

**Cost per step**: ``M`` unimodal cross-entropies and ``M(M−1)/2`` pair terms on ``[B, C]`` logits — no
extra forward or backward pass — and one host synchronisation (the checks of the logits and targets).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gradmod._internal import check_logits_target, per_modality, real_scalar
from gradmod.history import History
from gradmod.method import Fit, Method, MethodInfo, Option, Strength, check_units

__all__ = [
    "BALANCEBENCHMARK",
    "DIVERGENCES",
    "MBSD",
    "distillation_divergence",
    "logit_regression",
    "pair_distillation",
    "port_divergence",
    "true_class_confidence",
]

#: ``"kl"``: KL(teacher ‖ student) of the class distributions; ``"port"``: BalanceBenchmark's ``u·(log u − s)``.
DIVERGENCES = ("kl", "port")
#: The keywords that give BalanceBenchmark's port: ``MBSD(names, **BALANCEBENCHMARK)``.
BALANCEBENCHMARK: dict[str, Any] = {"detach_weight": False, "divergence": "port", "symmetric": True, "last_epoch": 80}
#: What `MBSD.history` records per modality and step.
_RECORDED = ("confidence", "teacher", "weight", "unimodal_loss")


def true_class_confidence(logits: Tensor, target: Tensor) -> Tensor:
    """``q_i = softmax(z_i)[y_i]``, ``[B]``, with the logits' gradient."""
    return torch.softmax(logits, dim=1).gather(1, target.long().unsqueeze(1)).squeeze(1)


def logit_regression(student: Tensor, teacher: Tensor) -> Tensor:
    """The logit regression ``RS_i = (1/C)·Σ_k (z_s,ik − z_t,ik)²``, ``[B]`` (symmetric in its arguments)."""
    return (student - teacher).pow(2).mean(dim=1)


def distillation_divergence(student: Tensor, teacher: Tensor) -> Tensor:
    """The distillation term, gradmod's reading: ``KL(p_t ‖ p_s) = Σ_k p_t,k (log p_t,k − log p_s,k)`` per
    sample, ``[B]``, from the logits of the student and of the teacher (``p = softmax(z)``). Non-negative, 0 iff
    ``p_s = p_t``."""
    log_student, log_teacher = F.log_softmax(student, dim=1), F.log_softmax(teacher, dim=1)
    return F.kl_div(log_student, log_teacher, reduction="none", log_target=True).sum(dim=1)


def port_divergence(student_confidence: Tensor, teacher_confidence: Tensor) -> Tensor:
    """The distillation term as BalanceBenchmark's port computes it: ``u·(log u − s)`` with ``u`` the student's
    and ``s`` the teacher's true-class confidence (``F.kl_div(s, u)``, the confidence passed where a
    log-probability belongs). Not a divergence: −0.50 for ``u = 0.2``, ``s = 0.9``, negative for every
    ``0 < u < 1``."""
    return F.kl_div(teacher_confidence, student_confidence, reduction="none")


def pair_distillation(
    first: Tensor,
    second: Tensor,
    target: Tensor,
    *,
    divergence: str = "kl",
    symmetric: bool = False,
    detach_weight: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The per-sample terms of one pair of modalities: ``(w·RS, w·D, w, first_teaches)``, each ``[B]``.

    ``first``, ``second``: the two modalities' ``[B, C]`` logits; ``target``: ``[B]`` class indices. The teacher
    of sample ``i`` is the modality with the larger true-class confidence (``first`` on a tie, where ``w = 0``);
    ``w = c·(s − u)`` (the gate and the weight). ``symmetric=False`` detaches the teacher's logits,
    ``detach_weight=True`` detaches ``w``; ``divergence`` is one of `DIVERGENCES` (module docstring).
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    q_first, q_second = true_class_confidence(first, target), true_class_confidence(second, target)
    first_teaches = q_first >= q_second
    either_right = (first.argmax(dim=1) == target) | (second.argmax(dim=1) == target)
    weight = either_right.to(q_first.dtype) * (q_first - q_second).abs()
    if detach_weight:
        weight = weight.detach()
    rows = first_teaches.unsqueeze(1)
    teacher, student = torch.where(rows, first, second), torch.where(rows, second, first)
    teacher_q, student_q = torch.where(first_teaches, q_first, q_second), torch.where(first_teaches, q_second, q_first)
    if not symmetric:
        teacher, teacher_q = teacher.detach(), teacher_q.detach()
    if divergence == "kl":
        distill = distillation_divergence(student, teacher)
    else:
        distill = port_divergence(student_q, teacher_q)
    return weight * logit_regression(student, teacher), weight * distill, weight, first_teaches


class MBSD(Method):
    """MBSD's loss (module docstring): cross-entropies of the fused and unimodal logits plus the
    confidence-gated distillation of every pair of modalities.

    Args:
        modalities: the modality names (two or more), the keys of ``unimodal_logits``.
        distillation_weight: ``λ ≥ 0`` of the loss, the weight of the pair terms (1 in the port); 0 leaves the
            unimodal-ensemble loss ``CE(z) + Σ_m CE(z_m)``.
        divergence: ``"kl"`` (default) or ``"port"`` (`DIVERGENCES`).
        symmetric: ``False`` (default): only the weaker modality of a pair is distilled; ``True``: both (the port).
        detach_weight: ``True`` (default): ``w`` carries no gradient; ``False``: it does (the port).
        first_epoch, last_epoch: the epochs (inclusive; ``None``: no end) in which the loss above applies; outside them
            the loss is ``CE(z)`` alone. The epoch is the last one given to `start_epoch`.
        history_size: ``None`` keeps every step in `history`; an int keeps the last ones.

    Each call of `loss` records one step: per modality the mean true-class ``confidence``, the share of its
    pairs' samples in which it is the ``teacher`` with ``w > 0``, the mean ``weight`` ``w`` of its pairs, and its
    ``unimodal_loss``; status ``"outside"`` outside the window.
    """

    kind = "loss"
    loss_inputs = ("logits", "unimodal_logits", "target")
    state_version = 1

    def __init__(
        self,
        modalities: Sequence[str],
        *,
        distillation_weight: float = 1.0,
        divergence: str = "kl",
        symmetric: bool = False,
        detach_weight: bool = True,
        first_epoch: int = 0,
        last_epoch: int | None = None,
        history_size: int | None = None,
    ) -> None:
        self.names: tuple[str, ...] = check_units(modalities, "modalities")
        self.distillation_weight = real_scalar(distillation_weight, "distillation_weight")
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
        self.divergence = divergence
        self.symmetric = bool(symmetric)
        self.detach_weight = bool(detach_weight)
        self.first_epoch = _epoch_number(first_epoch, "first_epoch")
        self.last_epoch = None if last_epoch is None else _epoch_number(last_epoch, "last_epoch")
        if self.last_epoch is not None and self.last_epoch < self.first_epoch:
            raise ValueError(f"last_epoch ({last_epoch}) must not come before first_epoch ({first_epoch})")
        self.pairs: tuple[tuple[str, str], ...] = tuple(itertools.combinations(self.names, 2))
        self._history = History(self.names, history_size, fields=_RECORDED)
        self._epoch: int | None = None
        self._steps = 0
        self._idle: Tensor | None = None

    # ------------------------------------------------------------------ epochs
    def start_epoch(self, epoch: int) -> None:
        """Tell the method the epoch that starts (0-based): it decides whether the full loss or ``CE(z)`` applies."""
        self._epoch = _epoch_number(epoch, "epoch")

    @property
    def windowed(self) -> bool:
        """Whether the method is limited to an epoch window (``first_epoch > 0`` or a ``last_epoch``)."""
        return self.first_epoch > 0 or self.last_epoch is not None

    def in_window(self, epoch: int | None = None) -> bool:
        """Whether the full loss applies in ``epoch`` (default: the current one; epoch 0 before any `start_epoch`)."""
        epoch = (self._epoch or 0) if epoch is None else epoch
        return self.first_epoch <= epoch and (self.last_epoch is None or epoch <= self.last_epoch)

    # ------------------------------------------------------------------ the loss
    def loss(self, logits: Tensor, unimodal_logits: Mapping[str, Tensor], target: Tensor) -> Tensor:
        """The loss of one batch (module docstring), 0-d, to backward.

        ``logits``: the fused ``[B, C]`` logits; ``unimodal_logits``: ``{modality: [B, C]}`` of the split head,
        with grad; ``target``: ``[B]`` class indices. Raises on missing or unknown modalities, mismatched
        shapes, an empty batch, non-finite logits and targets outside ``[0, C)``.
        """
        unimodal = self._checked(logits, unimodal_logits, target)
        if self.windowed and self._epoch is None:
            self._warn_once(
                "no-epoch",
                f"the window is epochs {self.first_epoch}..{self.last_epoch} but start_epoch(epoch) was never "
                "called, so every step counts as epoch 0: call method.start_epoch(epoch) before each epoch",
                stacklevel=3,
            )
        fused_loss = F.cross_entropy(logits, target)
        if not self.in_window():
            self._record_outside(unimodal, target)
            return fused_loss
        unimodal_losses = {m: F.cross_entropy(z, target) for m, z in unimodal.items()}
        total = fused_loss + sum(unimodal_losses.values())
        per_pair, weights, teaches = [], {m: [] for m in self.names}, {m: [] for m in self.names}
        for a, b in self.pairs:
            regression, distill, weight, a_teaches = pair_distillation(
                unimodal[a],
                unimodal[b],
                target,
                divergence=self.divergence,
                symmetric=self.symmetric,
                detach_weight=self.detach_weight,
            )
            per_pair.append(regression.mean() + distill.mean())
            active = weight.detach() > 0
            for m, teaching in ((a, a_teaches & active), (b, ~a_teaches & active)):
                weights[m].append(weight.detach())
                teaches[m].append(teaching)
        if self.distillation_weight:
            total = total + self.distillation_weight * torch.stack(per_pair).mean()
        self._record(unimodal, unimodal_losses, target, weights, teaches)
        return total

    def _checked(self, logits: Tensor, unimodal_logits: Mapping[str, Tensor], target: Tensor) -> dict[str, Tensor]:
        unimodal = per_modality(unimodal_logits, self.names, "unimodal_logits")
        check_logits_target(logits, target)
        if logits.shape[0] == 0:
            raise ValueError("MBSD.loss got an empty batch (0 samples)")
        for m in self.names:
            check_logits_target(unimodal[m], target, name=f"unimodal_logits[{m!r}]")
            if unimodal[m].shape != logits.shape:
                raise ValueError(
                    f"unimodal_logits[{m!r}] has shape {tuple(unimodal[m].shape)}, "
                    f"the fused logits {tuple(logits.shape)}"
                )
        classes = logits.shape[1]
        problems = {
            "the fused logits contain NaN or inf": ~torch.isfinite(logits.detach()).all(),
            **{
                f"unimodal_logits[{m!r}] contain NaN or inf": ~torch.isfinite(unimodal[m].detach()).all()
                for m in self.names
            },
            f"target holds class indices outside [0, {classes})": ((target < 0) | (target >= classes)).any(),
        }
        flags = list(problems.values())
        if self._idle is not None:  # the previous step's "no distillation" flag, read in the same synchronisation
            flags.append(self._idle.to(logits.device))
        values = torch.stack(flags).tolist()
        found = [what for what, flag in zip(problems, values) if flag]
        if found:
            raise ValueError(f"MBSD.loss: {'; '.join(found)}")
        if self._idle is not None and values[-1]:
            self._warn_once(
                "no-distillation",
                "every distillation weight w was 0 in a batch (no sample had a modality that predicts its label, or "
                "the modalities were exactly as confident): only the cross-entropies trained there",
                stacklevel=4,
            )
        self._idle = None
        return {m: unimodal[m] for m in self.names}

    def _record(
        self,
        unimodal: Mapping[str, Tensor],
        unimodal_losses: Mapping[str, Tensor],
        target: Tensor,
        weights: Mapping[str, list[Tensor]],
        teaches: Mapping[str, list[Tensor]],
    ) -> None:
        confidence = torch.stack([true_class_confidence(unimodal[m].detach(), target).mean() for m in self.names])
        teacher = torch.stack([torch.cat(teaches[m]).float().mean() for m in self.names])
        weight = torch.stack([torch.cat(weights[m]).mean() for m in self.names])
        losses = torch.stack([unimodal_losses[m].detach() for m in self.names])
        if self.distillation_weight:
            self._idle = weight.eq(0).all()  # mean weights of 0 everywhere: checked at the next step's sync
        self._history.append(self._steps, [v.float() for v in (confidence, teacher, weight, losses)])
        self._steps += 1

    def _record_outside(self, unimodal: Mapping[str, Tensor], target: Tensor) -> None:
        confidence = torch.stack(
            [true_class_confidence(unimodal[m].detach(), target).mean() for m in self.names]
        ).float()
        nan = torch.full_like(confidence, float("nan"))
        self._history.append(self._steps, [confidence, nan, nan, nan], in_window=False)
        self._steps += 1

    # ------------------------------------------------------------------ state
    @property
    def step_count(self) -> int:
        """How many `loss` calls were made."""
        return self._steps

    def _extra_state(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "steps": self._steps, "warned": sorted(self.__dict__.get("_warned", ()))}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        epoch = state["epoch"]
        self._epoch = None if epoch is None else _epoch_number(epoch, "saved epoch")
        self._steps = int(state["steps"])
        self._warned = set(state["warned"])

    def _reset(self) -> None:
        self._epoch = None
        self._steps = 0
        self._idle = None
        self._warned = set()

    def __repr__(self) -> str:
        end = "" if self.last_epoch is None else str(self.last_epoch)
        return (
            f"MBSD(modalities={list(self.names)}, distillation_weight={self.distillation_weight:g}, "
            f"divergence={self.divergence!r}, symmetric={self.symmetric}, detach_weight={self.detach_weight}, "
            f"epochs={self.first_epoch}..{end})"
        )


def _epoch_number(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)


METHODS = (
    MethodInfo(
        key="mbsd",
        preset=MBSD,
        title="MBSD",
        kind="loss",
        paper="Liu, Li, Song, Yang & Zeng, Multimodal Pre-Training with Self-Distillation for Product Understanding "
        "in E-Commerce, WSDM 2023",
        page="methods/mbsd.md",
        observes="per step: the fused logits and the split head's per-modality logits",
        cost="M unimodal cross-entropies and M(M−1)/2 pair terms on the logits; one host synchronisation",
        fit=Fit(head="decoupled", acts_on="loss"),
        strength=Strength("distillation_weight", 1.0, "λ, the weight of the confidence-gated distillation terms"),
        options=(
            Option(
                "divergence", "kl", "the distillation term: a true KL, or BalanceBenchmark's port", str, DIVERGENCES
            ),
            Option("last_epoch", None, "last epoch (inclusive) of the distillation; BalanceBenchmark: 80", int),
        ),
    ),
)
