"""Tests of gradmod.fusion: the fusion heads and SimAM² (Sun et al., *More than Vanilla Fusion*)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradmod
from gradmod.fusion import (
    ConcatFusion,
    FiLMFusion,
    Fusion,
    GatedSumFusion,
    SimAM2,
    SumFusion,
    degradation_factor,
    simam2_energy,
    simam_inverse_energy,
)

FAST = settings(max_examples=25, deadline=None)
NAMES = ("audio", "visual")


def _features(widths: dict[str, int], batch: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(batch, width, generator=gen) for name, width in widths.items()}


def _capture_classifier_input(head: torch.nn.Module) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    head.classifier.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    return seen


HEADS = {
    "concat": lambda: ConcatFusion({"audio": 5, "visual": 3}, 6),
    "concat-nobias": lambda: ConcatFusion({"audio": 5, "visual": 3}, 6, bias=False),
    "sum": lambda: SumFusion({"audio": 5, "visual": 3}, 6),
    "gated": lambda: GatedSumFusion(4, 6),
    "gated-simam": lambda: GatedSumFusion(4, 6, simam=True),
    "gated3-simam": lambda: GatedSumFusion(4, 6, modalities=("audio", "visual", "text"), simam=True),
    "gated-fixed-simam": lambda: GatedSumFusion(4, 6, learn_gate=False, simam=True),
    "film": lambda: FiLMFusion(4, 6),
    "film-zeta": lambda: FiLMFusion(4, 6, zeta=True),
    "film-zeta-simam": lambda: FiLMFusion(4, 6, zeta=True, simam=True),
    "film-simam": lambda: FiLMFusion(4, 6, simam=True),
}


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_logits_shape_and_every_parameter_gets_a_gradient(kind: str) -> None:
    torch.manual_seed(0)
    head = HEADS[kind]()
    features = {n: f.requires_grad_() for n, f in _features(head.in_features, batch=5).items()}
    logits = head(features)
    assert logits.shape == (5, 6)
    assert torch.isfinite(logits).all()
    logits.square().sum().backward()
    for name, param in head.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reaches {name}"
    for name, feature in features.items():
        assert feature.grad is not None and feature.grad.abs().sum() > 0, f"no gradient reaches features[{name!r}]"


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_missing_modality_is_named(kind: str) -> None:
    head = HEADS[kind]()
    features = _features(head.in_features)
    dropped = head.modalities[-1]
    del features[dropped]
    with pytest.raises(ValueError, match=dropped):
        head(features)


def test_unknown_modality_and_wrong_width_are_named() -> None:
    head = SumFusion({"audio": 5, "visual": 3}, 6)
    features = _features({"audio": 5, "visual": 3, "depth": 2})
    with pytest.raises(ValueError, match="depth"):
        head(features)
    with pytest.raises(ValueError, match=r"visual.*\[batch, 3\]"):
        head(_features({"audio": 5, "visual": 4}))
    uneven = _features({"audio": 5, "visual": 3})
    uneven["visual"] = uneven["visual"][:2]
    with pytest.raises(ValueError, match="batch"):
        head(uneven)
    with pytest.raises(ValueError, match="mapping"):
        head([torch.zeros(2, 5), torch.zeros(2, 3)])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "build",
    [
        lambda: SumFusion({"audio": 2}, 3),
        lambda: ConcatFusion({"a.b": 2, "c": 2}, 3),
        lambda: ConcatFusion({"audio": 0, "visual": 2}, 3),
        lambda: SumFusion({"audio": 2, "visual": 2}, 0),
        lambda: FiLMFusion(4, 3, modalities=("a", "b", "c")),
        lambda: FiLMFusion(4, 3, condition="text"),
        lambda: FiLMFusion(4, 3, modalities=("audio", "audio")),
        lambda: GatedSumFusion(4, 3, modalities=("audio", "visual", "audio")),
        lambda: SimAM2(4, num_signals=1),
        lambda: SimAM2(4, lambda_=0.0),
    ],
)
def test_bad_construction_raises(build) -> None:
    with pytest.raises(ValueError):
        build()


@FAST
@given(
    widths=st.lists(st.integers(1, 6), min_size=2, max_size=4),
    batch=st.integers(1, 5),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_concat_unimodal_logits_sum_to_forward(widths: list[int], batch: int, bias: bool, seed: int) -> None:
    torch.manual_seed(seed)
    in_features = {f"m{i}": w for i, w in enumerate(widths)}
    head = ConcatFusion(in_features, 3, bias=bias)
    features = _features(in_features, batch, seed)
    reversed_order = dict(reversed(list(features.items())))  # the head's own order decides the blocks
    parts = head.unimodal_logits(reversed_order)
    assert list(parts) == list(head.modalities)
    torch.testing.assert_close(sum(parts.values()), head(features), rtol=1e-5, atol=1e-5)
    first = head.modalities[0]
    block = head.linear.weight[:, : in_features[first]]
    share = 0.0 if head.linear.bias is None else head.linear.bias / len(widths)
    torch.testing.assert_close(parts[first], features[first] @ block.T + share)


@FAST
@given(batch=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_sum_unimodal_logits_carry_the_full_bias_and_sum_to_forward(batch: int, seed: int) -> None:
    torch.manual_seed(seed)
    head = SumFusion({"audio": 3, "visual": 2}, 4)
    features = _features(head.in_features, batch, seed)
    parts = head.unimodal_logits(features)
    for name in NAMES:
        branch = head.branches[name]
        torch.testing.assert_close(parts[name], features[name] @ branch.weight.T + branch.bias)
    torch.testing.assert_close(parts["audio"] + parts["visual"], head(features))


def test_sum_head_does_not_depend_on_modality_order() -> None:
    torch.manual_seed(0)
    forward_order = SumFusion({"audio": 3, "visual": 2}, 4)
    swapped = SumFusion({"visual": 2, "audio": 3}, 4)
    swapped.load_state_dict(forward_order.state_dict())
    features = _features(forward_order.in_features)
    torch.testing.assert_close(forward_order(features), swapped(features))
    assert swapped.unimodal_logits(features).keys() == {"audio", "visual"}


@pytest.mark.parametrize("kind", ["gated", "gated-simam", "film", "film-zeta"])
def test_non_decouplable_heads_point_to_the_gate(kind: str) -> None:
    head = HEADS[kind]()
    assert not head.decouplable
    with pytest.raises(TypeError, match="ζ.*DecouplingFree.*auxiliary"):
        head.unimodal_logits(_features(head.in_features))


def test_decouplable_flags() -> None:
    assert ConcatFusion.decouplable and SumFusion.decouplable
    assert not GatedSumFusion.decouplable and not FiLMFusion.decouplable
    assert all(issubclass(c, Fusion) for c in (ConcatFusion, SumFusion, GatedSumFusion, FiLMFusion))


@FAST
@given(batch=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_gated_zeta_in_unit_interval_and_fusion_between_inputs(batch: int, seed: int) -> None:
    torch.manual_seed(seed)
    head = GatedSumFusion(3, 2)
    assert head.zeta is None
    seen = _capture_classifier_input(head)
    features = _features(head.in_features, batch, seed)
    head(features)
    zeta = head.zeta
    assert isinstance(zeta, torch.Tensor) and zeta.shape == (batch, 3)
    assert zeta.requires_grad, "zeta must stay attached to the graph"
    assert ((zeta > 0) & (zeta < 1)).all()
    x1, x2 = features["audio"], features["visual"]
    fused = seen[0]
    torch.testing.assert_close(fused, zeta * x1 + (1 - zeta) * x2)
    low, high = torch.minimum(x1, x2), torch.maximum(x1, x2)
    assert ((fused >= low - 1e-6) & (fused <= high + 1e-6)).all()


def test_gates_of_more_than_two_modalities_sum_to_one() -> None:
    torch.manual_seed(0)
    names = ("audio", "visual", "text")
    head = GatedSumFusion(3, 2, modalities=names)
    head(_features(head.in_features, batch=6))
    assert isinstance(head.zeta, dict) and tuple(head.zeta) == names
    total = sum(head.zeta.values())
    torch.testing.assert_close(total, torch.ones_like(total))
    assert all(((g > 0) & (g < 1)).all() for g in head.zeta.values())


def test_fixed_gate_is_a_plain_mean() -> None:
    head = GatedSumFusion(3, 2, learn_gate=False)
    seen = _capture_classifier_input(head)
    features = _features(head.in_features)
    head(features)
    torch.testing.assert_close(head.zeta, torch.full((4, 3), 0.5))
    torch.testing.assert_close(seen[0], (features["audio"] + features["visual"]) / 2)


def test_film_without_zeta_is_equation_9() -> None:
    torch.manual_seed(0)
    head = FiLMFusion(3, 2)
    seen = _capture_classifier_input(head)
    features = _features(head.in_features)
    head(features)
    gamma, beta = head.film(features["visual"]).chunk(2, dim=1)
    torch.testing.assert_close(seen[0], gamma * features["audio"] + beta)
    assert head.zeta is None


@pytest.mark.parametrize("condition", ["audio", "visual"])
def test_film_zeta_weights_the_modulated_modality_first(condition: str) -> None:
    torch.manual_seed(0)
    head = FiLMFusion(3, 2, condition=condition, zeta=True)
    modulated = "visual" if condition == "audio" else "audio"
    assert head.modalities == (modulated, condition)
    seen = _capture_classifier_input(head)
    features = _features(head.in_features)
    head(features)
    gamma, beta = head.film(features[condition]).chunk(2, dim=1)
    zeta = head.zeta
    assert zeta is not None and zeta.requires_grad and ((zeta > 0) & (zeta < 1)).all()
    torch.testing.assert_close(seen[0], zeta * gamma * features[modulated] + (1 - zeta) * beta)


# ----------------------------------------------------------------------------------------------- SimAM²


def test_simam2_matches_a_hand_computed_example() -> None:
    # x1 = [0, 0, 3]: μ = 1, (x−μ)² = [1, 1, 4], σ² = 6/2 = 3, ι₁ = d/12 + ½ = [7/12, 7/12, 10/12].
    # x2 = [3, 0, 0]: ι₂ = [10/12, 7/12, 7/12].  ζ = ½: U = [1.5, 0, 1.5], μ = 1, d = [¼, 1, ¼], σ² = ¾,
    # ι_U = d/3 + ½ = [7/12, 10/12, 7/12] (λ = 1e-6 is negligible).  ζ constant: var = var_max = 0, so
    # r = tanh(λ/λ) = tanh(1).  E* = (2 − r)·ι_U − ¼ι₁ − ¼ι₂.
    module = SimAM2(3, lambda_=1e-6, scale=2.5)
    x1 = torch.tensor([[0.0, 0.0, 3.0]])
    x2 = torch.tensor([[3.0, 0.0, 0.0]])
    zeta = torch.full((1, 3), 0.5)
    r = math.tanh(1.0)
    outer = (2 - r) * 7 / 12 - 0.25 * 7 / 12 - 0.25 * 10 / 12
    middle = (2 - r) * 10 / 12 - 0.25 * 7 / 12 - 0.25 * 7 / 12
    sigmoid = lambda v: 1.0 / (1.0 + math.exp(-v))  # noqa: E731
    expected = torch.tensor([[1.5 * sigmoid(outer), 0.0 * sigmoid(middle), 1.5 * sigmoid(outer)]])
    torch.testing.assert_close(module([x1, x2], [zeta, 1 - zeta]), expected, rtol=1e-5, atol=1e-5)


def test_degradation_factor_hand_example_and_range() -> None:
    variance = torch.tensor([0.01, 0.03])
    record = torch.tensor([0.02, 0.06])
    expected = math.tanh((2.5 * 0.04 + 1e-6) / (0.08 + 1e-6))
    assert degradation_factor(variance, record, 2.5, 1e-6).item() == pytest.approx(expected, rel=1e-6)
    assert 0 < degradation_factor(torch.zeros(3), torch.zeros(3), 2.5, 1e-6).item() < 1
    with pytest.raises(ValueError, match="lambda_"):
        degradation_factor(variance, record, 2.5, 0.0)


@FAST
@given(
    values=st.lists(st.floats(-100, 100, allow_nan=False, width=32), min_size=2, max_size=12),
    lambda_=st.floats(1e-8, 1.0),
)
def test_inverse_energy_is_bounded_and_permutation_equivariant(values: list[float], lambda_: float) -> None:
    x = torch.tensor([values])
    importance = simam_inverse_energy(x, lambda_)
    n = len(values)
    assert torch.isfinite(importance).all()
    assert (importance >= 0.5).all() and (importance <= (n - 1) / 4 + 0.5 + 1e-4).all()
    perm = torch.randperm(n)
    torch.testing.assert_close(simam_inverse_energy(x[:, perm], lambda_), importance[:, perm])


def test_inverse_energy_of_maps_is_per_sample_and_channel() -> None:
    torch.manual_seed(0)
    maps = torch.randn(2, 3, 4, 5)
    importance = simam_inverse_energy(maps, 1e-4)
    flat = maps[1, 2].reshape(1, -1)
    torch.testing.assert_close(importance[1, 2].reshape(1, -1), simam_inverse_energy(flat, 1e-4))
    with pytest.raises(ValueError, match="at least 2 neurons"):
        simam_inverse_energy(torch.zeros(2, 3, 1, 1), 1e-4)


def test_energy_at_extreme_gates_is_finite_and_reduces_to_one_modality() -> None:
    ones = torch.ones(2, 3)
    parts = [torch.full((2, 3), 0.7), torch.full((2, 3), 0.9)]
    fused = torch.full((2, 3), 0.7)
    energy = simam2_energy(fused, parts, [ones, 0 * ones], torch.tensor(0.25))
    torch.testing.assert_close(energy, (1 - 0.25) * fused)  # ζ = 1: U = X₁, the mutual term vanishes


@pytest.mark.parametrize("shape", [(4, 5), (4, 3, 2, 2)])
def test_simam2_is_finite_for_constant_inputs_and_gradients(shape: tuple[int, ...]) -> None:
    channels = shape[1]
    module = SimAM2(channels)
    x1 = torch.full(shape, 2.0, requires_grad=True)
    x2 = torch.full(shape, -1.0, requires_grad=True)
    zeta = torch.full((shape[0], channels), 0.3, requires_grad=True)
    out = module([x1, x2], [zeta, 1 - zeta])
    assert out.shape == shape and torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (x1, x2, zeta))
    hard = torch.cat([torch.zeros(2, channels), torch.ones(2, channels)])  # ζ ∈ {0, 1}
    assert torch.isfinite(module([x1, x2], [hard, 1 - hard])).all()


@FAST
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 4))
def test_simam2_is_symmetric_under_swapping_modalities(seed: int, batch: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x1, x2 = torch.randn(2, batch, 5, generator=gen)
    zeta = torch.rand(batch, 5, generator=gen)
    module = SimAM2(5).eval()
    forward = module([x1, x2], [zeta, 1 - zeta])
    swapped = module([x2, x1], [1 - zeta, zeta])
    torch.testing.assert_close(forward, swapped)
    assert ((forward.abs() <= (zeta * x1 + (1 - zeta) * x2).abs() + 1e-6)).all()  # sigmoid gate in (0, 1)


def test_var_max_grows_in_training_only_and_is_saved() -> None:
    torch.manual_seed(0)
    module = SimAM2(3)
    x1, x2 = torch.randn(2, 8, 3)
    records = [module.var_max.clone()]
    for spread in (0.1, 0.4, 0.05, 0.3):
        zeta = (0.5 + spread * torch.randn(8, 3)).clamp(0, 1)
        module([x1, x2], [zeta, 1 - zeta])
        records.append(module.var_max.clone())
    for before, after in zip(records, records[1:]):
        assert (after >= before).all()
    assert (records[-1] > 0).all()
    torch.testing.assert_close(records[-1][0], records[-1][1])  # var(1 − ζ) = var(ζ)
    module.eval()
    module([x1, x2], [torch.rand(8, 3) * 3, torch.rand(8, 3)])
    torch.testing.assert_close(module.var_max, records[-1])
    assert "var_max" in module.state_dict()


def test_simam2_keeps_dtype_and_runs_with_batch_one() -> None:
    module = SimAM2(4).eval()
    x1, x2 = torch.randn(2, 1, 4).to(torch.bfloat16)
    zeta = torch.full((1, 4), 0.5, dtype=torch.bfloat16)
    out = module([x1, x2], [zeta, 1 - zeta])
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_simam2_rejects_mismatched_inputs() -> None:
    module = SimAM2(4)
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="2 signals"):
        module([x, x, x], [x, x, x])
    with pytest.raises(ValueError, match="gate 1"):
        module([x, x], [x, x[:, :3]])
    with pytest.raises(ValueError, match=r"\[batch, 4\]"):
        module([torch.randn(2, 5), torch.randn(2, 5)], [x, x])


def test_gates_name_each_modality_whatever_the_head_order():

    head = FiLMFusion(4, 3, modalities=("audio", "visual"), condition="audio", zeta=True)
    assert head.modalities == ("visual", "audio")
    assert head.gates is None
    head({"audio": torch.randn(5, 4), "visual": torch.randn(5, 4)})
    gates = head.gates
    assert set(gates) == {"audio", "visual"}
    torch.testing.assert_close(gates["visual"], head.zeta)
    torch.testing.assert_close(gates["audio"] + gates["visual"], torch.ones(5, 4))
    evidence = gradmod.methods.decoupling_free.zeta_evidence(gates, ("audio", "visual"))
    assert evidence["visual"].item() == pytest.approx(head.zeta.sum().item(), rel=1e-5)
