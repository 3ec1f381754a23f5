"""OPM (Wei, Hu, Du & Wen, TPAMI 2024): the rates against a transcription of the official ``calcu_q``, the drop
against a transcription of ``Modality_drop`` on identical masks (the shared rescaling and the leak of its custom
backward measured), the per-modality rescaling, warm-up, counter-based draws, exact resume, errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import gradmod
from gradmod.functional import decouple_linear
from gradmod.methods.opm import (
    DEFAULT_APPLY_PROBABILITY,
    DEFAULT_DROP_RATE,
    DEFAULT_IMBALANCE_GAIN,
    DEFAULT_WARMUP_EPOCHS,
    METHODS,
    OPM,
    drop_features,
    opm_rates,
    shared_rate,
)

NAMES = ("audio", "visual")
DIM = 6


# ------------------------------------------------------------------ the official code, transcribed
def official_q(performance_1, performance_2, q_base, fix_lambda):
    """``calcu_q``: the two rates from the two batch scores (tensors that may carry autograd history)."""
    q = torch.tensor([0.0, 0.0])
    ratio_1 = torch.tanh(torch.relu(performance_1 / performance_2 - 1))
    ratio_2 = torch.tanh(torch.relu(performance_2 / performance_1 - 1))
    q[0] = q_base * (1 + fix_lambda * ratio_1) if ratio_1 > 0 else 0
    q[1] = q_base * (1 + fix_lambda * ratio_2) if ratio_2 > 0 else 0
    return torch.clip(q, 0.0, 1.0)


class OfficialScale(torch.autograd.Function):
    """``custom_autograd``: forward ``x / (1 − θ)``; backward ``grad / (1 − θ)`` for ``x`` and θ's *value* for θ."""

    @staticmethod
    def forward(ctx, x, theta):
        ctx.save_for_backward(x, theta)
        return x / (1 - theta.item())

    @staticmethod
    def backward(ctx, grad_output):
        _, theta = ctx.saved_tensors
        return 1 / (1 - theta.item()) * grad_output.clone(), theta


def official_drop(features, q, mask, dims, leak=True):
    """``Modality_drop.execute_drop`` after its ``p_exe`` draw, on a given ``[2, B]`` mask: θ = Σ d q / Σ d, the
    stacked features times the mask, the custom rescaling, the samples with no modality kept removed.
    ``leak=False`` detaches θ (what the forward pass means: a constant)."""
    theta = (dims * q).sum() / dims.sum()
    stacked = torch.stack(features, 0) * mask.unsqueeze(-1)
    scaled = OfficialScale.apply(stacked, theta if leak else theta.detach())
    update_flag = mask.T.sum(1) > 0
    return [scaled[m][update_flag] for m in range(len(features))], update_flag


class Net(nn.Module):
    def __init__(self, in_dim=5, dim=DIM, classes=4):
        super().__init__()
        self.encoders = nn.ModuleDict({n: nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(), nn.Linear(dim, dim)) for n in NAMES})
        self.head = nn.Linear(2 * dim, classes)

    def encode(self, inputs):
        return {n: self.encoders[n](inputs[n]) for n in NAMES}


def batch(strong, size=16, in_dim=5, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (size,), generator=g)
    inputs = {n: F.one_hot(y, in_dim).float() * (3.0 if n == strong else 0.2) + torch.randn(size, in_dim, generator=g) for n in NAMES}
    return inputs, y


def masks_of(dropped, features):
    """The masks gradmod drew, read off its output (a dropped sample's features are exactly zero)."""
    return torch.stack([(dropped[n] != 0).any(1).float() for n in NAMES])


@pytest.mark.parametrize("strong", ["audio", "visual"])
def test_shared_rescaling_matches_the_official_drop_and_its_backward_leaks(strong):
    """The forward pass and every gradient of the official drop with θ constant; with its custom backward the
    encoders get a spurious term (the relative size the docs page states)."""
    torch.manual_seed(0)
    model = Net()
    opm = OPM(NAMES, rescale="shared", warmup_epochs=0, apply_probability=1.0, seed=3)
    inputs, _ = batch(strong)
    weak = next(n for n in NAMES if n != strong)
    with torch.no_grad():  # the weak modality's block of the head is small: its logits are near uniform
        model.head.weight[:, NAMES.index(weak) * DIM : (NAMES.index(weak) + 1) * DIM] *= 0.01
        features = model.encode(inputs)
        y = decouple_linear(model.head.weight, model.head.bias, features)[strong].argmax(1)  # the strong one is right
    dims = torch.tensor([DIM, DIM])
    leaks = []
    for _ in range(3):
        grads = {}
        for variant in ("gradmod", "constant", "official"):
            model.zero_grad()
            features = model.encode(inputs)
            w, b = model.head.weight.detach(), model.head.bias.detach()
            t = {n: features[n] @ w[:, i * DIM : (i + 1) * DIM].T + b / 2 for i, n in enumerate(NAMES)}
            if variant == "gradmod":
                dropped, keep = opm(features=features, unimodal_logits=t, target=y)
                mask = masks_of(dropped, features)
                logits = model.head(torch.cat([dropped[n] for n in NAMES], 1))[keep]
                loss = F.cross_entropy(logits, y[keep])
            else:
                performance = [torch.softmax(t[n], 1).gather(1, y[:, None]).sum() for n in NAMES]
                q = official_q(*performance, DEFAULT_DROP_RATE, DEFAULT_IMBALANCE_GAIN)
                cleaned, flag = official_drop([features[n] for n in NAMES], q, mask, dims, leak=variant == "official")
                loss = F.cross_entropy(model.head(torch.cat(cleaned, 1)), y[flag])
                if variant == "constant":
                    torch.testing.assert_close(torch.cat(cleaned, 1), torch.cat([dropped[n] for n in NAMES], 1)[keep])
                    assert torch.equal(flag, keep)
            loss.backward()
            grads[variant] = torch.cat([p.grad.flatten() for p in model.encoders.parameters()])
            grads[variant + "_head"] = torch.cat([p.grad.flatten() for p in model.head.parameters()])
        torch.testing.assert_close(grads["gradmod"], grads["constant"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grads["gradmod_head"], grads["official_head"], rtol=1e-5, atol=1e-7)
        leaks.append(((grads["official"] - grads["gradmod"]).norm() / grads["gradmod"].norm()).item())
        dominant = opm.last["rate"]
        assert dominant[strong] > 0 and dominant[weak] == 0.0
        assert 0 < opm.last["kept"][strong] < 1
    assert all(0.001 < leak < 0.2 for leak in leaks), leaks


@given(st.floats(0.01, 64.0), st.floats(0.01, 64.0), st.floats(0.0, 0.6), st.floats(0.0, 0.6))
def test_the_rates_are_the_official_calcu_q(p1, p2, q_base, lam):
    want = official_q(torch.tensor(p1), torch.tensor(p2), q_base, lam)
    got = opm_rates({"a": torch.tensor(p1), "b": torch.tensor(p2)}, q_base, lam)
    torch.testing.assert_close(torch.stack([got["a"], got["b"]]).float(), want, rtol=1e-5, atol=1e-7)


@given(st.lists(st.floats(0.0, 64.0), min_size=2, max_size=5))
def test_the_rates_drop_above_the_mean_of_the_others_and_never_the_weakest(values):
    names = [f"m{i}" for i in range(len(values))]
    scores = {n: torch.tensor(v, dtype=torch.float64) for n, v in zip(names, values)}
    rates = opm_rates(scores, 0.5, 0.5)
    for n, v in zip(names, values):
        others = (sum(values) - v) / (len(values) - 1)
        rate = rates[n].item()
        if others > 0 and abs(v / others - 1) < 1e-9:
            continue  # a tie up to rounding: either branch
        if others > 0 and v / others > 1:
            assert rate == pytest.approx(0.5 * (1 + 0.5 * math.tanh(v / others - 1)))
        elif others == 0 and v > 0:
            assert rate == pytest.approx(0.75)
        else:
            assert rate == 0.0
    assert rates[names[values.index(min(values))]].item() == 0.0  # so every sample keeps a modality
    swapped = opm_rates(dict(reversed(list(scores.items()))), 0.5, 0.5)
    assert {n: r.item() for n, r in swapped.items()} == pytest.approx({n: r.item() for n, r in rates.items()}, rel=1e-12)


def test_a_tie_drops_nothing():
    rates = opm_rates({"a": torch.tensor(3.0), "b": torch.tensor(3.0)}, 0.5, 0.5)
    assert rates["a"].item() == rates["b"].item() == 0.0
    assert opm_rates({"a": torch.tensor(0.0), "b": torch.tensor(0.0)}, 0.5, 0.5)["a"].item() == 0.0


# ------------------------------------------------------------------ the rescaling
def test_expected_features_of_both_rescalings():
    """``E[x̃_m] = (1 − q_m)·factor_m·f_m``: 1 for every modality per modality; the docs page's numbers shared."""
    features = {n: torch.ones(1, DIM) for n in NAMES}
    keep = {n: torch.ones(1, dtype=torch.bool) for n in NAMES}
    for rates, expected_shared in (((0.6, 0.0), (0.4 / 0.7, 1 / 0.7)), ((0.75, 0.0), (0.4, 1.6))):
        q = dict(zip(NAMES, map(torch.tensor, rates)))
        for rescale in ("modality", "shared"):
            factor = {n: v.item() for n, v in ((n, drop_features(features, keep, q, rescale)[n][0, 0]) for n in NAMES)}
            expected = {n: (1 - q[n].item()) * factor[n] for n in NAMES}
            want = dict.fromkeys(NAMES, 1.0) if rescale == "modality" else dict(zip(NAMES, expected_shared))
            assert expected == pytest.approx(want, rel=1e-6)
    assert shared_rate(dict(zip(NAMES, map(torch.tensor, (0.6, 0.0)))), {"audio": 3, "visual": 1}).item() == pytest.approx(0.45)


def test_the_factor_is_a_constant_for_autograd():
    f = {n: torch.randn(4, DIM, requires_grad=True) for n in NAMES}
    keep = {"audio": torch.tensor([True, False, True, False]), "visual": torch.ones(4, dtype=torch.bool)}
    q = {"audio": torch.tensor(0.5, requires_grad=True), "visual": torch.tensor(0.0)}
    out = drop_features(f, keep, q, "modality")
    weights = torch.randn(4, DIM)
    (out["audio"] * weights).sum().backward()
    torch.testing.assert_close(f["audio"].grad, keep["audio"].float()[:, None] * weights / 0.5)
    assert q["audio"].grad is None


def test_monte_carlo_keeps_one_minus_q_and_drops_on_p_exe_of_the_steps():
    opm = OPM(NAMES, warmup_epochs=0, seed=11)
    features = {n: torch.ones(64, DIM) for n in NAMES}
    logits = {"audio": torch.zeros(64, 4).index_fill(1, torch.tensor([0]), 2.0), "visual": torch.zeros(64, 4)}
    target = torch.zeros(64, dtype=torch.long)
    means = []
    for _ in range(300):
        out, keep = opm(features=features, unimodal_logits=logits, target=target)
        assert keep.all()
        means.append(out["audio"].mean().item())
    records = opm.history
    executed = [r for r in records if r["status"] == "applied"]
    assert len(executed) / len(records) == pytest.approx(DEFAULT_APPLY_PROBABILITY, abs=0.08)
    q = executed[0]["rate"]["audio"]
    kept = sum(r["kept"]["audio"] for r in executed) / len(executed)
    assert kept == pytest.approx(1 - q, abs=0.02)
    assert sum(means) / len(means) == pytest.approx(1.0, abs=0.03)  # inverted dropout: unbiased
    assert all(r["kept"]["visual"] == 1.0 for r in records)


# ------------------------------------------------------------------ the schedule and the draws
def _inputs(strong="audio", size=8):
    g = torch.Generator().manual_seed(5)
    features = {n: torch.randn(size, DIM, generator=g) for n in NAMES}
    logits = {n: torch.randn(size, 4, generator=g) * (3.0 if n == strong else 0.1) for n in NAMES}
    target = logits[strong].argmax(1)
    return features, logits, target


def test_the_warm_up_lasts_six_epochs():
    opm = OPM(NAMES, apply_probability=1.0, seed=0)
    features, logits, target = _inputs()
    for epoch in range(8):
        opm.start_epoch(epoch)
        out, keep = opm(features=features, unimodal_logits=logits, target=target)
        dropped = not all(torch.equal(out[n], features[n]) for n in NAMES)
        assert dropped == (epoch >= DEFAULT_WARMUP_EPOCHS) and keep.all()
        assert opm.last["status"] == ("applied" if epoch >= 6 else "outside")


def test_a_forgotten_start_epoch_warns_and_drops_nothing():
    opm = OPM(NAMES, apply_probability=1.0)
    features, logits, target = _inputs()
    with pytest.warns(RuntimeWarning, match="start_epoch\\(\\) was never called"):
        out, _ = opm(features=features, unimodal_logits=logits, target=target)
    assert all(torch.equal(out[n], features[n]) for n in NAMES)
    out, _ = OPM(NAMES, warmup_epochs=0, apply_probability=1.0)(features=features, unimodal_logits=logits, target=target)
    assert not torch.equal(out["audio"], features["audio"])


def _outputs(opm, calls, features, logits, target):
    return [opm(features=features, unimodal_logits=logits, target=target)[0]["audio"] for _ in range(calls)]


def test_draws_are_reproducible_from_the_seed_and_resume_exactly():
    features, logits, target = _inputs()
    uninterrupted = OPM(NAMES, warmup_epochs=0, seed=7)
    whole = _outputs(uninterrupted, 8, features, logits, target)
    again = _outputs(OPM(NAMES, warmup_epochs=0, seed=7), 8, features, logits, target)
    other = _outputs(OPM(NAMES, warmup_epochs=0, seed=8), 8, features, logits, target)
    assert all(torch.equal(a, b) for a, b in zip(whole, again))
    assert not all(torch.equal(a, b) for a, b in zip(whole, other))
    first = OPM(NAMES, warmup_epochs=0, seed=7)
    head = _outputs(first, 3, features, logits, target)
    state = copy.deepcopy(first.state_dict())
    resumed = OPM(NAMES, warmup_epochs=0, seed=123)
    resumed.load_state_dict(state)
    tail = _outputs(resumed, 5, features, logits, target)
    assert all(torch.equal(a, b) for a, b in zip(whole, head + tail))
    assert resumed.history == uninterrupted.history


def test_three_modalities_never_lose_every_modality():
    names = ("audio", "visual", "text")
    opm = OPM(names, warmup_epochs=0, apply_probability=1.0, seed=1)
    g = torch.Generator().manual_seed(2)
    features = {n: torch.randn(32, 3, generator=g) for n in names}
    logits = {"audio": torch.randn(32, 4, generator=g) * 4, "visual": torch.randn(32, 4, generator=g) * 4, "text": torch.zeros(32, 4)}
    target = logits["audio"].argmax(1)
    logits["visual"] = F.one_hot(target, 4).float() * 4
    for _ in range(5):
        out, keep = opm(features=features, unimodal_logits=logits, target=target)
        rates = opm.last["rate"]
        assert rates["audio"] > 0 and rates["visual"] > 0 and rates["text"] == 0.0
        assert keep.all()
        assert torch.equal(out["text"], features["text"])


# ------------------------------------------------------------------ errors, state, registry
def test_errors_name_the_problem():
    opm = OPM(NAMES, warmup_epochs=0)
    features, logits, target = _inputs()
    with pytest.raises(ValueError, match="missing \\['visual'\\]"):
        opm(features={"audio": features["audio"]}, unimodal_logits=logits, target=target)
    with pytest.raises(ValueError, match="unknown \\['text'\\]"):
        opm(features=features, unimodal_logits={**logits, "text": logits["audio"]}, target=target)
    with pytest.raises(ValueError, match="features\\['audio'\\] contain NaN"):
        opm(features={**features, "audio": torch.full((8, DIM), float("nan"))}, unimodal_logits=logits, target=target)
    with pytest.raises(ValueError, match="unimodal_logits\\['visual'\\] contain NaN"):
        opm(features=features, unimodal_logits={**logits, "visual": torch.full((8, 4), float("inf"))}, target=target)
    with pytest.raises(ValueError, match="outside \\[0, 4\\)"):
        opm(features=features, unimodal_logits=logits, target=torch.full((8,), 4))
    with pytest.raises(ValueError, match="empty batch"):
        opm(features={n: torch.zeros(0, DIM) for n in NAMES}, unimodal_logits={n: torch.zeros(0, 4) for n in NAMES}, target=torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="has batch 7"):
        opm(features={**features, "visual": torch.randn(7, DIM)}, unimodal_logits=logits, target=target)
    with pytest.raises(ValueError, match="must be < 1"):
        OPM(NAMES, drop_rate=0.7, imbalance_gain=0.5)
    with pytest.raises(ValueError, match="apply_probability must lie in \\[0, 1\\]"):
        OPM(NAMES, apply_probability=1.5)
    with pytest.raises(ValueError, match="rescale must be one of"):
        OPM(NAMES, rescale="none")
    with pytest.raises(ValueError, match="warmup_epochs must be an int"):
        OPM(NAMES, warmup_epochs=-1)
    with pytest.raises(ValueError, match="epoch must be an int"):
        opm.start_epoch(-2)
    assert opm.call_count == 0 and opm.history == []  # failed calls draw and record nothing


def test_state_refuses_newer_versions_and_other_settings_and_reset_forgets():
    opm = OPM(NAMES, seed=4)
    opm.start_epoch(7)
    features, logits, target = _inputs()
    opm(features=features, unimodal_logits=logits, target=target)
    state = opm.state_dict()
    with pytest.raises(ValueError, match="newer"):
        OPM(NAMES).load_state_dict({**state, "version": 99})
    with pytest.raises(ValueError, match="settings"):
        OPM(NAMES, rescale="shared").load_state_dict(state)
    restored = OPM(NAMES)
    restored.load_state_dict(state)
    assert restored.seed == 4 and restored.epoch == 7 and restored.call_count == 1
    opm.reset()
    assert opm.history == [] and opm.call_count == 0 and opm.epoch is None


def test_registry_entry_repr_and_scalars():
    (info,) = METHODS
    assert info.key == "opm" and info.preset is OPM and info.kind == "forward" == OPM.kind
    assert set(OPM.forward_inputs) <= set(gradmod.method.INPUTS)
    assert info.strength.keyword == "drop_rate" and info.strength.default == 0.5
    opm = OPM(NAMES, warmup_epochs=0, apply_probability=1.0, seed=0)
    features, logits, target = _inputs()
    opm(features=features, unimodal_logits=logits, target=target)
    assert set(opm.scalars()) == {"active"} | {f"{f}/{n}" for f in ("score", "ratio", "rate", "kept") for n in NAMES}
    assert "rescale='modality'" in repr(opm)


def test_a_training_step_in_the_official_layout():
    """The loop of the ``forward`` kind: head on the returned features, cross-entropy on the kept rows."""
    torch.manual_seed(9)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opm = OPM(NAMES, warmup_epochs=0, seed=0)
    inputs, y = batch("audio")
    for _ in range(3):
        features = model.encode(inputs)
        decoupled = decouple_linear(model.head.weight, model.head.bias, features)
        dropped, keep = opm(features=features, unimodal_logits=decoupled, target=y)
        loss = F.cross_entropy(model.head(torch.cat([dropped[n] for n in NAMES], 1))[keep], y[keep])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
