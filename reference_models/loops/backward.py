"""The loop of kind ``"backward"`` (MMPareto, Wei & Hu, *MMPareto: Boosting Multimodal Learning with Innocent
Unimodal Assistance*, ICML 2024): a linear head per modality adds its cross-entropy to the fused one, and
``mod.backward(loss_fused, unimodal_losses)`` replaces ``loss.backward()``."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from reference_models.config import TrainConfig
from reference_models.loops.base import APPLIER_FIELDS, WINDOW_FIELDS, MethodLoop
from reference_models.tasks import Task

__all__ = ["BackwardLoop"]


class BackwardLoop(MethodLoop):
    """Kind ``"backward"``: the method is attached to the optimizer and its ``backward(multimodal_loss,
    unimodal_losses)`` replaces ``loss.backward()``."""

    kind = "backward"

    def __init__(self, config: TrainConfig, task: Task, device: torch.device) -> None:
        super().__init__(config, task, device)
        self.refuse({**APPLIER_FIELDS, **WINDOW_FIELDS}, "modulation window or params applier")
        self.needs_class_targets("trains unimodal heads")
        self.add_unimodal_heads("trains unimodal heads")
        self.method = self.info.preset(self.model.modality_modules(), **self.preset_options)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        super().attach(optimizer)
        self.method.attach(optimizer)

    def step(self, inputs: Mapping[str, Tensor], target: Tensor) -> Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        features = self.model.encode(inputs)
        fused = self.model.loss(self.model.head(features), target)
        unimodal = self.unimodal_losses(features, target)
        self.method.backward(fused, unimodal)
        self.optimizer.step()
        return (fused + sum(unimodal.values())).detach()
