"""Appliers: how finished coefficients reach the gradients.

The `gradmod.Modulator` turns evidence into one coefficient ``k_u`` per modality; an applier puts them onto
the gradients:

* `ParamsApplier` (``apply="params"``) — after backward, before ``optimizer.step()``: every selected
  parameter gradient ``g`` of modality ``u`` becomes ``k_u·g + ε`` with ``ε ~ N(0, (c_u·(σ(g) + 1e-8))²)``
  (``c_u`` from ``noise``, `gradmod.functional.noise_scale`; no ε when ``noise=None``), through the
  kernels of `gradmod.kernels`.
* `FeaturesApplier` (``apply="features"``) — during backward: the gradient leaving each modality's
  feature tensor is multiplied by ``k_u``, so every encoder parameter gets ``k_u·g`` at no extra pass over
  gradient memory. It adds no noise and selects no parameters: both options exist only on `ParamsApplier`.
  Route the features either by passing them to ``observe(features=...)`` (tensor hooks) or by calling
  `Modulator.scale_grad` inside ``forward`` (an autograd function that ``torch.compile`` traces).

The modalities' parameters are resolved from their modules when used (cheaply: a replaced parameter,
e.g. after ``to_empty()`` or ``load_state_dict(assign=True)``, is noticed by identity), so a parameter
frozen when the modulator was built and unfrozen later is modulated too.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from gradmod import functional as F
from gradmod._internal import constants, per_modality
from gradmod.kernels import BACKENDS, NoiseKey, modulate_modalities_
from gradmod.sharded import is_dtensor, modulate_sharded_

__all__ = [
    "APPLY_MODES",
    "Applier",
    "FeaturesApplier",
    "Modality",
    "ParamFilter",
    "ParameterSelection",
    "ParamsApplier",
    "make_applier",
    "preset_applier",
    "scale_grad",
]

#: The ``apply=`` strings: `ParamsApplier` and `FeaturesApplier` with their defaults.
APPLY_MODES = ("params", "features")
#: ``backend=``'s default, which a preset reads as "not set".
DEFAULT_BACKEND = "auto"

#: ``param_filter(name, parameter) -> bool`` selects the parameters of a modality to modulate.
ParamFilter = Callable[[str, nn.Parameter], bool]
#: A modality: an ``nn.Module`` (all its parameters) or an iterable of parameters.
Modality = nn.Module | Iterable[Tensor]

# One resolved parameter: the ``_parameters`` dict that holds it (``None`` for a parameter given directly),
# its key there, its name for messages, and the parameter.
_Entry = tuple["dict[str, Any] | None", str, str, Tensor]


def _entries(source: Modality, modality: str) -> list[_Entry]:
    if isinstance(source, nn.Module):
        entries, seen = [], set()
        for prefix, module in source.named_modules():
            for key, p in module._parameters.items():
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    entries.append((module._parameters, key, f"{prefix}.{key}" if prefix else key, p))
        return entries
    if isinstance(source, Tensor):
        raise TypeError(f"modality {modality!r}: a modality is an nn.Module or an iterable of parameters, not a single tensor")
    entries = []
    for index, p in enumerate(source):
        if not isinstance(p, Tensor):
            raise TypeError(f"modality {modality!r}: item {index} is a {type(p).__name__}, not a parameter")
        entries.append((None, str(index), str(index), p))
    return entries


class ParameterSelection:
    """The parameters of each modality, resolved from their sources (modules or parameter lists) when used.

    A module's parameters are re-resolved when one of them was replaced (``to_empty()``,
    ``load_state_dict(assign=True)``), checked to belong to one modality only, and filtered by
    ``param_filter``; ``require_some`` makes a modality with nothing selected an error. Appliers and the
    methods outside the modulator (MLA, MMPareto) resolve their modalities through it.
    """

    def __init__(self, modalities: Mapping[str, Modality], param_filter: ParamFilter | None, require_some: bool) -> None:
        if not isinstance(modalities, (Mapping, nn.ModuleDict)):
            raise TypeError(f"modalities must be a mapping name -> module or parameters, got {type(modalities).__name__}")
        self.names = tuple(modalities)
        self._sources = {name: modalities[name] for name in self.names}
        for name, source in self._sources.items():
            if not isinstance(source, nn.Module):  # a generator would be exhausted by the first resolution
                self._sources[name] = [p for _, _, _, p in _entries(source, name)]
        self._filter = param_filter
        self._require_some = require_some
        self._entries: list[list[_Entry]] = []
        self.resolve()

    def resolve(self) -> None:
        owner: dict[int, tuple[str, str]] = {}
        resolved = []
        for name in self.names:
            chosen = []
            for entry in _entries(self._sources[name], name):
                pname, p = entry[2], entry[3]
                if id(p) in owner:
                    other, other_name = owner[id(p)]
                    raise ValueError(
                        f"parameter {pname!r} of modality {name!r} is also {other_name!r} of modality {other!r}: "
                        "a parameter can belong to one modality only"
                    )
                owner[id(p)] = (name, pname)
                if getattr(p, "_fsdp_flattened", False):
                    raise ValueError(
                        f"parameter {pname!r} of modality {name!r} is a flattened FSDP1 (FullyShardedDataParallel) "
                        "parameter, whose pieces are not the model's tensors: gradmod cannot modulate it; shard the "
                        "model with FSDP2's fully_shard instead (see the Distributed page of the docs)"
                    )
                if self._filter is None or self._filter(pname, p):
                    chosen.append(entry)
            if not chosen and self._require_some:
                raise ValueError(f"modality {name!r} has no parameter to modulate (after param_filter)")
            resolved.append(chosen)
        self._entries = resolved

    def _stale(self) -> bool:
        return any(table is not None and table.get(key) is not p for entries in self._entries for table, key, _, p in entries)

    def groups(self) -> list[list[Tensor]]:
        """The current parameters, one list per modality (re-resolved first if a module replaced one)."""
        if self._stale():
            self.resolve()
        return [[p for _, _, _, p in entries] for entries in self._entries]

    def named(self) -> dict[str, list[tuple[str, Tensor]]]:
        """``{modality: [(parameter name, parameter), ...]}`` after the same staleness check as `groups`."""
        if self._stale():
            self.resolve()
        return {name: [(pname, p) for _, _, pname, p in entries] for name, entries in zip(self.names, self._entries)}


class Applier(ABC):
    """How coefficients reach the gradients. Bound to the modalities by the `gradmod.Modulator` that owns it."""

    #: ``True`` when coefficients must exist before backward (computed at ``observe()``), ``False`` when
    #: they are applied to finished gradients in ``optimizer.step()``'s pre-hook.
    before_backward: bool = False
    #: whether this applier draws noise (the modulator then keeps the ranks' seeds identical)
    draws_noise: bool = False

    def bind(self, modalities: Mapping[str, Modality]) -> None:
        """Resolve the modalities' parameters (called once by the modulator)."""
        if getattr(self, "_selection", None) is not None:
            raise ValueError(f"{self!r} is already bound to a modulator: build one applier per modulator")
        self._selection = ParameterSelection(modalities, self._param_filter(), require_some=self._requires_parameters())

    def _param_filter(self) -> ParamFilter | None:
        return None

    def _requires_parameters(self) -> bool:
        return False

    @property
    def names(self) -> tuple[str, ...]:
        return self._selection.names

    def parameter_groups(self) -> list[list[Tensor]]:
        """The parameters this applier's gradients reach, one list per modality, in modality order."""
        return self._selection.groups()

    def named_parameters(self) -> dict[str, list[tuple[str, Tensor]]]:
        """``{modality: [(name, parameter)]}`` of `parameter_groups`, for messages."""
        return self._selection.named()

    @abstractmethod
    def apply(self, coefficients: Tensor, step: int, seed: int, active: Tensor | None = None) -> None:
        """Put ``coefficients`` (``[M]``, modality order) onto the gradients of optimizer step ``step``.

        ``active`` (a 0-d bool tensor, or ``None`` for ``True``) is checked on the device: where it is
        ``False`` the coefficients are 1 already, and the applier adds no noise either, so every gradient is
        left as it is without a host synchronisation.
        """

    # Hooks the modulator calls; appliers that act during backward override them.
    def prepare(self) -> None:
        """Called by ``attach()``: the model may have moved to its device since the applier was bound."""

    def set_coefficients(self, coefficients: Tensor | None) -> None:
        """``before_backward`` appliers: the coefficients the next backward passes apply (``None``: neutral)."""

    def hook(self, features: Mapping[str, Tensor]) -> None:
        """``before_backward`` appliers: route ``observe(features=...)`` through the coefficients."""
        raise ValueError(f"features= is only used by appliers that act during backward; this modulator uses {self!r}")

    def after_pass(self, reached: frozenset[int], observed: bool, in_window: bool) -> None:
        """A backward pass reached the parameters of the modalities ``reached`` (indices); ``observed``: an
        ``observe()`` came since the previous pass or step."""

    def check(self) -> None:
        """Raise what went wrong since the last step, before the step does anything."""

    def finish_step(self) -> None:
        """The step is over (modulated or not)."""


class ParamsApplier(Applier):
    """Scale each selected parameter gradient by its modality's coefficient and add the method's noise.

    Args:
        noise: ``None``, ``"ge"``, ``"restore"`` or ``"paper"`` (`gradmod.functional.noise_scale`).
        backend: kernel: ``"auto"``, ``"reference"``, ``"foreach"`` or ``"triton"`` (`gradmod.kernels`).
        param_filter: ``(name, parameter) -> bool``; default: every parameter of the modality
            (`gradmod.filters` has the official OGM-GE choice and others). A parameter without a gradient
            (frozen, unused) is skipped at that step.
    """

    def __init__(self, noise: str | None = None, backend: str = "auto", param_filter: ParamFilter | None = None) -> None:
        if noise is not None and noise not in F.NOISE_KINDS:
            raise ValueError(f"noise must be None or one of {F.NOISE_KINDS}, got {noise!r}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        if param_filter is not None and not callable(param_filter):
            raise TypeError(f"param_filter must be a callable (name, parameter) -> bool, got {type(param_filter).__name__}")
        self.noise = noise
        self.backend = backend
        self.param_filter = param_filter
        self.draws_noise = noise is not None
        self._selection = None
        self._warned_empty: set[str] = set()

    def _param_filter(self) -> ParamFilter | None:
        return self.param_filter

    def _requires_parameters(self) -> bool:
        return True

    def apply(self, coefficients: Tensor, step: int, seed: int, active: Tensor | None = None) -> None:
        grads, sharded = [], False
        for name, params in zip(self.names, self.parameter_groups()):
            present = [p.grad for p in params if p.grad is not None]
            if not present and name not in self._warned_empty:
                self._warned_empty.add(name)
                warnings.warn(
                    f"gradmod: modality {name!r} has no gradient at step {step}: nothing of it to modulate (an unused "
                    "branch, or gradients not materialised when the optimizer steps); this warning is shown once",
                    RuntimeWarning,
                    stacklevel=5,
                )
            if any(g.is_sparse for g in present):
                raise ValueError(f"modality {name!r} has sparse gradients, which gradmod does not modulate")
            sharded = sharded or any(is_dtensor(g) for g in present)  # FSDP2: see gradmod.sharded
            grads.append(present)
        scales = F.noise_scale(self.noise, coefficients)
        if active is not None and scales is not None:  # the coefficients are 1 already where inactive
            scales = torch.where(active, scales, torch.zeros_like(scales))
        modulate = modulate_sharded_ if sharded else modulate_modalities_
        modulate(grads, coefficients, scales, NoiseKey(seed, step), self.backend)

    def __repr__(self) -> str:
        return f"ParamsApplier(noise={self.noise!r}, backend={self.backend!r}, param_filter={self.param_filter!r})"


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``k``, read when backward runs."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, coefficient: Tensor) -> Tensor:
        ctx.coefficient = coefficient  # not saved for backward: its value may change before backward runs
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.coefficient.to(grad.dtype), None


def scale_grad(tensor: Tensor, coefficient: Tensor) -> Tensor:
    """``tensor`` unchanged, whose gradient is multiplied by ``coefficient`` during backward.

    ``coefficient`` (a 0-d tensor on ``tensor``'s device) is read when backward runs, so it may be filled
    in after the forward pass (as `gradmod.Modulator.observe` does). Works under ``torch.compile``.
    """
    if not isinstance(coefficient, Tensor) or coefficient.dim() != 0:
        raise TypeError("coefficient must be a 0-d tensor")
    if coefficient.device != tensor.device:
        raise ValueError(f"coefficient is on {coefficient.device}, the tensor on {tensor.device}")
    return _ScaleGrad.apply(tensor, coefficient)


class FeaturesApplier(Applier):
    """Scale the gradient leaving each modality's feature tensor by its coefficient, inside backward.

    Every parameter of the modality's encoder then receives ``k_u·g``; nothing is added and no parameter is
    selected (the modality's module only tells which parameters the gradients must reach). Every backward
    pass that reaches a modality's parameters must have gone through its scaled feature, after an
    ``observe()`` — otherwise the next step raises a ``RuntimeError`` that names the modality.
    """

    before_backward = True

    def __init__(self) -> None:
        self._selection = None
        # one 0-d tensor per modality and device: views of one shared buffer would be saved for backward by
        # a compiled graph (with a version check), separate tensors are read when backward runs
        self._buffers: dict[torch.device, list[Tensor]] = {}
        self._current: Tensor | None = None
        self._fired: set[int] = set()
        self._routed: set[int] = set()
        self._problems: list[str] = []

    def bind(self, modalities: Mapping[str, Modality]) -> None:
        super().bind(modalities)
        self.prepare()

    def prepare(self) -> None:
        """Create the coefficient buffers on the devices of the modalities' parameters (done at bind and attach).

        A buffer created inside a ``torch.compile``-d forward would be saved for backward by the graph and
        could not be updated afterwards, so the buffers must exist before the first compiled forward.
        """
        for params in self.parameter_groups():
            for p in params:
                if p.device.type != "meta":
                    self.coefficient(self.names[0], p.device)

    def coefficient(self, name: str, device: torch.device) -> Tensor:
        """The live coefficient of modality ``name`` on ``device`` (a view that `set_coefficients` updates)."""
        device = torch.device(device)
        if device not in self._buffers:
            values = torch.ones(len(self.names)) if self._current is None else self._current
            self._buffers[device] = [value.to(device).clone() for value in values.unbind(0)]
        return self._buffers[device][self.names.index(name)]

    def set_coefficients(self, coefficients: Tensor | None) -> None:
        """The coefficients the next backward passes apply (``None``: 1 everywhere)."""
        self._current = coefficients
        for device, buffers in self._buffers.items():
            if coefficients is None:
                values = constants(len(self.names), device, torch.float32)[2]
            else:
                values = coefficients.to(device, non_blocking=True)
            torch._foreach_copy_(buffers, list(values.unbind(0)))

    def scale(self, tensor: Tensor, name: str) -> Tensor:
        """``tensor`` (modality ``name``'s feature, inside ``forward``) routed through the live coefficient."""
        if name not in self.names:
            raise ValueError(f"unknown modality {name!r}; the modalities are {list(self.names)}")
        self._routed.add(self.names.index(name))
        return _ScaleGrad.apply(tensor, self.coefficient(name, tensor.device))

    def hook(self, features: Mapping[str, Tensor]) -> None:
        """Register a gradient hook on each feature tensor (``observe(features=...)``)."""
        features = per_modality(features, self.names, "observe(features=...)")
        for index, name in enumerate(self.names):
            feature = features[name]
            if not isinstance(feature, Tensor) or not feature.requires_grad:
                raise ValueError(f"features[{name!r}] does not require grad: pass the encoder's output tensor")
            coefficient = self.coefficient(name, feature.device)
            feature.register_hook(self._hook_for(index, coefficient))

    def _hook_for(self, index: int, coefficient: Tensor) -> Callable[[Tensor], Tensor]:
        def scale(grad: Tensor | None) -> Tensor | None:
            if grad is None:  # e.g. a compiled graph's output that only the graph itself consumed
                return None
            self._fired.add(index)
            return grad * coefficient.to(grad.dtype)

        return scale

    def after_pass(self, reached: frozenset[int], observed: bool, in_window: bool) -> None:
        """Check one finished backward pass: every modality it reached went through a scaled feature."""
        if in_window:
            for index in sorted(reached):
                name = self.names[index]
                if not observed:
                    self._problems.append(
                        f"a backward pass reached modality {name!r}'s parameters before observe() gave its "
                        "coefficient: in features mode call observe() after the forward pass and before backward()"
                    )
                elif index not in self._fired and index not in self._routed:
                    self._problems.append(
                        f"a backward pass reached modality {name!r}'s parameters without passing through its "
                        "scaled feature tensor: pass the tensor the loss is computed from to observe(features=...) "
                        "(under torch.compile, call mod.scale_grad(feature, name) inside forward instead)"
                    )
        self._fired.clear()

    def check(self) -> None:
        """Raise the first problem `after_pass` found since the last step (then forget them)."""
        if self._problems:
            problem, self._problems = self._problems[0], []
            raise RuntimeError(f"gradmod: features mode was not applied: {problem}")

    def finish_step(self) -> None:
        """After a step: back to neutral coefficients until the next ``observe()``."""
        self.set_coefficients(None)
        self._routed.clear()

    def apply(self, coefficients: Tensor, step: int, seed: int, active: Tensor | None = None) -> None:
        """Nothing to do after backward: the hooks applied the coefficients during backward."""

    def __repr__(self) -> str:
        return "FeaturesApplier()"


def make_applier(apply: str | Applier) -> Applier:
    """``"params"`` → ``ParamsApplier()`` (no noise), ``"features"`` → ``FeaturesApplier()``; an applier as is."""
    if isinstance(apply, Applier):
        return apply
    if apply == "params":
        return ParamsApplier()
    if apply == "features":
        return FeaturesApplier()
    raise ValueError(f"apply must be one of {APPLY_MODES} or an Applier, got {apply!r}")


def preset_applier(apply: str | Applier, noise: str | None, backend: str, param_filter: ParamFilter | None) -> Applier:
    """A preset's applier: `ParamsApplier` with the preset's options for ``apply="params"``, else `make_applier`
    (whose applier takes none of them: one set raises ``ValueError`` naming it)."""
    if apply == "params":
        return ParamsApplier(noise=noise, backend=backend, param_filter=param_filter)
    applier = make_applier(apply)
    options = {"noise": noise, "param_filter": param_filter, "backend": None if backend == DEFAULT_BACKEND else backend}
    given = sorted(name for name, value in options.items() if value is not None)
    if given:
        hint = " (features mode adds no noise: pass noise=None)" if isinstance(applier, FeaturesApplier) else ""
        raise ValueError(f"{', '.join(given)} configure the params applier, not {applier!r}{hint}")
    return applier
