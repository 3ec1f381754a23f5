"""The loop of kind ``"turns"`` (MLA, Zhang et al., *Multimodal Representation Learning by Alternating Unimodal
Adaptation*, CVPR 2024): per batch, one optimizer step per modality, in turn, each on that modality's features
through the shared head (``--fusion shared``). Evaluation uses the head's entropy-weighted fusion."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from reference_models.config import TrainConfig
from reference_models.loops.base import APPLIER_FIELDS, WINDOW_FIELDS, MethodLoop
from reference_models.models.common import SharedHead
from reference_models.tasks import Task

__all__ = ["TurnsLoop"]


class TurnsLoop(MethodLoop):
    """Kind ``"turns"``: one optimizer step per modality and batch through the shared head, each announced by
    ``observe(name, features)``."""

    kind = "turns"

    def __init__(self, config: TrainConfig, task: Task, device: torch.device) -> None:
        super().__init__(config, task, device)
        self.refuse({**APPLIER_FIELDS, **WINDOW_FIELDS}, "modulation window or params applier")
        self.needs_class_targets("trains every modality through one classification head")
        if not isinstance(getattr(self.model, "fusion", None), SharedHead):
            raise ValueError(
                f"{config.method} trains every modality through one shared head: use --fusion shared (one linear "
                f"head, one feature width for all encoders); the {task.name} model with --fusion {config.fusion} has none"
            )
        self.head = self.model.fusion.linear
        self.method = self.info.preset(self.model.modality_modules(), self.head, **self.preset_options)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        super().attach(optimizer)
        self.method.attach(optimizer)

    def step(self, inputs: Mapping[str, Tensor], target: Tensor) -> Tensor:
        features = self.model.encode(inputs)
        measured = self.model.measure_target(target)
        total = torch.zeros(())
        for name in self.method.names:
            self.optimizer.zero_grad(set_to_none=True)
            rows = features[name].flatten(0, -2)
            self.method.observe(name, rows)
            loss = F.cross_entropy(self.head(rows), measured)
            loss.backward()
            self.optimizer.step()
            total = total + loss.detach().cpu()
        return total / len(self.method.names)
