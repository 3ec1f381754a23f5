"""The policy contract: any callable is a policy; its output is checked once, before any gradient is touched."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradmod
from gradmod import functional as F
from gradmod.measures import SoftmaxScore
from gradmod.methods.pdmp import PDMPPolicy, pdmp_coefficients
from gradmod.policies import (
    OGMPolicy,
    PolicyError,
    check_coefficients,
    coefficient_range,
)

LOGITS = {"audio": torch.tensor([[3.0, 0.0], [2.0, 0.0]]), "visual": torch.tensor([[0.5, 0.0], [0.0, 0.2]])}
TARGET = torch.tensor([0, 0])


def modulator(policy, validate=True, **options):
    a, v = nn.Linear(2, 2), nn.Linear(2, 2)
    mod = gradmod.Modulator({"audio": a, "visual": v}, measure=SoftmaxScore(), policy=policy, validate=validate, **options)
    for p in (*a.parameters(), *v.parameters()):
        p.grad = torch.full_like(p, 2.0)
    return mod, [*a.parameters(), *v.parameters()]


def test_any_callable_is_a_policy_and_floats_are_coefficients():
    seen = {}

    def halve_audio(evidence):
        seen.update(evidence)
        return {"audio": 0.5, "visual": 1}

    mod, params = modulator(halve_audio)
    mod.observe(logits=LOGITS, target=TARGET)
    k = mod.step()
    assert set(seen) == {"audio", "visual"} and all(e.dim() == 0 for e in seen.values())
    assert k["audio"].item() == 0.5 and k["visual"].item() == 1.0
    assert torch.equal(params[0].grad, torch.full_like(params[0], 1.0))
    assert torch.equal(params[2].grad, torch.full_like(params[2], 2.0))


BAD_OUTPUTS = [
    ([0.5, 1.0], "not a mapping"),
    ({"audio": 0.5}, r"missing \['visual'\]"),
    ({"audio": 0.5, "visual": 1.0, "text": 1.0}, r"unknown \['text'\]"),
    ({"audio": torch.tensor([0.5]), "visual": 1.0}, "shape \\(1,\\)"),
    ({"audio": torch.tensor(True), "visual": 1.0}, "torch.bool"),
    ({"audio": True, "visual": 1.0}, "bool"),
    ({"audio": "0.5", "visual": 1.0}, "str"),
    ({"audio": float("nan"), "visual": 1.0}, "'audio' the coefficient nan"),
    ({"audio": math.inf, "visual": 1.0}, "not finite"),
    ({"audio": -0.1, "visual": 1.0}, r"outside its range \[0, inf\]"),
]


@pytest.mark.parametrize("output,message", BAD_OUTPUTS)
def test_a_policy_breaking_the_contract_raises_and_changes_nothing(output, message):
    calls = []

    def policy(evidence):
        calls.append(evidence)
        return output if len(calls) == 1 else {"audio": 0.5, "visual": 1.0}

    mod, params = modulator(policy)
    mod.observe(logits=LOGITS, target=TARGET)
    with pytest.raises(PolicyError, match=message):
        mod.step()
    assert all(torch.equal(p.grad, torch.full_like(p, 2.0)) for p in params)
    assert mod.step_count == 0 and mod.history == []
    mod.step()  # the pending evidence was kept: the retry sees the same evidence
    assert [float(e) for e in calls[1].values()] == [float(e) for e in calls[0].values()]
    assert mod.step_count == 1


def test_a_declared_range_is_enforced():
    class AtMostOne:
        coefficient_range = (0.0, 1.0)

        def __call__(self, evidence):
            return {"audio": 1.5, "visual": 1.0}

    mod, _ = modulator(AtMostOne())
    mod.observe(logits=LOGITS, target=TARGET)
    with pytest.raises(PolicyError, match=r"outside its range \[0, 1\]"):
        mod.step()


def test_without_validation_a_bad_output_leaves_the_step_unmodulated_and_marked():
    mod, params = modulator(lambda evidence: {"audio": torch.tensor(float("nan")), "visual": torch.tensor(1.0)}, validate=False)
    mod.observe(logits=LOGITS, target=TARGET)
    mod.step()
    assert all(torch.equal(p.grad, torch.full_like(p, 2.0)) for p in params)
    assert mod.last["status"] == "invalid" and mod.last["coefficients"] == {"audio": 1.0, "visual": 1.0}
    with pytest.raises(PolicyError, match="missing"):  # the structure is still checked (it costs no synchronisation)
        mod.observe(logits=LOGITS, target=TARGET)
        mod.policy = lambda evidence: {"audio": 1.0}
        mod.step()


def test_built_in_policies_declare_their_ranges():
    assert coefficient_range(OGMPolicy(0.5)) == (0.0, 1.0)
    assert coefficient_range(PDMPPolicy(("a", "b"), 0.7, 0.2)) == (0.0, 1.7)
    assert coefficient_range(lambda evidence: evidence) == (0.0, math.inf)


def test_check_coefficients_orders_by_modality_names():
    stacked = check_coefficients({"visual": 0.25, "audio": torch.tensor(0.5, dtype=torch.float16)}, ("audio", "visual"), "p", torch.device("cpu"))
    assert stacked.dtype == torch.float32 and stacked.tolist() == [0.5, 0.25]
    half = {name: torch.tensor(value, dtype=torch.float16) for name, value in (("audio", 0.5), ("visual", 0.25))}
    assert check_coefficients(half, ("audio", "visual"), "p", torch.device("cpu")).dtype == torch.float32  # never narrower
    tiny = check_coefficients({"visual": 0.25, "audio": torch.tensor(1.2e-79, dtype=torch.float64)}, ("audio", "visual"), "p", torch.device("cpu"))
    assert tiny.dtype == torch.float64 and tiny.tolist() == [1.2e-79, 0.25]  # float64 coefficients are kept intact


def test_pdmp_policy_needs_distinct_names():
    with pytest.raises(ValueError, match="distinct"):
        PDMPPolicy(("a", "a"), 0.5, 0.5)


def test_built_in_policies_called_directly_follow_the_functional_equations():
    """A built-in policy is also a plain callable: evidence mapping (tensors of any shape-1 form, or floats) in,
    coefficients in the evidence's order out, equal to `gradmod.functional` on the same evidence."""
    evidence = {"visual": torch.tensor([2.0]), "audio": 5.0, "text": torch.tensor(1.0, dtype=torch.float64)}
    wide = {name: torch.tensor(float(torch.as_tensor(e).reshape(())), dtype=torch.float64) for name, e in evidence.items()}
    k = OGMPolicy(0.8)(evidence)
    assert list(k) == ["visual", "audio", "text"]
    assert {name: c.item() for name, c in k.items()} == {n: c.item() for n, c in F.ogm_coefficients(wide, 0.8).items()}
    policy = PDMPPolicy(("audio", "visual", "text"), 0.5, 0.3)
    k = policy(evidence)
    assert list(k) == ["visual", "audio", "text"] and all(c.dtype == torch.float64 for c in k.values())
    expected = pdmp_coefficients(wide, ("audio", "visual", "text"), 0.5, 0.3)
    assert {name: c.item() for name, c in k.items()} == {n: c.item() for n, c in expected.items()}


def test_policy_messages_name_the_policy_and_the_problem():
    device = torch.device("cpu")
    with pytest.raises(PolicyError, match=r"^policy 'p' returned list, not a mapping modality name -> coefficient$"):
        check_coefficients([0.5, 1.0], ("audio", "visual"), "p", device)
    with pytest.raises(PolicyError, match=r"^the output of policy 'p' must name exactly the modalities \['audio', 'visual'\]: "
                       r"missing \['visual'\], unknown \[\]$"):
        check_coefficients({"audio": 0.5}, ("audio", "visual"), "p", device)
    with pytest.raises(PolicyError, match=r"^policy 'p' gave modality 'audio' a torch.float32 tensor of shape \(2,\): "
                       r"a coefficient is a real 0-d tensor or a number$"):
        check_coefficients({"audio": torch.ones(2), "visual": 1.0}, ("audio", "visual"), "p", device)
    with pytest.raises(PolicyError, match=r"^policy 'p' gave modality 'visual' a str: a coefficient is a real number$"):
        check_coefficients({"audio": 1.0, "visual": "1"}, ("audio", "visual"), "p", device)
    with pytest.raises(ValueError, match=r"^alpha/gamma \(the policy's strength\) must be a finite number >= 0"):
        OGMPolicy(-0.5)
    with pytest.raises(ValueError, match=r"^gamma_p must be a finite number >= 0"):
        PDMPPolicy(("a", "b"), -0.5, 0.5)
    with pytest.raises(ValueError, match=r"^gamma_r must be a finite number >= 0"):
        PDMPPolicy(("a", "b"), 0.5, -0.5)
    with pytest.raises(ValueError, match=r"^the modalities of the evidence must name exactly the modalities \['a', 'b'\]"):
        PDMPPolicy(("a", "b"), 0.5, 0.5)({"a": torch.tensor(1.0), "c": torch.tensor(2.0)})
    with pytest.raises(ValueError, match=r"^ranking must name two or more distinct modalities, got \['a'\]$"):
        PDMPPolicy(("a",), 0.5, 0.5)


def test_check_coefficients_puts_every_coefficient_on_the_given_device():
    meta = torch.device("meta")
    stacked = check_coefficients({"audio": torch.tensor(0.5), "visual": 1}, ("audio", "visual"), "p", meta)
    assert stacked.device == meta and stacked.dtype == torch.float32 and stacked.shape == (2,)


@pytest.mark.parametrize("validate", [True, False])
def test_coefficients_at_the_ends_of_the_range_are_applied(validate):
    class ZeroToOne:
        coefficient_range = (0.0, 1.0)

        def __call__(self, evidence):
            return {"audio": 0.0, "visual": 1.0}

    mod, params = modulator(ZeroToOne(), validate=validate)
    mod.observe(logits=LOGITS, target=TARGET)
    mod.step()
    assert mod.last["status"] == "applied" and mod.last["coefficients"] == {"audio": 0.0, "visual": 1.0}
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in params[:2])
    assert all(torch.equal(p.grad, torch.full_like(p, 2.0)) for p in params[2:])


@pytest.mark.parametrize("value", [-1e-6, 1.0 + 1e-6, math.nan, math.inf])
def test_without_validation_a_coefficient_just_outside_the_range_is_invalid(value):
    class ZeroToOne:
        coefficient_range = (0.0, 1.0)

        def __call__(self, evidence):
            return {"audio": value, "visual": 1.0}

    mod, params = modulator(ZeroToOne(), validate=False)
    mod.observe(logits=LOGITS, target=TARGET)
    k = mod.step()  # decided on the device: the step returns the neutral coefficients it applied
    assert {name: c.item() for name, c in k.items()} == {"audio": 1.0, "visual": 1.0}
    assert mod.last["status"] == "invalid"
    assert all(torch.equal(p.grad, torch.full_like(p, 2.0)) for p in params)
