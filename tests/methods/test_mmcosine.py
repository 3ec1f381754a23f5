"""MMCosine (Xu et al., ICASSP 2023): the cosine head against a transcription of the official ``main_CD.py``
(and BalanceBenchmark's three-modality form), its properties (scale invariance, bounded logits, decoupled logits
that add up), and the Fusion interface."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from gradmod.fusion import Fusion
from gradmod.methods import mmcosine
from gradmod.methods.mmcosine import MMCosineFusion, cosine_logits

NAMES = ("audio", "visual")


def official_logits(a, v, fc_weight, scaling, split):
    """``main_CD.py`` ``train_epoch`` with ``--mmcosine True``: features normalised per sample (dim 1), the
    transposed weight blocks per class (dim 0), each product times the scaling, summed."""
    out_a = torch.mm(F.normalize(a, dim=1), F.normalize(torch.transpose(fc_weight[:, :split], 0, 1), dim=0))
    out_v = torch.mm(F.normalize(v, dim=1), F.normalize(torch.transpose(fc_weight[:, split:], 0, 1), dim=0))
    out_a, out_v = out_a * scaling, out_v * scaling
    return out_a + out_v, out_a, out_v


def test_matches_the_official_cosine_logits_and_gradients():
    torch.manual_seed(0)
    head = MMCosineFusion({"audio": 6, "visual": 4}, 5)
    weight = head.linear.weight.detach().clone().requires_grad_()
    a, v = torch.randn(7, 6, requires_grad=True), torch.randn(7, 4, requires_grad=True)
    a2, v2 = a.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
    y = torch.randint(0, 5, (7,))
    ours = head({"audio": a, "visual": v})
    theirs, out_a, out_v = official_logits(a2, v2, weight, 10.0, 6)
    torch.testing.assert_close(ours, theirs)
    unimodal = head.unimodal_logits({"audio": a, "visual": v})
    torch.testing.assert_close(unimodal["audio"], out_a)
    torch.testing.assert_close(unimodal["visual"], out_v)
    F.cross_entropy(ours, y).backward()
    F.cross_entropy(theirs, y).backward()
    for mine, want in ((a.grad, a2.grad), (v.grad, v2.grad), (head.linear.weight.grad, weight.grad)):
        torch.testing.assert_close(mine, want)


def test_three_modalities_match_balancebenchmarks_form():
    """``MMCosine_trainer.py``: one normalised block per modality, in order, scaled by ``scaling`` (15 there)."""
    torch.manual_seed(1)
    widths = {"a": 3, "v": 4, "t": 2}
    head = MMCosineFusion(widths, 4, scaling=15.0)
    features = {n: torch.randn(5, d) for n, d in widths.items()}
    w = head.linear.weight
    expected = (
        torch.mm(F.normalize(features["a"], dim=1), F.normalize(torch.transpose(w[:, :3], 0, 1), dim=0))
        + torch.mm(F.normalize(features["v"], dim=1), F.normalize(torch.transpose(w[:, 3:7], 0, 1), dim=0))
        + torch.mm(F.normalize(features["t"], dim=1), F.normalize(torch.transpose(w[:, 7:], 0, 1), dim=0))
    ) * 15.0
    torch.testing.assert_close(head(features), expected)


@given(scale=st.floats(0.01, 100.0), weight_scale=st.floats(0.01, 100.0), seed=st.integers(0, 1000))
def test_logits_ignore_feature_and_weight_norms_and_are_bounded(scale, weight_scale, seed):
    g = torch.Generator().manual_seed(seed)
    h, w = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    z = cosine_logits(h, w, 7.0)
    torch.testing.assert_close(cosine_logits(h * scale, w * weight_scale, 7.0), z)
    assert (z.abs() <= 7.0 + 1e-9).all()


def test_decoupled_logits_add_up_and_a_zero_feature_is_finite():
    torch.manual_seed(2)
    head = MMCosineFusion({"audio": 3, "visual": 3}, 4)
    features = {"audio": torch.zeros(2, 3, requires_grad=True), "visual": torch.randn(2, 3)}
    unimodal = head.unimodal_logits(features)
    torch.testing.assert_close(head(features), unimodal["audio"] + unimodal["visual"])
    assert torch.equal(unimodal["audio"], torch.zeros(2, 4))
    head(features).sum().backward()
    assert torch.isfinite(features["audio"].grad).all()


def test_a_louder_modality_no_longer_dominates_the_logits():
    """The motivation: multiplying one modality's features by 100 changes a linear head's logits ~100-fold,
    and the cosine head's not at all."""
    torch.manual_seed(3)
    head = MMCosineFusion({"audio": 4, "visual": 4}, 3)
    linear = nn.Linear(8, 3, bias=False)
    linear.weight.data.copy_(head.linear.weight.data)
    a, v = torch.randn(6, 4), torch.randn(6, 4)
    torch.testing.assert_close(head({"audio": 100 * a, "visual": v}), head({"audio": a, "visual": v}))
    assert not torch.allclose(linear(torch.cat([100 * a, v], 1)), linear(torch.cat([a, v], 1)))


def test_it_is_a_fusion_head_that_trains_with_cross_entropy():
    torch.manual_seed(0)
    head = MMCosineFusion({"audio": 4, "visual": 4}, 3)
    assert isinstance(head, Fusion) and head.decouplable and head.modalities == NAMES
    y = torch.arange(3).repeat(4)
    features = {"audio": F.one_hot(y, 4).float() + 0.1 * torch.randn(12, 4), "visual": torch.randn(12, 4)}
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    first = F.cross_entropy(head(features), y).item()
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(head(features), y).backward()
        opt.step()
    assert F.cross_entropy(head(features), y).item() < first / 2
    clone = MMCosineFusion({"audio": 4, "visual": 4}, 3)
    clone.load_state_dict(copy.deepcopy(head.state_dict()))
    torch.testing.assert_close(clone(features), head(features))
    assert "scaling=10" in repr(head) and set(head.state_dict()) == {"linear.weight"}  # no bias


def test_bad_arguments_and_inputs_fail_by_name():
    with pytest.raises(ValueError, match="scaling must be a finite number > 0"):
        MMCosineFusion({"audio": 2, "visual": 2}, 3, scaling=0.0)
    with pytest.raises(ValueError, match="at least 2 modalities"):
        MMCosineFusion({"audio": 2}, 3)
    head = MMCosineFusion({"audio": 2, "visual": 2}, 3)
    with pytest.raises(ValueError, match=r"missing \['visual'\]"):
        head({"audio": torch.randn(1, 2)})
    with pytest.raises(ValueError, match=r"features\['visual'\] must be \[batch, 2\]"):
        head({"audio": torch.randn(1, 2), "visual": torch.randn(1, 3)})


def test_the_registry_entry_is_a_head():
    info = mmcosine.METHODS[0]
    assert info.key == "mmcosine" and info.preset is MMCosineFusion and info.kind == "head"
    assert info.strength.keyword == "scaling" and info.strength.default == 10.0
