"""The loops of kind ``"data"``: the batch comes from the method (Ma, Ding & Chen, *Mixup Helps Understanding
Multimodal Video Better*, 2025: MM mixes the fused features, B-MM the weak modality's inputs); both train on the
soft targets (`gradmod.methods.mixup.soft_cross_entropy`). Each data method has its loop here (`DATA_LOOPS`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from gradmod.methods.mixup import soft_cross_entropy
from reference_models.config import TrainConfig
from reference_models.loops.base import APPLIER_FIELDS, WINDOW_FIELDS, MethodLoop
from reference_models.tasks import IndexedDataset, Task

__all__ = ["DATA_LOOPS", "BalancedMixupLoop", "MixupLoop", "ValuationLoop"]


class _DataLoop(MethodLoop):
    """The mixups build soft targets for single-label classification."""

    kind = "data"

    def __init__(self, config: TrainConfig, task: Task, device: torch.device) -> None:
        super().__init__(config, task, device)
        self.refuse({**APPLIER_FIELDS, **WINDOW_FIELDS}, "modulation window or params applier")
        if task.kind != "classification":
            raise ValueError(f"{config.method} is defined for single-label classification (avdigits, avmnist, cremad), not {task.name}")


class MixupLoop(_DataLoop):
    """``mm``: MM (eq. (3)) mixes the fused representation — every modality's features with one λ and π — and
    trains on the soft targets."""

    def __init__(self, config: TrainConfig, task: Task, device: torch.device) -> None:
        super().__init__(config, task, device)
        self.method = self.info.preset(generator=torch.Generator().manual_seed(config.seed), **self.preset_options)

    def loss(self, inputs: Mapping[str, Tensor], target: Tensor) -> Tensor:
        features = self.model.encode(inputs)
        names = list(features)
        widths = [features[n].shape[-1] for n in names]
        mixed, soft = self.method(torch.cat([features[n] for n in names], -1), target, self.task.num_classes)
        return soft_cross_entropy(self.model.head(dict(zip(names, mixed.split(widths, -1)))).logits, soft)


class BalancedMixupLoop(_DataLoop):
    """``bmm``: B-MM (eqs. (5)–(8)) mixes the weak modality's inputs.

    After every epoch each modality's unimodal accuracy on the whole training split is measured in eval mode —
    from the head's decoupled per-modality logits where it has them (concat, sum, shared), else with the other
    modalities' features zeroed — and `gradmod.BalancedMixup` smooths it over epochs (``--bmm-smoothing``) before
    it sets κ: the stable estimate of `gradmod.methods.mixup.smoothed_accuracy`.
    """

    def __init__(self, config: TrainConfig, task: Task, device: torch.device) -> None:
        super().__init__(config, task, device)
        self._measured: dict[str, float] = {}
        self.method = self.info.preset(
            task.modalities, task.num_classes, seed=config.seed, measure=self._training_accuracies, **self.preset_options
        )

    def _training_accuracies(self) -> dict[str, float]:
        loader = DataLoader(IndexedDataset(self.train_set), batch_size=self.config.batch_size, num_workers=self.config.workers)
        evaluation = self.task.evaluate(loader, self.device)
        self._measured = evaluation.get("unimodal_decoupled", evaluation["unimodal"])
        return self._measured

    def loss(self, inputs: Mapping[str, Tensor], target: Tensor) -> Tensor:
        mixed, soft = self.method(inputs, target)
        return soft_cross_entropy(self.model(mixed).logits, soft)

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        super().end_epoch(epoch)
        return {
            "coefficients": {},
            "bmm": {
                "train_unimodal": self._measured,
                "smoothed": self.method.accuracy,
                "kappa": self.method.kappa,
                "weak": list(self.method.weak_modalities),
                "strength": self.method.strength,
            },
        }


#: The key of a sample's presence mask among its inputs (`ValuationLoop`: which modalities it keeps).
PRESENT = "__present__"


class _WithPresence(Dataset):
    """`ModalityValuation`'s epoch data as ``({**inputs, PRESENT: presence}, target)`` items."""

    def __init__(self, items: Dataset) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[dict[str, Tensor], Tensor]:
        (inputs, target), present = self.items[index]
        return {**inputs, PRESENT: present}, target


class ValuationLoop(_DataLoop):
    """``valuation``: modality valuation (Wei et al., *Enhancing Multimodal Cooperation via Sample-level Modality
    Valuation*, CVPR 2024). Before every epoch past the warm-up the method values each training item's modalities
    (one unshuffled eval pass, features zeroed at the head) and re-samples the epoch's data: copies of items with a
    modality zeroed, which the step applies to the features before the fused head."""

    def __init__(self, config: TrainConfig, task: Task, device: torch.device) -> None:
        super().__init__(config, task, device)
        from gradmod.methods.valuation import coalition_correct

        base = self.task.train_set if self.held_out is None else self.train_set
        head = self.head_module
        self.method = self.info.preset(
            task.modalities, base, lambda: coalition_correct(self.model, self.encoded, head, self.loader(base)),
            seed=config.seed, **self.preset_options,
        )

    @property
    def epoch_data(self) -> Dataset:
        """The epoch's training items (after `start_epoch`), with each item's presence mask among its inputs."""
        return _WithPresence(self.method.dataset)

    def loss(self, inputs: Mapping[str, Tensor], target: Tensor) -> Tensor:
        inputs = dict(inputs)
        present = inputs.pop(PRESENT)
        features = self.method.mask(self.model.encode(inputs), present)
        return self.model.loss(self.model.head(features), target)


#: The loop of each data method, by key.
DATA_LOOPS: dict[str, type[_DataLoop]] = {"mm": MixupLoop, "bmm": BalancedMixupLoop, "valuation": ValuationLoop}
