"""Sharded gradients: modulating DTensor gradients (FSDP2's ``fully_shard``, HSDP) on their local shards.

Under ``torch.distributed.fsdp.fully_shard`` each rank holds a slice (shard) of every gradient, as a
``DTensor`` whose placements say which mesh dimensions shard it (``Shard``) and which hold copies
(``Replicate``, HSDP's replicate dimension). `modulate_sharded_` applies the step of
`gradmod.kernels.modulate_modalities_` to such gradients in place, on their local shards, so that the
result is the one of the whole tensor:

* **Coefficient.** ``g ← k·g`` is elementwise: each shard is scaled by its modality's ``k``.
* **Noise scale.** ``σ(g)`` is the unbiased standard deviation of the *whole* tensor. Each shard's count,
  mean and sum of squared deviations are combined across the ranks that hold the tensor's other slices
  (`combine_moments`, the parallel-variance formula of Chan, Golub & LeVeque, *Algorithms for Computing
  the Sample Variance: Analysis and Recommendations*, 1983). The rows of all sharded tensors of all
  modalities travel in one ``all_gather`` per sharding mesh dimension (`whole_stds`): one collective per
  step for FSDP and HSDP.
* **Noise.** No backend numbers noise by the element's index in the *whole* tensor, so each slice draws
  from its own stream: the backend's stream (`gradmod.kernels`) at ``NoiseKey(seed, step, shard=1 + r)``,
  where ``r`` is the lowest global rank holding the same slice, over the modality's local shards in
  their order, as the unsharded stream goes over whole tensors. Ranks that hold the same slice (HSDP's
  replicate dimension) share ``r`` and draw identical noise; ranks holding different slices have
  different ``r`` and draw different noise. Gradients that are plain tensors (replicated, DDP-style)
  keep the unsharded stream (``shard=0``), so DDP-style replicas stay identical too.

With noise, gradients with a ``Partial`` placement (not yet reduced) are refused: neither their σ nor
their noise would be that of the gradient they sum to. Without noise they are scaled like any other
(``k`` times a sum is the sum of ``k`` times its terms).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from gradmod.kernels import NoiseKey, modulate_modalities_

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor

__all__ = ["combine_moments", "is_dtensor", "modulate_sharded_", "whole_stds"]


def combine_moments(count: Tensor, mean: Tensor, m2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Count, mean and sum of squared deviations of the union of parts given along dimension 0.

    For parts ``k`` with ``n_k`` elements, mean ``μ_k`` and ``M2_k = Σ (x − μ_k)²``:

    ``n = Σ n_k``,  ``μ = Σ n_k μ_k / n``,  ``M2 = Σ M2_k + Σ n_k (μ_k − μ)²``

    — the pairwise update of Chan, Golub & LeVeque (1983), ``M2 = M2_a + M2_b + δ²·n_a·n_b/n``, applied to
    all parts at once. The deviations of the parts' means from the merged mean are formed explicitly, so a
    large mean does not cancel the variance. Empty parts (``n_k = 0``) add nothing; the union of empty
    parts has ``n = μ = M2 = 0``. The unbiased variance of the union is ``M2 / (n − 1)``.
    """
    total = count.sum(0)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    combined_mean = torch.where(total > 0, (count * mean).sum(0) / safe, torch.zeros_like(total))
    deviation = mean - combined_mean
    return total, combined_mean, m2.sum(0) + (count * deviation * deviation).sum(0)


def _local_moments(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    """``[n, μ, M2]`` of each local shard, as a float64 ``[T, 3]`` tensor on ``device`` (zeros when empty).

    Nothing is read back to the host: the counts are filled in on the device.
    """
    rows = []
    for tensor in tensors:
        values = tensor.detach()
        n = torch.full((), float(values.numel()), dtype=torch.float64, device=device)
        if values.numel() == 0:
            rows.append(torch.stack([n, n, n]))
            continue
        if values.dtype not in (torch.float32, torch.float64):
            values = values.float()
        variance, mean = (value.to(device, torch.float64) for value in torch.var_mean(values, correction=0))
        rows.append(torch.stack([n, mean, variance * n]))
    return torch.stack(rows)


def _collective_device(mesh: DeviceMesh) -> torch.device:
    """Where the mesh's process groups exchange tensors (the current accelerator, or the CPU)."""
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, getattr(torch, mesh.device_type).current_device())


def _sharding_dims(grad: DTensor) -> tuple[int, ...]:
    """The mesh dimensions that shard ``grad``; a ``Partial`` placement raises a ``ValueError``."""
    dims = []
    for dim, placement in enumerate(grad.placements):
        if placement.is_partial():
            raise ValueError(
                f"a sharded gradient of shape {tuple(grad.shape)} has placements {tuple(grad.placements)}: a "
                "Partial placement holds a term of an unreduced sum, whose σ and noise are not those of the "
                "gradient: reduce the gradients before optimizer.step() (or modulate without noise)"
            )
        if placement.is_shard():
            dims.append(dim)
    return tuple(dims)


def _slice_holder(mesh: DeviceMesh, dims: tuple[int, ...]) -> int:
    """The lowest global rank of ``mesh`` holding the same slice as this rank when ``dims`` shard a tensor."""
    coordinate = mesh.get_coordinate()
    index = tuple(coordinate[d] if d in dims else slice(None) for d in range(mesh.ndim))
    return int(mesh.mesh[index].min())


def _all_gather(output: Tensor, rows: Tensor, group: dist.ProcessGroup) -> None:
    """Every rank's ``rows`` concatenated into ``output`` (``all_gather_single`` where torch has it)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, rows, group=group)


def whole_stds(grads: Sequence[DTensor]) -> list[Tensor]:
    """σ of each whole tensor that the DTensors ``grads`` are shards of, from their local shards.

    ``σ = √(M2 / (n − 1))`` over all ``n`` elements of the tensor (0 for one element, as
    `gradmod.functional.ge_noise_std` without its ``1e-8``), as 0-d float32 tensors. Each rank's
    ``[n, μ, M2]`` rows are exchanged with one ``all_gather`` per (mesh, sharding mesh dimension) for all
    of ``grads`` together and merged with `combine_moments`; a tensor sharded along several mesh
    dimensions is merged dimension by dimension. A collective: every rank of the sharding groups calls it
    with the same tensors in the same order (this rank must hold a slice of each).
    """
    by_mesh: dict[DeviceMesh, list[int]] = {}
    for index, grad in enumerate(grads):
        by_mesh.setdefault(grad.device_mesh, []).append(index)
    moments: list[Tensor] = [torch.empty(0)] * len(grads)
    for mesh, indices in by_mesh.items():
        rows = _local_moments([grads[i].to_local() for i in indices], _collective_device(mesh))
        for dim in range(mesh.ndim):
            sharded = [row for row, i in enumerate(indices) if dim in _sharding_dims(grads[i])]
            if not sharded:
                continue
            group = mesh.get_group(dim)
            local = rows[sharded]
            gathered = local.new_empty((dist.get_world_size(group) * local.shape[0], 3))
            _all_gather(gathered, local, group)
            parts = gathered.view(-1, *local.shape).unbind(-1)
            rows[sharded] = torch.stack(combine_moments(*parts), dim=-1)
        for row, i in enumerate(indices):
            moments[i] = rows[row]
    stds = []
    for n, _, m2 in moments:
        variance = torch.where(n > 1, m2 / (n - 1).clamp_min(1.0), torch.zeros_like(m2))
        stds.append(variance.sqrt().float())
    return stds


def is_dtensor(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (without importing that module)."""
    return type(tensor).__name__ == "DTensor" and type(tensor).__module__.startswith("torch.distributed")


def modulate_sharded_(
    groups: Sequence[Sequence[Tensor]],
    coefficients: Tensor,
    noise_scales: Tensor | None,
    key: NoiseKey | None,
    backend: str = "auto",
) -> None:
    """`gradmod.kernels.modulate_modalities_` for modalities whose gradients may be DTensors.

    Plain tensors go through ``modulate_modalities_`` as they are (stream ``key``). DTensors are modulated
    in place on their local shards, with the σ of their whole tensor (`whole_stds`, computed only when
    ``noise_scales`` is given) and the noise stream of their slice, ``NoiseKey(seed, step, 1 + r)`` (see
    the module's docstring). With noise it is a collective: every rank calls it at every modulated step.
    """
    if key is not None and key.shard != 0:
        raise ValueError(f"modulate_sharded_ assigns the shards' streams itself: pass a key with shard=0, got {key}")
    plain: list[list[Tensor]] = [[] for _ in groups]
    sharded: list[tuple[int, DTensor]] = []
    for modality, grads in enumerate(groups):
        for grad in grads:
            if not is_dtensor(grad):
                plain[modality].append(grad)
            elif grad.device_mesh.get_coordinate() is not None:  # else this rank holds no slice of it
                sharded.append((modality, grad))
    if noise_scales is None:  # k·g is elementwise: the local shards are scaled like any tensor
        for modality, grad in sharded:
            plain[modality].append(grad.to_local())
        modulate_modalities_(plain, coefficients, None, key, backend)
        return
    stds = whole_stds([grad for _, grad in sharded])  # raises on a Partial placement, before any change
    holders: dict[tuple[DeviceMesh, tuple[int, ...]], int] = {}
    streams: dict[int, tuple[list[list[Tensor]], list[list[Tensor]]]] = {}
    for (modality, grad), sigma in zip(sharded, stds):
        layout = (grad.device_mesh, _sharding_dims(grad))
        if layout not in holders:
            holders[layout] = _slice_holder(*layout)
        shards, sigmas = streams.setdefault(holders[layout], ([[] for _ in groups], [[] for _ in groups]))
        shards[modality].append(grad.to_local())
        sigmas[modality].append(sigma)
    modulate_modalities_(plain, coefficients, noise_scales, key, backend)
    for holder in sorted(streams):
        shards, sigmas = streams[holder]
        stream = NoiseKey(key.seed, key.step, shard=1 + holder)
        modulate_modalities_(shards, coefficients, noise_scales, stream, backend, stds=sigmas)
