"""The multi-tensor kernel: ``torch._foreach_*`` ops over gradients grouped by device and dtype.

Same contract and same arithmetic as `gradmod.kernels.reference` (the OGM-GE update of Peng et
al., CVPR 2022, ``g ← k·g + c·(σ(g) + 1e-8)·z``, see ``shared/papers/README.md``), without a host
synchronisation, and with multi-tensor launches where they pay:

1. per tensor, ``z ← torch.randn(g.shape)·(c·(σ(g) + 1e-8))`` with σ from
   `gradmod.functional.ge_noise_std`, kept as a 0-d tensor on the device — no ``.item()``;
2. ``g ← k·g + z``: ``torch._foreach_mul_`` then ``torch._foreach_add_`` over the bucket on an
   accelerator (two launches for all tensors); on the CPU, where ``_foreach_*`` ops are per-tensor
   loops anyway (and measured a few per cent slower than the tensor methods), ``g.mul_(k).add_(z)``
   tensor by tensor, while ``g`` and ``z`` are in cache.

**Noise stream.** Tensors are grouped by ``(device, dtype)`` in order of first appearance (as
``torch.optim`` does); inside a group they keep list order and each draws ``torch.randn(g.shape)`` as
the reference does. So for gradients that share one device and dtype (the usual case) the result is
*bit-identical* to the reference kernel for the same generator state; mixed lists draw group by group.

**Memory.** Noise is drawn for a bucket of tensors at a time (on an accelerator at most
`BUCKET_ELEMENTS` elements or one larger tensor; on the CPU one tensor), so the extra memory stays
bounded whatever the model size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from gradmod.functional import ge_noise_std

#: Largest number of noise elements held at once by `modulate_` on an accelerator (one larger tensor is
#: its own bucket).
BUCKET_ELEMENTS = 1 << 24

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


def buckets(tensors: Sequence[Tensor], max_elements: int = BUCKET_ELEMENTS) -> Iterator[list[Tensor]]:
    """Consecutive runs of ``tensors`` holding at most ``max_elements`` elements (a larger tensor alone)."""
    bucket: list[Tensor] = []
    size = 0
    for tensor in tensors:
        if bucket and size + tensor.numel() > max_elements:
            yield bucket
            bucket, size = [], 0
        bucket.append(tensor)
        size += tensor.numel()
    if bucket:
        yield bucket


def _scale_add_(grads: list[Tensor], k: Tensor, noise: list[Tensor] | None) -> None:
    """``g ← k·g (+ z)`` for every gradient: multi-tensor launches on an accelerator, tensor by tensor on the CPU."""
    if grads[0].device.type != "cpu":
        torch._foreach_mul_(grads, k)
        if noise is not None:
            torch._foreach_add_(grads, noise)
        return
    for index, grad in enumerate(grads):
        grad.mul_(k)
        if noise is not None:
            grad.add_(noise[index])


def modulate_(
    grads: Sequence[Tensor],
    coefficient: Tensor,
    noise_scale: Tensor | None,
    generator: torch.Generator | None = None,
) -> None:
    """Scale ``grads`` in place by ``coefficient`` and add GE noise of std ``noise_scale·(σ(g)+1e-8)``.

    ``g ← k·g + c·(σ(g) + 1e-8)·z`` with σ the unbiased std of the unscaled ``g`` (0 for one element),
    ``z ~ N(0, I)`` from ``generator`` (on the gradients' device); ``noise_scale=None`` draws nothing.
    """
    check_scalars(coefficient, noise_scale)
    for (device, dtype), members in group_by_device_and_dtype(grads).items():
        group = [grad for _, grad in members]
        k = to_device(coefficient, device, dtype)
        if noise_scale is None:
            _scale_add_(group, k, None)
            continue
        c = to_device(noise_scale, device, noise_scale.dtype)
        for bucket in buckets(group, BUCKET_ELEMENTS if device.type != "cpu" else 0):
            noise = [
                torch.randn(grad.shape, generator=generator, device=device, dtype=dtype).mul_(
                    (ge_noise_std(grad) * c).to(dtype)
                )
                for grad in bucket
            ]
            _scale_add_(bucket, k, noise)
