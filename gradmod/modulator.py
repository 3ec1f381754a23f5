"""The `Modulator`: named modalities → measure → policy → apply, attached to an optimizer by a hook."""

from __future__ import annotations

import math
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gradmod import functional as F
from gradmod.kernels import BACKENDS, get_kernel
from gradmod.measures import Measure

__all__ = ["Modulator", "ParamFilter", "epoch_window"]

#: ``param_filter(name, parameter) -> bool`` selects the parameters of a modality to modulate.
ParamFilter = Callable[[str, nn.Parameter], bool]
Policy = Callable[[Mapping[str, Tensor]], dict[str, Tensor]]
Modality = nn.Module | Iterable[Tensor]

APPLY_MODES = ("params", "features")


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


def _named_parameters(modality: Modality) -> list[tuple[str, nn.Parameter]]:
    if isinstance(modality, nn.Module):
        return list(modality.named_parameters())
    if isinstance(modality, Tensor):
        raise TypeError("a modality must be an nn.Module or an iterable of parameters, not a single tensor")
    return [(str(i), p) for i, p in enumerate(modality)]


class Modulator:
    """Imbalance-aware gradient modulation for named modalities.

    Each optimizer step (through `attach`, or a manual `step`): the evidence gathered by
    `observe` since the last step goes through the policy to one coefficient ``k_u`` per modality,
    and ``apply`` puts it onto the gradients:

    * ``apply="params"`` — every selected parameter gradient of modality ``u`` becomes
      ``k_u·g + ε``, ``ε ~ N(0, (c_u·(σ(g)+1e-8))²)`` with ``c_u`` from ``noise`` (see
      `gradmod.functional.noise_scale`; ``noise=None``: no ε);
    * ``apply="features"`` — `observe` hooks the modality's feature tensor so the gradient leaving
      it is scaled by ``k_u`` inside backward (every encoder parameter gets ``k_u·g``, no extra pass, no noise).

    Use the method presets (`gradmod.OGMGE`, `gradmod.DGM`, …) rather than this constructor.

    Args:
        modalities: name → ``nn.Module`` or iterable of parameters, two or more, no parameter shared.
        measure: turns ``observe()`` inputs into evidence (`gradmod.measures`).
        policy: evidence → coefficients (`gradmod.policies`).
        noise: ``None``, ``"ge"``, ``"restore"`` or ``"paper"``; ``apply="params"`` only.
        apply: ``"params"`` or ``"features"``.
        param_filter: ``(name, parameter) -> bool``; default: every parameter that requires grad.
        start_step: first modulated optimizer step.
        stop_step: modulation stops before this step (``None``: never); see `epoch_window`.
        backend: kernel for ``apply="params"``: ``"auto"``, ``"reference"``, ``"foreach"``, ``"triton"``.
        seed: seed of the counter-based noise (a step's noise depends only on seed, step and modality); ``None``
            draws one from torch's global RNG (rank 0's under ``torch.distributed``, broadcast so every replica
            draws the same noise).
        history_size: how many steps `history` keeps.
        validate: check inputs and evidence in `observe` (one host sync per call); ``False`` never syncs,
            and degenerate evidence (zero, negative) then gives coefficients that are still finite and in the
            policy's range (e.g. OGM: evidence 0 for one modality damps the other to k = 0) instead of an error.
    """

    def __init__(
        self,
        modalities: Mapping[str, Modality] | nn.ModuleDict,
        *,
        measure: Measure,
        policy: Policy,
        noise: str | None = None,
        apply: str = "params",
        param_filter: ParamFilter | None = None,
        start_step: int = 0,
        stop_step: int | None = None,
        backend: str = "auto",
        seed: int | None = None,
        history_size: int = 10_000,
        validate: bool = True,
    ) -> None:
        if not isinstance(modalities, (Mapping, nn.ModuleDict)) or len(modalities) < 2:
            raise ValueError("modalities must be a mapping of two or more names to modules or parameter lists")
        if apply not in APPLY_MODES:
            raise ValueError(f"apply must be one of {APPLY_MODES}, got {apply!r}")
        if noise is not None and noise not in F.NOISE_KINDS:
            raise ValueError(f"noise must be None or one of {F.NOISE_KINDS}, got {noise!r}")
        if apply == "features" and noise is not None:
            raise ValueError("apply='features' adds no noise: use apply='params' for noise, or noise=None")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        if start_step < 0 or (stop_step is not None and stop_step < start_step):
            raise ValueError(f"need 0 <= start_step <= stop_step, got {start_step}, {stop_step}")
        if history_size < 1:
            raise ValueError(f"history_size must be >= 1, got {history_size}")
        self.names: tuple[str, ...] = tuple(modalities)
        self.measure = measure
        self.policy = policy
        self.noise = noise
        self.apply = apply
        self.start_step = start_step
        self.stop_step = stop_step
        self.backend = backend
        self.validate = validate
        self.params = self._select_parameters(modalities, param_filter)
        self.seed = self._shared_seed(seed)
        self._generators: dict[str, torch.Generator] = {}
        self._step = 0
        self._pending: Tensor | None = None
        # features mode: the (all-reduced evidence, coefficients) that observe() hooked for the next step
        self._hooked: tuple[Tensor, dict[str, Tensor]] | None = None
        self._warned_no_observe = False
        self._history: deque[tuple[int, Tensor, Tensor, Tensor]] = deque(maxlen=history_size)

    # ------------------------------------------------------------------ set-up
    def _select_parameters(
        self, modalities: Mapping[str, Modality], param_filter: ParamFilter | None
    ) -> dict[str, list[nn.Parameter]]:
        owner: dict[int, tuple[str, str]] = {}
        selected: dict[str, list[nn.Parameter]] = {}
        for modality, source in modalities.items():
            chosen = []
            for pname, p in _named_parameters(source):
                if not isinstance(p, Tensor):
                    raise TypeError(f"modality {modality!r}: {pname!r} is a {type(p).__name__}, not a parameter")
                if id(p) in owner:
                    other, other_name = owner[id(p)]
                    raise ValueError(
                        f"parameter {pname!r} of modality {modality!r} is also {other_name!r} of modality "
                        f"{other!r}: a parameter can belong to one modality only"
                    )
                owner[id(p)] = (modality, pname)
                if p.requires_grad and (param_filter is None or param_filter(pname, p)):
                    chosen.append(p)
            if not chosen and self.apply == "params":
                raise ValueError(f"modality {modality!r} has no parameter to modulate (after param_filter)")
            selected[modality] = chosen
        return selected

    @staticmethod
    def _shared_seed(seed: int | None) -> int:
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
            if dist.is_available() and dist.is_initialized():
                shared = [seed]
                dist.broadcast_object_list(shared, src=0)
                seed = shared[0]
        return int(seed)

    def _generator(self, device: torch.device, step: int, modality: int) -> torch.Generator:
        """The device's generator, re-seeded from ``(seed, step, modality)``: counter-based noise.

        The noise of a step is a pure function of the seed and the step counter, so a resumed run, a
        replica on another rank or another GPU, and an uninterrupted run all draw the same noise, and
        there is no generator state to save.
        """
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device)
        stream = (self.seed * 1_000_003 + step * len(self.names) + modality) % (2**63 - 1)
        return self._generators[key].manual_seed(stream)

    # ------------------------------------------------------------------ observe
    @property
    def step_count(self) -> int:
        """Number of optimizer steps seen (modulated or not; skipped ``inf`` steps excluded)."""
        return self._step

    def in_window(self, step: int | None = None) -> bool:
        """Whether optimizer step ``step`` (default: the next one) is inside ``[start_step, stop_step)``."""
        step = self._step if step is None else step
        return self.start_step <= step and (self.stop_step is None or step < self.stop_step)

    def _gradients_cleared(self) -> bool:
        return all(p.grad is None for params in self.params.values() for p in params)

    def observe(self, *, features: Mapping[str, Tensor] | None = None, **inputs: Any) -> None:
        """Record a batch's evidence for the next optimizer step.

        Call after the forward pass and before ``optimizer.step()``. Inputs depend on the method:
        ``logits={name: [B, C]}, target=[B]`` (OGM, OGM-GE, PDMP), ``scores=``/``logits=`` with a multi-hot or
        index ``target`` (DGM), ``zeta=`` (decoupling-free). With ``apply="features"``, also
        ``features={name: tensor}``: the tensors whose gradients are scaled during backward.

        Several calls before one step (gradient accumulation) add their evidence up. Evidence left by a
        step that never happened (e.g. skipped by ``GradScaler``) is dropped once the gradients it belonged
        to are gone: when every modulated parameter's ``.grad`` is ``None`` at the next ``observe()``.
        """
        unknown = set(inputs) - set(self.measure.inputs)
        if unknown:
            raise TypeError(f"observe() got unexpected inputs {sorted(unknown)}; {self.measure!r} reads {self.measure.inputs}")
        if self.apply == "features" and features is None:
            raise ValueError("apply='features' needs observe(..., features={name: feature_tensor})")
        if self.apply == "params" and features is not None:
            raise ValueError("features= is only used with apply='features'")
        stacked, problems = self._evidence(**inputs)
        if self.validate:
            self._check(stacked, problems)
        if self._pending is not None and self._gradients_cleared():
            self._pending = None
        self._pending = stacked if self._pending is None else self._pending + stacked.to(self._pending.device)
        if self.apply == "features":
            self._hook_features(features)

    def _evidence(self, **inputs: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """The measure's evidence as one ``[M]`` float tensor in modality order, and its problem flags."""
        evidence, problems = self.measure.evidence(self.names, **inputs)
        return torch.stack([evidence[n].float() for n in self.names]), problems

    def _check(self, evidence: Tensor, problems: Mapping[str, Tensor]) -> None:
        messages = list(problems)
        flags = torch.stack([problems[m].reshape(()).to(evidence.device) for m in messages]) if messages else None
        values = evidence.detach().cpu() if flags is None else torch.cat([evidence.detach(), flags.float()]).cpu()
        for message, flag in zip(messages, values[len(self.names) :].tolist()):
            if flag:
                raise ValueError(message)
        for name, value in zip(self.names, values[: len(self.names)].tolist()):
            if not math.isfinite(value) or value <= 0:
                raise ValueError(
                    f"evidence of modality {name!r} is {value}: it must be finite and > 0 for the ratios to be "
                    f"defined ({self.measure!r})"
                )

    def _hook_features(self, features: Mapping[str, Tensor]) -> None:
        missing = [n for n in self.names if n not in features]
        unknown = [n for n in features if n not in self.names]
        if missing or unknown:
            raise ValueError(f"features must name exactly {list(self.names)}: missing {missing}, unknown {unknown}")
        self._hooked = None
        if not self.in_window():
            return
        evidence, coefficients = self._coefficients_from(self._pending)
        for name in self.names:
            feature = features[name]
            if not feature.requires_grad:
                raise ValueError(f"features[{name!r}] does not require grad: pass the encoder's output tensor")
            k = coefficients[name]
            feature.register_hook(lambda grad, k=k: grad * k.to(device=grad.device, dtype=grad.dtype))
        self._hooked = (evidence, coefficients)

    def _coefficients_from(self, evidence: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The evidence summed over all ``torch.distributed`` ranks (observed evidence only), and the policy's
        coefficients for it."""
        if self.measure.needs_observe and dist.is_available() and dist.is_initialized():
            evidence = evidence.clone()
            dist.all_reduce(evidence, op=dist.ReduceOp.SUM)
        return evidence, self.policy(dict(zip(self.names, evidence.unbind(0))))

    # ------------------------------------------------------------------ step
    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Run `step` before every ``optimizer.step()``; returns a handle whose ``remove()`` detaches.

        Under ``torch.amp.GradScaler`` a step with ``inf``/``NaN`` gradients is skipped by the scaler and is
        not seen here (fused optimizers: the hook reads the scaler's ``found_inf`` and skips as well).
        """

        def pre_hook(opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
            found_inf = getattr(opt, "found_inf", None)
            if found_inf is not None and bool(found_inf.item()):
                self._pending = None
                return
            self.step()

        return optimizer.register_step_pre_hook(pre_hook)

    @torch.no_grad()
    def step(self) -> dict[str, Tensor] | None:
        """Modulate the current gradients (``apply="params"``) and advance the step counter.

        Returns the coefficients applied, or ``None`` when this step was not modulated (outside the
        window, or no fresh `observe` — the latter warns once).
        """
        pending, self._pending = self._pending, None
        hooked, self._hooked = self._hooked, None
        step = self._step
        self._step += 1
        if not self.in_window(step):
            return None
        if pending is None and (self.measure.needs_observe or self.apply == "features"):
            if not self._warned_no_observe:
                warnings.warn(
                    "gradmod: optimizer step without observe() since the last step: not modulated "
                    "(this warning is shown once)",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self._warned_no_observe = True
            return None
        if self.apply == "params":
            evidence, coefficients = self._coefficients_from(pending if pending is not None else self._evidence()[0])
            self._apply_to_params(coefficients, step)
        elif hooked is None:  # features mode, observed while outside the window
            return None
        else:
            evidence, coefficients = hooked
        ratios = torch.stack(list(F.discrepancy_ratios(dict(zip(self.names, evidence.unbind(0)))).values()))
        stacked = torch.stack([coefficients[n].to(evidence.device) for n in self.names])
        self._history.append((step, evidence.detach(), ratios.detach(), stacked.detach()))
        return coefficients

    def _apply_to_params(self, coefficients: Mapping[str, Tensor], step: int) -> None:
        for index, name in enumerate(self.names):
            grads = [p.grad for p in self.params[name] if p.grad is not None]
            if not grads:
                continue
            if any(g.is_sparse for g in grads):
                raise ValueError(f"modality {name!r} has sparse gradients, which gradmod does not modulate")
            by_device: dict[torch.device, list[Tensor]] = {}
            for g in grads:
                by_device.setdefault(g.device, []).append(g)
            k = coefficients[name]
            scale = F.noise_scale(self.noise, k)
            for device, group in by_device.items():
                kernel = get_kernel(self.backend, device)
                generator = self._generator(device, step, index) if scale is not None else None
                kernel(group, k, scale, generator)  # the kernels move scalars without a host sync

    # ------------------------------------------------------------------ history and state
    @property
    def history(self) -> list[dict[str, Any]]:
        """The last ``history_size`` modulated steps: ``{"step", "evidence", "ratios", "coefficients"}``.

        Values are Python floats per modality (reading this property synchronises with the device).
        """
        return [self._record(*entry) for entry in self._history]

    @property
    def last(self) -> dict[str, Any] | None:
        """The record of the last modulated step (as in `history`), or ``None``."""
        return self._record(*self._history[-1]) if self._history else None

    def _record(self, step: int, evidence: Tensor, ratios: Tensor, coefficients: Tensor) -> dict[str, Any]:
        def named(values: Tensor) -> dict[str, float]:
            return dict(zip(self.names, values.tolist()))

        return {"step": step, "evidence": named(evidence), "ratios": named(ratios), "coefficients": named(coefficients)}

    def reset(self) -> None:
        """Forget pending evidence, history and the step counter (the noise restarts with the counter)."""
        self._step = 0
        self._pending = None
        self._hooked = None
        self._history.clear()
        self._warned_no_observe = False

    def state_dict(self) -> dict[str, Any]:
        """Everything that changes results: step counter, seed (noise is counter-based), pending evidence, history,
        policy state (PDMP's ranking)."""
        state: dict[str, Any] = {
            "names": list(self.names),
            "step": self._step,
            "seed": self.seed,
            "pending": None if self._pending is None else self._pending.detach().cpu(),
            "history": [(s, e.cpu(), r.cpu(), c.cpu()) for s, e, r, c in self._history],
            "warned_no_observe": self._warned_no_observe,
        }
        if hasattr(self.policy, "state_dict"):
            state["policy"] = self.policy.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict`; the modality names must match."""
        if list(state["names"]) != list(self.names):
            raise ValueError(f"state_dict is for modalities {state['names']}, this modulator has {list(self.names)}")
        self._step = int(state["step"])
        self.seed = int(state["seed"])
        self._pending = None if state["pending"] is None else state["pending"].clone()
        self._hooked = None
        self._history.clear()
        self._history.extend((int(s), e.clone(), r.clone(), c.clone()) for s, e, r, c in state["history"])
        self._warned_no_observe = bool(state["warned_no_observe"])
        if "policy" in state and hasattr(self.policy, "load_state_dict"):
            self.policy.load_state_dict(state["policy"])

    def __repr__(self) -> str:
        return (
            f"Modulator(modalities={list(self.names)}, measure={self.measure!r}, policy={self.policy!r}, "
            f"noise={self.noise!r}, apply={self.apply!r}, window=[{self.start_step}, {self.stop_step}), "
            f"backend={self.backend!r})"
        )
