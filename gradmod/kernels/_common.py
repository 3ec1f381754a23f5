"""What the fast kernels share: argument checks, grouping by device and dtype, sync-free scalar moves."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["GroupKey", "check_scalars", "group_by_device_and_dtype", "to_device"]

GroupKey = tuple[torch.device, torch.dtype]


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


def group_by_device_and_dtype(grads: Sequence[Tensor]) -> dict[GroupKey, list[tuple[int, Tensor]]]:
    """Non-empty ``grads`` with their list positions, grouped by ``(device, dtype)`` in order of first appearance.

    Raises a ``TypeError``/``ValueError`` naming the gradient that is not a dense floating-point tensor.
    """
    groups: dict[GroupKey, list[tuple[int, Tensor]]] = {}
    for index, grad in enumerate(grads):
        if not isinstance(grad, Tensor):
            raise TypeError(f"grads[{index}] must be a tensor, got {type(grad).__name__}")
        if grad.layout != torch.strided:
            raise ValueError(f"grads[{index}] has layout {grad.layout}; only dense (strided) gradients are supported")
        if not grad.is_floating_point():
            raise ValueError(f"grads[{index}] has dtype {grad.dtype}; gradients must be floating point")
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
