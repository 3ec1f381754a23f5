"""MLA (Zhang, Yoon, Bansal & Yao, CVPR 2024): the projector and the fusion as pure functions, the cross-check
with transcriptions of the official code, the seams of the turn loop, resume and two gloo ranks."""

from __future__ import annotations


import copy
import math
import os
import warnings

import hypothesis.strategies as st
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import assume, given, settings
from tiny import batches
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import gradmod
from gradmod.methods.mla import MLA, _span_tolerance, entropy_fusion, entropy_weights, owm_update

F64 = torch.float64


def directions(draw_seed: int, count: int, dim: int) -> torch.Tensor:
    return torch.randn(count, dim, dtype=F64, generator=torch.Generator().manual_seed(draw_seed))


def stored(rows: torch.Tensor, alpha: float) -> torch.Tensor:
    projector = torch.eye(rows.shape[1], dtype=F64)
    for r in rows:
        projector = owm_update(projector, r, alpha)
    return projector


# ------------------------------------------------------------------ 1. the projector
@given(seed=st.integers(0, 2**31), dim=st.integers(2, 7), data=st.data())
def test_with_alpha_zero_the_projector_is_the_orthogonal_projector_onto_the_complement(seed, dim, data):
    count = data.draw(st.integers(1, dim))
    rows = directions(seed, count, dim)
    # each row well outside the span of the rows before it (a row within the span tolerance is not stored)
    _, r = torch.linalg.qr(rows.T)
    assume(bool((r.diagonal() ** 2 > 100 * _span_tolerance(F64) * (rows**2).sum(1)).all()))
    p = stored(rows, 0.0)
    torch.testing.assert_close(p, p.T, rtol=0, atol=1e-12)  # symmetric
    torch.testing.assert_close(p @ p, p, rtol=0, atol=1e-8)  # idempotent
    torch.testing.assert_close(rows @ p, torch.zeros_like(rows), rtol=0, atol=1e-8)  # annihilates what it stored
    q, _ = torch.linalg.qr(rows.T)
    torch.testing.assert_close(p, torch.eye(dim, dtype=F64) - q @ q.T, rtol=0, atol=1e-8)


@given(seed=st.integers(0, 2**31), dim=st.integers(2, 6))
def test_with_alpha_zero_a_direction_already_stored_changes_nothing(seed, dim):
    rows = directions(seed, 2, dim)
    p = stored(rows, 0.0)
    again = owm_update(p, 0.3 * rows[0] - 2.0 * rows[1], 0.0)
    torch.testing.assert_close(again, p, rtol=0, atol=1e-12)
    assert torch.isfinite(again).all()
    axis = torch.eye(dim, dtype=F64)[0]
    once = owm_update(torch.eye(dim, dtype=F64), axis, 0.0)
    assert torch.equal(owm_update(once, axis, 0.0), once)  # P r = 0 exactly: no 0/0


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_with_alpha_zero_a_direction_within_the_span_tolerance_is_not_stored(dtype):
    """r = (1, 1, c) against the stored e₁, e₂: squared residual c² against the tolerance τ·‖r‖² = τ·(2 + c²)."""
    p = stored(torch.eye(3, dtype=F64)[:2], 0.0).to(dtype)
    tolerance = _span_tolerance(dtype)
    inside = torch.tensor([1.0, 1.0, math.sqrt(tolerance)], dtype=dtype)  # c² = τ < τ·(2 + τ)
    assert torch.equal(owm_update(p, inside, 0.0), p)
    outside = torch.tensor([1.0, 1.0, math.sqrt(4 * tolerance)], dtype=dtype)  # c² = 4τ > τ·(2 + 4τ)
    torch.testing.assert_close(owm_update(p, outside, 0.0), torch.zeros(3, 3, dtype=dtype), rtol=0, atol=1e-6)


@given(seed=st.integers(0, 2**31), dim=st.integers(2, 6), count=st.integers(1, 8), alpha=st.floats(1e-3, 10.0))
def test_with_alpha_positive_the_projector_is_the_regularised_inverse_in_any_order(seed, dim, count, alpha):
    rows = directions(seed, count, dim)
    p = stored(rows, alpha)
    closed = torch.linalg.inv(torch.eye(dim, dtype=F64) + rows.T @ rows / alpha)
    torch.testing.assert_close(p, closed, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(stored(rows.flip(0), alpha), p, rtol=1e-8, atol=1e-10)  # order does not matter
    eigenvalues = torch.linalg.eigvalsh(p)
    assert (eigenvalues > 0).all() and (eigenvalues <= 1 + 1e-12).all()
    torch.testing.assert_close(p, p.T, rtol=0, atol=1e-12)


def test_a_single_direction_is_damped_by_alpha_over_alpha_plus_its_squared_norm():
    r = torch.tensor([3.0, 4.0], dtype=F64)
    p = owm_update(torch.eye(2, dtype=F64), r, 0.5)
    torch.testing.assert_close(p @ r, r * 0.5 / (0.5 + 25.0))
    torch.testing.assert_close(p @ torch.tensor([4.0, -3.0], dtype=F64), torch.tensor([4.0, -3.0], dtype=F64))


@pytest.mark.parametrize(
    "projector,direction,alpha,error,message",
    [
        (torch.eye(3), torch.ones(2), 0.1, ValueError, r"direction must be \[d\] = \[3\]"),
        (torch.ones(3, 2), torch.ones(3), 0.1, ValueError, "square floating-point"),
        (torch.eye(3, dtype=torch.int64), torch.ones(3), 0.1, ValueError, "square floating-point"),
        (torch.eye(3), torch.ones(3), -0.1, ValueError, "regularization must be a finite number >= 0"),
        (torch.eye(3), torch.ones(3), True, TypeError, "bool"),
    ],
)
def test_owm_update_names_bad_input(projector, direction, alpha, error, message):
    with pytest.raises(error, match=message):
        owm_update(projector, direction, alpha)


# ------------------------------------------------------------------ 2. test-time fusion
logit_batches = st.tuples(st.integers(0, 2**31), st.integers(1, 6), st.integers(2, 5), st.integers(2, 4))


def random_logits(seed, batch, classes, modalities, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return {f"m{i}": scale * torch.randn(batch, classes, dtype=F64, generator=g) for i in range(modalities)}


@pytest.mark.parametrize("reading", ["sample", "batch"])
@settings(max_examples=25)  # parametrized: 50 examples in all
@given(args=logit_batches)
def test_entropy_weights_are_a_distribution_over_modalities_and_follow_renaming(reading, args):
    logits = random_logits(*args)
    weights = entropy_weights(logits, reading)
    stacked = torch.stack(list(weights.values()))
    assert (stacked >= 0).all()
    torch.testing.assert_close(stacked.sum(0), torch.ones_like(stacked[0]))
    assert stacked.shape[1:] == ((args[1],) if reading == "sample" else ())
    renamed = {f"x{name}": z for name, z in reversed(list(logits.items()))}
    for name, weight in entropy_weights(renamed, reading).items():
        torch.testing.assert_close(weight, weights[name[1:]])


@pytest.mark.parametrize("reading", ["sample", "batch"])
@settings(max_examples=25)  # parametrized: 50 examples in all
@given(args=logit_batches)
def test_identical_predictions_weigh_equally_and_fuse_to_themselves(reading, args):
    z = random_logits(*args[:3], 1)["m0"]
    logits = {f"m{i}": z.clone() for i in range(args[3])}
    for weight in entropy_weights(logits, reading).values():
        torch.testing.assert_close(weight, torch.full_like(weight, 1.0 / args[3]))
    torch.testing.assert_close(entropy_fusion(logits, reading), z)


@pytest.mark.parametrize("reading", ["sample", "batch"])
def test_the_more_certain_modality_weighs_more(reading):
    confident = torch.tensor([[8.0, 0.0, 0.0], [0.0, 8.0, 0.0]])
    undecided = torch.zeros(2, 3)
    weights = entropy_weights({"audio": undecided, "visual": confident}, reading)
    assert (weights["visual"] > weights["audio"]).all()


def test_saturated_probabilities_give_finite_weights():
    """``p = 0`` after softmax underflow: ``p log p = 0``, where the official ``log`` gives NaN."""
    logits = {"audio": torch.tensor([[1000.0, 0.0]]), "visual": torch.tensor([[0.0, 0.0]])}
    for reading in ("sample", "batch"):
        weights = entropy_weights(logits, reading)
        assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.parametrize(
    "logits,reading,message",
    [
        ({"audio": torch.zeros(2, 3)}, "sample", "two or more"),
        ({"audio": torch.zeros(2, 3), "visual": torch.zeros(2, 4)}, "sample", "one shape"),
        ({"audio": torch.zeros(2, 3), "visual": torch.zeros(3)}, "sample", "one shape"),
        ({"audio": torch.zeros(2, 3), "visual": torch.zeros(2, 3)}, "modality", "reading must be one of"),
    ],
)
def test_entropy_weights_name_bad_input(logits, reading, message):
    with pytest.raises(ValueError, match=message):
        entropy_weights(logits, reading)


# ------------------------------------------------------------------ 3. transcriptions of the official code
def official_entropy(output):
    """``calculate_entropy`` of the official ``main.py``: softmax over dim 0 (the batch), one number."""
    probabilities = torch.softmax(output, dim=0)
    return -torch.sum(probabilities * torch.log(probabilities))


def official_gating_weights(*outputs):
    """``calculate_gating_weights`` (two modalities) and ``calculate_gating_weights3`` (three)."""
    entropies = [official_entropy(o) for o in outputs]
    top = max(entropies)
    weights = [torch.exp(top - e) for e in entropies]
    total = sum(weights)
    return [w / total for w in weights]


@pytest.mark.parametrize("modalities", [2, 3])
@settings(max_examples=25)  # parametrized: 50 examples in all
@given(seed=st.integers(0, 2**31))
def test_batch_reading_matches_the_official_gating_weights(modalities, seed):
    logits = random_logits(seed, 8, 6, modalities, scale=2.0)
    expected = official_gating_weights(*logits.values())
    ours = entropy_weights(logits, "batch")
    for name, weight in zip(logits, expected):
        torch.testing.assert_close(ours[name], weight)
    fused = sum(w * z for w, z in zip(expected, logits.values()))  # out = out_a * conf_a + out_v * conf_v (+ ...)
    torch.testing.assert_close(entropy_fusion(logits, "batch"), fused)


def first_commit_update(projector, features, batch_index, batches_per_epoch, inner_product=False):
    """``GSPlugin.before_update`` of the official code's first public commit (the projection it ran then).

    ``alpha = 0.1^(1 + b/B)``, ``r`` the batch mean, ``k = P rᵀ``, ``P ← P − k kᵀ / (α + k r)`` where ``k r`` is
    an outer product (elementwise division), then ``P ← P / ‖P‖_F``. ``inner_product=True`` writes the
    denominator as ``r k`` (a scalar, as orthogonal weight modification has it) and leaves out the rescaling.
    """
    alpha = 1.0 * 0.1 ** (batch_index / batches_per_epoch + 1)
    r = torch.mean(features, 0, True)
    k = torch.mm(projector, torch.t(r))
    if inner_product:
        return projector - torch.mm(k, torch.t(k)) / (alpha + torch.mm(r, k)), alpha
    projector = projector - torch.mm(k, torch.t(k)) / (alpha + torch.mm(k, r))
    return projector / torch.norm(projector, p="fro"), alpha


@given(seed=st.integers(0, 2**31), dim=st.integers(2, 8), steps=st.integers(1, 6))
def test_owm_update_is_the_authors_update_with_its_inner_product(seed, dim, steps):
    g = torch.Generator().manual_seed(seed)
    theirs = ours = torch.eye(dim, dtype=F64)
    for b in range(steps):
        features = torch.randn(16, dim, dtype=F64, generator=g)
        theirs, alpha = first_commit_update(theirs, features, b, steps, inner_product=True)
        ours = owm_update(ours, features.mean(0), alpha)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)


def test_the_authors_first_commit_collapses_onto_the_mean_feature_where_owm_removes_it():
    """Non-negative (ReLU) features: the outer-product denominator leaves a rank-1 P along the mean feature,
    so the head gradient keeps mainly that direction; the OWM projector removes it."""
    g = torch.Generator().manual_seed(0)
    dim, theirs, ours, means = 16, torch.eye(16, dtype=F64), torch.eye(16, dtype=F64), []
    for b in range(20):
        features = torch.relu(0.5 + 0.3 * torch.randn(64, dim, dtype=F64, generator=g))
        theirs, alpha = first_commit_update(theirs, features, b, 20)
        ours = owm_update(ours, features.mean(0), alpha)
        means.append(features.mean(0))
    mean = torch.stack(means).mean(0)
    mean = mean / mean.norm()
    u, s, _ = torch.linalg.svd(theirs)
    assert s[0] ** 2 / (s**2).sum() > 0.99 and abs(u[:, 0] @ mean) > 0.95
    assert (ours @ mean).norm() < 0.01  # damped by about α/(α + n‖r‖²)


class Turns(nn.Module):
    """Two or three small encoders with one output width, a shared linear head."""

    def __init__(self, names=("audio", "visual"), in_dim=6, width=8, classes=4):
        super().__init__()
        self.names = tuple(names)
        self.encoders = nn.ModuleDict({n: nn.Sequential(nn.Linear(in_dim, width), nn.ReLU()) for n in names})
        self.head = nn.Linear(width, classes)

    def forward(self, x, name):
        features = self.encoders[name](x)
        return self.head(features), features


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)


def train_mla(model, mla, optimizer, data):
    """The documented loop: one forward of every encoder, then one step per modality."""
    for inputs, y in data:
        features = {n: model.encoders[n](inputs[n]) for n in mla.names}
        for name in mla.names:
            optimizer.zero_grad()
            mla.observe(name, features[name])
            nn.functional.cross_entropy(model.head(features[name]), y).backward()
            optimizer.step()


def make_mla(model, **options):
    return MLA({n: model.encoders[n] for n in model.names}, model.head, **options)


def test_without_projection_mla_trains_exactly_as_the_official_loop():
    """``train_epoch(gs_flag=True)``: per batch, audio then visual through the shared head, one step each; its
    projection hook never matches an ``nn.Linear`` weight's name, so no gradient is changed."""
    torch.manual_seed(0)
    ours = Turns()
    theirs = copy.deepcopy(ours)
    data = batches(4)
    optimizer = sgd(ours)
    mla = make_mla(ours, projection=None)
    mla.attach(optimizer)
    train_mla(ours, mla, optimizer, data)

    official_optimizer = sgd(theirs)
    for inputs, label in data:
        official_optimizer.zero_grad()
        a, v = theirs.encoders["audio"](inputs["audio"]), theirs.encoders["visual"](inputs["visual"])
        nn.functional.cross_entropy(theirs.head(a), label).backward()
        official_optimizer.step()
        official_optimizer.zero_grad()
        nn.functional.cross_entropy(theirs.head(v), label).backward()
        official_optimizer.step()
        official_optimizer.zero_grad()
        for p in theirs.parameters():
            p.grad = None
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.equal(p, q), name
    assert mla.step_count == 8 and mla.projector is None and all(math.isnan(k) for k in mla.last["kept"].values())


# ------------------------------------------------------------------ 4. the turn loop
def test_each_step_projects_with_the_earlier_directions_then_stores_its_own():
    torch.manual_seed(0)
    model = Turns()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    mla = make_mla(model, regularization=0.05)
    mla.attach(optimizer)
    (inputs, y), = batches(1)
    features = {n: model.encoders[n](inputs[n]) for n in mla.names}
    expected_projector = torch.eye(8, dtype=F64)
    for turn, name in enumerate(mla.names):
        optimizer.zero_grad()
        mla.observe(name, features[name])
        nn.functional.cross_entropy(model.head(features[name]), y).backward()
        plain = model.head.weight.grad.clone()
        before = mla.projector.clone()
        torch.testing.assert_close(before, expected_projector)
        mla.step()  # what the hook does; optimizer.step() below runs it again only when attached
        projected = model.head.weight.grad.clone()
        torch.testing.assert_close(projected, (plain.double() @ before).float())
        expected_projector = owm_update(before, features[name].detach().double().mean(0), 0.05)
        torch.testing.assert_close(mla.projector, expected_projector)
        assert mla.last["modality"] == name and mla.last["step"] == turn
        assert mla.last["kept"][name] == pytest.approx((projected.norm() / plain.norm()).item(), rel=1e-5)
    assert mla.step_count == 2
    assert mla.last["kept"]["visual"] < 1.0  # the visual step lost the audio direction's share


def test_attached_optimizer_steps_run_the_projection():
    torch.manual_seed(0)
    model = Turns()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    mla = make_mla(model)
    mla.attach(optimizer)
    train_mla(model, mla, optimizer, batches(2))
    assert mla.step_count == 4 and [mla.last["step"], mla.last["modality"]] == [3, "visual"]
    assert not torch.equal(mla.projector, torch.eye(8, dtype=F64))
    mla.detach()
    train_mla(model, mla, optimizer, batches(1))  # detached: nothing checks or counts the steps
    assert mla.step_count == 4


def test_three_modalities_take_turns():
    torch.manual_seed(0)
    names = ("audio", "visual", "text")
    model = Turns(names)
    optimizer = sgd(model)
    mla = make_mla(model)
    mla.attach(optimizer)
    train_mla(model, mla, optimizer, batches(2, names=names))
    assert mla.step_count == 6 and mla.last["modality"] == "text"
    with torch.no_grad():
        inputs, _ = batches(1, names=names, seed=3)[0]
        features = {n: model.encoders[n](inputs[n]) for n in names}
        fused = mla.fused_logits(features)
        torch.testing.assert_close(fused, entropy_fusion({n: model.head(features[n]) for n in names}))


def test_micro_batches_of_one_turn_add_up_to_one_direction():
    torch.manual_seed(0)
    model = Turns()
    mla = make_mla(model, regularization=0.1)
    parts = [model.encoders["audio"](inputs["audio"]) for inputs, _ in batches(2)]
    for part, (_, y) in zip(parts, batches(2)):
        mla.observe("audio", part)
        nn.functional.cross_entropy(model.head(part), y).backward()
    mla.step()
    expected = owm_update(torch.eye(8, dtype=F64), torch.cat(parts).detach().double().mean(0), 0.1)
    torch.testing.assert_close(mla.projector, expected)


def one_turn(model, mla, name, loss_from=None, y=None):
    (inputs, target), = batches(1)
    features = {n: model.encoders[n](inputs[n]) for n in model.names}
    mla.observe(name, features[name])
    logits = model.head(features[loss_from or name])
    nn.functional.cross_entropy(logits, target if y is None else y).backward()
    return features


def test_a_step_without_observe_is_an_error():
    model = Turns()
    mla = make_mla(model)
    with pytest.raises(RuntimeError, match=r"without observe\(name, features\)"):
        mla.step()


def test_a_second_modality_before_the_step_is_an_error():
    model = Turns()
    mla = make_mla(model)
    one_turn(model, mla, "audio")
    with pytest.raises(ValueError, match=r"observe\('visual'\) during modality 'audio''s turn"):
        mla.observe("visual", torch.zeros(4, 8))


def test_a_backward_pass_reaching_another_encoder_is_an_error():
    model = Turns()
    mla = make_mla(model)
    one_turn(model, mla, "audio", loss_from="visual")
    with pytest.raises(RuntimeError, match=r"during modality 'audio''s turn reached the encoder of \['visual'\]"):
        mla.step()


def test_a_turn_whose_encoder_got_no_gradient_is_an_error():
    model = Turns()
    mla = make_mla(model)
    (inputs, y), = batches(1)
    features = model.encoders["audio"](inputs["audio"]).detach()
    mla.observe("audio", features)
    nn.functional.cross_entropy(model.head(features), y).backward()
    with pytest.raises(RuntimeError, match="no backward pass reached modality 'audio'"):
        mla.step()


def test_a_loss_that_bypasses_the_head_is_an_error():
    model = Turns()
    mla = make_mla(model)
    (inputs, _), = batches(1)
    features = model.encoders["audio"](inputs["audio"])
    mla.observe("audio", features)
    features.sum().backward()
    with pytest.raises(RuntimeError, match="shared head's weight has no gradient"):
        mla.step()


def test_zero_filled_gradients_of_the_other_encoder_warn_once():
    torch.manual_seed(0)
    model = Turns()
    optimizer = sgd(model)
    mla = make_mla(model)
    mla.attach(optimizer)
    (inputs, y), = batches(1)

    def zero_filled_turn(name):
        optimizer.zero_grad(set_to_none=False)
        features = model.encoders[name](inputs[name])
        mla.observe(name, features)
        nn.functional.cross_entropy(model.head(features), y).backward()
        optimizer.step()

    zero_filled_turn("audio")
    with pytest.warns(RuntimeWarning, match=r"modalities \['audio'\] hold gradients during 'visual''s turn"):
        zero_filled_turn("visual")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_mla(model, mla, optimizer, batches(1))  # zero_grad() sets None: silent


@pytest.mark.parametrize("fused", [False, True])
def test_a_step_skipped_by_grad_scaler_stores_nothing_and_the_next_turn_starts_clean(fused):
    torch.manual_seed(0)
    model = Turns()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused)
    mla = make_mla(model)
    mla.attach(optimizer)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    (inputs, y), = batches(1)
    features = {n: model.encoders[n](inputs[n]) for n in mla.names}
    for name, factor in (("audio", float("inf")), ("visual", 1.0)):
        optimizer.zero_grad()
        mla.observe(name, features[name])
        scaler.scale(nn.functional.cross_entropy(model.head(features[name]), y) * factor).backward()
        scaler.step(optimizer)
        scaler.update()
        if name == "audio":
            assert mla.step_count == 0 and torch.equal(mla.projector, torch.eye(8, dtype=F64))
    assert mla.step_count == 1 and mla.last["modality"] == "visual"
    torch.testing.assert_close(mla.projector, owm_update(torch.eye(8, dtype=F64), features["visual"].detach().double().mean(0), 0.1))


def test_attach_checks_and_closures():
    model = Turns()
    mla = make_mla(model)
    with pytest.raises(ValueError, match="does not hold the shared head's weight"):
        mla.attach(torch.optim.SGD(model.encoders.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="holds none of modality 'visual'"):
        mla.attach(torch.optim.SGD([*model.head.parameters(), *model.encoders["audio"].parameters()], lr=0.1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = mla.attach(optimizer)
    with pytest.raises(ValueError, match="already attached"):
        mla.attach(optimizer)
    handle.remove()
    mla.attach(optimizer)  # the removed handle frees it
    one_turn(model, mla, "audio")
    with pytest.raises(RuntimeError, match="closure"):
        optimizer.step(lambda: None)
    assert mla.step_count == 0


@pytest.mark.parametrize(
    "build,error,message",
    [
        (lambda m: MLA({"audio": m.encoders["audio"]}, m.head), ValueError, "two or more"),
        (lambda m: MLA(dict(m.encoders), m.head, projection="exact"), ValueError, "projection must be one of"),
        (lambda m: MLA(dict(m.encoders), nn.Sequential(m.head)), TypeError, "must be an nn.Linear"),
        (lambda m: MLA(dict(m.encoders), m.head, regularization=-1.0), ValueError, "regularization must be"),
        (lambda m: MLA({"audio": m.encoders["audio"], "visual": m.head}, m.head), ValueError, "must not be part of an encoder"),
    ],
)
def test_bad_construction_fails_by_name(build, error, message):
    with pytest.raises(error, match=message):
        build(Turns())


def test_bad_observations_fail_by_name():
    model = Turns()
    mla = make_mla(model)
    with pytest.raises(ValueError, match="unknown modality 'text'"):
        mla.observe("text", torch.zeros(4, 8))
    with pytest.raises(ValueError, match="width 5, the head takes 8"):
        mla.observe("audio", torch.zeros(4, 5))
    with pytest.raises(ValueError, match=r"non-empty \[batch, width\]"):
        mla.observe("audio", torch.zeros(0, 8))
    with pytest.raises(TypeError, match="must be a mapping"):
        mla.fused_logits(torch.zeros(4, 8))


def test_projection_none_takes_any_head():
    torch.manual_seed(0)
    model = Turns()
    model.head = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    optimizer = sgd(model)
    mla = make_mla(model, projection=None)
    mla.attach(optimizer)
    train_mla(model, mla, optimizer, batches(1))
    assert mla.step_count == 2


# ------------------------------------------------------------------ 5. resume
def test_resume_follows_the_same_trajectory():
    torch.manual_seed(0)
    data = batches(5, seed=2)
    model = Turns()
    initial = copy.deepcopy(model.state_dict())
    optimizer = sgd(model)
    mla = make_mla(model)
    mla.attach(optimizer)
    train_mla(model, mla, optimizer, data)

    model2 = Turns()
    model2.load_state_dict(initial)
    optimizer2 = sgd(model2)
    mla2 = make_mla(model2)
    mla2.attach(optimizer2)
    train_mla(model2, mla2, optimizer2, data[:3])
    saved = copy.deepcopy({"model": model2.state_dict(), "optimizer": optimizer2.state_dict(), "mla": mla2.state_dict()})

    model3 = Turns()
    model3.load_state_dict(saved["model"])
    optimizer3 = sgd(model3)
    optimizer3.load_state_dict(saved["optimizer"])
    mla3 = make_mla(model3)
    mla3.load_state_dict(saved["mla"])
    mla3.attach(optimizer3)
    train_mla(model3, mla3, optimizer3, data[3:])
    assert mla3.step_count == mla.step_count == 10
    assert torch.equal(mla3.projector, mla.projector)
    for p, q in zip(model3.parameters(), model.parameters()):
        assert torch.equal(p, q)


def test_a_state_of_another_configuration_is_refused_by_name():
    model = Turns()
    state = make_mla(model).state_dict()
    with pytest.raises(ValueError, match="regularization=0.1, this MLA has regularization=0.5"):
        make_mla(model, regularization=0.5).load_state_dict(state)
    with pytest.raises(ValueError, match="projection='owm', this MLA has projection=None"):
        make_mla(model, projection=None).load_state_dict(state)
    with pytest.raises(ValueError, match="version 0"):
        make_mla(model).load_state_dict({**state, "version": 0})


# ------------------------------------------------------------------ 6. two gloo ranks
DDP_STEPS = 3


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = Turns()
    ddp = DistributedDataParallel(model, find_unused_parameters=True)  # a turn uses one encoder
    optimizer = sgd(model)
    mla = make_mla(model)
    mla.attach(optimizer)
    for inputs, y in batches(DDP_STEPS):
        half = y.shape[0] // world
        part = slice(rank * half, (rank + 1) * half)
        for name in mla.names:
            optimizer.zero_grad()
            logits, features = ddp(inputs[name][part], name)
            mla.observe(name, features)
            nn.functional.cross_entropy(logits, y[part]).backward()
            optimizer.step()
    torch.save({"projector": mla.projector, "params": [p.detach() for p in model.parameters()]}, os.path.join(out_dir, f"mla{rank}.pt"))
    del ddp  # its reducer goes before the group it holds, not at interpreter exit
    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()


@pytest.mark.distributed
def test_two_gloo_ranks_hold_one_projector_equal_to_a_single_process_run(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"mla{r}.pt") for r in (0, 1))
    assert torch.equal(r0["projector"], r1["projector"])
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)

    torch.manual_seed(0)
    model = Turns()
    optimizer = sgd(model)
    mla = make_mla(model)
    mla.attach(optimizer)
    train_mla(model, mla, optimizer, batches(DDP_STEPS))
    torch.testing.assert_close(r0["projector"], mla.projector, rtol=1e-6, atol=1e-9)
    for a, b in zip(r0["params"], model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


def test_the_registry_names_mla():
    info = gradmod.METHODS["mla"]
    assert info.preset is MLA and info.kind == "turns" and gradmod.MLA is MLA
