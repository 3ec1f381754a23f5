"""AMCo (Zhou et al., ICASSP 2023): the schedule, the mask and the dependency test as properties; the logit mask
against a transcription of BalanceBenchmark's port (``AMCo_trainer.py``, ``BaseClassifierAMCoModel``); the
feature mask against a transcription of the paper's reading; errors, warnings, resume."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from gradmod.fusion import ConcatFusion
from gradmod.methods import amco
from gradmod.methods.amco import AMCo, dependency_shares, mask_ratio, unit_mask

NAMES = ("audio", "visual")
pytestmark = pytest.mark.filterwarnings("ignore:gradmod AMCo. every class:RuntimeWarning")


class Net(nn.Module):
    """An MLP encoder per modality and a concat head (decoupled logits u_m = h_m W_mᵀ + b/M)."""

    def __init__(self, names=NAMES, in_dim=5, dim=6, classes=4):
        super().__init__()
        self.names = tuple(names)
        self.encoders = nn.ModuleDict({n: nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(), nn.Linear(dim, dim)) for n in self.names})
        self.head = ConcatFusion({n: dim for n in self.names}, classes)

    def forward(self, inputs):
        return {n: self.encoders[n](inputs[n]) for n in self.names}


def batches(steps, names=NAMES, batch=10, in_dim=5, classes=4, seed=0, strengths=None):
    """The first modality carries the label strongly (the model comes to depend on it)."""
    g = torch.Generator().manual_seed(seed)
    strengths = strengths or [3.0] + [0.3] * (len(names) - 1)
    out = []
    for _ in range(steps):
        y = torch.randint(0, classes, (batch,), generator=g)
        out.append(({n: F.one_hot(y, in_dim).float() * s + torch.randn(batch, in_dim, generator=g) for n, s in zip(names, strengths)}, y))
    return out


def inputs_of(method, model, features, target):
    """What the loop gives loss(): the method's loss_inputs."""
    everything = {"features": features, "head": model.head, "unimodal_logits": model.head.unimodal_logits(features), "target": target}
    return {name: everything[name] for name in method.loss_inputs}


# ------------------------------------------------------------------ 1. the equations
def test_the_schedule_rises_as_a_sine_and_holds_at_one():
    assert mask_ratio(0.0) == 0.0 and mask_ratio(0.3) == 1.0 and mask_ratio(5.0) == 1.0
    assert mask_ratio(0.1) == pytest.approx(0.5) and mask_ratio(0.2) == pytest.approx(math.sqrt(3) / 2)
    assert mask_ratio(0.5, epsilon=1.0) == pytest.approx(math.sin(math.pi / 4))


@given(a=st.floats(0.0, 2.0), b=st.floats(0.0, 2.0), epsilon=st.floats(0.01, 1.0))
def test_the_schedule_is_monotone_and_in_range(a, b, epsilon):
    low, high = sorted((a, b))
    assert 0.0 <= mask_ratio(low, epsilon) <= mask_ratio(high, epsilon) <= 1.0


@given(width=st.integers(1, 40), ratio=st.floats(0.0, 1.0), seed=st.integers(0, 1000))
def test_the_mask_zeroes_the_floor_of_ratio_times_width_units(width, ratio, seed):
    mask = unit_mask(width, ratio, torch.Generator().manual_seed(seed))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert int((mask == 0).sum()) == int(ratio * width)  # the port's int(pt * n_classes)
    assert torch.equal(mask, unit_mask(width, ratio, torch.Generator().manual_seed(seed)))


@given(m=st.integers(2, 4), batch=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_shares_lie_in_range_sum_to_one_and_follow_the_modalities(m, batch, seed):
    g = torch.Generator().manual_seed(seed)
    logits = {f"m{k}": torch.randn(batch, 3, generator=g) * 3 for k in range(m)}
    shares = dependency_shares(logits)
    values = torch.stack(list(shares.values()))
    assert ((values >= 0) & (values <= 1)).all() and values.sum().item() == pytest.approx(1.0, abs=1e-6)
    swapped = dependency_shares({"m0": logits["m1"], "m1": logits["m0"], **{k: v for k, v in logits.items() if k not in ("m0", "m1")}})
    assert swapped["m0"].item() == pytest.approx(shares["m1"].item()) and swapped["m1"].item() == pytest.approx(shares["m0"].item())
    equal = dependency_shares({name: logits["m0"] for name in logits})
    assert all(v.item() == pytest.approx(1 / m) for v in equal.values())  # balanced: nobody is dependent


# ------------------------------------------------------------------ 2. BalanceBenchmark's port, transcribed
class PortAMCo:
    """``AMCoTrainer.train_loop`` / ``training_step`` and ``BaseClassifierAMCoModel.unimodality_calculate``,
    transcribed: pt = sin(π/2·min(eps, l_t)/eps), N = int(pt·C) masked classes, l_t += epoch/10 per batch (reset per
    epoch, as the dependency flags); u_m = h_m·W[:, block]ᵀ + b/M, masked when the modality was dependent;
    out = linear_star(Σ u_m); loss = CE(out) + Σ CE(u_m); dependent = Σ softmax(cat u)[:, block] / B > σ."""

    def __init__(self, names, eps=0.3, sigma=0.5):
        self.names, self.eps, self.sigma = names, eps, sigma

    def start(self, epoch):
        self.epoch, self.l_t, self.dependent = epoch, 0, {n: False for n in self.names}

    def pt(self):
        return np.sin(np.pi / 2 * (min(self.eps, self.l_t) / self.eps))

    def step(self, features, weight, bias, linear_star, label, mask):
        n_classes = weight.shape[0]
        if any(self.dependent.values()):  # the mask is drawn every batch, used only on a dependent modality
            assert int((mask == 0).sum()) == int(self.pt() * n_classes)
        self.l_t += self.epoch / 10
        unimodal, output, size = {}, torch.zeros(label.shape[0], n_classes), 0
        for name in self.names:
            width = features[name].shape[1]
            unimodal[name] = torch.mm(features[name], torch.transpose(weight[:, size : size + width], 0, 1)) + bias / len(self.names)
            size += width
            if self.dependent[name]:
                unimodal[name] = torch.mul(unimodal[name], mask)
            output = output + unimodal[name]
        out = linear_star(output)
        loss = F.cross_entropy(out, label) + sum(F.cross_entropy(unimodal[n], label) for n in self.names)
        sft_out = torch.softmax(torch.cat([unimodal[n] for n in self.names], 1), dim=1)
        for k, name in enumerate(self.names):
            self.dependent[name] = bool(torch.sum(sft_out[:, k * n_classes : (k + 1) * n_classes]) / len(label) > self.sigma)
        return loss


@pytest.mark.parametrize("names", [NAMES, ("audio", "visual", "text")])
def test_the_logit_mask_matches_the_port_on_identical_inputs(names):
    torch.manual_seed(0)
    model = Net(names)
    twin = copy.deepcopy(model)
    method = AMCo(names, 4, mask="logits")
    port_star = copy.deepcopy(method.extra)
    port = PortAMCo(names)
    opt = torch.optim.SGD([*model.parameters(), *method.extra.parameters()], lr=0.1 * len(names))
    twin_opt = torch.optim.SGD([*twin.parameters(), *port_star.parameters()], lr=0.1 * len(names))
    data = batches(7, names, strengths=[3.0 * len(names) ** 2 / 4] + [0.3] * (len(names) - 1))
    seen = {"kinds": set(), "dependent": set(), "independent": set()}
    for epoch in range(3):
        method.start_epoch(epoch)
        port.start(epoch)
        for inputs, y in data:
            assert method.ratio == pytest.approx(port.pt(), abs=0.0)
            assert method.dependent == port.dependent
            opt.zero_grad()
            twin_opt.zero_grad()
            loss = method.loss(**inputs_of(method, model, model(inputs), y))
            masks = method.masks
            mask = next(iter(masks.values())) if masks else torch.ones(4)
            fraction = float((mask == 0).float().mean())
            seen["kinds"].add("none" if fraction == 0 else "full" if fraction == 1 else "partial")
            for n in names:
                seen["dependent" if port.dependent[n] else "independent"].add(n)
            expected = port.step(twin(inputs), twin.head.linear.weight, twin.head.linear.bias, port_star, y, mask)
            torch.testing.assert_close(loss, expected)
            loss.backward()
            expected.backward()
            for p, q in zip([*model.parameters(), *method.extra.parameters()], [*twin.parameters(), *port_star.parameters()]):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
            opt.step()
            twin_opt.step()
            assert method.dependent == port.dependent
    assert seen["kinds"] == {"none", "partial", "full"}, seen  # every branch of the schedule ran
    assert seen["dependent"] and seen["independent"], seen  # both branches of the dependency test


@pytest.mark.parametrize("epoch", [1, 2, 3, 4, 7])
def test_the_port_schedule_masks_everything_from_batch_ceil_3_over_e(epoch):
    method = AMCo(NAMES, 6, mask="logits")
    method.start_epoch(epoch)
    ratios = []
    for _ in range(6):
        ratios.append(method.ratio)
        method._counter += method.step_increment  # the counter alone, as loss() advances it
    full = next(b for b, p in enumerate(ratios) if p == 1.0)
    assert full == math.ceil(3 / epoch) and all(p < 1.0 for p in ratios[:full])


def test_the_port_schedule_never_masks_in_epoch_0_and_the_default_ramps_within_every_epoch():
    port = AMCo(NAMES, 4, mask="logits")
    port.start_epoch(0)
    torch.manual_seed(0)
    model = Net()
    for inputs, y in batches(40):
        port.loss(**inputs_of(port, model, model(inputs), y))
    assert all(record["masked"][n] == 0.0 for record in port.history for n in NAMES)
    default = AMCo(NAMES, 4)
    for epoch in range(2):
        default.start_epoch(epoch)
        ratios = [default.ratio]
        for _ in range(35):
            default._counter += default.step_increment
            ratios.append(default.ratio)
        assert ratios[0] == 0.0 and 0 < ratios[15] < 1 and ratios[30] == 1.0  # ε/Δl = 30 steps, in every epoch


def test_the_port_evaluates_without_the_layer_it_trains_through_and_predict_keeps_it():
    torch.manual_seed(0)
    method = AMCo(NAMES, 4)
    logits = torch.randn(5, 4)
    torch.testing.assert_close(method.predict(logits), method.extra(logits))
    assert not torch.allclose(method.predict(logits), logits)  # the port's validation_step returns Σ u_m itself


# ------------------------------------------------------------------ 3. the paper's reading (features)
def paper_step(features, head, star, label, dependent, masks):
    """The feature mask, transcribed from the docs: z̃ = head(h with the dependent modality's units masked),
    loss = CE(W*·z̃) + Σ CE(u_m) on the unmasked decoupled logits; the dependency test on those logits."""
    masked = {n: features[n] * masks[n] if dependent[n] else features[n] for n in features}
    unimodal = head.unimodal_logits(features)
    loss = F.cross_entropy(star(head(masked)), label) + sum(F.cross_entropy(u, label) for u in unimodal.values())
    probs = torch.softmax(torch.cat(list(unimodal.values()), 1), 1)
    shares = {n: probs[:, k * 4 : (k + 1) * 4].sum() / len(label) for k, n in enumerate(features)}
    return loss, {n: bool(s > 0.5) for n, s in shares.items()}


def test_the_feature_mask_matches_its_transcription_and_masks_only_the_fused_path():
    torch.manual_seed(0)
    model = Net()
    twin = copy.deepcopy(model)
    method = AMCo(NAMES, 4, increment=0.05)
    star = copy.deepcopy(method.extra)
    method.start_epoch(0)
    dependent = {n: False for n in NAMES}
    fractions = set()
    for inputs, y in batches(12):
        features = model(inputs)
        loss = method.loss(**inputs_of(method, model, features, y))
        masks = method.masks
        assert set(masks) == {n for n in NAMES if dependent[n]}
        for name, mask in masks.items():
            fractions.add(float((mask == 0).float().mean()))
        expected, dependent = paper_step(twin(inputs), twin.head, star, y, dependent, masks)
        torch.testing.assert_close(loss, expected)
        assert method.dependent == dependent
    assert 1.0 in fractions and any(0 < f < 1 for f in fractions)
    # a masked unit's feature gets only the co-optimisation gradient (a fresh method: step 1 masks 1 of 6 units)
    fresh = AMCo(NAMES, 4, increment=0.05)
    fresh.start_epoch(0)
    (inputs, y), (later, y_later) = batches(2, seed=5)
    fresh.loss(**inputs_of(fresh, model, model(inputs), y))
    assert any(fresh.dependent.values())
    features = {n: f.detach().requires_grad_() for n, f in model(later).items()}
    fresh.loss(**inputs_of(fresh, model, features, y_later)).backward()
    name, mask = next(iter(fresh.masks.items()))
    zeroed = mask == 0
    assert 0 < int(zeroed.sum()) < mask.numel()
    alone = {n: f.detach().requires_grad_() for n, f in features.items()}
    F.cross_entropy(model.head.unimodal_logits(alone)[name], y_later).backward()
    torch.testing.assert_close(features[name].grad[:, zeroed], alone[name].grad[:, zeroed])
    assert not torch.allclose(features[name].grad[:, ~zeroed], alone[name].grad[:, ~zeroed])


def test_three_modalities_mask_the_one_whose_share_exceeds_sigma():
    torch.manual_seed(0)
    names = ("a", "b", "c")
    model = Net(names)
    method = AMCo(names, 4)
    method.start_epoch(0)
    for inputs, y in batches(40, names, strengths=[4.0, 0.2, 0.2]):
        method.loss(**inputs_of(method, model, model(inputs), y)).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.3 * p.grad
                p.grad = None
    record = method.last
    assert record["share"]["a"] > 0.5 and record["dependent"]["a"] == 1.0 and record["masked"]["a"] > 0
    assert record["dependent"]["b"] == record["dependent"]["c"] == 0.0


# ------------------------------------------------------------------ 4. errors and warnings
def test_bad_arguments_and_inputs_fail_by_name():
    with pytest.raises(ValueError, match="mask must be one of"):
        AMCo(NAMES, 4, mask="inputs")
    with pytest.raises(ValueError, match="sigma must lie in"):
        AMCo(NAMES, 4, sigma=1.0)
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        AMCo(NAMES, 1)
    with pytest.raises(ValueError, match="two or more distinct"):
        AMCo(("a", "a"), 4)
    method = AMCo(NAMES, 4)
    method.start_epoch(0)
    u = {"audio": torch.randn(3, 4), "visual": torch.randn(3, 4)}
    y = torch.tensor([0, 1, 2])
    with pytest.raises(TypeError, match="needs features"):
        method.loss(unimodal_logits=u, target=y)
    with pytest.raises(ValueError, match=r"missing \['visual'\], unknown \['text'\]"):
        method.loss(unimodal_logits={"audio": u["audio"], "text": u["visual"]}, target=y)
    with pytest.raises(ValueError, match="logits of modality 'visual' contain NaN"):
        method.loss(unimodal_logits={**u, "visual": torch.full((3, 4), float("nan"))}, target=y)
    with pytest.raises(ValueError, match="has 5 classes, AMCo was built for 4"):
        method.loss(unimodal_logits={n: torch.randn(3, 5) for n in NAMES}, target=y)
    with pytest.raises(ValueError, match="outside"):
        method.loss(unimodal_logits=u, target=torch.tensor([0, 1, 7]))
    with pytest.raises(ValueError, match="empty batch"):
        method.loss(unimodal_logits={n: torch.randn(0, 4) for n in NAMES}, target=torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="every target equals ignore_index"):
        method.loss(unimodal_logits=u, target=torch.full((3,), -100))
    features = {"audio": torch.randn(3, 2), "visual": torch.randn(3, 2)}
    with pytest.raises(ValueError, match=r"features of modalities \['audio'\] contain NaN"):
        method.loss(unimodal_logits=u, target=y, features={**features, "audio": torch.full((3, 2), float("inf"))}, head=lambda f: u["audio"])
    with pytest.raises(ValueError, match="head\\(features\\) must return fused logits"):
        method.loss(unimodal_logits=u, target=y, features=features, head=lambda f: torch.randn(3, 2))
    with pytest.raises(ValueError, match="predict\\(\\) takes fused logits"):
        method.predict(torch.randn(3, 5))


def test_forgetting_start_epoch_and_a_full_mask_warn_once():
    torch.manual_seed(0)
    model = Net()
    method = AMCo(NAMES, 4, mask="logits", increment=0.2)
    data = batches(6)
    with pytest.warns(RuntimeWarning, match="before any start_epoch"):
        method.loss(**inputs_of(method, model, model(data[0][0]), data[0][1]))
    method.start_epoch(1)
    for inputs, y in data[:2]:  # p = 0.59, then 1 (a dependent modality is fully masked on the next step)
        method.loss(**inputs_of(method, model, model(inputs), y))
    assert method.ratio == 1.0 and any(method.dependent.values())
    with pytest.warns(RuntimeWarning, match="decoupled logits is masked"):
        method.loss(**inputs_of(method, model, model(data[2][0]), data[2][1]))


# ------------------------------------------------------------------ 5. state
def run(model, method, opt, data, epochs, start=0):
    for epoch in range(start, epochs):
        method.start_epoch(epoch)
        for inputs, y in data:
            opt.zero_grad()
            method.loss(**inputs_of(method, model, model(inputs), y)).backward()
            opt.step()


@pytest.mark.parametrize("mask", ["features", "logits"])
def test_resume_follows_the_same_trajectory_bit_for_bit(mask, tmp_path):
    data = batches(5)
    torch.manual_seed(0)
    model = Net()
    method = AMCo(NAMES, 4, mask=mask, increment=0.1 if mask == "features" else None, seed=3)
    start = copy.deepcopy((model.state_dict(), method.state_dict()))
    opt = torch.optim.SGD([*model.parameters(), *method.extra.parameters()], lr=0.3, momentum=0.9)
    run(model, method, opt, data, 2)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "method": method.state_dict()}, tmp_path / "ck.pt")
    run(model, method, opt, data, 4, start=2)

    resumed = Net()
    resumed_method = AMCo(NAMES, 4, mask=mask, increment=0.1 if mask == "features" else None, seed=3)
    resumed_opt = torch.optim.SGD([*resumed.parameters(), *resumed_method.extra.parameters()], lr=0.3, momentum=0.9)
    saved = torch.load(tmp_path / "ck.pt")
    resumed.load_state_dict(saved["model"])
    resumed_method.load_state_dict(saved["method"])
    resumed_opt.load_state_dict(saved["opt"])
    run(resumed, resumed_method, resumed_opt, data, 4, start=2)
    assert resumed_method.history == method.history
    assert any(r["masked"]["audio"] > 0 for r in method.history)
    for p, q in zip([*model.parameters(), *method.extra.parameters()], [*resumed.parameters(), *resumed_method.extra.parameters()]):
        assert torch.equal(p, q)
    # reset: back to the start (the layer as constructed, the counters and history cleared)
    method.reset()
    assert method.history == [] and method.ratio == 0.0 and method.dependent == {n: False for n in NAMES}
    assert torch.equal(method.extra.weight, start[1]["extra"]["weight"])


def test_a_newer_or_different_state_is_refused_by_name():
    method = AMCo(NAMES, 4)
    state = method.state_dict()
    with pytest.raises(ValueError, match="newer"):
        AMCo(NAMES, 4).load_state_dict({**state, "version": 99})
    with pytest.raises(ValueError, match="AMCo state_dict has mask='features', this AMCo has mask='logits'"):
        AMCo(NAMES, 4, mask="logits").load_state_dict(state)
    with pytest.raises(ValueError, match=r"is for modalities \['audio', 'visual'\]"):
        AMCo(("audio", "text"), 4).load_state_dict(state)


def test_repr_scalars_and_registry_entry():
    method = AMCo(NAMES, 4)
    assert "mask='features'" in repr(method) and method.scalars() == {}
    info = amco.METHODS[0]
    assert info.key == "amco" and info.preset is AMCo and info.kind == "loss"
    assert set(AMCo.loss_inputs) <= {"features", "head", "unimodal_logits", "target"}
    assert AMCo(NAMES, 4, mask="logits").loss_inputs == ("unimodal_logits", "target")

