"""The loop of kind ``"loss"``: the training loss of a batch is the method's, from the step inputs it names.

A loss method declares ``loss_inputs`` (names of `gradmod.method.INPUTS`); the loop computes them
(`reference_models.loops.base.provide`) and backwards ``method.loss(**inputs)``. The preset is built from what the
loop knows, bound by parameter name: ``modalities`` (the encoders), ``heads`` (``fused`` and one per modality),
``names``, ``num_classes``, ``seed``, ``epochs``, and a per-epoch ``measure`` where the method needs data once per
epoch (`MEASURES`: G-Blending's checkpoint of every head's train and held-out loss). Unimodal heads are added to the
model when the method reads them. Methods that start from unimodal models trained alone get them
(`train_unimodal`, ``--<method>-pretrain-epochs``, default the dataset's epochs): UMT's frozen ``teachers`` (the
encoders of a copy of the model, each trained alone), ReconBoost's ``pretrained`` members (the model's own encoders
and unimodal heads, each trained alone). A method with parameters of its own (``method.extra``) has them stepped by
the run's optimizer, and one that predicts otherwise at test time (``predict``) is evaluated with its prediction.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

import gradmod
from reference_models.config import DATASET_DEFAULTS, TrainConfig
from reference_models.loops.base import (
    APPLIER_FIELDS,
    FUSED_HEAD,
    HEAD_SEED_OFFSET,
    WINDOW_FIELDS,
    MethodLoop,
    make_optimizer,
    provide,
    rows,
)
from reference_models.tasks import Task

__all__ = ["LossLoop", "MEASURES", "train_unimodal"]


def _gblending_measure(loop: LossLoop) -> Callable[[], Any]:
    """G-Blending's checkpoint: every head's mean loss on the training split and on the held-out part."""
    size = {"batch_size": loop.config.batch_size, "num_workers": loop.config.workers}

    def heads(model: nn.Module, batch: Any) -> tuple[dict[str, Tensor], Tensor]:
        inputs, target = batch
        inputs, target = {n: x.to(loop.device) for n, x in inputs.items()}, target.to(loop.device)
        features = model.encode(inputs)
        logits = {FUSED_HEAD: rows(model.head(features).logits)}
        logits.update({name: rows(z) for name, z in model.unimodal_head_logits(features).items()})
        return logits, model.measure_target(target)

    def measure() -> Any:
        return gradmod.methods.gblending.checkpoint(
            loop.model, heads, train=DataLoader(loop.train_set, **size), held_out=DataLoader(loop.held_out, **size)
        )

    return measure


def train_unimodal(loop: LossLoop, model: nn.Module, epochs: int) -> None:
    """Train each modality's encoder and unimodal head of ``model`` alone (its own cross-entropy), in place, for
    ``epochs`` epochs of the loop's training split with the run's optimizer settings and seed."""
    config = loop.config
    for name in loop.task.modalities:
        parameters = [*model.encoders[name].parameters(), *model.unimodal_heads[name].parameters()]
        optimizer = make_optimizer(config, parameters)
        generator = torch.Generator().manual_seed(config.seed + PRETRAIN_SEED_OFFSET)
        for _ in range(epochs):
            for inputs, target in DataLoader(loop.train_set, config.batch_size, shuffle=True, generator=generator):
                optimizer.zero_grad(set_to_none=True)
                inputs, target = {n: x.to(loop.device) for n, x in inputs.items()}, target.to(loop.device)
                features = model.encoders[name](inputs[name])
                logits = rows(model.unimodal_heads[name](features))
                torch.nn.functional.cross_entropy(logits, model.measure_target(target)).backward()
                optimizer.step()


#: Offset of the seed that shuffles the unimodal pretraining from the run's seed.
PRETRAIN_SEED_OFFSET = 40_009
def _pmr_measure(loop: LossLoop) -> Callable[[], Any]:
    """PMR's prototype pass: class means of each modality's features over the first tenth of the training split's
    batches, in its order (so every epoch, and a resumed run, reads the same items)."""
    from gradmod.methods.pmr import prototype_pass

    return lambda: prototype_pass(loop.model, loop.encoded, loop.loader(loop.train_set), loop.task.num_classes)


#: The per-epoch data a method's ``measure`` needs, by method key: ``loop -> measure``.
MEASURES: dict[str, Callable[[LossLoop], Callable[[], Any]]] = {"gblending": _gblending_measure, "pmr": _pmr_measure}


class LossLoop(MethodLoop):
    """Kind ``"loss"``: backward the method's ``loss(**inputs)`` of the inputs it names (module docstring)."""

    kind = "loss"

    def __init__(self, config: TrainConfig, task: Task, device: torch.device) -> None:
        super().__init__(config, task, device)
        self.refuse({**APPLIER_FIELDS, **WINDOW_FIELDS}, "modulation window or params applier")
        self.reads = tuple(self.info.preset.loss_inputs)
        if {"target", "losses", "unimodal_head_logits"} & set(self.reads):
            self.needs_class_targets("trains unimodal heads" if "losses" in self.reads else "computes its loss from class labels")
        if FUSED_HEAD in task.modalities:
            raise ValueError(f"{config.method} names the fused head {FUSED_HEAD!r}, which is also a modality of {task.name}")
        if {"unimodal_head_logits", "losses"} & set(self.reads):
            self.add_unimodal_heads("trains unimodal heads")
        arguments, keywords = self._arguments()
        self.method = self.info.preset(*arguments, **keywords)

    def _arguments(self) -> tuple[list[Any], dict[str, Any]]:
        known: dict[str, Any] = {
            "modalities": self.model.modality_modules(),
            "heads": (FUSED_HEAD, *self.task.modalities),
            "names": self.task.modalities,
            "num_classes": self.task.num_classes,
            "seed": self.config.seed,
        }
        if self.config.method in MEASURES:
            known["measure"] = MEASURES[self.config.method](self)
        parameters = inspect.signature(self.info.preset).parameters
        known["epochs"] = self.config.epochs
        # the dataset's own epochs, not the run's: a run resumed with another --epochs trains the same teachers
        pretrain = self.method_options.get("pretrain_epochs") or DATASET_DEFAULTS[self.config.dataset]["epochs"]
        if "teachers" in parameters:  # UMT: frozen encoders of a copy of the model, each trained alone
            trained = copy.deepcopy(self.model)
            if getattr(trained, "unimodal_heads", None) is None:
                trained.add_unimodal_heads(self.task.num_classes, self.config.seed + HEAD_SEED_OFFSET)
            train_unimodal(self, trained, pretrain)
            known["teachers"] = dict(trained.encoders.items())
        if "pretrained" in parameters:  # ReconBoost: the members start from unimodal models trained alone
            train_unimodal(self, self.model, pretrain)
            known["pretrained"] = True
        first = next(iter(parameters))
        keywords = {name: value for name, value in known.items() if name in parameters and name != first}
        return [known[first]], {**keywords, **self.preset_options}

    def loss(self, inputs: Mapping[str, Tensor], target: Tensor) -> Tensor:
        return self.method.loss(**provide(self.reads, self, inputs, target))

    def step(self, inputs: Mapping[str, Tensor], target: Tensor) -> Tensor:
        """One backward of the method's loss; with a ``clip_norm`` option (DGL's official loop) every gradient is
        clipped jointly to that norm before the optimizer step."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(inputs, target)
        loss.backward()
        clip = self.method_options.get("clip_norm")
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(self.parameters(), clip)
        self.optimizer.step()
        return loss.detach()

    def options(self) -> dict[str, Any]:
        extra = {} if self.held_out is None else {"held_out_items": len(self.held_out)}
        return {**super().options(), **extra}
