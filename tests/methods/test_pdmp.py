"""PDMP (gradmod's reading): the ranking and the asymmetric coefficients, property-tested."""

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from gradmod.methods.pdmp import (
    pdmp_coefficients,
    rank_modalities,
)

positive = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False)
strength = st.floats(min_value=0.0, max_value=5.0, allow_nan=False)
names3 = ["audio", "visual", "text"]


def ev(**values):
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()}


def test_rank_modalities_orders_and_rejects_ties():
    assert rank_modalities({"audio": 0.61, "visual": 0.52, "text": 0.7}) == ("text", "audio", "visual")
    with pytest.raises(ValueError, match="tie"):
        rank_modalities({"audio": 0.5, "visual": 0.5})
    with pytest.raises(ValueError, match="not finite"):
        rank_modalities({"audio": float("nan"), "visual": 0.5})


@given(st.lists(positive, min_size=2, max_size=4), strength, strength)
def test_pdmp_dominant_never_below_others(values, gp, gr):
    names = [f"m{i}" for i in range(len(values))]
    evidence = {n: torch.tensor(x, dtype=torch.float64) for n, x in zip(names, values)}
    ranking = names  # m0 dominant
    k = pdmp_coefficients(evidence, ranking, gp, gr)
    assert k["m0"].item() >= 1.0
    for n in names[1:]:
        assert 0.0 < k[n].item() <= 1.0 or (gr * values[names.index(n)] / values[0] > 18)
        assert k["m0"].item() >= k[n].item()
    assert k["m0"].item() <= 1 + gp + 1e-12
    assert all(math.isfinite(c.item()) for c in k.values())


@given(positive, positive, strength, strength)
def test_pdmp_swapping_names_swaps_coefficients(a, v, gp, gr):
    k1 = pdmp_coefficients(ev(audio=a, visual=v), ("audio", "visual"), gp, gr)
    k2 = pdmp_coefficients(ev(visual=a, audio=v), ("visual", "audio"), gp, gr)
    assert k1["audio"].item() == pytest.approx(k2["visual"].item(), abs=1e-12)
    assert k1["visual"].item() == pytest.approx(k2["audio"].item(), abs=1e-12)


def test_pdmp_formula_and_boost():
    k = pdmp_coefficients(ev(audio=1.0, visual=3.0), ("audio", "visual"), 0.5, 0.2)
    assert k["audio"].item() == pytest.approx(1 + 0.5 * math.tanh(2.0))
    assert k["visual"].item() == pytest.approx(1 - math.tanh(0.2 * 3.0))
    k = pdmp_coefficients(ev(audio=3.0, visual=1.0), ("audio", "visual"), 0.5, 0.2)
    assert k["audio"].item() == 1.0


def test_pdmp_ranking_must_match():
    with pytest.raises(ValueError, match="ranking"):
        pdmp_coefficients(ev(audio=1.0, visual=2.0), ("audio", "text"), 0.1, 0.1)


def test_rank_modalities_accepts_any_real_metric_even_negative():
    assert rank_modalities({"audio": -0.5, "visual": -2.0, "text": 0.0}) == ("text", "audio", "visual")


@given(st.lists(positive, min_size=2, max_size=4), st.integers(0, 3), strength, strength)
@example([1.0, 3.0, 2.0], 0, 0.5, 0.5)  # the dominant modality first, overtaken by the middle one
@example([2.0, 1.0, 3.0, 0.5], 3, 0.5, 0.5)  # ... last, overtaken by every other
def test_pdmp_coefficients_follow_the_formula_for_any_dominant_modality(values, d, gp, gr):
    d %= len(values)
    names = [f"m{i}" for i in range(len(values))]
    ranking = [names[d], *[n for n in names if n != names[d]]]
    k = pdmp_coefficients({n: torch.tensor(x, dtype=torch.float64) for n, x in zip(names, values)}, ranking, gp, gr)
    overtaken = max(values[u] / values[d] for u in range(len(values)) if u != d)
    assert k[names[d]].item() == pytest.approx(1 + gp * math.tanh(max(overtaken - 1, 0.0)), abs=1e-12)
    for u, name in enumerate(names):
        if u != d:
            assert k[name].item() == pytest.approx(1 - math.tanh(gr * values[u] / values[d]), abs=1e-12)


def test_pdmp_without_dominant_evidence_damps_every_other_modality_fully():
    """``e_d ≤ 0`` makes every ``e_u/e_d`` infinite, whatever the sign of ``e_u``; a NaN ratio counts as infinite too."""
    for dominant, other in [(0.0, 2.0), (0.0, -2.0), (0.0, 0.0), (-1.0, 3.0), (1.0, math.nan)]:
        k = pdmp_coefficients(ev(audio=dominant, visual=other), ("audio", "visual"), 0.5, 0.2)
        assert k["visual"].item() == 0.0
        assert k["audio"].item() == 1.5


