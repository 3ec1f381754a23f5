"""LFM (NeurIPS 2024): the loss and the divergences against transcriptions of the official ``Crema_epoch.py``, the
fitted schedule, the learnable schedule's second-order step against ``torch.autograd.functional.hvp`` and the
official ``getAlpha_Learnable``, errors by name and exact resume."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn
from torch.func import functional_call

from gradmod.methods import lfm
from gradmod.methods.lfm import (
    FITTED_COEFFICIENTS,
    LFM,
    alignment_weight_update,
    fitted_classification_weight,
    hessian_vector_product,
    jensen_shannon,
    lfm_loss,
    mean_kl,
)

NAMES = ("audio", "visual")


def random_logits(seed: int, names=NAMES, batch: int = 5, classes: int = 4, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn(batch, classes, generator=g, dtype=torch.float64) for n in names}, torch.randint(
        0, classes, (batch,), generator=g
    )


# ------------------------------------------------------------------ the official code, transcribed
def official_alignment(p, q):
    """Crema_epoch.py, ``Alignment``."""
    p = F.softmax(p, dim=-1)
    q = F.softmax(q, dim=-1)
    m = 0.5 * p + 0.5 * q
    return 0.5 * (F.kl_div(p.log(), m, reduction="batchmean") + F.kl_div(q.log(), m, reduction="batchmean"))


def official_fitted(epoch):
    """Crema_epoch.py, ``getAlpha_Learnable_Fitted``: both weights."""
    coef_alpha1 = [2.04623704e-01, 3.35472727e-03, 1.22989557e-04, -2.92947416e-06, 2.23835486e-08, -5.39717505e-11]
    coef_alpha2 = [7.95376296e-01, -3.35472727e-03, -1.22989557e-04, 2.92947416e-06, -2.23835486e-08, 5.39717505e-11]
    return [sum(c * (epoch**i) for i, c in enumerate(coef_alpha1)), sum(c * (epoch**i) for i, c in enumerate(coef_alpha2))]


def official_loss(o_a, o_v, y, cls_k):
    """Crema_epoch.py, ``train_audio_video``: ``2 * (cls_k[0] * loss_cls + cls_k[1] * loss_alignment)``."""
    loss_cls = nn.CrossEntropyLoss(reduction="none")(0.5 * o_v + 0.5 * o_a, y).mean()
    return 2 * (cls_k[0] * loss_cls + cls_k[1] * official_alignment(o_a, o_v))


def official_learnable_step(epoch, batch, model, alpha, lr_alpha=1e-4):
    """Crema_epoch_learnable.py, ``getAlpha_Learnable`` (the batch already halved, no CUDA)."""
    x, y = batch
    o_a, o_v = model(x)
    loss_alignment = official_alignment(o_a, o_v)
    loss_cls = nn.CrossEntropyLoss(reduction="none")(0.5 * o_v + 0.5 * o_a, y).mean()
    total = alpha[0] * loss_cls + alpha[1] * loss_alignment
    theta_grads = torch.autograd.grad(total, model.parameters(), create_graph=True)
    cls_grads = torch.autograd.grad(loss_cls, model.parameters(), retain_graph=True, create_graph=True)
    hvp = torch.autograd.grad(outputs=theta_grads, inputs=model.parameters(), grad_outputs=cls_grads, retain_graph=True)
    with torch.no_grad():
        alpha_grad = hvp[0].mean().item()
        if epoch % 20 == 0 and epoch != 0:
            lr_alpha = lr_alpha / 2
        alpha[1] -= lr_alpha * alpha_grad
        alpha[1] = max(0.05, min(0.95, alpha[1]))
        alpha[0] = 1.0 - alpha[1]
    return alpha, lr_alpha


class Net(nn.Module):
    """An encoder and a head per modality (the official ``AVClassifier``'s shape); the first parameter an encoder's."""

    def __init__(self, names=NAMES):
        super().__init__()
        self.names = names
        self.encoders = nn.ModuleDict({n: nn.Sequential(nn.Linear(5, 6), nn.Tanh()) for n in names})
        self.heads = nn.ModuleDict({n: nn.Linear(6, 3) for n in names})

    def forward(self, x):
        return {n: self.heads[n](self.encoders[n](x[n])) for n in self.names}


def probe_batch(seed=0, names=NAMES, batch=8):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(batch, 5, generator=g) for n in names}, torch.randint(0, 3, (batch,), generator=g)


@pytest.mark.filterwarnings("ignore:gradmod LFM")
@settings(max_examples=40)
@given(seed=st.integers(0, 10_000), epoch=st.integers(0, 199))
def test_the_loss_and_the_official_term_equal_the_official_code(seed, epoch):
    logits, y = random_logits(seed)
    torch.testing.assert_close(mean_kl(logits), official_alignment(logits["audio"], logits["visual"]))
    method = LFM(NAMES, divergence="mean_kl", clip=False)
    method.start_epoch(epoch)
    torch.testing.assert_close(method.loss(logits, y), official_loss(logits["audio"], logits["visual"], y, official_fitted(epoch)))


def test_the_fitted_schedule_is_the_official_curve_and_clip_caps_it_at_one():
    for epoch in range(200):
        alpha1, alpha2 = official_fitted(epoch)
        assert fitted_classification_weight(epoch, clip=False) == pytest.approx(alpha1, abs=1e-12)
        assert 1.0 - alpha1 == pytest.approx(alpha2, abs=1e-9)
        assert fitted_classification_weight(epoch) == pytest.approx(min(alpha1, 1.0), abs=1e-12)
    assert fitted_classification_weight(0) == pytest.approx(FITTED_COEFFICIENTS[0]) == pytest.approx(0.2046, abs=1e-4)
    above = [e for e in range(200) if fitted_classification_weight(e, clip=False) > 1.0]
    assert above == list(range(177, 189))
    assert fitted_classification_weight(50, epochs=100) == fitted_classification_weight(100)
    with pytest.raises(ValueError, match="beyond the fitted curve"):
        fitted_classification_weight(201)


def test_negative_alignment_weights_are_warned_without_clip_and_absent_with_it():
    logits, y = random_logits(1)
    official = LFM(NAMES, clip=False)
    with pytest.warns(RuntimeWarning, match="α2 = -0.0077 < 0 at epoch 180"):
        official.start_epoch(180)
    clipped = LFM(NAMES)
    clipped.start_epoch(180)
    assert clipped.classification_weight == 1.0 and clipped.alignment_weight == 0.0
    excess = official.classification_weight - 1.0  # the official curve: 2·[(1 + ε)·CE − ε·A]
    ce, divergence = lfm.lfm_terms(logits, y, "js")
    torch.testing.assert_close(official.loss(logits, y) - clipped.loss(logits, y), 2 * excess * (ce - divergence))


# ------------------------------------------------------------------ the divergences
def kl(p, q):
    return (p * (p.log() - q.log())).sum(1).mean()


@settings(max_examples=40)
@given(seed=st.integers(0, 10_000), m=st.integers(2, 4))
def test_js_is_the_jensen_shannon_divergence_and_mean_kl_is_not(seed, m):
    names = tuple(f"m{k}" for k in range(m))
    logits, _ = random_logits(seed, names)
    probs = [torch.softmax(z, 1) for z in logits.values()]
    mixture = sum(probs) / m
    torch.testing.assert_close(jensen_shannon(logits), sum(kl(p, mixture) for p in probs) / m)
    torch.testing.assert_close(mean_kl(logits), sum(kl(mixture, p) for p in probs) / m)
    assert 0 <= jensen_shannon(logits) <= math.log(m) + 1e-12
    reordered = dict(reversed(list(logits.items())))
    torch.testing.assert_close(jensen_shannon(reordered), jensen_shannon(logits))
    torch.testing.assert_close(mean_kl(reordered), mean_kl(logits))


def test_equal_predictions_have_no_divergence_and_far_ones_separate_the_two_terms():
    z = torch.randn(4, 3, dtype=torch.float64)
    assert jensen_shannon([z, z + 1.0]) == pytest.approx(0.0, abs=1e-12) == mean_kl([z, z])
    sure = torch.tensor([[40.0, 0.0, 0.0]], dtype=torch.float64)
    other = torch.tensor([[0.0, 40.0, 0.0]], dtype=torch.float64)
    assert jensen_shannon([sure, other]) == pytest.approx(math.log(2), rel=1e-9)  # bounded by log 2
    assert mean_kl([sure, other]) > 19.0  # ≈ 40/2 − log 2: unbounded
    assert torch.isnan(official_alignment(sure.float() * 3, other.float() * 3))  # softmax(·).log() underflows
    assert torch.isfinite(mean_kl([sure.float() * 3, other.float() * 3]))


def test_lfm_loss_generalises_to_three_modalities_as_the_mean():
    logits, y = random_logits(3, ("a", "b", "c"))
    fused = (logits["a"] + logits["b"] + logits["c"]) / 3
    expected = 2 * (0.3 * F.cross_entropy(fused, y) + 0.7 * jensen_shannon(logits))
    torch.testing.assert_close(lfm_loss(logits, y, 0.3), expected)
    method = LFM(("a", "b", "c"))
    torch.testing.assert_close(method.predict(logits), fused)


# ------------------------------------------------------------------ the learnable schedule
def test_the_hessian_vector_product_is_torch_autograd_functional_hvp():
    torch.manual_seed(0)
    net = Net()
    x, y = probe_batch()
    names = [name for name, _ in net.named_parameters()]
    values = tuple(p.detach() for p in net.parameters())

    def losses(*params):
        logits = functional_call(net, dict(zip(names, params)), (x,))
        return lfm.lfm_terms(logits, y, "js")

    def total(*params):
        ce, a = losses(*params)
        return 0.3 * ce + 0.7 * a

    leaves = [v.clone().requires_grad_() for v in values]
    direction = torch.autograd.grad(losses(*leaves)[0], leaves)
    _, expected = torch.autograd.functional.hvp(total, values, direction)
    mine = hessian_vector_product(net(x), y, list(net.parameters()), 0.3, "js")
    torch.testing.assert_close(mine, expected[0], rtol=1e-4, atol=1e-7)
    assert mine.abs().max() > 1e-4


@pytest.mark.parametrize("rate", [1e-4, 50.0])
def test_the_learnable_schedule_follows_the_official_update_with_its_halving_and_clip(rate):
    """22 epochs on one fixed model (the update depends on the model only): the official α trajectory, its rate
    halved at epoch 20, the clip reached by a large rate."""
    torch.manual_seed(1)
    net = Net()
    x, y = probe_batch(2)

    def two_logits(inputs):
        out = net(inputs)
        return out["audio"], out["visual"]

    official_model = type("Official", (), {"parameters": net.parameters, "__call__": lambda self, inputs: two_logits(inputs)})()
    alpha, lr = [0.05, 0.95], rate
    method = LFM(NAMES, schedule="learnable", probe=lambda: (net(x), y), parameters=net.parameters(),
                 divergence="mean_kl", rate=rate)
    for epoch in range(22):
        alpha, lr = official_learnable_step(epoch, (x, y), official_model, alpha, lr)
        method.start_epoch(epoch)
        assert method.alignment_weight == pytest.approx(alpha[1], abs=1e-9)
        assert method.classification_weight == pytest.approx(alpha[0], abs=1e-9)
        assert method.updates[epoch]["rate"] == pytest.approx(lr, rel=1e-12)
    assert method.updates[19]["rate"] == rate and method.updates[20]["rate"] == rate / 2 and len(method.updates) == 22
    if rate == 50.0:
        assert alpha[1] in (0.05, 0.95)


def test_the_step_clips_to_its_range():
    assert alignment_weight_update(0.5, 1.0, 0.1) == pytest.approx(0.4)
    assert alignment_weight_update(0.5, 100.0, 0.1) == 0.05
    assert alignment_weight_update(0.5, -100.0, 0.1) == 0.95


def test_a_head_tensor_first_gives_an_identically_zero_update_and_a_warning():
    torch.manual_seed(2)
    net = Net()
    x, y = probe_batch(3)
    head_first = [net.heads["audio"].weight, *(p for p in net.parameters() if p is not net.heads["audio"].weight)]
    product = hessian_vector_product(net(x), y, head_first, 0.4, "js")
    largest = product.abs().max().item()
    assert largest > 1e-4
    # zero over the classes, up to float32 rounding of the entries summed (the CPU's order of summation varies)
    torch.testing.assert_close(product.sum(0), torch.zeros(6), atol=1e-5 * largest, rtol=0)
    method = LFM(NAMES, schedule="learnable", probe=lambda: (net(x), y), parameters=head_first)
    with pytest.warns(RuntimeWarning, match="feeds the logits directly"):
        method.start_epoch(0)


def test_learnable_errors_fail_by_name():
    torch.manual_seed(3)
    net = Net()
    x, y = probe_batch()
    with pytest.raises(ValueError, match="needs probe"):
        LFM(NAMES, schedule="learnable")
    with pytest.raises(ValueError, match="for schedule='learnable'"):
        LFM(NAMES, probe=lambda: (net(x), y))
    detached = LFM(NAMES, schedule="learnable", probe=lambda: ({n: z.detach() for n, z in net(x).items()}, y),
                   parameters=net.parameters())
    with pytest.raises(ValueError, match="with grad"):
        detached.start_epoch(0)
    unused = LFM(NAMES, schedule="learnable", probe=lambda: (net(x), y), parameters=[nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="does not depend on the given parameters"):
        unused.start_epoch(0)
    with pytest.raises(ValueError, match="initial_weight must lie in"):
        LFM(NAMES, schedule="learnable", probe=lambda: (net(x), y), parameters=net.parameters(), initial_weight=0.99)


# ------------------------------------------------------------------ errors, state
def test_bad_use_fails_by_name():
    logits, y = random_logits(0)
    method = LFM(NAMES)
    with pytest.raises(RuntimeError, match=r"call method.start_epoch\(epoch\)"):
        method.loss(logits, y)
    method.start_epoch(0)
    with pytest.raises(ValueError, match=r"missing \['visual'\]"):
        method.loss({"audio": logits["audio"]}, y)
    with pytest.raises(ValueError, match=r"\['audio'\] contain NaN"):
        method.loss({**logits, "audio": torch.full((5, 4), math.inf)}, y)
    method.end_epoch(0)
    with pytest.warns(RuntimeWarning, match="the weights of epoch 0 are kept"):
        method.loss(logits, y)
    with pytest.raises(ValueError, match="divergence must be one of"):
        LFM(NAMES, divergence="kl")
    with pytest.raises(ValueError, match="beyond LFM\\(epochs=10\\)"):
        LFM(NAMES, epochs=10).start_epoch(11)


def train(net, method, data, epochs, start=0, opt_state=None, stop_after=None):
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    for epoch in range(start, epochs):
        method.start_epoch(epoch)
        for step, (x, y) in enumerate(data):
            if epoch == start and stop_after is not None and step < stop_after[0]:
                continue
            opt.zero_grad()
            method.loss(net(x), y).backward()
            opt.step()
            if stop_after is not None and (epoch, step) == stop_after[1]:
                return opt
    return opt


def test_exact_resume_of_the_learnable_schedule(tmp_path):
    data = [probe_batch(s) for s in range(3)]
    x, y = probe_batch(9, batch=4)

    def make(net):
        return LFM(NAMES, schedule="learnable", probe=lambda: (net(x), y), parameters=net.parameters(), rate=10.0)

    torch.manual_seed(4)
    net = Net()
    method = make(net)
    train(net, method, data, epochs=3)

    torch.manual_seed(4)
    first = Net()
    first_method = make(first)
    opt = train(first, first_method, data, epochs=3, stop_after=(0, (1, 0)))
    torch.save({"net": first.state_dict(), "opt": opt.state_dict(), "lfm": first_method.state_dict()}, tmp_path / "c.pt")
    saved = torch.load(tmp_path / "c.pt")
    resumed = Net()
    resumed.load_state_dict(saved["net"])
    resumed_method = make(resumed)
    resumed_method.load_state_dict(saved["lfm"])
    train(resumed, resumed_method, data, epochs=3, start=1, opt_state=saved["opt"], stop_after=(1, None))
    for p, q in zip(net.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert resumed_method.updates == method.updates and len(method.updates) == 3
    assert resumed_method.history == method.history and len(method.history) == 9
    with pytest.raises(ValueError, match="newer"):
        make(net).load_state_dict({**saved["lfm"], "version": 99})
    with pytest.raises(ValueError, match="rate=10.0, this LFM has rate=0.0001"):
        LFM(NAMES, schedule="learnable", probe=lambda: (net(x), y), parameters=net.parameters()).load_state_dict(saved["lfm"])
    method.reset()
    assert method.updates == [] and method.history == [] and method.classification_weight == 0.05


def test_the_history_records_the_weights_and_terms_and_the_registry_entry():
    logits, y = random_logits(5)
    method = LFM(NAMES)
    method.start_epoch(0)
    method.loss(logits, y)
    record = method.last
    assert record["weight"]["classification"] == pytest.approx(0.2046237, abs=1e-6)
    assert record["loss"]["alignment"] == pytest.approx(float(jensen_shannon(logits)), rel=1e-6)
    assert set(method.scalars()) >= {"weight/classification", "loss/alignment"}
    assert "classification_weight=0.2046" in repr(method)
    (info,) = lfm.METHODS
    assert info.key == "lfm" and info.preset is LFM and info.kind == "loss" and LFM.loss_inputs == ("unimodal_head_logits", "target")
