"""The reference kernel: a plain per-tensor loop, the specification every fast path must match.

For every gradient ``g`` of one modality, in list order::

    g ← k·g + c·(σ(g) + 1e-8)·z,   z ~ N(0, I) drawn from ``generator``

with ``σ(g)`` the unbiased std of the *unscaled* gradient (`gradmod.functional.ge_noise_std`;
0 for one element) — or ``stds[i]``, when given, for the gradient at position ``i`` (a shard of a larger
tensor takes the whole tensor's σ) — ``k`` the modality's coefficient and ``c`` its noise scale
(`gradmod.functional.noise_scale`). ``noise_scale=None`` adds no noise and draws nothing.
Noise is drawn with ``torch.randn`` in the gradient's dtype, one tensor after the other, so a given
generator state reproduces the same noise bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from gradmod._internal import STD_EPS
from gradmod.functional import ge_noise_std


def modulate_(
    grads: Sequence[Tensor],
    coefficient: Tensor,
    noise_scale: Tensor | None,
    generator: torch.Generator | None = None,
    stds: Sequence[Tensor] | None = None,
) -> None:
    """Scale ``grads`` in place by ``coefficient`` and add GE noise of std ``noise_scale·(σ(g)+1e-8)``."""
    for index, grad in enumerate(grads):
        if grad.numel() == 0:
            continue
        k = coefficient.to(device=grad.device, dtype=grad.dtype)
        if noise_scale is None:
            grad.mul_(k)
            continue
        sigma = ge_noise_std(grad) if stds is None else stds[index].to(grad.device, torch.float32) + STD_EPS
        std = (sigma * noise_scale.to(grad.device)).to(grad.dtype)
        noise = torch.randn(grad.shape, generator=generator, device=grad.device, dtype=grad.dtype)
        grad.mul_(k).add_(noise.mul_(std))
