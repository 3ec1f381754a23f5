"""What the kernels share: the noise key, argument checks, grouping by device and dtype, sync-free moves."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "GroupKey",
    "NoiseKey",
    "check_gradient",
    "check_modality_scalars",
    "check_scalars",
    "group_by_device_and_dtype",
    "to_device",
]

GroupKey = tuple[torch.device, torch.dtype]


@dataclass(frozen=True)
class NoiseKey:
    """What a step's noise is a function of: the modulator's seed, its step counter and, for a shard of
    sharded gradients, the shard's index (0 for whole tensors, which keeps their stream unchanged).

    ``step`` is a non-negative ``int``, or — in capture-safe mode, where the step counter lives on the
    device and is incremented in place — a 0-d ``int64`` tensor on the gradients' device. Only the Triton
    kernel reads a device step (inside the kernel, so nothing waits for the host); the backends that seed a
    ``torch.Generator`` need a host step and refuse a tensor one.
    """

    seed: int
    step: int | Tensor
    shard: int = 0

    def __post_init__(self) -> None:
        for name in ("seed", "shard"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"NoiseKey.{name} must be an int, got {type(value).__name__}")
        if self.shard < 0:
            raise ValueError(f"NoiseKey.shard must be >= 0, got {self.shard}")
        step = self.step
        if isinstance(step, Tensor):
            if step.dim() != 0 or step.dtype != torch.int64:
                shape = tuple(step.shape)
                raise ValueError(f"a device step must be a 0-d int64 tensor, got shape {shape} {step.dtype}")
        elif not isinstance(step, int) or isinstance(step, bool):
            raise TypeError(f"NoiseKey.step must be an int or a 0-d int64 tensor, got {type(step).__name__}")
        elif step < 0:
            raise ValueError(f"NoiseKey.step must be >= 0, got {step}")

    @property
    def on_device(self) -> bool:
        """Whether the step is a device tensor (capture-safe mode)."""
        return isinstance(self.step, Tensor)


def _check_scalar(name: str, value: object) -> None:
    """``value`` must be a 0-d floating-point tensor, finite when on the CPU."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a 0-d floating-point tensor, got {type(value).__name__}")
    if value.dim() != 0 or not value.is_floating_point():
        raise ValueError(f"{name} must be a 0-d floating-point tensor, got shape {tuple(value.shape)} {value.dtype}")
    if value.device.type == "cpu" and not math.isfinite(value.item()):
        raise ValueError(f"{name} must be finite, got {value.item()}")


def check_scalars(coefficient: Tensor, noise_scale: Tensor | None) -> None:
    """Raise a ``TypeError``/``ValueError`` naming the problem unless both are 0-d floating-point tensors.

    Their *values* are checked for finiteness when they live on the CPU, where that costs no host
    synchronisation; on an accelerator they are the caller's responsibility (the policies in
    `gradmod.functional` always return finite coefficients).
    """
    _check_scalar("coefficient", coefficient)
    if noise_scale is not None:
        _check_scalar("noise_scale", noise_scale)


def _check_vector(name: str, value: object, size: int) -> None:
    """``value`` must be a 1-d floating-point tensor of ``size`` elements, finite when on the CPU."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a 1-d floating-point tensor, got {type(value).__name__}")
    if value.shape != (size,) or not value.is_floating_point():
        raise ValueError(
            f"{name} must be a 1-d floating-point tensor with one entry per modality ({size}), "
            f"got shape {tuple(value.shape)} {value.dtype}"
        )
    if value.device.type == "cpu" and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} must be finite, got {value.tolist()}")


def check_modality_scalars(coefficients: Tensor, noise_scales: Tensor | None, num_modalities: int) -> None:
    """Raise a ``TypeError``/``ValueError`` naming the problem unless ``coefficients`` (and ``noise_scales``
    when given) hold one floating-point value per modality. Values are checked only on the CPU (no sync)."""
    _check_vector("coefficients", coefficients, num_modalities)
    if noise_scales is not None:
        _check_vector("noise_scales", noise_scales, num_modalities)


def check_gradient(grad: object, index: int, modality: int | None = None) -> None:
    """Raise a ``TypeError``/``ValueError`` naming ``grads[index]`` (``groups[modality][index]``) unless it is
    a dense floating-point tensor."""
    if isinstance(grad, Tensor) and grad.layout == torch.strided and grad.dtype.is_floating_point:
        return
    name = f"grads[{index}]" if modality is None else f"groups[{modality}][{index}]"
    if not isinstance(grad, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(grad).__name__}")
    if grad.layout != torch.strided:
        raise ValueError(f"{name} has layout {grad.layout}; only dense (strided) gradients are supported")
    raise ValueError(f"{name} has dtype {grad.dtype}; gradients must be floating point")


def group_by_device_and_dtype(grads: Sequence[Tensor]) -> dict[GroupKey, list[tuple[int, Tensor]]]:
    """Non-empty ``grads`` with their list positions, grouped by ``(device, dtype)`` in order of first appearance.

    Raises a ``TypeError``/``ValueError`` naming the gradient that is not a dense floating-point tensor.
    """
    groups: dict[GroupKey, list[tuple[int, Tensor]]] = {}
    for index, grad in enumerate(grads):
        check_gradient(grad, index)
        if grad.numel() > 0:
            groups.setdefault((grad.device, grad.dtype), []).append((index, grad))
    return groups


def to_device(value: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``value`` on ``device`` in ``dtype`` without a host synchronisation (CPU → CUDA goes through pinned memory)."""
    if value.device == device:
        return value.to(dtype)
    value = value.to(dtype)
    if value.device.type == "cpu" and device.type == "cuda":
        return value.pin_memory().to(device, non_blocking=True)
    return value.to(device)
