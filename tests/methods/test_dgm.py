"""DGM's own equations: the evidence of eq. (6) (Fu, Gao & Xu), property-tested."""


import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradmod.methods.dgm import dgm_evidence

positive = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False)
strength = st.floats(min_value=0.0, max_value=5.0, allow_nan=False)
names3 = ["audio", "visual", "text"]


def ev(**values):
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()}


def test_dgm_evidence_hand_computed():
    s = torch.tensor([[0.9, 0.1, 0.6], [0.2, 0.4, 0.8]])
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    # sample 0: Σ sY = 1.5, Δ = mean(.9,.6) − .1 = .65 ; sample 1: Σ sY = .8, Δ = .8 − mean(.2,.4) = .5
    assert dgm_evidence(s, y).item() == pytest.approx(1.5 + 0.65 + 0.8 + 0.5)


def test_dgm_evidence_degenerate_rows():
    s = torch.tensor([[0.3, 0.7], [0.4, 0.6]])
    y = torch.tensor([[0.0, 0.0], [1.0, 1.0]])  # no correct class ; no wrong class
    # row 0: Σ sY = 0, Δ = 0 − mean(.3,.7) = −.5 ; row 1: Σ sY = 1.0, Δ = mean(.4,.6) − 0 = .5
    assert dgm_evidence(s, y).item() == pytest.approx(-0.5 + 1.0 + 0.5)


@given(st.integers(1, 6), st.integers(2, 6), st.integers(0, 999))
def test_dgm_single_label_equals_one_hot_multilabel(batch, classes, seed):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(batch, classes, generator=g), 1)
    target = torch.randint(0, classes, (batch,), generator=g)
    one_hot = torch.nn.functional.one_hot(target, classes).float()
    assert dgm_evidence(probs, target).item() == pytest.approx(dgm_evidence(probs, one_hot).item(), rel=1e-6)


@given(st.integers(1, 6), st.integers(2, 6), st.integers(0, 999))
def test_dgm_evidence_bounds(batch, classes, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(batch, classes, generator=g)
    y = (torch.rand(batch, classes, generator=g) > 0.5).float()
    e = dgm_evidence(s, y).item()
    # each sample contributes Σ_c sY ∈ [0, C] and Δ ∈ [−1, 1]
    assert -batch - 1e-6 <= e <= batch * (classes + 1) + 1e-6


def test_dgm_evidence_shape_errors():
    with pytest.raises(ValueError, match="multi-hot"):
        dgm_evidence(torch.rand(2, 3), torch.ones(2, 4))


def test_dgm_evidence_of_ignored_index_targets_with_a_single_class():
    scores = torch.tensor([[0.75], [0.5], [0.25]])
    target = torch.tensor([0, -100, 0])
    # each kept sample: Σ sY = s, Δs̄ = s − 0 (no wrong class)
    assert dgm_evidence(scores, target, ignore_index=-100).item() == pytest.approx(2 * (0.75 + 0.25))


