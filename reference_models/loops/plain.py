"""The CLI's own methods: ``baseline`` (``--solo NAME``: one modality alone) and the ``unimodal_losses`` control."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from reference_models.config import TrainConfig
from reference_models.loops.base import MethodLoop
from reference_models.models.common import mask_features
from reference_models.tasks import Task

__all__ = ["ControlLoop", "HeadLoop", "PlainLoop"]


class PlainLoop(MethodLoop):
    """``baseline``: joint training on the fused loss. With ``--solo NAME``, the fused head trained on one
    modality alone (the other modalities' features zeroed), the reference a weak modality is measured against."""

    def __init__(self, config: TrainConfig, task: Task, device: torch.device) -> None:
        super().__init__(config, task, device)
        if config.solo is not None and config.solo not in task.modalities:
            raise ValueError(f"--solo {config.solo!r} is not a modality of {task.name}: {list(task.modalities)}")

    def options(self) -> dict[str, Any]:
        return {} if self.config.solo is None else {"solo": self.config.solo}

    def loss(self, inputs: Mapping[str, Tensor], target: Tensor) -> Tensor:
        features = self.model.encode(inputs)
        if self.config.solo is not None:
            features = mask_features(features, keep=self.config.solo)
        return self.model.loss(self.model.head(features), target)


class ControlLoop(MethodLoop):
    """``unimodal_losses``: the honest control of the methods that add unimodal heads (MMPareto, G-Blending, DGL,
    …): the same linear head per modality, its cross-entropy simply added, ``L_fused + Σ_m L_m``, no method."""

    def __init__(self, config: TrainConfig, task: Task, device: torch.device) -> None:
        super().__init__(config, task, device)
        self.needs_class_targets("trains unimodal heads")
        self.add_unimodal_heads("trains unimodal heads")

    def loss(self, inputs: Mapping[str, Tensor], target: Tensor) -> Tensor:
        features = self.model.encode(inputs)
        fused = self.model.loss(self.model.head(features), target)
        return fused + sum(self.unimodal_losses(features, target).values())


class HeadLoop(MethodLoop):
    """Kind ``"head"`` (MMCosine): the method is the fusion head itself, trained on the plain fused loss
    (``--fusion <method>``). The model's head is rebuilt with the run's strength and options (``--strength``
    is MMCosine's ``scaling``), keeping its initial weights."""

    kind = "head"

    def __init__(self, config: TrainConfig, task: Task, device: torch.device) -> None:
        super().__init__(config, task, device)
        if config.fusion != config.method:
            raise ValueError(f"{config.method} is a fusion head: train it with --fusion {config.method}")
        built = self.model.fusion
        head = self.info.preset(built.in_features, built.num_classes, **self.preset_options)
        head.load_state_dict(built.state_dict())
        self.model.fusion = head.to(device)
