"""AGM (Li et al., ICCV 2023): the Shapley responses, the evidence that adds up, the stateful policy, the
backward-time applier, and a cross-check against a transcription of the official training step."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

import gradmod
from gradmod.methods import agm

NAMES = ("audio", "visual")


class Net(nn.Module):
    """One encoder per modality (with batch norm, so the masked passes' eval mode matters) and a concat head."""

    def __init__(self, names=NAMES, in_dim=5, dim=6, classes=4, norm=True):
        super().__init__()
        self.names = tuple(names)
        layer = (lambda: nn.BatchNorm1d(dim)) if norm else nn.Identity
        self.encoders = nn.ModuleDict({n: nn.Sequential(nn.Linear(in_dim, dim), layer(), nn.ReLU()) for n in self.names})
        self.head = nn.Linear(dim * len(self.names), classes)

    def forward(self, **inputs):
        return self.head(torch.cat([self.encoders[n](inputs[n]) for n in self.names], 1))


def batches(steps, names=NAMES, batch=12, in_dim=5, classes=4, seed=0):
    """The first modality carries the label clearly, the others faintly (an imbalance)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        y = torch.randint(0, classes, (batch,), generator=g)
        inputs = {
            n: F.one_hot(y, in_dim).float() * (3.0 if i == 0 else 0.4) + torch.randn(batch, in_dim, generator=g)
            for i, n in enumerate(names)
        }
        out.append((inputs, y))
    return out


def make_agm(model, **options):
    return gradmod.AGM({n: model.encoders[n] for n in model.names}, **options)


def agm_step(model, mod, opt, inputs, y, convention="official", clip=True):
    opt.zero_grad()
    responses = agm.mono_responses(model, inputs, convention=convention)
    mod.observe(responses=responses, target=y)
    F.cross_entropy(mod.combine(responses), y).backward()
    if clip:
        agm.official_clip_(model.parameters(), model.head.weight)
    opt.step()


# ------------------------------------------------------------------ the official step, transcribed
class OfficialAGM:
    """The official CREMA-D training step, transcribed from its description (two modalities): coalition outputs
    with the absent input zeroed (masked ones in eval mode, with gradients), m_a = ½(f(a,v) − f(0,v) + f(a,0)),
    per-sample scores with probabilities below 1e-8 replaced, ratio exp(s_v − s_a), target from the running
    scores before this step's update, coefficient exp(α·min(target − ratio, cap)), running update with the
    global iteration, backward hooks that keep their last scale, clip to norm 1 when the head's weight gradient
    leaves [−1, 1]."""

    def __init__(self, model, alpha=1.0, cap=10.0):
        self.model, self.alpha, self.cap = model, alpha, cap
        self.train_score_a = self.train_score_v = 0.0
        self.iteration = 0
        self.scale_a = self.scale_v = 1.0

    def step(self, opt, inputs, y, modulate=True):
        model = self.model
        self.iteration += 1
        a, v = inputs["audio"], inputs["visual"]
        total_out = model(audio=a, visual=v)
        model.eval()
        pad_visual_out = model(audio=a, visual=torch.zeros_like(v))
        pad_audio_out = model(audio=torch.zeros_like(a), visual=v)
        model.train()
        m_a = 0.5 * (total_out - pad_audio_out + pad_visual_out)
        m_v = 0.5 * (total_out - pad_visual_out + pad_audio_out)
        score_a = score_v = 0.0
        for k in range(y.shape[0]):
            p_a = torch.softmax(m_a, 1)[k][y[k]].item()
            p_v = torch.softmax(m_v, 1)[k][y[k]].item()
            score_a += -math.log(1e-8) if p_a < 1e-8 else -math.log(p_a)
            score_v += -math.log(1e-8) if p_v < 1e-8 else -math.log(p_v)
        score_a, score_v = score_a / y.shape[0], score_v / y.shape[0]
        ratio_a, ratio_v = math.exp(score_v - score_a), math.exp(score_a - score_v)
        optimal_a = math.exp(self.train_score_v - self.train_score_a)
        optimal_v = math.exp(self.train_score_a - self.train_score_v)
        coeff_a = math.exp(self.alpha * min(optimal_a - ratio_a, self.cap))
        coeff_v = math.exp(self.alpha * min(optimal_v - ratio_v, self.cap))
        t = self.iteration
        self.train_score_a = self.train_score_a * (t - 1) / t + score_a / t
        self.train_score_v = self.train_score_v * (t - 1) / t + score_v / t
        if modulate:
            self.scale_a, self.scale_v = coeff_a, coeff_v
        hooked_a, hooked_v = m_a * 1.0, m_v * 1.0
        hooked_a.register_hook(lambda grad, s=self.scale_a: grad * s)
        hooked_v.register_hook(lambda grad, s=self.scale_v: grad * s)
        opt.zero_grad()
        F.cross_entropy(hooked_a + hooked_v, y).backward()
        weight_grad = model.head.weight.grad
        if weight_grad.max() > 1 or weight_grad.min() < -1:
            nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        opt.step()
        return {"audio": coeff_a, "visual": coeff_v}


def twin_runs(steps, seed=0):
    torch.manual_seed(seed)
    model = Net()
    twin = copy.deepcopy(model)
    return model, twin, batches(steps, seed=seed)


def test_matches_the_official_step_on_identical_inputs():
    model, twin, data = twin_runs(6)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.5, momentum=0.9)
    mod = make_agm(model, sharpness=2.0)
    mod.attach(opt)
    official = OfficialAGM(twin, alpha=2.0)
    expected = []
    for inputs, y in data:
        agm_step(model, mod, opt, inputs, y)
        expected.append(official.step(twin_opt, inputs, y))
    coefficients = [record["coefficients"] for record in mod.history]
    spread = max(abs(math.log(c["audio"])) for c in expected)
    assert spread > 0.05, "the run must modulate for the comparison to mean anything"
    for got, want in zip(coefficients, expected):
        for name in NAMES:
            assert got[name] == pytest.approx(want[name], rel=1e-5)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(model.encoders["audio"][1].running_mean, twin.encoders["audio"][1].running_mean)


def test_keep_after_window_matches_the_official_hooks_and_the_default_is_unmodulated():
    model, twin, data = twin_runs(5)
    neutral = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.5)
    mod = make_agm(model, sharpness=2.0, stop_step=2, keep_after_window=True)
    mod.attach(opt)
    official = OfficialAGM(twin, alpha=2.0)
    for step, (inputs, y) in enumerate(data):
        agm_step(model, mod, opt, inputs, y)
        official.step(twin_opt, inputs, y, modulate=step < 2)
    assert len(mod.history) == 2 and mod.applier.coefficients == pytest.approx(
        {n: official.scale_a if n == "audio" else official.scale_v for n in NAMES}, rel=1e-5
    )
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # the default: after the window the gradient is the plain gradient of f(N)
    mod = make_agm(neutral, sharpness=2.0, stop_step=0)
    inputs, y = data[0]
    responses = agm.mono_responses(neutral, inputs)
    mod.observe(responses=responses, target=y)
    F.cross_entropy(mod.combine(responses), y).backward(retain_graph=True)
    assert mod.step() is None
    got = [p.grad.clone() for p in neutral.parameters()]
    neutral.zero_grad()
    F.cross_entropy(responses.full, y).backward()
    for a, b in zip(got, neutral.parameters()):
        torch.testing.assert_close(a, b.grad)


def official_three_modal_coefficients(steps, alpha, cap):
    """The official three-modal rule (UR-Funny script): ratio exp((mean s − s_m)·3/2), cap 7, no clamp."""
    running = [0.0, 0.0, 0.0]
    out = []
    for t, (outputs, y) in enumerate(steps, start=1):
        scores = [-torch.log_softmax(z.double(), 1)[torch.arange(len(y)), y].mean().item() for z in outputs]
        mean, optimal_mean = sum(scores) / 3, sum(running) / 3
        ratio = [math.exp((mean - s) * 3 / 2) for s in scores]
        optimal = [math.exp((optimal_mean - s) * 3 / 2) for s in running]
        out.append([math.exp(alpha * min(o - r, cap)) for o, r in zip(optimal, ratio)])
        running = [r * (t - 1) / t + s / t for r, s in zip(running, scores)]
    return out


@pytest.mark.parametrize("cap", [7.0, 0.2])  # the UR-Funny cap, and one that the gaps reach
def test_three_modalities_follow_the_official_three_modal_rule(cap):
    g = torch.Generator().manual_seed(3)
    names = ("vision", "audio", "text")
    steps = []
    for _ in range(5):
        y = torch.randint(0, 3, (10,), generator=g)
        steps.append(([torch.randn(10, 3, generator=g) * scale for scale in (2.0, 0.5, 1.0)], y))
    policy = agm.AGMPolicy(sharpness=1.5, cap=cap)
    expected = official_three_modal_coefficients(steps, 1.5, cap)
    for (outputs, y), want in zip(steps, expected):
        got = policy(agm.response_evidence(dict(zip(names, outputs)), y))
        policy.commit()
        assert [got[n].item() for n in names] == pytest.approx(want, rel=2e-5)  # float32 evidence
    assert (max(max(k) for k in expected) == pytest.approx(math.exp(1.5 * cap))) == (cap < 1)


# ------------------------------------------------------------------ the equations
finite = st.floats(-5.0, 5.0, allow_nan=False)


def coalition_outputs(names, values):
    """Arbitrary coalition outputs f(S), one [2, 3] tensor per subset, from a flat list of numbers."""
    subsets = agm.coalitions(names)
    flat = torch.tensor(values, dtype=torch.float64).reshape(len(subsets), 2, 3)
    return dict(zip(subsets, flat))


@given(st.integers(2, 4).flatmap(lambda m: st.tuples(st.just(m), st.lists(finite, min_size=6 * 2**m, max_size=6 * 2**m))))
def test_shapley_values_are_efficient_symmetric_and_exact_on_additive_models(case):
    m, values = case
    names = [f"m{i}" for i in range(m)]
    outputs = coalition_outputs(names, values)
    phi = agm.shapley_values(outputs, names)
    full, empty = outputs[frozenset(names)], outputs[frozenset()]
    torch.testing.assert_close(sum(phi.values()) + empty, full)  # efficiency
    renamed = {frozenset(names[::-1][names.index(n)] for n in s): v for s, v in outputs.items()}
    swapped = agm.shapley_values(renamed, names)
    for n in names:
        torch.testing.assert_close(swapped[names[::-1][names.index(n)]], phi[n])  # symmetry under renaming
    base, parts = outputs[frozenset()], {n: outputs[frozenset([n])] for n in names}
    additive = {s: base + sum((parts[n] for n in s), torch.zeros_like(base)) for s in outputs}
    for n, value in agm.shapley_values(additive, names).items():
        torch.testing.assert_close(value, parts[n])  # an additive model's contributions, exactly


def test_official_responses_are_shapley_values_plus_an_mth_of_the_empty_coalition():
    torch.manual_seed(0)
    model = Net()
    inputs, _ = batches(1)[0]
    shapley = agm.mono_responses(copy.deepcopy(model), inputs)  # each full pass updates batch-norm statistics
    official = agm.mono_responses(model, inputs, convention="official")
    assert official.remainder is None and shapley.remainder is not None
    for n in NAMES:
        torch.testing.assert_close(official[n], shapley[n] + shapley.remainder / 2)
    m_a_official = 0.5 * (official.full - _masked(model, inputs, "audio") + _masked(model, inputs, "visual"))
    torch.testing.assert_close(official["audio"], m_a_official)
    torch.testing.assert_close(sum(official.values()), official.full)
    torch.testing.assert_close(sum(shapley.values()) + shapley.remainder, shapley.full)


def _masked(model, inputs, absent):
    with torch.no_grad():
        model.eval()
        out = model(**{n: torch.zeros_like(x) if n == absent else x for n, x in inputs.items()})
        model.train()
    return out


logits_2d = st.integers(1, 6).flatmap(
    lambda b: st.tuples(st.lists(finite, min_size=3 * b, max_size=3 * b), st.lists(finite, min_size=3 * b, max_size=3 * b), st.lists(st.integers(0, 2), min_size=b, max_size=b))
)


@given(logits_2d, st.integers(0, 6))
def test_evidence_adds_up_over_any_split_and_decodes_to_the_centred_scores(case, cut):
    a, v, y = case
    y = torch.tensor(y)
    responses = {"audio": torch.tensor(a).reshape(-1, 3) * 4, "visual": torch.tensor(v).reshape(-1, 3)}
    whole = agm.response_evidence(responses, y)
    assert all(e.item() > 0 for e in whole.values())
    cut = min(cut, len(y))
    parts = [agm.response_evidence({n: z[s] for n, z in responses.items()}, y[s]) for s in (slice(0, cut), slice(cut, None))]
    for n in NAMES:
        assert sum(p[n] for p in parts).item() == pytest.approx(whole[n].item(), rel=1e-5)
    scores = {n: (-torch.log_softmax(z.double(), 1)[torch.arange(len(y)), y]).clamp_max(-math.log(1e-8)).mean() for n, z in responses.items()}
    mean = sum(scores.values()) / 2
    centred = agm.centered_scores(whole)
    for n in NAMES:
        assert centred[n].item() == pytest.approx((scores[n] - mean).item(), abs=1e-4)
    ratios = agm.agm_ratios(whole)
    assert ratios["audio"].item() == pytest.approx(math.exp(scores["visual"] - scores["audio"]), rel=1e-3)
    assert (ratios["audio"] * ratios["visual"]).item() == pytest.approx(1.0, rel=1e-9)


@given(st.integers(2, 5), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_ratios_multiply_to_one_and_are_one_when_balanced(m, batch, seed):
    g = torch.Generator().manual_seed(seed)
    names = [f"m{i}" for i in range(m)]
    y = torch.randint(0, 3, (batch,), generator=g)
    responses = {n: torch.randn(batch, 3, generator=g) * 3 for n in names}
    ratios = agm.agm_ratios(agm.response_evidence(responses, y))
    assert math.prod(r.item() for r in ratios.values()) == pytest.approx(1.0, rel=1e-9)
    same = agm.agm_ratios(agm.response_evidence({n: responses[names[0]] for n in names}, y))
    assert all(r.item() == pytest.approx(1.0, abs=1e-12) for r in same.values())


@given(st.floats(0.01, 20.0), st.floats(0.01, 20.0), st.floats(0.0, 4.0), st.one_of(st.none(), st.floats(0.0, 10.0)))
def test_coefficients_lie_in_range_are_one_on_target_and_fall_with_the_ratio(ratio, target, alpha, cap):
    def k(r, t):
        as_tensor = lambda x: torch.tensor(x, dtype=torch.float64)
        return agm.agm_coefficients({"a": as_tensor(r)}, {"a": as_tensor(t)}, alpha, cap)["a"].item()

    assert 0 < k(ratio, target) <= (math.exp(alpha * cap) if cap is not None else math.inf) * (1 + 1e-12)
    assert k(target, target) == 1.0
    assert k(ratio * 1.5, target) <= k(ratio, target)


@settings(max_examples=25)
@given(st.integers(0, 2**31 - 1))
def test_the_policy_is_symmetric_under_swapping_modalities(seed):
    g = torch.Generator().manual_seed(seed)
    forward, backward = agm.AGMPolicy(1.3, 10.0), agm.AGMPolicy(1.3, 10.0)
    for _ in range(4):
        y = torch.randint(0, 3, (6,), generator=g)
        za, zv = torch.randn(6, 3, generator=g) * 3, torch.randn(6, 3, generator=g)
        one = forward(agm.response_evidence({"audio": za, "visual": zv}, y))
        two = backward(agm.response_evidence({"visual": zv, "audio": za}, y))
        forward.commit(), backward.commit()
        for n in NAMES:
            assert one[n].item() == pytest.approx(two[n].item(), rel=1e-9)


def test_the_first_step_targets_one_and_only_a_committed_call_moves_the_targets():
    policy = agm.AGMPolicy(sharpness=1.0, cap=10.0)
    y = torch.tensor([0, 1])
    evidence = agm.response_evidence({"audio": torch.eye(3)[y] * 5, "visual": torch.zeros(2, 3)}, y)
    balanced = agm.response_evidence({"audio": torch.zeros(2, 3), "visual": torch.zeros(2, 3)}, y)
    k = policy(evidence)
    ratio = agm.agm_ratios(evidence)
    assert k["audio"].item() == pytest.approx(math.exp(1.0 - ratio["audio"].item()))
    assert policy.steps == 0 and policy.targets() == {"audio": 1.0, "visual": 1.0}
    policy(balanced)  # replaces the proposal: e.g. the next step after one GradScaler skipped
    policy.commit()
    policy.commit()
    assert policy.steps == 1 and policy.targets()["audio"].item() == pytest.approx(1.0)
    policy(evidence)
    policy.commit()
    assert policy.steps == 2 and policy.targets()["audio"].item() == pytest.approx(ratio["audio"].item() ** 0.5)


# ------------------------------------------------------------------ the applier: what combine's backward does
def test_combine_scales_the_gradient_through_each_response_and_nothing_else():
    torch.manual_seed(0)
    model = Net()
    mod = make_agm(model, sharpness=3.0)
    inputs, y = batches(1)[0]
    responses = agm.mono_responses(model, inputs)  # the Shapley convention: f(∅) joins unmodulated
    mod.observe(responses=responses, target=y)
    out = mod.combine(responses)
    torch.testing.assert_close(out, responses.full)
    out.retain_grad()
    F.cross_entropy(out, y).backward(retain_graph=True)
    k = mod.step()
    assert abs(k["audio"].item() - 1) > 0.05
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    upstream = out.grad.detach()
    surrogate = sum(k[n].item() * (responses[n] * upstream).sum() for n in NAMES) + (responses.remainder * upstream).sum()
    surrogate.backward()
    for a, p in zip(got, model.parameters()):
        torch.testing.assert_close(a, p.grad)


# ------------------------------------------------------------------ seams
def test_a_backward_pass_that_bypasses_combine_fails_by_name():
    torch.manual_seed(0)
    model = Net()
    mod = make_agm(model)
    inputs, y = batches(1)[0]
    responses = agm.mono_responses(model, inputs)
    mod.observe(responses=responses, target=y)
    F.cross_entropy(responses.full, y).backward()  # the loss of the model's output, not of combine
    with pytest.raises(RuntimeError, match=r"without passing through the responses of \['audio', 'visual'\]"):
        mod.step()
    model.zero_grad()
    responses = agm.mono_responses(model, inputs)
    F.cross_entropy(mod.combine(responses), y).backward()  # no observe() for this pass
    with pytest.raises(RuntimeError, match="before observe\\(\\) gave its coefficients"):
        mod.step()
    assert mod.policy.steps == 0


def test_bad_input_fails_by_name():
    torch.manual_seed(0)
    model = Net()
    mod = make_agm(model)
    inputs, y = batches(1)[0]
    responses = agm.mono_responses(model, inputs)
    with pytest.raises(ValueError, match=r"observe\(responses=...\) must name exactly the modalities.*missing \['visual'\]"):
        mod.observe(responses={"audio": responses["audio"]}, target=y)
    with pytest.raises(ValueError, match="target holds class indices outside"):
        mod.observe(responses=responses, target=y + 10)
    bad = {"audio": responses["audio"], "visual": responses["visual"] * float("nan")}
    with pytest.raises(ValueError, match="logits of modality 'visual' contain NaN"):
        mod.observe(responses=bad, target=y)
    with pytest.raises(ValueError, match=r"responses\['audio'\] must be \[batch, classes\]"):
        mod.observe(responses={"audio": responses["audio"][0], "visual": responses["visual"]}, target=y)
    with pytest.raises(TypeError, match="apply= is not an option of AGM"):
        make_agm(model, apply="params")
    with pytest.raises(ValueError, match="convention must be one of"):
        agm.mono_responses(model, inputs, convention="paper")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        agm.mono_responses(lambda **x: model(**x), inputs)
    with pytest.raises(ValueError, match=r"output with modalities \['audio'\] present has shape \(12, 3\)"):
        agm.mono_responses(
            model, inputs, convention="official", forward=lambda x: model(**x)[:, :3] if (x["visual"] == 0).all() else model(**x)
        )
    with pytest.raises(ValueError, match="does not require grad"), torch.no_grad():
        mod.combine(agm.mono_responses(model, inputs))


def test_without_a_cap_an_overflowing_coefficient_is_refused_before_any_gradient_changes():
    policy = agm.AGMPolicy(sharpness=2000.0, cap=None)  # exp overflows float64
    y = torch.zeros(4, dtype=torch.long)
    strong = {"audio": torch.eye(3)[y] * 30, "visual": torch.zeros(4, 3)}
    policy(agm.response_evidence(strong, y))
    policy.commit()  # the running target now expects audio far ahead
    torch.manual_seed(0)
    model = Net()
    mod = gradmod.Modulator({n: model.encoders[n] for n in NAMES}, measure=agm.ResponseScore(), policy=policy, apply=agm.ResponseApplier(policy))
    with pytest.raises(gradmod.PolicyError, match="not finite"):
        mod.observe(responses={"audio": torch.zeros(4, 3), "visual": torch.eye(3)[y] * 30}, target=y)
    assert policy.steps == 1


def test_gradient_accumulation_scores_the_whole_step_and_updates_the_targets_once():
    torch.manual_seed(0)
    model = Net()
    mod = make_agm(model)
    model.zero_grad()
    seen = []
    for inputs, y in batches(2, batch=8, seed=3):
        responses = agm.mono_responses(model, inputs)
        mod.observe(responses=responses, target=y)
        F.cross_entropy(mod.combine(responses), y).backward()
        seen.append(({n: responses[n].detach() for n in NAMES}, y))
    applied = mod.step()
    assert mod.policy.steps == 1
    whole = {n: torch.cat([r[n] for r, _ in seen]) for n in NAMES}
    expected = agm.response_evidence(whole, torch.cat([y for _, y in seen]))
    for n in NAMES:
        assert mod.last["evidence"][n] == pytest.approx(expected[n].item(), rel=1e-5)
    fresh = agm.AGMPolicy()(expected)
    for n in NAMES:
        assert applied[n].item() == pytest.approx(fresh[n].item(), rel=1e-5)


def test_reset_forgets_the_running_targets_and_the_next_step_is_a_fresh_modulators_first():
    torch.manual_seed(0)
    model = Net(norm=False)  # no running statistics: without optimizer steps, the twin's responses are the model's
    twin = copy.deepcopy(model)
    mod, fresh = make_agm(model), make_agm(twin)
    (inputs, y), (later, y_later) = batches(2, batch=8, seed=4)
    applied = []
    for modulator, net, (x, target) in ((mod, model, (inputs, y)), (mod, model, (later, y_later)), (fresh, twin, (later, y_later))):
        net.zero_grad()
        responses = agm.mono_responses(net, x)
        modulator.observe(responses=responses, target=target)
        F.cross_entropy(modulator.combine(responses), target).backward()
        applied.append(modulator.step())
        if len(applied) == 1:
            mod.reset()
            assert mod.policy.steps == 0 and mod.policy.targets() is None and mod.step_count == 0
    assert mod.policy.steps == fresh.policy.steps == 1
    after_reset, first_of_fresh = applied[1:]
    for n in NAMES:
        assert after_reset[n].item() == pytest.approx(first_of_fresh[n].item(), rel=1e-6)
        assert mod.policy.targets()[n].item() == pytest.approx(fresh.policy.targets()[n].item(), rel=1e-6)


def test_shapley_values_refuse_too_few_or_repeated_names_and_missing_coalitions():
    outputs = coalition_outputs(["a", "b"], [0.0] * 24)
    for names in (["a"], ["a", "a"]):
        with pytest.raises(ValueError, match=rf"^shapley_values needs two or more distinct modality names, got {re.escape(str(names))}$"):
            agm.shapley_values(outputs, names)
    partial = {subset: value for subset, value in outputs.items() if subset != frozenset({"b"})}
    message = "coalition outputs are missing for the subsets [['b']] of ['a', 'b']"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        agm.shapley_values(partial, ["a", "b"])


def test_a_step_skipped_by_grad_scaler_leaves_the_running_targets_alone():
    torch.manual_seed(0)
    model = Net(norm=False)  # no batch-norm statistics: the skipped batch's forward pass changes nothing
    reference = copy.deepcopy(model)
    data = batches(3, seed=5)
    results = []
    for net, skip in ((model, True), (reference, False)):
        mod = make_agm(net)
        opt = torch.optim.SGD(net.parameters(), lr=0.0)  # lr 0: the model stays the same in both runs
        mod.attach(opt)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
        for index, (inputs, y) in enumerate(data):
            if index == 1 and not skip:
                continue
            opt.zero_grad()
            responses = agm.mono_responses(net, inputs)
            mod.observe(responses=responses, target=y)
            loss = F.cross_entropy(mod.combine(responses), y) * (float("inf") if index == 1 else 1.0)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        results.append((mod.policy.steps, mod.policy.targets()))
    assert results[0][0] == results[1][0] == 2
    for n in NAMES:
        assert results[0][1][n].item() == pytest.approx(results[1][1][n].item(), rel=1e-9)


@pytest.mark.parametrize("resume_at", [3, 5])  # inside the window, and after it with kept coefficients
def test_resuming_from_a_state_dict_follows_the_same_trajectory(tmp_path, resume_at):
    model, _, data = twin_runs(6)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    mod = make_agm(model, sharpness=2.0, stop_step=4, keep_after_window=True)
    mod.attach(opt)
    for step, (inputs, y) in enumerate(data):
        if step == resume_at:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "mod": mod.state_dict()}, tmp_path / "ck.pt")
        agm_step(model, mod, opt, inputs, y)
    resumed = Net()
    resumed_opt = torch.optim.SGD(resumed.parameters(), lr=0.5, momentum=0.9)
    resumed_mod = make_agm(resumed, sharpness=2.0, stop_step=4, keep_after_window=True)
    saved = torch.load(tmp_path / "ck.pt")
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    resumed_mod.load_state_dict(saved["mod"])
    resumed_mod.attach(resumed_opt)
    for inputs, y in data[resume_at:]:
        agm_step(resumed, resumed_mod, resumed_opt, inputs, y)
    assert resumed_mod.history == mod.history and resumed_mod.policy.steps == mod.policy.steps == 4
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    other = agm.AGMPolicy()
    other(agm.response_evidence({"x": torch.zeros(1, 2), "y": torch.zeros(1, 2)}, torch.tensor([0])))
    with pytest.raises(ValueError, match="the saved AGM state is for"):
        other.load_state_dict(saved["mod"]["policy"])


# ------------------------------------------------------------------ torch.distributed
def ddp_run(model, data, rank=None, world=1, ddp=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    mod = make_agm(model, sharpness=2.0)
    mod.attach(opt)
    forward = (lambda x: ddp(**x)) if ddp is not None else None
    for inputs, y in data:
        if rank is not None:  # this rank's half of the global batch
            part = slice(rank * (y.shape[0] // world), (rank + 1) * (y.shape[0] // world))
            inputs, y = {n: x[part] for n, x in inputs.items()}, y[part]
        opt.zero_grad()
        responses = agm.mono_responses(model, inputs, convention="official", forward=forward)
        mod.observe(responses=responses, target=y)
        F.cross_entropy(mod.combine(responses), y).backward()
        opt.step()
    return mod


def _ddp_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = Net(norm=False)
    mod = ddp_run(model, batches(4, seed=9), rank, world, DistributedDataParallel(model))
    result = {"params": [p.detach() for p in model.parameters()], "history": mod.history, "policy": mod.policy.state_dict()}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()


@pytest.mark.distributed
def test_two_gloo_ranks_agree_with_each_other_and_with_the_global_batch(tmp_path):
    """Evidence is summed over the ranks before the policy runs (the modulator's all-reduce; AGM adds no
    collective): every rank holds the running targets and coefficients of one process given the whole batch,
    and DDP averages gradients that were scaled by the same coefficients."""
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["history"] == r1["history"]
    assert torch.equal(r0["policy"]["mean"], r1["policy"]["mean"])
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)
    torch.manual_seed(0)
    model = Net(norm=False)
    single = ddp_run(model, batches(4, seed=9))
    assert any(abs(r["coefficients"]["audio"] - 1) > 0.05 for r in single.history)
    for got, want in zip(r0["history"], single.history):
        for n in NAMES:
            assert got["coefficients"][n] == pytest.approx(want["coefficients"][n], rel=1e-5)
            assert got["evidence"][n] == pytest.approx(want["evidence"][n], rel=1e-5)
    for a, b in zip(r0["params"], model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


def test_without_validation_a_degenerate_step_leaves_the_targets_alone_as_with_validation():
    """validate=False: no host synchronisation, the policy runs on every step's evidence, also a degenerate one
    (every target ignored), which must not move the running targets; validate=True never calls it there."""
    model, twin, data = twin_runs(4)
    data[2] = (data[2][0], torch.full_like(data[2][1], -100))
    runs = []
    for net, validate in ((model, True), (twin, False)):
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        mod = make_agm(net, sharpness=2.0, validate=validate)
        mod.attach(opt)
        for inputs, y in data:
            degenerate = validate and bool((y == -100).all())
            with pytest.warns(RuntimeWarning, match="degenerate step 2") if degenerate else contextlib.nullcontext():
                opt.zero_grad()
                responses = agm.mono_responses(net, inputs)
                mod.observe(responses=responses, target=y)
                F.cross_entropy(mod.combine(responses), y, reduction="sum").backward()
                opt.step()
        runs.append(mod)
    assert [r["status"] for r in runs[1].history] == ["applied", "applied", "degenerate", "applied"]
    assert runs[0].policy.steps == 3 and runs[1].policy.steps == 3
    for a, b in zip(runs[0].history, runs[1].history):
        for n in NAMES:
            assert a["coefficients"][n] == pytest.approx(b["coefficients"][n], rel=1e-6)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)
    info = gradmod.METHODS["agm"]
    assert info.preset is gradmod.AGM and info.kind == "responses" and isinstance(runs[0], agm.AGM)


def test_the_history_records_agms_own_ratios_not_ogms():
    torch.manual_seed(0)
    model = Net()
    mod = make_agm(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mod.attach(opt)
    for inputs, y in batches(2):
        agm_step(model, mod, opt, inputs, y, clip=False)
    record = mod.last
    expected = agm.agm_ratios({n: torch.tensor(v, dtype=torch.float64) for n, v in record["evidence"].items()})
    for name in NAMES:
        assert record["ratios"][name] == pytest.approx(expected[name].item(), rel=1e-5)
    ogm = gradmod.functional.discrepancy_ratios({n: torch.tensor(v) for n, v in record["evidence"].items()})
    assert record["ratios"]["audio"] != pytest.approx(ogm["audio"].item(), rel=1e-3)


def test_a_model_whose_forward_takes_one_mapping_is_pointed_to_forward():
    class DictModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = Net()

        def forward(self, inputs):
            return self.net(**inputs)

    model = DictModel()
    inputs, _ = batches(1)[0]
    with pytest.raises(TypeError, match=r"pass forward=, e.g. forward=lambda x: model\(x\)"):
        agm.mono_responses(model, inputs)
    responses = agm.mono_responses(model, inputs, forward=lambda x: model(x))
    assert set(responses) == set(NAMES)


def test_a_tiny_coefficient_reaches_float64_gradients_intact():
    """A coefficient like exp(−180) ≈ 6.7e-79 is 0 in float32: a float64 model must get it, not 0."""
    policy = agm.AGMPolicy(sharpness=1.0, cap=None)
    applier = agm.ResponseApplier(policy)
    encoders = {n: nn.Linear(2, 2).double() for n in NAMES}
    applier.bind(encoders)
    applier.set_coefficients(torch.tensor([math.exp(-180.0), 1.0], dtype=torch.float64))
    responses = {n: encoders[n](torch.ones(1, 2, dtype=torch.float64)) for n in NAMES}
    applier.combine(responses).sum().backward()
    gradient = encoders["audio"].weight.grad
    assert torch.all(gradient != 0) and gradient.abs().max().item() == pytest.approx(math.exp(-180.0), rel=1e-9)
