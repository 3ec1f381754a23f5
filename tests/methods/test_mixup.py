"""Tests of gradmod.methods.mixup: MM (Ma, Ding & Chen, 2025, eq. (3)), B-MM (eqs. (5)–(8)), its stable estimate of the
unimodal accuracies and the soft cross-entropy."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from gradmod.methods.mixup import (
    BalancedMixup,
    MultimodalMixup,
    bmm_strength,
    imbalance_factor,
    smoothed_accuracy,
    soft_cross_entropy,
)

FAST = settings(max_examples=25, deadline=None)
ACCURACY = st.floats(min_value=0.05, max_value=1.0)


def tagged(batch: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random ``[batch, *shape]`` input whose first ``batch`` flattened entries per sample are ``eye(batch)``.

    After a mix ``(1 − w)·x + w·x[π]`` these entries reveal ``π`` and ``w`` (see :func:`recover`).
    """
    x = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x.view(batch, -1)[:, :batch] = torch.eye(batch, dtype=torch.float64)
    return x


def recover(mixed: torch.Tensor) -> tuple[torch.Tensor, float | None]:
    """The partner ``π`` and partner weight ``w`` of a mix of a :func:`tagged` input (``w`` None if π = id)."""
    batch = mixed.shape[0]
    tags = mixed.reshape(batch, -1)[:, :batch]
    own = tags.diagonal()
    others = tags - torch.diag(own)
    partner = torch.where(own > 1 - 1e-12, torch.arange(batch), others.argmax(dim=1))
    moved = partner != torch.arange(batch)
    weight = float(1 - own[moved][0]) if moved.any() else None
    return partner, weight


def assert_mixed(original: torch.Tensor, mixed: torch.Tensor, partner: torch.Tensor, weight: float | None) -> None:
    """Every element of the mix lies between the pair's values and equals the convex combination."""
    pair_min = torch.minimum(original, original[partner])
    pair_max = torch.maximum(original, original[partner])
    assert torch.all(mixed >= pair_min - 1e-12) and torch.all(mixed <= pair_max + 1e-12)
    if weight is not None:
        torch.testing.assert_close(mixed, (1 - weight) * original + weight * original[partner])


def assert_distributions(soft: torch.Tensor, num_classes: int) -> None:
    assert soft.shape[1] == num_classes
    assert torch.all(soft >= 0)
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(soft.shape[0]))


def trained(bmm: BalancedMixup, accuracy: dict[str, float], epochs: int) -> BalancedMixup:
    for _ in range(epochs):
        bmm.update(accuracy)
    return bmm


# ---------------------------------------------------------------- soft cross-entropy


@FAST
@given(batch=st.integers(1, 6), classes=st.integers(2, 7), seed=st.integers(0, 2**16),
       reduction=st.sampled_from(["mean", "sum", "none"]))
def test_soft_cross_entropy_equals_cross_entropy_on_one_hot(batch, classes, seed, reduction):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, generator=g, dtype=torch.float64) * 5
    target = torch.randint(0, classes, (batch,), generator=g)
    soft = F.one_hot(target, classes).double()
    torch.testing.assert_close(
        soft_cross_entropy(logits, soft, reduction), F.cross_entropy(logits, target, reduction=reduction)
    )


@FAST
@given(batch=st.integers(1, 6), classes=st.integers(2, 7), seed=st.integers(0, 2**16))
def test_soft_cross_entropy_is_expected_negative_log_likelihood(batch, classes, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, generator=g, dtype=torch.float64)
    soft = torch.softmax(torch.randn(batch, classes, generator=g, dtype=torch.float64), dim=1)
    per_sample = soft_cross_entropy(logits, soft, "none")
    expected = -(soft * torch.log_softmax(logits, dim=1)).sum(dim=1)
    torch.testing.assert_close(per_sample, expected)
    torch.testing.assert_close(soft_cross_entropy(logits, soft), expected.mean())
    # Gibbs: the loss is smallest when the prediction is the target distribution itself.
    assert torch.all(soft_cross_entropy(soft.log(), soft, "none") <= per_sample + 1e-12)


def test_soft_cross_entropy_gradient_flows_and_matches_float32_logits():
    logits = torch.randn(4, 3, requires_grad=True)
    soft = torch.full((4, 3), 1 / 3, dtype=torch.float64)
    loss = soft_cross_entropy(logits, soft)
    loss.backward()
    assert loss.dtype == torch.float32 and logits.grad is not None
    torch.testing.assert_close(logits.grad.sum(dim=1), torch.zeros(4))


@pytest.mark.parametrize(
    ("logits", "soft", "reduction", "message"),
    [
        (torch.zeros(2, 3), torch.full((2, 3), 1 / 3), "avg", "reduction"),
        (torch.zeros(3), torch.full((3,), 1 / 3), "mean", "logits must be"),
        (torch.zeros(2, 3), torch.full((2, 4), 1 / 4), "mean", "shape"),
        (torch.zeros(2, 3), torch.tensor([[1.5, -0.5, 0.0], [1.0, 0.0, 0.0]]), "mean", "negative"),
        (torch.zeros(2, 3), torch.tensor([[0.5, 0.0, 0.0], [1.0, 0.0, 0.0]]), "mean", "sum to 1"),
        (torch.tensor([[math.nan, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]]), "mean", "non-finite"),
        (torch.zeros(1, 3), torch.tensor([[1, 0, 0]]), "mean", "floating point"),
    ],
)
def test_soft_cross_entropy_rejects_bad_input(logits, soft, reduction, message):
    with pytest.raises(ValueError, match=message):
        soft_cross_entropy(logits, soft, reduction)


# ---------------------------------------------------------------- MM


def test_mm_alpha_zero_is_erm_identity():
    features = torch.randn(5, 4)
    target = torch.tensor([0, 2, 1, 2, 0])
    generator = torch.Generator().manual_seed(3)
    before = generator.get_state()
    mixed, soft = MultimodalMixup(0.0, generator)(features, target, num_classes=3)
    assert mixed is features
    torch.testing.assert_close(soft, F.one_hot(target, 3).float())
    assert torch.equal(generator.get_state(), before)  # no random number drawn


@FAST
@given(alpha=st.floats(0.05, 8.0), batch=st.integers(1, 8), classes=st.integers(2, 6), seed=st.integers(0, 2**16))
def test_mm_mixes_features_and_labels_by_the_same_convex_combination(alpha, batch, classes, seed):
    features = tagged(batch, (batch + 3,), seed)
    target = torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(seed))
    mixed, soft = MultimodalMixup(alpha, torch.Generator().manual_seed(seed))(features, target, classes)
    assert mixed.shape == features.shape
    assert_distributions(soft, classes)
    partner, weight = recover(mixed)
    assert sorted(partner.tolist()) == list(range(batch))  # a permutation of the batch
    assert_mixed(features, mixed, partner, weight)
    one_hot = F.one_hot(target, classes).float()
    expected_soft = one_hot if weight is None else (1 - weight) * one_hot + weight * one_hot[partner]
    torch.testing.assert_close(soft, expected_soft)


def test_mm_small_alpha_tends_to_erm_on_pairs():
    """α → 0: Beta(α, α) concentrates on {0, 1}, so every virtual pair is (nearly) a real pair."""
    batch, classes = 6, 4
    features = tagged(batch, (batch + 2,))
    target = torch.tensor([0, 1, 2, 3, 0, 1])
    mm = MultimodalMixup(1e-4, torch.Generator().manual_seed(0))
    for _ in range(20):
        mixed, soft = mm(features, target, classes)
        nearest = recover(mixed)[0]
        tags = mixed[:, :batch]
        source = tags.argmax(dim=1)
        assert torch.allclose(mixed, features[source], atol=1e-2)
        assert torch.allclose(soft, F.one_hot(target[source], classes).float(), atol=1e-2)
        assert sorted(nearest.tolist()) == list(range(batch))


def test_mm_mixes_the_batch_dimension_of_any_shape_and_keeps_dtype():
    features = torch.randn(4, 2, 3, 5, dtype=torch.float16)
    mixed, soft = MultimodalMixup(1.0, torch.Generator().manual_seed(1))(features, torch.tensor([0, 1, 1, 0]), 2)
    assert mixed.shape == features.shape and mixed.dtype == torch.float16
    assert soft.dtype == torch.float32
    assert_distributions(soft, 2)


def test_mm_is_reproducible_for_a_seed_and_after_state_dict_round_trip():
    features, target = torch.randn(8, 5), torch.arange(8) % 3
    first = MultimodalMixup(0.4, torch.Generator().manual_seed(11))
    second = MultimodalMixup(0.4, torch.Generator().manual_seed(11))
    for _ in range(3):
        a, b = first(features, target, 3), second(features, target, 3)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    expected = [first(features, target, 3) for _ in range(3)]
    resumed = MultimodalMixup(0.4, torch.Generator().manual_seed(99))
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))
    for want in expected:
        got = resumed(features, target, 3)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_mm_without_generator_follows_torch_manual_seed():
    features, target = torch.randn(6, 3), torch.arange(6) % 2
    torch.manual_seed(5)
    first = MultimodalMixup(1.0)(features, target, 2)
    torch.manual_seed(5)
    second = MultimodalMixup(1.0)(features, target, 2)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: MultimodalMixup(-0.1), "concentration"),
        (lambda: MultimodalMixup(math.nan), "concentration"),
        (lambda: MultimodalMixup(1.0, generator=0), "generator"),
        (lambda: MultimodalMixup(1.0)(torch.zeros(3, 2), torch.tensor([0, 1, 2]), 2), r"outside \[0, 2\)"),
        (lambda: MultimodalMixup(1.0)(torch.zeros(3, 2), torch.tensor([0, -1, 1]), 2), "outside"),
        (lambda: MultimodalMixup(1.0)(torch.zeros(3, 2), torch.tensor([0, 1]), 2), "batch"),
        (lambda: MultimodalMixup(1.0)(torch.zeros(2, 2), torch.tensor([0.0, 1.0]), 2), "integer"),
        (lambda: MultimodalMixup(1.0)(torch.zeros(2, 2, dtype=torch.long), torch.tensor([0, 1]), 2), "floating"),
        (lambda: MultimodalMixup(1.0)(torch.zeros(0, 2), torch.tensor([], dtype=torch.long), 2), "non-empty"),
        (lambda: MultimodalMixup(1.0)(torch.zeros(2, 2), torch.tensor([0, 1]), 0), "num_classes"),
        (lambda: MultimodalMixup(0.5).load_state_dict(MultimodalMixup(0.2).state_dict()), "concentration"),
    ],
)
def test_mm_rejects_bad_input(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ---------------------------------------------------------------- B-MM


def test_bmm_passes_through_during_warm_up_then_mixes():
    inputs = {"audio": torch.randn(6, 1, 8, 5), "visual": tagged(6, (3, 2, 4, 4))}
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    bmm = BalancedMixup(["audio", "visual"], num_classes=3, degree=1.0, warmup_epochs=2, seed=0)
    imbalanced = {"audio": 0.9, "visual": 0.3}
    for epoch in range(2):  # epochs 0 and 1 are warm-up: nothing is mixed
        out, soft = bmm(inputs, target)
        assert bmm.strength == 0.0
        assert out["audio"] is inputs["audio"] and out["visual"] is inputs["visual"]
        torch.testing.assert_close(soft, F.one_hot(target, 3).float())
        bmm.update(imbalanced)
        assert bmm.epochs_seen == epoch + 1
        assert bmm.weak_modalities == ("visual",)  # κ is measured during warm-up too
    out, _ = bmm(inputs, target)  # epoch 2 follows the 2nd update: mixing is on
    assert bmm.strength == pytest.approx(math.tanh(1.0 * (3.0 - 1.0)))
    assert not torch.equal(out["visual"], inputs["visual"])


def test_bmm_warmup_zero_and_one_coincide_and_epoch_zero_never_mixes():
    for warmup in (0, 1):
        bmm = BalancedMixup(["a", "v"], 2, degree=2.0, warmup_epochs=warmup, seed=0)
        assert bmm.strength == 0.0 and bmm.kappa == {} and bmm.weak_modalities == ()
        bmm.update({"a": 0.8, "v": 0.4})
        assert bmm.strength > 0.0


@FAST
@given(accuracy=ACCURACY, modalities=st.integers(2, 4), degree=st.floats(0.0, 5.0), warmup=st.integers(0, 3))
def test_bmm_balanced_is_identity(accuracy, modalities, degree, warmup):
    names = [f"m{i}" for i in range(modalities)]
    bmm = trained(BalancedMixup(names, 3, degree, warmup, seed=1), {n: accuracy for n in names}, warmup + 1)
    inputs = {n: torch.randn(4, 2) for n in names}
    target = torch.tensor([0, 1, 2, 1])
    out, soft = bmm(inputs, target)
    assert bmm.strength == 0.0 and bmm.weak_modalities == ()
    assert all(out[n] is inputs[n] for n in names)
    torch.testing.assert_close(soft, F.one_hot(target, 3).float())


@FAST
@given(strong=ACCURACY, weak=ACCURACY, degree=st.floats(0.05, 3.0), batch=st.integers(2, 8), seed=st.integers(0, 2**16))
def test_bmm_mixes_only_the_weak_modality_with_eq8(strong, weak, degree, batch, seed):
    strong, weak = max(strong, weak), min(strong, weak)
    bmm = trained(BalancedMixup(["audio", "visual"], 4, degree, 1, seed=seed), {"audio": strong, "visual": weak}, 1)
    audio, visual = torch.randn(batch, 3, 5, dtype=torch.float64), tagged(batch, (batch + 1,), seed)
    target = torch.randint(0, 4, (batch,), generator=torch.Generator().manual_seed(seed))
    out, soft = bmm({"audio": audio, "visual": visual}, target)
    assert out["audio"] is audio  # the strong modality is never touched
    assert_distributions(soft, 4)
    if strong == weak:
        assert bmm.strength == 0.0 and out["visual"] is visual
        return
    assert bmm.weak_modalities == ("visual",)
    strength = bmm_strength(imbalance_factor({"audio": strong, "visual": weak})["audio"], degree)
    assert bmm.strength == strength
    partner, weight = recover(out["visual"])
    assert sorted(partner.tolist()) == list(range(batch))
    assert_mixed(visual, out["visual"], partner, weight)
    if weight is not None:
        assert weight == pytest.approx(strength, abs=1e-12)
    one_hot = F.one_hot(target, 4).float()
    torch.testing.assert_close(soft, (1 - strength) * one_hot + strength * one_hot[partner])


@FAST
@given(weak=st.floats(0.05, 0.5), gap_small=st.floats(0.0, 0.5), gap_extra=st.floats(0.0, 0.5),
       degree=st.floats(0.0, 3.0), extra_degree=st.floats(0.0, 3.0))
def test_bmm_strength_is_monotone_in_imbalance_and_degree_and_in_unit_interval(
    weak, gap_small, gap_extra, degree, extra_degree
):
    def strength(gap: float, beta: float) -> float:
        return trained(BalancedMixup(["a", "v"], 2, beta, 0), {"a": weak + gap, "v": weak}, 1).strength

    less, more = strength(gap_small, degree), strength(gap_small + gap_extra, degree)
    assert 0.0 <= less <= more <= 1.0
    if degree * (gap_small + gap_extra) / weak < 15:  # tanh is below 1 until float64 rounds it to 1
        assert more < 1.0
    assert strength(gap_small, degree) <= strength(gap_small, degree + extra_degree)
    if gap_small > 1e-3 and degree > 1e-3:
        assert less > 0.0


@FAST
@given(high=ACCURACY, low=ACCURACY, seed=st.integers(0, 2**16))
def test_bmm_swapping_modality_names_swaps_the_mixed_one(high, low, seed):
    x, y = torch.randn(5, 4), torch.randn(5, 2, 3)
    target = torch.tensor([0, 1, 2, 0, 1])
    first = trained(BalancedMixup(["audio", "visual"], 3, 1.0, 0, seed=seed), {"audio": high, "visual": low}, 1)
    second = trained(BalancedMixup(["audio", "visual"], 3, 1.0, 0, seed=seed), {"audio": low, "visual": high}, 1)
    out_first, soft_first = first({"audio": x, "visual": y}, target)
    out_second, soft_second = second({"audio": y, "visual": x}, target)
    assert torch.equal(out_first["audio"], out_second["visual"])
    assert torch.equal(out_first["visual"], out_second["audio"])
    assert torch.equal(soft_first, soft_second)
    assert first.kappa == {"audio": second.kappa["visual"], "visual": second.kappa["audio"]}


def test_bmm_three_modalities_mixes_every_modality_below_the_mean_of_the_others():
    accuracy = {"rgb": 0.9, "flow": 0.85, "audio": 0.2}  # κ_flow = 0.85 / 0.55 > 1: flow counts as strong
    bmm = trained(BalancedMixup(["rgb", "flow", "audio"], 3, 1.0, 0, seed=2), accuracy, 1)
    assert bmm.weak_modalities == ("audio",)
    assert bmm.strength == bmm_strength(max(imbalance_factor(accuracy).values()), 1.0)

    accuracy = {"rgb": 0.9, "flow": 0.5, "audio": 0.6}
    bmm = trained(BalancedMixup(["rgb", "flow", "audio"], 3, 1.0, 0, seed=2), accuracy, 1)
    assert bmm.weak_modalities == ("flow", "audio")
    inputs = {"rgb": torch.randn(6, 4), "flow": tagged(6, (7,), 1), "audio": tagged(6, (2, 5), 2)}
    out, soft = bmm(inputs, torch.arange(6) % 3)
    assert out["rgb"] is inputs["rgb"]
    flow_partner, flow_weight = recover(out["flow"])
    audio_partner, audio_weight = recover(out["audio"])
    assert torch.equal(flow_partner, audio_partner) and flow_weight == pytest.approx(audio_weight)
    assert_distributions(soft, 3)


def test_bmm_infinite_imbalance_replaces_the_weak_input_and_degree_zero_never_mixes():
    inputs = {"a": torch.randn(4, 3), "v": torch.randn(4, 3)}
    target = torch.tensor([0, 1, 0, 1])
    off = trained(BalancedMixup(["a", "v"], 2, 0.0, 0, seed=0), {"a": 0.5, "v": 0.0}, 1)
    out, soft = off(inputs, target)
    assert off.strength == 0.0 and out["v"] is inputs["v"]
    full = trained(BalancedMixup(["a", "v"], 2, 1.0, 0, seed=0), {"a": 0.5, "v": 0.0}, 1)
    assert full.kappa == {"a": math.inf, "v": 0.0} and full.strength == 1.0
    out, soft = full(inputs, target)
    assert torch.isfinite(out["v"]).all() and torch.isfinite(soft).all()
    rows = [min(range(4), key=lambda j: float((out["v"][i] - inputs["v"][j]).abs().sum())) for i in range(4)]
    torch.testing.assert_close(out["v"], inputs["v"][rows])
    torch.testing.assert_close(soft, F.one_hot(target[rows], 2).float())


def test_bmm_is_reproducible_and_resumes_identically_from_state_dict():
    names, accuracy = ["audio", "visual"], {"audio": 0.8, "visual": 0.5}
    inputs = {"audio": torch.randn(8, 3), "visual": torch.randn(8, 2, 2)}
    target = torch.arange(8) % 4

    def run(bmm: BalancedMixup, epochs: int) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        results = []
        for _ in range(epochs):
            results += [bmm(inputs, target) for _ in range(2)]
            bmm.update(accuracy)
        return results

    uninterrupted = run(BalancedMixup(names, 4, 1.0, 1, seed=7), 4)
    stopped = BalancedMixup(names, 4, 1.0, 1, seed=7)
    first_half = run(stopped, 2)
    buffer = io.BytesIO()
    torch.save(stopped.state_dict(), buffer)
    buffer.seek(0)
    resumed = BalancedMixup(names, 4, 1.0, 1, seed=123)
    resumed.load_state_dict(torch.load(buffer))
    assert resumed.epochs_seen == 2 and resumed.kappa == stopped.kappa and resumed.strength == stopped.strength
    for (got_inputs, got_soft), (want_inputs, want_soft) in zip(first_half + run(resumed, 2), uninterrupted):
        assert torch.equal(got_soft, want_soft)
        assert all(torch.equal(got_inputs[n], want_inputs[n]) for n in names)
    assert any(not torch.equal(out["visual"], inputs["visual"]) for out, _ in uninterrupted)


def test_bmm_without_seed_follows_torch_manual_seed():
    inputs, target = {"a": torch.randn(6, 2), "v": torch.randn(6, 2)}, torch.arange(6) % 2
    outputs = []
    for _ in range(2):
        torch.manual_seed(4)
        outputs.append(trained(BalancedMixup(["a", "v"], 2, 1.0, 0), {"a": 0.9, "v": 0.3}, 1)(inputs, target))
    assert torch.equal(outputs[0][0]["v"], outputs[1][0]["v"]) and torch.equal(outputs[0][1], outputs[1][1])


def _bmm(**overrides):
    arguments = {"modalities": ["audio", "visual"], "num_classes": 3, "degree": 1.0, "warmup_epochs": 0, "seed": 0}
    arguments.update(overrides)
    return BalancedMixup(**arguments)


def _mixing():
    return trained(_bmm(), {"audio": 0.9, "visual": 0.3}, 1)


GOOD = {"audio": torch.zeros(2, 3), "visual": torch.zeros(2, 4)}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: _bmm(degree=-1.0), "degree"),
        (lambda: _bmm(degree=math.inf), "degree"),
        (lambda: _bmm(warmup_epochs=-1), "warmup_epochs"),
        (lambda: _bmm(warmup_epochs=1.5), "warmup_epochs"),
        (lambda: _bmm(num_classes=0), "num_classes"),
        (lambda: _bmm(seed=-3), "seed"),
        (lambda: _bmm(modalities="audio"), "modalities"),
        (lambda: _bmm(modalities=["audio"]), "two or more distinct"),
        (lambda: _bmm(modalities=["audio", "audio"]), "distinct"),
        (lambda: _bmm().update({"audio": 0.5}), r"missing \['visual'\]"),
        (lambda: _bmm().update({"audio": 0.5, "visual": 0.4, "text": 0.3}), r"unknown \['text'\]"),
        (lambda: _bmm().update({"audio": 0.5, "visual": math.nan}), "visual"),
        (lambda: _bmm().update({"audio": 0.0, "visual": 0.0}), "zero"),
        (lambda: _mixing()({"audio": torch.zeros(2, 3)}, torch.tensor([0, 1])), r"missing \['visual'\]"),
        (lambda: _mixing()({**GOOD, "text": torch.zeros(2, 1)}, torch.tensor([0, 1])), r"unknown \['text'\]"),
        (lambda: _mixing()({"audio": torch.zeros(2, 3), "visual": torch.zeros(3, 4)}, torch.tensor([0, 1])), "batch"),
        (lambda: _mixing()(GOOD, torch.tensor([0, 1, 2])), "batch"),
        (lambda: _mixing()(GOOD, torch.tensor([0, 3])), r"outside \[0, 3\)"),
        (lambda: _mixing()(GOOD, torch.tensor([[0, 1]])), "target"),
        (lambda: _mixing()(GOOD, [0, 1]), "target must be a tensor"),
        (lambda: _mixing()({**GOOD, "visual": torch.zeros(2, 4, dtype=torch.uint8)}, torch.tensor([0, 1])), "floating"),
        (lambda: _mixing()({**GOOD, "visual": [0.0, 1.0]}, torch.tensor([0, 1])), "tensor"),
        (lambda: _bmm(modalities=["a", "v"]).load_state_dict(_bmm().state_dict()), "modalities"),
    ],
)
def test_bmm_rejects_bad_input(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bmm_validates_even_while_passing_through():
    with pytest.raises(ValueError, match="outside"):
        _bmm()(GOOD, torch.tensor([0, 5]))


# ---------------------------------------------------------------- the stable estimate of B-MM's accuracies
NAMES = st.lists(st.sampled_from(["audio", "visual", "text", "depth"]), min_size=2, max_size=4, unique=True)
SMOOTHING = st.floats(0.0, 0.99)


@FAST
@given(names=NAMES, data=st.data(), smoothing=SMOOTHING)
def test_smoothed_accuracy_lies_between_the_average_and_the_new_accuracy(names, data, smoothing):
    previous = {n: data.draw(ACCURACY) for n in names}
    current = {n: data.draw(ACCURACY) for n in names}
    smoothed = smoothed_accuracy(previous, current, smoothing)
    for n in names:
        low, high = sorted((previous[n], current[n]))
        assert low - 1e-12 <= smoothed[n] <= high + 1e-12
        assert smoothed[n] == pytest.approx(smoothing * previous[n] + (1 - smoothing) * current[n])


@FAST
@given(names=NAMES, data=st.data(), smoothing=SMOOTHING)
def test_smoothed_accuracy_starts_at_the_first_accuracy_and_keeps_a_constant_one(names, data, smoothing):
    current = {n: data.draw(ACCURACY) for n in names}
    assert smoothed_accuracy(None, current, smoothing) == current
    assert smoothed_accuracy(current, current, smoothing) == pytest.approx(current)
    other = {n: data.draw(ACCURACY) for n in names}
    assert smoothed_accuracy(other, current, 0.0) == current  # no smoothing: the epoch's own


@FAST
@given(names=NAMES, data=st.data(), smoothing=SMOOTHING)
def test_smoothed_accuracy_follows_the_modalities_when_they_are_renamed(names, data, smoothing):
    previous = {n: data.draw(ACCURACY) for n in names}
    current = {n: data.draw(ACCURACY) for n in names}
    renamed = dict(zip(names, reversed(names)))
    swapped = smoothed_accuracy(
        {renamed[n]: v for n, v in previous.items()}, {renamed[n]: v for n, v in current.items()}, smoothing
    )
    assert swapped == {renamed[n]: v for n, v in smoothed_accuracy(previous, current, smoothing).items()}


@pytest.mark.parametrize(
    ("previous", "current", "smoothing", "message"),
    [
        (None, {"audio": 0.5, "visual": 0.4}, 1.0, r"\[0, 1\)"),
        (None, {"audio": 0.5, "visual": 0.4}, -0.1, "smoothing"),
        ({"audio": 0.5}, {"audio": 0.5, "visual": 0.4}, 0.5, r"unknown \['visual'\]"),
        (None, {"audio": math.nan, "visual": 0.4}, 0.5, "audio"),
        (None, {}, 0.5, "non-empty"),
    ],
)
def test_smoothed_accuracy_rejects_bad_input(previous, current, smoothing, message):
    with pytest.raises(ValueError, match=message):
        smoothed_accuracy(previous, current, smoothing)


def test_bmm_kappa_comes_from_the_smoothed_accuracies():
    bmm = _bmm(smoothing=0.5)
    bmm.update({"audio": 0.9, "visual": 0.3})
    assert bmm.accuracy == {"audio": 0.9, "visual": 0.3} and bmm.kappa["audio"] == pytest.approx(3.0)
    bmm.update({"audio": 0.5, "visual": 0.7})
    assert bmm.accuracy == pytest.approx({"audio": 0.7, "visual": 0.5})
    assert bmm.kappa == pytest.approx(imbalance_factor({"audio": 0.7, "visual": 0.5}))
    assert bmm.weak_modalities == ("visual",)  # the raw accuracies of this epoch alone would mix audio
    raw = _bmm(smoothing=0.0)
    for accuracy in ({"audio": 0.9, "visual": 0.3}, {"audio": 0.5, "visual": 0.7}):
        raw.update(accuracy)
    assert raw.weak_modalities == ("audio",)


def test_smoothing_steadies_which_modality_is_mixed():
    """Two close modalities measured with noise over 39 epochs: the average mixes the strong one far less often."""
    wrong = {0.0: 0, 0.5: 0}
    for seed in range(5):
        rng = np.random.default_rng(seed)
        epochs = [{"audio": 0.62 + rng.normal(0, 0.03), "visual": 0.58 + rng.normal(0, 0.03)} for _ in range(39)]
        for smoothing in wrong:
            bmm = _bmm(smoothing=smoothing)
            for accuracy in epochs:
                bmm.update(accuracy)
                wrong[smoothing] += bmm.weak_modalities == ("audio",)
    assert wrong[0.5] * 3 < wrong[0.0], wrong


def test_bmm_state_keeps_the_average_and_its_smoothing():
    bmm = _bmm(smoothing=0.5)
    for accuracy in ({"audio": 0.9, "visual": 0.3}, {"audio": 0.5, "visual": 0.7}):
        bmm.update(accuracy)
    resumed = _bmm(smoothing=0.5)
    resumed.load_state_dict(bmm.state_dict())
    assert resumed.accuracy == bmm.accuracy and resumed.kappa == bmm.kappa
    resumed.update({"audio": 0.1, "visual": 0.9})
    bmm.update({"audio": 0.1, "visual": 0.9})
    assert resumed.kappa == bmm.kappa
    with pytest.raises(ValueError, match="smoothing=0.5, this BalancedMixup has smoothing=0.0"):
        _bmm(smoothing=0.0).load_state_dict(bmm.state_dict())
    current = _bmm(smoothing=0.0).state_dict()
    legacy = {"modalities": current["names"], "epochs_seen": 0, "kappa": {}, "generator": current["generator"]}
    _bmm(smoothing=0.0).load_state_dict(legacy)  # version 1, saved before the average existed: each epoch's own
    with pytest.raises(ValueError, match="smoothing"):
        _bmm(smoothing=1.0)


# ---------------------------------------------------------------- the equations (5)-(7)
@given(st.floats(0.01, 1.0), st.floats(0.01, 1.0))
def test_imbalance_factor_two_modalities(a, v):
    kappa = imbalance_factor({"audio": a, "visual": v})
    assert kappa["audio"] == pytest.approx(a / v)
    assert kappa["audio"] * kappa["visual"] == pytest.approx(1.0)


def test_imbalance_factor_errors():
    with pytest.raises(ValueError, match="all unimodal accuracies are zero"):
        imbalance_factor({"audio": 0.0, "visual": 0.0})
    with pytest.raises(ValueError, match="'audio'"):
        imbalance_factor({"audio": -0.1, "visual": 0.3})


@given(st.floats(0.0, 20.0), st.floats(0.0, 20.0), st.floats(0.0, 5.0))
def test_bmm_strength_monotone_bounded(k1, k2, degree):
    lo, hi = sorted((k1, k2))
    s_lo, s_hi = bmm_strength(lo, degree), bmm_strength(hi, degree)
    assert 0.0 <= s_lo <= s_hi <= 1.0
    assert bmm_strength(1.0, degree) == 0.0


@given(st.floats(1.0, 30.0), st.floats(0.0, 5.0))
def test_bmm_strength_is_the_papers_equation(kappa, degree):
    assert bmm_strength(kappa, degree) == pytest.approx(math.tanh(degree * (kappa - 1.0)), abs=1e-15)
    assert bmm_strength(kappa - 1.0, degree) == pytest.approx(max(0.0, math.tanh(degree * (kappa - 2.0))), abs=1e-15)


def test_bmm_strength_limits():
    assert bmm_strength(2.0, 1.0) == math.tanh(1.0)
    assert bmm_strength(math.inf, 0.0) == 0.0  # no mixing at degree 0, even for an infinite imbalance
    assert bmm_strength(math.inf, 0.5) == 1.0
    assert bmm_strength(0.5, 3.0) == 0.0


@given(st.floats(0.01, 1.0), st.floats(0.01, 1.0))
def test_imbalance_factor_is_the_exact_float64_ratio(a, v):
    kappa = imbalance_factor({"audio": a, "visual": v})
    assert kappa == {"audio": a / v, "visual": v / a}


