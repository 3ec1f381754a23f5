"""InfoReg: Huang, Wei, Yang & Hu, *Adaptive Unimodal Regulation for Balanced Multimodal Information
Acquisition*, CVPR 2025 (arXiv 2503.18595; official code ``GeWu-Lab/InfoReg_CVPR2025``).

**Why.** Early in training — the *prime learning window*, while the network acquires information fast —
the information-sufficient modality dominates and suppresses what the others acquire. InfoReg slows the
dominant modality down while its window is open, with a proximal pull of its encoder towards where the
epoch started.

**Per epoch** (`acquisition_rate`). The information an encoder acquired in epoch ``e`` is measured by a
Fisher-trace statistic: with ``F_t = Σ_steps g_t ⊙ g_t`` the squared gradients of each weight tensor ``t`` of
the encoder accumulated over the epoch, ``T_e = Σ_t mean(F_t)`` (`fisher_increment` adds one step's
``Σ_t mean(g_t²)``). With the list of traces padded in front by ``span`` zeros (``span = 10``), the
window statistic of the next epoch is

``k_e = (T_{e−1} − T_{e−span−1}) / Σ_{j=e−span}^{e−1} T_j``,  ``k_0 = 1``,

the change of the mean trace over the last ``span`` epochs relative to that mean (for the first ``span``
epochs, ``T_{e−1}/Σ_{j<e} T_j``). The window of a modality is open while ``k > threshold`` (0.05); it can
re-open later, as in the official code. When ``Σ T = 0`` (no gradient reached the weights) the official code
divides by zero; gradmod gives ``k = 0`` (closed) and warns.

**Per step** (`proximal_weights`). Scores of the decoupled logits ``z_m`` (a concat head split per modality,
``h_m W_mᵀ + b/M``): ``s_m`` = the mean over the batch of ``softmax(z_m)[y]`` (``score="mean"``) or its sum
(``"sum"``, the official code). The gap ``Δ_m = s_m − mean_{o≠m} s_o`` (``s_a − s_v`` for two modalities);
for every modality with ``Δ_m > 0`` whose window is open,

``β_m = γ_m · exp(tanh(Δ_m))``,  and every parameter of its encoder gets  ``g ← g + β_m (θ − θ⁰)``,

``θ⁰`` the encoder at the start of the epoch (the gradient of ``β_m/2 · ‖θ − θ⁰‖²``). Other modalities, ties
and closed windows get ``β = 0``. The pull is applied in the optimizer's step pre-hook, after backward.

**The loss.** The official loop trains on ``CE(z) + Σ_m CE(z_m)``, the fused loss plus the decoupled logits'
losses (`inforeg_loss`); InfoReg's regulation acts on whatever the loop backwards, so use that loss to train as
the official code does.

**M modalities.** Each modality has its own window (its own traces), its own ``γ_m`` and its own gap to the
mean of the others. The official code has two modalities and differs (`InfoReg.official` reproduces it):

* the **audio** encoder's window decides for both modalities (``window="audio"``);
* ``γ = 0.95`` for audio and ``0.1`` for visual (`OFFICIAL_PROXIMAL_WEIGHTS`);
* batch **sums** of the confidences (``score="sum"``): with batch 64 they saturate ``tanh`` (a mean
  confidence gap of 0.03 gives ``β_a = 2.48`` with sums, ``0.98`` with means);
* the Fisher accumulator squares the gradient **after** the pull (``fisher="pulled"``); gradmod squares the
  gradient of the loss (``"task"``), since the pull is not information acquired from the data.

**What the Fisher accumulator covers.** The official code accumulates the Conv2d and Linear weights of the
audio encoder only (for its ResNet-18: every weight with more than one dimension). gradmod accumulates, for
every modality, the parameters ``fisher_filter`` selects, by default `gradmod.filters.weights` (every
parameter of more than one dimension: conv and linear weights, no biases or norms), which is the official
selection for those encoders. The pull covers every parameter of the encoder, as in the official code.
The statistic is kept as one number per modality (``Σ_t ‖g_t‖²/n_t`` per step), not as a copy of the
weights: equal to the official ``Σ_t mean(F_t)`` up to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from gradmod import filters
from gradmod._hooks import StepHook, StepHooked, unheld_modality
from gradmod._internal import (
    check_logits_target,
    checked_ignore_index,
    collective_device,
    distributed,
    real_scalar,
)
from gradmod.appliers import Modality, ParameterSelection, ParamFilter
from gradmod.history import History
from gradmod.measures import IGNORE_INDEX, SoftmaxScore
from gradmod.method import Fit, Method, MethodInfo, Option, Strength

__all__ = [
    "DEFAULT_PROXIMAL_WEIGHT",
    "DEFAULT_SPAN",
    "DEFAULT_THRESHOLD",
    "FISHER_GRADIENTS",
    "OFFICIAL_PROXIMAL_WEIGHTS",
    "SCORES",
    "InfoReg",
    "acquisition_rate",
    "fisher_increment",
    "inforeg_loss",
    "proximal_weights",
]

#: ``γ`` of ``β = γ·exp(tanh(Δ))`` for every modality: the official value for its reference (audio) modality.
DEFAULT_PROXIMAL_WEIGHT = 0.95
#: The official ``γ``: 0.95 for the reference modality (audio), 0.1 for the other (visual).
OFFICIAL_PROXIMAL_WEIGHTS = (0.95, 0.1)
#: The window is open while ``k > threshold`` (the official code @939b2ed; its first upload used 0.04).
DEFAULT_THRESHOLD = 0.05
#: Epochs over which the window statistic averages the Fisher traces (and zeros padded in front).
DEFAULT_SPAN = 10
#: ``score=``: the batch mean of the true-class confidences, or their batch sum (the official code).
SCORES = ("mean", "sum")
#: ``fisher=``: the gradient the Fisher accumulator squares: the loss's, before the pull (``"task"``), or the
#: gradient after the pull (``"pulled"``, the official code).
FISHER_GRADIENTS = ("task", "pulled")
#: What the history records per modality and step: the score, the window statistic deciding its window, ``β``.
_RECORDED = ("score", "rate", "pull")


def acquisition_rate(traces: Sequence[float], span: int = DEFAULT_SPAN) -> float:
    """The window statistic ``k`` after the epochs whose Fisher traces are ``traces`` (module docstring).

    With ``P`` = ``span`` zeros followed by ``traces``: ``k = (P[−1] − P[−span−1]) / Σ P[−span:]``; ``1`` before
    any epoch (``k_0 = 1``); ``0`` when the sum is 0 (the official code divides by zero there).
    """
    if isinstance(span, bool) or not isinstance(span, int) or span < 1:
        raise ValueError(f"span must be an int >= 1, got {span!r}")
    values = [real_scalar(t, f"Fisher trace of epoch {e}") for e, t in enumerate(traces)]
    if not values:
        return 1.0
    padded = [0.0] * span + values
    total = math.fsum(padded[-span:])
    if total == 0.0:
        return 0.0
    return (padded[-1] - padded[-span - 1]) / total


def fisher_increment(grads: Iterable[Tensor]) -> Tensor:
    """One step's share of the Fisher trace: ``Σ_t mean(g_t²)`` over the gradient tensors (float64, 0-d).

    The official code accumulates ``g ⊙ g`` per weight tensor over the epoch and sums the tensors' means at
    its end; the sum over steps of this increment is the same number.
    """
    terms = [torch.linalg.vector_norm(g.detach(), dtype=torch.float64).square() / g.numel() for g in grads if g.numel()]
    if not terms:
        return torch.zeros((), dtype=torch.float64)
    device = terms[0].device
    return torch.stack([t.to(device) for t in terms]).sum()


def proximal_weights(
    scores: Mapping[str, float], open_windows: Mapping[str, bool], weights: Mapping[str, float]
) -> dict[str, float]:
    """``β_m = γ_m·exp(tanh(Δ_m))`` where ``Δ_m = s_m − mean_{o≠m} s_o > 0`` and ``m``'s window is open, else 0.

    Args:
        scores: ``s_m`` per modality (two or more), finite.
        open_windows: whether each modality's window is open (``k > threshold``).
        weights: ``γ_m ≥ 0`` per modality.
    """
    names = list(scores)
    if len(names) < 2:
        raise ValueError(f"proximal_weights needs two or more modalities, got {names}")
    exact = {name: Fraction(real_scalar(scores[name], f"score of modality {name!r}", minimum=-math.inf)) for name in names}
    total = sum(exact.values())
    betas = {}
    for name in names:
        gap = exact[name] - (total - exact[name]) / (len(names) - 1)  # exact: equal scores lead by exactly 0
        betas[name] = weights[name] * math.exp(math.tanh(float(gap))) if gap > 0 and open_windows[name] else 0.0
    return betas


def inforeg_loss(logits: Tensor, unimodal_logits: Mapping[str, Tensor], target: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """The loss the official loop trains on: ``CE(z, y) + Σ_m CE(z_m, y)``, with ``z`` the fused logits and ``z_m``
    the decoupled ones (the concat head split per modality, ``h_m W_mᵀ + b/M``)."""
    check_logits_target(logits, target, name="logits")
    if not isinstance(unimodal_logits, Mapping) or len(unimodal_logits) < 2:
        raise TypeError("unimodal_logits must be a mapping of two or more modality names to [batch, classes] logits")
    for name, value in unimodal_logits.items():
        check_logits_target(value, target, name=f"unimodal_logits[{name!r}]")
    losses = [F.cross_entropy(z, target, ignore_index=ignore_index) for z in (logits, *unimodal_logits.values())]
    return sum(losses[1:], losses[0])


def _weights(value: float | Mapping[str, float], names: Sequence[str]) -> dict[str, float]:
    if isinstance(value, Mapping):
        unknown = [name for name in value if name not in names]
        missing = [name for name in names if name not in value]
        if unknown or missing:
            raise ValueError(f"proximal_weight must name exactly the modalities {list(names)}: missing {missing}, unknown {unknown}")
        return {name: real_scalar(value[name], f"proximal_weight[{name!r}]") for name in names}
    weight = real_scalar(value, "proximal_weight")
    return dict.fromkeys(names, weight)


class InfoReg(StepHooked, Method):
    """Information-acquisition regulation: a proximal pull on the dominant encoder while its window is open.

    Per epoch ``start_epoch(epoch)`` (takes ``θ⁰``) and ``end_epoch(epoch)`` (closes the epoch's Fisher trace
    and moves the windows); per step ``observe(logits={name: decoupled logits}, target=y)`` and the optimizer
    step, whose pre-hook (`attach`) adds ``β_m (θ − θ⁰)`` to the gradients of each pulled encoder and
    accumulates the Fisher trace (module docstring). For trainers that call the step themselves:
    `check_optimizer` once, then `step` before each ``optimizer.step()``. The official loop's training loss is
    `inforeg_loss` (the fused and the decoupled logits' cross-entropies).

    Args:
        modalities: name → encoder (``nn.Module`` or parameters), two or more, no parameter shared.
        proximal_weight: ``γ ≥ 0`` of ``β = γ·exp(tanh(Δ))``, one number for every modality or one per
            modality; larger pulls harder (the pull's gradient is ``β (θ − θ⁰)``).
        threshold: a window is open while its statistic ``k > threshold``.
        span: epochs the window statistic averages over (`acquisition_rate`).
        score: ``"mean"`` or ``"sum"`` of the true-class confidences over the batch (`SCORES`).
        window: ``None``: each modality's own window; a modality's name: that modality's window opens and
            closes every modality's (the official code: ``"audio"``).
        fisher: ``"task"`` or ``"pulled"`` (`FISHER_GRADIENTS`).
        fisher_filter: which parameters of each encoder the Fisher trace covers (`gradmod.filters`; default
            `gradmod.filters.weights`).
        ignore_index: targets equal to it add nothing to the scores.
        history_size: ``None`` keeps every step in `history`; an int keeps the last ones.

    Under ``torch.distributed`` the scores are summed over the ranks before ``β`` is decided and the Fisher
    traces averaged at `end_epoch` (collectives: every rank steps and ends its epochs), so every replica pulls
    alike.

    The history records every step that had an ``observe``: ``score``, ``rate`` (the ``k`` that decides the
    modality's window) and ``pull`` (``β``) per modality; status ``"outside"`` when no window was open.
    `traces` and `rates` hold the per-epoch statistics. Costs per step: one host synchronisation (the scores)
    and a pass over the pulled encoder's parameters; memory: one copy of the encoders (``θ⁰``).
    """

    kind = "modulator"
    state_version = 1
    #: The loss InfoReg trains on (`loss`): a loop that can give these backwards ``loss(**inputs)``.
    loss_inputs = ("logits", "unimodal_logits", "target")

    def __init__(
        self,
        modalities: Mapping[str, Modality] | nn.ModuleDict,
        *,
        proximal_weight: float | Mapping[str, float] = DEFAULT_PROXIMAL_WEIGHT,
        threshold: float = DEFAULT_THRESHOLD,
        span: int = DEFAULT_SPAN,
        score: str = "mean",
        window: str | None = None,
        fisher: str = "task",
        fisher_filter: ParamFilter | None = filters.weights,
        ignore_index: int | None = IGNORE_INDEX,
        history_size: int | None = None,
    ) -> None:
        if not isinstance(modalities, (Mapping, nn.ModuleDict)) or len(modalities) < 2:
            raise ValueError("modalities must be a mapping of two or more names to encoders (modules or parameter lists)")
        self._selection = ParameterSelection(modalities, None, require_some=True)
        self._fisher_selection = ParameterSelection(modalities, fisher_filter, require_some=False)
        self.names: tuple[str, ...] = self._selection.names
        self.proximal_weight = _weights(proximal_weight, self.names)
        self.threshold = real_scalar(threshold, "threshold", minimum=-math.inf)
        acquisition_rate([], span)  # checks span
        self.span = span
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        if window is not None and window not in self.names:
            raise ValueError(f"window must be None (each modality's own) or one of the modalities {list(self.names)}, got {window!r}")
        if fisher not in FISHER_GRADIENTS:
            raise ValueError(f"fisher must be one of {FISHER_GRADIENTS}, got {fisher!r}")
        self.score, self.window, self.fisher = score, window, fisher
        self.measure = SoftmaxScore(checked_ignore_index(ignore_index))
        self._history = History(self.names, history_size, fields=_RECORDED)
        self._hook = StepHook("InfoReg", self.step, lambda found_inf: self.skip_step())
        self._driven = False
        self._warned: set[str] = set()
        self._clear()

    @classmethod
    def official(cls, modalities: Mapping[str, Modality] | nn.ModuleDict, reference: str | None = None, **options: Any) -> InfoReg:
        """The official code's InfoReg: ``reference`` (default: the first modality, audio there) decides every
        window and gets ``γ = 0.95``, the others ``0.1``; batch-sum scores; the Fisher trace after the pull."""
        names = list(modalities)
        reference = names[0] if reference is None else reference
        if reference not in names:
            raise ValueError(f"reference must be one of the modalities {names}, got {reference!r}")
        high, low = OFFICIAL_PROXIMAL_WEIGHTS
        weights = {name: high if name == reference else low for name in names}
        settings = {"proximal_weight": weights, "window": reference, "score": "sum", "fisher": "pulled", **options}
        return cls(modalities, **settings)

    def _clear(self) -> None:
        """Back to the state before training: no epoch, no anchor, ``k = 1``, nothing pending."""
        self._step = 0
        self._pending: Tensor | None = None
        self._problems: dict[str, Tensor] = {}
        self._observed = 0  # observe() calls since the last step
        self._fisher: Tensor | None = None  # this epoch's trace so far, [M] float64
        self._anchors: list[list[Tensor]] | None = None
        self._traces: dict[str, list[float]] = {name: [] for name in self.names}
        self._rates = dict.fromkeys(self.names, 1.0)
        self._in_epoch = False

    # ------------------------------------------------------------------ properties
    @property
    def params(self) -> dict[str, list[Tensor]]:
        """The parameters of each modality's encoder (all of them are pulled)."""
        return dict(zip(self.names, self._selection.groups()))

    @property
    def step_count(self) -> int:
        """Optimizer steps seen (steps skipped by ``GradScaler`` excluded)."""
        return self._step

    @property
    def traces(self) -> dict[str, list[float]]:
        """The Fisher trace ``T_e`` of every ended epoch, per modality."""
        return {name: list(values) for name, values in self._traces.items()}

    @property
    def rates(self) -> dict[str, float]:
        """The window statistic ``k`` of each modality's own traces for the current epoch (`acquisition_rate`)."""
        return dict(self._rates)

    @property
    def open_windows(self) -> dict[str, bool]:
        """Whether each modality's window is open this epoch."""
        return {name: self._rate_of(name) > self.threshold for name in self.names}

    def _rate_of(self, name: str) -> float:
        return self._rates[self.window or name]

    # ------------------------------------------------------------------ attach
    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """What `attach` checks, for trainers that call `step` themselves: the optimizer steps every encoder. Once
        attached, each ``optimizer.step()`` pulls and accumulates first."""
        name = unheld_modality(optimizer, self.params)
        if name is not None:
            raise ValueError(f"the optimizer holds none of modality {name!r}'s parameters: attach InfoReg to the optimizer that steps the encoders")
        self._driven = True

    # ------------------------------------------------------------------ epochs
    def start_epoch(self, epoch: int) -> None:
        """Take ``θ⁰``, the encoders at the start of this epoch (the official code deep-copies the model here)."""
        if self._in_epoch:
            self._warn_once(
                "no_end_epoch",
                "start_epoch() twice without end_epoch(): the epoch's Fisher trace was not closed, so the windows "
                "do not move; call method.end_epoch(epoch) after every epoch",
                stacklevel=3,
            )
        self._anchors = [[p.detach().clone() for p in params] for params in self._selection.groups()]
        self._in_epoch = True

    def end_epoch(self, epoch: int) -> None:
        """Close the epoch's Fisher trace ``T_e`` of every modality and compute the next epoch's windows."""
        fisher = self._fisher if self._fisher is not None else torch.zeros(len(self.names), dtype=torch.float64)
        if distributed():
            fisher = fisher.to(collective_device(fisher.device))
            dist.all_reduce(fisher, op=dist.ReduceOp.SUM)
            fisher = fisher / dist.get_world_size()
        for name, trace in zip(self.names, fisher.tolist()):
            self._traces[name].append(trace)
            self._rates[name] = acquisition_rate(self._traces[name], self.span)
        empty = [name for name in self.names if math.fsum(([0.0] * self.span + self._traces[name])[-self.span :]) == 0.0]
        if empty:
            self._warn_once(
                "zero_trace",
                f"the Fisher traces of {empty} are 0 over the last {self.span} epochs (no gradient reached the weights "
                "fisher_filter selects): their window statistic k would divide by zero; it is 0 (closed) instead",
                stacklevel=3,
            )
        self._fisher = None
        self._in_epoch = False

    # ------------------------------------------------------------------ observe
    def loss(self, logits: Tensor, unimodal_logits: Mapping[str, Tensor], target: Tensor) -> Tensor:
        """The loss of the official loop (`inforeg_loss`): the fused and every decoupled cross-entropy."""
        return inforeg_loss(logits, unimodal_logits, target, self.measure.ignore_index)

    def observe(self, logits: Mapping[str, Tensor], target: Tensor) -> None:
        """The decoupled logits ``{name: [B, C]}`` and ``[B]`` targets of a batch (micro-batches add up)."""
        evidence = self.measure.evidence(self.names, logits=logits, target=target)
        ignore = self.measure.ignore_index
        counted = target.numel() if ignore is None else (target != ignore).sum()
        device = evidence[self.names[0]].device
        row = torch.stack([*(evidence[name].double() for name in self.names), torch.as_tensor(counted, device=device).double()])
        self._pending = row if self._pending is None else self._pending + row.to(self._pending.device)
        for message, flag in self.measure.problems(self.names, logits=logits, target=target).items():
            self._problems[message] = flag if message not in self._problems else self._problems[message] | flag
        self._observed += 1
        if self._observed >= 2 and not self._driven:
            self._warn_once(
                "not_attached",
                "observe() was called twice without an optimizer step through InfoReg: call method.attach(optimizer) "
                "once (or check_optimizer() and step() before each optimizer.step())",
            )

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self) -> dict[str, float] | None:
        """Before ``optimizer.step()``: accumulate the Fisher trace and add the pull ``β_m (θ − θ⁰)``.

        Returns ``β`` per modality, or ``None`` when the step had no `observe` (warned once).
        """
        groups = self._selection.groups()
        if self._anchors is None:
            self._warn_once(
                "no_start_epoch",
                "optimizer step before start_epoch(): θ⁰ is taken now and the windows never move; call "
                "method.start_epoch(epoch) before every epoch and method.end_epoch(epoch) after it",
            )
            self.start_epoch(0)
        if self.fisher == "task":
            self._accumulate_fisher()
        betas = None
        if self._pending is None:
            if any(self.open_windows.values()):
                self._warn_once("no_observe", "optimizer step without observe() since the last step: not regulated")
        else:
            scores = self._scores()
            if scores is not None:
                betas = proximal_weights(scores, self.open_windows, self.proximal_weight)
                self._pull(groups, betas)
                self._record(scores, betas)
        if self.fisher == "pulled":
            self._accumulate_fisher()
        self._step += 1
        self._drop_pending()
        return betas

    def _scores(self) -> dict[str, float] | None:
        """The step's scores (one host synchronisation), or ``None`` for a step without a counted target."""
        messages = list(self._problems)
        flags = [self._problems[m].to(self._pending.device).double().reshape(1) for m in messages]
        values = torch.cat([self._pending, *flags])
        if distributed():  # every rank pulls with the scores of the global batch
            values = values.to(collective_device(values.device))
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values = values.tolist()
        found = [message for message, flag in zip(messages, values[len(self.names) + 1 :]) if flag]
        if found:
            raise ValueError(f"gradmod InfoReg: {'; '.join(found)}")
        sums, count = values[: len(self.names)], values[len(self.names)]
        if count == 0:
            self._warn_once("degenerate", f"step {self._step} has no counted target (empty batch or every target ignored): not regulated")
            return None
        return {name: s / count if self.score == "mean" else s for name, s in zip(self.names, sums)}

    def _pull(self, groups: list[list[Tensor]], betas: Mapping[str, float]) -> None:
        for name, params, anchors in zip(self.names, groups, self._anchors):
            beta = betas[name]
            if beta == 0.0:
                continue
            if len(params) != len(anchors):
                raise RuntimeError(
                    f"modality {name!r} has {len(params)} parameters, θ⁰ holds {len(anchors)}: the encoder changed "
                    "since start_epoch()"
                )
            for p, anchor in zip(params, anchors):
                if not p.requires_grad:
                    continue
                pull = p.detach() - anchor
                if p.grad is None:
                    p.grad = beta * pull
                else:
                    p.grad.add_(pull, alpha=beta)

    def _accumulate_fisher(self) -> None:
        increments = [fisher_increment(p.grad for p in params if p.grad is not None) for params in self._fisher_selection.groups()]
        device = next((t.device for t in increments if t.device.type != "cpu"), torch.device("cpu"))
        step = torch.stack([t.to(device) for t in increments])
        self._fisher = step if self._fisher is None else self._fisher + step.to(self._fisher.device)

    def _record(self, scores: Mapping[str, float], betas: Mapping[str, float]) -> None:
        rows = [torch.tensor([float(table[name]) for name in self.names]) for table in (scores, {n: self._rate_of(n) for n in self.names}, betas)]
        self._history.append(self._step, rows, in_window=any(self.open_windows.values()))

    def _drop_pending(self) -> None:
        self._pending = None
        self._problems = {}
        self._observed = 0

    def skip_step(self) -> None:
        """The optimizer skips this step (``GradScaler`` found ``inf``): its scores are dropped, nothing is counted."""
        self._drop_pending()

    # ------------------------------------------------------------------ state
    def _extra_state(self) -> dict[str, Any]:
        """θ⁰, the epoch's Fisher trace so far, the traces and windows, the step and what is pending."""
        return {
            "settings": self._settings(),
            "step": self._step,
            "in_epoch": self._in_epoch,
            "anchors": None if self._anchors is None else [[a.detach().cpu().clone() for a in group] for group in self._anchors],
            "fisher": None if self._fisher is None else self._fisher.tolist(),
            "traces": self.traces,
            "rates": self.rates,
            "pending": None if self._pending is None else self._pending.detach().cpu().clone(),
            "problems": {message: flag.detach().cpu().clone() for message, flag in self._problems.items()},
            "observed": self._observed,
            "warned": sorted(self._warned),
        }

    def _settings(self) -> dict[str, Any]:
        return {
            "proximal_weight": dict(self.proximal_weight),
            "threshold": self.threshold,
            "span": self.span,
            "score": self.score,
            "window": self.window,
            "fisher": self.fisher,
        }

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        """The settings must match this InfoReg's; tensors go to the encoders' devices."""
        if dict(state["settings"]) != self._settings():
            raise ValueError(f"state_dict was written with settings {dict(state['settings'])}; this InfoReg has {self._settings()}")
        self._clear()
        groups = self._selection.groups()
        if state["anchors"] is not None:
            self._anchors = [[a.to(p.device, p.dtype).clone() for a, p in zip(saved, params)] for saved, params in zip(state["anchors"], groups)]
        device = next((p.device for params in groups for p in params), torch.device("cpu"))
        self._fisher = None if state["fisher"] is None else torch.tensor(state["fisher"], dtype=torch.float64, device=device)
        self._traces = {name: [float(t) for t in state["traces"][name]] for name in self.names}
        self._rates = {name: float(state["rates"][name]) for name in self.names}
        self._pending = None if state["pending"] is None else state["pending"].to(device).clone()
        self._problems = {message: flag.to(device).clone() for message, flag in state["problems"].items()}
        self._observed = int(state["observed"])
        self._step = int(state["step"])
        self._in_epoch = bool(state["in_epoch"])
        self._warned = set(state["warned"])

    def _reset(self) -> None:
        self._clear()
        self._warned = set()

    def __repr__(self) -> str:
        weights = ", ".join(f"{name}={value:g}" for name, value in self.proximal_weight.items())
        return (
            f"InfoReg(modalities={list(self.names)}, proximal_weight=({weights}), threshold={self.threshold:g}, "
            f"score={self.score!r}, window={self.window!r}, fisher={self.fisher!r})"
        )


METHODS = (
    MethodInfo(
        key="inforeg",
        preset=InfoReg,
        title="InfoReg",
        kind="modulator",
        paper="Huang, Wei, Yang & Hu, Adaptive Unimodal Regulation for Balanced Multimodal Information Acquisition, CVPR 2025",
        page="methods/inforeg.md",
        observes="decoupled logits + target; per epoch: the encoders' Fisher traces",
        cost="per step: the squared norms of the encoders' weight gradients and a pull on the dominant encoder; "
        "one copy of the encoders",
        fit=Fit(head="decoupled", acts_on="gradient direction"),
        strength=Strength("proximal_weight", DEFAULT_PROXIMAL_WEIGHT, "γ of the pull g += γ·exp(tanh(Δ))·(θ − θ⁰) on the dominant encoder"),
        options=(
            Option("threshold", DEFAULT_THRESHOLD, "a modality's window is open while its Fisher-trace statistic k exceeds this", float),
            Option("score", "mean", "batch mean or sum (official) of the true-class confidences", str, SCORES),
            Option("fisher", "task", "square the loss's gradient or the pulled one (official) in the Fisher trace", str, FISHER_GRADIENTS),
        ),
    ),
)
