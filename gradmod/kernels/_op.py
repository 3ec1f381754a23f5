"""`gradmod.kernels.modulate_modalities_` as one ``torch.library`` custom operator, for ``torch.compile``.

Dynamo cannot trace the kernels' host code (generators, launch tables keyed by data pointers, Triton
launches) without graph breaks. Under compilation `gradmod.kernels.modulate_modalities_` therefore calls
``torch.ops.gradmod.modulate_modalities_``: an opaque operator that mutates the gradients in place and
returns nothing, so the compiled graph keeps it as one call and runs the eager implementation there. Its
arguments are the flattened call: every gradient in one list with the modalities' counts, the key's parts
as integers (the seed reduced modulo ``2⁶³ − 1``, which leaves every noise stream unchanged), a device
step as an optional tensor, and the optional σ as a flag and a list.
"""

# No ``from __future__ import annotations``: torch.library reads the operator's schema from the annotations.

from collections.abc import Sequence

import torch
from torch import Tensor

from gradmod.kernels._common import NoiseKey

_SEED_MODULUS = 2**63 - 1


@torch.library.custom_op("gradmod::modulate_modalities_", mutates_args=("grads",))
def modulate_modalities_op(
    grads: list[Tensor],
    counts: list[int],
    coefficients: Tensor,
    noise_scales: Tensor | None,
    has_key: bool,
    seed: int,
    step: int,
    device_step: Tensor | None,
    shard: int,
    backend: str,
    has_stds: bool,
    stds: list[Tensor],
) -> None:
    """``gradmod.kernels.modulate_modalities_`` on the flattened arguments (see the module docstring)."""
    from gradmod.kernels import _modulate

    groups, sigmas, start = [], [] if has_stds else None, 0
    for count in counts:
        groups.append(grads[start : start + count])
        if sigmas is not None:
            sigmas.append(stds[start : start + count])
        start += count
    key = NoiseKey(seed, device_step if device_step is not None else step, shard) if has_key else None
    _modulate(groups, coefficients, noise_scales, key, backend, sigmas)


@modulate_modalities_op.register_fake
def _(*args) -> None:  # mutates its inputs, returns nothing: nothing to describe
    return None


def call(
    groups: Sequence[Sequence[Tensor]],
    coefficients: Tensor,
    noise_scales: Tensor | None,
    key: NoiseKey | None,
    backend: str,
    stds: Sequence[Sequence[Tensor]] | None,
) -> None:
    """Flatten the arguments of `gradmod.kernels.modulate_modalities_` into one operator call."""
    grads = [grad for members in groups for grad in members]
    counts = [len(members) for members in groups]
    flat_stds = [] if stds is None else [sigma for sigmas in stds for sigma in sigmas]
    device_step = key.step if key is not None and isinstance(key.step, Tensor) else None
    modulate_modalities_op(
        grads,
        counts,
        coefficients,
        noise_scales,
        key is not None,
        0 if key is None else key.seed % _SEED_MODULUS,
        0 if key is None or device_step is not None else key.step,
        device_step,
        0 if key is None else key.shard,
        backend,
        stds is not None,
        flat_stds,
    )
