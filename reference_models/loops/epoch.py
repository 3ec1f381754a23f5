"""The loop of kind ``"epoch"`` (Diagnosing & Re-learning): plain joint training; after every epoch the method
diagnoses each encoder on pooled features of the training split and of a held-out part of it
(``--<method>-holdout``, never the test split) and re-initialises it softly where it has to."""

from __future__ import annotations

import torch

from reference_models.config import TrainConfig
from reference_models.loops.base import APPLIER_FIELDS, WINDOW_FIELDS, MethodLoop
from reference_models.tasks import Task

__all__ = ["EpochLoop"]


class EpochLoop(MethodLoop):
    """Kind ``"epoch"``: the fused loss every step; the method's ``end_epoch`` between epochs."""

    kind = "epoch"

    def __init__(self, config: TrainConfig, task: Task, device: torch.device) -> None:
        super().__init__(config, task, device)
        self.refuse({**APPLIER_FIELDS, **WINDOW_FIELDS}, "modulation window or params applier")
        if self.held_out is None:
            raise ValueError(f"{config.method} diagnoses on a held-out part of the training split: give it a holdout option")
        from gradmod.methods.relearning import pooled_features

        splits = {"train": self.train_set, "held_out": self.held_out}

        def features(split: str):
            return pooled_features(self.model, self.encoded, self.loader(splits[split]))

        self.method = self.info.preset(
            self.model.modality_modules(), task.num_classes, features, **self.preset_options
        )
