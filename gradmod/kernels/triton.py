"""Fused Triton kernels: the OGM-GE update of every modality's gradients in two launches per step.

Same arithmetic as `gradmod.kernels.reference` (``g ← k·g + c·(σ(g) + 1e-8)·z``, Peng et al., *Balanced
Multimodal Learning via On-the-fly Gradient Modulation*, CVPR 2022), for all modalities at once: the
gradients of every modality that share a device and dtype form one launch group, and every tensor of the
group is cut into chunks, one program per chunk:

1. ``_moments_kernel`` — each program reads its chunk once and combines its blocks' count, mean and
   centred sum of squares ``M2`` with the parallel-variance update of Chan, Golub and LeVeque,
   *Algorithms for Computing the Sample Variance: Analysis and Recommendations* (1983)
   (``n = n_a + n_b``, ``δ = m_b − m_a``, ``M2 = M2_a + M2_b + δ²·n_a·n_b/n``); each block's own ``M2``
   is centred on the block mean in registers, so a large mean does not cancel the variance. A tensor of
   one chunk writes its ``σ = √(M2 / (n − 1))`` (0 for one element) at once; for a tensor of several
   chunks the program that finishes last (an atomic ticket per tensor, reset by that program) combines
   the chunks' partials (``M2 = Σ M2_j + Σ n_j (m_j − m)²``) and writes ``σ``: **σ is computed once per
   tensor**.
2. ``_update_kernel`` — each program reads its tensor's ``σ``, its modality's ``k`` and ``c`` and rewrites
   its chunk as ``k·g + c·(σ + 1e-8)·z`` in one read and one write.

So a step is **two launches per launch group** — two per step when all gradients share one device and
dtype — and one without noise (update only). With given σ (``stds``, for shards of larger tensors) the
statistics are not computed: the given values are stacked (one small op) and the update reads them.
Statistics and arithmetic are in float32 (float64 for float64 gradients); the coefficient is rounded to
the gradient dtype first, as the reference does, so the deterministic part matches it exactly.

**Noise stream.** ``z`` is Philox-4x32-10 (as ``tl.philox`` implements it; Salmon et al., *Parallel Random
Numbers: As Easy as 1, 2, 3*, 2011) turned into normals by Box–Muller (as ``tl.randn4x`` does: outputs
``(r₀, r₁)`` and ``(r₂, r₃)`` give two pairs). Element ``e`` of the tensor at position ``i`` of modality
``m``'s list, at step ``s``, takes output ``j = ⌊(e mod B)/(B/4)⌋`` of the counter

    q  = ⌊e/B⌋·B/4 + (e mod B/4),      B = BLOCK = 2048
    c₀ = q mod 2³²,      c₁ = ⌊q/2³²⌋ + 2⁸·i,
    c₂ = s mod 2³²,      c₃ = ⌊s/2³²⌋ mod 2¹⁶ + 2¹⁶·m

under the 64-bit key ``(seed mod (2⁶³ − 1) + shard·0x9E3779B97F4A7C15) mod 2⁶⁴`` (low word ``k₀``, high
word ``k₁``) of ``NoiseKey(seed, step, shard)``. Distinct (step, modality, position, element) are distinct
counters, so they never share a draw, and the noise of an element depends on nothing else: not on the
other tensors, the grouping, the chunking, the device or the GPU model. The key and the step reach the
kernel as arguments or, for a device step (capture-safe mode), are read by the kernel from device memory:
no ``randint``, no re-seeding, no host synchronisation. Limits, checked on the host: ``i < 2²⁴``
tensors per modality, ``m < 2¹⁶`` modalities, a host step below ``2⁴⁸`` (a device step is taken modulo
``2⁴⁸``). The stream differs from the ``torch.randn`` stream of the other backends: tests compare
distributions, and check the counter layout above exactly against a plain re-implementation.

`modulate_` (the one-modality contract of `gradmod.kernels.reference`) draws its 63-bit key per call with
``torch.randint`` from ``generator`` on the gradients' device and runs the same kernels at step 0,
modality 0: a generator state reproduces its noise.

**Launch tables.** The kernels read per-tensor sizes, chunk bounds, positions and modalities from int64
tables cached by those values (so a reallocated gradient buffer — ``zero_grad(set_to_none=True)`` — does
not rebuild them), and the data pointers from a small table cached by the pointers. Where every pointer
of a group is 16-byte aligned (checked on the host) the kernels are told so and use 128-bit loads.
Tables, statistics buffers and tickets are allocated once per structure (and stream) and reused: after
a warm-up step, a step allocates nothing, so it can be captured in a CUDA graph; what a captured graph
uses is never evicted. Dense tensors in any dimension order (e.g. channels-last) are modulated where
they lie; other strided views through a contiguous copy written back.

Importing this module raises ``ImportError`` when Triton is missing (the dispatcher in
`gradmod.kernels` then falls back to ``foreach``); `is_available` says whether the kernels can run here.
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
from gradmod.kernels._common import (
    NoiseKey,
    check_gradient,
    check_modality_scalars,
    check_scalars,
    to_device,
)

#: Elements per block (a power of two, a multiple of 4: each Philox call yields 4 normals).
BLOCK = 2048
#: A chunk spans at least this many blocks …
MIN_BLOCKS_PER_CHUNK = 4
#: … and a tensor is cut into at most this many chunks (a power of two: the last program of a tensor
#: combines its chunk statistics in one vector).
MAX_CHUNKS_PER_TENSOR = 1024
#: Limits of the counter layout (see the module docstring).
MAX_POSITIONS = 2**24
MAX_MODALITIES = 2**16
MAX_STEP = 2**48
#: Seeds enter the key modulo this (as in `gradmod.kernels.noise_generator`).
SEED_MODULUS = 2**63 - 1
#: Multiplier of the shard index in the key (odd, so distinct shards give distinct keys for one seed).
SHARD_MULTIPLIER = 0x9E3779B97F4A7C15
_CACHE_SIZE = 16

# The tensor table (int64), one row per tensor of a launch group, with these columns; the chunk table
# holds one row ``[tensor_row, start_element]`` per chunk; the pointer table one data pointer per row.
_COLUMNS = tl.constexpr(6)
_NUMEL = tl.constexpr(0)
_CHUNK_LEN = tl.constexpr(1)
_FIRST_CHUNK = tl.constexpr(2)
_NUM_CHUNKS = tl.constexpr(3)
_POSITION = tl.constexpr(4)
_MODALITY = tl.constexpr(5)

_TRITON_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


# ------------------------------------------------------------------------------------------ kernels


@triton.jit
def _chunk_bounds(pointers, tensor_table, chunk_table, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The program's tensor row, its table row, its data pointer and its chunk ``[start, end)``."""
    chunk = tl.program_id(0)
    row = tl.load(chunk_table + 2 * chunk)
    start = tl.load(chunk_table + 2 * chunk + 1)
    info = tensor_table + row * _COLUMNS
    end = tl.minimum(start + tl.load(info + _CHUNK_LEN), tl.load(info + _NUMEL))
    ptr = tl.load(pointers + row).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return row, info, ptr, start, end


@triton.jit
def _merge(count, mean, m2, block_count, block_mean, block_m2):
    """Chan–Golub–LeVeque: the moments of the union of two parts."""
    total = count + block_count
    delta = block_mean - mean
    mean += delta * (block_count / total)
    m2 += block_m2 + delta * delta * (count * block_count / total)
    return total, mean, m2


@triton.jit
def _std(m2, numel, ACC: tl.constexpr):
    """``√(M2 / (n − 1))``, 0 for one element."""
    return tl.sqrt(m2 / tl.maximum(numel - 1, 1).to(ACC))


@triton.jit
def _moments_kernel(
    pointers,
    tensor_table,
    chunk_table,
    partials,
    sigmas,
    tickets,
    DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    MAX_CHUNKS: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Moments of one chunk (program = chunk); the last chunk of a tensor to finish writes the tensor's σ."""
    row, info, ptr, start, end = _chunk_bounds(pointers, tensor_table, chunk_table, DTYPE, ALIGNED)
    lanes = tl.arange(0, BLOCK)
    full_end = start + (end - start) // BLOCK * BLOCK
    count = tl.zeros((), ACC)
    mean = tl.zeros((), ACC)
    m2 = tl.zeros((), ACC)
    for block_start in range(start, full_end, BLOCK):
        x = tl.load(ptr + tl.multiple_of(block_start + lanes, BLOCK)).to(ACC)
        block_mean = tl.sum(x, axis=0) / BLOCK
        centred = x - block_mean
        block_m2 = tl.sum(centred * centred, axis=0)
        count, mean, m2 = _merge(count, mean, m2, tl.full((), BLOCK, ACC), block_mean, block_m2)
    if full_end < end:
        offsets = tl.multiple_of(full_end + lanes, BLOCK)
        mask = offsets < end
        x = tl.load(ptr + offsets, mask=mask, other=0.0).to(ACC)
        block_count = tl.sum(mask.to(ACC), axis=0)
        block_mean = tl.sum(x, axis=0) / block_count
        centred = tl.where(mask, x - block_mean, 0.0)
        count, mean, m2 = _merge(count, mean, m2, block_count, block_mean, tl.sum(centred * centred, axis=0))
    numel = tl.load(info + _NUMEL)
    num_chunks = tl.load(info + _NUM_CHUNKS)
    if num_chunks == 1:
        tl.store(sigmas + row, _std(m2, numel, ACC))
    else:
        chunk = tl.program_id(0)
        tl.store(partials + 3 * chunk, count)
        tl.store(partials + 3 * chunk + 1, mean)
        tl.store(partials + 3 * chunk + 2, m2)
        tl.debug_barrier()
        ticket = tl.atomic_add(tickets + row, 1, sem="acq_rel")
        if ticket == num_chunks - 1:  # every other chunk of this tensor has stored its partials
            j = tl.arange(0, MAX_CHUNKS)
            valid = j < num_chunks
            part = partials + 3 * (tl.load(info + _FIRST_CHUNK) + j)
            counts = tl.load(part, mask=valid, other=0.0, volatile=True)
            means = tl.load(part + 1, mask=valid, other=0.0, volatile=True)
            m2s = tl.load(part + 2, mask=valid, other=0.0, volatile=True)
            mean = tl.sum(counts * means, axis=0) / tl.sum(counts, axis=0)
            spread = tl.where(valid, means - mean, 0.0)
            m2 = tl.sum(m2s, axis=0) + tl.sum(counts * spread * spread, axis=0)
            tl.store(sigmas + row, _std(m2, numel, ACC))
            tl.atomic_xchg(tickets + row, 0)  # ready for the next step


@triton.jit
def _normals(key, q, c1, c2, c3):
    """Four blocks of standard normals from Philox-4x32-10 at counters ``(q mod 2³², ⌊q/2³²⌋ + c1, c2, c3)``."""
    zero = tl.zeros_like(q)
    r0, r1, r2, r3 = tl.philox(
        key,
        q.to(tl.uint32),
        ((q >> 32) + c1).to(tl.uint32),
        (zero + c2).to(tl.uint32),
        (zero + c3).to(tl.uint32),
    )
    z0, z1 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r0), tl.uint_to_uniform_float(r1))
    z2, z3 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r2), tl.uint_to_uniform_float(r3))
    return z0, z1, z2, z3


@triton.jit
def _scale_add(
    ptr,
    offsets,
    end,
    k,
    scale,
    z,
    DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    MASKED: tl.constexpr,
):
    """``g ← k·g (+ scale·z)`` on one quarter of a block."""
    if MASKED:
        mask = offsets < end
        x = tl.load(ptr + offsets, mask=mask, other=0.0).to(ACC)
    else:
        x = tl.load(ptr + offsets).to(ACC)
    y = x * k
    if HAS_NOISE:
        y += scale * z.to(ACC)
    if MASKED:
        tl.store(ptr + offsets, y.to(DTYPE), mask=mask)
    else:
        tl.store(ptr + offsets, y.to(DTYPE))


@triton.jit
def _update_block(
    ptr,
    block_start,
    end,
    k,
    scale,
    key,
    c1,
    c2,
    c3,
    DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    MASKED: tl.constexpr,
):
    """``g ← k·g + scale·z`` on the block at ``block_start`` (quarter ``j`` takes Philox output ``j``)."""
    QUARTER: tl.constexpr = BLOCK // 4
    lanes = tl.arange(0, QUARTER)
    z0 = tl.zeros((QUARTER,), tl.float32)
    z1 = z0
    z2 = z0
    z3 = z0
    if HAS_NOISE:
        z0, z1, z2, z3 = _normals(key, block_start // 4 + lanes, c1, c2, c3)
    # Offsets hinted as runs of QUARTER starting at multiples of QUARTER: with an aligned pointer, the
    # unmasked loads and stores become 128-bit accesses.
    first = tl.multiple_of(block_start + lanes, QUARTER)
    _scale_add(ptr, first, end, k, scale, z0, DTYPE, ACC, HAS_NOISE, MASKED)
    _scale_add(ptr, tl.multiple_of(first + QUARTER, QUARTER), end, k, scale, z1, DTYPE, ACC, HAS_NOISE, MASKED)
    _scale_add(ptr, tl.multiple_of(first + 2 * QUARTER, QUARTER), end, k, scale, z2, DTYPE, ACC, HAS_NOISE, MASKED)
    _scale_add(ptr, tl.multiple_of(first + 3 * QUARTER, QUARTER), end, k, scale, z3, DTYPE, ACC, HAS_NOISE, MASKED)


@triton.jit(do_not_specialize=["key", "step"])
def _update_kernel(
    pointers,
    tensor_table,
    chunk_table,
    sigmas,
    coefficients,
    noise_scales,
    key,
    step,
    DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    KEY_IN_MEMORY: tl.constexpr,
    STEP_IN_MEMORY: tl.constexpr,
    STD_EPS: tl.constexpr,
):
    """``g ← k·g + c·(σ(g) + 1e-8)·z`` on one chunk (program = chunk), σ from ``sigmas``."""
    row, info, ptr, start, end = _chunk_bounds(pointers, tensor_table, chunk_table, DTYPE, ALIGNED)
    modality = tl.load(info + _MODALITY)
    k = tl.load(coefficients + modality).to(DTYPE).to(ACC)
    scale = tl.zeros((), ACC)
    seed = tl.zeros((), tl.int64)
    c1 = tl.zeros((), tl.int64)
    c2 = tl.zeros((), tl.int64)
    c3 = tl.zeros((), tl.int64)
    if HAS_NOISE:
        scale = (tl.load(sigmas + row).to(ACC) + STD_EPS) * tl.load(noise_scales + modality).to(ACC)
        if KEY_IN_MEMORY:
            seed = tl.load(key)
        else:
            seed = key.to(tl.int64)
        if STEP_IN_MEMORY:
            s = tl.load(step)
        else:
            s = step.to(tl.int64)
        c1 = tl.load(info + _POSITION) << 8
        c2 = s & 0xFFFFFFFF
        c3 = ((s >> 32) & 0xFFFF) | (modality << 16)
    full_end = start + (end - start) // BLOCK * BLOCK
    for block_start in range(start, full_end, BLOCK):
        _update_block(ptr, block_start, end, k, scale, seed, c1, c2, c3, DTYPE, ACC, BLOCK, HAS_NOISE, False)
    if full_end < end:
        _update_block(ptr, full_end, end, k, scale, seed, c1, c2, c3, DTYPE, ACC, BLOCK, HAS_NOISE, True)


#: Whether ``TRITON_INTERPRET=1`` was set when this module was imported (the kernels then run on CPU tensors).
INTERPRETED = isinstance(_update_kernel, InterpretedFunction)
#: The device type the kernels run on here.
KERNEL_DEVICE_TYPE = "cpu" if INTERPRETED else "cuda"


def is_available() -> tuple[bool, str]:
    """Whether the kernels can run here, and why (or why not)."""
    if INTERPRETED:
        return True, "Triton interpreter (TRITON_INTERPRET=1): runs on CPU tensors"
    if not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 before importing gradmod to run the kernels on CPU)"
    return True, f"CUDA device {torch.cuda.get_device_name()} with Triton {triton.__version__}"


# ------------------------------------------------------------------------------------- launch tables


def _is_dense(tensor: Tensor) -> bool:
    """Whether ``tensor`` covers exactly ``numel`` consecutive elements from its data pointer (any dim order)."""
    if tensor.is_contiguous() or (tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last)):
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


def _upload(values: list[int], device: torch.device) -> tuple[Tensor, Tensor]:
    """An int64 host tensor and its copy on ``device`` (the host tensor is kept with the copy, so that a
    CUDA graph that captured the copy replays it from memory that stays valid)."""
    host = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        host = host.pin_memory()
        return host, host.to(device, non_blocking=True)
    return host, host.to(device)


class _Layout:
    """The launch tables of one group's structure: sizes, positions and modalities of its tensors."""

    __slots__ = ("captured", "chunk_table", "host", "multi_chunk", "num_chunks", "tensor_table", "workspaces")

    def __init__(self, signature: tuple[int, ...], device: torch.device) -> None:
        rows: list[int] = []
        chunks: list[int] = []
        multi_chunk = False
        for row in range(len(signature) // 3):
            numel, position, modality = signature[3 * row : 3 * row + 3]
            length = _chunk_length(numel)
            count = -(-numel // length)
            multi_chunk |= count > 1
            rows += [numel, length, len(chunks) // 2, count, position, modality]
            for c in range(count):
                chunks += [row, c * length]
        self.host, table = _upload(rows + chunks, device)
        self.tensor_table, self.chunk_table = table[: len(rows)], table[len(rows) :]
        self.num_chunks = len(chunks) // 2
        self.multi_chunk = multi_chunk
        self.workspaces: dict[tuple[int, torch.dtype], tuple[Tensor, Tensor, Tensor]] = {}
        self.captured = False

    def workspace(self, stream: int, acc: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """Partial moments, σ per tensor and tickets, one set per stream (work on two streams never mixes)."""
        key = (stream, acc)
        if key not in self.workspaces:
            device = self.tensor_table.device
            rows = self.tensor_table.numel() // 6
            partials = torch.empty(self.num_chunks if self.multi_chunk else 1, 3, device=device, dtype=acc)
            sigmas = torch.empty(rows, device=device, dtype=acc)
            tickets = torch.zeros(rows, device=device, dtype=torch.int32)
            self.workspaces[key] = (partials, sigmas, tickets)
        return self.workspaces[key]


class _PointerTable:
    """The data pointers of one group's tensors on the device, and whether all are 16-byte aligned."""

    __slots__ = ("aligned", "captured", "host", "table")

    def __init__(self, pointers: tuple[int, ...], device: torch.device) -> None:
        self.host, self.table = _upload(list(pointers), device)
        self.aligned = all(p % 16 == 0 for p in pointers)
        self.captured = False


_layouts: OrderedDict[tuple, _Layout] = OrderedDict()
_pointer_tables: OrderedDict[tuple, _PointerTable] = OrderedDict()


def _cached(cache: OrderedDict, kind: type, key: tuple[torch.device, tuple[int, ...]], capturing: bool):
    """``cache[key]``, built as ``kind(values, device)`` on a miss; least recently used entries beyond
    `_CACHE_SIZE` are dropped, except those a CUDA graph captured (its replays read them)."""
    entry = cache.get(key)
    if entry is None:
        entry = cache[key] = kind(key[1], key[0])
        if len(cache) > _CACHE_SIZE:
            for old_key, old in list(cache.items()):
                if not old.captured and old is not entry:
                    del cache[old_key]
                    break
    else:
        cache.move_to_end(key)
    if capturing:
        entry.captured = True
    return entry


# --------------------------------------------------------------------------------------------- host


class _Group:
    """One launch group (device, dtype): what its tables are built from, σ given, strided copies to write back."""

    __slots__ = ("copies", "pointers", "sigmas", "signature")

    def __init__(self) -> None:
        self.signature: list[int] = []
        self.pointers: list[int] = []
        self.sigmas: list[Tensor] = []
        self.copies: list[tuple[Tensor, Tensor]] = []


def _gather(groups, stds, leftovers) -> dict[tuple[torch.device, torch.dtype], _Group]:
    """Check every gradient and sort the non-empty ones into launch groups, in order of first appearance.

    The per-tensor hot path of a step: a handful of attribute reads per gradient, no torch op."""
    launch: dict[tuple[torch.device, torch.dtype], _Group] = {}
    strided = torch.strided
    last_device = last_dtype = group = None
    for modality, grads in enumerate(groups):
        if len(grads) > MAX_POSITIONS:
            raise ValueError(f"the triton kernel takes at most {MAX_POSITIONS} tensors per modality, got {len(grads)}")
        given = None if stds is None else stds[modality]
        for position, grad in enumerate(grads):
            if not isinstance(grad, Tensor) or grad.layout != strided or not (dtype := grad.dtype).is_floating_point:
                check_gradient(grad, position, None if len(groups) == 1 else modality)
            numel = grad.numel()
            if numel == 0:
                continue
            device = grad.device
            if dtype is not last_dtype or device != last_device:
                if device.type != KERNEL_DEVICE_TYPE:
                    if leftovers is None:
                        raise ValueError(
                            f"the triton kernel runs on {KERNEL_DEVICE_TYPE} tensors here, got a gradient on "
                            f"{device}; use backend='foreach'"
                        )
                    leftovers.append((modality, grad, None if given is None else given[position]))
                    continue
                group = launch.get((device, dtype))
                if group is None:
                    group = launch[(device, dtype)] = _Group()
                last_device, last_dtype = device, dtype
            if not grad.is_contiguous() and not _is_dense(grad):
                dense = grad.contiguous()
                group.copies.append((grad, dense))
                grad = dense
            group.signature += (numel, position, modality)
            group.pointers.append(grad.data_ptr())
            if given is not None:
                group.sigmas.append(given[position])
    return launch


def _stream(device: torch.device) -> int:
    return torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0


def _launch(
    groups: Sequence[Sequence[Tensor]],
    coefficients: Tensor,
    noise_scales: Tensor | None,
    key: int | Tensor,
    step: int | Tensor,
    stds: Sequence[Sequence[Tensor]] | None,
    leftovers: list | None,
) -> None:
    """Two launches (one without noise) per launch group of ``groups``; see `modulate_modalities_`."""
    launch = _gather(groups, stds, leftovers)
    has_noise = noise_scales is not None
    for (device, dtype), group in launch.items():
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if capturing:
            _check_capturable(device, coefficients, noise_scales, step)
        if isinstance(step, Tensor) and step.device != device:
            raise ValueError(f"the device step lives on {step.device}, the gradients on {device}")
        signature, addresses = tuple(group.signature), tuple(group.pointers)
        layout = _cached(_layouts, _Layout, (device, signature), capturing)
        pointers = _cached(_pointer_tables, _PointerTable, (device, addresses), capturing)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        constants = {"DTYPE": _TRITON_DTYPES[dtype], "ACC": _TRITON_DTYPES[acc], "BLOCK": BLOCK}
        constants["ALIGNED"] = pointers.aligned
        tables = (pointers.table, layout.tensor_table, layout.chunk_table)
        grid = (layout.num_chunks,)
        partials, sigmas, tickets = layout.workspace(_stream(device), acc)
        k = to_device(coefficients, device, coefficients.dtype)
        c = to_device(noise_scales, device, noise_scales.dtype) if has_noise else None
        with _on(device):
            if has_noise and stds is None:
                _moments_kernel[grid](*tables, partials, sigmas, tickets, MAX_CHUNKS=MAX_CHUNKS_PER_TENSOR, **constants)
            elif has_noise:
                sigmas = _stack_sigmas(group.sigmas, device, acc)
            _update_kernel[grid](
                *tables,
                sigmas,
                k,
                c,
                to_device(key, device, torch.int64) if isinstance(key, Tensor) else _signed(key),
                step,
                HAS_NOISE=has_noise,
                KEY_IN_MEMORY=isinstance(key, Tensor),
                STEP_IN_MEMORY=isinstance(step, Tensor),
                STD_EPS=STD_EPS,
                num_warps=_update_warps(dtype),
                **constants,
            )
        for grad, dense in group.copies:
            grad.copy_(dense)


def _update_warps(dtype: torch.dtype) -> int:
    """Warps of the update kernel: a quarter block (512 elements) spread so that each thread moves 16 bytes."""
    return min(4, dtype.itemsize)


def _stack_sigmas(sigmas: list[Tensor], device: torch.device, acc: torch.dtype) -> Tensor:
    """The given σ of a group's tensors as one vector on ``device`` (one op when they live there already)."""
    if any(s.device != device for s in sigmas):
        sigmas = [to_device(s, device, s.dtype) for s in sigmas]
    stacked = torch.stack([s.reshape(()) for s in sigmas])
    return stacked if stacked.dtype == acc else stacked.to(acc)


class _on:
    """Launch on ``device`` (Triton launches on the current CUDA device)."""

    __slots__ = ("device", "previous")

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.previous = None

    def __enter__(self) -> None:
        if self.device.type == "cuda" and self.device.index != torch.cuda.current_device():
            self.previous = torch.cuda.current_device()
            torch.cuda.set_device(self.device)

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            torch.cuda.set_device(self.previous)


def _signed(value: int) -> int:
    """``value mod 2⁶⁴`` as a signed 64-bit integer (how the kernel receives the key)."""
    value %= 2**64
    return value - 2**64 if value >= 2**63 else value


def philox_key(key: NoiseKey) -> int:
    """The 64-bit Philox key of ``key`` (unsigned).

    ``(seed mod (2⁶³ − 1) + shard·0x9E3779B97F4A7C15) mod 2⁶⁴``.
    """
    return (key.seed % SEED_MODULUS + key.shard * SHARD_MULTIPLIER) % 2**64


def _check_capturable(device: torch.device, coefficients: Tensor, noise_scales: Tensor | None, step) -> None:
    """Under CUDA graph capture every value must come from device memory, or replays would reuse it."""
    for name, value in (("coefficients", coefficients), ("noise_scales", noise_scales)):
        if value is not None and value.device != device:
            raise ValueError(
                f"{name} live on {value.device} while a CUDA graph is being captured on {device}: a replay would "
                "reuse the captured values; keep them on the gradients' device (capture-safe mode)"
            )
    if noise_scales is not None and not isinstance(step, Tensor):
        raise ValueError(
            "a host step while a CUDA graph is being captured: every replay would draw the same noise; pass the "
            "step as a 0-d int64 tensor on the gradients' device (capture-safe mode)"
        )


def modulate_modalities_(
    groups: Sequence[Sequence[Tensor]],
    coefficients: Tensor,
    noise_scales: Tensor | None,
    key: NoiseKey | None,
    stds: Sequence[Sequence[Tensor]] | None = None,
    leftovers: list | None = None,
) -> None:
    """One step for every modality: ``groups[m]`` scaled by ``coefficients[m]`` plus noise of scale ``noise_scales[m]``.

    Two launches per device/dtype group of all modalities together (one without noise), noise from the
    counter-based stream of ``key`` (module docstring); ``stds[m][i]``, when given, replaces the σ of
    ``groups[m][i]``. ``key.step`` may be a 0-d int64 device tensor (read by the kernel). Gradients not on
    the kernels' device raise, or are appended to ``leftovers`` as ``(modality, grad, std)`` when it is a
    list (for the caller to modulate with another backend).
    """
    check_modality_scalars(coefficients, noise_scales, len(groups))
    if len(groups) > MAX_MODALITIES:
        raise ValueError(f"the triton kernel takes at most {MAX_MODALITIES} modalities, got {len(groups)}")
    philox, step = 0, 0
    if noise_scales is not None:
        if key is None:
            raise ValueError("noise_scales were given without a NoiseKey")
        philox, step = philox_key(key), key.step
        if isinstance(step, int) and step >= MAX_STEP:
            raise ValueError(f"the triton kernel's noise stream takes steps below 2**48, got {step}")
    _launch(groups, coefficients, noise_scales, philox, step, stds, leftovers)


def modulate_(
    grads: Sequence[Tensor],
    coefficient: Tensor,
    noise_scale: Tensor | None,
    generator: torch.Generator | None = None,
) -> None:
    """Scale ``grads`` in place by ``coefficient`` and add GE noise of std ``noise_scale·(σ(g)+1e-8)``.

    The one-modality contract of `gradmod.kernels.reference`: two launches per device/dtype group with
    noise, one without; the Philox key is drawn with ``torch.randint`` from ``generator`` (the default
    generator of the gradients' device when ``None``) on the gradients' device. Tensors must live on CUDA
    (on the CPU under ``TRITON_INTERPRET=1``).
    """
    check_scalars(coefficient, noise_scale)
    key: int | Tensor = 0
    if noise_scale is not None:
        device = next((g.device for g in grads if isinstance(g, Tensor) and g.numel() > 0), None)
        if device is None:
            return _launch([grads], coefficient.reshape(1), noise_scale.reshape(1), 0, 0, None, None)
        where = generator.device if generator is not None else device
        drawn = torch.randint(0, SEED_MODULUS, (1,), generator=generator, device=where, dtype=torch.int64)
        key = to_device(drawn, device, torch.int64)
    scale = None if noise_scale is None else noise_scale.reshape(1)
    _launch([grads], coefficient.reshape(1), scale, key, 0, None, None)
