"""The loop of kind ``"backward"`` (MMPareto, Wei & Hu, *MMPareto: Boosting Multimodal Learning with Innocent
Unimodal Assistance*, ICML 2024): a linear head per modality adds its cross-entropy to the fused one, and
``mod.backward(loss_fused, unimodal_losses)`` replaces ``loss.backward()``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from reference_models.config import TrainConfig
from reference_models.loops.base import APPLIER_FIELDS, WINDOW_FIELDS, MethodLoop
from reference_models.tasks import Task

__all__ = ["BackwardLoop"]


class BackwardLoop(MethodLoop):
    """Kind ``"backward"``: the method is attached to the optimizer and its ``backward(multimodal_loss,
    unimodal_losses)`` replaces ``loss.backward()``; the epoch's record holds the mean of each recorded field."""

    kind = "backward"

    def __init__(self, config: TrainConfig, task: Task, device: torch.device) -> None:
        super().__init__(config, task, device)
        self.refuse({**APPLIER_FIELDS, **WINDOW_FIELDS}, "modulation window or params applier")
        self.needs_class_targets("trains unimodal heads")
        self.add_unimodal_heads("trains unimodal heads")
        self.method = self.info.preset(self.model.modality_modules(), **self.preset_options)
        self._epoch_start = 0

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        super().attach(optimizer)
        self.method.attach(optimizer)

    def start_epoch(self, epoch: int) -> None:
        super().start_epoch(epoch)
        self._epoch_start = self.method.step_count

    def step(self, inputs: Mapping[str, Tensor], target: Tensor) -> Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        features = self.model.encode(inputs)
        fused = self.model.loss(self.model.head(features), target)
        unimodal = self.unimodal_losses(features, target)
        self.method.backward(fused, unimodal)
        self.optimizer.step()
        return (fused + sum(unimodal.values())).detach()

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        super().end_epoch(epoch)
        records = [r for r in self.method.history if r["step"] >= self._epoch_start]
        fields = [key for key, value in records[0].items() if isinstance(value, Mapping)] if records else []
        summary = {key: {n: sum(r[key][n] for r in records) / len(records) for n in self.method.names} for key in fields}
        return {"coefficients": {}, self.config.method: summary}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "epoch_start": self._epoch_start}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._epoch_start = state["epoch_start"]
