"""The seams of real training loops: every case is either correct or loud, never a silent no-op or half a step."""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from tiny import TinyModel, batches
from torch import nn

import gradmod


def make_ogm(model, **options):
    return gradmod.OGM({n: model.encoders[n] for n in model.names}, alpha=0.8, seed=1, **options)


def encoder_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def summed_scores(decoupled, y):
    return {n: gradmod.functional.ogm_scores(z, y).item() for n, z in decoupled.items()}


# ------------------------------------------------------------------ 1. evidence of a step: all of it, only its own
@pytest.mark.parametrize("set_to_none", [True, False])
def test_several_observes_before_one_backward_add_up(set_to_none):
    """Micro-batch forwards, each observed, then one summed loss: the step's evidence is the sum of all."""
    torch.manual_seed(0)
    model = TinyModel()
    mod = make_ogm(model)
    model.zero_grad(set_to_none=set_to_none)
    losses, expected = [], {"audio": 0.0, "visual": 0.0}
    for inputs, y in batches(3, seed=4):
        logits, decoupled, _, _ = model(inputs)
        mod.observe(logits=decoupled, target=y)
        for name, value in summed_scores(decoupled, y).items():
            expected[name] += value
        losses.append(nn.functional.cross_entropy(logits, y))
    torch.stack(losses).sum().backward()
    mod.step()
    for name in expected:
        assert mod.last["evidence"][name] == pytest.approx(expected[name], rel=1e-5)


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("observe_first", [True, False])
def test_accumulation_over_backward_passes_adds_up(set_to_none, observe_first):
    torch.manual_seed(0)
    model = TinyModel()
    mod = make_ogm(model)
    model.zero_grad(set_to_none=set_to_none)
    expected = {"audio": 0.0, "visual": 0.0}
    for inputs, y in batches(3, seed=5):
        logits, decoupled, _, _ = model(inputs)
        if observe_first:
            mod.observe(logits=decoupled, target=y)
        nn.functional.cross_entropy(logits, y).backward()
        if not observe_first:
            mod.observe(logits=decoupled, target=y)
        for name, value in summed_scores(decoupled, y).items():
            expected[name] += value
    mod.step()
    for name in expected:
        assert mod.last["evidence"][name] == pytest.approx(expected[name], rel=1e-5)


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("observe_first", [True, False])
@pytest.mark.parametrize("fused", [False, True])
def test_a_step_skipped_by_grad_scaler_never_leaks_its_evidence(set_to_none, observe_first, fused):
    torch.manual_seed(0)
    model = TinyModel()
    mod = make_ogm(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused)
    mod.attach(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    data = batches(4, seed=6)
    for index, (inputs, y) in enumerate(data):
        opt.zero_grad(set_to_none=set_to_none)
        logits, decoupled, _, _ = model(inputs)
        if observe_first:
            mod.observe(logits=decoupled, target=y)
        loss = nn.functional.cross_entropy(logits, y) * (float("inf") if index == 1 else 1.0)
        scaler.scale(loss).backward()
        if not observe_first:
            mod.observe(logits=decoupled, target=y)
        scaler.step(opt)
        scaler.update()
        if index == 2:  # the step right after the skipped one sees only its own batch
            scores = summed_scores(decoupled, y)
            for name in scores:
                assert mod.last["evidence"][name] == pytest.approx(scores[name], rel=1e-5)
    assert [r["step"] for r in mod.history] == [0, 1, 2]
    assert mod.step_count == 3


def test_evidence_of_discarded_gradients_is_dropped_without_a_step():
    torch.manual_seed(0)
    model = TinyModel()
    mod = make_ogm(model)
    first, second = batches(2, seed=7)
    for inputs, y in (first, second):
        model.zero_grad(set_to_none=False)
        logits, decoupled, _, _ = model(inputs)
        mod.observe(logits=decoupled, target=y)
        nn.functional.cross_entropy(logits, y).backward()
    mod.step()
    _, decoupled, _, _ = model(second[0])
    assert mod.last["evidence"]["audio"] == pytest.approx(summed_scores(decoupled, second[1])["audio"], rel=1e-5)


# ------------------------------------------------------------------ 2. attach
def test_attach_checks_the_optimizer_holds_the_parameters():
    model = TinyModel()
    mod = make_ogm(model)
    with pytest.raises(ValueError, match="holds none of the modulated parameters"):
        mod.attach(torch.optim.SGD(model.head.parameters(), lr=0.1))
    partial = torch.optim.SGD([*model.encoders["audio"].parameters(), *model.head.parameters()], lr=0.1)
    with pytest.warns(RuntimeWarning, match=r"does not hold 4 of the 8 modulated parameters \(visual: 0.weight"):
        mod.attach(partial)
    assert mod.attached_to is partial


def test_attach_twice_or_to_two_optimizers_is_an_error_and_detach_frees_it():
    model = TinyModel()
    mod = make_ogm(model)
    first = torch.optim.SGD(model.parameters(), lr=0.1)
    second = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = mod.attach(first)
    with pytest.raises(ValueError, match="already attached to this optimizer"):
        mod.attach(first)
    with pytest.raises(ValueError, match="already attached to another optimizer"):
        mod.attach(second)
    mod.detach()
    assert mod.attached_to is None and len(first._optimizer_step_pre_hooks) == 0
    mod.attach(second)
    mod.detach()
    handle = mod.attach(first)
    handle.remove()  # removing the handle directly detaches too
    assert mod.attached_to is None
    mod.attach(second)


@pytest.mark.parametrize("make_optimizer", [lambda ps: torch.optim.LBFGS(ps), lambda ps: torch.optim.SGD(ps, lr=0.1)])
def test_a_closure_step_is_a_clear_error_not_a_no_observe_warning(make_optimizer):
    torch.manual_seed(0)
    model = TinyModel()
    mod = make_ogm(model)
    opt = make_optimizer(model.parameters())
    mod.attach(opt)
    (inputs, y), = batches(1)

    def closure():
        opt.zero_grad()
        logits, decoupled, _, _ = model(inputs)
        mod.observe(logits=decoupled, target=y)
        loss = nn.functional.cross_entropy(logits, y)
        loss.backward()
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="closure"):
            opt.step(closure)
    assert mod.step_count == 0


def test_each_real_step_advances_the_counter_once():
    torch.manual_seed(0)
    model = TinyModel()
    mod = make_ogm(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mod.attach(opt)
    for inputs, y in batches(3):
        opt.zero_grad()
        logits, decoupled, _, _ = model(inputs)
        mod.observe(logits=decoupled, target=y)
        nn.functional.cross_entropy(logits, y).backward()
        opt.step()
    assert mod.step_count == 3 and [r["step"] for r in mod.history] == [0, 1, 2]


# ------------------------------------------------------------------ 3. parameters resolved when used
def one_step(model, mod, seed=0):
    (inputs, y), = batches(1, seed=seed)
    model.zero_grad(set_to_none=True)
    logits, decoupled, _, _ = model(inputs)
    mod.observe(logits=decoupled, target=y)
    nn.functional.cross_entropy(logits, y).backward()
    plain = encoder_grads(model)
    k = mod.step()
    return plain, k


def test_a_parameter_frozen_at_build_and_unfrozen_later_is_modulated():
    torch.manual_seed(0)
    model = TinyModel()
    model.encoders["audio"].requires_grad_(False)
    mod = make_ogm(model)
    model.encoders["audio"].requires_grad_(True)
    plain, k = one_step(model, mod)
    assert k["audio"].item() < 1.0
    for name, p in model.encoders["audio"].named_parameters():
        torch.testing.assert_close(p.grad, plain[f"encoders.audio.{name}"] * k["audio"])


@pytest.mark.parametrize("materialise", ["to_empty", "assign"])
def test_a_model_built_on_meta_then_materialised_is_modulated(materialise):
    torch.manual_seed(0)
    source = TinyModel()
    with torch.device("meta"):
        model = TinyModel()
    mod = make_ogm(model)
    if materialise == "to_empty":
        model.to_empty(device="cpu")
        model.load_state_dict(source.state_dict())
    else:
        model.load_state_dict(source.state_dict(), assign=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mod.attach(opt)  # no "optimizer does not hold" warning: the new parameters were picked up
    plain, k = one_step(model, mod)
    assert k["audio"].item() < 1.0
    for name, p in model.encoders["audio"].named_parameters():
        torch.testing.assert_close(p.grad, plain[f"encoders.audio.{name}"] * k["audio"])


def test_filters_are_applied_when_parameters_are_resolved_again():
    torch.manual_seed(0)
    model = TinyModel()
    mod = gradmod.OGM({n: model.encoders[n] for n in model.names}, alpha=0.8, param_filter=gradmod.filters.weights)
    model.load_state_dict(TinyModel().state_dict(), assign=True)
    assert all(p.dim() == 2 for params in mod.params.values() for p in params)
    assert all(any(p is q for q in model.parameters()) for params in mod.params.values() for p in params)


def test_a_parameter_moved_into_two_modalities_after_build_fails_by_name():
    model = TinyModel()
    mod = make_ogm(model)
    model.encoders["visual"][0].weight = model.encoders["audio"][0].weight
    with pytest.raises(ValueError, match=r"parameter '0.weight' of modality 'visual' is also '0.weight' of modality 'audio'"):
        mod.params


def test_flattened_fsdp1_parameters_fail_by_name():
    model = TinyModel()
    model.encoders["audio"][0].weight._fsdp_flattened = True  # what FSDP1 marks its flat parameters with
    with pytest.raises(ValueError, match="'0.weight' of modality 'audio' is a flattened FSDP1"):
        make_ogm(model)


# ------------------------------------------------------------------ 4. features mode
class TwoTower(nn.Module):
    """Encoders and a concat head; optionally routes features through a modulator's scale_grad."""

    def __init__(self):
        super().__init__()
        self.audio, self.visual, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(8, 3)
        self.modulator = None

    def forward(self, xa, xv):
        fa, fv = self.audio(xa), self.visual(xv)
        if self.modulator is not None:
            fa, fv = self.modulator.scale_grad(fa, "audio"), self.modulator.scale_grad(fv, "visual")
        decoupled = gradmod.functional.decouple_linear(self.head.weight, self.head.bias, {"audio": fa, "visual": fv})
        return self.head(torch.cat([fa, fv], 1)), decoupled, {"audio": fa, "visual": fv}


def tower_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 4, generator=g) * 3, torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)


def params_mode_grads(state, data):
    model = TwoTower()
    model.load_state_dict(state)
    mod = gradmod.OGM({"audio": model.audio, "visual": model.visual}, alpha=0.8)
    logits, decoupled, _ = model(*data[:2])
    mod.observe(logits=decoupled, target=data[2])
    nn.functional.cross_entropy(logits, data[2]).backward()
    k = mod.step()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, k


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_features_mode_with_scale_grad_equals_params_mode(compiled):
    torch.manual_seed(0)
    model = TwoTower()
    expected, k = params_mode_grads(model.state_dict(), tower_data())
    assert k["audio"].item() < 1.0
    mod = gradmod.OGM({"audio": model.audio, "visual": model.visual}, alpha=0.8, apply="features")
    model.modulator = mod
    forward = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    mod.attach(opt)
    for _ in range(2):  # compiled: the second call reuses the graph with the new coefficients
        opt.zero_grad()
        xa, xv, y = tower_data()
        logits, decoupled, _ = forward(xa, xv)
        mod.observe(logits=decoupled, target=y)
        nn.functional.cross_entropy(logits, y).backward()
        opt.step()
        assert mod.last["coefficients"]["audio"] == k["audio"].item()
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, expected[name], msg=name)


def test_features_hooked_on_a_compiled_graphs_output_fail_by_name_at_the_first_step():
    """The feature is consumed inside the compiled graph: a hook on the returned tensor never sees that gradient."""
    torch.manual_seed(0)
    model = TwoTower()
    mod = gradmod.OGM({"audio": model.audio, "visual": model.visual}, alpha=0.8, apply="features")
    compiled = torch.compile(model, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mod.attach(opt)
    xa, xv, y = tower_data()
    logits, decoupled, features = compiled(xa, xv)
    with pytest.raises(ValueError, match="one torch.compile'd graph returned together with the logits.*scale_grad"):
        mod.observe(logits=decoupled, target=y, features=features)
    logits, _, features = compiled(xa, xv)  # measured outside the graph: the routing check at the step catches it
    mod.observe(logits=gradmod.functional.decouple_linear(model.head.weight, model.head.bias, features), target=y,
                features=features)
    nn.functional.cross_entropy(logits, y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="modality 'audio'.*without passing through its scaled feature tensor"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert mod.step_count == 0


def test_features_hooked_on_a_compiled_graphs_output_that_an_auxiliary_loss_also_uses_fail_by_name():
    """The head inside the graph consumes the features and an auxiliary loss outside uses them too: the hooks would
    scale the auxiliary gradient only, and the routing check would pass on it — so observe() refuses them."""
    torch.manual_seed(0)
    model = TwoTower()
    mod = gradmod.OGM({"audio": model.audio, "visual": model.visual}, alpha=0.8, apply="features")
    compiled = torch.compile(model, backend="aot_eager")
    mod.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    xa, xv, y = tower_data()
    logits, decoupled, features = compiled(xa, xv)
    with pytest.raises(ValueError, match="hooks on the returned features see only the gradient from outside the graph"):
        mod.observe(logits=decoupled, target=y, features=features)


def test_features_mode_observe_after_backward_raises_instead_of_recording():
    torch.manual_seed(0)
    model = TwoTower()
    mod = gradmod.OGM({"audio": model.audio, "visual": model.visual}, alpha=0.8, apply="features")
    xa, xv, y = tower_data()
    logits, decoupled, features = model(xa, xv)
    nn.functional.cross_entropy(logits, y).backward()
    mod.observe(logits=decoupled, target=y, features=features)
    with pytest.raises(RuntimeError, match="before observe\\(\\) gave its coefficient"):
        mod.step()
    assert mod.history == []


def test_features_mode_without_routing_raises():
    torch.manual_seed(0)
    model = TwoTower()
    mod = gradmod.OGM({"audio": model.audio, "visual": model.visual}, alpha=0.8, apply="features")
    xa, xv, y = tower_data()
    logits, decoupled, _ = model(xa, xv)
    mod.observe(logits=decoupled, target=y)  # neither features= nor scale_grad
    nn.functional.cross_entropy(logits, y).backward()
    with pytest.raises(RuntimeError, match=r"^gradmod: features mode was not applied: a backward pass reached modality "
                       r"'audio''s parameters without passing through its scaled feature tensor: pass the tensor the "
                       r"loss is computed from to observe\(features=...\) \(under torch.compile, call "
                       r"mod.scale_grad\(feature, name\) inside forward instead\)$"):
        mod.step()


def test_features_mode_outside_the_window_scales_nothing_and_checks_nothing():
    torch.manual_seed(0)
    model = TwoTower()
    state = copy.deepcopy(model.state_dict())
    mod = gradmod.OGM({"audio": model.audio, "visual": model.visual}, alpha=0.8, apply="features", start_step=1)
    model.modulator = mod
    xa, xv, y = tower_data()
    logits, decoupled, _ = model(xa, xv)
    mod.observe(logits=decoupled, target=y)
    nn.functional.cross_entropy(logits, y).backward()
    assert mod.step() is None
    plain = TwoTower()
    plain.load_state_dict(state)
    nn.functional.cross_entropy(plain(xa, xv)[0], y).backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert mod.history == []


def test_features_mode_scale_grad_needs_the_features_applier():
    model = TwoTower()
    mod = gradmod.OGM({"audio": model.audio, "visual": model.visual}, alpha=0.8)
    with pytest.raises(ValueError, match="scale_grad\\(\\) needs apply='features'"):
        mod.scale_grad(torch.ones(2, 4, requires_grad=True), "audio")
    with pytest.raises(ValueError, match="features= is only used by appliers that act during backward"):
        mod.observe(logits={"audio": torch.zeros(1, 3), "visual": torch.zeros(1, 3)}, target=torch.zeros(1, dtype=torch.long), features={})


def test_invalid_applier_options_cannot_be_expressed():
    model = TwoTower()
    mods = {"audio": model.audio, "visual": model.visual}
    with pytest.raises(TypeError):
        gradmod.FeaturesApplier(noise="ge")
    with pytest.raises(ValueError, match="noise configure the params applier.*pass noise=None"):
        gradmod.OGMGE(mods, alpha=0.5, apply="features")
    with pytest.raises(ValueError, match="param_filter configure the params applier"):
        gradmod.OGM(mods, alpha=0.5, apply="features", param_filter=gradmod.filters.weights)
    applier = gradmod.ParamsApplier(noise="ge")
    gradmod.Modulator(mods, measure=gradmod.measures.SoftmaxScore(), policy=gradmod.policies.OGMPolicy(0.5), apply=applier)
    with pytest.raises(ValueError, match="already bound"):
        gradmod.Modulator(mods, measure=gradmod.measures.SoftmaxScore(), policy=gradmod.policies.OGMPolicy(0.5), apply=applier)


# ------------------------------------------------------------------ 5. degenerate batches
def degenerate_logits(batch=4):
    """Audio's true-class probability underflows to exactly 0 in float32."""
    y = torch.zeros(batch, dtype=torch.long)
    audio = torch.zeros(batch, 3)
    audio[:, 0] = -1e4
    return {"audio": audio, "visual": torch.randn(batch, 3)}, y


def grads_set(params):
    for p in params:
        p.grad = torch.ones_like(p)


def test_a_degenerate_step_is_unmodulated_recorded_and_warned_once():
    a, v = nn.Linear(2, 2), nn.Linear(2, 2)
    mod = gradmod.OGMGE({"audio": a, "visual": v}, alpha=0.8, seed=0)
    logits, y = degenerate_logits()
    for attempt in range(2):
        grads_set([*a.parameters(), *v.parameters()])
        mod.observe(logits=logits, target=y)
        if attempt == 0:
            with pytest.warns(RuntimeWarning, match="degenerate step 0: the evidence of 'audio' = 0.0"):
                assert mod.step() is None
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                assert mod.step() is None
        assert all(torch.equal(p.grad, torch.ones_like(p)) for p in (*a.parameters(), *v.parameters()))
    assert [r["status"] for r in mod.history] == ["degenerate", "degenerate"]
    assert mod.history[0]["coefficients"] == {"audio": 1.0, "visual": 1.0}
    assert mod.step_count == 2


def test_strict_raises_on_a_degenerate_step_and_leaves_state():
    a, v = nn.Linear(2, 2), nn.Linear(2, 2)
    mod = gradmod.OGM({"audio": a, "visual": v}, alpha=0.8, strict=True)
    logits, y = degenerate_logits()
    mod.observe(logits=logits, target=y)
    with pytest.raises(ValueError, match="degenerate step 0"):
        mod.step()
    assert mod.step_count == 0 and mod.history == []
    with pytest.raises(ValueError, match="needs validate=True"):
        gradmod.OGM({"audio": a, "visual": v}, alpha=0.8, strict=True, validate=False)


def test_a_degenerate_step_without_validation_is_neutral_on_the_device():
    a, v = nn.Linear(2, 2), nn.Linear(2, 2)
    mod = gradmod.OGMGE({"audio": a, "visual": v}, alpha=0.8, validate=False, seed=0)
    logits, y = degenerate_logits()
    for p in (*a.parameters(), *v.parameters()):  # spread gradients: GE noise on them would be visible
        p.grad = torch.randn_like(p)
    before = [p.grad.clone() for p in (*a.parameters(), *v.parameters())]
    mod.observe(logits=logits, target=y)
    mod.step()
    assert all(torch.equal(p.grad, b) for p, b in zip((*a.parameters(), *v.parameters()), before))
    assert mod.last["status"] == "degenerate"


def test_an_empty_micro_batch_adds_nothing_and_an_empty_step_is_degenerate():
    a, v = nn.Linear(2, 2), nn.Linear(2, 2)
    mod = gradmod.OGM({"audio": a, "visual": v}, alpha=0.8)
    empty = {"audio": torch.zeros(0, 3), "visual": torch.zeros(0, 3)}
    mod.observe(logits=empty, target=torch.zeros(0, dtype=torch.long))
    full = {"audio": torch.tensor([[4.0, 0.0, 0.0]]), "visual": torch.tensor([[1.0, 0.0, 0.0]])}
    mod.observe(logits=full, target=torch.tensor([0]))
    grads_set([*a.parameters(), *v.parameters()])
    assert mod.step()["audio"].item() < 1.0
    mod.observe(logits=empty, target=torch.zeros(0, dtype=torch.long))
    with pytest.warns(RuntimeWarning, match="degenerate"):
        assert mod.step() is None


@pytest.mark.parametrize("preset", ["OGM", "DGM"])
def test_ignored_targets_are_excluded_from_the_evidence(preset):
    a, v = nn.Linear(2, 2), nn.Linear(2, 2)
    mod = gradmod.OGM({"audio": a, "visual": v}, alpha=0.8) if preset == "OGM" else gradmod.DGM({"audio": a, "visual": v})
    logits = {"audio": torch.randn(5, 3), "visual": torch.randn(5, 3)}
    y = torch.tensor([0, -100, 2, -100, 1])
    kept = y != -100
    mod.observe(logits=logits, target=y)
    grads_set([*a.parameters(), *v.parameters()])
    mod.step()
    fresh = gradmod.OGM({"audio": a, "visual": v}, alpha=0.8) if preset == "OGM" else gradmod.DGM({"audio": a, "visual": v})
    fresh.observe(logits={n: z[kept] for n, z in logits.items()}, target=y[kept])
    fresh.step()
    for name in logits:
        assert mod.last["evidence"][name] == pytest.approx(fresh.last["evidence"][name], rel=1e-6)
    with pytest.raises(ValueError, match="outside"):
        mod.observe(logits=logits, target=torch.tensor([0, -7, 2, 1, 1]))


# ------------------------------------------------------------------ 6. inputs
@pytest.mark.parametrize("alpha", [1, 0.5, np.float32(0.5), np.float64(0.5), torch.tensor(0.5), torch.tensor(1, dtype=torch.int64)])
def test_strengths_accept_python_numpy_and_tensor_reals(alpha):
    mod = gradmod.OGM({"audio": nn.Linear(2, 2), "visual": nn.Linear(2, 2)}, alpha=alpha)
    assert mod.policy.strength == pytest.approx(float(alpha))
    assert gradmod.methods.pdmp.PDMPPolicy(("a", "b"), alpha, alpha).gamma_p == pytest.approx(float(alpha))
    assert gradmod.methods.mixup.MultimodalMixup(alpha).concentration == pytest.approx(float(alpha))


@pytest.mark.parametrize("bad", [True, np.bool_(True), torch.tensor(True), "0.5", None, torch.ones(2), 1j])
def test_strengths_reject_bools_and_non_reals_with_a_type_error(bad):
    with pytest.raises(TypeError):
        gradmod.OGM({"audio": nn.Linear(2, 2), "visual": nn.Linear(2, 2)}, alpha=bad)


def test_a_tensor_where_a_per_modality_mapping_is_expected_is_a_named_type_error():
    mod = gradmod.OGM({"audio": nn.Linear(2, 2), "visual": nn.Linear(2, 2)}, alpha=0.5)
    with pytest.raises(TypeError, match=r"observe\(logits=...\) must be a mapping modality name -> tensor.*got Tensor"):
        mod.observe(logits=torch.zeros(4, 3), target=torch.zeros(4, dtype=torch.long))
    dgm = gradmod.DGM({"audio": nn.Linear(2, 2), "visual": nn.Linear(2, 2)})
    with pytest.raises(TypeError, match=r"observe\(scores=...\) must be a mapping"):
        dgm.observe(scores=[torch.zeros(4, 3)], target=torch.zeros(4, dtype=torch.long))


# ------------------------------------------------------------------ 7. the default seed
def train_tiny(with_modulator: bool, steps: int = 5) -> list[torch.Tensor]:
    torch.manual_seed(123)
    model = TinyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if with_modulator:
        make_default = gradmod.OGM({n: model.encoders[n] for n in model.names}, alpha=0)
        make_default.attach(opt)
    for _ in range(steps):  # data drawn from the global RNG: any draw by gradmod would shift it
        y = torch.randint(0, 4, (8,))
        inputs = {n: torch.randn(8, 6) + nn.functional.one_hot(y, 6) for n in model.names}
        opt.zero_grad()
        logits, decoupled, _, _ = model(inputs)
        if with_modulator:
            make_default.observe(logits=decoupled, target=y)
        nn.functional.cross_entropy(logits, y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_adding_ogm_with_alpha_zero_leaves_a_run_bit_identical():
    without, with_ = train_tiny(False), train_tiny(True)
    assert all(torch.equal(a, b) for a, b in zip(without, with_))


def test_the_default_seed_draws_nothing_and_follows_manual_seed():
    mods = {"audio": nn.Linear(2, 2), "visual": nn.Linear(2, 2)}
    torch.manual_seed(7)
    state = torch.get_rng_state()
    first = gradmod.OGMGE(mods, alpha=0.5).seed
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(7)
    assert gradmod.OGMGE(mods, alpha=0.5).seed == first
    torch.manual_seed(8)
    assert gradmod.OGMGE(mods, alpha=0.5).seed != first


# ------------------------------------------------------------------ 8. state_dict
def test_state_dict_has_a_version_and_loads_version_1():
    model = TinyModel()
    mod = make_ogm(model)
    one_step(model, mod)
    state = mod.state_dict()
    assert state["version"] == 2
    record = mod.last
    version_1 = {
        "names": ["audio", "visual"],
        "step": 1,
        "seed": 5,
        "pending": None,
        "history": [
            (0, torch.tensor(list(record["evidence"].values())), torch.tensor(list(record["ratios"].values())),
             torch.tensor(list(record["coefficients"].values())))
        ],
        "warned_no_observe": True,
    }
    fresh = make_ogm(TinyModel())
    fresh.load_state_dict(version_1)
    assert fresh.step_count == 1 and fresh.seed == 5
    loaded = fresh.last
    assert loaded["status"] == "applied" and loaded["step"] == 0
    for key in ("evidence", "ratios", "coefficients"):
        for name in record[key]:
            assert loaded[key][name] == pytest.approx(record[key][name], rel=1e-6)
    with pytest.raises(ValueError, match="newer"):
        fresh.load_state_dict({**state, "version": 99})


def test_pdmp_checks_the_ranking_names_on_load():
    mods = {"audio": nn.Linear(2, 2), "visual": nn.Linear(2, 2)}
    mod = gradmod.PDMP(mods, ("audio", "visual"), 0.5, 0.5)
    state = mod.state_dict()
    state["policy"] = {"ranking": ["audio", "text"]}
    with pytest.raises(ValueError, match=r"saved PDMP ranking must name exactly the modalities.*missing \['visual'\], unknown \['text'\]"):
        mod.load_state_dict(state)
    state["policy"] = {"ranking": ["visual", "audio"]}
    mod.load_state_dict(state)
    assert mod.policy.ranking == ("visual", "audio")


def test_history_keeps_the_whole_run_by_default_and_says_when_it_drops():
    mods = {"audio": [nn.Parameter(torch.ones(1))], "visual": [nn.Parameter(torch.ones(1))]}
    static = {"audio": 0.8, "visual": 0.4}
    mod = gradmod.PDMP(mods, ("audio", "visual"), 0.5, 0.5, static_metrics=static, backend="reference")
    for _ in range(10_050):
        mod.step()
    assert len(mod.history) == 10_050 and mod.history_dropped == 0
    bounded = gradmod.PDMP(mods, ("audio", "visual"), 0.5, 0.5, static_metrics=static, history_size=100)
    with pytest.warns(RuntimeWarning, match="keeps the last 100 steps"):
        for _ in range(4096 + 200):
            bounded.step()
    records = bounded.history
    assert len(records) == 100 and records[-1]["step"] == 4096 + 199
    assert bounded.history_dropped == 4096 + 100


# ------------------------------------------------------------------ 9. no references to files users do not have
def test_the_package_cites_papers_by_title_not_by_file():
    from pathlib import Path

    root = Path(gradmod.__file__).parent
    offenders = [
        f"{path.relative_to(root)}:{number}"
        for path in root.rglob("*.py")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if any(word in line for word in ("paper 00", "shared/papers", "papers/README", "``00"))
    ]
    assert offenders == []


def test_skip_step_drops_the_evidence_without_counting_a_step():
    torch.manual_seed(0)
    model = TinyModel()
    mod = make_ogm(model)
    first, second = batches(2, seed=9)
    _, decoupled, _, _ = model(first[0])
    mod.observe(logits=decoupled, target=first[1])
    mod.skip_step()
    plain, _ = one_step(model, mod, seed=9)  # one_step observes batches(1, seed=9): the first batch again
    assert mod.step_count == 1
    _, decoupled, _, _ = model(first[0])
    assert mod.last["evidence"]["audio"] == pytest.approx(summed_scores(decoupled, first[1])["audio"], rel=1e-5)


def test_attach_reaches_the_torch_optimizer_inside_a_wrapper():
    class Wrapper:  # the shape of Accelerate's AcceleratedOptimizer
        def __init__(self, optimizer):
            self.optimizer = optimizer

        def step(self):
            self.optimizer.step()

    model = TinyModel()
    mod = make_ogm(model)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    mod.attach(Wrapper(inner))
    assert mod.attached_to is inner
    with pytest.raises(TypeError, match="needs a torch.optim.Optimizer"):
        make_ogm(model).attach(object())


# ------------------------------------------------------------------ 10. checkpoints taken anywhere in a step
def observed_not_stepped(mod, seed=3):
    """One observe() on a fresh TinyModel batch, no step: the evidence stays pending."""
    torch.manual_seed(seed)
    model = TinyModel()
    (inputs, y), = batches(1, seed=seed)
    _, decoupled, _, _ = model(inputs)
    mod.observe(logits=decoupled, target=y)
    return summed_scores(decoupled, y)


def with_grads(mod):
    for params in mod.params.values():
        grads_set(params)
    return mod


def test_a_checkpoint_between_observe_and_step_keeps_the_pending_evidence():
    mod = make_ogm(TinyModel())
    scores = observed_not_stepped(mod)
    state = mod.state_dict()
    assert state["pending"].tolist() == pytest.approx([scores["audio"], scores["visual"]], rel=1e-6)
    resumed = with_grads(make_ogm(TinyModel()))
    resumed.load_state_dict(copy.deepcopy(state))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the evidence is there: no "step without observe()" warning
        assert resumed.step() is not None
    assert resumed.last["evidence"] == pytest.approx(scores, rel=1e-6)


def capture_safe_ogm(model=None, **options):
    model = model or TinyModel()
    return gradmod.OGM({n: model.encoders[n] for n in model.names}, alpha=0.8, seed=1, validate=False, capture_safe=True, **options)


def test_a_capture_safe_checkpoint_holds_pending_evidence_only_when_there_is_some():
    mod = with_grads(capture_safe_ogm())
    scores = observed_not_stepped(mod)
    state = copy.deepcopy(mod.state_dict())
    assert state["pending"].tolist() == pytest.approx([scores["audio"], scores["visual"]], rel=1e-6)
    mod.step()
    assert mod.state_dict()["pending"] is None  # the zeroed buffer is no pending evidence
    other = with_grads(capture_safe_ogm())
    other.step()  # its buffers exist: loading writes into them
    buffers = (other._device_step, other._pending)
    other.load_state_dict(copy.deepcopy(state))
    assert (other._device_step, other._pending) == buffers and other.step_count == 0
    other.step()
    assert other.last["evidence"] == pytest.approx(scores, rel=1e-6) and other.last["status"] == "applied"


def test_a_capture_safe_checkpoint_is_not_changed_by_later_steps():
    mod = with_grads(capture_safe_ogm())
    observed_not_stepped(mod)
    state = mod.state_dict()
    saved = state["pending"].clone()
    mod.step()
    assert torch.equal(state["pending"], saved)


def test_a_fresh_capture_safe_modulator_resumes_pending_evidence():
    mod = with_grads(capture_safe_ogm())
    scores = observed_not_stepped(mod)
    fresh = with_grads(capture_safe_ogm())
    fresh.load_state_dict(mod.state_dict())
    fresh.step()
    assert fresh.last["evidence"] == pytest.approx(scores, rel=1e-6)


def test_an_ordinary_modulator_resumes_pending_evidence_and_keeps_counting_on_the_host():
    mod = with_grads(make_ogm(TinyModel()))
    scores = observed_not_stepped(mod)
    fresh = with_grads(make_ogm(TinyModel()))
    fresh.load_state_dict(mod.state_dict())
    fresh.step()
    fresh.step()
    assert fresh.step_count == 2 and fresh._device_step is None
    assert fresh.history[0]["evidence"] == pytest.approx(scores, rel=1e-6)


def test_warnings_already_shown_stay_shown_after_loading():
    mod = with_grads(make_ogm(TinyModel()))
    with pytest.warns(RuntimeWarning, match="without observe"):
        mod.step()
    state = mod.state_dict()
    assert state["warned"] == ["no_observe"]
    resumed = with_grads(make_ogm(TinyModel()))
    resumed.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed.step()


def version_1_state(warned: bool, history=None):
    entry = (0, torch.tensor([2.0, 1.0]), torch.tensor([2.0, 0.5]), torch.tensor([0.25, 1.0]))
    return {"names": ["audio", "visual"], "step": 1, "seed": 5, "pending": None,
            "history": [entry] if history is None else history, "warned_no_observe": warned}


@pytest.mark.parametrize("warned", [True, False])
def test_a_version_1_state_restores_its_warning_flag_and_drops_nothing(warned):
    mod = with_grads(make_ogm(TinyModel()))
    mod.load_state_dict(version_1_state(warned))
    assert mod.history_dropped == 0 and mod.state_dict()["warned"] == (["no_observe"] if warned else [])
    assert mod.last == {"step": 0, "status": "applied", "evidence": {"audio": 2.0, "visual": 1.0},
                        "ratios": {"audio": 2.0, "visual": 0.5}, "coefficients": {"audio": 0.25, "visual": 1.0}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mod.step()
    assert [str(w.message).count("without observe") for w in caught] == ([] if warned else [1])


def test_a_version_1_state_without_applied_steps_loads():
    mod = make_ogm(TinyModel())
    mod.load_state_dict(version_1_state(False, history=[]))
    assert mod.step_count == 1 and mod.history == []


def test_policy_state_for_a_policy_that_cannot_load_it_is_an_error_naming_the_policy():
    class Halve:
        def __call__(self, evidence):
            return {name: 0.5 for name in evidence}

        def __repr__(self):
            return "Halve()"

    mods = {"audio": nn.Linear(2, 2), "visual": nn.Linear(2, 2)}
    pdmp = gradmod.PDMP(mods, ("audio", "visual"), 0.5, 0.5)
    plain = gradmod.Modulator({"audio": nn.Linear(2, 2), "visual": nn.Linear(2, 2)}, measure=gradmod.measures.SoftmaxScore(),
                              policy=Halve())
    with pytest.raises(ValueError, match=r"^state_dict holds policy state, but Halve\(\) has no load_state_dict\(\)$"):
        plain.load_state_dict(pdmp.state_dict())
    with pytest.raises(gradmod.policies.PolicyError, match=r"^policy Halve\(\) returned list"):
        plain.policy = type("ListPolicy", (Halve,), {"__call__": lambda self, evidence: [0.5, 0.5]})()
        plain.observe(logits={"audio": torch.zeros(1, 2), "visual": torch.zeros(1, 2)}, target=torch.tensor([0]))
        plain.step()


# ------------------------------------------------------------------ 11. warnings and messages
def test_the_once_warnings_point_at_the_callers_line_and_say_so():
    mod = with_grads(make_ogm(TinyModel()))
    with pytest.warns(RuntimeWarning) as caught:
        mod.step()
    assert caught[0].filename == __file__
    assert str(caught[0].message) == (
        "gradmod: optimizer step without observe() since the last step: not modulated (this warning is shown once)"
    )
    model = TinyModel()
    partial = torch.optim.SGD(model.encoders["audio"].parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning) as caught:
        make_ogm(model).attach(partial)
    assert caught[0].filename == __file__


def test_a_degenerate_step_names_every_degenerate_modality():
    mod = with_grads(make_ogm(TinyModel()))
    mod.observe(logits={"audio": torch.zeros(0, 4), "visual": torch.zeros(0, 4)}, target=torch.zeros(0, dtype=torch.long))
    with pytest.warns(RuntimeWarning) as caught:
        assert mod.step() is None
    assert str(caught[0].message) == (
        "gradmod: degenerate step 0: the evidence of 'audio' = 0.0, 'visual' = 0.0 is not finite and > 0 (e.g. an empty "
        "batch, every target ignored, or a score that underflowed); such steps are left unmodulated and marked "
        "'degenerate' in the history (this warning is shown once)"
    )
    assert mod.state_dict()["warned"] == ["degenerate"]
    assert mod.last["status"] == "degenerate"


@pytest.mark.parametrize("layers,more", [(10, ""), (11, " and 1 more"), (12, " and 2 more")])
def test_attach_lists_at_most_ten_parameters_the_optimizer_does_not_hold(layers, more):
    audio, visual = nn.Linear(2, 2), nn.Sequential(*[nn.Linear(2, 2, bias=False) for _ in range(layers)])
    mod = gradmod.OGM({"audio": audio, "visual": visual}, alpha=0.5)
    names = ", ".join(f"visual: {i}.weight" for i in range(10))
    expected = (f"gradmod: the optimizer does not hold {layers} of the {layers + 2} modulated parameters ({names}{more}); "
                "their gradients are modulated but another optimizer (or none) steps them")
    with pytest.warns(RuntimeWarning) as caught:
        mod.attach(torch.optim.SGD(audio.parameters(), lr=0.1))
    assert str(caught[0].message) == expected
    with pytest.raises(ValueError, match=r"^the optimizer holds none of the modulated parameters: attach the modulator to "
                       r"the optimizer that steps the modalities' encoders$"):
        gradmod.OGM({"audio": nn.Linear(2, 2), "visual": nn.Linear(2, 2)}, alpha=0.5).attach(torch.optim.SGD(audio.parameters(), lr=0.1))


def test_attaching_twice_names_the_modulator():
    model = TinyModel()
    mod = make_ogm(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    mod.attach(optimizer)
    with pytest.raises(ValueError, match=r"^this modulator is already attached to this optimizer; it steps with one "
                       r"optimizer, once \(detach\(\) first"):
        mod.attach(optimizer)


# ------------------------------------------------------------------ 12. features mode, every path to a step
def observed_tower():
    """A TwoTower routed through a features-mode OGM (scale_grad), after one forward and its observe()."""
    torch.manual_seed(0)
    model = TwoTower()
    mod = gradmod.OGM({"audio": model.audio, "visual": model.visual}, alpha=0.8, apply="features")
    model.modulator = mod
    xa, xv, y = tower_data()
    logits, decoupled, _ = model(xa, xv)
    mod.observe(logits=decoupled, target=y)
    return model, mod, logits, y


def test_features_mode_needs_an_observe_before_every_backward_pass():
    model, mod, logits, y = observed_tower()
    nn.functional.cross_entropy(logits, y).backward()
    logits, _, _ = model(*tower_data()[:2])
    nn.functional.cross_entropy(logits, y).backward()  # a second pass without its observe()
    with pytest.raises(RuntimeError, match=r"^gradmod: features mode was not applied: a backward pass reached modality "
                       r"'audio''s parameters before observe\(\) gave its coefficient"):
        mod.step()  # the first of the problems found (audio's, then visual's) is raised


@pytest.mark.parametrize("after", ["build", "reset", "skip_step", "load_state_dict", "step"])
def test_features_mode_without_an_observe_since_is_not_modulated(after):
    _, mod, logits, y = observed_tower()
    if after == "build":
        mod = gradmod.OGM({"audio": nn.Linear(4, 4), "visual": nn.Linear(4, 4)}, alpha=0.8, apply="features")
    elif after == "reset":
        mod.reset()
    elif after == "skip_step":
        mod.skip_step()
    elif after == "load_state_dict":
        mod.load_state_dict(mod.state_dict())
    else:
        nn.functional.cross_entropy(logits, y).backward()
        assert mod.step() is not None
    with pytest.warns(RuntimeWarning, match="without observe"):
        assert mod.step() is None


# ------------------------------------------------------------------ 13. capture-safe steps
def run_recorded(mod, model, steps):
    """Each step: gradients of the encoders after a fixed backward, observe, step; returns every step's gradients."""
    grads = []
    for index, (inputs, y) in enumerate(batches(steps, seed=11)):
        model.zero_grad(set_to_none=True)
        logits, decoupled, _, _ = model(inputs)
        mod.observe(logits=decoupled, target=y)
        nn.functional.cross_entropy(logits, y).backward()
        mod.step()
        grads.append(encoder_grads(model))
    return grads


def test_capture_safe_steps_change_the_gradients_exactly_as_ordinary_steps():
    torch.manual_seed(0)
    model = TinyModel()
    state = copy.deepcopy(model.state_dict())
    plain = gradmod.OGM({n: model.encoders[n] for n in model.names}, alpha=0.8, validate=False, start_step=1, stop_step=3)
    expected = run_recorded(plain, model, 4)
    model.load_state_dict(state)
    safe = capture_safe_ogm(model, start_step=1, stop_step=3)
    got = run_recorded(safe, model, 4)
    assert [r["status"] for r in safe.history] == ["outside", "applied", "applied", "outside"]
    assert any(r["coefficients"]["audio"] < 1 for r in safe.history)
    for step, (a, b) in enumerate(zip(expected, got)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), step


def test_capture_safe_features_mode_consumes_each_decision_once():
    torch.manual_seed(0)
    model = TwoTower()
    mod = gradmod.OGM({"audio": model.audio, "visual": model.visual}, alpha=0.8, apply="features", validate=False,
                      capture_safe=True)
    model.modulator = mod
    xa, xv, y = tower_data()
    logits, decoupled, _ = model(xa, xv)
    mod.observe(logits=decoupled, target=y)
    nn.functional.cross_entropy(logits, y).backward()
    first = mod.step()
    assert first["audio"].item() < 1.0 and mod.last["status"] == "applied"
    second = mod.step()  # no observe(): zero evidence, a neutral degenerate step
    assert {n: k.item() for n, k in second.items()} == {"audio": 1.0, "visual": 1.0}
    assert [r["status"] for r in mod.history] == ["applied", "degenerate"]


def test_a_capture_safe_modulator_stepped_before_any_observe_keeps_its_buffers_with_its_parameters():
    mod = gradmod.OGM({"audio": [], "visual": []}, alpha=0.8, apply="features", validate=False, capture_safe=True)
    mod.step()
    assert mod.state_dict()["step"] == 1 and mod.last["status"] == "degenerate"
    assert mod._device_step.device == torch.device("cpu")


class _NoHostRead(torch.overrides.TorchFunctionMode):
    """Fails when the value of ``watched`` is read on the host."""

    def __init__(self, watched):
        super().__init__()
        self.watched = watched

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.tolist) and args[0] is self.watched:
            raise AssertionError(f"host read of the watched tensor: {func.__name__}")
        return func(*args, **(kwargs or {}))


def test_capture_safe_modulators_read_gradscalers_found_inf_on_the_device():
    model = TinyModel()
    mod = capture_safe_ogm(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)
    mod.attach(optimizer)
    for skipped in (0.0, 1.0):
        for params in mod.params.values():
            grads_set(params)
        observed_not_stepped(mod)
        optimizer.found_inf = torch.tensor(skipped)  # what GradScaler sets for optimizers that skip on the device
        with _NoHostRead(optimizer.found_inf):
            optimizer.step()
    assert mod.step_count == 1  # the second step was skipped, on the device


# ------------------------------------------------------------------ 14. torch.distributed, two ranks simulated
class OtherRank:
    """Stands in for ``torch.distributed`` with one more rank: collectives combine this rank's tensor with the
    other rank's, by the reduce operation given (SUM: evidence; MAX: the seed bounds)."""

    ReduceOp = torch.distributed.ReduceOp

    def __init__(self, evidence, seed):
        self.others = {self.ReduceOp.SUM: torch.tensor(evidence), self.ReduceOp.MAX: torch.tensor([seed, -seed])}
        self.calls = []

    def broadcast_object_list(self, objects, *, src):
        assert src in (0, 1), src  # this process is rank 1; rank 0 is the other
        if src == 0:
            objects[:] = [self.others[self.ReduceOp.MAX][0].item()]

    def all_reduce(self, tensor, op=torch.distributed.ReduceOp.SUM):
        other = self.others[op].to(tensor.dtype)
        self.calls.append(op)
        if op == self.ReduceOp.SUM:
            tensor.add_(other)
        else:
            torch.maximum(tensor, other, out=tensor)


@pytest.fixture
def other_rank(monkeypatch):
    def install(evidence=(0.0, 0.0), seed=1):
        fake = OtherRank(evidence, seed)
        monkeypatch.setattr(gradmod.modulator, "dist", fake)
        monkeypatch.setattr(gradmod.modulator, "distributed", lambda: True)
        monkeypatch.setattr(gradmod.modulator, "collective_device", lambda device: device)
        monkeypatch.setattr(gradmod._internal, "dist", fake)  # the default seed's broadcast
        monkeypatch.setattr(gradmod._internal, "distributed", lambda: True)
        return fake
    return install


def test_the_evidence_of_a_step_is_summed_over_ranks(other_rank):
    fake = other_rank(evidence=(0.5, 3.0))
    mod = with_grads(make_ogm(TinyModel()))
    scores = observed_not_stepped(mod)
    k = mod.step()
    assert mod.last["evidence"] == pytest.approx({"audio": scores["audio"] + 0.5, "visual": scores["visual"] + 3.0}, rel=1e-6)
    assert k["audio"].item() == 1.0 and k["visual"].item() < 1.0  # the other rank's visual evidence made visual strong
    assert fake.calls == [torch.distributed.ReduceOp.SUM]


def noisy(seed):
    return gradmod.OGMGE({"audio": nn.Linear(2, 2), "visual": nn.Linear(2, 2)}, alpha=0.8, seed=seed, backend="reference")


def step_once(mod):
    with_grads(mod)
    mod.observe(logits={"audio": torch.tensor([[2.0, 0.0]]), "visual": torch.tensor([[0.0, 0.0]])}, target=torch.tensor([0]))
    return mod.step()


def test_ranks_with_different_noise_seeds_fail_at_the_first_noisy_step(other_rank):
    other_rank(seed=2)
    with pytest.raises(RuntimeError, match=r"^gradmod: the ranks hold different noise seeds, so replicas would draw "
                       r"different noise: the modulator was built before torch.distributed.init_process_group with "
                       r"per-rank torch seeds \(or seed= differs\). Build it after init_process_group, or pass the "
                       r"same seed= on every rank$"):
        step_once(noisy(seed=1))


def test_equal_noise_seeds_are_compared_once_and_only_with_noise(other_rank):
    fake = other_rank(seed=7)
    mod = noisy(seed=7)
    step_once(mod)
    step_once(mod)
    assert fake.calls.count(torch.distributed.ReduceOp.MAX) == 1
    fake = other_rank(seed=8)
    step_once(make_ogm(TinyModel()))  # no noise: the seeds do not matter
    assert torch.distributed.ReduceOp.MAX not in fake.calls


def test_a_default_seed_is_rank_0s(other_rank):
    other_rank(seed=123456789)
    torch.manual_seed(5)  # this rank's own default seed would differ
    assert noisy(seed=None).seed == 123456789
    assert noisy(seed=42).seed == 42  # an explicit seed is not broadcast


def test_the_default_seed_is_a_fixed_function_of_torchs_initial_seed():
    """Runs that fix ``torch.manual_seed`` draw the same GE noise in every gradmod version: the derivation
    ``(s·0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) mod (2⁶³ − 1)`` is part of the noise stream."""
    mods = {"audio": nn.Linear(2, 2), "visual": nn.Linear(2, 2)}
    for initial, expected in [(0, 7146057691288625177), (7, 3940713094858032309), (2**40 + 3, 598531269718427483)]:
        torch.manual_seed(initial)
        assert gradmod.OGMGE(mods, alpha=0.5).seed == expected


# ------------------------------------------------------------------ 15. features mode with static evidence
def static_features_mode():
    torch.manual_seed(0)
    model = TwoTower()
    mod = gradmod.PDMP({"audio": model.audio, "visual": model.visual}, ("audio", "visual"), 0.5, 1.0,
                       static_metrics={"audio": 0.8, "visual": 0.4}, apply="features")
    return model, mod


@pytest.mark.parametrize("after", ["reset", "skip_step", "load_state_dict", "step"])
def test_static_evidence_in_features_mode_needs_an_observe_after_every_reset_skip_load_and_step(after):
    """Static evidence needs no observe() for its value, but features mode needs one to place the hooks."""
    model, mod = static_features_mode()
    xa, xv, y = tower_data()
    logits, _, features = model(xa, xv)
    mod.observe(features=features)
    nn.functional.cross_entropy(logits, y).backward()
    if after == "step":
        assert mod.step()["visual"].item() == pytest.approx(1 - math.tanh(0.5))
    else:
        getattr(mod, after)(*([mod.state_dict()] if after == "load_state_dict" else []))
    with pytest.warns(RuntimeWarning, match="without observe"):
        assert mod.step() is None


def test_a_policy_error_at_observe_in_features_mode_leaves_no_decision_behind():
    model, mod = static_features_mode()
    good = mod.policy
    mod.policy = lambda evidence: {"audio": -1.0, "visual": 1.0}
    xa, xv, y = tower_data()
    logits, _, features = model(xa, xv)
    with pytest.raises(gradmod.policies.PolicyError, match="outside its range"):
        mod.observe(features=features)
    mod.policy = good
    with pytest.warns(RuntimeWarning, match="without observe"):
        assert mod.step() is None


# ------------------------------------------------------------------ 16. capture-safe noise (Triton kernel)
def _triton_here() -> bool:
    try:
        from gradmod.kernels import triton as kernel
    except ImportError:
        return False
    return kernel.is_available()[0]


@pytest.mark.skipif(not _triton_here(), reason="needs the Triton kernel (CUDA, or TRITON_INTERPRET=1: see the next test)")
def test_capture_safe_noise_is_added_exactly_where_a_step_is_applied():
    """GE noise in capture-safe mode: on an applied step, and on no neutral step (no evidence, or skipped by
    GradScaler on the device, where the coefficient still reaches the gradient the optimizer discards)."""
    from gradmod.kernels import triton as kernel

    device = torch.device(kernel.KERNEL_DEVICE_TYPE)
    audio, visual = nn.Linear(4, 4).to(device), nn.Linear(4, 4).to(device)
    params = [*audio.parameters(), *visual.parameters()]
    mod = gradmod.OGMGE({"audio": audio, "visual": visual}, alpha=0.5, validate=False, capture_safe=True,
                        backend="triton", seed=3)
    optimizer = torch.optim.Adam(params, lr=0.1, fused=True)
    mod.attach(optimizer)
    logits = {"audio": torch.tensor([[2.0, 0.0]], device=device), "visual": torch.tensor([[0.0, 0.0]], device=device)}
    target = torch.tensor([0], device=device)
    g = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)).to(device) for i, p in enumerate(params)]

    def step(observe, found_inf):
        for p, grad in zip(params, g):
            p.grad = grad.clone()
        if observe:
            mod.observe(logits=logits, target=target)
        if found_inf is None:  # a step without GradScaler
            vars(optimizer).pop("found_inf", None)
        else:
            optimizer.found_inf = torch.tensor(found_inf, device=device)
        optimizer.step()
        k = mod.history[-1]["coefficients"]
        scaled = [grad * k["audio" if i < 2 else "visual"] for i, grad in enumerate(g)]
        return [torch.equal(p.grad, expected) for p, expected in zip(params, scaled)], k

    applied, k = step(observe=True, found_inf=0.0)
    assert k["audio"] < 1.0 and not any(applied)  # GE noise on every modality of an applied step
    neutral, k = step(observe=False, found_inf=0.0)
    assert k == {"audio": 1.0, "visual": 1.0} and all(neutral)
    skipped, k = step(observe=True, found_inf=1.0)
    assert k["audio"] < 1.0 and all(skipped) and mod.step_count == 2
    plain, k = step(observe=True, found_inf=None)
    assert k["audio"] < 1.0 and not any(plain) and mod.step_count == 3


@pytest.mark.skipif(_triton_here() or importlib.util.find_spec("triton") is None,
                    reason="the Triton test runs in this process, or Triton is not installed")
def test_capture_safe_noise_under_the_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    test = f"{__file__}::test_capture_safe_noise_is_added_exactly_where_a_step_is_applied"
    command = [sys.executable, "-m", "pytest", test, "-q", "-p", "no:cacheprovider"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0 and re.search(r"\b1 passed", result.stdout), result.stdout[-4000:] + result.stderr[-2000:]


# ------------------------------------------------------------------ 17. scale_grad, appliers' inputs
def test_scale_grad_reads_its_coefficient_when_backward_runs():
    from gradmod.appliers import scale_grad

    x = torch.tensor([1.0, -2.0], requires_grad=True)
    k = torch.tensor(1.0)
    y = scale_grad(x * 3.0, k)
    assert torch.equal(y, x.detach() * 3.0)
    k.fill_(0.25)  # filled in after the forward pass
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.75, 0.75]))
    with pytest.raises(TypeError, match=r"^coefficient must be a 0-d tensor$"):
        scale_grad(x, torch.ones(1))
    with pytest.raises(TypeError, match=r"^coefficient must be a 0-d tensor$"):
        scale_grad(x, 0.5)
    with pytest.raises(ValueError, match=r"^coefficient is on meta, the tensor on cpu$"):
        scale_grad(x, torch.tensor(0.5, device="meta"))


def test_a_closure_given_by_keyword_is_refused_by_name():
    model = TinyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    make_ogm(model).attach(opt)
    with pytest.raises(RuntimeError, match=r"^gradmod: SGD.step\(\) was given a closure, which computes the gradients after "
                       r"the modulator's pre-step hook has run: they cannot be modulated. Call step\(\) without a "
                       r"closure, or detach\(\) and step the modulator yourself after backward\(\) inside the closure$"):
        opt.step(closure=lambda: None)


def test_attach_needs_an_optimizer_and_a_fresh_modulator_is_attached_to_nothing():
    mod = make_ogm(TinyModel())
    assert mod.attached_to is None
    mod.detach()  # a no-op
    with pytest.raises(TypeError, match=r"^attach\(\) needs a torch.optim.Optimizer \(or a wrapper holding one\), got list$"):
        mod.attach([])


def test_a_modality_without_gradients_is_named_once():
    a, v = nn.Linear(2, 2), nn.Linear(2, 2)
    mod = gradmod.OGM({"audio": a, "visual": v}, alpha=0.8)
    logits = {"audio": torch.tensor([[2.0, 0.0]]), "visual": torch.tensor([[0.0, 0.0]])}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            grads_set(a.parameters())
            mod.observe(logits=logits, target=torch.tensor([0]))
            mod.step()
    assert [str(w.message) for w in caught] == [
        "gradmod: modality 'visual' has no gradient at step 0: nothing of it to modulate (an unused branch, or "
        "gradients not materialised when the optimizer steps); this warning is shown once"
    ]


def test_appliers_refuse_bad_options_and_modalities_by_name():
    with pytest.raises(ValueError, match=r"^noise must be None or one of \('ge', 'restore', 'paper'\), got 'gauss'$"):
        gradmod.ParamsApplier(noise="gauss")
    with pytest.raises(ValueError, match=r"^unknown backend 'cuda'; expected one of \('auto', 'reference', 'foreach', "
                       r"'triton'\)$"):
        gradmod.ParamsApplier(backend="cuda")
    with pytest.raises(TypeError, match=r"^param_filter must be a callable \(name, parameter\) -> bool, got str$"):
        gradmod.ParamsApplier(param_filter="weight")
    with pytest.raises(TypeError, match=r"^modality 'visual': a modality is an nn.Module or an iterable of parameters, "
                       r"not a single tensor$"):
        gradmod.OGM({"audio": nn.Linear(2, 2), "visual": nn.Parameter(torch.ones(2))}, alpha=0.5)
    with pytest.raises(TypeError, match=r"^modality 'visual': item 1 is a str, not a parameter$"):
        gradmod.OGM({"audio": nn.Linear(2, 2), "visual": [nn.Parameter(torch.ones(2)), "bias"]}, alpha=0.5)
    with pytest.raises(TypeError, match=r"^modalities must be a mapping name -> module or parameters, got list$"):
        gradmod.appliers.ParameterSelection([nn.Linear(2, 2)], None, require_some=True)
    shared = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"^parameter '0' of modality 'visual' is also 'weight' of modality 'audio': a "
                       r"parameter can belong to one modality only$"):
        gradmod.OGM({"audio": shared, "visual": [shared.weight]}, alpha=0.5)


def test_the_features_applier_refuses_unknown_modalities_and_tensors_without_gradients():
    model = TwoTower()
    mod = gradmod.OGM({"audio": model.audio, "visual": model.visual}, alpha=0.8, apply="features")
    assert repr(mod.applier) == "FeaturesApplier()"
    with pytest.raises(ValueError, match=r"^unknown modality 'text'; the modalities are \['audio', 'visual'\]$"):
        mod.scale_grad(torch.ones(2, requires_grad=True), "text")
    logits = {"audio": torch.zeros(1, 3), "visual": torch.zeros(1, 3)}
    with pytest.raises(TypeError, match=r"^observe\(features=...\) must be a mapping modality name -> tensor"):
        mod.observe(logits=logits, target=torch.tensor([0]), features=[torch.ones(1)])
    with pytest.raises(ValueError, match=r"^features\['audio'\] does not require grad: pass the encoder's output tensor$"):
        mod.observe(logits=logits, target=torch.tensor([0]), features={"audio": torch.ones(1), "visual": torch.ones(1)})


def test_a_parameter_shared_inside_one_encoder_is_modulated_once():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    encoder[1].weight = encoder[0].weight  # tied inside the audio encoder: one parameter, two places
    mod = gradmod.OGM({"audio": encoder, "visual": nn.Linear(2, 2)}, alpha=0.8)
    assert [name for name, _ in mod.applier.named_parameters()["audio"]] == ["0.weight", "0.bias", "1.bias"]


def test_parameters_are_filtered_by_name_and_flattened_fsdp1_parameters_are_refused():
    encoder = nn.Linear(2, 2)
    mod = gradmod.OGM({"audio": encoder, "visual": nn.Linear(2, 2)}, alpha=0.8, param_filter=lambda name, p: name == "bias")
    assert mod.params["audio"] == [encoder.bias]
    flat = nn.Linear(2, 2)
    flat.weight._fsdp_flattened = True  # what FSDP1 marks its flat parameters with
    with pytest.raises(ValueError, match=r"^parameter 'weight' of modality 'visual' is a flattened FSDP1 "
                       r"\(FullyShardedDataParallel\) parameter, whose pieces are not the model's tensors: gradmod cannot "
                       r"modulate it; shard the model with FSDP2's fully_shard instead \(see the Distributed page of the "
                       r"docs\)$"):
        gradmod.OGM({"audio": nn.Linear(2, 2), "visual": flat}, alpha=0.8)


def test_a_custom_applier_needs_only_apply():
    class Halve(gradmod.appliers.Applier):
        def apply(self, coefficients, step, seed, active=None):
            for params in self.parameter_groups():
                for p in params:
                    p.grad.mul_(0.5)

    a, v = nn.Linear(2, 2), nn.Linear(2, 2)
    mod = gradmod.Modulator({"audio": a, "visual": v}, measure=gradmod.measures.SoftmaxScore(),
                            policy=gradmod.policies.OGMPolicy(0.5), apply=Halve())
    grads_set([*a.parameters(), *v.parameters()])
    mod.observe(logits={"audio": torch.tensor([[2.0, 0.0]]), "visual": torch.tensor([[0.0, 0.0]])}, target=torch.tensor([0]))
    mod.step()
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in (*a.parameters(), *v.parameters()))
