"""Tasks: a dataset's train/val/test splits, its reference model and how it is evaluated.

``build_task("avdigits" | "avmnist" | "cremad" | "ave" | "llp", ...)`` is the one place the training CLI learns
what a dataset looks like; everything dataset-specific (metrics, targets, masks) is answered here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from reference_models import metrics
from reference_models.config import DATASETS
from reference_models.models.common import (
    FUSION_KINDS,
    ModelOutput,
    MultimodalModel,
    mask_features,
)

__all__ = ["Task", "build_task", "DATASETS", "TASK_KINDS", "SELECTION_METRICS"]

#: ``classification``: one label per item (AV-digits, CREMA-D); ``segments``: one label per 1-s segment
#: (AVE); ``parsing``: weak multi-hot video labels, dense evaluation (LLP).
TASK_KINDS = ("classification", "segments", "parsing")
#: What ``evaluate(...)["accuracy"]``, the score model selection compares, is for each kind of task.
SELECTION_METRICS = {
    "classification": "accuracy",
    "segments": "segment accuracy",
    "parsing": "segment-level Type@AV F-score",
}


class IndexedDataset(Dataset):
    """``(inputs, target, index)``: lets evaluation look up per-item extras (LLP's dense labels)."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[dict[str, Tensor], Any, int]:
        inputs, target = self.base[index]
        return inputs, target, index


@dataclass
class Task:
    """A dataset's splits and reference model, with the metrics its papers report.

    ``val_set`` is the validation split where the dataset has one (AVE, LLP), else ``None``.
    """

    name: str
    kind: str
    train_set: Dataset
    test_set: Dataset
    model: MultimodalModel
    num_classes: int
    info: dict[str, Any] = field(default_factory=dict)
    val_set: Dataset | None = None

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.model.modalities

    @property
    def selection_metric(self) -> str:
        """What the ``accuracy`` of `evaluate` measures for this task (the score model selection compares)."""
        return SELECTION_METRICS[self.kind]

    @torch.no_grad()
    def evaluate(
        self, loader: DataLoader, device: torch.device, predict: Callable[[dict[str, Tensor]], Tensor] | None = None
    ) -> dict[str, Any]:
        """Fused and per-modality metrics on ``loader`` (built on `IndexedDataset`).

        Keys: ``accuracy`` (see `selection_metric`), ``macro_f1`` (classification and segments),
        ``unimodal`` — each modality's score with the other modality's features zeroed — and, for
        the concat and sum heads, ``unimodal_decoupled`` — OGM-GE's convention
        (`MultimodalModel.decoupled_logits`); LLP adds ``avvp``, its ten scores. ``predict`` (features → logits)
        replaces the fused head where a method predicts otherwise at test time (an ensemble of the unimodal heads):
        it gives the fused prediction, and on masked features each modality's.
        """
        was_training = self.model.training
        self.model.eval()
        try:
            return self._evaluate(loader, device, predict)
        finally:
            self.model.train(was_training)

    def _batches(self, loader: DataLoader, device: torch.device) -> Iterator[tuple[ModelOutput, Tensor, Tensor, Any]]:
        """Per batch: the model output, the target, the item indices and the features."""
        for inputs, target, index in loader:
            inputs = {n: x.to(device) for n, x in inputs.items()}
            features = self.model.encode(inputs)
            yield self.model.head(features), target.to(device), index, features

    def _evaluate(self, loader: DataLoader, device: torch.device, predict: Callable | None) -> dict[str, Any]:
        if self.kind == "parsing":
            return self._evaluate_parsing(loader, device)
        fused, targets = [], []
        predictions: dict[str, dict[str, list[Tensor]]] = {"unimodal": {}, "unimodal_decoupled": {}}
        for output, target, _, features in self._batches(loader, device):
            fused.append((output.logits if predict is None else predict(features)).argmax(-1).cpu())
            targets.append(target.cpu())
            masked = self.model.masked_logits(features) if predict is None else {
                name: predict(mask_features(features, keep=name)) for name in self.modalities
            }
            per_modality = {"unimodal": masked, "unimodal_decoupled": self.model.decoupled_logits(features) or {}}
            for key, logits in per_modality.items():
                for name, values in logits.items():
                    predictions[key].setdefault(name, []).append(values.argmax(-1).cpu())
        pred, target = torch.cat(fused), torch.cat(targets)
        score = metrics.accuracy if self.kind == "classification" else metrics.ave_segment_accuracy
        result: dict[str, Any] = {
            "accuracy": score(pred, target),
            "macro_f1": metrics.macro_f1(pred.reshape(-1), target.reshape(-1), self.num_classes),
        }
        for key, per_name in predictions.items():
            if per_name:
                result[key] = {name: score(torch.cat(p), target) for name, p in per_name.items()}
        return result

    def _evaluate_parsing(self, loader: DataLoader, device: torch.device) -> dict[str, Any]:
        evaluator = metrics.AVVPEvaluator()
        dataset = loader.dataset.base  # type: ignore[attr-defined]
        for output, _, index, _ in self._batches(loader, device):
            video_probs = torch.sigmoid(output.logits).cpu()
            snippet = {n: p.cpu() for n, p in output.snippet_probs.items()}  # [B, T, C]
            for row, item in enumerate(index.tolist()):
                dense = dataset.segment_labels(item)
                pred_a, pred_v = metrics.binarize_avvp(snippet["audio"][row].T, snippet["visual"][row].T, video_probs[row])
                evaluator.update(pred_a, pred_v, dense["audio"] > 0.5, dense["visual"] > 0.5)
        scores = evaluator.compute()
        return {
            "accuracy": scores["segment_type_av"],
            "avvp": scores,
            "unimodal": {"audio": scores["segment_audio"], "visual": scores["segment_visual"]},
        }

    def unimodal_loss(self, inputs: Mapping[str, Tensor], target: Tensor, keep: str) -> Tensor:
        """Training loss of modality ``keep`` alone (the others' features zeroed): PDMP's unimodal stage."""
        features = mask_features(self.model.encode(inputs), keep=keep)
        return self.model.loss(self.model.head(features), target)


def build_task(
    name: str,
    *,
    data_root: str | Path | None = None,
    fusion: str = "concat",
    seed: int = 0,
    max_items: int | None = None,
    dataset_options: Mapping[str, Any] | None = None,
) -> Task:
    """Splits and a freshly initialised model (seeded by ``seed``) for dataset ``name``.

    AV-digits is generated in memory (``dataset_options`` go to `make_avdigits`); AV-MNIST is embedded in the
    repository (``dataset_options`` go to both splits' `reference_models.data.avmnist.AVMNIST`: the split kind,
    the difficulty knobs; ``repair_every_epoch`` to the training split only); the others read the real on-disk
    formats under ``data_root`` (see each loader for its layout). ``max_items`` caps each split (smoke runs).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    if fusion not in FUSION_KINDS:
        raise ValueError(f"unknown fusion {fusion!r}; expected one of {FUSION_KINDS}")
    options = dict(dataset_options or {})
    if options and name not in ("avdigits", "avmnist"):
        raise ValueError(f"dataset options {sorted(options)} are for the generated or embedded datasets, not {name!r}")
    if name not in ("avdigits", "avmnist") and data_root is None:
        raise ValueError(f"dataset {name!r} is read from disk: pass --data-root (the folder holding its files)")
    torch.manual_seed(seed)
    if name == "avdigits":
        from reference_models.data.avdigits import make_avdigits
        from reference_models.models.avdigits import AVDigitsModel

        train, test = make_avdigits(seed=seed, **options)
        if max_items is not None:
            train, test = (torch.utils.data.Subset(s, range(min(max_items, len(s)))) for s in (train, test))
        return Task(name, "classification", train, test, AVDigitsModel(fusion), 10, {"generator": options})
    if name == "avmnist":
        from reference_models.data.avmnist import AVMNIST
        from reference_models.models.avmnist import AVMNISTModel

        repair = options.pop("repair_every_epoch", False)
        train = AVMNIST("train", seed=seed, max_items=max_items, repair_every_epoch=repair, **options)
        test = AVMNIST("test", seed=seed, max_items=max_items, **options)
        info = {"dataset": {**options, "repair_every_epoch": repair}}
        return Task(name, "classification", train, test, AVMNISTModel(fusion), AVMNIST.num_classes, info)
    if name == "cremad":
        from reference_models.data.cremad import CremaD
        from reference_models.models.cremad import CremaDModel

        train, test = (CremaD(data_root, split, max_items=max_items) for split in ("train", "test"))
        return Task(name, "classification", train, test, CremaDModel(fusion), CremaD.num_classes)
    if name == "ave":
        from reference_models.data.ave import AVE
        from reference_models.models.ave import NUM_AVE_CLASSES, AVEModel

        train, val, test = (AVE(data_root, split, max_items=max_items) for split in ("train", "val", "test"))
        return Task(name, "segments", train, test, AVEModel(fusion), NUM_AVE_CLASSES, val_set=val)
    from reference_models.data.llp import LLP
    from reference_models.models.llp import LLPModel

    if fusion != "concat":
        raise ValueError("the LLP model has its own fusion (HAN attention + MSDU): leave --fusion at its default")
    train, val, test = (LLP(data_root, split, max_items=max_items) for split in ("train", "val", "test"))
    return Task(name, "parsing", train, test, LLPModel(), LLP.num_classes, val_set=val)
