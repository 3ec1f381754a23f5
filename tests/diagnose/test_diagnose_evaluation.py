"""gradmod.diagnose's evaluation functions against hand computations on tiny constructed cases."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from gradmod.diagnose import (
    coalition_accuracy,
    conditional_utilization,
    decoupled_accuracy,
    linear_probe,
    masked_accuracy,
    shapley_accuracy,
    shapley_of,
    solo_accuracy,
    zero_absent,
)

NAMES = ("a", "b", "c")
#: Which samples each modality "knows" (its input shows the label there), disjoint; four samples of class 0
#: that no modality knows are right by the bias alone; the rest are never right.
BLOCKS = {"a": range(6), "b": range(6, 9), "c": range(9, 10)}
BIAS = torch.tensor([0.5, 0.0, 0.0, 0.0])


def _additive_data() -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """v(S) = (Σ_{m ∈ S} |B_m| + 4) / 20: an additive accuracy, φ_m = |B_m| / 20, v(∅) = 0.2."""
    y = torch.tensor([1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 0, 0, 0, 0, 1, 2, 3, 1, 2, 3])
    inputs = {n: torch.zeros(20, 4) for n in NAMES}
    for name, rows in BLOCKS.items():
        for i in rows:
            inputs[name][i, y[i]] = 1.0
    return [({n: x[:10] for n, x in inputs.items()}, y[:10]), ({n: x[10:] for n, x in inputs.items()}, y[10:])]


def forward(a, b, c):  # one keyword per modality
    return a + b + c + BIAS


def test_shapley_of_an_additive_accuracy_is_each_modality_share():
    data = _additive_data()
    phi = shapley_accuracy(data, NAMES, forward=forward)
    assert phi == pytest.approx({"a": 6 / 20, "b": 3 / 20, "c": 1 / 20})
    values = coalition_accuracy(data, NAMES, forward=forward)
    assert len(values) == 8 and values[frozenset()] == pytest.approx(0.2)
    assert sum(phi.values()) == pytest.approx(values[frozenset(NAMES)] - values[frozenset()])
    features = shapley_accuracy(data, NAMES, encode=lambda x: dict(x), head=lambda f: sum(f.values()) + BIAS)
    assert features == pytest.approx(phi)


def test_masked_decoupled_and_utilisation_by_hand():
    data = _additive_data()
    assert masked_accuracy(data, NAMES, forward=forward) == pytest.approx({"a": 0.5, "b": 0.35, "c": 0.25})
    decoupled = decoupled_accuracy(data, NAMES, unimodal_logits=lambda x: {n: x[n] + BIAS for n in NAMES})
    assert decoupled == pytest.approx({"a": 0.5, "b": 0.35, "c": 0.25})
    values = coalition_accuracy(data, NAMES, forward=forward)
    utilization = conditional_utilization(values, NAMES)
    assert utilization["a"] == pytest.approx((0.7 - 0.4) / 0.7)
    with pytest.raises(ValueError, match="subsets"):
        conditional_utilization({frozenset(NAMES): 0.5}, NAMES)


def test_shapley_of_two_modalities_by_the_formula():
    values = {frozenset(): 0.1, frozenset("a"): 0.6, frozenset("b"): 0.3, frozenset("ab"): 0.9}
    phi = shapley_of(values, "ab")
    assert phi["a"] == pytest.approx(0.5 * (0.6 - 0.1) + 0.5 * (0.9 - 0.3))
    assert phi["b"] == pytest.approx(0.5 * (0.3 - 0.1) + 0.5 * (0.9 - 0.6))


class DictModel(nn.Module):
    """forward(inputs: dict) returning an object with .logits; dropout to see eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.9)
        self.linear = nn.Linear(4, 4)

    def forward(self, inputs):
        return SimpleNamespace(logits=self.linear(self.drop(inputs["a"] + inputs["b"] + inputs["c"])))


def test_call_styles_outputs_eval_mode_and_rng_are_handled():
    data = _additive_data()
    model = DictModel().train()
    rng = torch.get_rng_state()
    first = masked_accuracy(data, NAMES, forward=model)
    assert masked_accuracy(data, NAMES, forward=model) == first  # eval mode: dropout off, deterministic
    assert model.training and model.drop.training
    assert torch.equal(torch.get_rng_state(), rng)
    closure = [masked_accuracy(data, NAMES, forward=lambda x: model(x), modules=[model]) for _ in range(2)]
    assert closure[0] == closure[1] == first and model.training  # the closure's model in eval mode, restored
    for wrap in (lambda out: {"logits": out}, lambda out: (out, None)):
        assert masked_accuracy(data, NAMES, forward=lambda x, w=wrap: w(forward(**x))) == pytest.approx(
            {"a": 0.5, "b": 0.35, "c": 0.25}
        )


def test_the_mask_is_the_callers_and_zero_absent_keeps_other_keys():
    inputs = {"a": torch.ones(2, 3), "b": {"ids": torch.ones(2, 3), "mask": [torch.ones(2)]}, "extra": torch.ones(2)}
    zeroed = zero_absent(inputs, frozenset({"b"}))
    assert zeroed["a"].sum() == 6 and zeroed["extra"].sum() == 2
    assert zeroed["b"]["ids"].sum() == 0 and zeroed["b"]["mask"][0].sum() == 0
    seen = []

    def mask(x, absent):
        seen.append(absent)
        return zero_absent(x, absent)

    coalition_accuracy(_additive_data(), NAMES, forward=forward, mask=mask, subsets=[{"a"}])
    assert seen == [frozenset({"b", "c"})] * 2


def _probe_data(seed: int, count: int = 4) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        y = torch.randint(0, 3, (32,), generator=g)
        out.append(({"a": nn.functional.one_hot(y, 3) * 3.0 + 0.3 * torch.randn(32, 3, generator=g),
                     "b": torch.randn(32, 5, generator=g)}, y))
    return out


def test_linear_probe_separates_the_informative_encoder_and_is_deterministic():
    train, test = _probe_data(0), _probe_data(1)
    first = linear_probe(lambda x: dict(x), train, test, "ab", steps=50)
    assert first["a"] == 1.0 and first["b"] < 0.6
    assert linear_probe(lambda x: dict(x), train, test, "ab", steps=50) == first
    sub = linear_probe(lambda x: dict(x), train, test, "ab", steps=50, max_samples=40, seed=3)
    assert sub == linear_probe(lambda x: dict(x), train, test, "ab", steps=50, max_samples=40, seed=3)
    with pytest.raises(ValueError, match="classes=2"):
        linear_probe(lambda x: dict(x), train, test, "ab", classes=2)
    tiny = linear_probe(lambda x: {n: v * 1e-4 for n, v in x.items()}, train, test, "ab", steps=50)
    assert tiny["a"] == 1.0  # standardised: the features' scale does not matter


def test_solo_accuracy_trains_alone_or_scores_your_predictor():
    train, test = _probe_data(0, 8), _probe_data(1)
    rng = torch.get_rng_state()
    solo = solo_accuracy(test, "ab", factory=lambda name: nn.Linear(3 if name == "a" else 5, 8), train_loader=train,
                         classes=3, steps=60, lr=0.1)
    assert torch.equal(torch.get_rng_state(), rng)
    assert solo["a"] > 0.95 and solo["b"] < 0.6
    assert solo == solo_accuracy(test, "ab", factory=lambda name: nn.Linear(3 if name == "a" else 5, 8),
                                 train_loader=train, classes=3, steps=60, lr=0.1)
    scored = solo_accuracy(test, "ab", trained=lambda name: (lambda x: x[:, :3]))
    expected = sum(int((x["b"][:, :3].argmax(1) == y).sum()) for x, y in test) / 128
    assert scored["a"] == 1.0 and scored["b"] == pytest.approx(expected)
    with pytest.raises(TypeError, match="train_loader= and classes="):
        solo_accuracy(test, "ab", factory=lambda name: nn.Linear(3, 3))
    with pytest.raises(TypeError, match="factory= .* or trained="):
        solo_accuracy(test, "ab")


def test_errors_name_what_is_missing():
    data = _additive_data()
    with pytest.raises(TypeError, match="give forward="):
        masked_accuracy(data, NAMES)
    with pytest.raises(TypeError, match="not both"):
        masked_accuracy(data, NAMES, forward=forward, encode=dict, head=sum)
    with pytest.raises(ValueError, match="missing the modalities \\['c'\\]"):
        masked_accuracy(data, NAMES, encode=lambda x: {"a": x["a"], "b": x["b"]}, head=lambda f: f["a"])
    with pytest.raises(ValueError, match="missing the modalities \\['d'\\]"):
        masked_accuracy(data, (*NAMES, "d"), forward=lambda x: x["a"])
    with pytest.raises(TypeError, match="batch_of="):
        masked_accuracy([torch.zeros(3)], NAMES, forward=forward)
    with pytest.raises(TypeError, match="cannot tell how to call forward"):
        masked_accuracy(data, NAMES, forward=lambda x, y: x)
    with pytest.raises(TypeError, match="returned a str"):
        masked_accuracy(data, NAMES, forward=lambda x: "logits")
    with pytest.raises(ValueError, match="NaN"):
        masked_accuracy(data, NAMES, forward=lambda x: x["a"] * float("nan"))
    multi = [({n: torch.zeros(2, 4) for n in NAMES}, torch.zeros(2, 4))]
    with pytest.raises(ValueError, match="single-label"):
        masked_accuracy(multi, NAMES, forward=forward)
    with pytest.raises(ValueError, match="no batch"):
        masked_accuracy([], NAMES, forward=forward)
    with pytest.raises(ValueError, match="not among the modalities"):
        coalition_accuracy(data, NAMES, forward=forward, subsets=[{"z"}])
    with pytest.raises(ValueError, match="ignore_index"):
        masked_accuracy([({n: torch.zeros(2, 4) for n in NAMES}, torch.full((2,), -100))], NAMES, forward=forward)
