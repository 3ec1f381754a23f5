"""InfoReg (Huang et al., CVPR 2025): the window statistic and the pull as pure functions, a training run against a
transcription of the official loop and one against a transcription of the per-modality equations (M = 2, 3),
errors, warnings, exact resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradmod
from gradmod.functional import decouple_linear
from gradmod.methods.inforeg import (
    METHODS,
    OFFICIAL_PROXIMAL_WEIGHTS,
    InfoReg,
    acquisition_rate,
    fisher_increment,
    inforeg_loss,
    proximal_weights,
)

NAMES = ("audio", "visual")
DIM = 6


class Net(nn.Module):
    """Encoders with linear weights (which the Fisher trace covers) and a norm layer (which it does not), and a
    concat head."""

    def __init__(self, names=NAMES, in_dim=5, dim=DIM, classes=4):
        super().__init__()
        self.names = tuple(names)
        self.encoders = nn.ModuleDict(
            {n: nn.Sequential(nn.Linear(in_dim, dim), nn.LayerNorm(dim), nn.ReLU(), nn.Linear(dim, dim)) for n in self.names}
        )
        self.head = nn.Linear(dim * len(self.names), classes)

    def forward(self, inputs):
        features = {n: self.encoders[n](inputs[n]) for n in self.names}
        logits = self.head(torch.cat([features[n] for n in self.names], 1))
        return logits, decouple_linear(self.head.weight, self.head.bias, features)


def data(epochs, steps, names=NAMES, batch=16, in_dim=5, classes=4, seed=0):
    """Batches in which the label is carried by a different modality from one step to the next (every modality
    dominates some steps)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        epoch = []
        for step in range(steps):
            y = torch.randint(0, classes, (batch,), generator=g)
            strong = step % len(names)
            inputs = {
                n: F.one_hot(y, in_dim).float() * (2.5 if i == strong else 0.3) + torch.randn(batch, in_dim, generator=g)
                for i, n in enumerate(names)
            }
            epoch.append((inputs, y))
        out.append(epoch)
    return out


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)


# ------------------------------------------------------------------ the official loop, transcribed
def official_run(model, epochs):
    """``main.py``'s ``train_epoch`` @939b2ed, from its description, for two modalities (audio first): the window
    statistic from the audio trace list (which starts with ten zeros), a deep copy of the model per epoch, batch sums
    of the true-class softmax of the split head (b/2), the 0.95 / 0.1 pulls, the audio encoder's Linear weights'
    squared gradients accumulated after the pull, their per-layer means summed at the end of the epoch."""
    opt = sgd(model)
    audio_trace_list = [0.0] * 10
    record = {"k": [], "beta": []}
    for epoch, batches in enumerate(epochs):
        if epoch == 0:
            k = 1
        else:
            tr1 = sum(audio_trace_list[-10:]) / 10
            tr2 = sum(audio_trace_list[-11:-1]) / 10
            k = (tr1 - tr2) / tr1
        record["k"].append(k)
        global_model = copy.deepcopy(model)
        audio_net, visual_net = model.encoders["audio"], model.encoders["visual"]
        fim_audio = {name: torch.zeros_like(m.weight) for name, m in audio_net.named_modules() if isinstance(m, nn.Linear)}
        for inputs, label in batches:
            opt.zero_grad()
            a, v = audio_net(inputs["audio"]), visual_net(inputs["visual"])
            out = model.head(torch.cat((a, v), 1))
            out_v = torch.mm(v, model.head.weight[:, DIM:].T) + model.head.bias / 2
            out_a = torch.mm(a, model.head.weight[:, :DIM].T) + model.head.bias / 2
            loss, loss_out_v, loss_out_a = F.cross_entropy(out, label), F.cross_entropy(out_v, label), F.cross_entropy(out_a, label)
            loss_out_v.backward(retain_graph=True)
            loss_out_a.backward(retain_graph=True)
            loss.backward()
            score_v = sum(torch.softmax(out_v, 1)[i][label[i]] for i in range(out_v.size(0)))
            score_a = sum(torch.softmax(out_a, 1)[i][label[i]] for i in range(out_a.size(0)))
            if score_a > score_v and k > 0.05:
                beta, beta2 = 0.95 * torch.exp(torch.tanh(score_a - score_v)).detach(), 0
            elif score_a < score_v and k > 0.05:
                beta, beta2 = 0, 0.1 * torch.exp(torch.tanh(score_v - score_a)).detach()
            else:
                beta, beta2 = 0, 0
            record["beta"].append((float(beta), float(beta2)))  # floats of 0-d tensors
            with torch.no_grad():
                for p, p0 in zip(model.parameters(), global_model.parameters()):
                    if any(p is q for q in audio_net.parameters()):
                        p.grad += beta * (p - p0)
                    if any(p is q for q in visual_net.parameters()):
                        p.grad += beta2 * (p - p0)
                for name, m in audio_net.named_modules():
                    if isinstance(m, nn.Linear):
                        fim_audio[name] += m.weight.grad * m.weight.grad
            opt.step()
        audio_trace_list.append(sum(f.mean().item() for f in fim_audio.values()))
    return record


def gradmod_run(model, method, epochs, hook=None):
    opt = sgd(model)
    method.attach(opt)
    for epoch, batches in enumerate(epochs):
        method.start_epoch(epoch)
        for step, (inputs, y) in enumerate(batches):
            opt.zero_grad()
            logits, decoupled = model(inputs)
            inforeg_loss(logits, decoupled, y).backward()
            method.observe(logits=decoupled, target=y)
            opt.step()
            if hook is not None:
                hook(epoch, step, model, opt, method)
        method.end_epoch(epoch)
    return opt


def test_the_official_preset_matches_the_official_loop():
    """Every parameter after 16 epochs; both pulls (audio and visual dominant), and the window open and closed."""
    torch.manual_seed(0)
    model = Net()
    twin = copy.deepcopy(model)
    epochs = data(16, 2)
    method = InfoReg.official(dict(model.encoders))
    gradmod_run(model, method, epochs)
    record = official_run(twin, epochs)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
    assert min(record["k"]) <= 0.05 < max(record["k"]), "the window must have been open and closed"
    pulls = [(r["pull"]["audio"], r["pull"]["visual"]) for r in method.history]
    assert [b for pair in pulls for b in pair] == pytest.approx([b for pair in record["beta"] for b in pair], rel=1e-5)
    assert any(a > 0 for a, _ in pulls) and any(v > 0 for _, v in pulls)
    expected_k = [acquisition_rate(method.traces["audio"][:e]) for e in range(16)]
    assert expected_k == pytest.approx(record["k"], rel=1e-5)
    assert method.proximal_weight == dict(zip(NAMES, OFFICIAL_PROXIMAL_WEIGHTS))


# ------------------------------------------------------------------ the per-modality equations, transcribed
def reference_run(model, epochs, gamma, threshold=0.05, span=10):
    """The per-modality reading, written from the equations: per modality its own trace list (zeros in front),
    ``k`` and window; scores are batch means of the true-class confidence; ``Δ_m = s_m − mean of the others``;
    ``β_m = γ_m·exp(tanh Δ_m)`` for ``Δ_m > 0`` in an open window; the Fisher trace from the loss's gradient (before
    the pull) over each encoder's weight matrices."""
    opt = sgd(model)
    names = model.names
    traces = {n: [0.0] * span for n in names}
    ks, betas = [], []
    for batches in epochs:
        k = {n: 1.0 if len(traces[n]) == span else (traces[n][-1] - traces[n][-span - 1]) / sum(traces[n][-span:]) for n in names}
        ks.append(k)
        anchors = {n: [p.detach().clone() for p in model.encoders[n].parameters()] for n in names}
        fisher = dict.fromkeys(names, 0.0)
        for inputs, y in batches:
            opt.zero_grad()
            logits, decoupled = model(inputs)
            (F.cross_entropy(logits, y) + sum(F.cross_entropy(z, y) for z in decoupled.values())).backward()
            for n in names:
                fisher[n] += sum((p.grad.double() ** 2).mean().item() for p in model.encoders[n].parameters() if p.dim() > 1)
            scores = {n: torch.softmax(z, 1).gather(1, y[:, None]).mean().item() for n, z in decoupled.items()}
            beta = {}
            for n in names:
                gap = scores[n] - sum(scores[o] for o in names if o != n) / (len(names) - 1)
                beta[n] = gamma[n] * math.exp(math.tanh(gap)) if gap > 0 and k[n] > threshold else 0.0
                with torch.no_grad():
                    for p, p0 in zip(model.encoders[n].parameters(), anchors[n]):
                        p.grad += beta[n] * (p - p0)
            betas.append(beta)
            opt.step()
        for n in names:
            traces[n].append(fisher[n])
    return ks, betas


@pytest.mark.parametrize("names", [NAMES, ("audio", "visual", "text")])
def test_the_default_matches_the_per_modality_equations(names):
    torch.manual_seed(1)
    model = Net(names)
    twin = copy.deepcopy(model)
    epochs = data(18, len(names), names=names)
    gamma = {n: 0.5 + 0.25 * i for i, n in enumerate(names)}
    method = InfoReg(dict(model.encoders), proximal_weight=gamma)
    rates = []
    gradmod_run(model, method, epochs, hook=lambda e, s, *_: rates.append(method.rates) if s == 0 else None)
    ks, betas = reference_run(twin, epochs, gamma)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
    for got, want in zip(rates, ks):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert [r["pull"] for r in method.history] == [pytest.approx(b, rel=1e-5) for b in betas]
    for n in names:  # every modality was pulled at some step, and every window closed at some epoch
        assert any(b[n] > 0 for b in betas) and min(k[n] for k in ks) <= 0.05


# ------------------------------------------------------------------ the pure functions
def test_acquisition_rate_follows_the_padded_list():
    assert acquisition_rate([]) == 1.0
    assert acquisition_rate([2.0]) == 1.0  # T_0 / T_0
    assert acquisition_rate([2.0, 1.0]) == pytest.approx(1 / 3)  # T_1 / (T_0 + T_1): not a relative change yet
    traces = [float(t) for t in range(1, 13)]
    assert acquisition_rate(traces) == pytest.approx((12 - 2) / sum(traces[-10:]))
    assert acquisition_rate([0.0, 0.0]) == 0.0  # guarded: the official code divides by zero here
    assert acquisition_rate([1.0, 3.0], span=1) == pytest.approx((3 - 1) / 3)
    with pytest.raises(ValueError, match="span must be an int >= 1"):
        acquisition_rate([1.0], span=0)
    with pytest.raises(ValueError, match="Fisher trace of epoch 1"):
        acquisition_rate([1.0, -1.0])


@given(st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=25), st.floats(1e-3, 1e3))
def test_acquisition_rate_is_scale_free_and_at_most_one(traces, factor):
    k = acquisition_rate(traces)
    assert k <= 1.0 + 1e-12
    assert acquisition_rate([factor * t for t in traces]) == pytest.approx(k, rel=1e-9, abs=1e-12)


scores = st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), st.floats(0.0, 64.0), min_size=2, max_size=4)


@settings(max_examples=60)
@given(scores, st.floats(0.0, 2.0))
def test_proximal_weights_pull_the_modalities_above_the_mean_of_the_others(values, gamma):
    names = list(values)
    betas = proximal_weights(values, dict.fromkeys(names, True), dict.fromkeys(names, gamma))
    for n in names:
        gap = values[n] - sum(values[o] for o in names if o != n) / (len(names) - 1)
        if abs(gap) < 1e-12 * (1 + abs(values[n])):
            continue  # a tie up to rounding (exact ties are tested below)
        if gap > 0:
            assert gamma <= betas[n] + 1e-12 and betas[n] <= gamma * math.e
            assert betas[n] == pytest.approx(gamma * math.exp(math.tanh(gap)))
        else:
            assert betas[n] == 0.0
    closed = proximal_weights(values, dict.fromkeys(names, False), dict.fromkeys(names, gamma))
    assert set(closed.values()) == {0.0}
    renamed = proximal_weights({f"x{n}": v for n, v in values.items()}, {f"x{n}": True for n in names}, {f"x{n}": gamma for n in names})
    assert list(renamed.values()) == pytest.approx(list(betas.values()))


@given(st.floats(0.0, 64.0), st.integers(2, 6))
def test_equal_scores_pull_nothing(value, m):
    names = [f"m{i}" for i in range(m)]
    betas = proximal_weights(dict.fromkeys(names, value), dict.fromkeys(names, True), dict.fromkeys(names, 1.0))
    assert set(betas.values()) == {0.0}


def test_proximal_weights_of_a_tie_and_one_closed_window():
    assert proximal_weights({"a": 0.4, "b": 0.4}, {"a": True, "b": True}, {"a": 1.0, "b": 1.0}) == {"a": 0.0, "b": 0.0}
    three = dict.fromkeys("abc", 0.8045349228545706)  # 3 equal scores: a float sum would lead by one ulp
    assert set(proximal_weights(three, dict.fromkeys("abc", True), dict.fromkeys("abc", 1.0)).values()) == {0.0}
    betas = proximal_weights({"a": 0.7, "b": 0.2}, {"a": False, "b": True}, {"a": 1.0, "b": 1.0})
    assert betas == {"a": 0.0, "b": 0.0}
    assert proximal_weights({"a": 0.2, "b": 0.7}, {"a": True, "b": True}, {"a": 1.0, "b": 0.1})["b"] == pytest.approx(0.1 * math.exp(math.tanh(0.5)))
    with pytest.raises(ValueError, match="two or more"):
        proximal_weights({"a": 1.0}, {"a": True}, {"a": 1.0})


def test_sums_saturate_where_means_do_not():
    """The numbers of the docs page: batch 64, mean-confidence gap 0.03."""
    gap = 0.03
    with_sums = proximal_weights({"audio": 64 * (0.3 + gap), "visual": 64 * 0.3}, dict.fromkeys(NAMES, True), dict(zip(NAMES, (0.95, 0.1))))
    with_means = proximal_weights({"audio": 0.3 + gap, "visual": 0.3}, dict.fromkeys(NAMES, True), dict(zip(NAMES, (0.95, 0.1))))
    assert round(with_sums["audio"], 2) == 2.48 and round(with_means["audio"], 2) == 0.98


def test_fisher_increment_sums_the_mean_squared_gradients():
    grads = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([1.0, -1.0, 2.0])]
    assert fisher_increment(grads).item() == pytest.approx(30 / 4 + 6 / 3)
    assert fisher_increment([]).item() == 0.0


# ------------------------------------------------------------------ the hook
def _setup(**options):
    torch.manual_seed(3)
    model = Net()
    opt = sgd(model)
    method = InfoReg(dict(model.encoders), **options)
    return model, opt, method


def _batch(model, method, opt, inputs, y, observe=True):
    opt.zero_grad()
    logits, decoupled = model(inputs)
    inforeg_loss(logits, decoupled, y).backward()
    if observe:
        method.observe(logits=decoupled, target=y)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    return grads


def test_the_pull_reaches_every_parameter_of_the_dominant_encoder_only():
    model, opt, method = _setup()
    method.attach(opt)
    method.start_epoch(0)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    (inputs, y), (inputs2, y2) = data(1, 2)[0]
    _batch(model, method, opt, inputs, y)  # moves away from θ⁰
    opt.zero_grad()
    logits, decoupled = model(inputs2)
    F.cross_entropy(logits, y2).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    method.observe(logits=decoupled, target=y2)
    betas = method.step()
    dominant = max(betas, key=betas.get)
    assert betas[dominant] > 0 and min(betas.values()) == 0.0
    for name, p in model.named_parameters():
        if name.startswith(f"encoders.{dominant}."):
            torch.testing.assert_close(p.grad, plain[name] + betas[dominant] * (p.detach() - theta0[name]))
            assert not torch.equal(p.detach(), theta0[name])
        else:
            assert torch.equal(p.grad, plain[name])


def test_an_encoder_without_gradient_still_gets_its_pull():
    model, opt, method = _setup()
    method.check_optimizer(opt)
    method.start_epoch(0)
    with torch.no_grad():
        for p in model.encoders["audio"].parameters():
            p.add_(0.1)
    logits = {"audio": torch.zeros(8, 4).index_fill(1, torch.tensor([1]), 5.0), "visual": torch.zeros(8, 4)}
    opt.zero_grad()
    method.observe(logits=logits, target=torch.ones(8, dtype=torch.long))
    betas = method.step()
    assert betas["audio"] > 0 and betas["visual"] == 0.0
    for p in model.encoders["audio"].parameters():
        torch.testing.assert_close(p.grad, torch.full_like(p, 0.1 * betas["audio"]))
    assert all(p.grad is None for p in model.encoders["visual"].parameters())


# ------------------------------------------------------------------ errors and warnings
def test_errors_name_the_problem():
    model, opt, method = _setup()
    (inputs, y), = data(1, 1)[0]
    _, decoupled = model(inputs)
    with pytest.raises(ValueError, match="missing \\['visual'\\]"):
        method.observe(logits={"audio": decoupled["audio"]}, target=y)
    method.attach(opt)
    method.start_epoch(0)
    method.observe(logits={**decoupled, "visual": torch.full_like(decoupled["visual"], float("nan"))}, target=y)
    with pytest.raises(ValueError, match="'visual' contain NaN"):
        method.step()
    with pytest.raises(ValueError, match="proximal_weight must name exactly"):
        InfoReg(dict(model.encoders), proximal_weight={"audio": 1.0})
    with pytest.raises(ValueError, match="window must be None"):
        InfoReg(dict(model.encoders), window="text")
    with pytest.raises(ValueError, match="score must be one of"):
        InfoReg(dict(model.encoders), score="median")
    with pytest.raises(ValueError, match="fisher must be one of"):
        InfoReg(dict(model.encoders), fisher="both")
    with pytest.raises(ValueError, match="proximal_weight must be a finite number >= 0"):
        InfoReg(dict(model.encoders), proximal_weight=-1.0)
    with pytest.raises(ValueError, match="reference must be one of"):
        InfoReg.official(dict(model.encoders), reference="text")
    with pytest.raises(ValueError, match="holds none of modality 'audio'"):
        InfoReg(dict(model.encoders)).attach(torch.optim.SGD(model.encoders["visual"].parameters(), lr=0.1))


def test_warnings_for_a_forgotten_call():
    model, opt, method = _setup()
    (inputs, y), (inputs2, y2) = data(1, 2)[0]
    _, decoupled = model(inputs)
    method.observe(logits=decoupled, target=y)
    with pytest.warns(RuntimeWarning, match="attach"):
        method.observe(logits=decoupled, target=y)
    method.attach(opt)
    with pytest.warns(RuntimeWarning, match="before start_epoch"):
        _batch(model, method, opt, inputs, y)
    with pytest.warns(RuntimeWarning, match="without observe"):
        _batch(model, method, opt, inputs2, y2, observe=False)
    with pytest.warns(RuntimeWarning, match="without end_epoch"):
        method.start_epoch(1)
    empty = {n: torch.zeros(4, 4) for n in NAMES}
    method.observe(logits=empty, target=torch.full((4,), -100))
    with pytest.warns(RuntimeWarning, match="no counted target"):
        assert method.step() is None


def test_a_zero_trace_closes_the_window_with_a_warning():
    model, opt, method = _setup(fisher_filter=lambda name, p: False)
    method.attach(opt)
    (inputs, y), = data(1, 1)[0]
    for epoch in range(2):
        method.start_epoch(epoch)
        _batch(model, method, opt, inputs, y)
        if epoch == 0:
            with pytest.warns(RuntimeWarning, match="would divide by zero"):
                method.end_epoch(epoch)
        else:
            method.end_epoch(epoch)
    assert method.rates == {"audio": 0.0, "visual": 0.0} and method.open_windows == {"audio": False, "visual": False}
    assert [r["status"] for r in method.history] == ["applied", "outside"]


# ------------------------------------------------------------------ state
def test_exact_resume_mid_epoch():
    epochs = data(4, 3)
    torch.manual_seed(4)
    model = Net()
    start = copy.deepcopy(model.state_dict())
    method = InfoReg.official(dict(model.encoders))
    gradmod_run(model, method, epochs)

    saved = {}

    def save(epoch, step, net, opt, reg):
        if (epoch, step) == (1, 1):
            saved["state"] = copy.deepcopy((net.state_dict(), opt.state_dict(), reg.state_dict()))

    first = Net()
    first.load_state_dict(start)
    gradmod_run(first, InfoReg.official(dict(first.encoders)), epochs[:2], hook=save)
    second = Net()
    second.load_state_dict(saved["state"][0])
    opt = sgd(second)
    opt.load_state_dict(saved["state"][1])
    resumed = InfoReg.official(dict(second.encoders))
    resumed.load_state_dict(saved["state"][2])
    resumed.attach(opt)
    for inputs, y in epochs[1][2:]:
        _batch(second, resumed, opt, inputs, y)
    resumed.end_epoch(1)
    for epoch in range(2, 4):
        resumed.start_epoch(epoch)
        for inputs, y in epochs[epoch]:
            _batch(second, resumed, opt, inputs, y)
        resumed.end_epoch(epoch)
    for p, q in zip(model.parameters(), second.parameters()):
        assert torch.equal(p, q)
    assert resumed.traces == method.traces and resumed.history == method.history


def test_state_refuses_newer_versions_and_other_settings_and_reset_forgets():
    model, opt, method = _setup()
    method.attach(opt)
    method.start_epoch(0)
    (inputs, y), = data(1, 1)[0]
    _batch(model, method, opt, inputs, y)
    method.end_epoch(0)
    state = method.state_dict()
    with pytest.raises(ValueError, match="newer"):
        InfoReg(dict(model.encoders)).load_state_dict({**state, "version": 99})
    with pytest.raises(ValueError, match="settings"):
        InfoReg(dict(model.encoders), threshold=0.1).load_state_dict(state)
    method.reset()
    assert method.history == [] and method.traces == {"audio": [], "visual": []} and method.rates == {"audio": 1.0, "visual": 1.0}
    assert method.step_count == 0


def test_registry_entry_and_repr():
    (info,) = METHODS
    assert info.key == "inforeg" and info.preset is InfoReg and info.kind == "modulator" == InfoReg.kind
    assert info.strength.keyword == "proximal_weight" and info.strength.default == 0.95
    model, _, method = _setup()
    assert set(method.measure.inputs) <= set(gradmod.method.INPUTS)
    assert "window=None" in repr(method) and "score='mean'" in repr(method)
    assert "window='audio'" in repr(InfoReg.official(dict(model.encoders)))
