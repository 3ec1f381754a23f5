"""The decoupling-free ratio of SimAM², eq. (11) (Sun et al., *More than Vanilla Fusion*), property-tested."""


import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradmod.methods.decoupling_free import zeta_evidence, zeta_ratios

positive = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False)
strength = st.floats(min_value=0.0, max_value=5.0, allow_nan=False)
names3 = ["audio", "visual", "text"]


def ev(**values):
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()}


@given(st.integers(1, 50), st.integers(0, 999))
def test_zeta_ratios_eq11(n, seed):
    z = torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 0.98 + 0.01
    r1, r2 = zeta_ratios(z)
    assert r1.item() == pytest.approx((z.sum() / (1 - z).sum()).item(), rel=1e-5)
    assert (r1 * r2).item() == pytest.approx(1.0, rel=1e-5)


def test_zeta_balanced_gives_ratio_one():
    r1, r2 = zeta_ratios(torch.full((4, 8), 0.5))
    assert r1.item() == pytest.approx(1.0) and r2.item() == pytest.approx(1.0)


def test_zeta_evidence_for_three_gates_and_errors():
    gates = torch.softmax(torch.randn(3, 5, 4), 0)
    e = zeta_evidence(dict(zip(names3, gates)), names3)
    assert sum(x.item() for x in e.values()) == pytest.approx(20.0, rel=1e-5)
    with pytest.raises(ValueError, match="two modalities"):
        zeta_evidence(gates[0], names3)
    with pytest.raises(ValueError, match="missing"):
        zeta_evidence({"audio": gates[0]}, ["audio", "visual"])


def test_zeta_evidence_messages():
    with pytest.raises(ValueError, match=r"^a single ζ tensor describes two modalities, but there are 3 \(\['audio', "
                       r"'visual', 'text'\]\): pass a mapping name -> gate instead$"):
        zeta_evidence(torch.rand(4), names3)
    with pytest.raises(TypeError, match=r"^zeta must be a tensor \(two modalities\) or a mapping name -> gate, got list$"):
        zeta_evidence([0.5], ["audio", "visual"])
    with pytest.raises(ValueError, match=r"^zeta gates must name exactly the modalities \['audio', 'visual'\]: missing"):
        zeta_evidence({"audio": torch.rand(3)}, ["audio", "visual"])


