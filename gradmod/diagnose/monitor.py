"""The passive monitor: what a modulator would measure at every optimizer step, with nothing changed.

`Monitor` takes the inputs of a modulator's ``observe`` (decoupled logits and target for OGM's score,
`gradmod.measures.SoftmaxScore`; DGM's scores, `gradmod.methods.dgm.DGMScore`; the fusion gate ζ,
`gradmod.methods.decoupling_free.ZetaGate`) and is attached the same way (``attach(optimizer)``, or
``check_optimizer`` + ``step()`` from a trainer callback). At every optimizer step it records, per modality:

* ``evidence`` — the measure's evidence summed over the batches observed since the last step, and
  ``ratios`` — ``ρ_u = e_u / mean_{v≠u} e_v`` (`gradmod.functional.discrepancy_ratios`): the modality with
  ``ρ > 1`` is the one OGM-type methods would damp;
* ``grad_norm`` ``‖g_u‖``, ``weight_norm`` ``‖w_u‖`` and ``grad_to_weight`` ``‖g_u‖/‖w_u‖`` over the
  encoder's parameters that hold a gradient at that step (the Greedy-learner paper's learning speed
  ``Σ‖∇θ‖² / Σ‖θ‖²`` is the square of this ratio), and ``share`` — each encoder's share of
  ``Σ_v ‖g_v‖/‖w_v‖``.

It reads gradients and never writes them, draws no random number, and stays on the device: per step one
multi-tensor norm over the gradients and weights (``torch._foreach_norm``) and five small operations,
and one row written into the `gradmod.history.History`; no host synchronisation until the history (or
`Monitor.scalars`, or `Monitor.end_epoch`) is read; ``every=k`` records one step in ``k`` and does nothing
at the others. ``end_epoch(epoch)`` averages the epoch's recorded steps (`Monitor.epochs`): the per-epoch
curves of `gradmod.diagnose.Diagnosis.figure`.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from gradmod._hooks import StepHook, StepHooked, unheld_modality, unwrapped_optimizer
from gradmod.appliers import Modality, ParameterSelection
from gradmod.functional import ratios_of
from gradmod.history import Derived, History
from gradmod.measures import Measure, SoftmaxScore
from gradmod.method import Method, check_units
from gradmod.sharded import is_dtensor

__all__ = ["MONITOR_FIELDS", "Monitor", "shares_of"]

#: Column blocks of a monitor's history row, in order (each one value per modality).
_STORED = ("evidence", "grad_norm", "weight_norm", "grad_to_weight")
#: The fields `Monitor.scalars` and the epoch summaries report.
_SUMMARISED = ("ratios", "grad_to_weight", "share", "grad_norm")


def shares_of(values: Tensor) -> Tensor:
    """Each modality's share of the sum over modalities, ``x_u / Σ_v x_v``, along the last axis."""
    return values / values.sum(-1, keepdim=True)


#: A monitor's history fields: the evidence and norms stored, the score ratios and shares derived.
MONITOR_FIELDS = (
    "evidence",
    Derived("ratios", "evidence", ratios_of),
    "grad_norm",
    "weight_norm",
    "grad_to_weight",
    Derived("share", "grad_to_weight", shares_of),
)


class Monitor(StepHooked, Method):
    """Per-step imbalance measurements of a training loop that change nothing (module docstring).

    Driven as a modulator (``kind = "modulator"``): ``attach(optimizer)`` once, ``observe(...)`` after each
    forward pass with the measure's inputs, ``start_epoch``/``end_epoch`` around epochs. Attach it *after*
    a modulator on the same optimizer to see the gradients the optimizer applies (hooks run in the order
    they were attached); before it, to see the unmodulated ones.

    Args:
        modalities: name → encoder (``nn.Module``) or its parameters, two or more, no parameter shared.
        measure: what ``observe`` reads (`gradmod.measures.SoftmaxScore`, the default, for decoupled logits
            and a target; `gradmod.methods.dgm.DGMScore`; `gradmod.methods.decoupling_free.ZetaGate`), or
            ``None`` to record the gradient norms only (then ``observe`` is not called).
        every: record every this many optimizer steps (steps ``0, every, 2·every, …``); between them
            ``observe`` and ``step`` do nothing but count. ``1`` (default) records every step.
        history_size: ``None`` keeps every recorded step; an int keeps the last ones (`gradmod.history`).
        validate: check the observed values (NaN logits, targets out of range) at every ``observe``, with
            one host synchronisation each. ``False`` (default) never synchronises: bad values show up as
            non-finite evidence, reported by a warning at ``end_epoch``.

    Under ``torch.distributed`` every rank records its own batches and its own (for FSDP: local shard)
    gradients, with no collective. A step that ``GradScaler`` skips records nothing (with a non-fused
    optimizer it never reaches the hook, and its evidence joins the next step's).
    """

    kind = "modulator"
    state_version = 1

    def __init__(
        self,
        modalities: Mapping[str, Modality] | nn.ModuleDict,
        *,
        measure: Measure | None = SoftmaxScore(),  # noqa: B008 - stateless, never mutated
        every: int = 1,
        history_size: int | None = None,
        validate: bool = False,
    ) -> None:
        if not isinstance(modalities, (Mapping, nn.ModuleDict)):
            raise TypeError(f"modalities must be a mapping name -> encoder or parameters, got {type(modalities).__name__}")
        self.names = check_units(tuple(modalities), "modalities")
        if measure is not None and not isinstance(measure, Measure):
            raise TypeError(f"measure must be a gradmod.measures.Measure or None, got {type(measure).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1 (record every this many optimizer steps), got {every!r}")
        self.measure = measure
        self.every = every
        self.validate = bool(validate)
        self._selection = ParameterSelection(modalities, None, require_some=True)
        self._history = History(self.names, history_size, fields=MONITOR_FIELDS)
        self._hook = StepHook("monitor", self.step, lambda found_inf: self.skip_step())
        self._optimizer: weakref.ReferenceType | None = None  # for a fused optimizer's grad_scale
        self._layout: tuple[Any, list[Tensor], Tensor, bool] | None = None  # see _norms
        self._step = 0
        self._pending: Tensor | None = None
        self._epoch_start = 0
        self._epochs: list[dict[str, Any]] = []
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ attaching
    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """What `attach` checks, for trainer callbacks that call `step` themselves: the optimizer steps every
        monitored encoder (a modality it holds no trainable parameter of raises ``ValueError``)."""
        name = unheld_modality(optimizer, self.params)
        if name is not None:
            raise ValueError(
                f"the optimizer holds none of modality {name!r}'s parameters: attach the monitor to the "
                "optimizer that steps the encoders"
            )
        self._optimizer = weakref.ref(unwrapped_optimizer(optimizer))

    @property
    def params(self) -> dict[str, list[Tensor]]:
        """The parameters of each modality (resolved now)."""
        return dict(zip(self.names, self._selection.groups()))

    @property
    def recording(self) -> bool:
        """Whether the next optimizer step is recorded (``every``): a loop may skip computing the inputs of
        `observe` when it is not."""
        return self._step % self.every == 0

    @property
    def step_count(self) -> int:
        """How many optimizer steps the monitor has seen (recorded or not, see ``every``)."""
        return self._step

    # ------------------------------------------------------------------ per step
    def observe(self, **inputs: Any) -> None:
        """Add a batch's evidence to the next step's: the measure's inputs (``logits={name: [B, C]},
        target=[B]`` for the default `gradmod.measures.SoftmaxScore`), as a modulator's ``observe``."""
        if self.measure is None:
            raise TypeError("this Monitor has measure=None and records gradient norms only: do not call observe()")
        unknown = set(inputs) - set(self.measure.inputs)
        if unknown:
            raise TypeError(f"observe() got unexpected inputs {sorted(unknown)}; {self.measure!r} reads {self.measure.inputs}")
        if not self.recording:
            return
        if self.validate:
            problems = self.measure.problems(self.names, **inputs)
            if problems:
                flags = torch.stack([flag.reshape(()).cpu() for flag in problems.values()]).tolist()
                bad = [message for message, flag in zip(problems, flags) if flag]
                if bad:
                    raise ValueError(bad[0])
        evidence = self.measure.evidence(self.names, **inputs)
        first = evidence[self.names[0]]
        stacked = torch.stack([evidence[name].detach().to(first.device, torch.float32) for name in self.names])
        self._pending = stacked if self._pending is None else self._pending + stacked.to(self._pending.device)

    def skip_step(self) -> None:
        """The optimizer skips this step (``GradScaler`` found ``inf``): drop its evidence, record nothing."""
        self._pending = None

    @torch.no_grad()
    def step(self) -> None:
        """Record the current step: the pending evidence and the gradient and weight norms (no host sync)."""
        if not self.recording:
            self._step += 1
            return
        grad_norm, weight_norm = self._norms()
        if self._pending is None:
            if self.measure is not None:
                self._warn_once(
                    "no_observe",
                    f"optimizer step {self._step} without observe() since the last step: its score ratios are not "
                    "recorded; call monitor.observe(...) after each forward pass",
                )
            evidence, observed = torch.full_like(grad_norm, math.nan), False
        else:
            evidence, observed = self._pending, True
        self._history.append(self._step, (evidence, grad_norm, weight_norm, grad_norm / weight_norm), usable=observed)
        self._pending = None
        self._step += 1

    def _norms(self) -> tuple[Tensor, Tensor]:
        """``(‖g_u‖, ‖w_u‖)`` per modality, ``[M]`` float32 each, over the parameters holding a gradient.

        One ``_foreach_norm`` over those gradients and weights, a stack, a square, one product with a
        ``[2P, 2M]`` 0/1 matrix that sums each modality's squares, a square root; the matrix and the flat
        parameter list are kept until the parameters or the set holding a gradient change.
        """
        groups = self._selection.groups()
        params = [p for group in groups for p in group]
        grads = [p.grad for p in params]
        present = [i for i, g in enumerate(grads) if g is not None]
        key = (tuple(map(id, params)), len(present) if len(present) == len(params) else tuple(present))
        if self._layout is None or self._layout[0] != key:
            self._layout = self._build_layout(key, groups, present)
        _, chosen, assign, mixed = self._layout
        if not chosen:
            zeros = torch.zeros(len(self.names), device=assign.device)
            return zeros, zeros
        tensors = [grads[i] for i in present] + chosen
        if mixed:  # FSDP2 (each rank's shard) or parameters on several devices
            tensors = [t.to_local() if is_dtensor(t) else t for t in tensors]
        norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
        if mixed:
            norms = [n.to(assign.device) for n in norms]
        sums = (torch.stack(norms).square() @ assign).sqrt()
        m = len(self.names)
        grad_norm, weight_norm = sums[:m], sums[m:]
        scale = self._grad_scale()
        if scale is not None:  # fused optimizers under GradScaler see scaled gradients in the hook
            grad_norm = grad_norm / scale.to(grad_norm.device, torch.float32)
        return grad_norm, weight_norm

    def _build_layout(self, key: Any, groups: list[list[Tensor]], present: list[int]) -> tuple[Any, list[Tensor], Tensor, bool]:
        owner = [u for u, group in enumerate(groups) for _ in group]
        params = [p for group in groups for p in group]
        chosen = [params[i] for i in present]
        device = chosen[0].device if chosen else params[0].device
        m, count = len(self.names), len(chosen)
        assign = torch.zeros(2 * count, 2 * m, device=device)
        for row, i in enumerate(present):
            assign[row, owner[i]] = 1.0
            assign[count + row, m + owner[i]] = 1.0
        mixed = any(is_dtensor(p) for p in chosen) or len({p.device for p in chosen}) > 1
        return key, chosen, assign, mixed

    def _grad_scale(self) -> Tensor | None:
        optimizer = None if self._optimizer is None else self._optimizer()  # set by check_optimizer (and attach)
        scale = getattr(optimizer, "grad_scale", None)
        return scale if isinstance(scale, Tensor) else None

    # ------------------------------------------------------------------ epochs
    def start_epoch(self, epoch: int) -> None:
        """The steps from now on belong to epoch ``epoch`` (`end_epoch` summarises them)."""
        self._epoch_start = self._step

    def end_epoch(self, epoch: int) -> None:
        """Summarise the steps since `start_epoch` (or the last `end_epoch`): their means per modality
        (non-finite values left out), appended to `epochs`. Reads the history once (a host synchronisation).
        Warns when no step was recorded, when no gradient reached a modality, or when evidence was not finite.
        """
        summary = self._summary(self._epoch_start, epoch)
        self._epoch_start = self._step
        if summary is None:
            self._warn_once(
                "no_step",
                f"end_epoch({epoch}) but no optimizer step was recorded since the epoch started: attach the monitor "
                "(monitor.attach(optimizer)) or call monitor.step() before each optimizer step"
                + (f"; every={self.every} may exceed the epoch's steps" if self.every > 1 else ""),
            )
        else:
            self._epochs.append(summary)

    def summary(self) -> dict[str, Any] | None:
        """Means over every recorded step (as an `epochs` entry, with ``"epoch": None``), or ``None`` before
        the first step. One host synchronisation."""
        return self._summary(0, None)

    def _summary(self, start: int, epoch: int | None) -> dict[str, Any] | None:
        state = self._history.state_dict()
        chosen = [row for row, step in enumerate(state["steps"]) if step >= start]
        if not chosen:
            return None
        where = "the recorded steps" if epoch is None else f"epoch {epoch}"
        rows = state["rows"][chosen].double()
        m = len(self.names)
        stored = {name: rows[:, k * m : (k + 1) * m] for k, name in enumerate(_STORED)}
        observed = rows[:, len(_STORED) * m] > 0
        columns = {
            "ratios": ratios_of(stored["evidence"][observed]),
            "grad_to_weight": stored["grad_to_weight"],
            "share": shares_of(stored["grad_to_weight"]),
            "grad_norm": stored["grad_norm"],
        }
        for u, name in enumerate(self.names):
            if bool((stored["grad_norm"][:, u] == 0).all()):
                self._warn_once(
                    f"no_gradient_{name}",
                    f"no gradient reached modality {name!r}'s parameters in {where}: is its encoder in the loss, "
                    "and are its parameters the monitored ones?",
                )
            bad = int((~torch.isfinite(stored["evidence"][observed][:, u])).sum())
            if bad:
                self._warn_once(
                    f"bad_evidence_{name}",
                    f"the evidence of modality {name!r} was not finite at {bad} observed step(s) of {where} "
                    "(NaN or inf logits?); Monitor(validate=True) raises at the batch",
                )
        summary: dict[str, Any] = {"epoch": epoch, "steps": len(chosen), "observed": int(observed.sum())}
        for field, values in columns.items():
            finite = torch.where(torch.isfinite(values), values, math.nan)
            means = finite.nanmean(0) if finite.numel() else torch.full((m,), math.nan, dtype=torch.float64)
            summary[field] = dict(zip(self.names, means.tolist()))
        return summary

    @property
    def epochs(self) -> list[dict[str, Any]]:
        """One summary per `end_epoch`: ``{"epoch", "steps", "observed", "ratios", "grad_to_weight", "share",
        "grad_norm"}``, each field ``{modality: mean over the epoch's steps}`` (``NaN`` where none was finite)."""
        return [dict(summary) for summary in self._epochs]

    # ------------------------------------------------------------------ reading
    def scalars(self) -> dict[str, float]:
        """The last step flattened for a logger: ``{"<field>/<modality>": value}`` for the score ratios, the
        norm ratios and shares and the gradient norms (finite values only). Reads the last row (one host sync)."""
        record = self.last
        if record is None:
            return {}
        return {
            f"{field}/{name}": float(value)
            for field in _SUMMARISED
            for name, value in record[field].items()
            if math.isfinite(value)
        }

    def epoch_scalars(self) -> dict[str, float]:
        """The last epoch summary flattened for a logger: ``{"epoch_<field>/<modality>": mean}``."""
        if not self._epochs:
            return {}
        last = self._epochs[-1]
        return {
            f"epoch_{field}/{name}": float(value)
            for field in _SUMMARISED
            for name, value in last[field].items()
            if math.isfinite(value)
        }

    # ------------------------------------------------------------------ state
    def _extra_state(self) -> dict[str, Any]:
        return {
            "step": self._step,
            "pending": None if self._pending is None else self._pending.detach().to("cpu", copy=True),
            "epoch_start": self._epoch_start,
            "epochs": self.epochs,
            "warned": sorted(self._warned),
        }

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self._step = int(state["step"])
        self._pending = None if state["pending"] is None else torch.as_tensor(state["pending"]).float().clone()
        self._epoch_start = int(state["epoch_start"])
        self._epochs = [dict(summary) for summary in state["epochs"]]
        self._warned = set(state["warned"])

    def _reset(self) -> None:
        self._step = 0
        self._pending = None
        self._epoch_start = 0
        self._epochs = []
        self._warned = set()

    def __repr__(self) -> str:
        every = "" if self.every == 1 else f", every={self.every}"
        return f"Monitor(modalities={list(self.names)}, measure={self.measure!r}{every})"
