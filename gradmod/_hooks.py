"""The optimizer step pre-hook every gradmod object that acts in ``optimizer.step()`` shares (not public API).

One hook on one optimizer, attached once: a wrapper holding a torch optimizer in ``.optimizer``
(Accelerate's ``AcceleratedOptimizer``) is attached through it; a ``step(closure)`` is refused by name
(the closure computes the gradients after the hook has run); a step that ``GradScaler`` skips — fused
optimizers carry the scaler's ``found_inf`` into the step — is passed to the owner's ``skip`` instead.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

__all__ = ["StepHook", "StepHooked", "unheld_modality", "unwrapped_optimizer"]


def unwrapped_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer a wrapper holds in ``.optimizer`` (Accelerate's ``AcceleratedOptimizer``, itself an
    ``Optimizer`` subclass without step hooks of its own), or ``optimizer``; else a ``TypeError``."""
    inner = optimizer
    while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
        inner = inner.optimizer
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"attach() needs a torch.optim.Optimizer (or a wrapper holding one), got {type(optimizer).__name__}")
    return inner


class StepHook:
    """Runs ``step()`` before every step of one optimizer, or ``skip(found_inf)`` for a step GradScaler skips.

    ``skip`` receives the scaler's ``found_inf`` tensor; it is called for every step of a fused optimizer under
    ``GradScaler`` when ``on_device`` is true (the owner decides on the device), else only for steps whose
    ``found_inf`` is set (read on the host).
    """

    def __init__(self, owner: str, step: Callable[[], Any], skip: Callable[[Tensor], None], on_device: bool = False) -> None:
        self._owner = owner
        self._step = step
        self._skip = skip
        self._on_device = on_device
        self._handle: RemovableHandle | None = None
        self._optimizer: weakref.ReferenceType | None = None

    @property
    def attached_to(self) -> torch.optim.Optimizer | None:
        """The optimizer the hook is on (``None`` when detached or its handle was removed)."""
        if self._handle is None or self._optimizer is None:
            return None
        hooks = self._handle.hooks_dict_ref()
        optimizer = self._optimizer()
        if hooks is None or self._handle.id not in hooks or optimizer is None:
            return None
        return optimizer

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Hook ``optimizer`` (already unwrapped); one optimizer, once."""
        if self.attached_to is not None:
            where = "this optimizer" if self.attached_to is optimizer else "another optimizer"
            raise ValueError(
                f"this {self._owner} is already attached to {where}; it steps with one optimizer, once "
                "(detach() first; for per-modality learning rates use parameter groups of one optimizer)"
            )
        self._handle = optimizer.register_step_pre_hook(self._pre_step)
        self._optimizer = weakref.ref(optimizer)
        return self._handle

    def detach(self) -> None:
        """Remove the hook (no-op when not attached)."""
        if self._handle is not None:
            self._handle.remove()
        self._handle = self._optimizer = None

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args[0] is the optimizer
        if closure is not None:
            raise RuntimeError(
                f"gradmod: {type(optimizer).__name__}.step() was given a closure, which computes the gradients "
                f"after the {self._owner}'s pre-step hook has run: they cannot be modulated. Call step() without "
                "a closure, or detach() and step the modulator yourself after backward() inside the closure"
            )
        found_inf = getattr(optimizer, "found_inf", None)  # set by GradScaler for fused optimizers
        if found_inf is not None and (self._on_device or bool(found_inf.item())):
            self._skip(found_inf)
        else:
            self._step()


def unheld_modality(optimizer: Any, groups: Mapping[str, Sequence[Tensor]]) -> str | None:
    """The first modality of ``groups`` (name → its parameters) that has trainable parameters of which
    ``optimizer`` holds none, or ``None``: what ``check_optimizer`` refuses."""
    held = {id(p) for group in unwrapped_optimizer(optimizer).param_groups for p in group["params"]}
    for name, params in groups.items():
        trainable = [p for p in params if p.requires_grad]
        if trainable and not any(id(p) in held for p in trainable):
            return name
    return None


class StepHooked:
    """``attach`` / ``attached_to`` / ``detach`` for an object that acts in the optimizer step through
    ``self._hook`` (a `StepHook`) and checks the optimizer with its own ``check_optimizer``."""

    _hook: StepHook
    check_optimizer: Callable[[torch.optim.Optimizer], None]  # each owner says what its optimizer must hold

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Run ``step()`` before every ``optimizer.step()``, after the checks of ``check_optimizer``; returns the
        hook's handle. A wrapper holding the optimizer in ``.optimizer`` (Accelerate's) is attached through it."""
        optimizer = unwrapped_optimizer(optimizer)
        if self._hook.attached_to is None:
            self.check_optimizer(optimizer)
        return self._hook.attach(optimizer)

    @property
    def attached_to(self) -> torch.optim.Optimizer | None:
        """The optimizer this is attached to (``None`` when detached or its handle was removed)."""
        return self._hook.attached_to

    def detach(self) -> None:
        """Remove the optimizer hook installed by `attach` (no-op when not attached)."""
        self._hook.detach()
