"""The `Modulator`: named modalities → measure → policy → applier, attached to an optimizer by a hook."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gradmod._backward import BackwardMonitor
from gradmod._hooks import StepHook, StepHooked, unwrapped_optimizer
from gradmod._internal import collective_device, constants, distributed, rank_zero_seed
from gradmod.appliers import Applier, FeaturesApplier, Modality, ParamFilter, make_applier
from gradmod.history import MODULATOR_FIELDS, History
from gradmod.measures import Measure
from gradmod.method import Method
from gradmod.policies import Policy, PolicyError, StackedPolicy, check_coefficients, coefficient_range, range_message

__all__ = ["Modulator", "ParamFilter", "epoch_window", "make_applier"]



def epoch_window(start_epoch: int, end_epoch: int, steps_per_epoch: int) -> tuple[int, int]:
    """``(start_step, stop_step)`` for modulation during epochs ``start_epoch..end_epoch`` *inclusive*.

    The official OGM-GE code modulates while ``modulation_starts <= epoch <= modulation_ends`` (0 and 50):
    ``epoch_window(0, 50, len(loader))``.
    """
    if not 0 <= start_epoch <= end_epoch or steps_per_epoch <= 0:
        raise ValueError(
            f"need 0 <= start_epoch <= end_epoch and steps_per_epoch > 0, got {start_epoch}, {end_epoch}, {steps_per_epoch}"
        )
    return start_epoch * steps_per_epoch, (end_epoch + 1) * steps_per_epoch


def _compiled_nodes(value: Any) -> set[int]:
    """The ids of the ``torch.compile`` graph nodes (AOTAutograd's ``CompiledFunctionBackward``) that produced the
    tensors in ``value`` (a tensor or a nested mapping of them)."""
    if isinstance(value, Mapping):
        return set().union(*(_compiled_nodes(v) for v in value.values())) if value else set()
    node = getattr(value, "grad_fn", None)
    return {id(node)} if node is not None and "CompiledFunction" in type(node).__name__ else set()


def _check_not_inside_one_compiled_graph(features: Mapping[str, Tensor], inputs: Mapping[str, Any]) -> None:
    """Features mode with hooks: refuse features that one compiled graph returned together with the measure's
    inputs. The graph's own use of them (the head inside it) never passes the hooks, so only a gradient from
    outside the graph (an auxiliary loss) would be scaled — and the routing check would pass on it."""
    shared = _compiled_nodes(features) & _compiled_nodes(dict(inputs))
    if shared:
        raise ValueError(
            "observe(features=...) got features that one torch.compile'd graph returned together with the logits it "
            "computed from them: hooks on the returned features see only the gradient from outside the graph, not "
            "the head's inside it. Route the features with mod.scale_grad(feature, name) inside the compiled forward"
        )


def _default_seed() -> int:
    """A noise seed derived from ``torch.initial_seed()``: fixed by ``torch.manual_seed``, drawing nothing."""
    return (torch.initial_seed() * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % (2**63 - 1)


def _from_version_1(state: dict[str, Any]) -> dict[str, Any]:
    """Version 1 kept ``(step, evidence, ratios, coefficients)`` tuples of applied steps (ratios are derived now)
    and one warning flag, ``warned_no_observe``."""
    entries = state.pop("history")
    width = 2 * len(state["names"]) + 3
    rows = [torch.cat([e.float(), c.float(), torch.ones(3)]) for _, e, _, c in entries]  # usable, valid, in window
    state["history"] = {"steps": [int(s) for s, *_ in entries], "rows": torch.stack(rows) if rows else torch.empty(0, width)}
    state["warned"] = ["no_observe"] if state.pop("warned_no_observe", False) else []
    return state


@dataclass
class _Decision:
    """What one step does: its evidence, the coefficients it applies (1 where it applies nothing), its flags.

    Flags are Python bools when decided on the host (``validate=True``) and 0-d bool tensors when decided on
    the device; ``active`` is their conjunction: whether the coefficients reach the gradients.
    """

    evidence: Tensor
    coefficients: Tensor
    usable: bool | Tensor = True
    valid: bool | Tensor = True
    in_window: bool | Tensor = True
    active: bool | Tensor = True

    def record(self, history: History, step: int | Tensor) -> None:
        history.append(step, (self.evidence, self.coefficients), self.usable, self.valid, self.in_window)


class Modulator(StepHooked, Method):
    """Imbalance-aware gradient modulation for named modalities.

    Each optimizer step (through `attach`, or a manual `step`): the evidence gathered by `observe` since
    the last step (summed over micro-batches, and over ``torch.distributed`` ranks) goes through the
    policy to one coefficient ``k_u`` per modality, checked against the policy contract
    (`gradmod.policies`), and the applier puts it onto the gradients (`gradmod.appliers`).

    Use the method presets (`gradmod.OGMGE`, `gradmod.DGM`, …) rather than this constructor.

    Args:
        modalities: name → ``nn.Module`` or iterable of parameters, two or more, no parameter shared.
        measure: turns ``observe()`` inputs into evidence (`gradmod.measures`).
        policy: evidence → coefficients; any callable that keeps the policy contract (`gradmod.policies`).
        apply: ``"params"`` (``ParamsApplier()``: scale parameter gradients, no noise), ``"features"``
            (``FeaturesApplier()``), or an applier; noise, kernel backend and parameter filter are options
            of `gradmod.ParamsApplier`.
        start_step: first modulated optimizer step.
        stop_step: modulation stops before this step (``None``: never); see `epoch_window`.
        seed: seed of the counter-based noise (a step's noise depends only on seed, step and modality).
            ``None``: derived from ``torch.initial_seed()`` without drawing from torch's RNG (so
            ``torch.manual_seed`` fixes it and adding a modulator leaves the rest of a run unchanged), and
            broadcast from rank 0 when ``torch.distributed`` is initialised; the ranks' seeds are compared
            at the first noisy step, and differing seeds raise.
        history_size: ``None`` keeps every step in `history`; an int keeps the last ones (`gradmod.history`).
        validate: check inputs in `observe` and evidence and coefficients in `step` on the host (one host
            synchronisation each; the policy then runs on the host, launching nothing). ``False`` never
            synchronises: the checks run on the device, and a step with degenerate evidence or an out-of-range
            coefficient is left unmodulated and marked in the history, without a warning.
        strict: raise on a degenerate step (a modality's evidence is zero, negative or not finite, e.g. an
            empty batch or a softmax score that underflowed) instead of leaving it unmodulated with a
            warning (shown once). Needs ``validate=True``.
        capture_safe: keep every per-step state on the device — the step counter, the window test, the
            evidence buffer and a ring history (``history_size``, default 65,536 steps) — so that a training
            step with modulation can be captured in a CUDA graph and compiled without graph breaks. Needs
            ``validate=False``; noise then needs the ``"triton"`` kernel (its Philox key reads the device step).
            Steps without evidence are recorded as degenerate, steps outside the window as ``"outside"``; the
            backward-pass checks (discarded evidence, features routed) are off. Run a few steps before
            capturing: the buffers are made at the first step. The step counter lives on the evidence's
            device, so the noisy kernel needs the gradients there too (one device).
    """

    kind = "modulator"
    state_version = 2
    _migrations = {1: _from_version_1}
    #: What the history records per modality (AGM derives its own ratios).
    _history_fields = MODULATOR_FIELDS

    def __init__(
        self,
        modalities: Mapping[str, Modality] | nn.ModuleDict,
        *,
        measure: Measure,
        policy: Policy,
        apply: str | Applier = "params",
        start_step: int = 0,
        stop_step: int | None = None,
        seed: int | None = None,
        history_size: int | None = None,
        validate: bool = True,
        strict: bool = False,
        capture_safe: bool = False,
    ) -> None:
        if not isinstance(modalities, (Mapping, nn.ModuleDict)) or len(modalities) < 2:
            raise ValueError("modalities must be a mapping of two or more names to modules or parameter lists")
        if not isinstance(measure, Measure):
            raise TypeError(f"measure must be a gradmod.measures.Measure, got {type(measure).__name__}")
        if not callable(policy):
            raise TypeError(f"policy must be callable (evidence mapping -> coefficient mapping), got {type(policy).__name__}")
        if start_step < 0 or (stop_step is not None and stop_step < start_step):
            raise ValueError(f"need 0 <= start_step <= stop_step, got {start_step}, {stop_step}")
        if strict and not validate:
            raise ValueError("strict=True raises on degenerate steps, which needs validate=True to see them on the host")
        if capture_safe and validate:
            raise ValueError("capture_safe=True synchronises with the host nowhere: pass validate=False as well")
        self.names: tuple[str, ...] = tuple(modalities)
        self.measure = measure
        self.policy = policy
        self.applier = make_applier(apply)
        self.applier.bind(modalities)
        self.start_step = start_step
        self.stop_step = stop_step
        self.validate = validate
        self.strict = strict
        self.capture_safe = capture_safe
        self.seed = int(seed) if seed is not None else rank_zero_seed(_default_seed())
        self._seeds_checked = False
        self._driven = False  # attached, checked by a trainer, or stepped: someone steps this modulator
        self._step = 0
        self._device_step: Tensor | None = None  # capture-safe: the step counter, on the evidence's device
        self._pending: Tensor | None = None  # the step's evidence so far (capture-safe: one reused buffer)
        self._prepared: _Decision | None = None  # features mode: decided by the last observe()
        self._observed_since_pass = False
        self._warned: set[str] = set()
        self._history = History(self.names, history_size, ring=capture_safe, fields=self._history_fields)
        self._monitor = BackwardMonitor(self._pass_ended)
        if not capture_safe:
            self._monitor.watch(self.applier.parameter_groups())
        self._hook = StepHook("modulator", self.step, self._scaler_skipped, on_device=capture_safe)

    # ------------------------------------------------------------------ set-up
    @property
    def params(self) -> dict[str, list[Tensor]]:
        """The parameters each modality's gradients are modulated on (resolved now)."""
        return dict(zip(self.names, self.applier.parameter_groups()))

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"gradmod: {message} (this warning is shown once)", RuntimeWarning, stacklevel=4)

    # ------------------------------------------------------------------ observe
    @property
    def step_count(self) -> int:
        """Number of optimizer steps seen (modulated or not; steps skipped by ``GradScaler`` excluded).

        Capture-safe modulators read it from the device (a host synchronisation).
        """
        if self._device_step is not None:
            return int(self._device_step.item())
        return self._step

    def in_window(self, step: int | None = None) -> bool:
        """Whether optimizer step ``step`` (default: the next one) is inside ``[start_step, stop_step)``."""
        step = self.step_count if step is None else step
        return self.start_step <= step and (self.stop_step is None or step < self.stop_step)

    def observe(self, *, features: Mapping[str, Tensor] | None = None, **inputs: Any) -> None:
        """Record a batch's evidence for the next optimizer step.

        Call after the forward pass and before ``optimizer.step()`` — in features mode before
        ``backward()``. Inputs depend on the method: ``logits={name: [B, C]}, target=[B]`` (OGM, OGM-GE,
        PDMP), ``scores=``/``logits=`` with a multi-hot or index ``target`` (DGM), ``zeta=``
        (decoupling-free). In features mode, ``features={name: tensor}`` are the tensors whose gradients
        are scaled during backward (or route them with `scale_grad` inside ``forward``).

        Every ``observe()`` before one step adds to that step's evidence (micro-batches: several forwards and
        one summed loss, or one backward each). Evidence whose gradients were discarded without a step —
        ``zero_grad()`` after a step that ``GradScaler`` skipped — is dropped.
        """
        unknown = set(inputs) - set(self.measure.inputs)
        if unknown:
            raise TypeError(f"observe() got unexpected inputs {sorted(unknown)}; {self.measure!r} reads {self.measure.inputs}")
        if features is not None and not self.applier.before_backward:
            self.applier.hook(features)  # raises: only appliers that act during backward take features
        if features is not None:
            _check_not_inside_one_compiled_graph(features, inputs)
        stacked = self._evidence(**inputs)
        if self.capture_safe:
            self._evidence_buffer(stacked.device).add_(stacked.to(self._pending.device, self._pending.dtype))
        else:
            if self._monitor.discarded():  # the gradients of the last pass are gone, and with them their evidence
                self._check_driven()
                self._drop_pending()
            self._pending = stacked if self._pending is None else self._pending + stacked.to(self._pending.device)
            self._observed_since_pass = True
        if self.applier.before_backward:
            self._prepare_features(features)

    def _evidence(self, **inputs: Any) -> Tensor:
        """The measure's evidence as one ``[M]`` float tensor (float32 or wider) in modality order, inputs checked first."""
        if self.validate:
            problems = self.measure.problems(self.names, **inputs)
            if problems:
                device = next(iter(problems.values())).device
                flags = torch.stack([flag.reshape(()).to(device) for flag in problems.values()]).tolist()
                for message, flag in zip(problems, flags):
                    if flag:
                        raise ValueError(message)
        evidence = self.measure.evidence(self.names, **inputs)
        first = evidence[self.names[0]]
        dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        return torch.stack([evidence[name].to(first.device, dtype) for name in self.names])

    def _evidence_buffer(self, device: torch.device) -> Tensor:
        """Capture-safe: the one evidence buffer and the device step counter (made at first use)."""
        if self._pending is None:
            self._pending = torch.zeros(len(self.names), device=device)
            self._device_step = torch.tensor(self._step, dtype=torch.int64, device=device)
        return self._pending

    def _drop_pending(self) -> None:
        self._pending = None
        self._monitor.forget()

    def _pass_ended(self, reached: frozenset[int], discarded: bool) -> None:
        """A backward pass reached the modulated parameters (`gradmod._backward.BackwardMonitor`)."""
        if discarded:  # gradients of an earlier pass were discarded since the last observe(): so is its evidence
            self._drop_pending()
        self.applier.after_pass(reached, self._observed_since_pass, self.in_window())
        self._observed_since_pass = False

    def _prepare_features(self, features: Mapping[str, Tensor] | None) -> None:
        self._prepared = None
        if self.capture_safe or self.in_window():
            self._prepared = self._decide(self._pending)
            self.applier.set_coefficients(self._prepared.coefficients)
        else:
            self.applier.set_coefficients(None)
        if features is not None:
            self.applier.hook(features)

    def scale_grad(self, feature: Tensor, name: str) -> Tensor:
        """``feature`` unchanged, with its gradient scaled by modality ``name``'s coefficient (features mode).

        Call inside ``forward`` on each modality's feature tensor, instead of passing the features to
        `observe`; the coefficient is read during backward, so `observe` may come after the forward pass as
        usual. Traceable by ``torch.compile``.
        """
        if not isinstance(self.applier, FeaturesApplier):
            raise ValueError(f"scale_grad() needs apply='features'; this modulator uses {self.applier!r}")
        return self.applier.scale(feature, name)

    # ------------------------------------------------------------------ policy
    def _all_reduced(self, evidence: Tensor) -> Tensor:
        if self.measure.needs_observe and distributed():
            evidence = evidence.clone()
            dist.all_reduce(evidence, op=dist.ReduceOp.SUM)
        return evidence

    def _decide(self, pending: Tensor | None) -> _Decision:
        """What the step does: the policy called on the step's evidence and its output checked.

        With ``validate=True`` everything is decided on the host (the evidence is read once, the policy runs
        on the host); otherwise on the evidence's device. Raises `PolicyError` (validate=True) before any
        state changes.
        """
        evidence = self._all_reduced(pending) if pending is not None else self._static_evidence()
        if not self.validate:
            return self._decide_on_device(evidence)
        evidence = evidence.detach().cpu()
        values = evidence.tolist()
        degenerate = [name for name, value in zip(self.names, values) if not (math.isfinite(value) and value > 0)]
        if degenerate:
            self._degenerate(degenerate, values)
            return _Decision(evidence, torch.ones(len(self.names)), usable=False, active=False)
        coefficients = self._policy_output(evidence)
        problem = range_message(self.policy, self.names, coefficients.tolist())
        if problem is not None:
            raise PolicyError(problem)
        return _Decision(evidence, coefficients)

    def _decide_on_device(self, evidence: Tensor) -> _Decision:
        coefficients = self._policy_output(evidence)
        _, _, ones, _ = constants(len(self.names), evidence.device, coefficients.dtype)
        usable = (evidence > 0).all()  # NaN evidence is not > 0 either
        active = usable
        valid: bool | Tensor = True
        if not isinstance(self.policy, StackedPolicy):  # values of any other policy are checked here
            low, high = coefficient_range(self.policy)
            valid = torch.isfinite(coefficients).all() & (coefficients >= low).all() & (coefficients <= high).all()
            active = active & valid
        in_window: bool | Tensor = True
        if self.capture_safe:
            self._evidence_buffer(evidence.device)
            step = self._device_step
            in_window = step >= self.start_step
            if self.stop_step is not None:
                in_window = in_window & (step < self.stop_step)
            active = active & in_window
        coefficients = torch.where(active, coefficients, ones)
        return _Decision(evidence, coefficients, usable, valid, in_window, active)

    def _policy_output(self, evidence: Tensor) -> Tensor:
        """The policy's coefficients for ``evidence`` as a ``[M]`` tensor, their structure checked."""
        if isinstance(self.policy, StackedPolicy):
            return self.policy.stacked(evidence, self.names)
        output = self.policy(dict(zip(self.names, evidence.unbind(0))))
        return check_coefficients(output, self.names, self.policy, evidence.device)

    def _static_evidence(self) -> Tensor:
        evidence = self.measure.evidence(self.names)
        return torch.stack([evidence[name].float() for name in self.names])

    def _degenerate(self, names: list[str], values: list[float]) -> None:
        described = ", ".join(f"{name!r} = {value}" for name, value in zip(self.names, values) if name in names)
        message = (
            f"degenerate step {self._step}: the evidence of {described} is not finite and > 0 (e.g. an empty batch, "
            "every target ignored, or a score that underflowed)"
        )
        if self.strict:
            raise ValueError(f"gradmod: {message}")
        self._warn_once("degenerate", f"{message}; such steps are left unmodulated and marked 'degenerate' in the history")

    # ------------------------------------------------------------------ step
    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Run `step` before every ``optimizer.step()``; returns the hook's handle (`detach` removes it).

        Checks the optimizer first (`check_optimizer`). A wrapper that holds a torch optimizer in its
        ``optimizer`` attribute (Accelerate's ``AcceleratedOptimizer``) is attached through that optimizer,
        whose ``step()`` the wrapper calls. One modulator attaches to one optimizer, once. Under
        ``torch.amp.GradScaler`` a step with ``inf``/``NaN`` gradients is skipped by the scaler and not seen
        here (fused optimizers: the hook reads the scaler's ``found_inf`` and skips as well); its evidence is
        dropped. Optimizers whose ``step()`` takes a closure (LBFGS) compute gradients inside ``step()``,
        after the hook: they raise a ``RuntimeError`` at the first step.
        """
        optimizer = unwrapped_optimizer(optimizer)  # not super().attach(): check_optimizer warns at the caller's line
        if self.attached_to is None:
            self.check_optimizer(optimizer)
        return self._hook.attach(optimizer)

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """What `attach` checks, for loops that call `step` themselves (trainer callbacks).

        The optimizer must hold the modulated parameters: none held raises ``ValueError``, some not held
        warns with their names. Also places the applier's buffers on the parameters' current device.
        """
        optimizer = unwrapped_optimizer(optimizer)
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        named = self.applier.named_parameters()
        missing = [f"{name}: {pname}" for name, params in named.items() for pname, p in params if id(p) not in held]
        total = sum(len(params) for params in named.values())
        if total and len(missing) == total:
            raise ValueError(
                "the optimizer holds none of the modulated parameters: attach the modulator to the optimizer that "
                "steps the modalities' encoders"
            )
        if missing:
            shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            warnings.warn(
                f"gradmod: the optimizer does not hold {len(missing)} of the {total} modulated parameters ({shown}); "
                "their gradients are modulated but another optimizer (or none) steps them",
                RuntimeWarning,
                stacklevel=3,
            )
        self.applier.prepare()  # the model may have moved to its device since the modulator was built
        self._driven = True

    def _check_driven(self) -> None:
        """Gradients were used or discarded, and nothing ever stepped this modulator: it was not attached."""
        if not self._driven and self._step == 0:
            self._warn_once(
                "not_attached",
                "the gradients of an observed batch were used or discarded, but this modulator never stepped: it is "
                "not attached to the optimizer, so nothing is modulated; call mod.attach(optimizer) once before "
                "training (or mod.step() before each optimizer.step())",
            )

    def skip_step(self) -> None:
        """The optimizer skips this step (e.g. ``GradScaler`` found ``inf``): drop its evidence, count nothing.

        What the `attach` hook does by itself when it sees a skipped step; for loops that step the
        modulator themselves.
        """
        self._driven = True
        self._drop_pending()
        self._prepared = None

    def _scaler_skipped(self, found_inf: Tensor) -> None:
        """GradScaler skips this step (fused optimizers): so does modulation, and its evidence goes."""
        if self.capture_safe:
            self._step_on_device(skipped=found_inf)
        else:
            self.skip_step()

    @torch.no_grad()
    def step(self) -> dict[str, Tensor] | None:
        """Modulate the current gradients and advance the step counter.

        Returns the coefficients applied, or ``None`` when this step was not modulated: outside the
        window, without a fresh `observe` (warned once), or degenerate (warned once; see ``strict``).
        On `PolicyError` nothing changes: gradients, step counter and pending evidence stay as they were.
        Capture-safe modulators always return the coefficients (1 where the step applied nothing).
        """
        self.applier.check()
        self._driven = True
        if self.capture_safe:
            return self._step_on_device()
        step = self._step
        if not self.in_window(step) or (self._pending is None and self.measure.needs_observe):
            if self.in_window(step):
                self._warn_once("no_observe", "optimizer step without observe() since the last step: not modulated")
            self._finish_step()
            return None
        if self.applier.before_backward:
            decision = self._prepared
            if decision is None:  # features mode, static evidence, no observe() to place the hooks
                self._warn_once("no_observe", "optimizer step without observe() since the last step: not modulated")
                self._finish_step()
                return None
        else:
            decision = self._decide(self._pending)
            self._check_seeds(decision.evidence.device)
            if decision.active is not False:
                active = decision.active if isinstance(decision.active, Tensor) else None
                self.applier.apply(decision.coefficients, step, self.seed, active=active)
        decision.record(self._history, step)
        self._finish_step()
        if decision.active is False:
            return None
        return dict(zip(self.names, decision.coefficients.unbind(0)))

    def _step_on_device(self, skipped: Tensor | None = None) -> dict[str, Tensor]:
        """A capture-safe step: no host synchronisation, no per-step Python state (``skipped``: GradScaler's
        ``found_inf``, which leaves the gradients and the step counter as they are)."""
        pending = self._evidence_buffer(self._parameters_device())
        decision = self._prepared if self.applier.before_backward and self._prepared is not None else self._decide(pending)
        if not self.applier.before_backward:
            active = decision.active if skipped is None else decision.active & (skipped == 0)
            self.applier.apply(decision.coefficients, self._device_step, self.seed, active=active)
        decision.record(self._history, self._device_step)
        pending.zero_()
        self._device_step.add_(1 if skipped is None else (skipped == 0).to(torch.int64))
        self._prepared = None  # consumed: a replayed graph reads the tensors it captured, not this attribute
        self.applier.finish_step()
        return dict(zip(self.names, decision.coefficients.unbind(0)))

    def _parameters_device(self) -> torch.device:
        for params in self.applier.parameter_groups():
            for p in params:
                return p.device
        return torch.device("cpu")

    def _finish_step(self) -> None:
        self._step += 1
        self._pending = None
        self._prepared = None
        self._monitor.forget()
        self._monitor.watch(self.applier.parameter_groups())
        self.applier.finish_step()

    def _check_seeds(self, device: torch.device) -> None:
        """Once, under ``torch.distributed`` with noise: every rank must hold the same seed (or noise differs)."""
        if self._seeds_checked or not self.applier.draws_noise or not distributed():
            return
        self._seeds_checked = True
        bounds = torch.tensor([self.seed, -self.seed], dtype=torch.int64, device=collective_device(device))
        dist.all_reduce(bounds, op=dist.ReduceOp.MAX)
        if bounds[0].item() != -bounds[1].item():
            raise RuntimeError(
                "gradmod: the ranks hold different noise seeds, so replicas would draw different noise: the modulator "
                "was built before torch.distributed.init_process_group with per-rank torch seeds (or seed= differs). "
                "Build it after init_process_group, or pass the same seed= on every rank"
            )

    # ------------------------------------------------------------------ history and state
    @property
    def history(self) -> list[dict[str, Any]]:
        """The recorded steps, oldest first: ``{"step", "status", "evidence", "ratios", "coefficients"}``.

        Every step inside the window that had evidence is recorded (capture-safe modulators: every step),
        with status ``"applied"``, ``"degenerate"``, ``"invalid"`` or ``"outside"``
        (`gradmod.history.STATUSES`). Values are Python floats per modality; reading synchronises with the
        device once.
        """
        return self._history.records()

    def _reset(self) -> None:
        """Forget pending evidence and the step counter (the noise restarts with the counter), policy state
        that can be reset (AGM's running means) and the warnings shown."""
        self._step = 0
        if self.capture_safe:
            self._set_device_state(0, None)
        else:
            self._drop_pending()
        self._prepared = None
        self._warned.clear()
        if hasattr(self.policy, "reset"):
            self.policy.reset()

    def _set_device_state(self, step: int, pending: Tensor | None) -> None:
        """Capture-safe: write the step counter and the evidence buffer in place (their tensors stay)."""
        if self._device_step is None:
            return
        self._device_step.fill_(step)
        if pending is None:
            self._pending.zero_()
        else:
            self._pending.copy_(pending)

    def state_dict(self) -> dict[str, Any]:
        """Everything that changes results: step counter, seed (noise is counter-based), pending evidence,
        history, policy state (PDMP's ranking); with a ``"version"`` key."""
        return super().state_dict()

    def _extra_state(self) -> dict[str, Any]:
        pending = self._pending
        if pending is not None and self.capture_safe and not bool(pending.any()):
            pending = None
        state: dict[str, Any] = {
            "step": self.step_count,
            "seed": self.seed,
            "pending": None if pending is None else pending.detach().to("cpu", copy=True),
            "warned": sorted(self._warned),
        }
        if hasattr(self.policy, "state_dict"):
            state["policy"] = self.policy.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict` (any earlier version); the modality names must match."""
        super().load_state_dict(state)

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        if "policy" in state:
            if not hasattr(self.policy, "load_state_dict"):
                raise ValueError(f"state_dict holds policy state, but {self.policy!r} has no load_state_dict()")
            self.policy.load_state_dict(state["policy"])
        self._step = int(state["step"])
        self.seed = int(state["seed"])
        pending = None if state["pending"] is None else state["pending"].float()
        if self.capture_safe and (self._device_step is not None or pending is not None):
            self._evidence_buffer(self._parameters_device())  # a fresh modulator makes its buffers now
            self._set_device_state(self._step, None if pending is None else pending.to(self._pending.device))
        else:
            self._pending = None if pending is None else pending.clone()
        self._prepared = None
        self._monitor.forget()
        self._warned = set(state["warned"])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(modalities={list(self.names)}, measure={self.measure!r}, policy={self.policy!r}, "
            f"apply={self.applier!r}, window=[{self.start_step}, {self.stop_step}))"
        )
