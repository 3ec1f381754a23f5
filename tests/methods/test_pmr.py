"""PMR (Fan et al., CVPR 2023): prototypes, distances, scores and weights as properties; the step and the
prototype pass against a transcription of the official ``main_Prototype_grad.py``; the guards for missing
classes and zero distances; the optional entropy regulariser; errors, resume."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from gradmod.methods import pmr
from gradmod.methods.pmr import (
    PMR,
    ClassMeans,
    class_means,
    prototype_distances,
    prototype_entropy,
    prototype_pass,
    prototype_scores,
    prototype_weights,
)

NAMES = ("audio", "visual")
CLASSES = 3


class Net(nn.Module):
    """An encoder per modality (with dropout: the prototype pass must run in eval mode) and a concat head."""

    def __init__(self, names=NAMES, in_dim=5, dim=4, classes=CLASSES):
        super().__init__()
        self.names = tuple(names)
        self.encoders = nn.ModuleDict({n: nn.Sequential(nn.Linear(in_dim, dim), nn.Dropout(0.3), nn.ReLU(), nn.Linear(dim, dim)) for n in self.names})
        self.head = nn.Linear(dim * len(self.names), classes)

    def forward(self, inputs):
        features = {n: self.encoders[n](inputs[n]) for n in self.names}
        return self.head(torch.cat([features[n] for n in self.names], 1)), features


def batches(steps, names=NAMES, batch=9, in_dim=5, classes=CLASSES, seed=0, strengths=None):
    g = torch.Generator().manual_seed(seed)
    strengths = strengths or [2.5] + [0.4] * (len(names) - 1)
    out = []
    for _ in range(steps):
        y = torch.randint(0, classes, (batch,), generator=g)
        out.append(({n: F.one_hot(y, in_dim).float() * s + torch.randn(batch, in_dim, generator=g) for n, s in zip(names, strengths)}, y))
    return out


def forward(model, batch):
    inputs, y = batch
    return model(inputs)[1], y


# ------------------------------------------------------------------ 1. the equations
@given(batch=st.integers(1, 5), classes=st.integers(2, 4), dim=st.integers(1, 4), seed=st.integers(0, 1000))
def test_distances_are_euclidean_and_scores_in_range(batch, classes, dim, seed):
    g = torch.Generator().manual_seed(seed)
    h, c = torch.randn(batch, dim, generator=g, dtype=torch.float64), torch.randn(classes, dim, generator=g, dtype=torch.float64)
    d = prototype_distances(h, c)
    torch.testing.assert_close(d, torch.cdist(h, c))
    y = torch.randint(0, classes, (batch,), generator=g)
    assert 0.0 <= prototype_scores(d, y).item() <= batch
    assert prototype_scores(d, y).item() == pytest.approx(torch.softmax(-d, 1)[torch.arange(batch), y].sum().item())


def test_a_zero_distance_has_gradient_zero_where_the_official_sqrt_gives_nan():
    c = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    h = torch.tensor([[1.0, 2.0]], requires_grad=True)  # equal to the first prototype
    prototype_distances(h, c).sum().backward()
    torch.testing.assert_close(h.grad, (h - c[1]).detach() / (h - c[1]).detach().norm())  # only the second distance pulls
    official = h.detach().clone().requires_grad_()
    torch.sqrt(torch.dot(official[0] - c[0], official[0] - c[0])).backward()
    assert torch.isnan(official.grad).all()


@given(s=st.tuples(st.floats(0.0, 9.0), st.floats(0.0, 9.0), st.floats(0.0, 9.0)), alpha=st.floats(0.0, 3.0))
def test_the_slower_modalities_get_alpha_and_the_rule_follows_the_modalities(s, alpha):
    t = functools.partial(torch.tensor, dtype=torch.float64)
    two = prototype_weights({"a": t(s[0]), "v": t(s[1])}, alpha)
    if s[0] > s[1]:
        assert (two["a"].item(), two["v"].item()) == (0.0, alpha)  # official: ratio_a_p > 1 → (β, λ) = (0, α)
    elif s[0] < s[1]:
        assert (two["a"].item(), two["v"].item()) == (alpha, 0.0)
    else:
        assert two["a"].item() == two["v"].item() == 0.0
    swapped = prototype_weights({"a": t(s[1]), "v": t(s[0])}, alpha)
    assert (swapped["a"].item(), swapped["v"].item()) == (two["v"].item(), two["a"].item())
    three = prototype_weights(dict(zip("abc", map(t, s))), alpha)
    for k, name in enumerate("abc"):
        others = sum(s[j] for j in range(3) if j != k)
        below = others > 0 and 2 * s[k] / others < 1  # ρ against the mean of the others
        assert three[name].item() == (alpha if below else 0.0)


def test_entropy_is_maximal_for_equal_distances():
    assert prototype_entropy(torch.zeros(2, 4)).item() == pytest.approx(np.log(4))
    assert prototype_entropy(torch.tensor([[0.0, 50.0, 50.0]])).item() == pytest.approx(0.0, abs=1e-12)


def test_class_means_and_the_pass_over_the_first_tenth_in_eval_mode():
    torch.manual_seed(0)
    model = Net()
    data = batches(25)
    means = prototype_pass(model, forward, data, CLASSES)
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        used = data[: 25 // 10]  # max(1, n // 10) batches
        features = [model(x)[1] for x, _ in used]
        target = torch.cat([y for _, y in used])
        for name in NAMES:
            stacked = torch.cat([f[name] for f in features])
            for k in range(CLASSES):
                torch.testing.assert_close(means.means[name][k].float(), stacked[target == k].mean(0))
    assert means.counts.tolist() == [int((target == k).sum()) for k in range(CLASSES)]
    assert prototype_pass(model, forward, data[:5], CLASSES).counts.sum() == 9  # fewer than ten batches: one
    with pytest.raises(TypeError, match="give prototype_pass"):
        prototype_pass(model, forward, iter(data), CLASSES)
    with pytest.raises(ValueError, match="yielded no batch"):
        class_means([], CLASSES)


# ------------------------------------------------------------------ 2. the official code, transcribed
def official_prototypes(model, loader, epoch, n_classes, a_proto=None, v_proto=None):
    """``calculate_prototype``: eval, no grad, class sums over batches until ``sample_count >= all_num // 10``,
    divided by the class counts; ``(1 − m)·new + m·old`` unless ``epoch <= 0`` (m = 0.2)."""
    audio = torch.zeros(n_classes, 4)
    visual = torch.zeros(n_classes, 4)
    count_class = [0 for _ in range(n_classes)]
    model.eval()
    with torch.no_grad():
        sample_count = 0
        all_num = len(loader)
        for inputs, label in loader:
            _, f = model(inputs)
            for c, l in enumerate(label):
                count_class[l] += 1
                audio[l, :] += f["audio"][c, :]
                visual[l, :] += f["visual"][c, :]
            sample_count += 1  # noqa: SIM113 (the official counter)
            if sample_count >= all_num // 10:
                break
    model.train()
    for c in range(n_classes):
        audio[c, :] /= count_class[c]
        visual[c, :] /= count_class[c]
    if epoch > 0:
        audio = 0.8 * audio + 0.2 * a_proto
        visual = 0.8 * visual + 0.2 * v_proto
    return audio, visual


def eu_dist(x1, x2):
    d_matrix = torch.zeros(x1.shape[0], x2.shape[0])
    for i in range(x1.shape[0]):
        for j in range(x2.shape[0]):
            d_matrix[i, j] = torch.sqrt(torch.dot((x1[i] - x2[j]), (x1[i] - x2[j])))
    return d_matrix


def official_step(out, a, v, label, audio_proto, visual_proto, alpha):
    """``train_epoch`` with ``--modulation Proto``: scores summed in a Python loop, the ratio, the branches."""
    audio_sim, visual_sim = -eu_dist(a, audio_proto), -eu_dist(v, visual_proto)
    score_a_p = sum([torch.softmax(audio_sim, 1)[i][label[i]] for i in range(audio_sim.size(0))])
    score_v_p = sum([torch.softmax(visual_sim, 1)[i][label[i]] for i in range(visual_sim.size(0))])
    ratio_a_p = score_a_p / score_v_p
    if ratio_a_p > 1:
        beta, lam = 0, 1 * alpha
    elif ratio_a_p < 1:
        beta, lam = 1 * alpha, 0
    else:
        beta, lam = 0, 0
    loss = F.cross_entropy(out, label) + beta * F.cross_entropy(audio_sim, label) + lam * F.cross_entropy(visual_sim, label)
    return loss, ratio_a_p.item()


def test_matches_the_official_step_and_prototype_pass_over_epochs():
    torch.manual_seed(0)
    model = Net()
    twin = copy.deepcopy(model)
    data = batches(20)
    method = PMR(NAMES, CLASSES, measure=functools.partial(prototype_pass, model, forward, data, CLASSES), prototype_weight=1.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.2)
    protos = official_prototypes(twin, data, 0, CLASSES)
    ratios = []
    for epoch in range(4):
        method.start_epoch(epoch)
        for name, proto in zip(NAMES, protos):
            torch.testing.assert_close(method.prototypes[name].float(), proto, rtol=1e-5, atol=1e-6)
        for inputs, y in data:
            torch.manual_seed(epoch * 100 + len(ratios))  # identical dropout masks in both
            out, features = model(inputs)
            loss = method.loss(logits=out, features=features, target=y)
            torch.manual_seed(epoch * 100 + len(ratios))
            twin_out, twin_features = twin(inputs)
            expected, ratio = official_step(twin_out, twin_features["audio"], twin_features["visual"], y, *protos, 1.5)
            ratios.append(ratio)
            torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
            opt.zero_grad()
            twin_opt.zero_grad()
            loss.backward()
            expected.backward()
            for p, q in zip(model.parameters(), twin.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
            opt.step()
            twin_opt.step()
            assert method.last["ratio"]["audio"] == pytest.approx(ratio, rel=1e-5)
        protos = official_prototypes(twin, data, epoch, CLASSES, *protos)
    assert min(ratios) < 1 < max(ratios), "both branches of the rule must have run"


def test_a_tie_gives_no_prototype_loss_as_officially():
    method = PMR(NAMES, CLASSES)
    method.update(ClassMeans({n: torch.eye(3, 4, dtype=torch.float64) for n in NAMES}, torch.ones(3, dtype=torch.long)), 0)
    features = {n: torch.eye(3, 4)[[0, 1]] * 0.5 for n in NAMES}  # identical in both modalities
    logits = torch.randn(2, 3)
    y = torch.tensor([0, 1])
    torch.testing.assert_close(method.loss(logits=logits, features=features, target=y), F.cross_entropy(logits, y))
    assert method.last["weight"] == {"audio": 0.0, "visual": 0.0}


# ------------------------------------------------------------------ 3. the guards
def test_a_class_missing_from_the_pass_keeps_its_prototype_or_stays_out():
    method = PMR(NAMES, CLASSES, momentum=0.5)
    seen = ClassMeans({n: torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64) for n in NAMES}, torch.tensor([2, 3, 0]))
    with pytest.warns(RuntimeWarning, match=r"classes \[2\] had no sample"):
        method.update(seen, 0)
    assert method.missing == [2]
    features = {"audio": torch.tensor([[1.0, 0.0], [5.0, 5.0]], requires_grad=True), "visual": torch.tensor([[0.0, 1.0], [1.0, 1.0]])}
    y = torch.tensor([0, 2])  # the second sample's class has no prototype: it adds no prototype loss or score
    loss = method.loss(logits=torch.zeros(2, 3, requires_grad=True), features=features, target=y)
    assert torch.isfinite(loss) and method.last["score"]["audio"] == pytest.approx(torch.softmax(-torch.tensor([0.0, 2**0.5]), 0)[0].item())
    loss.backward()
    assert torch.isfinite(features["audio"].grad).all() and features["audio"].grad[1].abs().sum() == 0
    later = ClassMeans({n: torch.tensor([[3.0, 0.0], [0.0, 0.0], [2.0, 2.0]], dtype=torch.float64) for n in NAMES}, torch.tensor([1, 0, 4]))
    method.update(later, 2)  # momentum from epoch 2: class 0 blends, class 1 keeps its prototype, class 2 is new
    torch.testing.assert_close(method.prototypes["audio"], torch.tensor([[2.0, 0.0], [0.0, 1.0], [2.0, 2.0]], dtype=torch.float64))
    assert method.missing == []


def test_momentum_starts_at_epoch_two():
    first = ClassMeans({n: torch.zeros(3, 2, dtype=torch.float64) for n in NAMES}, torch.ones(3, dtype=torch.long))
    second = ClassMeans({n: torch.ones(3, 2, dtype=torch.float64) for n in NAMES}, torch.ones(3, dtype=torch.long))
    method = PMR(NAMES, CLASSES, momentum=0.25)
    method.update(first, 0)
    method.update(second, 1)
    assert torch.equal(method.prototypes["audio"], torch.ones(3, 2, dtype=torch.float64))  # epoch 1: replaced
    method.update(first, 2)
    assert torch.equal(method.prototypes["audio"], torch.full((3, 2), 0.25, dtype=torch.float64))


# ------------------------------------------------------------------ 4. the entropy regulariser
def test_the_entropy_term_rewards_the_dominant_modalitys_entropy_in_early_epochs_only():
    torch.manual_seed(0)
    protos = ClassMeans({n: torch.randn(3, 2, dtype=torch.float64) for n in NAMES}, torch.ones(3, dtype=torch.long))
    features = {"audio": protos.means["audio"][[0, 1, 2]].float() + 0.1, "visual": torch.randn(3, 2)}  # audio: dominant
    logits, y = torch.randn(3, 3), torch.tensor([0, 1, 2])
    plain, regularised = PMR(NAMES, CLASSES), PMR(NAMES, CLASSES, entropy_weight=0.5, entropy_epochs=2)
    for method in (plain, regularised):
        method.update(protos, 0)
        method.start_epoch(1)
    base = plain.loss(logits=logits, features=features, target=y)
    assert plain.last["ratio"]["audio"] > 1
    entropy = prototype_entropy(prototype_distances(features["audio"], protos.means["audio"]))
    torch.testing.assert_close(regularised.loss(logits=logits, features=features, target=y), base - 0.5 * entropy)
    regularised.start_epoch(2)
    torch.testing.assert_close(regularised.loss(logits=logits, features=features, target=y), base)


# ------------------------------------------------------------------ 5. errors, state
def test_bad_arguments_and_inputs_fail_by_name():
    with pytest.raises(ValueError, match="momentum must lie in"):
        PMR(NAMES, CLASSES, momentum=1.0)
    with pytest.raises(TypeError, match="measure must be a callable"):
        PMR(NAMES, CLASSES, measure=3)
    method = PMR(NAMES, CLASSES)
    features = {n: torch.randn(2, 2) for n in NAMES}
    y = torch.tensor([0, 1])
    with pytest.raises(RuntimeError, match="before any prototypes"):
        method.loss(logits=torch.randn(2, 3), features=features, target=y)
    with pytest.raises(ValueError, match="saw no sample"):
        method.update(ClassMeans({n: torch.zeros(3, 2) for n in NAMES}, torch.zeros(3, dtype=torch.long)), 0)
    with pytest.raises(ValueError, match="count 2 classes"):
        method.update(ClassMeans({n: torch.zeros(2, 2) for n in NAMES}, torch.ones(2, dtype=torch.long)), 0)
    method.update(ClassMeans({n: torch.randn(3, 2) for n in NAMES}, torch.ones(3, dtype=torch.long)), 0)
    with pytest.raises(ValueError, match=r"features\['visual'\] must be \[batch=2, 2\]"):
        method.loss(logits=torch.randn(2, 3), features={**features, "visual": torch.randn(2, 5)}, target=y)
    with pytest.raises(ValueError, match="features of modality 'audio' contain NaN"):
        method.loss(logits=torch.randn(2, 3), features={**features, "audio": torch.full((2, 2), float("nan"))}, target=y)
    with pytest.raises(ValueError, match="logits have 4 classes"):
        method.loss(logits=torch.randn(2, 4), features=features, target=y)
    with pytest.raises(ValueError, match=r"missing \['visual'\]"):
        method.loss(logits=torch.randn(2, 3), features={"audio": features["audio"]}, target=y)
    with pytest.raises(ValueError, match="empty batch"):
        method.loss(logits=torch.randn(0, 3), features={n: torch.randn(0, 2) for n in NAMES}, target=y[:0])


def run(model, method, opt, data, start, stop):
    for epoch in range(start, stop):
        method.start_epoch(epoch)
        for step, (inputs, y) in enumerate(data):
            torch.manual_seed(100 * epoch + step)
            out, features = model(inputs)
            opt.zero_grad()
            method.loss(logits=out, features=features, target=y).backward()
            opt.step()


def test_resume_follows_the_same_trajectory_bit_for_bit(tmp_path):
    data = batches(12)
    torch.manual_seed(0)
    model = Net()

    def make(net):
        return PMR(NAMES, CLASSES, measure=functools.partial(prototype_pass, net, forward, data, CLASSES), entropy_weight=0.1, entropy_epochs=3)

    method = make(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    run(model, method, opt, data, 0, 2)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "method": method.state_dict()}, tmp_path / "ck.pt")
    run(model, method, opt, data, 2, 4)
    resumed = Net()
    resumed_method = make(resumed)
    resumed_opt = torch.optim.SGD(resumed.parameters(), lr=0.2, momentum=0.9)
    saved = torch.load(tmp_path / "ck.pt")
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    resumed_method.load_state_dict(saved["method"])
    run(resumed, resumed_method, resumed_opt, data, 2, 4)
    assert resumed_method.history == method.history
    for name in NAMES:
        assert torch.equal(resumed_method.prototypes[name], method.prototypes[name])
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    method.reset()
    assert method.prototypes is None and method.history == []
    with pytest.raises(ValueError, match="newer"):
        make(resumed).load_state_dict({**saved["method"], "version": 99})
    with pytest.raises(ValueError, match="PMR state_dict has momentum=0.2, this PMR has momentum=0.5"):
        PMR(NAMES, CLASSES, momentum=0.5, entropy_weight=0.1, entropy_epochs=3).load_state_dict(saved["method"])


def test_three_modalities_and_the_registry_entry():
    torch.manual_seed(0)
    names = ("a", "b", "c")
    model = Net(names)
    data = batches(10, names, strengths=[3.0, 0.2, 1.5])
    method = PMR(names, CLASSES, measure=functools.partial(prototype_pass, model, forward, data, CLASSES))
    method.start_epoch(0)
    out, features = model(data[0][0])
    method.loss(logits=out, features=features, target=data[0][1])
    record = method.last
    assert record["weight"] == {n: (1.0 if record["ratio"][n] < 1 else 0.0) for n in names}
    assert "PMR(modalities=['a', 'b', 'c']" in repr(method)
    info = pmr.METHODS[0]
    assert info.key == "pmr" and info.preset is PMR and info.kind == "loss" and set(PMR.loss_inputs) == {"logits", "features", "target"}
