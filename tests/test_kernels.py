"""The modulation kernels against the reference loop (the specification).

``foreach`` runs in this process. The Triton kernels run compiled on CUDA when a GPU is present;
on a CPU-only machine ``test_triton_kernels_under_interpreter`` re-runs this file's Triton tests in a
subprocess with ``TRITON_INTERPRET=1`` (the variable must be set before the kernels are defined).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradmod.kernels import foreach, get_kernel, reference

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


coefficients = st.floats(0.0, 1.5, allow_nan=False).map(lambda k: torch.tensor(k))


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
    c=st.floats(0.0, 2.0),
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
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "run in test_triton_kernels_under_interpreter" not in result.stdout


@pytest.mark.skipif(triton_kernel is None, reason=TRITON_REASON)
@given(numel=st.integers(1, 10**10))
def test_triton_chunking_covers_every_tensor_in_bounded_chunks(numel):
    length = triton_kernel._chunk_length(numel)
    chunks = math.ceil(numel / length)
    assert length % triton_kernel.BLOCK == 0 and length >= triton_kernel.BLOCK * triton_kernel.MIN_BLOCKS_PER_CHUNK
    assert 1 <= chunks <= triton_kernel.MAX_CHUNKS_PER_TENSOR and chunks * length >= numel


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
    grads = [torch.randn(5, 7).to(dtype) + 2 for dtype in DTYPES] + [torch.randn(1)]
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


@pytest.mark.skipif(triton_kernel is None or INTERPRETED, reason="needs the compiled (non-interpreted) Triton kernels")
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_kernels_compile_for_h100_without_a_gpu(dtype):
    """Ahead-of-time compilation to an sm_90 cubin catches what the interpreter does not check (typing, lowering)."""
    triton = pytest.importorskip("triton")
    compiler = pytest.importorskip("triton.compiler")
    target = pytest.importorskip("triton.backends.compiler").GPUTarget("cuda", 90, 32)
    element = triton_kernel._TRITON_DTYPES[dtype]
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    acc = triton_kernel._TRITON_DTYPES[acc_dtype]
    acc_pointer = "*fp64" if dtype == torch.float64 else "*fp32"
    tables = {"tensor_table": "*i64", "chunk_table": "*i64"}
    shared = {"DTYPE": element, "ACC": acc, "BLOCK": triton_kernel.BLOCK}
    moments = compiler.ASTSource(
        triton_kernel._moments_kernel,
        signature={**tables, "partials": acc_pointer, **dict.fromkeys(shared, "constexpr")},
        constexprs=shared,
    )
    kernels = [(moments, False)]
    for has_noise in (True, False):
        pointers = dict.fromkeys(("partials", "coefficient_ptr", "noise_scale_ptr"), acc_pointer) | {"seed_ptr": "*i64"}
        constants = dict(
            shared,
            MAX_CHUNKS=triton_kernel.MAX_CHUNKS_PER_TENSOR,
            POSITION_SHIFT=triton_kernel._POSITION_SHIFT,
            STD_EPS=triton_kernel.STD_EPS,
            HAS_NOISE=has_noise,
        )
        if not has_noise:
            constants.update(partials=None, noise_scale_ptr=None, seed_ptr=None)
            pointers.update(partials="constexpr", noise_scale_ptr="constexpr", seed_ptr="constexpr")
        signature = {**tables, **pointers, **{name: "constexpr" for name in constants if name not in pointers}}
        update = compiler.ASTSource(triton_kernel._update_kernel, signature=signature, constexprs=constants)
        kernels.append((update, True))
    for source, stores_gradients in kernels:
        try:
            compiled = triton.compile(source, target=target)
        except RuntimeError as error:  # no ptxas shipped with this Triton build
            if "ptxas" in str(error):
                pytest.skip(f"Triton cannot assemble for sm_90 here: {error}")
            raise
        assert compiled.asm["cubin"], "an empty cubin"
        if stores_gradients and dtype == torch.bfloat16:
            assert "cvt.rn.bf16.f32" in compiled.asm["ptx"], "bf16 stores must round to nearest even"


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
