"""DGL (Wei, Luo & Luo, ICCV 2025): one backward pass against a transcription of the official two-pass step, the
head-gradient quirk, the routing of every gradient for M modalities, errors, warnings and state."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradmod
from gradmod.fusion import ConcatFusion, SumFusion
from gradmod.methods.dgl import (
    DGL,
    FUSED,
    METHODS,
    OFFICIAL_CLIP_NORM,
    dgl_logits,
    dgl_losses,
    zero_padded,
)

NAMES = ("audio", "visual")


class AVClassifier(nn.Module):
    """The official model's layout (``audio_net``, ``visual_net``, ``fusion_module.fc_out``), tiny."""

    def __init__(self, in_dim=5, dim=6, classes=4):
        super().__init__()
        self.audio_net = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.visual_net = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.fusion_module = nn.Module()
        self.fusion_module.fc_out = nn.Linear(2 * dim, classes)


class Head(nn.Module):
    """gradmod's view of the same head: ``{name: features} -> logits`` over the official model's layer."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, features):
        return self.linear(torch.cat([features["audio"], features["visual"]], 1))


def batches(steps, batch=12, in_dim=5, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        y = torch.randint(0, classes, (batch,), generator=g)
        inputs = {n: F.one_hot(y, in_dim).float() * (2.0 if i == 0 else 0.5) + torch.randn(batch, in_dim, generator=g) for i, n in enumerate(NAMES)}
        out.append((inputs, y))
    return out


# ------------------------------------------------------------------ the official step, transcribed
def official_step(model, inputs, y, alpha, prefix):
    """``main_dgl.py``'s step, from its description: the encoders run once; ``ConcatFusion_DGL`` gives
    ``out = fc(sg(cat(a, v)))``, ``out_a = fc(cat(a, 0))``, ``out_v = fc(cat(0, v))``; backward of
    ``(L_a + L_v)·α`` (graph kept); every parameter whose *second dotted name component* contains "fusion" has its
    gradient set to None; backward of ``L_f``; joint clip of every parameter to norm 40. ``prefix`` is what the
    parameter names start with: ``"module."`` under DataParallel (the official run), ``""`` without."""
    a, v = model.audio_net(inputs["audio"]), model.visual_net(inputs["visual"])
    fc = model.fusion_module.fc_out
    out = fc(torch.cat((a, v), dim=1).detach())
    out_a = fc(torch.cat((a, torch.zeros_like(v)), dim=1))
    out_v = fc(torch.cat((torch.zeros_like(a), v), dim=1))
    loss_f, loss_a, loss_v = F.cross_entropy(out, y), F.cross_entropy(out_a, y), F.cross_entropy(out_v, y)
    ((loss_a + loss_v) * alpha).backward(retain_graph=True)
    for name, p in model.named_parameters():
        if "fusion" in (prefix + name).split(".")[1]:
            p.grad = None
    loss_f.backward()
    nn.utils.clip_grad_norm_(model.parameters(), max_norm=OFFICIAL_CLIP_NORM, norm_type=2)
    return loss_f.item(), loss_a.item(), loss_v.item()


def gradmod_step(model, method, inputs, y):
    features = {"audio": model.audio_net(inputs["audio"]), "visual": model.visual_net(inputs["visual"])}
    method.loss(features, Head(model.fusion_module.fc_out), y).backward()
    nn.utils.clip_grad_norm_(model.parameters(), max_norm=OFFICIAL_CLIP_NORM, norm_type=2)


@pytest.mark.parametrize(("head_gradient", "prefix"), [("fused", "module."), ("all", "")])
def test_one_backward_matches_the_official_two_backward_step(head_gradient, prefix):
    """Under DataParallel the official code is the paper's method (``"fused"``); unwrapped, its name test matches
    nothing and the head keeps the unimodal gradients too (``"all"``). Every gradient, every step of an SGD run,
    with the clip active on the large-input steps."""
    torch.manual_seed(0)
    model = AVClassifier()
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    method = DGL(NAMES, unimodal_weight=4.0, head_gradient=head_gradient)
    norms = []
    for step, (inputs, y) in enumerate(batches(6)):
        if step_is_large(step):
            inputs = {n: 60.0 * x for n, x in inputs.items()}
        opt.zero_grad()
        twin_opt.zero_grad()
        gradmod_step(model, method, inputs, y)
        losses = official_step(twin, inputs, y, 4.0, prefix)
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=name)
        norms.append(torch.linalg.vector_norm(torch.cat([q.grad.flatten() for q in twin.parameters()])).item())
        record = method.last["loss"]
        assert (record[FUSED], record["audio"], record["visual"]) == pytest.approx(losses, rel=1e-6)
        opt.step()
        twin_opt.step()
    assert max(norms) == pytest.approx(OFFICIAL_CLIP_NORM, rel=1e-4) and min(norms) < OFFICIAL_CLIP_NORM  # clip hit and missed


def step_is_large(step):
    return step % 3 == 2


def test_the_unwrapped_official_head_gradient_is_several_times_the_fused_one():
    """The measured difference the docs page states: the head's gradient with the quirk against the paper's."""
    torch.manual_seed(0)
    model = AVClassifier(in_dim=8, dim=16, classes=6)
    inputs, y = batches(1, batch=32, in_dim=8, classes=6)[0]
    grads = {}
    for head_gradient in ("fused", "all"):
        model.zero_grad()
        features = {"audio": model.audio_net(inputs["audio"]), "visual": model.visual_net(inputs["visual"])}
        DGL(NAMES, head_gradient=head_gradient).loss(features, Head(model.fusion_module.fc_out), y).backward()
        grads[head_gradient] = torch.cat([p.grad.flatten() for p in model.fusion_module.parameters()])
        encoders = torch.cat([p.grad.flatten() for m in (model.audio_net, model.visual_net) for p in m.parameters()])
        grads[head_gradient + "_encoders"] = encoders
    torch.testing.assert_close(grads["all_encoders"], grads["fused_encoders"], rtol=0, atol=0)  # encoders unchanged
    ratio = (grads["all"] - grads["fused"]).norm() / grads["fused"].norm()
    assert 1.0 < ratio.item() < 20.0


# ------------------------------------------------------------------ the routing, M modalities
class MLPHead(nn.Module):
    """A non-linear head over named features: any head that takes zeroed features works."""

    def __init__(self, widths, classes):
        super().__init__()
        self.widths = dict(widths)
        self.hidden = nn.Linear(sum(self.widths.values()), 7)
        self.out = nn.Linear(7, classes)

    def forward(self, features):
        return self.out(torch.tanh(self.hidden(torch.cat([features[n] for n in self.widths], 1))))


@settings(max_examples=15)
@given(m=st.integers(2, 4), alpha=st.floats(0.1, 8.0), seed=st.integers(0, 2**16))
def test_the_head_learns_from_the_fused_loss_and_each_encoder_from_alpha_times_its_unimodal_loss(m, alpha, seed):
    """Independent computation: ``autograd.grad`` of each loss alone, on a non-linear head, any M."""
    torch.manual_seed(seed)
    names = [f"m{i}" for i in range(m)]
    widths = {n: 3 + i for i, n in enumerate(names)}
    encoders = nn.ModuleDict({n: nn.Linear(4, w) for n, w in widths.items()})
    head = MLPHead(widths, classes=5)
    x = {n: torch.randn(9, 4) for n in names}
    y = torch.randint(0, 5, (9,))
    features = {n: encoders[n](x[n]) for n in names}
    DGL(names, unimodal_weight=alpha).loss(features, head, y).backward()
    features = {n: encoders[n](x[n]) for n in names}
    detached = {n: f.detach() for n, f in features.items()}
    head_grad = torch.autograd.grad(F.cross_entropy(head(detached), y), list(head.parameters()))
    for p, want in zip(head.parameters(), head_grad):
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-7)
    for n in names:
        padded = {o: f if o == n else torch.zeros_like(f) for o, f in features.items()}
        want = torch.autograd.grad(alpha * F.cross_entropy(head(padded), y), list(encoders[n].parameters()))
        for p, g in zip(encoders[n].parameters(), want):
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


def test_the_order_of_the_modalities_does_not_matter():
    torch.manual_seed(1)
    names = ("a", "b", "c")
    encoders = nn.ModuleDict({n: nn.Linear(4, 3) for n in names})
    head = MLPHead(dict.fromkeys(names, 3), classes=4)
    x, y = {n: torch.randn(6, 4) for n in names}, torch.randint(0, 4, (6,))
    grads = []
    for order in itertools.permutations(names):
        encoders.zero_grad()
        head.zero_grad()
        features = {n: encoders[n](x[n]) for n in reversed(order)}
        DGL(order).loss(features, head, y).backward()
        grads.append([p.grad.clone() for p in [*encoders.parameters(), *head.parameters()]])
    for other in grads[1:]:
        for g, h in zip(grads[0], other):
            torch.testing.assert_close(g, h, rtol=1e-6, atol=1e-8)


def test_the_weight_scales_the_encoders_only():
    torch.manual_seed(2)
    encoders = nn.ModuleDict({n: nn.Linear(4, 3) for n in NAMES})
    head = ConcatFusion(dict.fromkeys(NAMES, 3), 4)
    x, y = {n: torch.randn(6, 4) for n in NAMES}, torch.randint(0, 4, (6,))
    grads = {}
    for alpha in (1.0, 3.0):
        encoders.zero_grad()
        head.zero_grad()
        DGL(NAMES, unimodal_weight=alpha).loss({n: encoders[n](x[n]) for n in NAMES}, head, y).backward()
        grads[alpha] = ([p.grad.clone() for p in encoders.parameters()], [p.grad.clone() for p in head.parameters()])
    for g1, g3 in zip(*(grads[a][0] for a in (1.0, 3.0))):
        torch.testing.assert_close(g3, 3 * g1)
    for g1, g3 in zip(*(grads[a][1] for a in (1.0, 3.0))):
        torch.testing.assert_close(g3, g1, rtol=0, atol=0)


def test_a_linear_head_gives_the_unimodal_logits_with_the_full_bias():
    torch.manual_seed(3)
    concat = ConcatFusion({"audio": 3, "visual": 2}, 4)
    features = {"audio": torch.randn(5, 3), "visual": torch.randn(5, 2)}
    fused, unimodal = dgl_logits(features, concat, "fused")
    w, b = concat.linear.weight, concat.linear.bias
    torch.testing.assert_close(unimodal["audio"], features["audio"] @ w[:, :3].T + b)  # the full bias, not b/2
    torch.testing.assert_close(unimodal["visual"], features["visual"] @ w[:, 3:].T + b)
    torch.testing.assert_close(fused, concat(features))
    # a sum head zero-padded through the head: the branch plus every other branch's bias
    summed = SumFusion({"audio": 3, "visual": 2}, 4)
    _, unimodal = dgl_logits(features, summed, "fused")
    torch.testing.assert_close(unimodal["audio"], summed.branches["audio"](features["audio"]) + summed.branches["visual"].bias)
    assert zero_padded(features, "audio")["visual"].abs().sum() == 0


def test_dgl_losses_is_the_pure_form_of_the_loss():
    torch.manual_seed(4)
    head = ConcatFusion(dict.fromkeys(NAMES, 3), 4)
    features = {n: torch.randn(6, 3, requires_grad=True) for n in NAMES}
    y = torch.tensor([0, 1, 2, 3, -100, 1])
    fused, unimodal = dgl_losses(features, head, y, ignore_index=-100)
    loss = DGL(NAMES, unimodal_weight=2.0).loss(features, head, y)
    torch.testing.assert_close(loss, fused + 2.0 * (unimodal["audio"] + unimodal["visual"]))
    counted = y != -100
    torch.testing.assert_close(fused, F.cross_entropy(head(features)[counted], y[counted]))


# ------------------------------------------------------------------ errors and warnings
def _inputs():
    head = ConcatFusion(dict.fromkeys(NAMES, 3), 4)
    return {n: torch.randn(6, 3, requires_grad=True) for n in NAMES}, head, torch.randint(0, 4, (6,))


def test_errors_name_the_problem():
    features, head, y = _inputs()
    method = DGL(NAMES)
    with pytest.raises(ValueError, match="missing \\['visual'\\]"):
        method.loss({"audio": features["audio"]}, head, y)
    with pytest.raises(ValueError, match="unknown \\['text'\\]"):
        method.loss({**features, "text": features["audio"]}, head, y)
    with pytest.raises(TypeError, match="nn.Module"):
        method.loss(features, lambda f: head(f), y)
    with pytest.raises(ValueError, match="contain NaN"):
        method.loss({**features, "visual": torch.full((6, 3), float("nan"), requires_grad=True)}, head, y)
    with pytest.raises(ValueError, match="outside \\[0, 4\\)"):
        method.loss(features, head, torch.tensor([0, 1, 2, 3, 4, 0]))
    with pytest.raises(ValueError, match="every target equals ignore_index"):
        method.loss(features, head, torch.full((6,), -100))
    with pytest.raises(ValueError, match="empty batch"):
        method.loss({n: torch.zeros(0, 3) for n in NAMES}, head, torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="has batch 5"):
        method.loss({**features, "visual": torch.randn(5, 3)}, head, y)
    with pytest.raises(ValueError, match="target must be \\[batch\\]"):
        method.loss(features, head, y[:4])
    with pytest.raises(ValueError, match="unimodal_weight must be a finite number > 0"):
        DGL(NAMES, unimodal_weight=0.0)
    with pytest.raises(ValueError, match="head_gradient must be one of"):
        DGL(NAMES, head_gradient="none")
    with pytest.raises(ValueError, match="collide"):
        DGL(("audio", FUSED))
    with pytest.raises(ValueError, match="two or more"):
        DGL(("audio",))
    assert len(method.history) == 0  # no failed call was recorded


def test_a_head_that_cannot_take_zeroed_features_is_named():
    class Picky(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(6, 4)

        def forward(self, features):
            if any(bool((f == 0).all()) for f in features.values()):
                return torch.zeros(1)
            return self.linear(torch.cat(list(features.values()), 1))

    features, _, y = _inputs()
    with pytest.raises(ValueError, match="logits of one shape"):
        DGL(NAMES).loss(features, Picky(), y)


def test_detached_features_warn_once():
    features, head, y = _inputs()
    method = DGL(NAMES)
    with pytest.warns(RuntimeWarning, match="do not require grad"):
        method.loss({n: f.detach() for n, f in features.items()}, head, y)


# ------------------------------------------------------------------ history, state, registry
def test_history_records_each_loss_per_call():
    features, head, y = _inputs()
    method = DGL(NAMES)
    loss = method.loss(features, head, y)
    fused, unimodal = dgl_losses(features, head, y)
    record = method.last
    assert record["step"] == 0 and record["status"] == "applied"
    assert record["loss"] == pytest.approx({FUSED: fused.item(), **{n: v.item() for n, v in unimodal.items()}})
    assert set(method.scalars()) == {"active", "loss/audio", "loss/visual", "loss/fused"}
    assert loss.item() == pytest.approx(fused.item() + 4.0 * sum(v.item() for v in unimodal.values()))
    assert "unimodal_weight=4" in repr(method)


def _run(model, method, opt, data):
    for inputs, y in data:
        opt.zero_grad()
        gradmod_step(model, method, inputs, y)
        opt.step()


def test_exact_resume_and_state_round_trip():
    torch.manual_seed(5)
    data = batches(6)
    model = AVClassifier()
    resumed_model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    method = DGL(NAMES)
    _run(model, method, opt, data)

    first = DGL(NAMES)
    opt2 = torch.optim.SGD(resumed_model.parameters(), lr=0.05, momentum=0.9)
    _run(resumed_model, first, opt2, data[:3])
    saved = copy.deepcopy((resumed_model.state_dict(), opt2.state_dict(), first.state_dict()))
    model2 = AVClassifier()
    model2.load_state_dict(saved[0])
    opt3 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9)
    opt3.load_state_dict(saved[1])
    second = DGL(NAMES)
    second.load_state_dict(saved[2])
    _run(model2, second, opt3, data[3:])
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert second.history == method.history and second.call_count == 6


def test_state_refuses_newer_versions_and_other_settings_and_reset_forgets():
    features, head, y = _inputs()
    method = DGL(NAMES)
    method.loss(features, head, y)
    state = method.state_dict()
    newer = {**state, "version": 99}
    with pytest.raises(ValueError, match="newer"):
        DGL(NAMES).load_state_dict(newer)
    with pytest.raises(ValueError, match="unimodal_weight"):
        DGL(NAMES, unimodal_weight=5.0).load_state_dict(state)
    with pytest.raises(ValueError, match="modalities"):
        DGL(("audio", "text")).load_state_dict(state)
    method.reset()
    assert method.history == [] and method.call_count == 0 and method.scalars() == {}


def test_registry_entry():
    (info,) = METHODS
    assert info.key == "dgl" and info.preset is DGL and info.kind == "loss" == DGL.kind
    assert info.strength.keyword == "unimodal_weight" and info.strength.default == 4.0
    assert set(DGL.loss_inputs) <= set(gradmod.method.INPUTS)
    assert {o.keyword for o in info.options} == {"head_gradient", "clip_norm"}
