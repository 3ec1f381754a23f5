"""MBSD (Liu et al., WSDM 2023, as BalanceBenchmark ports it): the pair terms as properties, the loss against
transcriptions of BalanceBenchmark's training step and of gradmod's reading, the flags, the window, errors,
warnings, resume."""

from __future__ import annotations

import copy
import io
import math
import warnings

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from tiny import TinyModel, batches

from gradmod.methods.mbsd import (
    BALANCEBENCHMARK,
    MBSD,
    METHODS,
    distillation_divergence,
    pair_distillation,
    port_divergence,
    true_class_confidence,
)

NAMES = ("audio", "visual")


def logits_batch(seed: int, batch: int = 12, classes: int = 4, names=NAMES, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    fused = torch.randn(batch, classes, generator=g) * scale
    unimodal = {n: torch.randn(batch, classes, generator=g) * scale for n in names}
    target = torch.randint(0, classes, (batch,), generator=g)
    return fused, unimodal, target


def with_grad(fused, unimodal):
    fused = fused.clone().requires_grad_(True)
    unimodal = {n: z.clone().requires_grad_(True) for n, z in unimodal.items()}
    return fused, unimodal


def gradients(loss, fused, unimodal):
    grads = torch.autograd.grad(loss, [fused, *unimodal.values()], allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, [fused, *unimodal.values()])]


# ------------------------------------------------------------------ transcriptions
def balancebenchmark_step(out, z0, z1, label, epoch, starts=0, ends=80):
    """BalanceBenchmark's MBSDTrainer.training_step for two modalities, written out again: a loop over samples with
    Python's max/min of the true-class probabilities, F.kl_div given the larger probability as its input."""
    ce = F.cross_entropy
    if not starts <= epoch <= ends:
        return ce(out, label)
    n = out.shape[0]
    rs = 1 / z0.shape[1] * torch.sum((z0 - z1) ** 2, dim=1)
    p0, p1 = F.softmax(z0, dim=1), F.softmax(z1, dim=1)
    w, ps, pw = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    for i in range(n):
        if p0[i].argmax() == label[i] or p1[i].argmax() == label[i]:
            w[i] = max(p0[i][label[i]], p1[i][label[i]]) - min(p0[i][label[i]], p1[i][label[i]])
        ps[i] = max(p0[i][label[i]], p1[i][label[i]])
        pw[i] = min(p0[i][label[i]], p1[i][label[i]])
    kl = F.kl_div(ps, pw, reduction="none")
    loss_kl = torch.mm(w.reshape(1, -1), kl.reshape(-1, 1)) / n
    loss_rs = torch.mm(w.reshape(1, -1), rs.reshape(-1, 1)) / n
    return ce(out, label) + ce(z0, label) + ce(z1, label) + loss_rs.squeeze() + loss_kl.squeeze()


def gradmod_reading(out, unimodal, label, weight=1.0):
    """gradmod's reading, sample by sample: the more confident modality of each pair teaches (its logits and
    confidence detached), w = c·(s − u) detached, D = KL(p_teacher ‖ p_student), pair terms averaged over pairs."""
    names = list(unimodal)
    total = F.cross_entropy(out, label) + sum(F.cross_entropy(z, label) for z in unimodal.values())
    pair_terms = []
    for i_a in range(len(names)):
        for i_b in range(i_a + 1, len(names)):
            za, zb = unimodal[names[i_a]], unimodal[names[i_b]]
            samples = []
            for i in range(out.shape[0]):
                qa, qb = F.softmax(za[i], 0)[label[i]], F.softmax(zb[i], 0)[label[i]]
                teacher, student = (za[i], zb[i]) if qa >= qb else (zb[i], za[i])
                teacher = teacher.detach()
                right = za[i].argmax() == label[i] or zb[i].argmax() == label[i]
                w = float(right) * abs(qa.item() - qb.item())
                pt, ps = F.softmax(teacher, 0), F.softmax(student, 0)
                kl = (pt * (torch.log(pt) - torch.log(ps))).sum()
                rs = ((student - teacher) ** 2).sum() / out.shape[1]
                samples.append(w * rs + w * kl)
            pair_terms.append(torch.stack(samples).mean())
    return total + weight * torch.stack(pair_terms).mean()


def both_branches(fused, unimodal, target):
    """Inputs where some samples have a modality right and some none, and each modality teaches somewhere."""
    za, zv = unimodal["audio"], unimodal["visual"]
    right_a, right_v = za.argmax(1) == target, zv.argmax(1) == target
    qa, qv = true_class_confidence(za, target), true_class_confidence(zv, target)
    return bool((right_a | right_v).any() and (~(right_a | right_v)).any() and (qa > qv).any() and (qv > qa).any())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_port_flags_reproduce_balancebenchmark_value_and_gradients(seed):
    fused, unimodal, target = logits_batch(seed, batch=16)
    assert both_branches(fused, unimodal, target)
    method = MBSD(NAMES, **BALANCEBENCHMARK)
    for epoch in (0, 80, 81):
        method.start_epoch(epoch)
        f1, u1 = with_grad(fused, unimodal)
        ours = method.loss(f1, u1, target)
        f2, u2 = with_grad(fused, unimodal)
        theirs = balancebenchmark_step(f2, u2["audio"], u2["visual"], target, epoch)
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-6, abs=1e-7)
        for got, want in zip(gradients(ours, f1, u1), gradients(theirs, f2, u2)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert method.last["status"] == "outside"


@pytest.mark.parametrize("seed", [3, 4])
@pytest.mark.parametrize("names", [NAMES, ("audio", "visual", "text")])
def test_the_defaults_are_gradmods_reading(seed, names):
    fused, unimodal, target = logits_batch(seed, batch=10, names=names)
    f1, u1 = with_grad(fused, unimodal)
    ours = MBSD(names, distillation_weight=0.7).loss(f1, u1, target)
    f2, u2 = with_grad(fused, unimodal)
    theirs = gradmod_reading(f2, u2, target, weight=0.7)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    for got, want in zip(gradients(ours, f1, u1), gradients(theirs, f2, u2)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_the_port_divergence_is_not_a_divergence():
    assert port_divergence(torch.tensor(0.2), torch.tensor(0.9)).item() == pytest.approx(0.2 * (math.log(0.2) - 0.9))
    assert port_divergence(torch.tensor(0.2), torch.tensor(0.9)).item() == pytest.approx(-0.50, abs=5e-3)


# ------------------------------------------------------------------ properties
logit_rows = st.lists(st.floats(-4, 4), min_size=3, max_size=3)


@settings(max_examples=30)
@given(a=st.lists(logit_rows, min_size=1, max_size=4), b=st.lists(logit_rows, min_size=1, max_size=4))
def test_the_kl_divergence_is_non_negative_and_zero_for_equal_distributions(a, b):
    rows = min(len(a), len(b))
    za, zb = torch.tensor(a[:rows]), torch.tensor(b[:rows])
    assert (distillation_divergence(za, zb) >= -1e-6).all()
    assert distillation_divergence(za, za + 1.5).abs().max() < 1e-5  # a shift changes no probability


@settings(max_examples=30)
@given(seed=st.integers(0, 10_000), divergence=st.sampled_from(["kl", "port"]))
def test_pair_terms_are_symmetric_under_swapping_the_modalities(seed, divergence):
    _, unimodal, target = logits_batch(seed, batch=6)
    za, zv = unimodal["audio"], unimodal["visual"]
    rs1, d1, w1, first1 = pair_distillation(za, zv, target, divergence=divergence)
    rs2, d2, w2, first2 = pair_distillation(zv, za, target, divergence=divergence)
    torch.testing.assert_close((rs1, d1, w1), (rs2, d2, w2))
    assert torch.equal(first1, ~first2 | (w1 == 0) & first1)
    assert ((w1 >= 0) & (w1 <= 1)).all()


def test_the_weight_is_the_confidence_gap_only_where_a_modality_is_right():
    target = torch.tensor([0, 0, 1])
    za = torch.tensor([[3.0, 0.0], [0.0, 1.0], [2.0, 0.0]])  # right, wrong, wrong
    zv = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 0.0]])  # right, wrong, wrong
    _, _, w, a_teaches = pair_distillation(za, zv, target)
    qa, qv = true_class_confidence(za, target), true_class_confidence(zv, target)
    torch.testing.assert_close(w, torch.stack([qa[0] - qv[0], torch.tensor(0.0), torch.tensor(0.0)]))
    assert a_teaches.tolist() == [True, True, False]


def test_only_the_student_moves_unless_symmetric():
    _, unimodal, target = logits_batch(5, batch=8)
    za, zv = (unimodal[n].clone().requires_grad_(True) for n in NAMES)
    rs, d, w, a_teaches = pair_distillation(za, zv, target, divergence="kl")
    grad_a, grad_v = torch.autograd.grad((rs + d).sum(), [za, zv])
    active = w > 0
    assert active.any()
    assert (grad_a[a_teaches].abs().sum(1) == 0).all() and (grad_v[~a_teaches].abs().sum(1) == 0).all()
    assert grad_v[a_teaches & active].abs().sum() > 0 and grad_a[~a_teaches & active].abs().sum() > 0
    rs, d, _, _ = pair_distillation(za, zv, target, symmetric=True)
    grad_a, _ = torch.autograd.grad((rs + d).sum(), [za, zv])
    assert grad_a[a_teaches & active].abs().sum() > 0  # both pulled


def test_a_detached_weight_is_a_constant_factor():
    _, unimodal, target = logits_batch(6, batch=8)
    za, zv = (unimodal[n].clone().requires_grad_(True) for n in NAMES)
    _, d_detached, w, _ = pair_distillation(za, zv, target, divergence="port", symmetric=True)
    _, d_attached, _, _ = pair_distillation(za, zv, target, divergence="port", symmetric=True, detach_weight=False)
    torch.testing.assert_close(d_detached, d_attached)
    g_detached = torch.autograd.grad(d_detached.sum(), [za, zv])
    g_attached = torch.autograd.grad(d_attached.sum(), [za, zv])
    qa, qv = true_class_confidence(za, target), true_class_confidence(zv, target)
    unweighted = port_divergence(torch.minimum(qa, qv), torch.maximum(qa, qv))
    want = torch.autograd.grad((w.detach() * unweighted).sum(), [za, zv])
    torch.testing.assert_close(g_detached, want)
    assert any(not torch.allclose(a, b) for a, b in zip(g_detached, g_attached))


def test_identical_modalities_leave_only_the_cross_entropies():
    fused, unimodal, target = logits_batch(7)
    same = {n: unimodal["audio"] for n in NAMES}
    loss = MBSD(NAMES).loss(fused, same, target)
    want = F.cross_entropy(fused, target) + 2 * F.cross_entropy(same["audio"], target)
    assert loss.item() == pytest.approx(want.item())
    fused, unimodal, target = logits_batch(8)
    plain = F.cross_entropy(fused, target) + sum(F.cross_entropy(z, target) for z in unimodal.values())
    assert MBSD(NAMES, distillation_weight=0.0).loss(fused, unimodal, target).item() == pytest.approx(plain.item())


def test_three_modalities_average_their_three_pairs_and_ignore_the_order():
    names = ("audio", "visual", "text")
    fused, unimodal, target = logits_batch(9, names=names)
    method = MBSD(names)
    assert method.pairs == (("audio", "visual"), ("audio", "text"), ("visual", "text"))
    pairs = [pair_distillation(unimodal[a], unimodal[b], target) for a, b in method.pairs]
    want = F.cross_entropy(fused, target) + sum(F.cross_entropy(z, target) for z in unimodal.values())
    want = want + sum(rs.mean() + d.mean() for rs, d, _, _ in pairs) / 3
    assert method.loss(fused, unimodal, target).item() == pytest.approx(want.item(), rel=1e-6)
    reordered = MBSD(("text", "audio", "visual")).loss(fused, unimodal, target)
    assert reordered.item() == pytest.approx(want.item(), rel=1e-6)


def test_the_distillation_weight_scales_the_pair_terms():
    fused, unimodal, target = logits_batch(10)
    plain = MBSD(NAMES, distillation_weight=0.0).loss(fused, unimodal, target)
    one = MBSD(NAMES).loss(fused, unimodal, target)
    three = MBSD(NAMES, distillation_weight=3.0).loss(fused, unimodal, target)
    assert one > plain
    assert (three - plain).item() == pytest.approx(3 * (one - plain).item(), rel=1e-5)


# ------------------------------------------------------------------ window, history, messages
def test_the_window_is_inclusive_and_told_by_start_epoch():
    fused, unimodal, target = logits_batch(11)
    method = MBSD(NAMES, first_epoch=2, last_epoch=3)
    full = MBSD(NAMES).loss(fused, unimodal, target)
    for epoch, inside in [(1, False), (2, True), (3, True), (4, False)]:
        method.start_epoch(epoch)
        loss = method.loss(fused, unimodal, target)
        want = full if inside else F.cross_entropy(fused, target)
        assert loss.item() == pytest.approx(want.item()), epoch
        assert method.last["status"] == ("applied" if inside else "outside")
    assert method.in_window(2) and not method.in_window(5)


def test_a_window_without_start_epoch_warns_and_counts_as_epoch_0():
    method = MBSD(NAMES, last_epoch=80)
    with pytest.warns(RuntimeWarning, match=r"start_epoch\(epoch\)"):
        method.loss(*logits_batch(12))
    assert method.last["status"] == "applied"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MBSD(NAMES).loss(*logits_batch(12))  # no window, nothing to tell


def test_a_batch_with_no_distillation_warns_at_the_next_step():
    fused, unimodal, target = logits_batch(13)
    same = {n: unimodal["audio"] for n in NAMES}
    method = MBSD(NAMES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        method.loss(fused, same, target)
    with pytest.warns(RuntimeWarning, match="distillation weight w was 0"):
        method.loss(fused, unimodal, target)


def test_the_history_records_confidence_teacher_weight_and_unimodal_loss():
    fused, unimodal, target = logits_batch(16, batch=16)  # audio teaches 2 samples, visual 5
    method = MBSD(NAMES)
    method.loss(fused, unimodal, target)
    record = method.last
    _, _, w, a_teaches = pair_distillation(unimodal["audio"], unimodal["visual"], target)
    assert record["confidence"]["audio"] == pytest.approx(
        true_class_confidence(unimodal["audio"], target).mean().item()
    )
    assert record["teacher"]["audio"] == pytest.approx((a_teaches & (w > 0)).float().mean().item())
    assert record["teacher"]["visual"] == pytest.approx((~a_teaches & (w > 0)).float().mean().item())
    assert record["weight"]["visual"] == pytest.approx(w.mean().item())
    assert record["unimodal_loss"]["visual"] == pytest.approx(F.cross_entropy(unimodal["visual"], target).item())
    assert set(method.scalars()) >= {
        "active",
        "confidence/audio",
        "teacher/visual",
        "weight/audio",
        "unimodal_loss/audio",
    }
    assert "MBSD(modalities=['audio', 'visual']" in repr(method)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f, u, t: (f, {"audio": u["audio"]}, t), r"missing \['visual'\]"),
        (lambda f, u, t: (f, {**u, "text": u["audio"]}, t), r"unknown \['text'\]"),
        (lambda f, u, t: (f, {**u, "visual": u["visual"][:, :3]}, t), "unimodal_logits\\['visual'\\] has shape"),
        (
            lambda f, u, t: (f, {**u, "visual": u["visual"] * float("nan")}, t),
            "unimodal_logits\\['visual'\\] contain NaN",
        ),
        (lambda f, u, t: (f * float("inf"), u, t), "fused logits contain NaN or inf"),
        (lambda f, u, t: (f, u, t + 10), r"outside \[0, 4\)"),
        (lambda f, u, t: (f[:0], {n: z[:0] for n, z in u.items()}, t[:0]), "empty batch"),
        (lambda f, u, t: (f, u, t.float()), "integer class indices"),
    ],
)
def test_bad_inputs_fail_by_name(change, message):
    with pytest.raises(ValueError, match=message):
        MBSD(NAMES).loss(*change(*logits_batch(15)))


def test_bad_options_fail_by_name():
    with pytest.raises(ValueError, match="divergence"):
        MBSD(NAMES, divergence="js")
    with pytest.raises(ValueError, match="last_epoch"):
        MBSD(NAMES, first_epoch=5, last_epoch=2)
    with pytest.raises(ValueError, match="distillation_weight"):
        MBSD(NAMES, distillation_weight=-1.0)
    with pytest.raises(ValueError, match="two or more"):
        MBSD(("audio",))
    with pytest.raises(ValueError, match="epoch"):
        MBSD(NAMES).start_epoch(-1)


# ------------------------------------------------------------------ state
def train(model, method, optimizer, data, epoch):
    method.start_epoch(epoch)
    for inputs, y in data:
        optimizer.zero_grad()
        logits, decoupled, _, _ = model(inputs)
        method.loss(logits, decoupled, y).backward()
        optimizer.step()


def test_resume_equals_an_uninterrupted_run():
    torch.manual_seed(0)
    model = TinyModel()
    data = batches(3, batch=16)
    make = lambda: MBSD(NAMES, first_epoch=1, last_epoch=2)
    straight_model = copy.deepcopy(model)
    straight, straight_opt = make(), torch.optim.SGD(straight_model.parameters(), lr=0.1, momentum=0.9)
    for epoch in range(4):
        train(straight_model, straight, straight_opt, data, epoch)

    first, first_opt = make(), torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for epoch in range(2):
        train(model, first, first_opt, data, epoch)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": first_opt.state_dict(), "method": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed_model = TinyModel()
    resumed_model.load_state_dict(saved["model"])
    resumed, resumed_opt = make(), torch.optim.SGD(resumed_model.parameters(), lr=0.1, momentum=0.9)
    resumed_opt.load_state_dict(saved["opt"])
    resumed.load_state_dict(saved["method"])
    for epoch in range(2, 4):
        train(resumed_model, resumed, resumed_opt, data, epoch)
    for a, b in zip(resumed_model.parameters(), straight_model.parameters()):
        assert torch.equal(a, b)
    assert repr(resumed.history) == repr(straight.history) and resumed.step_count == 12  # NaN fields outside
    assert [r["status"] for r in straight.history] == ["outside"] * 3 + ["applied"] * 6 + ["outside"] * 3


def test_a_newer_state_is_refused_and_reset_forgets():
    method = MBSD(NAMES)
    method.start_epoch(3)
    method.loss(*logits_batch(16))
    state = method.state_dict()
    state["version"] = 99
    with pytest.raises(ValueError, match="newer"):
        MBSD(NAMES).load_state_dict(state)
    with pytest.raises(ValueError, match="modalities"):
        MBSD(("a", "b")).load_state_dict(method.state_dict())
    method.reset()
    assert method.history == [] and method.step_count == 0 and method.state_dict()["epoch"] is None


def test_the_epoch_comes_back_with_the_state():
    method = MBSD(NAMES, last_epoch=4)
    method.start_epoch(5)
    restored = MBSD(NAMES, last_epoch=4)
    restored.load_state_dict(method.state_dict())  # resumed inside epoch 5, no start_epoch yet
    fused, unimodal, target = logits_batch(17)
    assert restored.loss(fused, unimodal, target).item() == pytest.approx(F.cross_entropy(fused, target).item())
    assert restored.last["status"] == "outside"


def test_the_registry_entry():
    (info,) = METHODS
    assert info.key == "mbsd" and info.preset is MBSD and info.kind == "loss" and MBSD.kind == "loss"
    assert MBSD.loss_inputs == ("logits", "unimodal_logits", "target")
    assert info.strength.keyword == "distillation_weight"
