"""The policy contract: any callable is a policy; its output is checked once, before any gradient is touched."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradmod
from gradmod.measures import SoftmaxScore
from gradmod.policies import OGMPolicy, PDMPPolicy, PolicyError, check_coefficients, coefficient_range

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
    stacked = check_coefficients({"visual": 0.25, "audio": torch.tensor(0.5, dtype=torch.float64)}, ("audio", "visual"), "p", torch.device("cpu"))
    assert stacked.dtype == torch.float32 and stacked.tolist() == [0.5, 0.25]


def test_pdmp_policy_needs_distinct_names():
    with pytest.raises(ValueError, match="distinct"):
        PDMPPolicy(("a", "a"), 0.5, 0.5)
