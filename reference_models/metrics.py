"""Evaluation metrics of the reference benchmarks (CREMA-D, AVE, LLP), as their papers report them.

* CREMA-D (OGM-GE's protocol): `accuracy` and `macro_f1` over clips.
* AVE (Fu, Gao & Xu follow PSP and AVE-ECCV18's ``compute_acc``): `ave_segment_accuracy`, the
  fraction of the N×10 one-second segments whose predicted class (background included) is right.
* LLP / AVVP (Fu, Gao & Xu, "Evaluation Metrics"; official code YapengTian/AVVP-ECCV20
  ``utils/eval_metrics.py`` and ``main_avvp.py``): segment- and event-level F-scores of audio,
  visual and audio-visual events, Type@AV and Event@AV — `avvp_video_scores` for one video,
  `AVVPEvaluator` to accumulate them.

AVVP protocol, as the official evaluation computes it (our own code, same numbers):

1. Per video and per class c, counts TP/FP/FN of 0/1 predictions against the [25, 10] ground truth.
   Segment level: counted over the 10 one-second segments. Event level: an event is a maximal run of
   consecutive 1s of one class; a predicted event is a TP if its IoU with some ground-truth event of
   that class is ≥ 0.5, otherwise an FP; a ground-truth event without such a prediction is an FN.
2. Per video, ``F = mean over classes with TP + FP + FN > 0 of 2·TP / (2·TP + FP + FN)``; a video
   where no class is predicted or present scores 1.0 (all true negatives).
3. Audio-visual: prediction and ground truth are the element-wise AND of audio and visual.
   Event@AV: per class the audio and visual counts are *added* (TP_a + TP_v, …) before step 2, so it
   scores all audio and visual events together. Type@AV: mean of the audio, visual and AV scores.
4. Over videos: the plain mean of the per-video scores (Type@AV = mean of the three means, which is
   the same as the mean of per-video Type@AV). Scores are fractions in [0, 1]; papers print ×100.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "accuracy",
    "macro_f1",
    "ave_segment_accuracy",
    "extract_events",
    "segment_counts",
    "event_counts",
    "mean_class_f",
    "binarize_avvp",
    "avvp_video_scores",
    "AVVPEvaluator",
    "AVVP_KEYS",
]

#: Keys of `avvp_video_scores` and `AVVPEvaluator.compute`.
AVVP_KEYS: tuple[str, ...] = tuple(
    f"{level}_{kind}"
    for level in ("segment", "event")
    for kind in ("audio", "visual", "audio_visual", "type_av", "event_av")
)


def _class_predictions(pred: Tensor, target: Tensor) -> Tensor:
    """Class indices from ``pred``: as given when it has ``target``'s shape, else argmax of scores."""
    if pred.dim() == target.dim() + 1:
        if not pred.is_floating_point() or not torch.isfinite(pred).all():
            raise ValueError("pred scores must be finite floating-point values")
        pred = pred.argmax(dim=-1)
    if pred.shape != target.shape:
        raise ValueError(
            f"pred must be class indices shaped like target {tuple(target.shape)} or scores with one more "
            f"dimension, got shape {tuple(pred.shape)}"
        )
    if pred.is_floating_point() or target.is_floating_point():
        raise ValueError("class indices must be integer tensors")
    if target.numel() == 0:
        raise ValueError("cannot score an empty prediction")
    return pred


def accuracy(pred: Tensor, target: Tensor) -> float:
    """Fraction of items whose predicted class equals the target.

    ``pred``: class indices shaped like ``target`` or scores [..., C] (argmax taken).
    """
    pred = _class_predictions(pred, target)
    return (pred == target).float().mean().item()


def macro_f1(pred: Tensor, target: Tensor, num_classes: int) -> float:
    """Unweighted mean over classes of ``F1_c = 2·TP_c / (2·TP_c + FP_c + FN_c)``.

    Classes absent from both ``pred`` and ``target`` (TP + FP + FN = 0) are excluded from the mean,
    as scikit-learn's ``f1_score(average="macro", labels=None)`` does when it takes the labels present.
    """
    pred = _class_predictions(pred, target).reshape(-1)
    target = target.reshape(-1)
    for name, values in (("pred", pred), ("target", target)):
        if values.min() < 0 or values.max() >= num_classes:
            raise ValueError(f"{name} holds class indices outside [0, {num_classes})")
    hits = torch.bincount(target[pred == target], minlength=num_classes).double()
    predicted = torch.bincount(pred, minlength=num_classes).double()
    actual = torch.bincount(target, minlength=num_classes).double()
    present = (predicted + actual) > 0
    return (2 * hits[present] / (predicted + actual)[present]).mean().item()


def ave_segment_accuracy(pred: Tensor, target: Tensor) -> float:
    """AVE accuracy: fraction of the N×10 segments whose predicted class equals the label.

    ``target`` [N, 10] class indices (background = 28 included); ``pred`` [N, 10] indices or
    [N, 10, 29] scores. All segments are pooled, as in AVE-ECCV18's ``compute_acc``.
    """
    if target.dim() != 2:
        raise ValueError(f"AVE target must be [videos, segments] class indices, got shape {tuple(target.shape)}")
    return accuracy(pred, target)


def _binary(matrix: Tensor, name: str) -> Tensor:
    if matrix.dim() != 2:
        raise ValueError(f"{name} must be [classes, segments], got shape {tuple(matrix.shape)}")
    if matrix.dtype != torch.bool and not ((matrix == 0) | (matrix == 1)).all():
        raise ValueError(f"{name} must hold only 0/1 values")
    return matrix.bool()


def extract_events(sequence: Tensor) -> list[tuple[int, int]]:
    """Maximal runs of 1s of a 0/1 sequence as half-open ``(start, end)`` segment intervals."""
    if sequence.dim() != 1:
        raise ValueError(f"sequence must be 1-D, got shape {tuple(sequence.shape)}")
    padded = torch.nn.functional.pad(sequence.bool().to(torch.int8), (1, 1))
    steps = padded.diff()
    starts = (steps == 1).nonzero().flatten().tolist()
    ends = (steps == -1).nonzero().flatten().tolist()
    return list(zip(starts, ends))


def segment_counts(pred: Tensor, target: Tensor) -> Tensor:
    """Per class [C, 3] counts (TP, FP, FN) over segments of 0/1 matrices [C, T]."""
    pred, target = _binary(pred, "pred"), _binary(target, "target")
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    return torch.stack(
        [(pred & target).sum(-1), (pred & ~target).sum(-1), (~pred & target).sum(-1)], dim=-1
    )


def _matches(event: tuple[int, int], others: list[tuple[int, int]], iou_threshold: float) -> bool:
    """Whether ``event`` has IoU ≥ ``iou_threshold`` with one of ``others`` (intervals of segments)."""
    for other in others:
        overlap = max(0, min(event[1], other[1]) - max(event[0], other[0]))
        union = (event[1] - event[0]) + (other[1] - other[0]) - overlap
        if overlap >= iou_threshold * union:
            return True
    return False


def event_counts(pred: Tensor, target: Tensor, iou_threshold: float = 0.5) -> Tensor:
    """Per class [C, 3] counts (TP, FP, FN) of events (runs of 1s) matched at IoU ≥ ``iou_threshold``."""
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    pred, target = _binary(pred, "pred"), _binary(target, "target")
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    rows = []
    for pred_row, target_row in zip(pred, target):
        predicted, actual = extract_events(pred_row), extract_events(target_row)
        hits = sum(_matches(event, actual, iou_threshold) for event in predicted)
        misses = sum(not _matches(event, predicted, iou_threshold) for event in actual)
        rows.append((hits, len(predicted) - hits, misses))
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 3)


def mean_class_f(counts: Tensor) -> float:
    """Mean of ``2·TP / (2·TP + FP + FN)`` over classes with TP + FP + FN > 0; 1.0 if there are none."""
    if counts.dim() != 2 or counts.shape[-1] != 3:
        raise ValueError(f"counts must be [classes, 3] (TP, FP, FN), got shape {tuple(counts.shape)}")
    tp, fp, fn = counts.double().unbind(-1)
    active = (tp + fp + fn) > 0
    if not active.any():
        return 1.0
    return (2 * tp[active] / (2 * tp[active] + fp[active] + fn[active])).mean().item()


def binarize_avvp(
    audio_prob: Tensor, visual_prob: Tensor, video_prob: Tensor, threshold: float = 0.5
) -> tuple[Tensor, Tensor]:
    """0/1 segment predictions of the official AVVP evaluation from model probabilities.

    ``audio_prob``/``visual_prob`` [C, T] per-segment probabilities, ``video_prob`` [C]; a segment is
    predicted when its probability is ≥ ``threshold`` and its class's video-level probability is too
    (the official filter of false positives with the predicted weak labels).
    """
    if audio_prob.shape != visual_prob.shape or audio_prob.dim() != 2:
        raise ValueError(
            f"audio_prob and visual_prob must both be [classes, segments], got "
            f"{tuple(audio_prob.shape)} and {tuple(visual_prob.shape)}"
        )
    if video_prob.shape != audio_prob.shape[:1]:
        raise ValueError(f"video_prob must be [{audio_prob.shape[0]}], got shape {tuple(video_prob.shape)}")
    for name, prob in (("audio_prob", audio_prob), ("visual_prob", visual_prob), ("video_prob", video_prob)):
        if not torch.isfinite(prob).all():
            raise ValueError(f"{name} holds non-finite values")
    present = (video_prob >= threshold).unsqueeze(-1)
    return (audio_prob >= threshold) & present, (visual_prob >= threshold) & present


def avvp_video_scores(
    pred_audio: Tensor, pred_visual: Tensor, target_audio: Tensor, target_visual: Tensor
) -> dict[str, float]:
    """The ten AVVP scores of one video (keys `AVVP_KEYS`) from 0/1 matrices [C, T]."""
    pred_audio, pred_visual = _binary(pred_audio, "pred_audio"), _binary(pred_visual, "pred_visual")
    target_audio, target_visual = _binary(target_audio, "target_audio"), _binary(target_visual, "target_visual")
    scores: dict[str, float] = {}
    for level, counter in (("segment", segment_counts), ("event", event_counts)):
        audio = counter(pred_audio, target_audio)
        visual = counter(pred_visual, target_visual)
        audio_visual = counter(pred_audio & pred_visual, target_audio & target_visual)
        per_kind = {
            "audio": mean_class_f(audio),
            "visual": mean_class_f(visual),
            "audio_visual": mean_class_f(audio_visual),
        }
        per_kind["type_av"] = sum(per_kind.values()) / 3
        per_kind["event_av"] = mean_class_f(audio + visual)
        scores.update({f"{level}_{kind}": value for kind, value in per_kind.items()})
    return scores


class AVVPEvaluator:
    """Accumulates `avvp_video_scores` over videos and averages them (the official protocol)."""

    def __init__(self) -> None:
        self._sums = dict.fromkeys(AVVP_KEYS, 0.0)
        self.num_videos = 0

    def update(self, pred_audio: Tensor, pred_visual: Tensor, target_audio: Tensor, target_visual: Tensor) -> None:
        """Add one video ([C, T] 0/1 matrices) or a batch of videos ([B, C, T])."""
        if pred_audio.dim() == 2:
            pred_audio, pred_visual = pred_audio.unsqueeze(0), pred_visual.unsqueeze(0)
            target_audio, target_visual = target_audio.unsqueeze(0), target_visual.unsqueeze(0)
        batch = {pred_audio.shape[0], pred_visual.shape[0], target_audio.shape[0], target_visual.shape[0]}
        if len(batch) != 1:
            raise ValueError(f"predictions and targets disagree on the number of videos: {sorted(batch)}")
        for video in zip(pred_audio, pred_visual, target_audio, target_visual):
            for key, value in avvp_video_scores(*video).items():
                self._sums[key] += value
            self.num_videos += 1

    def compute(self) -> dict[str, float]:
        """Mean of every score over the videos seen so far."""
        if self.num_videos == 0:
            raise ValueError("AVVPEvaluator.compute() called before any update()")
        return {key: total / self.num_videos for key, total in self._sums.items()}
