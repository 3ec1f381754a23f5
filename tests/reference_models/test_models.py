"""Reference models × fusion heads on tiny inputs: output shapes, gradients, masking, LLP's MSDU."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gradmod
from reference_models.models import (
    FUSION_KINDS,
    AVDigitsModel,
    AVEModel,
    CremaDModel,
    LLPModel,
    ModelOutput,
    MultimodalModel,
    make_fusion,
    mask_features,
)

BATCH = 3
SEGMENTS = 4


def _avdigits(kind: str) -> tuple[MultimodalModel, dict[str, Tensor], Tensor]:
    inputs = {"audio": torch.randn(BATCH, 1, 40, 32), "visual": torch.randn(BATCH, 1, 28, 28)}
    return AVDigitsModel(kind, dim=8), inputs, torch.tensor([0, 3, 9])


def _cremad(kind: str) -> tuple[MultimodalModel, dict[str, Tensor], Tensor]:
    inputs = {"audio": torch.randn(BATCH, 1, 32, 32), "visual": torch.randn(BATCH, 3, 2, 16, 16)}
    return CremaDModel(kind), inputs, torch.tensor([0, 5, 2])


def _ave(kind: str) -> tuple[MultimodalModel, dict[str, Tensor], Tensor]:
    inputs = {"audio": torch.randn(BATCH, SEGMENTS, 8), "visual": torch.randn(BATCH, SEGMENTS, 3, 3, 16)}
    model = AVEModel(kind, audio_dim=8, visual_dim=16, hidden=6, attention_dim=5)
    return model, inputs, torch.randint(0, 29, (BATCH, SEGMENTS))


def _llp() -> tuple[LLPModel, dict[str, Tensor], Tensor]:
    inputs = {"audio": torch.randn(BATCH, SEGMENTS, 8), "visual": torch.randn(BATCH, SEGMENTS, 12)}
    model = LLPModel(audio_dim=8, visual_dim=12, dim=16, num_classes=5, num_heads=2, dropout=0.0)
    return model, inputs, torch.tensor([[1.0, 0, 0, 1, 0], [0, 0, 0, 0, 1], [1, 1, 1, 0, 0]])


FUSED = {"avdigits": _avdigits, "cremad": _cremad, "ave": _ave}
ALL_CASES = [(name, kind) for name in FUSED for kind in FUSION_KINDS] + [("llp", None)]


def build(name: str, kind: str | None) -> tuple[MultimodalModel, dict[str, Tensor], Tensor]:
    torch.manual_seed(0)
    return _llp() if name == "llp" else FUSED[name](kind)


LLP_CASE = build("llp", None)
AVE_CASE = build("ave", "concat")


def _expected_logits_shape(name: str) -> tuple[int, ...]:
    return {"avdigits": (BATCH, 10), "cremad": (BATCH, 6), "ave": (BATCH, SEGMENTS, 29), "llp": (BATCH, 5)}[name]


@pytest.mark.parametrize(("name", "kind"), ALL_CASES)
def test_forward_shapes_and_gradients_reach_every_encoder_parameter(name: str, kind: str | None) -> None:
    model, inputs, target = build(name, kind)
    output = model(inputs)
    assert isinstance(output, ModelOutput)
    assert output.logits.shape == _expected_logits_shape(name) and torch.isfinite(output.logits).all()
    assert set(output.features) == set(model.modalities) == {"audio", "visual"}
    rows = BATCH * SEGMENTS if name == "ave" else BATCH
    if output.unimodal_logits is not None:
        for logits in output.unimodal_logits.values():
            assert logits.shape == (rows, output.logits.shape[-1])
        assert model.measure_target(target).shape[0] == rows
    loss = model.loss(output, target)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for modality, encoder in model.encoders.items():
        for pname, p in encoder.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{modality}.{pname}"
            assert p.grad.abs().sum() > 0, f"no gradient reaches {modality}.{pname}"


@pytest.mark.parametrize(("name", "kind"), [(n, k) for n, k in ALL_CASES if k in ("concat", "sum")])
def test_decouplable_heads_expose_logits_that_sum_to_the_fused_logits(name: str, kind: str) -> None:
    model, inputs, _ = build(name, kind)
    output = model(inputs)
    assert output.unimodal_logits is not None and output.zeta is None
    total = sum(output.unimodal_logits.values())
    assert torch.allclose(total, output.logits.reshape(total.shape), atol=1e-5)


@pytest.mark.parametrize(("name", "kind"), [(n, k) for n, k in ALL_CASES if k in ("gated", "gated_simam", "film_zeta")])
def test_gated_heads_expose_named_gates_attached_to_the_graph(name: str, kind: str) -> None:
    model, inputs, _ = build(name, kind)
    output = model(inputs)
    assert output.unimodal_logits is None
    assert isinstance(output.zeta, dict) and set(output.zeta) == {"audio", "visual"}
    rows = BATCH * SEGMENTS if name == "ave" else BATCH
    for gate in output.zeta.values():
        assert gate.requires_grad and gate.shape[0] == rows and ((gate > 0) & (gate < 1)).all()
    assert torch.allclose(output.zeta["audio"] + output.zeta["visual"], torch.ones(()))


@pytest.mark.parametrize(("name", "kind"), [(n, k) for n, k in ALL_CASES if k == "film"])
def test_plain_film_has_neither_decoupled_logits_nor_zeta(name: str, kind: str) -> None:
    model, inputs, _ = build(name, kind)
    output = model(inputs)
    assert output.unimodal_logits is None and output.zeta is None


def _other_input(inputs: dict[str, Tensor], replace: str) -> dict[str, Tensor]:
    return {name: torch.randn_like(x) if name == replace else x for name, x in inputs.items()}


@pytest.mark.parametrize(("name", "kind"), ALL_CASES)
def test_masked_unimodal_prediction_ignores_the_other_modality(name: str, kind: str | None) -> None:
    model, inputs, _ = build(name, kind)
    model.eval()
    with torch.no_grad():
        features = model.encode(inputs)
        masked = model.masked_logits(features)
        assert set(masked) == {"audio", "visual"}
        for keep in model.modalities:
            assert masked[keep].shape == _expected_logits_shape(name)
        full = model.head(features).logits
        assert not torch.allclose(masked["audio"], full)  # the visual contribution was removed
        # the audio-only prediction must not move when only the visual input changes
        changed = model.masked_logits(model.encode(_other_input(inputs, "visual")))
        assert torch.allclose(changed["audio"], masked["audio"], atol=1e-5)
        assert not torch.allclose(changed["visual"], masked["visual"])
        if name != "ave":  # AVE's visual encoder is guided by the audio input, by design
            changed = model.masked_logits(model.encode(_other_input(inputs, "audio")))
            assert torch.allclose(changed["visual"], masked["visual"], atol=1e-5)


@pytest.mark.parametrize(("name", "kind"), [(n, k) for n, k in ALL_CASES if k in ("concat", "sum")])
def test_masking_changes_only_the_masked_modalitys_decoupled_logits(name: str, kind: str) -> None:
    model, inputs, _ = build(name, kind)
    model.eval()
    with torch.no_grad():
        features = model.encode(inputs)
        full = model.head(features).unimodal_logits
        masked = model.head(mask_features(features, keep="audio")).unimodal_logits
    assert full is not None and masked is not None
    assert torch.equal(masked["audio"], full["audio"])
    # a zeroed modality contributes only its bias share: the same row for every sample
    assert torch.allclose(masked["visual"], masked["visual"][:1].expand_as(masked["visual"]))


def test_concat_masked_prediction_is_the_decoupled_logits_plus_the_other_bias_share() -> None:
    model, inputs, _ = build("avdigits", "concat")
    model.eval()
    with torch.no_grad():
        features = model.encode(inputs)
        decoupled = model.head(features).unimodal_logits
        masked = model.masked_logits(features)
    assert decoupled is not None
    bias = model.fusion.linear.bias
    for name in model.modalities:
        assert torch.allclose(masked[name], decoupled[name] + bias / 2, atol=1e-6)


def _ogm_ge_valid_logits(model: MultimodalModel, features: dict[str, Tensor], kind: str) -> dict[str, Tensor]:
    """The official OGM-GE ``valid()``: concat ``a @ W[:, :D]ᵀ + b/2``, ``v @ W[:, D:]ᵀ + b/2``;
    sum ``a @ W_xᵀ + b_x/2``, ``v @ W_yᵀ + b_y/2``."""
    audio, visual = features["audio"].flatten(0, -2), features["visual"].flatten(0, -2)
    if kind == "concat":
        weight, bias = model.fusion.linear.weight, model.fusion.linear.bias
        width = audio.shape[-1]
        return {"audio": audio @ weight[:, :width].T + bias / 2, "visual": visual @ weight[:, width:].T + bias / 2}
    branches = model.fusion.branches
    return {name: x @ branches[name].weight.T + branches[name].bias / 2 for name, x in (("audio", audio), ("visual", visual))}


@pytest.mark.parametrize(("name", "kind"), [(n, k) for n, k in ALL_CASES if k in ("concat", "sum")])
def test_decoupled_logits_follow_the_official_valid_with_half_the_bias(name: str, kind: str) -> None:
    model, inputs, _ = build(name, kind)
    model.eval()
    with torch.no_grad():
        for parameter in model.fusion.parameters():
            if parameter.dim() == 1:
                parameter.add_(3.0)  # a large bias: b and b/2 give different logits
        features = model.encode(inputs)
        decoupled = model.decoupled_logits(features)
        expected = _ogm_ge_valid_logits(model, features, kind)
    assert decoupled is not None and set(decoupled) == {"audio", "visual"}
    for modality in model.modalities:
        assert decoupled[modality].shape == _expected_logits_shape(name)
        assert torch.allclose(decoupled[modality].flatten(0, -2), expected[modality], atol=1e-5)


@pytest.mark.parametrize(("name", "kind"), [(n, k) for n, k in ALL_CASES if k not in ("concat", "sum", "shared", "mmcosine")])
def test_heads_that_mix_modalities_have_no_decoupled_logits(name: str, kind: str | None) -> None:
    model, inputs, _ = build(name, kind)
    assert model.decoupled_logits(model.encode(inputs)) is None


@pytest.mark.parametrize(("name", "kind"), [(n, "concat") for n in FUSED] + [("llp", None)])
def test_modality_modules_are_disjoint_and_cover_the_encoders(name: str, kind: str | None) -> None:
    model, _, _ = build(name, kind)
    groups = {m: {id(p) for p in module.parameters()} for m, module in model.modality_modules().items()}
    assert set(groups) == {"audio", "visual"}
    assert not groups["audio"] & groups["visual"]
    for modality, encoder in model.encoders.items():
        assert {id(p) for p in encoder.parameters()} <= groups[modality]


def test_ave_visual_encoder_is_guided_by_the_audio_input_only() -> None:
    model, inputs, _ = build("ave", "concat")
    model.eval()
    with torch.no_grad():
        visual = model.encode(inputs)["visual"]
        guided = model.encode(_other_input(inputs, "audio"))["visual"]
    assert not torch.allclose(visual, guided)
    audio_params = {id(p) for p in model.encoders["audio"].parameters()}
    assert not audio_params & {id(p) for p in model.encoders["visual"].parameters()}


def test_cremad_features_are_512_and_frames_are_averaged_over_time() -> None:
    model, inputs, _ = build("cremad", "concat")
    model.eval()
    with torch.no_grad():
        features = model.encode(inputs)
        assert features["audio"].shape == features["visual"].shape == (BATCH, 512)
        frames = inputs["visual"]
        per_frame = [model.encoders["visual"](frames[:, :, t : t + 1]) for t in range(frames.shape[2])]
    assert torch.allclose(features["visual"], torch.stack(per_frame).mean(0), atol=1e-5)


def test_llp_msdu_scores_are_probabilities_that_backprop_into_the_encoders() -> None:
    model, inputs, _ = build("llp", None)
    output = model(inputs)
    assert output.unimodal_logits is None and output.zeta is None
    assert output.unimodal_scores is not None and output.snippet_probs is not None
    for name in model.modalities:
        score = output.unimodal_scores[name]
        assert score.shape == (BATCH, 5) and ((score >= 0) & (score <= 1)).all()
        assert output.snippet_probs[name].shape == (BATCH, SEGMENTS, 5)
    model.zero_grad()
    output.unimodal_scores["visual"].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoders["visual"].parameters())
    assert all(p.grad is None for p in model.encoders["audio"].parameters())  # MSDU is purely unimodal


def test_llp_msdu_score_of_one_modality_ignores_the_other() -> None:
    model, inputs, _ = build("llp", None)
    model.eval()
    with torch.no_grad():
        first = model(inputs).unimodal_scores
        second = model(_other_input(inputs, "visual")).unimodal_scores
    assert first is not None and second is not None
    assert torch.equal(first["audio"], second["audio"]) and not torch.equal(first["visual"], second["visual"])


def test_llp_loss_adds_the_weighted_msdu_bce() -> None:
    model, inputs, target = build("llp", None)
    output = model(inputs)
    assert output.unimodal_scores is not None
    fused = nn.functional.binary_cross_entropy(torch.sigmoid(output.logits), target)
    msdu = sum(nn.functional.binary_cross_entropy(s, target) for s in output.unimodal_scores.values())
    assert torch.allclose(model.loss(output, target), fused + msdu, atol=1e-5)
    model.msdu_weight = 0.25
    assert torch.allclose(model.loss(output, target), fused + 0.25 * msdu, atol=1e-5)


@given(scale=st.floats(1e-3, 1e5), seed=st.integers(0, 2**16))
@settings(max_examples=25, deadline=None)
def test_llp_probabilities_stay_in_range_and_finite_for_any_input_scale(scale: float, seed: int) -> None:
    model, inputs, target = LLP_CASE
    generator = torch.Generator().manual_seed(seed)
    scaled = {name: scale * torch.randn(x.shape, generator=generator) for name, x in inputs.items()}
    model.zero_grad()
    output = model(scaled)
    assert torch.isfinite(output.logits).all()
    assert output.unimodal_scores is not None and output.snippet_probs is not None
    for tensor in [*output.unimodal_scores.values(), *output.snippet_probs.values(), torch.sigmoid(output.logits)]:
        assert ((tensor >= 0) & (tensor <= 1)).all()
    model.loss(output, target).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)



@given(batch=st.integers(1, 4), segments=st.integers(1, 6))
@settings(max_examples=10, deadline=None)
def test_ave_shapes_follow_batch_and_segments(batch: int, segments: int) -> None:
    model, _, _ = AVE_CASE
    inputs = {"audio": torch.randn(batch, segments, 8), "visual": torch.randn(batch, segments, 3, 3, 16)}
    output = model(inputs)
    assert output.logits.shape == (batch, segments, 29)
    assert output.unimodal_logits is not None
    assert output.unimodal_logits["audio"].shape == (batch * segments, 29)
    assert output.features["visual"].shape == (batch, segments, 12)



@given(keep=st.sampled_from(["audio", "visual", "depth"]), width=st.integers(1, 5))
@settings(max_examples=15, deadline=None)
def test_mask_features_zeros_all_but_one(keep: str, width: int) -> None:
    features = {name: torch.randn(2, width) + 1 for name in ("audio", "visual", "depth")}
    masked = mask_features(features, keep)
    assert masked.keys() == features.keys()
    for name, tensor in masked.items():
        assert tensor.shape == features[name].shape
        assert torch.equal(tensor, features[name]) if name == keep else not tensor.any()


Builder = Callable[[str], tuple[MultimodalModel, dict[str, Tensor], Tensor]]


@pytest.mark.parametrize("builder", [_avdigits, _ave])
def test_missing_or_unknown_modality_is_named(builder: Builder) -> None:
    model, inputs, _ = builder("concat")
    with pytest.raises(ValueError, match="visual"):
        model({"audio": inputs["audio"]})
    with pytest.raises(ValueError, match="depth"):
        model({**inputs, "depth": inputs["audio"]})


@pytest.mark.parametrize(
    ("builder", "bad", "message"),
    [
        (_avdigits, {"audio": torch.randn(BATCH, 40, 32)}, "SmallCNN input"),
        (_cremad, {"visual": torch.randn(BATCH, 3, 32, 32)}, "visual frames"),
        (_cremad, {"audio": torch.randn(BATCH, 3, 32, 32)}, "audio spectrogram"),
        (_ave, {"visual": torch.randn(BATCH, SEGMENTS, 9, 16)}, "visual grid"),
        (_ave, {"audio": torch.randn(BATCH, SEGMENTS + 1, 8)}, "segments"),
    ],
)
def test_wrong_input_shapes_raise(builder: Builder, bad: dict[str, Tensor], message: str) -> None:
    model, inputs, _ = builder("concat")
    with pytest.raises(ValueError, match=message):
        model({**inputs, **bad})


def test_llp_rejects_mismatched_features_and_targets() -> None:
    model, inputs, target = build("llp", None)
    with pytest.raises(ValueError, match="snippet features"):
        model({**inputs, "visual": torch.randn(BATCH, SEGMENTS, 7)})
    output = model(inputs)
    with pytest.raises(ValueError, match="multi-hot"):
        model.loss(output, target.argmax(1))


def test_ave_loss_rejects_wrong_target_shape() -> None:
    model, inputs, target = build("ave", "concat")
    with pytest.raises(ValueError, match="AVE target"):
        model.loss(model(inputs), target[:, :1])


@pytest.mark.parametrize(
    ("kind", "dims", "message"),
    [("mlp", 4, "unknown fusion kind"), ("gated", {"audio": 4, "visual": 5}, "one feature width"),
     ("concat", {"audio": 4}, "missing")],
)
def test_make_fusion_rejects_bad_requests(kind: str, dims: int | dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_fusion(kind, dims, 3, ("audio", "visual"))


@pytest.mark.parametrize("kind", FUSION_KINDS)
def test_make_fusion_builds_every_kind(kind: str) -> None:
    head = make_fusion(kind, {"audio": 4, "visual": 4}, 3, ("audio", "visual"))
    logits = head({"audio": torch.randn(2, 4), "visual": torch.randn(2, 4)})
    assert logits.shape == (2, 3)
    assert head.decouplable == (kind in ("concat", "sum", "shared", "mmcosine"))


@pytest.mark.parametrize("name", list(FUSED))
def test_shared_head_fuses_the_per_modality_predictions_by_their_entropy(name: str) -> None:
    """MLA's head: one linear layer on each modality's features; fused = MLA's per-sample entropy fusion;
    a modality alone is the head on its own features, masked or decoupled."""
    model, inputs, _ = build(name, "shared")
    model.eval()
    with torch.no_grad():
        features = model.encode(inputs)
        output = model.head(features)
        linear = model.fusion.linear
        own = {m: linear(f.flatten(0, -2)) for m, f in features.items()}
        assert output.unimodal_logits is not None
        for m in model.modalities:
            assert torch.allclose(output.unimodal_logits[m], own[m], atol=1e-6)
        fused = gradmod.methods.mla.entropy_fusion(own)
        assert torch.allclose(output.logits.flatten(0, -2), fused, atol=1e-6)
        alone, decoupled = model.masked_logits(features), model.decoupled_logits(features)
        for m in model.modalities:
            assert torch.equal(alone[m], decoupled[m])
            assert torch.allclose(alone[m].flatten(0, -2), own[m], atol=1e-6)


@pytest.mark.parametrize("name", list(FUSED))
def test_unimodal_heads_are_a_seeded_submodule_that_leaves_the_global_random_stream_alone(name: str) -> None:
    model, inputs, _ = build(name, "concat")
    state = torch.get_rng_state()
    heads = model.add_unimodal_heads(7, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    again, _, _ = build(name, "concat")
    assert all(torch.equal(a, b) for a, b in zip(heads.parameters(), again.add_unimodal_heads(7, seed=3).parameters()))
    assert not torch.equal(heads["audio"].weight, again.add_unimodal_heads(7, seed=4)["audio"].weight)
    assert any(key.startswith("unimodal_heads.") for key in model.state_dict())
    groups = {id(p) for module in model.modality_modules().values() for p in module.parameters()}
    assert not groups & {id(p) for p in heads.parameters()}  # no modality owns them
    features = model.encode(inputs)
    logits = model.unimodal_head_logits(features)
    for m in model.modalities:
        assert logits[m].shape == (*features[m].shape[:-1], 7)
        assert torch.allclose(logits[m], heads[m](features[m]))


def test_models_without_one_feature_vector_per_modality_have_no_unimodal_heads() -> None:
    model, _, _ = LLP_CASE
    assert model.feature_widths() is None
    with pytest.raises(ValueError, match="LLPModel has no per-modality feature vectors"):
        model.add_unimodal_heads(5, seed=0)
    with pytest.raises(ValueError, match="no unimodal heads"):
        build("avdigits", "concat")[0].unimodal_head_logits({})
