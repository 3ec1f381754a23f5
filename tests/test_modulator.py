"""Integration tests of the Modulator and the presets in a tiny training loop."""

import copy
import math
import re
import warnings

import numpy as np
import pytest
import torch
from tiny import TinyModel, batches, observe_inputs
from torch import nn

import gradmod
from gradmod import filters

PRESETS = {
    "OGM": lambda mods, **kw: gradmod.OGM(mods, alpha=0.8, **kw),
    "OGMGE": lambda mods, **kw: gradmod.OGMGE(mods, alpha=0.8, **kw),
    "DGM": lambda mods, **kw: gradmod.DGM(mods, alpha=0.5, **kw),
    "DecouplingFree": lambda mods, **kw: gradmod.DecouplingFree(mods, alpha=0.8, **kw),
    "PDMP": lambda mods, **kw: gradmod.PDMP(mods, ranking=tuple(mods), gamma_p=0.5, gamma_r=0.3, **kw),
}
NOISY = {"OGMGE", "DGM", "DecouplingFree"}


def make(method, names=("audio", "visual"), seed=0, **kw):
    torch.manual_seed(seed)
    model = TinyModel(names)
    if method in NOISY and "noise" not in kw and kw.get("apply") == "features":
        kw["noise"] = None
    mod = PRESETS[method]({n: model.encoders[n] for n in names}, seed=1, **kw)
    return model, mod


def grads_of(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def forward_backward(model, inputs, y):
    logits, decoupled, features, zeta = model(inputs)
    nn.functional.cross_entropy(logits, y).backward()
    return decoupled, features, zeta


@pytest.mark.parametrize("method", list(PRESETS))
@pytest.mark.parametrize("names", [("audio", "visual"), ("audio", "visual", "text")])
def test_params_mode_scales_each_encoder_gradient_by_its_coefficient(method, names):
    model, mod = make(method, names, noise=None)
    (inputs, y), = batches(1, names=names)
    model.zero_grad()
    decoupled, _, zeta = forward_backward(model, inputs, y)
    plain = grads_of(model)
    mod.observe(**observe_inputs(method, decoupled, zeta, y))
    k = mod.step()
    assert set(k) == set(names)
    for pname, p in model.named_parameters():
        if p.grad is None:  # the ζ gate is not in the loss
            continue
        owner = next((n for n in names if pname.startswith(f"encoders.{n}.")), None)
        expected = plain[pname] * (k[owner] if owner else 1.0)
        torch.testing.assert_close(p.grad, expected, rtol=1e-6, atol=1e-7)
    record = mod.last
    assert record["step"] == 0 and set(record["coefficients"]) == set(names)
    assert all(math.isfinite(v) and v > 0 for v in record["coefficients"].values())


@pytest.mark.parametrize("method", list(PRESETS))
def test_features_mode_equals_params_mode_without_noise(method):
    (inputs, y), = batches(1)
    model_p, mod_p = make(method, noise=None)
    model_f, mod_f = make(method, apply="features")
    model_f.load_state_dict(model_p.state_dict())
    model_p.zero_grad()
    decoupled, _, zeta = forward_backward(model_p, inputs, y)
    mod_p.observe(**observe_inputs(method, decoupled, zeta, y))
    k_p = mod_p.step()
    logits, decoupled, features, zeta = model_f(inputs)
    mod_f.observe(**observe_inputs(method, decoupled, zeta, y), features=features)
    nn.functional.cross_entropy(logits, y).backward()
    k_f = mod_f.step()
    for n in k_p:
        torch.testing.assert_close(k_p[n], k_f[n])
    for (name, p), q in zip(model_p.named_parameters(), model_f.parameters()):
        if p.grad is None:
            assert q.grad is None
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_ge_noise_statistics_match_the_unscaled_gradient_std():
    p = nn.Parameter(torch.zeros(200_000))
    q = nn.Parameter(torch.zeros(10))
    mod = gradmod.OGMGE({"audio": [p], "visual": [q]}, alpha=1.0, backend="reference", seed=3)
    g = torch.randn(200_000, generator=torch.Generator().manual_seed(0)) * 2.0 + 1.0
    p.grad, q.grad = g.clone(), torch.ones(10)
    logits = {"audio": torch.tensor([[5.0, 0.0]]), "visual": torch.tensor([[0.0, 0.0]])}
    mod.observe(logits=logits, target=torch.tensor([0]))
    k = mod.step()["audio"].item()
    assert k < 1
    noise = p.grad - k * g
    n = noise.numel()
    sigma = g.std().item() + 1e-8
    # mean of n normals has std σ/√n; sample std has relative std ≈ 1/√(2n): allow 5 standard errors
    assert abs(noise.mean().item()) < 5 * sigma / math.sqrt(n)
    assert abs(noise.std().item() / sigma - 1) < 5 / math.sqrt(2 * n)


def test_dgm_restore_noise_keeps_total_variance():
    p = nn.Parameter(torch.zeros(200_000))
    q = nn.Parameter(torch.zeros(10))
    mod = gradmod.DGM({"visual": [p], "audio": [q]}, alpha=0.3, backend="reference", seed=5)
    g = torch.randn(200_000, generator=torch.Generator().manual_seed(1)) * 0.5
    p.grad, q.grad = g.clone(), torch.ones(10)
    scores = {"visual": torch.tensor([[0.9, 0.1]]), "audio": torch.tensor([[0.5, 0.4]])}
    mod.observe(scores=scores, target=torch.tensor([[1.0, 0.0]]))
    mu = mod.step()["visual"].item()
    assert 0 < mu < 1
    n = g.numel()
    sigma2 = g.var().item()
    # var(μg + ε) over the elements = μ²σ² + (1−μ²)σ² = σ² (ε independent of g)
    assert abs(p.grad.var().item() / sigma2 - 1) < 5 * math.sqrt(2 / n) * 2


def test_resume_from_state_dict_reproduces_the_uninterrupted_run():
    data = batches(8)

    def run(split_at=None):
        model, mod = make("OGMGE")
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        mod.attach(opt)
        for i, (inputs, y) in enumerate(data):
            if i == split_at:
                saved = copy.deepcopy((model.state_dict(), opt.state_dict(), mod.state_dict()))
                model, mod = make("OGMGE", seed=123)  # fresh objects, different init and seed
                opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
                mod.attach(opt)
                model.load_state_dict(saved[0]), opt.load_state_dict(saved[1]), mod.load_state_dict(saved[2])
            opt.zero_grad()
            logits, decoupled, _, _ = model(inputs)
            mod.observe(logits=decoupled, target=y)
            nn.functional.cross_entropy(logits, y).backward()
            opt.step()
        return model, mod

    straight, mod_a = run()
    resumed, mod_b = run(split_at=4)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert mod_a.history == mod_b.history
    assert len(mod_a.history) == 8


def test_step_without_observe_is_not_modulated_and_warns_once():
    model, mod = make("OGM")
    (inputs, y), = batches(1)
    forward_backward(model, inputs, y)
    plain = grads_of(model)
    with pytest.warns(RuntimeWarning, match="without observe"):
        assert mod.step() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mod.step() is None
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, plain[name]) if name in plain else p.grad is None
    assert mod.step_count == 2 and mod.history == []


NOT_ATTACHED = (
    "gradmod: the gradients of an observed batch were used or discarded, but this modulator never stepped: it is not "
    "attached to the optimizer, so nothing is modulated; call mod.attach(optimizer) once before training (or "
    "mod.step() before each optimizer.step()) (this warning is shown once)"
)


def _observed_passes(model, mod, data, after_pass=lambda: None):
    """Per batch: drop the gradients, observe, backward, then ``after_pass()``."""
    for inputs, y in data:
        model.zero_grad(set_to_none=True)
        _, decoupled, _, _ = model(inputs)
        mod.observe(logits=decoupled, target=y)
        forward_backward(model, inputs, y)
        after_pass()


def test_a_modulator_nobody_steps_warns_once_when_its_observed_gradients_are_discarded():
    model, mod = make("OGM")
    with pytest.warns(RuntimeWarning) as caught:
        _observed_passes(model, mod, batches(3))
    assert [str(w.message) for w in caught] == [NOT_ATTACHED]
    assert mod.state_dict()["warned"] == ["not_attached"]  # a resumed run does not warn again


def test_an_attached_modulator_does_not_warn_when_gradients_are_discarded_before_its_first_step():
    model, mod = make("OGM")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    mod.attach(optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _observed_passes(model, mod, batches(2))  # the first batch's gradients are discarded before any step
        _observed_passes(model, mod, batches(2, seed=1), after_pass=optimizer.step)
    assert mod.step_count == 2


@pytest.mark.parametrize("driver", ["step", "skip_step"])
def test_a_modulator_stepped_or_skipped_by_hand_does_not_warn_it_is_not_attached(driver):
    model, mod = make("OGM")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _observed_passes(model, mod, batches(1), after_pass=getattr(mod, driver))
        _observed_passes(model, mod, batches(2, seed=1))  # the gradients of the first of these are discarded
    assert mod.step_count == {"step": 1, "skip_step": 0}[driver]


class CompiledFunction(torch.autograd.Function):
    """An identity over several tensors whose backward node is named like AOTAutograd's, ``CompiledFunctionBackward``."""

    @staticmethod
    def forward(ctx, *tensors):
        return tuple(t.clone() for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        return grads


class PlainFunction(CompiledFunction):
    """The same identity, under a name that is not a compiled graph's."""


def _features_and_logits(features_node, logits_node=None):
    """Feature and logit tensors: the outputs of one application of ``features_node`` (without ``logits_node``),
    or of one application each."""
    leaves = [torch.randn(4, 8, requires_grad=True) for _ in range(2)] + [torch.randn(4, 3, requires_grad=True) for _ in range(2)]
    if logits_node is None:
        outputs = features_node.apply(*leaves)
    else:
        outputs = features_node.apply(*leaves[:2]) + logits_node.apply(*leaves[2:])
    return dict(zip(("audio", "visual"), outputs[:2])), dict(zip(("audio", "visual"), outputs[2:]))


def test_features_that_one_compiled_graph_returned_with_the_logits_are_refused_by_name():
    _, mod = make("OGM", apply="features")
    features, logits = _features_and_logits(CompiledFunction)
    message = (
        "observe(features=...) got features that one torch.compile'd graph returned together with the logits it "
        "computed from them: hooks on the returned features see only the gradient from outside the graph, not the "
        "head's inside it. Route the features with mod.scale_grad(feature, name) inside the compiled forward"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        mod.observe(features=features, logits=logits, target=torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("features_node,logits_node", [
    (CompiledFunction, CompiledFunction),  # two compiled graphs: the head's gradient passes the hooks
    (PlainFunction, None),  # one node, but not a compiled graph's
    (CompiledFunction, PlainFunction),
])
def test_features_and_logits_of_different_graphs_or_of_an_uncompiled_node_are_observed(features_node, logits_node):
    _, mod = make("OGM", apply="features")
    features, logits = _features_and_logits(features_node, logits_node)
    mod.observe(features=features, logits=logits, target=torch.zeros(4, dtype=torch.long))
    assert mod._pending is not None


def test_gradient_accumulation_adds_evidence():
    model, mod = make("OGM")
    data = batches(2)
    model.zero_grad(set_to_none=True)
    total = {}
    for inputs, y in data:
        _, decoupled, _, _ = model(inputs)
        mod.observe(logits=decoupled, target=y)
        for n, z in decoupled.items():
            total[n] = total.get(n, 0.0) + gradmod.functional.ogm_scores(z, y).item()
        logits, _, _, _ = model(inputs)
        nn.functional.cross_entropy(logits, y).backward()
    mod.step()
    for n in total:
        assert mod.last["evidence"][n] == pytest.approx(total[n], rel=1e-5)


def test_evidence_of_discarded_gradients_is_dropped():
    model, mod = make("OGM")
    first, second = batches(2)
    with pytest.warns(RuntimeWarning, match="never stepped"):  # nothing steps it before the gradients of `first` go
        _observed_passes(model, mod, (first, second))  # and their evidence with them
    mod.step()
    _, decoupled, _, _ = model(second[0])
    expected = gradmod.functional.ogm_scores(decoupled["audio"], second[1]).item()
    assert mod.last["evidence"]["audio"] == pytest.approx(expected, rel=1e-5)


def test_window_start_and_stop():
    model, mod = make("OGM", start_step=2, stop_step=4)
    applied = []
    for inputs, y in batches(6):
        model.zero_grad()
        decoupled, _, _ = forward_backward(model, inputs, y)
        mod.observe(logits=decoupled, target=y)
        applied.append(mod.step() is not None)
    assert applied == [False, False, True, True, False, False]
    assert gradmod.epoch_window(0, 50, 10) == (0, 510)


def test_conv_weights_filter_selects_only_4d_weights():
    enc_a = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3))
    enc_v = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten())
    mod = gradmod.OGMGE({"audio": enc_a, "visual": enc_v}, alpha=0.5, param_filter=filters.conv_weights)
    assert [p.shape for p in mod.params["audio"]] == [torch.Size([2, 1, 3, 3])]
    assert [p.dim() for p in mod.params["visual"]] == [4]
    mod = gradmod.OGM({"audio": nn.Linear(2, 2), "visual": nn.Linear(2, 2)}, alpha=0.5, param_filter=filters.weights)
    assert all(p.dim() == 2 for ps in mod.params.values() for p in ps)


# ---------------------------------------------------------------- bad input
def test_bad_inputs_fail_loudly():
    model, mod = make("OGM")
    (inputs, y), = batches(1)
    _, decoupled, _, _ = model(inputs)
    with pytest.raises(ValueError, match=r"missing \['visual'\]"):
        mod.observe(logits={"audio": decoupled["audio"]}, target=y)
    with pytest.raises(ValueError, match=r"unknown \['text'\]"):
        mod.observe(logits={**decoupled, "text": decoupled["audio"]}, target=y)
    with pytest.raises(ValueError, match="batch, classes"):
        mod.observe(logits={n: z[0] for n, z in decoupled.items()}, target=y)
    with pytest.raises(ValueError, match="outside"):
        mod.observe(logits=decoupled, target=y + 10)
    bad = {**decoupled, "visual": decoupled["visual"].detach().clone().fill_(float("nan"))}
    with pytest.raises(ValueError, match="'visual' contain NaN"):
        mod.observe(logits=bad, target=y)
    with pytest.raises(TypeError, match="unexpected inputs"):
        mod.observe(zeta=torch.rand(3), logits=decoupled, target=y)
    with pytest.raises(ValueError, match="alpha"):
        gradmod.OGM({"audio": model.encoders["audio"], "visual": model.encoders["visual"]}, alpha=-1.0)


def test_shared_parameter_and_too_few_modalities():
    shared = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="belong to one modality"):
        gradmod.OGM({"audio": shared, "visual": [shared.weight]}, alpha=0.5)
    with pytest.raises(ValueError, match="two or more"):
        gradmod.OGM({"audio": shared}, alpha=0.5)
    with pytest.raises(ValueError, match="no parameter to modulate"):
        gradmod.OGM({"audio": shared, "visual": nn.Linear(2, 2)}, alpha=0.5, param_filter=filters.conv_weights)


@pytest.mark.parametrize("validate", [True, False])
def test_zero_zeta_evidence_is_a_degenerate_step(validate):
    a, v = nn.Linear(2, 2), nn.Linear(2, 2)
    mod = gradmod.DecouplingFree({"audio": a, "visual": v}, alpha=0.5, validate=validate, seed=0)
    for p in (*a.parameters(), *v.parameters()):
        p.grad = torch.ones_like(p)
    mod.observe(zeta=torch.ones(4, 3))  # all weight on audio: visual's evidence is 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mod.step()
    assert [str(w.message).count("degenerate") > 0 for w in caught] == ([True] if validate else [])
    assert mod.last["status"] == "degenerate" and mod.last["evidence"]["visual"] == 0.0
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in (*a.parameters(), *v.parameters()))


def test_dgm_negative_evidence_is_a_degenerate_step():
    mod = gradmod.DGM({"audio": nn.Linear(2, 2), "visual": nn.Linear(2, 2)})
    scores = {"audio": torch.tensor([[0.0, 1.0]]), "visual": torch.tensor([[0.9, 0.1]])}
    mod.observe(scores=scores, target=torch.tensor([[1.0, 0.0]]))
    with pytest.warns(RuntimeWarning, match="the evidence of 'audio' = -1.0"):
        assert mod.step() is None
    assert mod.last["status"] == "degenerate"


@pytest.mark.parametrize(
    "method,inputs,message",
    [
        ("DecouplingFree", {"zeta": torch.tensor([0.5, 1.5])}, "zeta lies outside"),
        ("DecouplingFree", {"zeta": torch.tensor([0.5, float("nan")])}, "zeta lies outside"),
        ("DGM", {"scores": {"audio": torch.tensor([[1.2, 0.1]]), "visual": torch.tensor([[0.5, 0.5]])},
                 "target": torch.tensor([[1.0, 0.0]])}, "scores of modality 'audio' lie outside"),
        ("DGM", {"scores": {"audio": torch.tensor([[0.2, 0.1]]), "visual": torch.tensor([[0.5, 0.5]])},
                 "target": torch.tensor([[2.0, 0.0]])}, "multi-hot target holds values outside"),
        ("DGM", {"logits": {"audio": torch.tensor([[float("inf"), 0.1]]), "visual": torch.tensor([[0.5, 0.5]])},
                 "target": torch.tensor([0])}, "logits of modality 'audio' contain NaN"),
    ],
)
def test_value_checks_of_zeta_and_dgm_inputs(method, inputs, message):
    _, mod = make(method)
    with pytest.raises(ValueError, match=message):
        mod.observe(**inputs)
    _, unchecked = make(method, validate=False)
    unchecked.observe(**inputs)  # validate=False reads no value: nothing raises


def test_dgm_scores_rounding_slightly_outside_the_unit_interval_is_tolerated():
    _, mod = make("DGM")
    scores = {"audio": torch.tensor([[1.0 + 1e-6, -1e-6]]), "visual": torch.tensor([[0.5, 0.5]])}
    mod.observe(scores=scores, target=torch.tensor([[1.0, 0.0]]))


def test_sparse_gradients_are_refused_by_name():
    emb, other = nn.Embedding(5, 2, sparse=True), nn.Linear(2, 2)
    mod = gradmod.OGM({"audio": emb, "visual": other}, alpha=0.5)
    emb(torch.tensor([1, 2])).sum().backward()
    other.weight.grad = torch.ones(2, 2)
    mod.observe(logits={"audio": torch.tensor([[2.0, 0.0]]), "visual": torch.tensor([[0.0, 0.0]])}, target=torch.tensor([0]))
    with pytest.raises(ValueError, match="modality 'audio' has sparse gradients"):
        mod.step()


def test_pdmp_static_needs_no_observe_and_saves_ranking():
    a, v = nn.Linear(2, 2), nn.Linear(2, 2)
    ranking = gradmod.rank_modalities({"audio": 0.6, "visual": 0.5})
    mod = gradmod.PDMP({"audio": a, "visual": v}, ranking, gamma_p=0.5, gamma_r=1.0, static_metrics={"audio": 0.6, "visual": 0.5})
    for p in (*a.parameters(), *v.parameters()):
        p.grad = torch.ones_like(p)
    k = mod.step()
    assert k["audio"].item() == 1.0
    assert k["visual"].item() == pytest.approx(1 - math.tanh(0.5 / 0.6))
    state = mod.state_dict()
    assert state["policy"] == {"ranking": ["audio", "visual"]}
    with pytest.raises(ValueError, match="ranking"):
        gradmod.PDMP({"audio": a, "visual": v}, ("audio", "text"), 0.1, 0.1)


# ---------------------------------------------------------------- optimizers, AMP, schedulers, compile
def _loop(model, mod, opt, data, scaler=None, scheduler=None, poison_step=None):
    for i, (inputs, y) in enumerate(data):
        opt.zero_grad(set_to_none=True)
        logits, decoupled, _, _ = model(inputs)
        mod.observe(logits=decoupled, target=y)
        loss = nn.functional.cross_entropy(logits, y)
        if i == poison_step:
            loss = loss * float("inf")
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize("fused", [False, True])
def test_grad_scaler_skips_inf_steps_without_advancing(fused):
    model, mod = make("OGMGE")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused)
    mod.attach(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    _loop(model, mod, opt, batches(5), scaler=scaler, poison_step=2)
    assert mod.step_count == 4
    assert [r["step"] for r in mod.history] == [0, 1, 2, 3]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_grad_scaler_result_matches_unscaled_training_without_noise():
    data = batches(3)
    model_a, mod_a = make("OGM")
    model_b, mod_b = make("OGM")
    opt_a = torch.optim.SGD(model_a.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.1)
    mod_a.attach(opt_a), mod_b.attach(opt_b)
    _loop(model_a, mod_a, opt_a, data)
    _loop(model_b, mod_b, opt_b, data, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_scheduler_and_optimizer_state_untouched_and_detach():
    model, mod = make("OGMGE")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    handle = mod.attach(opt)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    _loop(model, mod, opt, batches(4), scheduler=sched)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.001)
    assert set(opt.state_dict()) == {"state", "param_groups"}
    handle.remove()
    _loop(model, mod, opt, batches(1))
    assert mod.step_count == 4


def test_unused_branch_has_no_grad_and_is_skipped():
    model, mod = make("OGM")
    (inputs, y), = batches(1)
    logits, decoupled, features, _ = model(inputs)
    mod.observe(logits=decoupled, target=y)
    nn.functional.cross_entropy(model.head(torch.cat([features["audio"], features["audio"].detach()], 1)), y).backward()
    plain = grads_of(model)
    with pytest.warns(RuntimeWarning, match="modality 'visual' has no gradient at step 0"):
        k = mod.step()
    assert k["audio"].item() < 1.0 and mod.last["status"] == "applied"
    assert all(p.grad is None for p in model.encoders["visual"].parameters())
    for name, p in model.encoders["audio"].named_parameters():
        torch.testing.assert_close(p.grad, plain[f"encoders.audio.{name}"] * k["audio"])


def test_torch_compiled_model_trains_with_modulation():
    model, mod = make("OGMGE")
    compiled = torch.compile(model, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mod.attach(opt)
    _loop(compiled, mod, opt, batches(3))
    assert len(mod.history) == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_ogm_ge_reduces_imbalance_compared_with_plain_training():
    """On data where audio is far more informative, OGM damps audio's coefficient below 1."""
    model, mod = make("OGMGE")
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    mod.attach(opt)
    _loop(model, mod, opt, batches(20))
    coeffs = [r["coefficients"] for r in mod.history]
    assert sum(c["audio"] < 1.0 for c in coeffs) >= 15  # audio is the dominant modality on most batches
    assert sum(c["audio"] for c in coeffs) / len(coeffs) < sum(c["visual"] for c in coeffs) / len(coeffs)


def test_reset_and_state_dict_name_check():
    model, mod = make("OGM")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mod.attach(opt)
    _loop(model, mod, opt, batches(2))
    assert mod.step_count == 2 and len(mod.history) == 2
    mod.reset()
    assert mod.step_count == 0 and mod.history == []
    other = gradmod.OGM({"a": nn.Linear(1, 1), "b": nn.Linear(1, 1)}, alpha=0.1)
    with pytest.raises(ValueError, match="modalities"):
        other.load_state_dict(mod.state_dict())


def test_pdmp_static_in_features_mode_hooks_through_observe():
    model, _ = make("OGM")
    metrics = {"audio": 0.8, "visual": 0.4}
    mod = gradmod.PDMP(
        {n: model.encoders[n] for n in model.names}, ("audio", "visual"), 0.5, 1.0,
        static_metrics=metrics, apply="features",
    )
    (inputs, y), = batches(1)
    logits, _, features, _ = model(inputs)
    mod.observe(features=features)  # no evidence inputs: the metrics are the evidence
    nn.functional.cross_entropy(logits, y).backward()
    k = mod.step()
    assert k["audio"].item() == 1.0 and k["visual"].item() == pytest.approx(1 - math.tanh(0.5))
    with pytest.warns(RuntimeWarning, match="without observe"):
        assert mod.step() is None  # features mode needs observe() to place its hooks


# ---------------------------------------------------------------- construction, window and messages
def two_linears():
    return {"audio": nn.Linear(2, 2), "visual": nn.Linear(2, 2)}


def test_constructor_refuses_each_bad_argument_by_name():
    measure, policy = gradmod.measures.SoftmaxScore(), gradmod.policies.OGMPolicy(0.5)
    build = gradmod.Modulator
    with pytest.raises(ValueError, match=r"^modalities must be a mapping of two or more names to modules or parameter lists$"):
        build([nn.Linear(2, 2), nn.Linear(2, 2)], measure=measure, policy=policy)
    with pytest.raises(TypeError, match=r"^measure must be a gradmod.measures.Measure, got str$"):
        build(two_linears(), measure="softmax", policy=policy)
    with pytest.raises(TypeError, match=r"^policy must be callable \(evidence mapping -> coefficient mapping\), got float$"):
        build(two_linears(), measure=measure, policy=0.5)
    for start, stop in [(-1, None), (-1, 5), (3, 2)]:
        with pytest.raises(ValueError, match=rf"^need 0 <= start_step <= stop_step, got {start}, {stop}$"):
            build(two_linears(), measure=measure, policy=policy, start_step=start, stop_step=stop)
    with pytest.raises(ValueError, match=r"^strict=True raises on degenerate steps, which needs validate=True to see them"):
        build(two_linears(), measure=measure, policy=policy, strict=True, validate=False)
    with pytest.raises(ValueError, match=r"^capture_safe=True synchronises with the host nowhere: pass validate=False as well$"):
        build(two_linears(), measure=measure, policy=policy, capture_safe=True)
    with pytest.raises(ValueError, match=r"^apply must be one of \('params', 'features'\) or an Applier, got 'grads'$"):
        build(two_linears(), measure=measure, policy=policy, apply="grads")


def test_an_empty_window_modulates_nothing_and_the_window_is_half_open():
    mod = gradmod.OGM(two_linears(), alpha=0.5, start_step=3, stop_step=3)  # allowed: never modulates
    assert not any(mod.in_window(step) for step in range(6))
    mod = gradmod.OGM(two_linears(), alpha=0.5, start_step=2, stop_step=4)
    assert [mod.in_window(step) for step in range(6)] == [False, False, True, True, False, False]
    assert mod.in_window() is False and mod.step_count == 0  # the next step is step 0
    assert gradmod.OGM(two_linears(), alpha=0.5, start_step=2).in_window(10**9)


@pytest.mark.parametrize("epochs,window", [((0, 0, 1), (0, 1)), ((3, 3, 10), (30, 40)), ((1, 20, 7), (7, 147))])
def test_epoch_window_is_inclusive_of_both_epochs(epochs, window):
    assert gradmod.epoch_window(*epochs) == window


@pytest.mark.parametrize("epochs", [(-1, 2, 10), (2, 1, 10), (0, 2, 0), (0, 2, -3)])
def test_epoch_window_refuses_reversed_epochs_and_empty_epochs(epochs):
    message = r"^need 0 <= start_epoch <= end_epoch and steps_per_epoch > 0, got {}, {}, {}$".format(*epochs)
    with pytest.raises(ValueError, match=message):
        gradmod.epoch_window(*epochs)


def test_an_explicit_seed_is_kept():
    assert gradmod.OGMGE(two_linears(), alpha=0.5, seed=12345).seed == 12345
    assert gradmod.OGMGE(two_linears(), alpha=0.5, seed=np.int64(7)).seed == 7


def test_repr_names_every_part():
    mod = gradmod.OGM(two_linears(), alpha=0.5, start_step=1, stop_step=9)
    assert repr(mod) == (
        "OGM(modalities=['audio', 'visual'], measure=SoftmaxScore(ignore_index=-100), "
        f"policy=OGMPolicy(strength=0.5), apply={mod.applier!r}, window=[1, 9))"
    )


def test_the_evidence_is_float32_or_wider_in_modality_order_whatever_the_measure_returns():
    class Given(gradmod.measures.Measure):
        inputs = ("values",)

        def evidence(self, names, values=None, **_):
            return {name: values[name] for name in names}

    def pending_after(values):
        mod = gradmod.Modulator(two_linears(), measure=Given(), policy=gradmod.policies.OGMPolicy(0.5))
        mod.observe(values=values)
        return mod.state_dict()["pending"]

    wide = pending_after({"visual": torch.tensor(2.0), "audio": torch.tensor(1.0, dtype=torch.float64)})
    assert wide.dtype == torch.float64 and wide.tolist() == [1.0, 2.0]
    half = pending_after({"audio": torch.tensor(1.5, dtype=torch.float16), "visual": torch.tensor(0.5, dtype=torch.float16)})
    assert half.dtype == torch.float32 and half.tolist() == [1.5, 0.5]
