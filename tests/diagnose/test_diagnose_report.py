"""gradmod.diagnose's verdict and report: the right modality on constructed data, JSON, figure, errors."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch import nn

from gradmod.diagnose import Diagnosis, Loop, Monitor, Trial, TrialRow, decide, diagnose
from gradmod.fusion import ConcatFusion


def _data(signal: dict[str, float], batches: int, seed: int, size: int = 32):
    """Each modality's input shows the label with its own strength, in noise of unit variance."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        y = torch.randint(0, 4, (size,), generator=g)
        x = {n: nn.functional.one_hot(y, 6).float() * s + torch.randn(size, 6, generator=g) for n, s in signal.items()}
        out.append((x, y))
    return out


class Late(nn.Module):
    """Per-modality encoders, a concat head; ``forward(inputs)`` gives the fused logits."""

    def __init__(self, names):
        super().__init__()
        self.names = tuple(names)
        self.encoders = nn.ModuleDict({n: nn.Sequential(nn.Linear(6, 16), nn.ReLU()) for n in names})
        self.fusion = ConcatFusion({n: 16 for n in names}, num_classes=4)

    def encode(self, inputs):
        return {n: self.encoders[n](inputs[n]) for n in self.names}

    def forward(self, inputs):
        return self.fusion(self.encode(inputs))


def _trained(signal: dict[str, float], epochs: int = 3):
    torch.manual_seed(0)
    model = Late(tuple(signal))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    monitor = Monitor(dict(model.encoders))
    monitor.attach(optimizer)
    train = _data(signal, 25, seed=0)
    for epoch in range(epochs):
        monitor.start_epoch(epoch)
        for x, y in train:
            features = model.encode(x)
            monitor.observe(logits=model.fusion.unimodal_logits(features), target=y)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model.fusion(features), y).backward()
            optimizer.step()
        monitor.end_epoch(epoch)
    return model, monitor, train, _data(signal, 25, seed=1)


@pytest.mark.parametrize("names", [("audio", "visual"), ("audio", "visual", "text")])
def test_the_verdict_names_the_modality_made_weak_by_design(names):
    signal = {n: 3.0 for n in names} | {"visual": 0.3}
    model, monitor, train, test = _trained(signal)
    report = diagnose(names, test, forward=model, encode=model.encode, train_loader=train,
                      unimodal_logits=lambda x: model.fusion.unimodal_logits(model.encode(x)), monitor=monitor)
    verdict = report.verdict
    assert verdict.balanced is False and verdict.weak == "visual" and verdict.basis == "probe"
    assert "visual" in verdict.headline and "under-training not tested" in verdict.headline
    assert report.samples == 800 and len(report.coalitions) == 2 ** len(names)
    assert verdict.batch_dominant != "visual" and verdict.agrees
    assert report.shapley["visual"] < min(v for n, v in report.shapley.items() if n != "visual")
    assert len(report.monitor) == 3 and report.measure == "SoftmaxScore"


def test_equal_modalities_are_balanced():
    model, _, train, test = _trained({"audio": 2.0, "visual": 2.0})
    report = diagnose(("audio", "visual"), test, forward=model, encode=model.encode, train_loader=train)
    assert report.verdict.balanced is True
    assert report.verdict.headline.startswith("balanced")


def test_under_training_against_the_solo_run_and_a_measure_that_disagrees():
    accuracies = {"audio": 0.90, "visual": 0.40}
    epoch = {"epoch": 4, "steps": 10, "observed": 10, "ratios": {"audio": 0.5, "visual": 2.0},
             "grad_to_weight": {"audio": 0.1, "visual": 0.1}, "share": {"audio": 0.5, "visual": 0.5},
             "grad_norm": {"audio": 1.0, "visual": 1.0}}
    report = Diagnosis(("audio", "visual"), samples=1000, probe=accuracies, solo={"audio": 0.91, "visual": 0.70},
                       monitor=[epoch], measure="SoftmaxScore")
    verdict = report.verdict
    assert verdict.under_trained == ("visual",) and verdict.deficits["visual"] == pytest.approx(0.30)
    assert verdict.headline == "imbalanced — visual is under-trained by 30.0 points (against its solo run)"
    assert verdict.batch_dominant == "visual" and verdict.agrees is False
    text = " ".join(verdict.lines)
    assert "disagrees" in text and "OGM and OGM-GE (α = 0.8) would scale visual's gradient" in text
    k = 1 - math.tanh(0.8 * 2.0)
    assert f"k = 1 − tanh(α·ρ) = {k:.2f}" in text
    weaker_not_under = Diagnosis(("audio", "visual"), samples=1000, probe=accuracies, solo={"audio": 0.9, "visual": 0.41})
    assert weaker_not_under.verdict.balanced is True
    assert "alone it does no better" in " ".join(weaker_not_under.verdict.lines)


def test_an_encoder_the_fused_head_under_uses_is_told_from_an_under_trained_one():
    report = Diagnosis(("audio", "visual"), samples=2000, probe={"audio": 0.99, "visual": 0.50},
                       masked={"audio": 0.99, "visual": 0.38}, solo={"audio": 1.0, "visual": 0.53})
    verdict = report.verdict
    assert verdict.under_trained == () and verdict.underused == ("visual",) and verdict.balanced is False
    assert verdict.weak == "visual" and verdict.weak_deficit == pytest.approx(0.15)
    assert verdict.headline.startswith("imbalanced — the fused head under-uses visual: 15.0 points")
    probe_only = Diagnosis(("audio", "visual"), samples=2000, probe={"audio": 0.99, "visual": 0.50},
                           masked={"audio": 0.99, "visual": 0.38})
    assert "frozen features hold more than the fused head uses" in " ".join(probe_only.verdict.lines)


def test_the_margin_is_the_threshold_or_three_standard_errors():
    small = decide("ab", masked={"a": 0.60, "b": 0.52}, samples=100)  # 3 SE on 100 samples: 20.9 points
    assert small.balanced is True and "standard errors on 100 samples" in " ".join(small.lines)
    large = decide("ab", masked={"a": 0.60, "b": 0.52}, samples=100_000)
    assert large.balanced is False
    unknown = decide("ab", masked={"a": 0.60, "b": 0.56})
    assert unknown.balanced is True and "sampling noise not assessed" in " ".join(unknown.lines)
    nothing = decide("ab", ratios={"a": 1.5, "b": 0.6}, measure="SoftmaxScore")
    assert nothing.balanced is None and nothing.headline.startswith("no verdict")


def _full_report() -> Diagnosis:
    coalitions = {frozenset(): 0.25, frozenset({"audio"}): 0.8, frozenset({"visual"}): 0.5, frozenset({"audio", "visual"}): 0.9}
    epochs = [
        {"epoch": e, "steps": 5, "observed": 5, "ratios": {"audio": 1.5 + e, "visual": math.nan},
         "grad_to_weight": {"audio": 0.2, "visual": 0.1}, "share": {"audio": 2 / 3, "visual": 1 / 3},
         "grad_norm": {"audio": 1.0, "visual": 0.5}}
        for e in range(3)
    ]
    trial = Trial("visual", "3 epochs", (0, 1), (TrialRow(None, (0.9, 0.8), (0.5, 0.4)), TrialRow("ogm", (0.9, 0.9), (0.6, 0.5), (0.1, 0.1))))
    return Diagnosis(("audio", "visual"), samples=400, coalitions=coalitions, masking="inputs", probe={"audio": 0.82, "visual": 0.5},
                     solo={"audio": 0.8, "visual": 0.7}, monitor=epochs, measure="SoftmaxScore", loop=Loop(optimizer="adamw"), trial=trial)


def test_json_round_trip(tmp_path):
    report = _full_report()
    text = report.to_json()
    back = Diagnosis.from_json(text)
    assert back.to_json() == text and back.masked == {"audio": 0.8, "visual": 0.5}
    assert math.isnan(back.monitor[0]["ratios"]["visual"]) and back.loop == report.loop
    path = tmp_path / "diagnosis.json"
    report.to_json(path)
    assert Diagnosis.from_json(path).to_dict() == report.to_dict()
    data = report.to_dict()
    data["schema"] = 99
    with pytest.raises(ValueError, match="newer"):
        Diagnosis.from_dict(data)


def test_summary_says_everything_with_the_benchmarks_closest_to_its_profile():
    text = _full_report().summary()
    for needle in ("under-trained by 20.0 points", "Shapley values of accuracy", "conditional utilisation",
                   "| epoch | steps |", "Methods for this loop", "adamw: scaling one encoder's gradient",
                   "Benchmarks on data with a similar profile", "- On avdigits (3 seeds", "| ogm |"):
        assert needle in text, needle


def test_figure_writes_a_file_and_names_matplotlib_when_missing(tmp_path, monkeypatch):
    report = _full_report()
    figure = report.figure(tmp_path / "epochs.png")
    assert (tmp_path / "epochs.png").stat().st_size > 0 and len(figure.axes) == 2
    with pytest.raises(ValueError, match="end_epoch"):
        Diagnosis(("a", "b"), masked={"a": 0.5, "b": 0.5}).figure()
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'gradmod\[plot\]'"):
        report.figure()


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="missing \\['b'\\]"):
        Diagnosis(("a", "b"), masked={"a": 0.5})
    with pytest.raises(ValueError, match="accuracy in \\[0, 1\\]"):
        Diagnosis(("a", "b"), probe={"a": 50.0, "b": 0.5})
    with pytest.raises(ValueError, match="masking"):
        Diagnosis(("a", "b"), masking="pixels")
    with pytest.raises(ValueError, match="outside"):
        Diagnosis(("a", "b"), coalitions={frozenset({"z"}): 0.5})
    with pytest.raises(ValueError, match="decide\\(masked=...\\).*missing \\['b'\\]"):
        decide("ab", masked={"a": 0.5})
    data = _data({"a": 1.0, "b": 1.0}, 1, 0)
    with pytest.raises(TypeError, match="encode= and train_loader="):
        diagnose("ab", data, forward=lambda x: x["a"][:, :4], probe=True)
    with pytest.raises(TypeError, match="classes="):
        diagnose("ab", data, solo=lambda name: nn.Linear(6, 4), train_loader=data)
    with pytest.raises(ValueError, match="the monitor's modalities"):
        diagnose("ab", data, forward=lambda x: x["a"][:, :4], monitor=Monitor({"x": nn.Linear(2, 2), "y": nn.Linear(2, 2)}))
