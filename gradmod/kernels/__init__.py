"""Kernels that apply a modality's coefficient and noise to its gradients, in place.

Every backend implements one contract, that of `gradmod.kernels.reference.modulate_`::

    modulate_(grads, coefficient, noise_scale, generator) -> None

* ``"reference"`` — a plain per-tensor loop, the specification;
* ``"foreach"`` — ``torch._foreach_*`` multi-tensor ops, grouped by device and dtype (any device);
* ``"triton"`` — fused CUDA kernels with counter-based (Philox) noise.

``"auto"`` picks ``"triton"`` for CUDA gradients when Triton imports, else ``"foreach"``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Kernel = Callable[[Sequence[Tensor], Tensor, "Tensor | None", "torch.Generator | None"], None]

BACKENDS = ("auto", "reference", "foreach", "triton")

_warned_fallback = False


def _triton_kernel() -> Kernel | None:
    """The Triton kernel, or ``None`` (with one warning saying why) when Triton cannot be used."""
    global _warned_fallback
    try:
        from gradmod.kernels import triton as triton_kernel
    except ImportError as error:  # triton missing or broken
        reason = f"triton does not import ({error})"
    else:
        ok, reason = triton_kernel.is_available()
        if ok:
            return triton_kernel.modulate_
    if not _warned_fallback:
        warnings.warn(f"gradmod: falling back to the foreach kernel: {reason}", RuntimeWarning, stacklevel=3)
        _warned_fallback = True
    return None


@functools.cache
def get_kernel(backend: str, device: torch.device) -> Kernel:
    """The kernel for ``backend`` on ``device`` (``"auto"`` resolved as documented above).

    Resolved once per (backend, device) and cached: the modulator asks on every step.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "reference":
        from gradmod.kernels.reference import modulate_

        return modulate_
    if backend == "triton" or (backend == "auto" and device.type == "cuda"):
        kernel = _triton_kernel()
        if kernel is not None:
            return kernel
        if backend == "triton":
            raise RuntimeError("backend='triton' was requested but Triton is not usable here (see the warning)")
    from gradmod.kernels.foreach import modulate_

    return modulate_


__all__ = ["BACKENDS", "Kernel", "get_kernel"]
