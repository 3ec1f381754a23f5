"""Kernels that apply a modality's coefficient and noise to its gradients, in place.

Every backend implements one contract, that of `gradmod.kernels.reference.modulate_`::

    modulate_(grads, coefficient, noise_scale, generator) -> None

* ``"reference"`` — a plain per-tensor loop, the specification;
* ``"foreach"`` — ``torch._foreach_*`` multi-tensor ops, grouped by device and dtype (any device);
* ``"triton"`` — fused CUDA kernels with counter-based (Philox) noise.

``"auto"`` picks ``"triton"`` for CUDA gradients when Triton imports, else ``"foreach"``.

`modulate_modalities_` applies one step to every modality: the gradients of modality ``m`` on one device
get that backend's kernel with a generator re-seeded from ``(seed, step, m)`` (`noise_generator`), so the
noise of a step is a pure function of the seed, the step and the modality — the same on every rank, after
a resume, and on any device.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class NoiseKey:
    """What a step's noise is a function of: the modulator's seed, its step counter and, for a shard of
    sharded gradients, the shard's index (0 for whole tensors, which keeps their stream unchanged)."""

    seed: int
    step: int
    shard: int = 0


_generators: dict[str, torch.Generator] = {}


def noise_generator(device: torch.device, key: NoiseKey, modality: int, num_modalities: int) -> torch.Generator:
    """The generator of ``device``, re-seeded for modality ``modality`` at ``key``: counter-based noise.

    Stream ``(seed·1,000,003 + step·M + modality + shard·(2³² + 15)) mod (2⁶³ − 1)``: distinct for every
    (step, modality) of a seed and, for shards, every shard; the generator carries no state between steps,
    so there is nothing to save or synchronise.
    """
    name = str(device)
    if name not in _generators:
        _generators[name] = torch.Generator(device=device)
    stream = (key.seed * 1_000_003 + key.step * num_modalities + modality + key.shard * (2**32 + 15)) % (2**63 - 1)
    return _generators[name].manual_seed(stream)


def modulate_modalities_(
    groups: Sequence[Sequence[Tensor]],
    coefficients: Tensor,
    noise_scales: Tensor | None,
    key: NoiseKey | None,
    backend: str = "auto",
    stds: Sequence[Sequence[Tensor]] | None = None,
) -> None:
    """One step for every modality: ``groups[m]`` scaled by ``coefficients[m]`` plus noise of scale ``noise_scales[m]``.

    ``noise_scales=None`` adds no noise (and ``key`` may be ``None``). Gradients of one modality may live on
    several devices; each device's share gets the kernel of ``backend`` there and its own re-seeded generator.
    ``stds[m][i]``, when given, is the σ of the whole tensor that ``groups[m][i]`` is a shard of; the Triton
    kernel computes σ itself, so these groups use the ``foreach`` kernel instead.
    """
    for index, grads in enumerate(groups):
        by_device: dict[torch.device, list[tuple[Tensor, Tensor | None]]] = {}
        for position, grad in enumerate(grads):
            sigma = None if stds is None else stds[index][position]
            by_device.setdefault(grad.device, []).append((grad, sigma))
        k = coefficients[index]
        scale = None if noise_scales is None else noise_scales[index]
        for device, members in by_device.items():
            group = [grad for grad, _ in members]
            generator = None if scale is None else noise_generator(device, key, index, len(groups))
            if stds is None:
                get_kernel(backend, device)(group, k, scale, generator)
            else:
                kernel = get_kernel("reference" if backend == "reference" else "foreach", device)
                kernel(group, k, scale, generator, stds=[sigma for _, sigma in members])


__all__ = ["BACKENDS", "Kernel", "NoiseKey", "get_kernel", "modulate_modalities_", "noise_generator"]
