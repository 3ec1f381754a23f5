"""Kernels that apply each modality's coefficient and noise to its gradients, in place.

`modulate_modalities_` applies one step to every modality; it is what the appliers call. Backends:

* ``"reference"`` — a plain per-tensor loop, the specification (`gradmod.kernels.reference`);
* ``"foreach"`` — ``torch._foreach_*`` multi-tensor ops, grouped by device and dtype (any device);
* ``"triton"`` — two fused CUDA kernels per step for all modalities together, counter-based (Philox)
  noise read from the key and step inside the kernel (`gradmod.kernels.triton`).

``"auto"`` picks ``"triton"`` for CUDA gradients when Triton imports, else ``"foreach"``.

**Noise streams.** Noise is a pure function of ``NoiseKey(seed, step, shard)``, the modality and the
gradient's place — the same on every rank, after a resume, and on any device:

* ``reference``/``foreach``: the gradients of modality ``m`` on one device draw ``torch.randn`` in list
  order from a ``torch.Generator`` of that device re-seeded at `noise_generator` — a host step is needed
  (a tensor step raises ``ValueError``);
* ``triton``: Philox keyed by seed and shard, counter from (step, modality, position in the modality's
  list, element index) — see `gradmod.kernels.triton`; the step may be a 0-d int64 device tensor
  (capture-safe mode).

Every per-modality backend also implements the one-modality contract of `gradmod.kernels.reference`,
``modulate_(grads, coefficient, noise_scale, generator) -> None`` (`get_kernel`).

Under ``torch.compile`` `modulate_modalities_` is one custom operator, ``torch.ops.gradmod.modulate_modalities_``
(`gradmod.kernels._op`): a compiled optimizer step with gradmod's hook has no graph break in the kernels.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from types import ModuleType

import torch
from torch import Tensor

from gradmod.kernels._common import NoiseKey, check_modality_scalars

Kernel = Callable[[Sequence[Tensor], Tensor, "Tensor | None", "torch.Generator | None"], None]

BACKENDS = ("auto", "reference", "foreach", "triton")

_warned_fallback = False


def _triton_module() -> ModuleType | None:
    """`gradmod.kernels.triton`, or ``None`` (with one warning saying why) when Triton cannot be used."""
    global _warned_fallback
    try:
        from gradmod.kernels import triton as triton_kernel
    except ImportError as error:  # triton missing or broken
        reason = f"triton does not import ({error})"
    else:
        ok, reason = triton_kernel.is_available()
        if ok:
            return triton_kernel
    if not _warned_fallback:
        warnings.warn(f"gradmod: falling back to the foreach kernel: {reason}", RuntimeWarning, stacklevel=4)
        _warned_fallback = True
    return None


@functools.cache
def get_kernel(backend: str, device: torch.device) -> Kernel:
    """The one-modality kernel of ``backend`` on ``device`` (``"auto"`` resolved as documented above).

    Resolved once per (backend, device) and cached.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "reference":
        from gradmod.kernels.reference import modulate_

        return modulate_
    if backend == "triton" or (backend == "auto" and device.type == "cuda"):
        module = _triton_module()
        if module is not None:
            return module.modulate_
        if backend == "triton":
            raise RuntimeError("backend='triton' was requested but Triton is not usable here (see the warning)")
    from gradmod.kernels.foreach import modulate_

    return modulate_


_generators: dict[str, torch.Generator] = {}


#: Stride of the shard index in a generator's seed: ⌊2³²/φ⌋, odd (see `noise_generator`).
_SHARD_STRIDE = 0x9E3779B9


def noise_generator(device: torch.device, key: NoiseKey, modality: int, num_modalities: int) -> torch.Generator:
    """The generator of ``device``, re-seeded for modality ``modality`` at ``key``: counter-based noise.

    Stream ``(seed·1,000,003 + step·M + modality + shard·0x9E3779B9) mod (2⁶³ − 1)``: distinct for every
    (step, modality) of a seed; the generator carries no state between steps, so there is nothing to save or
    synchronise. CPU generators keep only the low 32 bits of a seed, so the shard term is an odd multiple of
    the golden ratio times 2³²: different shards of up to 64 are then ≥ 3·10⁷ apart in that space, and their
    streams stay distinct for the first ~10⁷ steps (CUDA generators keep all 64 bits). Needs a host step: a
    device step raises ``ValueError``.
    """
    if key.on_device:
        raise ValueError(
            "the reference and foreach backends seed a torch.Generator from the step on the host, but the step is "
            "a device tensor (capture-safe mode): use backend='triton' (CUDA) or a host step"
        )
    name = str(device)
    if name not in _generators:
        _generators[name] = torch.Generator(device=device)
    stream = (key.seed * 1_000_003 + key.step * num_modalities + modality + key.shard * _SHARD_STRIDE) % (2**63 - 1)
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

    Every gradient ``g`` of modality ``m`` becomes ``k_m·g + c_m·(σ(g) + 1e-8)·z`` (`gradmod.kernels.reference`)
    with ``z`` from the backend's stream at ``key`` (module docstring). ``coefficients`` and ``noise_scales``
    are 1-d floating-point tensors with one entry per modality, on the host or on the gradients' device
    (``noise_scales=None`` adds no noise, and ``key`` may then be ``None``). Gradients may live on several
    devices and in several dtypes. ``stds[m][i]``, when given, is the σ of the whole tensor that
    ``groups[m][i]`` is a shard of. On CUDA the Triton backend makes two launches per step for all modalities
    (per device and dtype), reads a device step (``key.step`` a 0-d int64 tensor) inside the kernel and
    synchronises nothing with the host.
    """
    if torch.compiler.is_compiling():
        return _op.call(groups, coefficients, noise_scales, key, backend, stds)
    return _modulate(groups, coefficients, noise_scales, key, backend, stds)


def _modulate(
    groups: Sequence[Sequence[Tensor]],
    coefficients: Tensor,
    noise_scales: Tensor | None,
    key: NoiseKey | None,
    backend: str,
    stds: Sequence[Sequence[Tensor]] | None,
) -> None:
    """`modulate_modalities_`, run eagerly."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if stds is not None and [len(s) for s in stds] != [len(g) for g in groups]:
        raise ValueError("stds must hold one σ per gradient: stds[m][i] for groups[m][i]")
    if noise_scales is not None and key is None:
        raise ValueError("noise_scales were given without a NoiseKey")
    if backend == "triton" or (backend == "auto" and torch.cuda.is_available()):
        module = _triton_module()
        if module is None and backend == "triton":
            raise RuntimeError("backend='triton' was requested but Triton is not usable here (see the warning)")
        if module is not None and (backend == "triton" or not module.INTERPRETED):
            leftovers: list | None = None if backend == "triton" else []
            module.modulate_modalities_(groups, coefficients, noise_scales, key, stds, leftovers)
            if not leftovers:
                return
            groups, stds = _regroup(leftovers, len(groups), stds is not None)
        backend = "foreach"
    check_modality_scalars(coefficients, noise_scales, len(groups))
    _per_modality(groups, coefficients, noise_scales, key, backend, stds)


def _regroup(leftovers: list, num_modalities: int, with_stds: bool):
    """``(modality, grad, std)`` triples back into per-modality lists."""
    groups: list[list[Tensor]] = [[] for _ in range(num_modalities)]
    stds: list[list[Tensor]] = [[] for _ in range(num_modalities)]
    for modality, grad, sigma in leftovers:
        groups[modality].append(grad)
        stds[modality].append(sigma)
    return groups, stds if with_stds else None


def _per_modality(
    groups: Sequence[Sequence[Tensor]],
    coefficients: Tensor,
    noise_scales: Tensor | None,
    key: NoiseKey | None,
    backend: str,
    stds: Sequence[Sequence[Tensor]] | None,
) -> None:
    """The generator-seeded backends: each modality's share on each device gets its own re-seeded generator."""
    kernel_name = "reference" if backend == "reference" else "foreach"
    for index, grads in enumerate(groups):
        by_device: dict[torch.device, list[int]] = {}
        for position, grad in enumerate(grads):
            by_device.setdefault(grad.device if isinstance(grad, Tensor) else None, []).append(position)
        k = coefficients[index]
        scale = None if noise_scales is None else noise_scales[index]
        for device, positions in by_device.items():
            group = [grads[p] for p in positions]
            generator = None if scale is None else noise_generator(device, key, index, len(groups))
            kernel = get_kernel(kernel_name, device if device is not None else torch.device("cpu"))
            if stds is None:
                kernel(group, k, scale, generator)
            else:
                kernel(group, k, scale, generator, stds=[stds[index][p] for p in positions])


from gradmod.kernels import _op

__all__ = ["BACKENDS", "Kernel", "NoiseKey", "get_kernel", "modulate_modalities_", "noise_generator"]
