"""The modulation kernels against the reference loop (the specification).

``foreach`` runs in this process. The Triton kernels run compiled on CUDA when a GPU is present;
on a CPU-only machine ``test_triton_kernels_under_interpreter`` re-runs this file's Triton tests in a
subprocess with ``TRITON_INTERPRET=1`` (the variable must be set before the kernels are defined).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import gradmod
from gradmod.kernels import (
    NoiseKey,
    foreach,
    get_kernel,
    modulate_modalities_,
    noise_generator,
    reference,
)

try:
    from gradmod.kernels import triton as triton_kernel
except ImportError as error:  # Triton not installed: its tests skip, the rest run
    triton_kernel = None
    TRITON_OK, TRITON_REASON = False, f"triton does not import ({error})"
else:
    TRITON_OK, TRITON_REASON = triton_kernel.is_available()

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_DEVICE = "cpu" if INTERPRETED else "cuda"
# The interpreter converts fp32 → bf16 by truncation (compiled Triton rounds to nearest even): 2 ulp.
TRITON_BF16_RTOL = 2.0**-6 if INTERPRETED else 0.0
needs_triton = pytest.mark.skipif(
    not TRITON_OK,
    reason=f"{TRITON_REASON} — on CPU these tests run in test_triton_kernels_under_interpreter",
)

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
Kernel = Callable[..., None]


# ----------------------------------------------------------------------------------------- helpers


@st.composite
def gradient_lists(draw, dtypes=DTYPES, max_tensors: int = 4, max_side: int = 5) -> list[torch.Tensor]:
    """Small gradient lists: empty, one-element, 0-d and multi-dim tensors, offset means, mixed dtypes."""
    count = draw(st.integers(1, max_tensors))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    grads = []
    for _ in range(count):
        shape = draw(st.lists(st.integers(0, max_side), max_size=3))
        dtype = draw(st.sampled_from(dtypes))
        scale = draw(st.sampled_from([1e-3, 1.0, 10.0]))
        offset = draw(st.sampled_from([0.0, 3.0, -50.0]))
        grads.append((torch.randn(shape, generator=generator, dtype=torch.float64) * scale + offset).to(dtype))
    return grads


# 1.0 explicitly: the CPU path of foreach skips factors of exactly 1 and must stay bit-identical there too.
coefficients = st.one_of(st.just(1.0), st.floats(0.0, 1.5, allow_nan=False)).map(lambda k: torch.tensor(k))


def run(kernel: Kernel, grads, k, c=None, seed: int | None = 0, device: str = "cpu"):
    """Copies of ``grads`` on ``device`` after ``kernel`` (generator seeded with ``seed``)."""
    out = [g.to(device).clone() for g in grads]
    generator = None if seed is None else torch.Generator(device).manual_seed(seed)
    kernel(out, k, c, generator)
    return [g.cpu() for g in out]


def scaled_like_reference(grad: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``k·g`` with ``k`` rounded to the gradient dtype, as every kernel computes it."""
    return grad * k.to(grad.dtype)


def assert_noise_distribution(original: torch.Tensor, modulated: torch.Tensor, k: float, c: float, slack: float = 0.0):
    """The residual ``out − k·g`` has mean 0 and std ``c·(σ(g)+1e-8)`` (5-sigma sampling bounds)."""
    residual = modulated.double() - k * original.double()
    expected = c * (original.double().std().item() + 1e-8)
    n = residual.numel()
    assert abs(residual.mean().item()) <= 5 * expected / math.sqrt(n) + slack * expected
    assert abs(residual.std().item() / expected - 1) <= 5 / math.sqrt(2 * n) + slack


# ------------------------------------------------------------------------------- shared contract


def contract_no_noise_matches_reference(kernel: Kernel, grads, k, device, bf16_rtol: float = 0.0):
    """Bit-identical to the reference; bf16 within ``bf16_rtol`` if given (the interpreter truncates fp32 → bf16)."""
    expected = run(reference.modulate_, grads, k)
    actual = run(kernel, grads, k, device=device)
    for g, e, a in zip(grads, expected, actual):
        assert e.dtype == a.dtype and e.shape == a.shape
        if e.dtype == torch.bfloat16 and bf16_rtol:
            # The interpreter truncates a subnormal k (e.g. 1e-42) to a non-zero bf16 where the reference
            # rounds it to 0, so k·g differs by up to |g| times the smallest normal bf16.
            magnitude = max(1.0, g.abs().max().item()) if g.numel() else 1.0
            torch.testing.assert_close(a, e, rtol=bf16_rtol, atol=torch.finfo(torch.bfloat16).tiny * magnitude)
        else:
            assert torch.equal(e, a)


def contract_identity_when_balanced(kernel: Kernel, grads, device):
    actual = run(kernel, grads, torch.tensor(1.0), device=device)
    assert all(torch.equal(g, a) for g, a in zip(grads, actual))


def contract_noise_off_draws_nothing(kernel: Kernel, device):
    generator = torch.Generator(device).manual_seed(3)
    before = generator.get_state()
    grads = [torch.randn(5, 4, device=device), torch.randn(7, device=device)]
    kernel(grads, torch.tensor(0.5), None, generator)
    assert torch.equal(generator.get_state(), before)


def contract_reproducible(kernel: Kernel, device):
    grads = [torch.randn(6, 5), torch.randn(1), torch.randn(0, 3), torch.randn(40)]
    k, c = torch.tensor(0.4), torch.tensor(1.0)
    first, second = run(kernel, grads, k, c, seed=7, device=device), run(kernel, grads, k, c, seed=7, device=device)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    other = run(kernel, grads, k, c, seed=8, device=device)
    assert not torch.equal(first[0], other[0])
    generator = torch.Generator(device).manual_seed(7)
    live = [g.to(device).clone() for g in grads]
    kernel(live, k, c, generator)
    again = [g.to(device).clone() for g in grads]
    kernel(again, k, c, generator)
    assert not torch.equal(live[0], again[0]), "the generator must advance between calls"


def contract_noise_distribution(kernel: Kernel, device):
    generator = torch.Generator().manual_seed(0)
    grads = [
        torch.randn(64, 64, generator=generator) * 0.02 + 0.01,
        torch.randn(4096, generator=generator).to(torch.bfloat16),
        torch.randn(2, 3, 25, 25, generator=generator).to(torch.float64) * 5,
    ]
    for k, c in ((0.0, 1.0), (0.7, 1.0), (0.3, math.sqrt(1 - 0.09))):
        out = run(kernel, grads, torch.tensor(k), torch.tensor(c), seed=11, device=device)
        for g, o in zip(grads, out):
            slack = 1e-2 if g.dtype == torch.bfloat16 else 0.0
            assert_noise_distribution(g, o, float(torch.tensor(k).to(g.dtype)), c, slack)


def contract_std_free_of_cancellation(kernel: Kernel, device, numel: int):
    """``σ(g + 10⁴) = σ(g)``: with one seed, the noise on a large-mean tensor equals that on the centred one."""
    g = torch.randn(numel, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    shifted = (g + 1e4).float()
    centred = (shifted.double() - shifted.double().mean()).float()
    zero, one = torch.tensor(0.0), torch.tensor(1.0)
    noisy_shifted = run(kernel, [shifted], zero, one, seed=5, device=device)[0]
    noisy_centred = run(kernel, [centred], zero, one, seed=5, device=device)[0]
    torch.testing.assert_close(noisy_shifted, noisy_centred, rtol=1e-4, atol=1e-6)


def contract_single_elements_and_empties(kernel: Kernel, device):
    grads = [torch.tensor([3.0]), torch.empty(0), torch.tensor(2.5), torch.empty(2, 0, 3)]
    out = run(kernel, grads, torch.tensor(0.5), torch.tensor(1.0), device=device)
    torch.testing.assert_close(out[0], torch.tensor([1.5]), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[2], torch.tensor(1.25), rtol=0, atol=1e-6)
    assert out[1].shape == (0,) and out[3].shape == (2, 0, 3)


def contract_non_contiguous(kernel: Kernel, device):
    channels_last = torch.randn(8, 6, 3, 3, device=device).to(memory_format=torch.channels_last)
    grads = [channels_last, torch.randn(10, 4, device=device)[:, ::2], torch.randn(5, 3, device=device).t()]
    expected = [scaled_like_reference(g, torch.tensor(0.25)).cpu() for g in grads]
    kernel(grads, torch.tensor(0.25), None, None)
    for e, g in zip(expected, grads):
        assert torch.equal(e, g.cpu())


def contract_rejects_bad_input(kernel: Kernel, device):
    grad = [torch.randn(3, device=device)]
    cases = [
        (grad, 0.5, None, TypeError, "coefficient must be a 0-d floating-point tensor"),
        (grad, torch.tensor([0.5]), None, ValueError, "coefficient must be a 0-d"),
        (grad, torch.tensor(1), None, ValueError, "coefficient must be a 0-d floating-point"),
        (grad, torch.tensor(float("nan")), None, ValueError, "coefficient must be finite"),
        (grad, torch.tensor(0.5), torch.tensor(float("inf")), ValueError, "noise_scale must be finite"),
        (grad, torch.tensor(0.5), torch.ones(2), ValueError, "noise_scale must be a 0-d"),
        ([torch.ones(3, dtype=torch.int64, device=device)], torch.tensor(0.5), None, ValueError, "grads\\[0\\] has"),
        ([grad[0], "g"], torch.tensor(0.5), None, TypeError, "grads\\[1\\] must be a tensor"),
        ([torch.eye(3).to_sparse().to(device)], torch.tensor(0.5), None, ValueError, "layout"),
    ]
    for grads, k, c, error, message in cases:
        with pytest.raises(error, match=message):
            kernel(grads, k, c, None)


# ------------------------------------------------------------------------------------ foreach


@given(grads=gradient_lists(), k=coefficients)
def test_foreach_no_noise_equals_reference(grads, k):
    contract_no_noise_matches_reference(foreach.modulate_, grads, k, "cpu")


@given(
    grads=st.sampled_from(DTYPES).flatmap(lambda dtype: gradient_lists(dtypes=(dtype,))),
    k=coefficients,
    c=st.one_of(st.just(1.0), st.floats(0.0, 2.0)),
    seed=st.integers(0, 99),
)
def test_foreach_with_noise_is_bit_identical_to_reference_for_one_group(grads, k, c, seed):
    expected = run(reference.modulate_, grads, k, torch.tensor(c), seed=seed)
    actual = run(foreach.modulate_, grads, k, torch.tensor(c), seed=seed)
    assert all(torch.equal(e, a) for e, a in zip(expected, actual))


@given(grads=gradient_lists())
def test_foreach_identity_when_balanced(grads):
    contract_identity_when_balanced(foreach.modulate_, grads, "cpu")


def test_foreach_noise_off_draws_nothing():
    contract_noise_off_draws_nothing(foreach.modulate_, "cpu")


def test_foreach_reproducible():
    contract_reproducible(foreach.modulate_, "cpu")


def test_foreach_noise_distribution():
    contract_noise_distribution(foreach.modulate_, "cpu")


def test_foreach_std_free_of_cancellation():
    contract_std_free_of_cancellation(foreach.modulate_, "cpu", 20_000)


def test_foreach_single_elements_and_empties():
    contract_single_elements_and_empties(foreach.modulate_, "cpu")


def test_foreach_non_contiguous():
    contract_non_contiguous(foreach.modulate_, "cpu")


def test_foreach_rejects_bad_input():
    contract_rejects_bad_input(foreach.modulate_, "cpu")


def test_foreach_mixed_groups_keep_distribution():
    generator = torch.Generator().manual_seed(2)
    dtypes = (torch.float32, torch.float64, torch.float32)
    grads = [torch.randn(3000, generator=generator).to(dtype) * 0.1 for dtype in dtypes]
    out = run(foreach.modulate_, grads, torch.tensor(0.5), torch.tensor(1.0), seed=4)
    for g, o in zip(grads, out):
        assert o.dtype == g.dtype
        assert_noise_distribution(g, o, 0.5, 1.0)


@given(sizes=st.lists(st.integers(0, 50), max_size=12), limit=st.integers(1, 60))
def test_buckets_partition_in_order_and_respect_the_limit(sizes, limit):
    tensors = [torch.empty(n) for n in sizes]
    parts = list(foreach.buckets(tensors, limit))
    assert [t for part in parts for t in part] == tensors
    for part in parts:
        assert len(part) == 1 or sum(t.numel() for t in part) <= limit


def test_auto_backend_is_foreach_on_cpu():
    assert get_kernel("auto", torch.device("cpu")) is foreach.modulate_


# ----------------------------------------------------------------------- modulate_modalities_, all backends


def modalities_fixture(seed: int = 0, dtype=torch.float32) -> list[list[torch.Tensor]]:
    """Two modalities: an empty tensor (positions still count), one multi-chunk tensor, small odd ones."""
    generator = torch.Generator().manual_seed(seed)
    return [
        [torch.empty(0), torch.randn(300, generator=generator), torch.randn(3 * 8192 + 123, generator=generator) + 4],
        [
            torch.randn(5, 7, generator=generator) * 0.01,
            torch.randn(1, generator=generator),
            torch.randn(2049, generator=generator),
        ],
    ]


def step_copies(groups, k, c, key, backend, stds=None, device="cpu"):
    """Copies of ``groups`` (on ``device``) after one `modulate_modalities_` step."""
    out = [[g.to(device).clone() for g in grads] for grads in groups]
    modulate_modalities_(out, k, c, key, backend, stds)
    return [[g.cpu() for g in grads] for grads in out]


@pytest.mark.parametrize("backend", ["reference", "foreach"])
def test_generator_backends_draw_each_modality_from_noise_generator(backend):
    """reference/foreach: modality ``m`` on one device draws from `noise_generator` at (key, m)."""
    groups = modalities_fixture()
    k, c, key = torch.tensor([0.5, 0.9]), torch.tensor([1.0, 0.3]), NoiseKey(11, 4, shard=2)
    out = step_copies(groups, k, c, key, backend)
    kernel = get_kernel(backend, torch.device("cpu"))
    for m, grads in enumerate(groups):
        expected = [g.clone() for g in grads]
        kernel(expected, k[m], c[m], noise_generator(torch.device("cpu"), key, m, len(groups)))
        assert all(torch.equal(e, o) for e, o in zip(expected, out[m]))
    other = step_copies(groups, k, c, NoiseKey(11, 5, shard=2), backend)
    assert not torch.equal(out[0][2], other[0][2]), "another step must draw other noise"


@pytest.mark.parametrize("backend", ["reference", "foreach"])
def test_generator_backends_refuse_a_device_step(backend):
    groups = modalities_fixture()
    key = NoiseKey(1, torch.tensor(3))
    with pytest.raises(ValueError, match="seed a torch.Generator from the step on the host"):
        step_copies(groups, torch.tensor([0.5, 1.0]), torch.ones(2), key, backend)
    step_copies(groups, torch.tensor([0.5, 1.0]), None, key, backend)  # without noise the step is unused


def test_modulate_modalities_rejects_bad_arguments():
    groups = modalities_fixture()
    cases = [
        ({"coefficients": torch.tensor(0.5)}, ValueError, "coefficients must be a 1-d floating-point tensor with one"),
        ({"coefficients": torch.ones(3)}, ValueError, "one entry per modality \\(2\\)"),
        ({"coefficients": [0.5, 1.0]}, TypeError, "coefficients must be a 1-d floating-point tensor, got list"),
        ({"coefficients": torch.tensor([0.5, float("nan")])}, ValueError, "coefficients must be finite"),
        ({"noise_scales": torch.ones(2, dtype=torch.int64)}, ValueError, "noise_scales must be a 1-d floating-point"),
        ({"key": None}, ValueError, "noise_scales were given without a NoiseKey"),
        ({"stds": [[torch.tensor(1.0)], []]}, ValueError, "stds must hold one σ per gradient"),
        ({"backend": "cuda"}, ValueError, "unknown backend 'cuda'"),
    ]
    for change, error, message in cases:
        arguments = {"coefficients": torch.tensor([0.5, 1.0]), "noise_scales": torch.ones(2), "key": NoiseKey(0, 0)}
        arguments.update(backend="foreach", stds=None)
        arguments.update(change)
        with pytest.raises(error, match=message):
            modulate_modalities_(groups, arguments["coefficients"], arguments["noise_scales"], arguments["key"],
                                 arguments["backend"], arguments["stds"])


def test_noise_key_checks_its_fields():
    assert NoiseKey(1, 2).shard == 0 and not NoiseKey(1, 2).on_device and NoiseKey(1, torch.tensor(2)).on_device
    for args, error, message in [
        ((1.5, 2), TypeError, "NoiseKey.seed must be an int"),
        ((1, -1), ValueError, "NoiseKey.step must be >= 0"),
        ((1, True), TypeError, "NoiseKey.step must be an int or a 0-d int64 tensor"),
        ((1, torch.tensor([2])), ValueError, "a device step must be a 0-d int64 tensor"),
        ((1, torch.tensor(2.0)), ValueError, "a device step must be a 0-d int64 tensor"),
        ((1, 2, -3), ValueError, "NoiseKey.shard must be >= 0"),
    ]:
        with pytest.raises(error, match=message):
            NoiseKey(*args)


@pytest.mark.parametrize("kernel", [reference.modulate_, foreach.modulate_])
def test_given_stds_replace_the_local_sigma(kernel):
    """A shard of a larger tensor takes the whole tensor's σ: with σ given, the noise scales by it."""
    grads = [torch.randn(50, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    own = [g.std() for g in grads]
    k, c = torch.tensor(0.5), torch.tensor(1.0)
    plain = run(kernel, grads, k, c, seed=3)
    out = [g.clone() for g in grads]
    kernel(out, k, c, torch.Generator().manual_seed(3), stds=own)
    for a, b in zip(plain, out):
        torch.testing.assert_close(a, b)
    doubled = [g.clone() for g in grads]
    kernel(doubled, k, c, torch.Generator().manual_seed(3), stds=[2 * s for s in own])
    for g, a, b in zip(grads, plain, doubled):
        torch.testing.assert_close(b - k * g, 2 * (a - k * g), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------- triton


def test_triton_is_available_reports_a_reason():
    if triton_kernel is None:
        pytest.skip(TRITON_REASON)
    ok, reason = triton_kernel.is_available()
    assert isinstance(ok, bool) and isinstance(reason, str) and reason
    assert ok == (INTERPRETED or torch.cuda.is_available())


@pytest.mark.skipif(INTERPRETED or torch.cuda.is_available(), reason="the Triton tests run in this process")
@pytest.mark.skipif(triton_kernel is None, reason=TRITON_REASON)
def test_triton_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    selection = ["-k", "triton and not interpreter"]
    command = [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider", *selection]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "run in test_triton_kernels_under_interpreter" not in result.stdout


@pytest.mark.skipif(triton_kernel is None, reason=TRITON_REASON)
@given(numel=st.integers(1, 10**10))
def test_triton_chunking_covers_every_tensor_in_bounded_chunks(numel):
    length = triton_kernel._chunk_length(numel)
    chunks = math.ceil(numel / length)
    assert length % triton_kernel.BLOCK == 0 and length >= triton_kernel.BLOCK * triton_kernel.MIN_BLOCKS_PER_CHUNK
    assert 1 <= chunks <= triton_kernel.MAX_CHUNKS_PER_TENSOR and chunks * length >= numel


# --------------------------------------------------------------- triton: the one-modality contract


@needs_triton
@settings(max_examples=6)
@given(grads=gradient_lists(max_tensors=3), k=coefficients)
def test_triton_no_noise_equals_reference(grads, k):
    contract_no_noise_matches_reference(triton_kernel.modulate_, grads, k, TRITON_DEVICE, TRITON_BF16_RTOL)


@needs_triton
@settings(max_examples=4)
@given(grads=gradient_lists(max_tensors=3))
def test_triton_identity_when_balanced(grads):
    contract_identity_when_balanced(triton_kernel.modulate_, grads, TRITON_DEVICE)


@needs_triton
def test_triton_deterministic_part_with_zero_noise_scale():
    """``c = 0`` runs both launches (statistics + update) and must leave exactly ``k·g``."""
    grads = [torch.randn(5, 7).to(dtype) + 2 for dtype in DTYPES] + [torch.randn(1), torch.randn(3 * 2048 + 5)]
    out = run(triton_kernel.modulate_, grads, torch.tensor(0.6), torch.tensor(0.0), device=TRITON_DEVICE)
    for g, o in zip(grads, out):
        expected = scaled_like_reference(g, torch.tensor(0.6))
        if g.dtype == torch.bfloat16 and TRITON_BF16_RTOL:
            torch.testing.assert_close(o, expected, rtol=TRITON_BF16_RTOL, atol=0)
        else:
            assert torch.equal(o, expected)


@needs_triton
def test_triton_noise_off_draws_nothing():
    contract_noise_off_draws_nothing(triton_kernel.modulate_, TRITON_DEVICE)


@needs_triton
def test_triton_reproducible():
    contract_reproducible(triton_kernel.modulate_, TRITON_DEVICE)


@needs_triton
def test_triton_noise_distribution():
    contract_noise_distribution(triton_kernel.modulate_, TRITON_DEVICE)


@needs_triton
def test_triton_std_free_of_cancellation_across_chunks():
    numel = 3 * triton_kernel.BLOCK * triton_kernel.MIN_BLOCKS_PER_CHUNK + 123
    assert math.ceil(numel / triton_kernel._chunk_length(numel)) == 4, "the tensor must span several chunks"
    contract_std_free_of_cancellation(triton_kernel.modulate_, TRITON_DEVICE, numel)


@needs_triton
def test_triton_single_elements_and_empties():
    contract_single_elements_and_empties(triton_kernel.modulate_, TRITON_DEVICE)


@needs_triton
def test_triton_non_contiguous():
    contract_non_contiguous(triton_kernel.modulate_, TRITON_DEVICE)


@needs_triton
def test_triton_rejects_bad_input():
    contract_rejects_bad_input(triton_kernel.modulate_, TRITON_DEVICE)


@needs_triton
def test_triton_noise_depends_only_on_seed_position_and_element():
    """A tensor's noise does not change with the other tensors in the list, their dtypes or the chunking."""
    a, b = torch.randn(300), torch.randn(50, 50)
    k, c = torch.tensor(0.5), torch.tensor(1.0)
    first = run(triton_kernel.modulate_, [a, b], k, c, seed=9, device=TRITON_DEVICE)
    second = run(triton_kernel.modulate_, [a, torch.randn(3).double()], k, c, seed=9, device=TRITON_DEVICE)
    assert torch.equal(first[0], second[0])
    swapped = run(triton_kernel.modulate_, [b, a], k, c, seed=9, device=TRITON_DEVICE)
    assert not torch.equal(first[0], swapped[1]), "tensors at different positions draw different streams"


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_accepts_cpu_coefficient_and_generator():
    grads = [torch.randn(100, 10, device="cuda")]
    expected = grads[0] * 0.3
    triton_kernel.modulate_(grads, torch.tensor(0.3), torch.tensor(0.0), torch.Generator().manual_seed(0))
    torch.testing.assert_close(grads[0], expected, rtol=0, atol=0)


@needs_triton
def test_triton_rejects_tensors_on_another_device():
    other = "cuda" if INTERPRETED and torch.cuda.is_available() else "meta" if INTERPRETED else "cpu"
    with pytest.raises(ValueError, match="the triton kernel runs on"):
        triton_kernel.modulate_([torch.randn(4, device=other)], torch.tensor(0.5), None, None)


# --------------------------------------------------------------- triton: every modality in one step

_UINT32 = 0xFFFFFFFF


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a·b`` (``a`` a 32-bit constant, ``b`` 32-bit values in int64)."""
    low_part, high_part = a * (b & 0xFFFF), a * (b >> 16)  # each < 2⁴⁸
    low = low_part + ((high_part & 0xFFFF) << 16)
    return (high_part >> 16) + (low >> 32), low & _UINT32


def philox4x32(key: int, c0, c1, c2, c3, rounds: int = 10):
    """Philox-4x32 (Salmon et al., 2011) as ``tl.philox`` computes it, on 32-bit words held in int64 tensors."""
    k0, k1 = key & _UINT32, key >> 32
    for _ in range(rounds):
        hi_b, lo_b = _mul_hi_lo(0xCD9E8D57, c2)
        hi_a, lo_a = _mul_hi_lo(0xD2511F53, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + 0x9E3779B9) & _UINT32, (k1 + 0xBB67AE85) & _UINT32
    return c0, c1, c2, c3


def _uniform(words: torch.Tensor) -> torch.Tensor:
    """``tl.uint_to_uniform_float`` of 32-bit words: the signed value, negatives flipped, times 2⁻³¹."""
    signed = torch.where(words >= 2**31, words - 2**32, words)
    magnitude = torch.where(signed < 0, -signed - 1, signed)
    return magnitude.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def _box_muller(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    radius = torch.sqrt(-2.0 * torch.log(u1.clamp_min(1e-7).double()))
    angle = (u2 * torch.tensor(6.283185307179586, dtype=torch.float32)).double()
    return radius * torch.cos(angle), radius * torch.sin(angle)


def documented_noise(numel: int, key: NoiseKey, modality: int, position: int) -> torch.Tensor:
    """``z`` of the documented Triton stream (`gradmod.kernels.triton`) for one tensor, in float64."""
    block = triton_kernel.BLOCK
    quarter = block // 4
    e = torch.arange(numel, dtype=torch.int64)
    q = (e // block) * quarter + e % quarter
    step = int(key.step)
    words = philox4x32(
        triton_kernel.philox_key(key),
        q & _UINT32,
        (q >> 32) + (position << 8),
        torch.full_like(q, step & _UINT32),
        torch.full_like(q, ((step >> 32) & 0xFFFF) + (modality << 16)),
    )
    z0, z1 = _box_muller(_uniform(words[0]), _uniform(words[1]))
    z2, z3 = _box_muller(_uniform(words[2]), _uniform(words[3]))
    return torch.stack([z0, z1, z2, z3]).gather(0, ((e % block) // quarter).unsqueeze(0)).squeeze(0)


def assert_documented_stream(groups, out, k, c, key, sigmas=None):
    """``out = k·g + c·(σ + 1e-8)·z`` with ``z`` from `documented_noise` and σ of float64 ``g`` (or given),
    within the float32 rounding of the result and of the Box–Muller functions."""
    for m, grads in enumerate(groups):
        for i, g in enumerate(grads):
            if g.numel() == 0:
                continue
            sigma = g.double().std().item() if g.numel() > 1 else 0.0
            sigma = sigma if sigmas is None else float(sigmas[m][i])
            scale = float(c[m]) * (sigma + 1e-8)
            expected = float(k[m]) * g.double() + scale * documented_noise(g.numel(), key, m, i).reshape(g.shape)
            torch.testing.assert_close(out[m][i].double(), expected, rtol=1e-6, atol=2e-4 * scale)


class CountingKernel:
    """A Triton kernel whose launches are logged (and run outside any torch dispatch mode)."""

    def __init__(self, name: str, kernel, log: list[str]) -> None:
        self.name, self.kernel, self.log = name, kernel, log

    def __getitem__(self, grid):
        launcher = self.kernel[grid]

        def launch(*args, **kwargs):
            self.log.append(self.name)
            with _disable_current_modes():
                return launcher(*args, **kwargs)

        return launch


class OpCounter(TorchDispatchMode):
    """Every torch operation dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def launches(monkeypatch) -> list[str]:
    """The log of Triton launches made during the test."""
    log: list[str] = []
    for name in ("_moments_kernel", "_update_kernel"):
        monkeypatch.setattr(triton_kernel, name, CountingKernel(name, getattr(triton_kernel, name), log))
    return log


def on_triton_device(groups):
    return [[g.to(TRITON_DEVICE) for g in grads] for grads in groups]


@needs_triton
def test_triton_noise_follows_the_documented_philox_stream():
    """Every element's noise is the documented Philox draw at (key, step, modality, position, element), for a
    host step and for a device step, a large step and seed, a shard, a tensor spanning several chunks (σ
    combined by its last chunk) — and again with new values of the same shapes (tickets reset, σ fresh)."""
    k = torch.tensor([0.5, 0.9], device=TRITON_DEVICE)
    c = torch.tensor([1.0, 0.3], device=TRITON_DEVICE)
    for round_index, (seed, step, shard) in enumerate([(2**64 + 12345, 2**40 + 5, 3), (7, 0, 0)]):
        groups = modalities_fixture(seed=round_index)
        for step_value in (step, torch.tensor(step, device=TRITON_DEVICE)):
            key = NoiseKey(seed, step_value, shard)
            out = step_copies(groups, k, c, key, "triton", device=TRITON_DEVICE)
            assert_documented_stream(groups, out, k.cpu(), c.cpu(), NoiseKey(seed, step, shard))


@needs_triton
def test_triton_streams_differ_by_seed_step_modality_and_shard():
    g = torch.randn(4096)
    groups = [[g], [g]]
    k, c = torch.zeros(2, device=TRITON_DEVICE), torch.ones(2, device=TRITON_DEVICE)
    base = step_copies(groups, k, c, NoiseKey(1, 2), "triton", device=TRITON_DEVICE)
    assert not torch.equal(base[0][0], base[1][0]), "modalities must draw different noise"
    for other in (NoiseKey(2, 2), NoiseKey(1, 3), NoiseKey(1, 2, shard=1)):
        out = step_copies(groups, k, c, other, "triton", device=TRITON_DEVICE)
        assert not torch.equal(base[0][0], out[0][0]), other


@needs_triton
def test_triton_two_launches_per_step_for_all_modalities(launches, monkeypatch):
    """One step of two modalities (several tensors each) is two launches; in the steady state it runs no
    other torch op (no seed draw, no table upload, no allocation); moved buffers of the same shapes reuse
    the cached layout and upload only their pointers; without noise a step is one launch."""
    monkeypatch.setattr(triton_kernel, "check_modality_scalars", lambda *args: None)  # reads CPU values
    groups = on_triton_device(modalities_fixture())
    k = torch.tensor([0.5, 0.9], device=TRITON_DEVICE)
    c = torch.ones(2, device=TRITON_DEVICE)
    modulate_modalities_(groups, k, c, NoiseKey(0, 0), "triton")  # warm-up: tables built and cached
    assert launches == ["_moments_kernel", "_update_kernel"]
    layouts = dict(triton_kernel._layouts)
    for step in (1, 2):
        launches.clear()
        with OpCounter() as counter:
            modulate_modalities_(groups, k, c, NoiseKey(0, step), "triton")
        assert launches == ["_moments_kernel", "_update_kernel"]
        assert counter.ops == [], f"a steady-state step ran torch ops: {counter.ops}"
    moved = [[g.clone() for g in grads] for grads in groups]
    launches.clear()
    with OpCounter() as counter:
        modulate_modalities_(moved, k, c, NoiseKey(0, 3), "triton")
    assert launches == ["_moments_kernel", "_update_kernel"]
    assert dict(triton_kernel._layouts) == layouts, "moved buffers must not rebuild the layout"
    assert not {"empty", "zeros", "randint", "stack"} & set(counter.ops), counter.ops
    launches.clear()
    modulate_modalities_(moved, k, None, None, "triton")
    assert launches == ["_update_kernel"]


@needs_triton
def test_triton_steps_mixed_dtypes_per_launch_group(launches):
    """Without noise every gradient becomes exactly ``k_m·g`` (k rounded to the gradient's dtype); one launch
    per device/dtype group of all modalities."""
    generator = torch.Generator().manual_seed(5)
    groups = [[torch.randn(40, generator=generator).to(dtype) for dtype in DTYPES] for _ in range(3)]
    k = torch.tensor([0.3, 1.0, 0.7])
    out = step_copies(groups, k, None, None, "triton", device=TRITON_DEVICE)
    assert launches == ["_update_kernel"] * len(DTYPES)
    for m, grads in enumerate(groups):
        for g, o in zip(grads, out[m]):
            expected = scaled_like_reference(g, k[m])
            if g.dtype == torch.bfloat16 and TRITON_BF16_RTOL:
                torch.testing.assert_close(o, expected, rtol=TRITON_BF16_RTOL, atol=0)
            else:
                assert torch.equal(o, expected)


@needs_triton
def test_triton_given_stds_replace_sigma(launches):
    """With σ given (shards), no statistics launch; the noise is the documented draw scaled by the given σ."""
    groups = modalities_fixture()
    stds = [[torch.tensor(float(i + 1)) for i in range(len(grads))] for grads in groups]
    k, c, key = torch.tensor([0.5, 0.9]), torch.tensor([1.0, 0.3]), NoiseKey(4, 9, shard=2)
    out = step_copies(groups, k, c, key, "triton", stds=stds, device=TRITON_DEVICE)
    assert launches == ["_update_kernel"]
    assert_documented_stream(groups, out, k, c, key, sigmas=stds)


@needs_triton
def test_triton_sends_other_devices_back_or_refuses_them():
    here, elsewhere = torch.randn(10, device=TRITON_DEVICE), torch.randn(10, device="meta")
    k = torch.tensor([0.5, 1.0])
    leftovers: list = []
    triton_kernel.modulate_modalities_([[here], [elsewhere]], k, None, None, leftovers=leftovers)
    assert leftovers == [(1, elsewhere, None)]
    with pytest.raises(ValueError, match="the triton kernel runs on"):
        triton_kernel.modulate_modalities_([[here], [elsewhere]], k, None, None)


@needs_triton
def test_triton_step_rejects_what_its_stream_cannot_hold():
    grads = [[torch.randn(10, device=TRITON_DEVICE)]]
    k, c = torch.tensor([0.5]), torch.ones(1)
    with pytest.raises(ValueError, match="steps below 2\\*\\*48"):
        triton_kernel.modulate_modalities_(grads, k, c, NoiseKey(0, 2**48))
    with pytest.raises(ValueError, match="noise_scales were given without a NoiseKey"):
        triton_kernel.modulate_modalities_(grads, k, c, None)
    with pytest.raises(ValueError, match="the device step lives on meta"):
        triton_kernel.modulate_modalities_(grads, k, c, NoiseKey(0, torch.tensor(1, device="meta")))
    with pytest.raises(TypeError, match="groups\\[1\\]\\[1\\] must be a tensor, got str"):
        triton_kernel.modulate_modalities_([grads[0], [grads[0][0], "g"]], torch.ones(2), None, None)


@needs_triton
def test_triton_capture_safe_modulator_steps_equal_ordinary_steps():
    """Through the modulator: a capture-safe OGM-GE (step counter on the device, read by the kernel) draws the
    same noise as an ordinary one (step on the host), step after step."""

    def train(capture_safe: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        audio, visual = nn.Linear(8, 4).to(TRITON_DEVICE), nn.Linear(8, 4).to(TRITON_DEVICE)
        optimizer = torch.optim.SGD([*audio.parameters(), *visual.parameters()], lr=0.1)
        modulator = gradmod.OGMGE({"audio": audio, "visual": visual}, alpha=0.5, backend="triton", seed=3,
                                  validate=False, capture_safe=capture_safe)
        modulator.attach(optimizer)
        data = torch.Generator().manual_seed(1)
        for _ in range(3):
            x = torch.randn(16, 8, generator=data).to(TRITON_DEVICE)
            y = torch.randint(0, 4, (16,), generator=data).to(TRITON_DEVICE)
            optimizer.zero_grad()
            logits = {"audio": audio(x), "visual": visual(x) * 3}
            modulator.observe(logits=logits, target=y)
            nn.functional.cross_entropy(logits["audio"] + logits["visual"], y).backward()
            optimizer.step()
        return [p.detach().cpu() for p in [*audio.parameters(), *visual.parameters()]]

    ordinary, capture_safe = train(False), train(True)
    assert all(torch.equal(a, b) for a, b in zip(ordinary, capture_safe))


def _replay_ready(groups, k, c, key) -> None:
    """Warm up on a side stream, as CUDA graph capture requires."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        modulate_modalities_(groups, k, c, key, "triton")
    torch.cuda.current_stream().wait_stream(side)


@needs_triton
@pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs compiled Triton on a CUDA device")
def test_triton_step_replays_in_a_cuda_graph_with_a_device_step():
    """Capture-safe mode: a captured step (device step incremented in place) replays the eager step's noise."""
    pristine = on_triton_device(modalities_fixture())
    groups = [[g.clone() for g in grads] for grads in pristine]
    k = torch.tensor([0.5, 0.9], device="cuda")
    c = torch.tensor([1.0, 0.3], device="cuda")
    step = torch.zeros((), dtype=torch.int64, device="cuda")
    _replay_ready(groups, k, c, NoiseKey(3, step))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        modulate_modalities_(groups, k, c, NoiseKey(3, step), "triton")
        step.add_(1)
    for value in (5, 6, 2**33):
        for grads, originals in zip(groups, pristine):
            for g, o in zip(grads, originals):
                g.copy_(o)
        step.fill_(value)
        graph.replay()
        eager = step_copies(pristine, k, c, NoiseKey(3, value), "triton", device="cuda")
        for grads, expected in zip(groups, eager):
            assert all(torch.equal(g.cpu(), e) for g, e in zip(grads, expected))
        assert step.item() == value + 1


@needs_triton
@pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs compiled Triton on a CUDA device")
def test_triton_step_does_not_synchronise_and_capture_refuses_host_values():
    groups = on_triton_device(modalities_fixture())
    k, c = torch.tensor([0.5, 0.9], device="cuda"), torch.ones(2, device="cuda")
    step = torch.zeros((), dtype=torch.int64, device="cuda")
    modulate_modalities_(groups, k, c, NoiseKey(1, step), "triton")
    torch.cuda.set_sync_debug_mode("error")
    try:
        modulate_modalities_([[g.clone() for g in grads] for grads in groups], k, c, NoiseKey(1, step), "triton")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    _replay_ready(groups, k, c, NoiseKey(1, step))
    for arguments, message in [((k.cpu(), c, NoiseKey(1, step)), "coefficients live on cpu"),
                               ((k, c, NoiseKey(1, 4)), "a host step while a CUDA graph is being captured")]:
        graph = torch.cuda.CUDAGraph()
        with pytest.raises(ValueError, match=message), torch.cuda.graph(graph):
            modulate_modalities_(groups, *arguments, "triton")


def _compile_for_sm90(kernel, signature: dict, constants: dict, num_warps: int):
    triton = pytest.importorskip("triton")
    compiler = pytest.importorskip("triton.compiler")
    target = pytest.importorskip("triton.backends.compiler").GPUTarget("cuda", 90, 32)
    signature = {**signature, **{name: "constexpr" for name in constants if name not in signature}}
    source = compiler.ASTSource(kernel, signature=signature, constexprs=constants)
    try:
        return triton.compile(source, target=target, options={"num_warps": num_warps})
    except RuntimeError as error:  # no ptxas shipped with this Triton build
        if "ptxas" in str(error):
            pytest.skip(f"Triton cannot assemble for sm_90 here: {error}")
        raise


@pytest.mark.skipif(triton_kernel is None or INTERPRETED, reason="needs the compiled (non-interpreted) Triton kernels")
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the other tests compile the kernels for it")
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_kernels_compile_for_h100_without_a_gpu(dtype):
    """Ahead-of-time compilation to sm_90 catches what the interpreter does not check (typing, lowering), and
    shows the code: 128-bit gradient accesses when the pointers are aligned, none otherwise, bf16 stores
    rounded to nearest even, the last-chunk ticket as a GPU-scope acquire-release atomic."""
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    acc_pointer = "*fp64" if acc_dtype == torch.float64 else "*fp32"
    tables = {"pointers": "*i64", "tensor_table": "*i64", "chunk_table": "*i64"}
    shared = {"DTYPE": triton_kernel._TRITON_DTYPES[dtype], "ACC": triton_kernel._TRITON_DTYPES[acc_dtype],
              "BLOCK": triton_kernel.BLOCK}
    vector = r"(ld|st)\.global(\.\w+)*\.v[24]\."
    for aligned in (True, False):
        moments = _compile_for_sm90(
            triton_kernel._moments_kernel,
            {**tables, "partials": acc_pointer, "sigmas": acc_pointer, "tickets": "*i32"},
            dict(shared, MAX_CHUNKS=triton_kernel.MAX_CHUNKS_PER_TENSOR, ALIGNED=aligned),
            num_warps=4,
        )
        assert moments.asm["cubin"] and "atom.global.gpu.acq_rel.add" in moments.asm["ptx"]
        assert bool(re.search(vector, moments.asm["ptx"])) == aligned
    # (noise, aligned, key, step): Triton types a host integer as i32 when it fits, else i64; a pointer when
    # the value lives in memory (the one-modality key; the device step of capture-safe mode).
    variants = [(True, True, "i64", "i64"), (True, False, "*i64", "*i64"), (False, True, "i64", "i64")]
    if dtype == torch.float32:
        variants += [(True, True, "i32", "*i64"), (True, True, "i64", "i32")]
    for has_noise, aligned, key_type, step_type in variants:
        key_in_memory, step_in_memory = key_type.startswith("*"), step_type.startswith("*")
        signature = {**tables, "sigmas": acc_pointer, "coefficients": "*fp32",
                     "noise_scales": "*fp32" if has_noise else "constexpr", "key": key_type, "step": step_type}
        constants = dict(shared, ALIGNED=aligned, HAS_NOISE=has_noise, KEY_IN_MEMORY=key_in_memory,
                         STEP_IN_MEMORY=step_in_memory, STD_EPS=triton_kernel.STD_EPS)
        if not has_noise:
            constants["noise_scales"] = None
        update = _compile_for_sm90(triton_kernel._update_kernel, signature, constants,
                                   num_warps=triton_kernel._update_warps(dtype))
        ptx = update.asm["ptx"]
        assert update.asm["cubin"], "an empty cubin"
        wide = re.findall(r"(?:ld|st)\.global(?:\.\w+)*\.v([24])\.b(\d+)", ptx)
        if aligned:
            assert {int(lanes) * int(bits) for lanes, bits in wide} == {128}, wide
        else:
            assert not wide, wide
        if dtype == torch.bfloat16:
            assert "cvt.rn.bf16.f32" in ptx, "bf16 stores must round to nearest even"


def test_generator_streams_stay_distinct_across_steps_modalities_and_shards_on_the_cpu():
    """CPU generators keep 32 bits of their seed: the (step, modality, shard) streams must not collide there."""
    from gradmod.kernels import NoiseKey, noise_generator

    first_draws = {}
    for step in range(300):
        for shard in range(4):
            for modality in range(2):
                generator = noise_generator(torch.device("cpu"), NoiseKey(123, step, shard=shard), modality, 2)
                first_draws[(step, shard, modality)] = torch.randn(2, generator=generator).tolist()
    assert len({tuple(v) for v in first_draws.values()}) == len(first_draws)
