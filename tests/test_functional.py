"""Property tests of gradmod.functional against the papers' equations."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradmod import functional as F
from gradmod.methods.dgm import dgm_evidence
from gradmod.methods.mixup import bmm_strength, imbalance_factor
from gradmod.methods.pdmp import (
    pdmp_coefficients,
    pdmp_coefficients_of,
    rank_modalities,
)

positive = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False)
strength = st.floats(min_value=0.0, max_value=5.0, allow_nan=False)
names3 = ["audio", "visual", "text"]


def ev(**values):
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()}


# ---------------------------------------------------------------- scores and decoupling
@given(st.integers(1, 8), st.integers(2, 6), st.integers(0, 2**31 - 1))
def test_ogm_scores_is_sum_of_true_class_probabilities(batch, classes, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, generator=g) * 3
    target = torch.randint(0, classes, (batch,), generator=g)
    expected = sum(torch.softmax(logits[i], 0)[target[i]].item() for i in range(batch))
    score = F.ogm_scores(logits, target)
    assert score.dim() == 0
    assert score.item() == pytest.approx(expected, rel=1e-5)
    assert 0 < score.item() <= batch


@pytest.mark.parametrize(
    "logits,target,message",
    [
        (torch.zeros(4), torch.zeros(4, dtype=torch.long), "batch, classes"),
        (torch.zeros(4, 3), torch.zeros(3, dtype=torch.long), "target must be"),
        (torch.zeros(4, 3), torch.zeros(4), "integer class indices"),
    ],
)
def test_ogm_scores_rejects_bad_shapes(logits, target, message):
    with pytest.raises(ValueError, match=message):
        F.ogm_scores(logits, target)


@given(st.lists(st.integers(1, 7), min_size=2, max_size=4), st.integers(1, 5), st.booleans(), st.integers(0, 999))
def test_decouple_linear_sums_back_to_the_full_head(widths, batch, bias, seed):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(sum(widths), 5, bias=bias)
    features = {f"m{i}": torch.randn(batch, w, generator=g) for i, w in enumerate(widths)}
    parts = F.decouple_linear(head.weight, head.bias, features)
    full = head(torch.cat(list(features.values()), 1))
    assert list(parts) == list(features)
    torch.testing.assert_close(sum(parts.values()), full, rtol=1e-5, atol=1e-5)


def test_decouple_linear_matches_official_concat_split():
    head = torch.nn.Linear(8, 3)
    a, v = torch.randn(2, 4), torch.randn(2, 4)
    parts = F.decouple_linear(head.weight, head.bias, {"audio": a, "visual": v})
    torch.testing.assert_close(parts["audio"], a @ head.weight[:, :4].T + head.bias / 2)
    torch.testing.assert_close(parts["visual"], v @ head.weight[:, 4:].T + head.bias / 2)


def test_decouple_linear_rejects_widths_that_do_not_add_up():
    with pytest.raises(ValueError, match="add up to 7.*8 input columns"):
        F.decouple_linear(torch.zeros(3, 8), None, {"audio": torch.zeros(1, 3), "visual": torch.zeros(1, 4)})


# ---------------------------------------------------------------- ratios and OGM coefficients
@given(positive, positive)
def test_two_modality_ratio_is_the_papers_ratio(a, v):
    r = F.discrepancy_ratios(ev(audio=a, visual=v))
    assert r["audio"].item() == pytest.approx(a / v)
    assert r["visual"].item() == pytest.approx(v / a)


@given(st.lists(positive, min_size=2, max_size=5), strength)
def test_ogm_coefficients_range_and_weakest_is_one(values, alpha):
    evidence = {f"m{i}": torch.tensor(x) for i, x in enumerate(values)}
    k = F.ogm_coefficients(evidence, alpha)
    for name, c in k.items():
        assert 0.0 <= c.item() <= 1.0
        assert math.isfinite(c.item())
    weakest = min(evidence, key=lambda n: evidence[n].item())
    assert k[weakest].item() == 1.0


@given(positive, positive, strength)
def test_ogm_coefficients_two_modalities_exact(a, v, alpha):
    k = F.ogm_coefficients(ev(audio=a, visual=v), alpha)
    rho = a / v
    expected_a = 1 - math.tanh(alpha * rho) if rho > 1 else 1.0
    expected_v = 1 - math.tanh(alpha / rho) if 1 / rho > 1 else 1.0
    assert k["audio"].item() == pytest.approx(expected_a, abs=1e-12)
    assert k["visual"].item() == pytest.approx(expected_v, abs=1e-12)
    assert max(k["audio"].item(), k["visual"].item()) == 1.0  # the weaker one is never damped


@given(positive, st.floats(1.0, 50.0), st.floats(1.0, 50.0), strength)
def test_ogm_coefficient_non_increasing_in_ratio(v, r1, r2, alpha):
    lo, hi = sorted((r1, r2))
    k_lo = F.ogm_coefficients(ev(audio=v * lo, visual=v), alpha)["audio"]
    k_hi = F.ogm_coefficients(ev(audio=v * hi, visual=v), alpha)["audio"]
    assert k_hi.item() <= k_lo.item() + 1e-12


@given(st.lists(positive, min_size=2, max_size=4, unique=True), strength, st.randoms())
def test_coefficients_symmetric_under_renaming(values, alpha, rnd):
    names = [f"m{i}" for i in range(len(values))]
    evidence = {n: torch.tensor(x, dtype=torch.float64) for n, x in zip(names, values)}
    permuted = names[:]
    rnd.shuffle(permuted)
    shuffled = {n: evidence[n] for n in permuted}
    a, b = F.ogm_coefficients(evidence, alpha), F.ogm_coefficients(shuffled, alpha)
    for n in names:
        assert a[n].item() == pytest.approx(b[n].item(), abs=1e-12)


@given(positive, st.integers(2, 5), strength)
def test_equal_evidence_gives_all_ones(value, m, alpha):
    evidence = {f"m{i}": torch.tensor(value) for i in range(m)}
    assert all(c.item() == 1.0 for c in F.ogm_coefficients(evidence, alpha).values())


def test_zero_evidence_never_gives_nan():
    k = F.ogm_coefficients(ev(audio=1.0, visual=0.0), 0.5)
    assert k["audio"].item() == 0.0 and k["visual"].item() == 1.0
    k = F.ogm_coefficients(ev(audio=0.0, visual=0.0), 0.5)
    assert all(c.item() == 1.0 for c in k.values())


@pytest.mark.parametrize("alpha", [-0.1, float("nan"), float("inf")])
def test_bad_alpha_is_rejected(alpha):
    with pytest.raises(ValueError, match="alpha"):
        F.ogm_coefficients(ev(audio=1.0, visual=2.0), alpha)


def test_single_modality_is_rejected():
    with pytest.raises(ValueError, match="at least 2 modalities"):
        F.discrepancy_ratios(ev(audio=1.0))


# ---------------------------------------------------------------- GE noise scale
@given(st.integers(2, 400), st.floats(0.01, 100.0), st.floats(-50, 50), st.integers(0, 999))
def test_ge_noise_std_is_unbiased_std_plus_eps(n, scale, shift, seed):
    g = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale + shift
    assert F.ge_noise_std(g).item() == pytest.approx(g.std().item() + 1e-8, rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_ge_noise_std_of_a_constant_gradient_is_exactly_eps_in_its_computation_dtype(dtype):
    sigma = F.ge_noise_std(torch.full((7,), 3.0, dtype=dtype))
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    assert sigma.dtype == wide and sigma.item() == torch.tensor(1e-8, dtype=wide).item()


def test_ge_noise_std_of_one_element_is_eps_not_nan():
    assert F.ge_noise_std(torch.tensor([3.0])).item() == pytest.approx(1e-8)


def test_ge_noise_std_low_precision_is_computed_in_float32():
    g = torch.randn(1000, dtype=torch.bfloat16)
    assert F.ge_noise_std(g).dtype == torch.float32


@given(st.floats(0.0, 1.0))
def test_noise_scales(k):
    k_t = torch.tensor(k)
    assert F.noise_scale("ge", k_t).item() == 1.0
    # restore: scaled variance k² plus noise variance equals the original variance
    assert (k**2 + F.noise_scale("restore", k_t).item() ** 2) == pytest.approx(1.0, abs=1e-6)
    assert F.noise_scale("paper", k_t).item() ** 2 == pytest.approx(k**2 + 1.0, abs=1e-6)
    assert F.noise_scale(None, k_t) is None


def test_unknown_noise_kind():
    with pytest.raises(ValueError, match="unknown noise kind"):
        F.noise_scale("gaussian", torch.tensor(0.5))


# ---------------------------------------------------------------- DGM (Fu, Gao & Xu)
@given(positive, positive, st.floats(0.0, 2.0))
def test_dgm_coefficients_eq7(e_v, e_a, gamma):
    """DGM's eq. (7), μ = 1 − tanh(γ·ω) for ω > 1, is OGM's coefficient with γ in place of α."""
    mu = F.ogm_coefficients(ev(visual=e_v, audio=e_a), gamma)
    omega = e_v / e_a
    assert mu["visual"].item() == pytest.approx(1 - math.tanh(gamma * omega) if omega > 1 else 1.0, abs=1e-12)


# ---------------------------------------------------------------- decoupling-free (SimAM², Sun et al. 2024)
# ---------------------------------------------------------------- PDMP (gradmod's reading: the paper publishes no equations)
# ---------------------------------------------------------------- B-MM (Ma, Ding & Chen 2025)
@pytest.mark.parametrize("m", [2, 3, 4, 7])
def test_equal_float32_evidence_is_exactly_balanced(m):
    """Regression: a mean of equal float32 values rounded one ulp high and damped a balanced modality."""
    evidence = {f"m{i}": torch.tensor(341.87737198210226) for i in range(m)}
    assert all(r.item() == 1.0 for r in F.discrepancy_ratios(evidence).values())
    assert all(k.item() == 1.0 for k in F.ogm_coefficients(evidence, 1.0).values())


# ---------------------------------------------------------------- exact values, dtypes, devices, messages
# (each test below pins one property a plausible mistake in gradmod.functional would break)
def test_results_are_computed_wide_and_rounded_once_to_the_evidence_dtype():
    """float32 evidence gives float32 results equal to the float64 computation rounded once; wider stays wide."""
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        a, v = (torch.rand(2, generator=g) * 10 + 0.1).tolist()
        evidence = {"audio": torch.tensor(a), "visual": torch.tensor(v)}
        wide = {n: e.double() for n, e in evidence.items()}
        for narrow, exact in [
            (F.discrepancy_ratios(evidence), F.discrepancy_ratios(wide)),
            (F.ogm_coefficients(evidence, 0.7), F.ogm_coefficients(wide, 0.7)),
            (pdmp_coefficients(evidence, ("audio", "visual"), 0.4, 0.3),
             pdmp_coefficients(wide, ("audio", "visual"), 0.4, 0.3)),
        ]:
            for name in evidence:
                assert narrow[name].dtype == torch.float32 and exact[name].dtype == torch.float64
                assert narrow[name].item() == exact[name].float().item()
    for m in (3, 4):  # more modalities: sums of the others, exact in float64 and rounded once
        for _ in range(100):
            evidence = {f"m{i}": e for i, e in enumerate(torch.rand(m, generator=g) * 10 + 0.1)}
            wide = {n: e.double() for n, e in evidence.items()}
            for narrow, exact in [(F.discrepancy_ratios(evidence), F.discrepancy_ratios(wide)),
                                  (F.ogm_coefficients(evidence, 0.7), F.ogm_coefficients(wide, 0.7))]:
                assert all(narrow[n].item() == exact[n].float().item() for n in evidence)
    half = {"audio": torch.tensor(2.0, dtype=torch.float16), "visual": torch.tensor(1.0, dtype=torch.float16)}
    assert {k.dtype for k in F.ogm_coefficients(half, 0.5).values()} == {torch.float32}


def test_ogm_scores_dtype_follows_the_logits_but_never_below_float32():
    logits = torch.tensor([[0.1, 0.2, 0.3], [1.0, 0.0, -1.0]], dtype=torch.float64)
    target = torch.tensor([2, 0])
    exact = sum(torch.softmax(logits[i], 0)[target[i]].item() for i in range(2))
    score = F.ogm_scores(logits, target)
    assert score.dtype == torch.float64 and score.item() == pytest.approx(exact, rel=1e-15)
    for low in (torch.float16, torch.bfloat16):
        score = F.ogm_scores(logits.to(low), target)
        assert score.dtype == torch.float32
        expected = sum(torch.softmax(logits[i].to(low).float(), 0)[target[i]].item() for i in range(2))
        assert score.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("ignore_index", [-100, 1, None])
def test_ogm_scores_drops_exactly_the_ignored_samples(ignore_index):
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 0.0], [1.0, 1.0, 0.0], [0.5, 0.0, 2.0]])
    target = torch.tensor([0, 1, -100, 2] if ignore_index == -100 else [0, 1, 1, 2])
    kept = [i for i in range(4) if ignore_index is None or target[i].item() != ignore_index]
    expected = sum(torch.softmax(logits[i], 0)[target[i]].item() for i in kept)
    assert F.ogm_scores(logits, target, ignore_index=ignore_index).item() == pytest.approx(expected, rel=1e-6)


def test_empty_batches_give_zero_evidence():
    assert F.ogm_scores(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)).item() == 0.0
    assert dgm_evidence(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)).item() == 0.0


def test_results_stay_on_the_inputs_device():
    meta = torch.device("meta")
    assert F.ge_noise_std(torch.empty(1, device=meta)).device == meta
    assert F.ge_noise_std(torch.empty(5, device=meta)).device == meta
    assert pdmp_coefficients_of(torch.empty(3, device=meta), 1, 0.5, 0.5).device == meta
    assert F.ogm_coefficients_of(torch.empty(3, device=meta), 0.5).device == meta
    assert F.ogm_scores(torch.empty(4, 3, device=meta), torch.zeros(4, dtype=torch.long, device=meta)).device == meta
    assert F.noise_scale("restore", torch.empty(2, device=meta)).device == meta


@given(st.lists(st.integers(1, 5), min_size=1, max_size=3), st.integers(1, 3), st.integers(0, 999))
def test_decouple_linear_of_sequence_features_sums_back_to_the_full_head(widths, steps, seed):
    """Features ``[B, T, D_u]`` (one modality alone included): the blocks are taken along the last axis."""
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(sum(widths), 3)
    features = {f"m{i}": torch.randn(2, steps, w, generator=g) for i, w in enumerate(widths)}
    parts = F.decouple_linear(head.weight, head.bias, features)
    torch.testing.assert_close(sum(parts.values()), head(torch.cat(list(features.values()), -1)), rtol=1e-5, atol=1e-5)


def test_decouple_linear_computes_in_the_promoted_dtype_of_features_and_weight():
    weight, bias = torch.randn(3, 4), torch.randn(3, dtype=torch.float64)
    for feature_dtype, expected in [(torch.float16, torch.float32), (torch.float64, torch.float64), (torch.float32, torch.float32)]:
        features = {"audio": torch.randn(2, 2).to(feature_dtype), "visual": torch.randn(2, 2).to(feature_dtype)}
        parts = F.decouple_linear(weight, bias, features)
        assert {p.dtype for p in parts.values()} == {expected}
        full = torch.cat([f.to(expected) for f in features.values()], 1) @ weight.to(expected).T + bias.to(expected)
        torch.testing.assert_close(sum(parts.values()), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"^decouple_linear needs at least 1 modalities, got \[\]$"):
        F.decouple_linear(weight, bias, {})


def test_messages_name_the_function_and_the_argument():
    one = ev(audio=1.0)
    for function, name in [(F.discrepancy_ratios, "discrepancy_ratios"), (lambda e: F.ogm_coefficients(e, 0.5), "ogm_coefficients")]:
        with pytest.raises(ValueError, match=rf"^{name} needs at least 2 modalities, got \['audio'\]$"):
            function(one)
    with pytest.raises(ValueError, match=r"^rank_modalities needs at least 2 modalities, got \['audio'\]$"):
        rank_modalities({"audio": 0.5})
    two = ev(audio=1.0, visual=2.0)
    with pytest.raises(ValueError, match=r"^alpha must be a finite number >= 0, got -1"):
        F.ogm_coefficients(two, -1.0)
    with pytest.raises(ValueError, match=r"^gamma_p must be a finite number >= 0, got -1"):
        pdmp_coefficients(two, ("audio", "visual"), -1.0, 0.5)
    with pytest.raises(ValueError, match=r"^gamma_r must be a finite number >= 0, got -1"):
        pdmp_coefficients(two, ("audio", "visual"), 0.5, -1.0)
    with pytest.raises(ValueError, match=r"^ranking must name exactly the modalities \['audio', 'visual'\]"):
        pdmp_coefficients(two, ("audio", "text"), 0.5, 0.5)
    with pytest.raises(ValueError, match=r"^degree must be a finite number >= 0, got -1"):
        bmm_strength(2.0, -1.0)
    with pytest.raises(ValueError, match=r"^imbalance factor is NaN$"):
        bmm_strength(math.nan, 1.0)
    with pytest.raises(ValueError, match=r"^all unimodal accuracies are zero: the imbalance factor is undefined$"):
        imbalance_factor({"audio": 0.0, "visual": 0.0})
    with pytest.raises(ValueError, match=r"^metric of modality 'visual' must be a finite number, got nan"):
        rank_modalities({"audio": 0.5, "visual": math.nan})
    with pytest.raises(ValueError, match=r"^scores must be \[batch, classes\], got shape \(3,\)$"):
        dgm_evidence(torch.rand(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^target must be \[batch\] class indices matching scores batch 2"):
        dgm_evidence(torch.rand(2, 3), torch.zeros(3, dtype=torch.long))


def test_the_cached_constants_are_what_the_equations_need(monkeypatch):
    """``1 − I``, zeros, ones, −ones and the GE epsilon, made afresh for an empty cache (the cache is filled once
    per process, so this also checks what every later call reads)."""
    import gradmod._internal as internal

    monkeypatch.setattr(internal, "_CONSTANTS", {})
    monkeypatch.setattr(internal, "_STD_EPS_TENSORS", {})
    others, zeros, ones, minus_ones = internal.constants(3, torch.device("cpu"), torch.float64)
    assert torch.equal(others, torch.tensor([[0.0, 1, 1], [1, 0, 1], [1, 1, 0]], dtype=torch.float64))
    assert torch.equal(zeros, torch.zeros(3, dtype=torch.float64)) and torch.equal(ones, torch.ones(3, dtype=torch.float64))
    assert torch.equal(minus_ones, -torch.ones(3, dtype=torch.float64))
    assert internal.constants(3, torch.device("cpu"), torch.float64)[0] is others  # made once
    for m, dtype in [(2, torch.float32), (4, torch.float16)]:
        made = internal.constants(m, torch.device("cpu"), dtype)
        assert [(c.dtype, c.device.type) for c in made] == [(dtype, "cpu")] * 4
        assert [tuple(c.shape) for c in made] == [(m, m), (m,), (m,), (m,)]
    assert internal.wide_dtype(torch.device("mps")) == torch.float32  # MPS has no float64
    assert internal.wide_dtype(torch.device("cpu")) == torch.float64
    eps = internal.std_eps(torch.device("cpu"), torch.float64)
    assert eps.dtype == torch.float64 and eps.dim() == 0 and eps.item() == 1e-8
    assert internal.std_eps(torch.device("cpu"), torch.float64) is eps


def test_stacked_ratios_of_more_than_two_modalities_are_float64_whatever_the_evidence_dtype():
    """`ratios_of` is also called on the modulator's float32 evidence vector: with M > 2 it sums in float64."""
    for m in (3, 4, 6):
        evidence = torch.rand(m, generator=torch.Generator().manual_seed(m), dtype=torch.float32) * 5 + 0.1
        ratios = F.ratios_of(evidence)
        wide = evidence.double()
        assert ratios.dtype == torch.float64
        assert torch.equal(ratios, (m - 1) * wide / (wide.sum() - wide))
        assert F.ogm_coefficients_of(evidence, 0.5).dtype == torch.float64
    two = torch.tensor([3.0, 2.0])
    assert F.ratios_of(two).dtype == torch.float32 and torch.equal(F.ratios_of(two), torch.tensor([1.5, 2.0 / 3.0]))


def test_inputs_are_refused_with_the_argument_named():
    for bad, message in [
        (True, r"^alpha must be a real number, got the bool True$"),
        (torch.tensor(True), r"^alpha must be a real number, got the bool tensor\(True\)$"),
        (torch.ones(2), r"^alpha must be a real number or a 0-d real tensor, got a tensor of shape \(2,\)$"),
        ("0.5", r"^alpha must be a real number, got str '0.5'$"),
    ]:
        with pytest.raises(TypeError, match=message):
            F.ogm_coefficients(ev(audio=1.0, visual=2.0), bad)
    assert F.ogm_coefficients(ev(audio=1.0, visual=2.0), torch.tensor(0.5, dtype=torch.float64))["visual"].item() == (
        pytest.approx(1 - math.tanh(1.0)))
    target = torch.zeros(2, dtype=torch.long)
    with pytest.raises(TypeError, match=r"^logits must be a tensor, got list$"):
        F.ogm_scores([[0.0, 1.0]], target)
    with pytest.raises(TypeError, match=r"^target must be a tensor of class indices, got list$"):
        F.ogm_scores(torch.zeros(2, 3), [0, 1])
    for dtype in (torch.bool, torch.float32, torch.complex64):
        with pytest.raises(ValueError, match=rf"^target must hold integer class indices, got dtype {dtype}$"):
            F.ogm_scores(torch.zeros(2, 3), torch.zeros(2, dtype=dtype))
    with pytest.raises(ValueError, match=r"^target must be \[batch\] class indices matching logits batch 2, got shape \(3,\)$"):
        F.ogm_scores(torch.zeros(2, 5), torch.zeros(3, dtype=torch.long))
