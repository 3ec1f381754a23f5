"""The seams of real training loops: every case is either correct or loud, never a silent no-op or half a step."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from tiny import TinyModel, batches

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


def test_features_mode_with_scale_grad_is_exact_under_torch_compile():
    torch.manual_seed(0)
    model = TwoTower()
    expected, k = params_mode_grads(model.state_dict(), tower_data())
    assert k["audio"].item() < 1.0
    mod = gradmod.OGM({"audio": model.audio, "visual": model.visual}, alpha=0.8, apply="features")
    model.modulator = mod
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    mod.attach(opt)
    for _ in range(2):  # the second call reuses the compiled graph with the new coefficients
        opt.zero_grad()
        xa, xv, y = tower_data()
        logits, decoupled, _ = compiled(xa, xv)
        mod.observe(logits=decoupled, target=y)
        nn.functional.cross_entropy(logits, y).backward()
        opt.step()
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
    mod.observe(logits=decoupled, target=y, features=features)
    nn.functional.cross_entropy(logits, y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="modality 'audio'.*without passing through its scaled feature tensor"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert mod.step_count == 0


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
    with pytest.raises(RuntimeError, match="without passing through its scaled feature tensor"):
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
    grads_set([*a.parameters(), *v.parameters()])
    mod.observe(logits=logits, target=y)
    mod.step()
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in (*a.parameters(), *v.parameters()))
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
    assert gradmod.policies.PDMPPolicy(("a", "b"), alpha, alpha).gamma_p == pytest.approx(float(alpha))
    assert gradmod.mixup.MultimodalMixup(alpha).alpha == pytest.approx(float(alpha))


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
    assert bounded.history_dropped == 4096


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
