"""The multi-tensor kernel: ``torch._foreach_*`` ops over gradients grouped by device and dtype.

Same contract and same arithmetic as `gradmod.kernels.reference` (the OGM-GE update of Peng et
al., CVPR 2022, ``g ← k·g + c·(σ(g) + 1e-8)·z``), without a host
synchronisation, and with multi-tensor launches where they pay:

1. per tensor, ``z ← torch.randn(g.shape)·(c·(σ(g) + 1e-8))`` with σ from
   `gradmod.functional.ge_noise_std`, kept as a 0-d tensor on the device — no ``.item()``;
2. ``g ← k·g + z``: ``torch._foreach_mul_`` then ``torch._foreach_add_`` over the bucket on an
   accelerator (two launches for all tensors); on the CPU, where ``_foreach_*`` ops are per-tensor
   loops anyway (and measured a few per cent slower than the tensor methods), ``g.mul_(k).add_(z)``
   tensor by tensor, while ``g`` and ``z`` are in cache, and a factor of exactly 1 (``k`` of an
   undamped modality, ``c`` of GE noise) is skipped — it changes no bit, and reading it costs no
   synchronisation on the CPU.

**Noise stream.** Tensors are grouped by ``(device, dtype)`` in order of first appearance (as
``torch.optim`` does); inside a group they keep list order and each draws ``torch.randn(g.shape)`` as
the reference does. So for gradients that share one device and dtype (the usual case) the result is
*bit-identical* to the reference kernel for the same generator state; mixed lists draw group by group.

**Memory.** Noise is drawn for a bucket of tensors at a time (on an accelerator at most
`BUCKET_ELEMENTS` elements or one larger tensor; on the CPU one tensor), so the extra memory stays
bounded whatever the model size.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from gradmod._internal import STD_EPS
from gradmod.functional import ge_noise_std
from gradmod.kernels._common import check_scalars, group_by_device_and_dtype, to_device

#: Largest number of noise elements held at once by `modulate_` on an accelerator (one larger tensor is
#: its own bucket).
BUCKET_ELEMENTS = 1 << 24


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
    """``g ← k·g (+ z)`` for every gradient, in multi-tensor launches (on an accelerator)."""
    torch._foreach_mul_(grads, k)
    if noise is not None:
        torch._foreach_add_(grads, noise)


def _sigma(grad: Tensor, given: dict[int, Tensor]) -> Tensor:
    """``σ(g) + 1e-8`` of ``grad`` (`gradmod.functional.ge_noise_std`), or the given σ plus the same 1e-8."""
    if id(grad) in given:
        return given[id(grad)].to(grad.device, torch.float32) + STD_EPS
    return ge_noise_std(grad)


def _modulate_on_cpu(
    grads: list[Tensor],
    k: Tensor,
    noise_scale: Tensor | None,
    generator: torch.Generator | None,
    given: dict[int, Tensor],
) -> None:
    """The CPU path: tensor by tensor, while ``g`` and ``z`` are in cache, with as few ops per tensor as the
    reference's roundings allow. Reading ``k`` and ``c`` costs no synchronisation here, so a factor of
    exactly 1 (``c`` of GE noise, ``k`` of an undamped modality) is not applied: ``x·1 = x`` in every dtype."""
    dtype = grads[0].dtype
    scale_k = k.item() != 1.0
    c = None if noise_scale is None else to_device(noise_scale, torch.device("cpu"), noise_scale.dtype)
    unit_c = c is not None and c.item() == 1.0
    for grad in grads:
        if c is not None:
            std = _sigma(grad, given)
            if not unit_c:
                std = std * c
            noise = torch.randn(grad.shape, generator=generator, dtype=dtype).mul_(std.to(dtype))
        if scale_k:
            grad.mul_(k)
        if c is not None:
            grad.add_(noise)


def modulate_(
    grads: Sequence[Tensor],
    coefficient: Tensor,
    noise_scale: Tensor | None,
    generator: torch.Generator | None = None,
    stds: Sequence[Tensor] | None = None,
) -> None:
    """Scale ``grads`` in place by ``coefficient`` and add GE noise of std ``noise_scale·(σ(g)+1e-8)``.

    ``g ← k·g + c·(σ(g) + 1e-8)·z`` with σ the unbiased std of the unscaled ``g`` (0 for one element) or
    ``stds[i]`` when given, ``z ~ N(0, I)`` from ``generator`` (on the gradients' device);
    ``noise_scale=None`` draws nothing.
    """
    check_scalars(coefficient, noise_scale)
    sigma_of = {} if stds is None else {id(grad): stds[index] for index, grad in enumerate(grads)}
    for (device, dtype), members in group_by_device_and_dtype(grads).items():
        group = [grad for _, grad in members]
        k = to_device(coefficient, device, dtype)
        if device.type == "cpu":
            _modulate_on_cpu(group, k, noise_scale, generator, sigma_of)
            continue
        if noise_scale is None:
            _scale_add_(group, k, None)
            continue
        c = to_device(noise_scale, device, noise_scale.dtype)
        for bucket in buckets(group, BUCKET_ELEMENTS):
            noise = [
                torch.randn(grad.shape, generator=generator, device=device, dtype=dtype).mul_(
                    (_sigma(grad, sigma_of) * c).to(dtype)
                )
                for grad in bucket
            ]
            _scale_add_(bucket, k, noise)
