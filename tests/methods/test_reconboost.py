"""ReconBoost (Hua et al., ICML 2024): the boosting loss against a transcription of the official ``train.py``, the
stage schedule (official 4 + 4 and BalanceBenchmark's 1 + 1), which parameters each phase trains, the alignment
term with and without its gradient, errors by name, and exact resume."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

from gradmod.methods import reconboost
from gradmod.methods.reconboost import (
    BALANCEBENCHMARK,
    ReconBoost,
    alignment_loss,
    boosting_loss,
    boosting_weights,
)

NAMES = ("audio", "visual")


def logits_and_target(seed: int, names=NAMES, batch: int = 6, classes: int = 4, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    logits = {n: (scale * torch.randn(batch, classes, generator=g)).requires_grad_() for n in names}
    return logits, torch.randint(0, classes, (batch,), generator=g)


# ------------------------------------------------------------------ the official code, transcribed
def official_boosting_loss(out_obj, out_join, lbl, weight1=5.0, weight2=1.0):
    """huacong/ReconBoost @14ab57a, train.py (phase 1): the per-sample loss, then ``.mean()`` before backward."""
    target = torch.zeros(out_obj.shape).scatter_(1, lbl.view(-1, 1), 1)
    boosting = -weight1 * (target * out_obj.log_softmax(1)).mean(-1) + weight2 * (
        target * out_join.detach().softmax(1) * out_obj.log_softmax(1)
    ).mean(-1)
    return boosting


def official_ga_loss(out_obj, pre_out_obj):
    """train.py: ``mse_criterion(out_obj.detach().softmax(1), pre_out_obj.detach().softmax(1))``."""
    return nn.MSELoss()(out_obj.detach().softmax(1), pre_out_obj.detach().softmax(1))


@settings(max_examples=40)
@given(seed=st.integers(0, 10_000), w1=st.floats(1.0, 6.0), share=st.floats(0.0, 1.0), boost=st.floats(0.01, 3.0))
def test_the_boosting_loss_is_the_official_one(seed, w1, share, boost):
    logits, y = logits_and_target(seed)
    member, other = logits["audio"], logits["visual"]
    ensemble = boost * other
    mine = boosting_loss(member, ensemble, y, task_weight=w1, reconcilement=share * w1)
    official = official_boosting_loss(member, ensemble, y, w1, share * w1).mean()
    torch.testing.assert_close(mine, official)
    g_mine, g_other = torch.autograd.grad(mine, [member, other], allow_unused=True)
    g_official = torch.autograd.grad(official, member)[0]
    torch.testing.assert_close(g_mine, g_official)
    assert g_other is None  # the ensemble of the others is detached


def test_the_method_step_equals_the_official_step_in_both_phases_and_with_ga_none():
    """Stage 1 (visual boosted, audio previous) with ga=None: the official loss is boosting + α·GA(detached),
    whose gradient is the boosting loss's; the correction phase is CE(β·Σ f)."""
    logits, y = logits_and_target(3)
    method = ReconBoost(NAMES, ga=None, boost_rate=0.7)
    method.start_epoch(8)  # stage 1: visual, boosting
    assert (method.member, method.phase) == ("visual", "boost")
    mine = method.loss(logits, y)
    official = (
        official_boosting_loss(logits["visual"], 0.7 * logits["audio"], y)
        + 0.5 * official_ga_loss(logits["visual"], logits["audio"])
    ).mean()
    grads_mine = torch.autograd.grad(mine, list(logits.values()), allow_unused=True)
    grads_official = torch.autograd.grad(official, list(logits.values()), allow_unused=True)
    assert grads_mine[0] is None and grads_official[0] is None
    torch.testing.assert_close(grads_mine[1], grads_official[1])
    torch.testing.assert_close(method.last["alignment"]["visual"], official_ga_loss(logits["visual"], logits["audio"]).item())
    method.start_epoch(12)  # stage 1, correction
    assert method.phase == "correct"
    fused = method.loss(logits, y)
    torch.testing.assert_close(fused, F.cross_entropy(0.7 * (logits["audio"] + logits["visual"]), y))
    grad_rate = torch.autograd.grad(fused, method.extra.rate)[0]
    summed = (logits["audio"] + logits["visual"]).detach()
    expected = ((torch.softmax(0.7 * summed, 1) - F.one_hot(y, 4)) * summed).sum() / y.shape[0]
    torch.testing.assert_close(grad_rate, expected)


def test_the_alignment_term_has_a_gradient_towards_the_previous_member():
    logits, y = logits_and_target(5)
    with_ga, without = ReconBoost(NAMES, alignment=0.5), ReconBoost(NAMES, ga=None)
    for method in (with_ga, without):
        method.start_epoch(8)
    g_with = torch.autograd.grad(with_ga.loss(logits, y), logits["visual"])[0]
    g_without = torch.autograd.grad(without.loss(logits, y), logits["visual"])[0]
    mse = F.mse_loss(torch.softmax(logits["visual"], 1), torch.softmax(logits["audio"], 1).detach())
    g_mse = torch.autograd.grad(mse, logits["visual"])[0]
    torch.testing.assert_close(g_with - g_without, 0.5 * g_mse)
    assert g_mse.abs().max() > 0
    assert alignment_loss(logits["audio"], logits["audio"]) == 0
    # stage 0 has no previous member: no term, nothing recorded
    first = ReconBoost(NAMES)
    first.start_epoch(0)
    first.loss(logits, y)
    assert math.isnan(first.last["alignment"]["audio"])


def test_an_empty_ensemble_predicts_the_uniform_distribution_where_the_official_code_predicts_one():
    """Without pretrained members, stage 0 boosts against no member: the constant initial model. The official
    code's ensemble is the scalar c0 broadcast to [B, 1], whose softmax is 1: a weight (w1 − w2)/C, against
    gradmod's (w1 − w2/C)/C — a factor (w1 − w2/C)/(w1 − w2) = 1.2 on that stage's gradient for C = 6."""
    logits, y = logits_and_target(7, classes=6)
    method = ReconBoost(NAMES, pretrained=False)
    method.start_epoch(0)
    mine = method.loss(logits, y)
    official = official_boosting_loss(logits["audio"], torch.full((6, 1), 0.3), y).mean()
    torch.testing.assert_close(mine / official, torch.tensor((5.0 - 1.0 / 6) / (5.0 - 1.0)))
    assert method.last["confidence"]["ensemble"] == pytest.approx(1 / 6)


# ------------------------------------------------------------------ the equations' properties
@settings(max_examples=30)
@given(seed=st.integers(0, 10_000), w1=st.floats(0.5, 6.0), share=st.floats(0.0, 1.0))
def test_the_weights_lie_between_their_bounds_and_fall_as_the_ensemble_gets_surer(seed, w1, share):
    logits, y = logits_and_target(seed, classes=5)
    w2 = share * w1
    weights = boosting_weights(logits["visual"], y, 5, w1, w2)
    assert ((weights >= (w1 - w2) / 5 - 1e-6) & (weights <= w1 / 5 + 1e-6)).all()
    surer = logits["visual"].detach().clone()
    surer[torch.arange(6), y] += 1.0
    assert (boosting_weights(surer, y, 5, w1, w2) <= weights + 1e-7).all()


def test_without_reconcilement_the_boosting_loss_is_a_scaled_cross_entropy():
    logits, y = logits_and_target(2)
    loss = boosting_loss(logits["audio"], logits["visual"], y, task_weight=5.0, reconcilement=0.0)
    torch.testing.assert_close(loss, 5.0 / 4 * F.cross_entropy(logits["audio"], y))


def test_renaming_the_modalities_consistently_leaves_the_loss():
    """Stage 1 of (audio, visual) and stage 0 of (visual, audio) both boost visual against audio."""
    logits, y = logits_and_target(4)
    a, b = ReconBoost(("audio", "visual"), ga=None), ReconBoost(("visual", "audio"), ga=None)
    a.start_epoch(8)
    b.start_epoch(0)
    assert a.member == b.member == "visual"
    torch.testing.assert_close(a.loss(logits, y), b.loss(logits, y))


# ------------------------------------------------------------------ the schedule
def test_the_official_and_balancebenchmark_schedules():
    official, bb = ReconBoost(NAMES), ReconBoost(NAMES, **BALANCEBENCHMARK)
    seen = []
    for epoch in range(18):
        official.start_epoch(epoch)
        seen.append((official.stage, official.member, official.phase))
    assert seen[:9] == [(0, "audio", "boost")] * 4 + [(0, "audio", "correct")] * 4 + [(1, "visual", "boost")]
    assert seen[16] == (2, "audio", "boost")
    assert bb.boost_rate == pytest.approx(0.01) and official.boost_rate == 1.0
    bb_seen = []
    for epoch in range(4):
        bb.start_epoch(epoch)
        bb_seen.append((bb.member, bb.phase))
    assert bb_seen == [("audio", "boost"), ("audio", "correct"), ("visual", "boost"), ("visual", "correct")]


def test_three_modalities_cycle_and_members_join_after_their_first_boosting_phase():
    names = ("a", "b", "c")
    method = ReconBoost(names, boost_epochs=1, correct_epochs=1, pretrained=["b"])
    expected = [
        ("a", "boost", ("b",)),
        ("a", "correct", ("a", "b")),
        ("b", "boost", ("a", "b")),
        ("b", "correct", ("a", "b")),
        ("c", "boost", ("a", "b")),
        ("c", "correct", ("a", "b", "c")),
        ("a", "boost", ("a", "b", "c")),
    ]
    for epoch, row in enumerate(expected):
        method.start_epoch(epoch)
        assert (method.member, method.phase, method.ensemble) == row
    logits, y = logits_and_target(1, names)
    method.start_epoch(6)  # stage 3: a boosted against b + c, previous member c
    loss = method.loss(logits, y)
    expected_loss = boosting_loss(logits["a"], logits["b"] + logits["c"], y) + 0.5 * alignment_loss(logits["a"], logits["c"])
    torch.testing.assert_close(loss, expected_loss)
    grads = torch.autograd.grad(loss, [logits[n] for n in names], allow_unused=True)
    assert grads[0] is not None and grads[1] is None and grads[2] is None


def test_the_correction_phase_trains_only_the_members_in_the_ensemble():
    logits, y = logits_and_target(6, ("a", "b", "c"))
    method = ReconBoost(("a", "b", "c"), boost_epochs=1, correct_epochs=1, pretrained=False)
    method.start_epoch(1)  # stage 0's correction: only a joined
    loss = method.loss(logits, y)
    torch.testing.assert_close(loss, F.cross_entropy(logits["a"], y))
    grads = torch.autograd.grad(loss, [logits["a"], logits["b"], method.extra.rate], allow_unused=True)
    assert grads[0] is not None and grads[1] is None and grads[2] is not None
    assert method.last["trained"] == {"a": 1.0, "b": 0.0, "c": 0.0, "ensemble": 1.0}


def test_ensemble_logits_is_the_test_time_prediction():
    logits, _ = logits_and_target(8)
    method = ReconBoost(NAMES, boost_rate=0.5)
    torch.testing.assert_close(method.predict(logits), 0.5 * (logits["audio"] + logits["visual"]))


# ------------------------------------------------------------------ a loop like the official one
class Members(nn.Module):
    """Two unimodal models (encoder and linear head), as the loop gives them to ReconBoost."""

    def __init__(self):
        super().__init__()
        self.nets = nn.ModuleDict({n: nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)) for n in NAMES})

    def forward(self, inputs):
        return {n: self.nets[n](inputs[n]) for n in NAMES}


def batches(count=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [({n: torch.randn(8, 5, generator=g) for n in NAMES}, torch.randint(0, 3, (8,), generator=g)) for _ in range(count)]


def train_official(model, data, stages):
    """The official schedule, transcribed (train.py): per stage a new SGD on the boosted member for its epochs, then
    a new SGD on every member and the boost rate for the correction (one epoch each here)."""
    boost_rate = nn.Parameter(torch.tensor(1.0))
    for stage in range(stages):
        name = NAMES[stage % 2]
        other = NAMES[1 - stage % 2]
        opt = torch.optim.SGD(model.nets[name].parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        for inputs, y in data:
            with torch.no_grad():
                out_join = boost_rate * model.nets[other](inputs[other])
            out_obj = model.nets[name](inputs[name])
            loss = official_boosting_loss(out_obj, out_join, y)
            model.zero_grad()
            loss.mean().backward()
            opt.step()
        opt = torch.optim.SGD([*model.parameters(), boost_rate], lr=0.05, momentum=0.9, weight_decay=5e-4)
        for inputs, y in data:
            out = model(inputs)
            loss = F.cross_entropy(boost_rate * (out["audio"] + out["visual"]), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return boost_rate


def train_gradmod(model, method, data, epochs, start=0, optimizer_state=None):
    """The generic loop of kind "loss", with the optimizer rebuilt at each phase as the official code does."""
    for epoch in range(start, epochs):
        method.start_epoch(epoch)
        opt = torch.optim.SGD([*model.parameters(), *method.extra.parameters()], lr=0.05, momentum=0.9, weight_decay=5e-4)
        if optimizer_state is not None:
            opt.load_state_dict(optimizer_state)
            optimizer_state = None
        for inputs, y in data:
            opt.zero_grad()
            method.loss(model(inputs), y).backward()
            opt.step()
    return opt


def test_a_loop_of_kind_loss_reproduces_the_official_training():
    data = batches()
    torch.manual_seed(0)
    official = Members()
    torch.manual_seed(0)
    model = Members()
    rate = train_official(official, data, stages=3)
    method = ReconBoost(NAMES, boost_epochs=1, correct_epochs=1, ga=None)
    train_gradmod(model, method, data, epochs=6)
    for p, q in zip(official.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rate.detach(), method.extra.rate.detach(), rtol=1e-5, atol=1e-6)
    assert len(method.history) == 18


# ------------------------------------------------------------------ errors and warnings
def test_bad_arguments_fail_by_name():
    logits, y = logits_and_target(0)
    with pytest.raises(ValueError, match="must not exceed task_weight"):
        ReconBoost(NAMES, reconcilement=6.0)
    with pytest.raises(ValueError, match=r"pretrained names unknown modalities \['text'\]"):
        ReconBoost(NAMES, pretrained=["text"])
    with pytest.raises(TypeError, match="the string 'audio'"):
        ReconBoost(NAMES, pretrained="audio")
    with pytest.raises(ValueError, match="ga must be one of"):
        ReconBoost(NAMES, ga="mse")
    with pytest.raises(ValueError, match="boost_epochs must be an int >= 1"):
        ReconBoost(NAMES, boost_epochs=0)
    with pytest.raises(ValueError, match="'ensemble' names the ensemble"):
        ReconBoost(("ensemble", "audio"))
    method = ReconBoost(NAMES)
    with pytest.raises(RuntimeError, match=r"call method.start_epoch\(epoch\) before every epoch"):
        method.loss(logits, y)
    method.start_epoch(0)
    with pytest.raises(ValueError, match=r"missing \['visual'\], unknown \['text'\]"):
        method.loss({"audio": logits["audio"], "text": logits["visual"]}, y)
    with pytest.raises(ValueError, match=r"modalities \['visual'\] contain NaN or inf"):
        method.loss({"audio": logits["audio"], "visual": torch.full((6, 4), math.nan)}, y)
    with pytest.raises(ValueError, match="outside \\[0, 4\\)"):
        method.loss(logits, torch.full((6,), 4))
    with pytest.raises(ValueError, match="of one shape"):
        method.loss({"audio": logits["audio"], "visual": logits["visual"][:, :3]}, y)
    with pytest.raises(ValueError, match="the batch is empty"):
        method.loss({n: torch.zeros(0, 4) for n in NAMES}, torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="epoch must be an int >= 0"):
        method.start_epoch(-1)


def test_a_loss_after_end_epoch_without_the_next_start_epoch_is_warned():
    logits, y = logits_and_target(0)
    method = ReconBoost(NAMES)
    method.start_epoch(0)
    method.loss(logits, y)
    method.end_epoch(0)
    with pytest.warns(RuntimeWarning, match=r"call method.start_epoch\(epoch\) before every epoch"):
        method.loss(logits, y)
    method.start_epoch(1)
    method.loss(logits, y)  # no second warning, and none after start_epoch


def test_a_collapsed_boost_rate_is_warned_once():
    method = ReconBoost(NAMES)
    with torch.no_grad():
        method.extra.rate.fill_(0.001)
    with pytest.warns(RuntimeWarning, match="boost rate fell to 0.001"):
        method.start_epoch(4)


# ------------------------------------------------------------------ state
def test_exact_resume_mid_epoch_equals_an_uninterrupted_run(tmp_path):
    data = batches(4, seed=1)
    torch.manual_seed(1)
    model = Members()
    method = ReconBoost(NAMES, boost_epochs=1, correct_epochs=1)
    train_gradmod(model, method, data, epochs=5)

    torch.manual_seed(1)
    first = Members()
    first_method = ReconBoost(NAMES, boost_epochs=1, correct_epochs=1)
    train_gradmod(first, first_method, data, epochs=2)
    first_method.start_epoch(2)  # stop after two steps of epoch 2
    opt = torch.optim.SGD([*first.parameters(), *first_method.extra.parameters()], lr=0.05, momentum=0.9, weight_decay=5e-4)
    for inputs, y in data[:2]:
        opt.zero_grad()
        first_method.loss(first(inputs), y).backward()
        opt.step()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict(), "method": first_method.state_dict()}, tmp_path / "c.pt")

    saved = torch.load(tmp_path / "c.pt")
    resumed = Members()
    resumed.load_state_dict(saved["model"])
    resumed_method = ReconBoost(NAMES, boost_epochs=1, correct_epochs=1)
    resumed_method.load_state_dict(saved["method"])
    resumed_method.start_epoch(2)
    opt = torch.optim.SGD([*resumed.parameters(), *resumed_method.extra.parameters()], lr=0.05, momentum=0.9, weight_decay=5e-4)
    opt.load_state_dict(saved["opt"])
    for inputs, y in data[2:]:
        opt.zero_grad()
        resumed_method.loss(resumed(inputs), y).backward()
        opt.step()
    train_gradmod(resumed, resumed_method, data, epochs=5, start=3)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(method.extra.rate, resumed_method.extra.rate)
    mine, theirs = method.state_dict()["history"], resumed_method.state_dict()["history"]
    assert mine["steps"] == theirs["steps"]
    torch.testing.assert_close(mine["rows"], theirs["rows"], rtol=0, atol=0, equal_nan=True)


def test_state_refuses_newer_versions_and_other_configurations_and_reset_forgets():
    method = ReconBoost(NAMES)
    method.start_epoch(3)
    with torch.no_grad():
        method.extra.rate.fill_(2.0)
    logits, y = logits_and_target(0)
    method.loss(logits, y)
    state = method.state_dict()
    other = ReconBoost(NAMES)
    other.load_state_dict(state)
    assert (other.stage, other.phase) == (0, "boost")
    assert other.boost_rate == 2.0 and len(other.history) == 1
    with pytest.raises(ValueError, match="newer"):
        ReconBoost(NAMES).load_state_dict({**state, "version": 99})
    with pytest.raises(ValueError, match="boost_epochs=4, this ReconBoost has boost_epochs=1"):
        ReconBoost(NAMES, boost_epochs=1).load_state_dict(state)
    method.reset()
    assert method.boost_rate == 1.0 and method.history == [] and "before the first epoch" in repr(method)
    with pytest.raises(RuntimeError, match="start_epoch"):
        method.loss(logits, y)


def test_the_registry_entry():
    (info,) = reconboost.METHODS
    assert info.key == "reconboost" and info.preset is ReconBoost and info.kind == "loss"
    assert info.strength.keyword == "reconcilement" and ReconBoost.loss_inputs == ("unimodal_head_logits", "target")
    assert {o.keyword for o in info.options} == {"boost_epochs", "correct_epochs", "boost_rate", "ga", "pretrain_epochs"}
