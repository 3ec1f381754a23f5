"""What every method's loop shares: the `MethodLoop` protocol, the optimizer, and the named inputs a step gives.

`reference_models.train.train` owns what every run shares: data, model, optimizer, scheduler, evaluation,
checkpoints. A `MethodLoop` owns the rest: the part of the training split it trains on, what one training step
does, what happens before and after an epoch, what it records and what it saves. There is one loop per kind of
method (`gradmod.method.KINDS`); a method enters through the loop of its kind, so adding a method of an existing
kind to gradmod adds it to the CLI.

`provide` computes the step inputs a method reads, by their names in `gradmod.method.INPUTS`, from a reference
model (`reference_models.models.common.MultimodalModel`): features, fused and decoupled logits, the head, the
unimodal heads' logits and losses, the raw inputs, ζ and decision scores. Where a model cannot give one, the error
names the method and what is missing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, random_split

import gradmod
from reference_models.config import TrainConfig, method_options, preset_keywords
from reference_models.tasks import Task

__all__ = ["FUSED_HEAD", "HEAD_SEED_OFFSET", "MethodLoop", "make_optimizer", "provide", "rows"]

#: Offsets of the seeds that initialise the unimodal heads and draw a held-out split from the run's seed.
HEAD_SEED_OFFSET = 10_007
HOLDOUT_SEED_OFFSET = 20_011
#: The name of the fused head beside one head per modality (G-Blending's heads, the ``losses`` input).
FUSED_HEAD = "fused"


def make_optimizer(config: TrainConfig, parameters: Any) -> torch.optim.Optimizer:
    """SGD with momentum or Adam over ``parameters``, as the config says."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)


def rows(logits: Tensor) -> Tensor:
    """Logits ``[..., C]`` as rows ``[N, C]``, the rows of `MultimodalModel.measure_target`."""
    return logits.flatten(0, -2)


class _HeadLogits(nn.Module):
    """A reference model's fusion head as the ``head`` input: ``{modality: features} -> fused logits``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        return self.model.head(dict(features)).logits


def provide(names: Sequence[str], loop: MethodLoop, inputs: Mapping[str, Tensor], target: Tensor) -> dict[str, Any]:
    """The step inputs ``names`` (`gradmod.method.INPUTS`) of one batch, each computed once."""
    unknown = [name for name in names if name not in gradmod.method.INPUTS]
    if unknown:
        raise ValueError(f"{loop.config.method} reads the inputs {unknown}, which no loop gives (gradmod.method.INPUTS)")
    return provide_from_features(names, loop, loop.model.encode(inputs), target, inputs)


def provide_from_features(
    names: Sequence[str],
    loop: MethodLoop,
    features: Mapping[str, Tensor],
    target: Tensor | None = None,
    inputs: Mapping[str, Tensor] | None = None,
) -> dict[str, Any]:
    """`provide` from encoded ``features`` (at test time: no target, no raw inputs)."""
    model, task = loop.model, loop.task
    output = None
    given: dict[str, Any] = {}
    for name in names:
        if name in ("logits", "unimodal_logits", "zeta", "scores"):
            output = model.head(features) if output is None else output
        if name == "target":
            given[name] = model.measure_target(target)
        elif name == "features":
            given[name] = features
        elif name == "inputs":
            given[name] = dict(inputs)
        elif name == "head":
            given[name] = loop.head_module
        elif name == "logits":
            given[name] = rows(output.logits)
        elif name == "unimodal_logits":
            if output.unimodal_logits is None:
                raise ValueError(
                    f"{loop.config.method} reads decoupled per-modality logits, which the {task.name} model with "
                    f"--fusion {loop.config.fusion} cannot give (FiLM and gated heads mix the modalities): use --fusion "
                    "concat, sum or shared"
                )
            given[name] = output.unimodal_logits
        elif name in ("unimodal_head_logits", "losses"):
            logits = {m: rows(z) for m, z in loop.unimodal_heads_logits(features).items()}
            if name == "unimodal_head_logits":
                given[name] = logits
            else:
                measured = model.measure_target(target)
                fused = F.cross_entropy(rows((output or model.head(features)).logits), measured)
                given[name] = {FUSED_HEAD: fused, **{m: F.cross_entropy(z, measured) for m, z in logits.items()}}
        elif name == "zeta":
            if output.zeta is None:
                raise ValueError(f"{loop.config.method} reads the fusion gate ζ: use --fusion gated, gated_simam or film_zeta")
            given[name] = output.zeta
        elif name == "scores":
            given[name] = output.unimodal_scores
    return given


class MethodLoop:
    """One training method inside the epoch loop of `reference_models.train.train`.

    The run calls `attach` once with its optimizer, then per epoch `start_epoch`, `step` for every batch of
    `train_set` and `end_epoch`, whose entries join the epoch's record. `state_dict` is saved with every
    checkpoint and restored by ``--resume``, so a resumed run continues exactly.
    """

    #: The kind of method this loop drives (`gradmod.method.KINDS`), or ``"plain"`` for the CLI's own methods.
    kind: ClassVar[str] = "plain"

    def __init__(self, config: TrainConfig, task: Task, device: torch.device) -> None:
        self.config, self.task, self.device = config, task, device
        self.model = task.model
        self.info = config.info
        #: The method's strength and options as this run uses them (`reference_models.config.method_options`).
        self.method_options = method_options(config)
        #: The examples the method trains on (G-Blending holds some out).
        self.train_set: Dataset = self._training_split()
        self.steps_per_epoch = math.ceil(len(self.train_set) / config.batch_size)
        self.optimizer: torch.optim.Optimizer | None = None
        #: The gradmod method this loop drives (``None`` for the CLI's own methods).
        self.method: gradmod.Method | None = None
        #: PDMP's unimodal stage: ``{"metrics", "ranking"}`` (``None`` for every other method).
        self.pdmp: dict[str, Any] | None = None

    @property
    def preset_options(self) -> dict[str, Any]:
        """The method's options that are keywords of its preset (an option's choice ``"none"`` is ``None``)."""
        if self.info is None:
            return {}
        nullable = {o.keyword for o in self.info.options if o.choices is not None and "none" in o.choices}
        options = preset_keywords(self.method_options, self.info)
        return {k: None if k in nullable and v == "none" else v for k, v in options.items()}

    @property
    def head_module(self) -> nn.Module:
        """The model's fusion head as the ``head`` input (`provide`)."""
        return _HeadLogits(self.model)

    def _training_split(self) -> Dataset:
        """The training split, less a held-out part where the method has a ``holdout`` loop option (G-Blending's
        estimates, Diagnosing & Re-learning's diagnosis): ``self.held_out``, never the test split."""
        self.held_out: Dataset | None = None
        data = self.task.train_set
        fraction = self.method_options.get("holdout")
        if fraction is None:
            return data
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"--{self.config.method}-holdout must lie in (0, 1), got {fraction}")
        held = max(1, round(fraction * len(data)))
        if held >= len(data):
            raise ValueError(f"{self.config.method}: a held-out split of {held} leaves nothing of {len(data)} training items to train on")
        generator = torch.Generator().manual_seed(self.config.seed + HOLDOUT_SEED_OFFSET)
        fit, self.held_out = random_split(data, [len(data) - held, held], generator)
        return fit

    @property
    def epoch_data(self) -> Dataset:
        """What the coming epoch trains on (after `start_epoch`): the training split, or the method's own data."""
        return self.train_set

    def encoded(self, model: nn.Module, batch: Any) -> tuple[dict[str, Tensor], Tensor]:
        """The ``forward(model, batch) -> ({modality: features}, target)`` of the methods' per-epoch passes."""
        inputs, target = batch
        inputs = {n: x.to(self.device) for n, x in inputs.items()}
        return model.encode(inputs), model.measure_target(target.to(self.device))

    def loader(self, dataset: Dataset) -> DataLoader:
        """An unshuffled loader over ``dataset`` with the run's batch size (the methods' per-epoch passes)."""
        return DataLoader(dataset, batch_size=self.config.batch_size, num_workers=self.config.workers)

    @property
    def predictor(self) -> Any:
        """The method's test-time prediction from features (``None``: the model's fused head)."""
        if self.method is None or not hasattr(self.method, "predict_inputs"):
            return None

        def predict(features: Mapping[str, Tensor]) -> Tensor:
            given = provide_from_features(self.method.predict_inputs, self, features)
            return self.method.predict(**given)

        return predict

    def options(self) -> dict[str, Any]:
        """The method's hyper-parameters as this run uses them (recorded in ``results.json``)."""
        return dict(self.method_options)

    def parameters(self) -> list[Tensor]:
        """Everything the optimizer steps: the model's parameters and the method's own (``method.extra``)."""
        extra = [] if self.method is None or self.method.extra is None else list(self.method.extra.parameters())
        return [*self.model.parameters(), *extra]

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def start_epoch(self, epoch: int) -> None:
        """Called before the epoch's first step (model in training mode): the method's ``start_epoch``."""
        if self.method is not None:
            self._recorded = len(self.method.history)
            self.method.start_epoch(epoch)

    def step(self, inputs: Mapping[str, Tensor], target: Tensor) -> Tensor:
        """One training step on a batch; returns its (detached) training loss."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(inputs, target)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def loss(self, inputs: Mapping[str, Tensor], target: Tensor) -> Tensor:
        """The training loss of a batch (loops whose `step` is one ``backward()``)."""
        return self.model.loss(self.model(inputs), target)

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        """Entries for the epoch's record, after its last step and the method's ``end_epoch``: under the method's
        key, the mean of each of its history's fields per unit over the epoch's records (values that are not
        finite, such as MLA's ``kept`` of the modality a turn did not train, left out), and ``coefficients``, a
        modulator's mean coefficients (empty for the other methods)."""
        if self.method is None:
            return {"coefficients": {}}
        self.method.end_epoch(epoch)
        records = self.method.history[getattr(self, "_recorded", 0):]
        fields = [key for key, value in records[0].items() if isinstance(value, Mapping)] if records else []
        summary = {}
        for key in fields:
            values = {unit: [r[key][unit] for r in records if math.isfinite(r[key][unit])] for unit in records[0][key]}
            summary[key] = {unit: sum(v) / len(v) for unit, v in values.items() if v}
        return {"coefficients": summary.get("coefficients", {}), self.config.method: summary}

    def coefficients_per_step(self) -> list[dict[str, Any]]:
        """The modulator's history (one record per step), or ``[]``."""
        return []

    def state_dict(self) -> dict[str, Any]:
        return {} if self.method is None else {"method": self.method.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict`."""
        if self.method is not None:
            self.method.load_state_dict(state["method"])

    # ------------------------------------------------------------------ shared by the kinds
    def needs_class_targets(self, what: str) -> None:
        if self.task.kind not in ("classification", "segments"):
            raise ValueError(f"{self.config.method} {what}, which needs class-index targets: {self.task.name}'s are multi-hot")

    def refuse(self, fields: Mapping[str, Any], what: str) -> None:
        """Refuse the config fields of ``fields`` (name → default) that were changed: the method has no ``what``."""
        changed = [f"--{name.replace('_', '-')}" for name, default in fields.items() if getattr(self.config, name) != default]
        if changed:
            raise ValueError(f"{self.config.method} has no {what}: {', '.join(changed)} do not apply to it")

    def add_unimodal_heads(self, what: str) -> nn.ModuleDict:
        if self.model.feature_widths() is None:
            raise ValueError(
                f"{self.config.method} {what}: one linear head per modality on its encoder's features, which the "
                f"{self.task.name} model does not have (its head does not read one feature vector per modality)"
            )
        return self.model.add_unimodal_heads(self.task.num_classes, self.config.seed + HEAD_SEED_OFFSET)

    def unimodal_heads_logits(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each unimodal head on its modality's features (the loop added the heads when it was built)."""
        return self.model.unimodal_head_logits(features)

    def unimodal_losses(self, features: Mapping[str, Tensor], target: Tensor) -> dict[str, Tensor]:
        """Cross-entropy of each unimodal head on its modality's features."""
        measured = self.model.measure_target(target)
        return {name: F.cross_entropy(rows(z), measured) for name, z in self.unimodal_heads_logits(features).items()}


#: The config fields of the params applier and of the modulation window, with their defaults: a loop whose
#: method has neither refuses non-default values.
APPLIER_FIELDS = {"apply": "params", "backend": "auto", "param_filter": "all", "noise": "default"}
WINDOW_FIELDS = {"modulation_start": 0, "modulation_end": None}
