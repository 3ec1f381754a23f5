"""The loop of kind ``"forward"`` (OPM, on-the-fly prediction modulation): the fusion head's input comes from the
method — ``features, keep = method(**inputs)`` with its ``forward_inputs`` — and the loss is the cross-entropy of
the head on the kept rows."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from reference_models.config import TrainConfig
from reference_models.loops.base import (
    APPLIER_FIELDS,
    WINDOW_FIELDS,
    MethodLoop,
    provide,
    rows,
)
from reference_models.tasks import Task

__all__ = ["ForwardLoop"]


class ForwardLoop(MethodLoop):
    """Kind ``"forward"``: the method changes the head's input in the forward pass (module docstring)."""

    kind = "forward"

    def __init__(self, config: TrainConfig, task: Task, device: torch.device) -> None:
        super().__init__(config, task, device)
        self.refuse({**APPLIER_FIELDS, **WINDOW_FIELDS}, "modulation window or params applier")
        self.needs_class_targets("computes its loss from class labels")
        self.method = self.info.preset(self.model.modality_modules(), seed=config.seed, **self.preset_options)

    def loss(self, inputs: Mapping[str, Tensor], target: Tensor) -> Tensor:
        given = provide(self.method.forward_inputs, self, inputs, target)
        features, keep = self.method(**given)
        logits = rows(self.model.head(features).logits)
        measured = self.model.measure_target(target)
        return F.cross_entropy(logits[keep], measured[keep]) if keep is not None else F.cross_entropy(logits, measured)
