"""Measures: the evidence each one computes (exact values), the inputs it refuses (by name) and the value
flags it raises on the device (each flag alone, at its boundaries)."""

from __future__ import annotations

import math

import pytest
import torch

from gradmod import functional as F
from gradmod.measures import IGNORE_INDEX, Measure, SoftmaxScore
from gradmod.methods.decoupling_free import ZetaGate
from gradmod.methods.dgm import DGMScore, dgm_evidence
from gradmod.methods.pdmp import StaticMetrics

NAMES = ("audio", "visual")


def logits_and_target(batch=5, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = {name: torch.randn(batch, classes, generator=g) * 2 for name in NAMES}
    return logits, torch.randint(0, classes, (batch,), generator=g)


def flags(problems) -> dict[str, bool]:
    assert all(isinstance(flag, torch.Tensor) and flag.dim() == 0 for flag in problems.values())
    return {message: bool(flag) for message, flag in problems.items()}


# ------------------------------------------------------------------ the base class
def test_the_base_class_reads_nothing_flags_nothing_and_needs_an_observe():
    class Constant(Measure):
        def evidence(self, names, **_):
            return {name: torch.tensor(1.0) for name in names}

    measure = Constant()
    assert measure.inputs == () and measure.needs_observe is True
    assert measure.problems(NAMES) == {}
    assert repr(measure) == "Constant()"
    assert IGNORE_INDEX == -100  # torch.nn.functional.cross_entropy's default


# ------------------------------------------------------------------ SoftmaxScore
def test_softmax_score_is_ogm_scores_per_modality():
    logits, y = logits_and_target()
    measure = SoftmaxScore()
    assert measure.inputs == ("logits", "target") and measure.needs_observe
    evidence = measure.evidence(NAMES, logits=logits, target=y)
    assert list(evidence) == list(NAMES)
    for name in NAMES:
        expected = sum(torch.softmax(logits[name][i], 0)[y[i]].item() for i in range(len(y)))
        assert evidence[name].item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("ignore_index", [IGNORE_INDEX, 2, None])
def test_softmax_score_leaves_out_exactly_the_ignored_samples(ignore_index):
    logits, _ = logits_and_target(batch=6)
    y = torch.tensor([0, 2, 1, 2, 0, 1])
    if ignore_index == IGNORE_INDEX:
        y = torch.tensor([0, -100, 1, -100, 0, 1])
    kept = torch.ones(6, dtype=torch.bool) if ignore_index is None else y != ignore_index
    evidence = SoftmaxScore(ignore_index=ignore_index).evidence(NAMES, logits=logits, target=y)
    for name in NAMES:
        expected = F.ogm_scores(logits[name][kept], y[kept], ignore_index=None)
        assert evidence[name].item() == pytest.approx(expected.item(), rel=1e-6)
    assert SoftmaxScore(ignore_index=ignore_index).ignore_index == ignore_index


@pytest.mark.parametrize("bad", [True, 1.0, "-100", torch.tensor(-100)])
def test_ignore_index_must_be_an_int_or_none(bad):
    for measure in (SoftmaxScore, DGMScore):
        with pytest.raises(TypeError, match=r"ignore_index must be an int or None, got"):
            measure(ignore_index=bad)


def test_softmax_score_refuses_bad_inputs_by_name():
    logits, y = logits_and_target()
    measure = SoftmaxScore()
    for method in (measure.evidence, measure.problems):
        with pytest.raises(ValueError, match=r"^observe\(\) needs target=\[batch\] class indices$"):
            method(NAMES, logits=logits)
        with pytest.raises(TypeError, match=r"observe\(logits=...\) must be a mapping"):
            method(NAMES, logits=logits["audio"], target=y)
        with pytest.raises(ValueError, match=r"^observe\(logits=...\) must name exactly the modalities \['audio', 'visual'\]: "
                           r"missing \['visual'\], unknown \['text'\]$"):
            method(NAMES, logits={"audio": logits["audio"], "text": logits["visual"]}, target=y)
        with pytest.raises(ValueError, match=r"target must be \[batch\] class indices matching logits\['visual'\] batch 4"):
            method(NAMES, logits={"audio": logits["audio"], "visual": logits["visual"][:4]}, target=y)
        with pytest.raises(ValueError, match=r"logits\['audio'\] must be \[batch, classes\]"):
            method(NAMES, logits={"audio": logits["audio"][0], "visual": logits["visual"]}, target=y)


def test_softmax_score_flags_each_bad_value_alone():
    logits, y = logits_and_target(classes=3)
    measure = SoftmaxScore()
    nan, outside = "logits of modality 'visual' contain NaN or inf", "target holds class indices outside [0, 3)"
    clean = flags(measure.problems(NAMES, logits=logits, target=y))
    assert set(clean) == {"logits of modality 'audio' contain NaN or inf", nan, outside}
    assert not any(clean.values())
    for value in (math.nan, math.inf, -math.inf):
        bad = {**logits, "visual": logits["visual"].clone()}
        bad["visual"][1, 2] = value
        assert [m for m, f in flags(measure.problems(NAMES, logits=bad, target=y)).items() if f] == [nan]
    for target, flagged in [([0, 1, 2, 2, 0], False), ([0, 1, 3, 2, 0], True), ([0, -1, 2, 2, 0], True),
                            ([0, -100, 2, 2, 0], False)]:
        got = flags(measure.problems(NAMES, logits=logits, target=torch.tensor(target)))
        assert got[outside] is flagged and not got[nan]
    got = flags(SoftmaxScore(ignore_index=None).problems(NAMES, logits=logits, target=torch.tensor([0, -100, 2, 2, 0])))
    assert got[outside] is True  # without an ignore index, −100 is a class index like any other
    assert repr(SoftmaxScore()) == "SoftmaxScore(ignore_index=-100)"


# ------------------------------------------------------------------ DGMScore
def multi_hot(batch=4, classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, classes, generator=g) > 0.5).float()


def test_dgm_score_of_scores_is_the_dgm_evidence_of_each_modality():
    g = torch.Generator().manual_seed(2)
    scores = {name: torch.rand(4, 3, generator=g) for name in NAMES}
    y = multi_hot()
    evidence = DGMScore().evidence(NAMES, scores=scores, target=y)
    assert list(evidence) == list(NAMES)
    for name in NAMES:
        assert evidence[name].item() == pytest.approx(dgm_evidence(scores[name], y).item(), rel=1e-6)


def test_dgm_score_of_logits_is_sigmoid_for_multi_hot_and_softmax_for_indices():
    logits, y = logits_and_target(batch=4)
    hot = multi_hot()
    measure = DGMScore()
    by_hot = measure.evidence(NAMES, logits=logits, target=hot)
    by_index = measure.evidence(NAMES, logits=logits, target=y)
    for name in NAMES:
        assert by_hot[name].item() == pytest.approx(dgm_evidence(torch.sigmoid(logits[name]), hot).item(), rel=1e-6)
        softmax = torch.softmax(logits[name], 1)
        assert by_index[name].item() == pytest.approx(dgm_evidence(softmax, y).item(), rel=1e-6)


def test_dgm_score_ignores_index_targets_but_never_multi_hot_columns():
    logits, _ = logits_and_target(batch=4)
    y = torch.tensor([0, -100, 2, 1])
    kept = y != -100
    evidence = DGMScore().evidence(NAMES, logits=logits, target=y)
    for name in NAMES:
        expected = dgm_evidence(torch.softmax(logits[name][kept], 1), y[kept])
        assert evidence[name].item() == pytest.approx(expected.item(), rel=1e-6)
    # a multi-hot target has no ignore index: a measure built with ignore_index=0 still reads every entry
    hot = multi_hot()
    scores = {name: torch.softmax(z, 1) for name, z in logits.items()}
    for name, value in DGMScore(ignore_index=0).evidence(NAMES, scores=scores, target=hot).items():
        assert value.item() == pytest.approx(dgm_evidence(scores[name], hot).item(), rel=1e-6)


def test_dgm_score_clamps_scores_that_rounding_pushed_outside_the_unit_interval():
    y = torch.tensor([[1.0, 0.0]])
    over = {"audio": torch.tensor([[1.0 + 4e-6, -4e-6]]), "visual": torch.tensor([[0.25, 0.5]])}
    exact = {"audio": torch.tensor([[1.0, 0.0]]), "visual": torch.tensor([[0.25, 0.5]])}
    measure = DGMScore()
    assert not any(flags(measure.problems(NAMES, scores=over, target=y)).values())
    clamped, reference = measure.evidence(NAMES, scores=over, target=y), measure.evidence(NAMES, scores=exact, target=y)
    assert {n: e.item() for n, e in clamped.items()} == {n: e.item() for n, e in reference.items()}
    assert reference["audio"].item() == 2.0  # Σ sY = 1, Δs̄ = 1 − 0


def test_dgm_score_refuses_bad_inputs_by_name():
    g = torch.Generator().manual_seed(3)
    scores = {name: torch.rand(4, 3, generator=g) for name in NAMES}
    measure = DGMScore()
    assert measure.inputs == ("scores", "logits", "target")
    for method in (measure.evidence, measure.problems):
        with pytest.raises(ValueError, match=r"^observe\(\) for DGM needs exactly one of scores= or logits=$"):
            method(NAMES, target=multi_hot())
        with pytest.raises(ValueError, match=r"^observe\(\) for DGM needs exactly one of scores= or logits=$"):
            method(NAMES, scores=scores, logits=scores, target=multi_hot())
        with pytest.raises(ValueError, match=r"^observe\(\) for DGM needs target= \(multi-hot \[B, C\] or class indices \[B\]\)$"):
            method(NAMES, scores=scores)
        with pytest.raises(ValueError, match=r"scores\['visual'\] must be a \[batch, classes\] tensor, got \(3,\)"):
            method(NAMES, scores={**scores, "visual": scores["visual"][0]}, target=multi_hot())
        with pytest.raises(ValueError, match=r"logits\['audio'\] must be a \[batch, classes\] tensor, got list"):
            method(NAMES, logits={**scores, "audio": [0.5]}, target=multi_hot())
        with pytest.raises(ValueError, match=r"multi-hot of scores\['audio'\]'s shape \(4, 3\), got \(4, 2\)"):
            method(NAMES, scores=scores, target=multi_hot(classes=2))
        with pytest.raises(ValueError, match=r"matching scores\['audio'\] batch 4"):
            method(NAMES, scores=scores, target=torch.zeros(3, dtype=torch.long))
        with pytest.raises(TypeError, match=r"observe\(scores=...\) must be a mapping"):
            method(NAMES, scores=scores["audio"], target=multi_hot())


def test_dgm_score_flags_each_bad_value_alone():
    measure = DGMScore()
    y = multi_hot(batch=1, classes=2)
    audio_scores = "scores of modality 'audio' lie outside [0, 1] or are not finite"
    target_values = "multi-hot target holds values outside [0, 1]"

    def raised(scores, target=y):
        return [message for message, flag in flags(measure.problems(NAMES, scores=scores, target=target)).items() if flag]

    good = {"audio": torch.tensor([[0.0, 1.0]]), "visual": torch.tensor([[0.5, 0.5]])}
    assert raised(good) == []
    for value in (1 + 2e-5, -2e-5, math.nan, math.inf):
        assert raised({**good, "audio": torch.tensor([[0.5, value]])}) == [audio_scores]
    for value in (1 + 5e-6, -5e-6, 1 + 1e-5, -1e-5):  # rounding within the tolerance, its ends included
        assert raised({**good, "audio": torch.tensor([[0.5, value]])}) == []
    for target in ([[2.0, 0.0]], [[-1.0, 0.0]]):
        assert raised(good, torch.tensor(target)) == [target_values]
    assert raised(good, torch.tensor([[1.0, 1.0]])) == []

    logits = {"audio": torch.tensor([[0.5, 0.1]]), "visual": torch.tensor([[math.nan, 0.0]])}
    got = flags(measure.problems(NAMES, logits=logits, target=torch.tensor([1])))
    assert [m for m, f in got.items() if f] == ["logits of modality 'visual' contain NaN or inf"]
    assert got["target holds class indices outside [0, 2)"] is False
    got = flags(measure.problems(NAMES, logits={**logits, "visual": torch.zeros(1, 2)}, target=torch.tensor([2])))
    assert [m for m, f in got.items() if f] == ["target holds class indices outside [0, 2)"]
    logits_of_multi_hot = flags(measure.problems(NAMES, logits={**logits, "visual": torch.full((1, 2), 9.0)}, target=y))
    assert not any(logits_of_multi_hot.values())  # logits need not lie in [0, 1]
    assert repr(DGMScore(ignore_index=None)) == "DGMScore(ignore_index=None)"


# ------------------------------------------------------------------ ZetaGate
def test_zeta_gate_evidence_and_its_required_input():
    measure = ZetaGate()
    assert measure.inputs == ("zeta",) and repr(measure) == "ZetaGate()"
    zeta = torch.tensor([[0.25, 1.0], [0.5, 0.0]])
    evidence = measure.evidence(NAMES, zeta=zeta)
    assert evidence["audio"].item() == 1.75 and evidence["visual"].item() == 2.25
    with pytest.raises(ValueError, match=r"^observe\(\) for the decoupling-free method needs zeta= \(the fusion gate\)$"):
        measure.evidence(NAMES)


def test_zeta_gate_flags_values_outside_the_unit_interval_for_one_gate_or_several():
    measure = ZetaGate()
    message = "zeta lies outside [0, 1] or is not finite"
    for zeta, bad in [([0.0, 1.0, 0.5], False), ([0.0, 1.0 + 1e-6], True), ([-1e-6, 0.5], True),
                      ([math.nan, 0.5], True), ([math.inf], True)]:
        assert flags(measure.problems(NAMES, zeta=torch.tensor(zeta))) == {message: bad}
    names = ("audio", "visual", "text")
    gates = {"audio": torch.tensor([0.2, 0.5]), "visual": torch.tensor([0.3, 0.5]), "text": torch.tensor([0.5, 0.0])}
    assert flags(measure.problems(names, zeta=gates)) == {message: False}
    assert flags(measure.problems(names, zeta={**gates, "text": torch.tensor([0.5, 1.5])})) == {message: True}
    with pytest.raises(TypeError, match=r"observe\(zeta=...\) must be a mapping"):
        measure.problems(names, zeta=[gates["audio"]])


# ------------------------------------------------------------------ StaticMetrics
def test_static_metrics_are_fixed_evidence_that_needs_no_observe():
    measure = StaticMetrics({"visual": 0.25, "audio": 0.75})
    assert measure.needs_observe is False and measure.inputs == ()
    evidence = measure.evidence(NAMES)
    assert list(evidence) == list(NAMES) and [e.item() for e in evidence.values()] == [0.75, 0.25]
    assert repr(measure) == "StaticMetrics({'visual': 0.25, 'audio': 0.75})"
    with pytest.raises(ValueError, match=r"static metrics must name exactly the modalities \['audio', 'text'\]"):
        measure.evidence(("audio", "text"))


def test_static_metrics_refuse_what_is_not_a_mapping_of_reals():
    with pytest.raises(TypeError, match="metrics must be a mapping modality name -> number, got list"):
        StaticMetrics([0.5, 0.5])
    with pytest.raises(ValueError, match="metric of modality 'visual'"):
        StaticMetrics({"audio": 0.5, "visual": -0.1})
    with pytest.raises(TypeError, match="metric of modality 'audio'"):
        StaticMetrics({"audio": "0.5", "visual": 0.1})
