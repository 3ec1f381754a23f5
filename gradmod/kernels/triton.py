"""Fused Triton kernels: the OGM-GE update over all gradients of a device/dtype group in two launches.

Same contract as `gradmod.kernels.reference` (``g ← k·g + c·(σ(g) + 1e-8)·z``, Peng et al., CVPR
2022). Every tensor is cut into chunks; one program per chunk:

1. ``_moments_kernel`` — each program reads its chunk once and writes the chunk's count, mean and centred
   sum of squares ``M2``, combining its blocks with the parallel-variance update of Chan, Golub and
   LeVeque (``n = n_a + n_b``, ``δ = m_b − m_a``, ``M2 = M2_a + M2_b + δ²·n_a·n_b/n``); each block's own
   ``M2`` is centred on the block mean in registers, so a large mean does not cancel the variance.
2. ``_update_kernel`` — each program combines the partials of its tensor (same formula, vectorised:
   ``M2 = Σ M2_j + Σ n_j (m_j − m)²``), takes ``σ = √(M2 / (n − 1))`` (0 for one element) and rewrites its
   chunk as ``k·g + c·(σ + 1e-8)·z`` in one read and one write.

Without noise only the update kernel runs (one launch). Statistics and arithmetic are in float32 (float64
for float64 gradients); the coefficient is rounded to the gradient dtype first, as the reference does,
so the deterministic part matches it exactly.

**Noise.** ``z`` is Philox-4x32-10 (``tl.randn4x``, Box–Muller): element ``e`` of the tensor at position
``i`` of ``grads`` takes output ``⌊(e mod B)/(B/4)⌋`` of counter ``i·2⁴⁰ + ⌊e/B⌋·B/4 + (e mod B/4)``, with
``B`` = `BLOCK` — fixed by the seed, the list position and the element index alone, so it does not
depend on chunking, grouping, the other tensors or the GPU model. The 63-bit seed is drawn per call with
``torch.randint`` from ``generator`` (the default generator of the gradients' device when ``None``), so
the generator's state reproduces the run; the kernel loads it from device memory, so there is **no host
synchronisation** when the generator lives on the gradients' device (a CPU generator, coefficient or noise
scale goes through a pinned, non-blocking copy). The stream differs from the reference's ``torch.randn``
stream: tests compare distributions.

Pointers, sizes and chunk boundaries are passed in one small int64 table, uploaded once per distinct
set of gradient buffers and cached. Dense tensors in any dimension order (e.g. channels-last) are
modulated where they lie; other strided views through a contiguous copy written back.

Importing this module raises ``ImportError`` when Triton is missing (the dispatcher in
`gradmod.kernels` then falls back to ``foreach``); `is_available` says whether the kernels
can run here.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from gradmod._internal import STD_EPS
from gradmod.kernels._common import check_scalars, group_by_device_and_dtype, to_device

#: Elements per block (a power of two, a multiple of 4: each Philox call yields 4 normals).
BLOCK = 2048
#: A chunk spans at least this many blocks …
MIN_BLOCKS_PER_CHUNK = 4
#: … and a tensor is cut into at most this many chunks (a power of two: the update kernel combines the
#: chunk statistics of a tensor in one vector).
MAX_CHUNKS_PER_TENSOR = 1024
#: Bits of the Philox counter below the tensor's list position.
_POSITION_SHIFT = 40
_PLAN_CACHE_SIZE = 16

# The plan (int64): a tensor table, one row per tensor, with the columns below, and a chunk table, one
# row ``[tensor_row, start_element]`` per chunk.
_COLUMNS = tl.constexpr(6)
_PTR = tl.constexpr(0)
_NUMEL = tl.constexpr(1)
_CHUNK_LEN = tl.constexpr(2)
_FIRST_CHUNK = tl.constexpr(3)
_NUM_CHUNKS = tl.constexpr(4)
_POSITION = tl.constexpr(5)

_TRITON_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


@triton.jit
def _moments_kernel(tensor_table, chunk_table, partials, DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Count, mean and centred sum of squares of one chunk (program = chunk)."""
    chunk = tl.program_id(0)
    tensor = tl.load(chunk_table + 2 * chunk)
    start = tl.load(chunk_table + 2 * chunk + 1)
    row = tensor_table + tensor * _COLUMNS
    ptr = tl.load(row + _PTR).to(tl.pointer_type(DTYPE))
    end = tl.minimum(start + tl.load(row + _CHUNK_LEN), tl.load(row + _NUMEL))
    count = tl.zeros((), ACC)
    mean = tl.zeros((), ACC)
    m2 = tl.zeros((), ACC)
    for block_start in range(start, end, BLOCK):
        offsets = block_start + tl.arange(0, BLOCK)
        mask = offsets < end
        x = tl.load(ptr + offsets, mask=mask, other=0.0).to(ACC)
        block_count = tl.sum(mask.to(ACC), axis=0)
        block_mean = tl.sum(x, axis=0) / block_count
        centred = tl.where(mask, x - block_mean, 0.0)
        block_m2 = tl.sum(centred * centred, axis=0)
        total = count + block_count
        delta = block_mean - mean
        mean += delta * (block_count / total)
        m2 += block_m2 + delta * delta * (count * block_count / total)
        count = total
    tl.store(partials + 3 * chunk, count)
    tl.store(partials + 3 * chunk + 1, mean)
    tl.store(partials + 3 * chunk + 2, m2)


@triton.jit
def _scale_add_quarter(ptr, offsets, end, k, scale, z, DTYPE: tl.constexpr, ACC: tl.constexpr, HAS_NOISE: tl.constexpr):
    """``g ← k·g (+ scale·z)`` on one quarter of a block."""
    mask = offsets < end
    x = tl.load(ptr + offsets, mask=mask, other=0.0).to(ACC)
    y = x * k
    if HAS_NOISE:
        y += scale * z.to(ACC)
    tl.store(ptr + offsets, y.to(DTYPE), mask=mask)


@triton.jit
def _update_kernel(
    tensor_table,
    chunk_table,
    partials,
    coefficient_ptr,
    noise_scale_ptr,
    seed_ptr,
    DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    MAX_CHUNKS: tl.constexpr,
    POSITION_SHIFT: tl.constexpr,
    STD_EPS: tl.constexpr,
    HAS_NOISE: tl.constexpr,
):
    """``g ← k·g + c·(σ(g) + 1e-8)·z`` on one chunk (program = chunk), σ from the tensor's partial moments."""
    chunk = tl.program_id(0)
    tensor = tl.load(chunk_table + 2 * chunk)
    start = tl.load(chunk_table + 2 * chunk + 1)
    row = tensor_table + tensor * _COLUMNS
    ptr = tl.load(row + _PTR).to(tl.pointer_type(DTYPE))
    numel = tl.load(row + _NUMEL)
    end = tl.minimum(start + tl.load(row + _CHUNK_LEN), numel)
    k = tl.load(coefficient_ptr).to(DTYPE).to(ACC)
    scale = tl.zeros((), ACC)
    seed = tl.zeros((), tl.int64)
    if HAS_NOISE:
        first = tl.load(row + _FIRST_CHUNK)
        j = tl.arange(0, MAX_CHUNKS)
        valid = j < tl.load(row + _NUM_CHUNKS)
        counts = tl.load(partials + 3 * (first + j), mask=valid, other=0.0)
        means = tl.load(partials + 3 * (first + j) + 1, mask=valid, other=0.0)
        m2s = tl.load(partials + 3 * (first + j) + 2, mask=valid, other=0.0)
        mean = tl.sum(counts * means, axis=0) / tl.sum(counts, axis=0)
        spread = tl.where(valid, means - mean, 0.0)
        m2 = tl.sum(m2s, axis=0) + tl.sum(counts * spread * spread, axis=0)
        variance = m2 / tl.maximum(numel - 1, 1).to(ACC)
        scale = (tl.sqrt(variance) + STD_EPS) * tl.load(noise_scale_ptr).to(ACC)
        seed = tl.load(seed_ptr)
    QUARTER: tl.constexpr = BLOCK // 4
    lanes = tl.arange(0, QUARTER)
    stream = tl.load(row + _POSITION) << POSITION_SHIFT
    for block_start in range(start, end, BLOCK):
        z0 = tl.zeros((QUARTER,), tl.float32)
        z1 = z0
        z2 = z0
        z3 = z0
        if HAS_NOISE:
            z0, z1, z2, z3 = tl.randn4x(seed, stream + block_start // 4 + lanes)
        _scale_add_quarter(ptr, block_start + lanes, end, k, scale, z0, DTYPE, ACC, HAS_NOISE)
        _scale_add_quarter(ptr, block_start + QUARTER + lanes, end, k, scale, z1, DTYPE, ACC, HAS_NOISE)
        _scale_add_quarter(ptr, block_start + 2 * QUARTER + lanes, end, k, scale, z2, DTYPE, ACC, HAS_NOISE)
        _scale_add_quarter(ptr, block_start + 3 * QUARTER + lanes, end, k, scale, z3, DTYPE, ACC, HAS_NOISE)


#: Whether ``TRITON_INTERPRET=1`` was set when this module was imported (the kernels then run on CPU tensors).
INTERPRETED = isinstance(_update_kernel, InterpretedFunction)


def is_available() -> tuple[bool, str]:
    """Whether the kernels can run here, and why (or why not)."""
    if INTERPRETED:
        return True, "Triton interpreter (TRITON_INTERPRET=1): runs on CPU tensors"
    if not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 before importing gradmod to run the kernels on CPU)"
    return True, f"CUDA device {torch.cuda.get_device_name()} with Triton {triton.__version__}"


def _is_dense(tensor: Tensor) -> bool:
    """Whether ``tensor`` covers exactly ``numel`` consecutive elements from its data pointer (any dim order)."""
    if tensor.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(tensor.shape, tensor.stride()) if s > 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _chunk_length(numel: int) -> int:
    """Elements per chunk for a tensor of ``numel`` elements: a multiple of `BLOCK`."""
    blocks = max(MIN_BLOCKS_PER_CHUNK, math.ceil(numel / (BLOCK * MAX_CHUNKS_PER_TENSOR)))
    return blocks * BLOCK


_plan_cache: OrderedDict[tuple, tuple[Tensor, Tensor, int]] = OrderedDict()


def _plan(tensors: Sequence[Tensor], positions: Sequence[int], device: torch.device) -> tuple[Tensor, Tensor, int]:
    """The tensor table, the chunk table and the number of chunks, on ``device``.

    Cached by (pointer, size, list position) of every tensor, which determine the tables entirely.
    """
    key = (device, tensors[0].dtype, tuple((t.data_ptr(), t.numel(), p) for t, p in zip(tensors, positions)))
    if key in _plan_cache:
        _plan_cache.move_to_end(key)
        return _plan_cache[key]
    rows: list[int] = []
    chunks: list[int] = []
    for index, (tensor, position) in enumerate(zip(tensors, positions)):
        numel = tensor.numel()
        length = _chunk_length(numel)
        count = math.ceil(numel / length)
        rows += [tensor.data_ptr(), numel, length, len(chunks) // 2, count, position]
        for c in range(count):
            chunks += [index, c * length]
    table = to_device(torch.tensor(rows + chunks, dtype=torch.int64), device, torch.int64)
    plan = (table[: len(rows)], table[len(rows) :], len(chunks) // 2)
    _plan_cache[key] = plan
    if len(_plan_cache) > _PLAN_CACHE_SIZE:
        _plan_cache.popitem(last=False)
    return plan


def _seed(generator: torch.Generator | None, device: torch.device) -> Tensor:
    """One 63-bit Philox seed drawn from ``generator`` (the default generator of ``device`` when ``None``)."""
    where = generator.device if generator is not None else device
    return torch.randint(0, 2**63 - 1, (1,), generator=generator, device=where, dtype=torch.int64)


def modulate_(
    grads: Sequence[Tensor],
    coefficient: Tensor,
    noise_scale: Tensor | None,
    generator: torch.Generator | None = None,
) -> None:
    """Scale ``grads`` in place by ``coefficient`` and add GE noise of std ``noise_scale·(σ(g)+1e-8)``.

    Two launches per device/dtype group with noise (statistics, update), one without. Tensors must live
    on CUDA (on the CPU under ``TRITON_INTERPRET=1``).
    """
    check_scalars(coefficient, noise_scale)
    groups = group_by_device_and_dtype(grads)
    kernel_device = "cpu" if INTERPRETED else "cuda"
    seed = None
    for (device, dtype), members in groups.items():
        if device.type != kernel_device:
            raise ValueError(
                f"the triton kernel runs on {kernel_device} tensors here, got a gradient on {device}; "
                "use backend='foreach'"
            )
        if seed is None and noise_scale is not None:
            seed = _seed(generator, device)
        positions = [position for position, _ in members]
        tensors = [grad if _is_dense(grad) else grad.contiguous() for _, grad in members]
        tensor_table, chunk_table, num_chunks = _plan(tensors, positions, device)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        constants = dict(DTYPE=_TRITON_DTYPES[dtype], ACC=_TRITON_DTYPES[acc], BLOCK=BLOCK)
        k = to_device(coefficient, device, acc)
        partials = c = group_seed = None
        if noise_scale is not None:
            c = to_device(noise_scale, device, acc)
            group_seed = to_device(seed, device, torch.int64)
            partials = torch.empty(num_chunks, 3, device=device, dtype=acc)
            _moments_kernel[(num_chunks,)](tensor_table, chunk_table, partials, **constants)
        _update_kernel[(num_chunks,)](
            tensor_table,
            chunk_table,
            partials,
            k,
            c,
            group_seed,
            MAX_CHUNKS=MAX_CHUNKS_PER_TENSOR,
            POSITION_SHIFT=_POSITION_SHIFT,
            STD_EPS=STD_EPS,
            HAS_NOISE=noise_scale is not None,
            **constants,
        )
        for (_, grad), tensor in zip(members, tensors):
            if tensor is not grad:
                grad.copy_(tensor)
