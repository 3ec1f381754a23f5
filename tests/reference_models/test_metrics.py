"""Metrics of the reference benchmarks: hand-computed cases and properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference_models.metrics import (
    AVVP_KEYS,
    AVVPEvaluator,
    accuracy,
    ave_segment_accuracy,
    avvp_video_scores,
    binarize_avvp,
    event_counts,
    extract_events,
    macro_f1,
    mean_class_f,
    segment_counts,
)


def _runs(classes: int, spans: dict[int, list[tuple[int, int]]], segments: int = 10) -> torch.Tensor:
    """A [classes, segments] 0/1 matrix with 1s on the given half-open spans of each class."""
    matrix = torch.zeros(classes, segments, dtype=torch.int64)
    for row, intervals in spans.items():
        for start, end in intervals:
            matrix[row, start:end] = 1
    return matrix


@st.composite
def binary_matrices(draw: st.DrawFn, count: int) -> list[torch.Tensor]:
    classes, segments = draw(st.integers(1, 4)), draw(st.integers(1, 10))
    cells = st.lists(st.booleans(), min_size=classes * segments, max_size=classes * segments)
    return [torch.tensor(draw(cells)).reshape(classes, segments) for _ in range(count)]


# --- classification metrics ------------------------------------------------------------------


def test_accuracy_from_indices_and_scores() -> None:
    target = torch.tensor([0, 1, 2, 2])
    assert accuracy(torch.tensor([0, 1, 1, 2]), target) == pytest.approx(0.75)
    scores = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 1.0], [5.0, 0.0, 0.0]])
    assert accuracy(scores, target) == pytest.approx(0.75)


def test_accuracy_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="shaped like target"):
        accuracy(torch.tensor([0, 1]), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="finite"):
        accuracy(torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="integer"):
        accuracy(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="empty"):
        accuracy(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))


def test_macro_f1_matches_hand_computation_and_skips_absent_classes() -> None:
    # class 0: TP 1, FP 1 → 2/3; class 1: TP 1, FN 1 → 2/3; class 2: TP 1 → 1; class 3 absent: excluded.
    pred, target = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 2])
    assert macro_f1(pred, target, num_classes=4) == pytest.approx(7 / 9)
    assert macro_f1(pred, target, num_classes=40) == pytest.approx(7 / 9)
    # a class predicted but never true counts (F1 = 0)
    assert macro_f1(torch.tensor([3, 1]), torch.tensor([0, 1]), num_classes=4) == pytest.approx(1 / 3)


def test_macro_f1_rejects_out_of_range_classes() -> None:
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        macro_f1(torch.tensor([0, 3]), torch.tensor([0, 1]), num_classes=3)


def test_ave_segment_accuracy_pools_all_segments_background_included() -> None:
    target = torch.tensor([[28] * 5 + [3] * 5, [7] * 10])
    scores = torch.zeros(2, 10, 29)
    scores[0, :, 28] = 1.0  # background everywhere: 5 of 10 right
    scores[1, :, 7] = 1.0  # all 10 right
    assert ave_segment_accuracy(scores, target) == pytest.approx(15 / 20)
    assert ave_segment_accuracy(scores.argmax(-1), target) == pytest.approx(15 / 20)
    with pytest.raises(ValueError, match="videos, segments"):
        ave_segment_accuracy(torch.zeros(20, dtype=torch.int64), target.flatten())


@settings(max_examples=50, deadline=None)
@given(data=st.data(), num_classes=st.integers(1, 6), size=st.integers(1, 30))
def test_classification_metrics_properties(data: st.DataObject, num_classes: int, size: int) -> None:
    labels = st.lists(st.integers(0, num_classes - 1), min_size=size, max_size=size)
    pred, target = torch.tensor(data.draw(labels)), torch.tensor(data.draw(labels))
    assert 0.0 <= accuracy(pred, target) <= 1.0
    score = macro_f1(pred, target, num_classes)
    assert 0.0 <= score <= 1.0
    assert accuracy(target, target) == 1.0 and macro_f1(target, target, num_classes) == pytest.approx(1.0)
    permutation = torch.randperm(num_classes, generator=torch.Generator().manual_seed(size))
    assert macro_f1(permutation[pred], permutation[target], num_classes) == pytest.approx(score)


# --- AVVP (LLP) metrics ----------------------------------------------------------------------


def test_extract_events_finds_maximal_runs() -> None:
    assert extract_events(torch.tensor([1, 1, 0, 0, 1, 0, 1, 1, 1, 1])) == [(0, 2), (4, 5), (6, 10)]
    assert extract_events(torch.zeros(10)) == []
    assert extract_events(torch.ones(10)) == [(0, 10)]


def test_event_matching_at_exactly_half_overlap() -> None:
    target = _runs(1, {0: [(0, 4)]})
    assert event_counts(_runs(1, {0: [(0, 2)]}), target).tolist() == [[1, 0, 0]]  # IoU 2/4 = 0.5: a match
    assert event_counts(_runs(1, {0: [(2, 6)]}), target).tolist() == [[0, 1, 1]]  # IoU 2/6 < 0.5
    assert segment_counts(_runs(1, {0: [(2, 6)]}), target).tolist() == [[2, 2, 2]]


def test_empty_classes_are_excluded_and_an_empty_video_scores_one() -> None:
    assert mean_class_f(torch.tensor([[0, 0, 0], [1, 1, 0], [0, 0, 0]])) == pytest.approx(2 / 3)
    empty = torch.zeros(25, 10, dtype=torch.int64)
    assert all(value == 1.0 for value in avvp_video_scores(empty, empty, empty, empty).values())


def test_video_scores_match_hand_computation() -> None:
    target_audio = _runs(3, {0: [(0, 4)]})
    target_visual = _runs(3, {0: [(2, 6)], 1: [(0, 10)]})
    pred_audio = _runs(3, {0: [(0, 2)]})
    pred_visual = _runs(3, {0: [(2, 6)], 1: [(0, 5), (6, 10)]})
    scores = avvp_video_scores(pred_audio, pred_visual, target_audio, target_visual)
    expected = {
        "segment_audio": 2 / 3,
        "segment_visual": (1 + 18 / 19) / 2,
        "segment_audio_visual": 0.0,  # AV truth: class 0 on [2, 4); AV prediction empty
        "segment_type_av": (2 / 3 + (1 + 18 / 19) / 2) / 3,
        "segment_event_av": (12 / 14 + 18 / 19) / 2,  # audio and visual counts pooled per class
        "event_audio": 1.0,
        "event_visual": (1 + 2 / 3) / 2,
        "event_audio_visual": 0.0,
        "event_type_av": (1 + 5 / 6) / 3,
        "event_event_av": (1 + 2 / 3) / 2,
    }
    assert set(scores) == set(AVVP_KEYS)
    for key, value in expected.items():
        assert scores[key] == pytest.approx(value), key


def test_evaluator_averages_per_video_scores() -> None:
    target_audio = _runs(3, {0: [(0, 4)]})
    target_visual = _runs(3, {0: [(2, 6)], 1: [(0, 10)]})
    pred_audio = _runs(3, {0: [(0, 2)]})
    pred_visual = _runs(3, {0: [(2, 6)], 1: [(0, 5), (6, 10)]})
    single = avvp_video_scores(pred_audio, pred_visual, target_audio, target_visual)
    evaluator = AVVPEvaluator()
    evaluator.update(target_audio, target_visual, target_audio, target_visual)  # a perfect video
    evaluator.update(pred_audio, pred_visual, target_audio, target_visual)
    batched = AVVPEvaluator()
    batched.update(
        torch.stack([target_audio, pred_audio]),
        torch.stack([target_visual, pred_visual]),
        torch.stack([target_audio, target_audio]),
        torch.stack([target_visual, target_visual]),
    )
    assert evaluator.num_videos == batched.num_videos == 2
    for key, value in evaluator.compute().items():
        assert value == pytest.approx((1.0 + single[key]) / 2)
        assert batched.compute()[key] == pytest.approx(value)


def test_evaluator_and_scores_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="before any update"):
        AVVPEvaluator().compute()
    good = torch.zeros(25, 10, dtype=torch.int64)
    with pytest.raises(ValueError, match="0/1"):
        avvp_video_scores(good + 2, good, good, good)
    with pytest.raises(ValueError, match="differ in shape"):
        avvp_video_scores(good, good, torch.zeros(25, 9, dtype=torch.int64), good)
    with pytest.raises(ValueError, match="number of videos"):
        AVVPEvaluator().update(torch.stack([good, good]), good.unsqueeze(0), good.unsqueeze(0), good.unsqueeze(0))


def test_binarize_filters_segments_by_the_video_prediction() -> None:
    audio = torch.tensor([[0.9, 0.2], [0.7, 0.6]])
    visual = torch.tensor([[0.1, 0.5], [0.4, 0.8]])
    video = torch.tensor([0.8, 0.3])  # class 1 not predicted at video level: its segments are dropped
    pred_audio, pred_visual = binarize_avvp(audio, visual, video)
    assert pred_audio.tolist() == [[True, False], [False, False]]
    assert pred_visual.tolist() == [[False, True], [False, False]]
    with pytest.raises(ValueError, match="non-finite"):
        binarize_avvp(audio, visual, torch.tensor([float("nan"), 0.0]))


@settings(max_examples=60, deadline=None)
@given(sequence=st.lists(st.booleans(), min_size=1, max_size=12))
def test_events_rebuild_the_sequence(sequence: list[bool]) -> None:
    events = extract_events(torch.tensor(sequence))
    rebuilt = [False] * len(sequence)
    for start, end in events:
        assert start < end
        rebuilt[start:end] = [True] * (end - start)
    assert rebuilt == sequence
    assert all(first[1] < second[0] for first, second in zip(events, events[1:]))  # maximal: gaps between runs


@settings(max_examples=60, deadline=None)
@given(matrices=binary_matrices(2))
def test_count_marginals(matrices: list[torch.Tensor]) -> None:
    pred, target = matrices
    tp, fp, fn = segment_counts(pred, target).unbind(-1)
    assert torch.equal(tp + fp, pred.sum(-1)) and torch.equal(tp + fn, target.sum(-1))
    events = event_counts(pred, target)
    assert torch.equal(events[:, 0] + events[:, 1], torch.tensor([len(extract_events(row)) for row in pred]))
    assert event_counts(target, target)[:, 1:].sum() == 0


@settings(max_examples=60, deadline=None)
@given(matrices=binary_matrices(4))
def test_video_scores_range_identity_and_modality_symmetry(matrices: list[torch.Tensor]) -> None:
    pred_audio, pred_visual, target_audio, target_visual = matrices
    scores = avvp_video_scores(pred_audio, pred_visual, target_audio, target_visual)
    assert all(0.0 <= value <= 1.0 for value in scores.values())
    perfect = avvp_video_scores(target_audio, target_visual, target_audio, target_visual)
    assert all(value == pytest.approx(1.0) for value in perfect.values())
    swapped = avvp_video_scores(pred_visual, pred_audio, target_visual, target_audio)
    for level in ("segment", "event"):
        assert swapped[f"{level}_audio"] == pytest.approx(scores[f"{level}_visual"])
        assert swapped[f"{level}_visual"] == pytest.approx(scores[f"{level}_audio"])
        for kind in ("audio_visual", "type_av", "event_av"):
            assert swapped[f"{level}_{kind}"] == pytest.approx(scores[f"{level}_{kind}"])
