"""How each training method enters the CLI's epoch loop: one class per kind of loop.

`reference_models.train.train` owns what every run shares: data, model, optimizer, scheduler, evaluation,
checkpoints. A `MethodLoop` owns the rest: the part of the training split it trains on, what one training
step does, what happens before and after an epoch, what it records and what it saves. A gradmod method
enters through the loop of its kind, ``gradmod.METHODS[name].loop`` (`LOOPS`), so adding a method of an
existing kind to gradmod adds it to the CLI; the CLI's own methods (``baseline`` and the data-level mixups
``mm`` and ``bmm`` of Ma, Ding & Chen, 2025) are `OWN_LOOPS`.

What each kind needs from a reference model:

* ``"modulator"`` (OGM, OGM-GE, DGM, decoupling-free, PDMP): what the measure reads (`observe_inputs`).
* ``"responses"`` (AGM, Li et al., ICCV 2023): forward passes with modalities' *inputs* zeroed
  (`gradmod.agm.mono_responses` through ``model(inputs).logits``) and class-index targets.
* ``"backward"`` (MMPareto, Wei & Hu, ICML 2024) and ``"loss weights"`` (G-Blending, Wang, Tran & Feiszli,
  CVPR 2020): one linear head per modality on its encoder's features
  (`MultimodalModel.add_unimodal_heads`) and class-index targets.
* ``"turns"`` (MLA, Zhang et al., CVPR 2024): one linear head shared by every modality (``--fusion
  shared``, `reference_models.models.common.SharedHead`) and class-index targets.

Where a dataset or head cannot give what a method needs, the loop raises a ``ValueError`` that names
the method and what is missing.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, random_split
from tqdm import tqdm

import gradmod
from gradmod.mixup import BalancedMixup, MultimodalMixup, soft_cross_entropy
from reference_models.models.common import ModelOutput, SharedHead, mask_features
from reference_models.tasks import IndexedDataset, Task

if TYPE_CHECKING:
    from reference_models.train import TrainConfig

__all__ = [
    "LOOPS",
    "MODULATOR_METHODS",
    "OWN_LOOPS",
    "MethodLoop",
    "make_loop",
    "make_modulator",
    "make_optimizer",
    "observe_inputs",
    "preset_options",
    "unimodal_metrics",
]

#: The gradmod methods that return a `gradmod.Modulator` observed every step, by their `gradmod.METHODS` name.
MODULATOR_METHODS = tuple(name for name, info in gradmod.METHODS.items() if info.loop == "modulator")
#: Preset keyword → the `TrainConfig` field that sets it (the presets' hyper-parameters share these names).
PRESET_OPTIONS = {"alpha": "alpha", "gamma": "gamma", "gamma_p": "gamma_p", "gamma_r": "gamma_r"}
#: The CLI's value of a preset keyword that has no default in its preset (OGM, OGM-GE and decoupling-free
#: require ``alpha``, as the official OGM-GE script requires ``--alpha``).
CLI_DEFAULTS = {"alpha": 0.8}
PARAM_FILTERS = {"all": None, "weights": gradmod.filters.weights, "conv": gradmod.filters.conv_weights}
#: The `TrainConfig` fields of the params applier and of the modulation window, with their defaults: a method
#: that has neither refuses non-default values.
APPLIER_FIELDS = {"apply": "params", "backend": "auto", "param_filter": "all", "noise": "default"}
WINDOW_FIELDS = {"modulation_start": 0, "modulation_end": None}
#: Offsets of the seeds that initialise the unimodal heads and draw G-Blending's held-out split from the run's seed.
HEAD_SEED_OFFSET = 10_007
HOLDOUT_SEED_OFFSET = 20_011
#: G-Blending's fused head, beside one head per modality.
FUSED_HEAD = "fused"


# ---------------------------------------------------------------------------------------------- shared pieces
def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum or Adam over every parameter of ``model``, as the config says."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def preset_options(preset: Any, config: TrainConfig) -> dict[str, Any]:
    """The hyper-parameters of `PRESET_OPTIONS` that ``preset`` takes, as this run uses them: the config's
    value where it is set, else the preset's own default, else `CLI_DEFAULTS`."""
    parameters = inspect.signature(preset).parameters
    options = {}
    for name, field in PRESET_OPTIONS.items():
        if name not in parameters:
            continue
        value = getattr(config, field)
        if value is None:
            default = parameters[name].default
            value = CLI_DEFAULTS[name] if default is inspect.Parameter.empty else default
        options[name] = value
    return options


def _refuse(config: TrainConfig, fields: Mapping[str, Any], what: str) -> None:
    changed = [f"--{name.replace('_', '-')}" for name, default in fields.items() if getattr(config, name) != default]
    if changed:
        raise ValueError(f"{config.method} has no {what}: {', '.join(changed)} do not apply to it")


def _needs_class_targets(config: TrainConfig, task: Task, what: str) -> None:
    if task.kind not in ("classification", "segments"):
        raise ValueError(f"{config.method} {what}, which needs class-index targets: {task.name}'s are multi-hot")


def _measured(logits: Tensor) -> Tensor:
    """Logits ``[..., C]`` as rows ``[N, C]``, the rows of `MultimodalModel.measure_target`."""
    return logits.flatten(0, -2)


def make_modulator(config: TrainConfig, task: Task, steps_per_epoch: int, pdmp_ranking: Sequence[str] | None = None):
    """The gradmod modulator of ``config.method`` (a preset that returns a `gradmod.Modulator`) over the task
    model's modalities, or ``None`` for the other methods.

    The preset is ``gradmod.METHODS[config.method].preset``; its hyper-parameters come from `preset_options`,
    ``ranking`` from PDMP's unimodal stage, the params applier's options where the preset has that applier.
    """
    info = gradmod.METHODS.get(config.method)
    if info is None or info.loop not in ("modulator", "responses"):
        return None
    end = config.epochs - 1 if config.modulation_end is None else config.modulation_end
    start_step, stop_step = gradmod.epoch_window(config.modulation_start, end, steps_per_epoch)
    options: dict[str, Any] = {"start_step": start_step, "stop_step": stop_step, "seed": config.seed}
    parameters = inspect.signature(info.preset).parameters
    if "apply" in parameters:
        options.update(apply=config.apply, backend=config.backend, param_filter=PARAM_FILTERS[config.param_filter])
        if config.noise != "default":
            options["noise"] = config.noise
        elif config.apply == "features":
            options["noise"] = None
    else:
        _refuse(config, APPLIER_FIELDS, "params applier")
    options.update(preset_options(info.preset, config))
    if "ranking" in parameters:
        options["ranking"] = pdmp_ranking
    return info.preset(task.model.modality_modules(), **options)


def observe_inputs(modulator: gradmod.Modulator, task: Task, output: ModelOutput, target: Tensor) -> dict[str, Any]:
    """What the modulator's measure reads (``measure.inputs``), taken from a model output.

    A fusion gate for ``zeta``; a decision unit's pure unimodal scores for ``scores`` when the model has them
    (the MSDU of Fu, Gao & Xu), else decoupled per-modality logits for ``logits``. A clear error when the
    head cannot give what the measure reads.
    """
    reads = modulator.measure.inputs
    if "zeta" in reads:
        if output.zeta is None:
            raise ValueError("decoupling_free needs a gated head: --fusion gated, gated_simam or film_zeta")
        return {"zeta": output.zeta}
    if "scores" in reads and output.unimodal_scores is not None:
        return {"scores": output.unimodal_scores, "target": target}
    if output.unimodal_logits is None:
        raise ValueError(
            f"{modulator.measure!r} measures decoupled per-modality logits, which this head cannot give "
            "(FiLM and gated heads mix the modalities): use --fusion concat, sum or shared, or --method "
            "decoupling_free with a gated head"
        )
    return {"logits": output.unimodal_logits, "target": task.model.measure_target(target)}


def unimodal_metrics(task: Task, config: TrainConfig, device: torch.device) -> dict[str, float]:
    """PDMP stage 1: train each modality's branch alone (others zeroed) for ``pdmp_budget`` epochs from the
    same initialisation, and return its unimodal accuracy on a held-out 10% of the training split."""
    held = max(1, len(task.train_set) // 10)
    fit, held_out = random_split(task.train_set, [len(task.train_set) - held, held], torch.Generator().manual_seed(config.seed))
    initial = copy.deepcopy(task.model.state_dict())
    results = {}
    for name in task.modalities:
        task.model.load_state_dict(initial)
        optimizer = make_optimizer(config, task.model)
        loader = DataLoader(fit, config.batch_size, shuffle=True, generator=torch.Generator().manual_seed(config.seed))
        for _ in range(config.pdmp_budget):
            for inputs, target in tqdm(loader, desc=f"PDMP unimodal {name}", leave=False, disable=None if config.progress else True):
                optimizer.zero_grad(set_to_none=True)
                inputs = {n: x.to(device) for n, x in inputs.items()}
                task.unimodal_loss(inputs, target.to(device), keep=name).backward()
                optimizer.step()
        evaluation = task.evaluate(DataLoader(IndexedDataset(held_out), config.batch_size), device)
        results[name] = evaluation["unimodal"][name]
    task.model.load_state_dict(initial)
    return results


# ---------------------------------------------------------------------------------------------- loops
class MethodLoop:
    """One training method inside the epoch loop of `reference_models.train.train`.

    The run calls `attach` once with its optimizer, then per epoch `start_epoch`, `step` for every batch
    of `train_set` and `end_epoch`, whose entries join the epoch's record. `state_dict` is saved with every
    checkpoint and restored by ``--resume``, so a resumed run continues exactly.
    """

    #: The loop kind (``gradmod.METHODS[name].loop``, or ``"plain"`` for the CLI's own methods).
    kind: ClassVar[str] = "plain"

    def __init__(self, config: TrainConfig, task: Task, device: torch.device) -> None:
        self.config, self.task, self.device = config, task, device
        self.model = task.model
        #: The examples the method trains on (G-Blending holds some out).
        self.train_set: Dataset = self._training_split()
        self.steps_per_epoch = math.ceil(len(self.train_set) / config.batch_size)
        self.optimizer: torch.optim.Optimizer | None = None
        #: PDMP's unimodal stage: ``{"metrics", "ranking"}`` (``None`` for every other method).
        self.pdmp: dict[str, Any] | None = None

    def _training_split(self) -> Dataset:
        return self.task.train_set

    def options(self) -> dict[str, Any]:
        """The method's hyper-parameters as this run uses them (recorded in ``results.json``)."""
        return {}

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def start_epoch(self, epoch: int) -> None:
        """Called before the epoch's first step (model in training mode)."""

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
        """Entries for the epoch's record, after its last step: ``coefficients`` and the method's own."""
        return {"coefficients": {}}

    def coefficients_per_step(self) -> list[dict[str, Any]]:
        """The modulator's history (one record per step), or ``[]``."""
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict` (nothing to restore here)."""

    def _add_unimodal_heads(self, what: str) -> nn.ModuleDict:
        if self.model.feature_widths() is None:
            raise ValueError(
                f"{self.config.method} {what}: one linear head per modality on its encoder's features, which the "
                f"{self.task.name} model does not have (its head does not read one feature vector per modality)"
            )
        return self.model.add_unimodal_heads(self.task.num_classes, self.config.seed + HEAD_SEED_OFFSET)

    def _unimodal_losses(self, features: Mapping[str, Tensor], target: Tensor) -> dict[str, Tensor]:
        """Cross-entropy of each unimodal head on its modality's features."""
        measured = self.model.measure_target(target)
        logits = self.model.unimodal_head_logits(features)
        return {name: F.cross_entropy(_measured(z), measured) for name, z in logits.items()}


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


class _MixupLoop(MethodLoop):
    """The mixups build soft targets for single-label classification."""

    def __init__(self, config: TrainConfig, task: Task, device: torch.device) -> None:
        super().__init__(config, task, device)
        if task.kind != "classification":
            raise ValueError(f"{config.method} is defined for single-label classification (avdigits, cremad), not {task.name}")


class MixupLoop(_MixupLoop):
    """``mm``: MM (Ma, Ding & Chen, 2025, eq. (3)) mixes the fused representation — every modality's features
    with one λ and π — and trains on the soft targets."""

    def __init__(self, config: TrainConfig, task: Task, device: torch.device) -> None:
        super().__init__(config, task, device)
        self.mixer = MultimodalMixup(config.mixup_alpha, generator=torch.Generator().manual_seed(config.seed))

    def options(self) -> dict[str, Any]:
        return {"mixup_alpha": self.config.mixup_alpha}

    def loss(self, inputs: Mapping[str, Tensor], target: Tensor) -> Tensor:
        features = self.model.encode(inputs)
        names = list(features)
        widths = [features[n].shape[-1] for n in names]
        mixed, soft = self.mixer(torch.cat([features[n] for n in names], -1), target, self.task.num_classes)
        return soft_cross_entropy(self.model.head(dict(zip(names, mixed.split(widths, -1)))).logits, soft)

    def state_dict(self) -> dict[str, Any]:
        return {"mixup": self.mixer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.mixer.load_state_dict(state["mixup"])


class BalancedMixupLoop(_MixupLoop):
    """``bmm``: B-MM (Ma, Ding & Chen, 2025, eqs. (5)–(8)) mixes the weak modality's inputs.

    After every epoch each modality's unimodal accuracy on the whole training split is measured in eval
    mode — from the head's decoupled per-modality logits where it has them (concat, sum, shared), else
    with the other modalities' features zeroed — and `BalancedMixup` smooths it over epochs
    (``--bmm-smoothing``) before it sets κ: the stable estimate of `gradmod.mixup.smoothed_accuracy`.
    """

    def __init__(self, config: TrainConfig, task: Task, device: torch.device) -> None:
        super().__init__(config, task, device)
        self.mixer = BalancedMixup(
            task.modalities, task.num_classes, config.bmm_degree, config.bmm_warmup, seed=config.seed,
            smoothing=config.bmm_smoothing,
        )

    def options(self) -> dict[str, Any]:
        return {"bmm_degree": self.config.bmm_degree, "bmm_warmup": self.config.bmm_warmup, "bmm_smoothing": self.config.bmm_smoothing}

    def loss(self, inputs: Mapping[str, Tensor], target: Tensor) -> Tensor:
        mixed, soft = self.mixer(inputs, target)
        return soft_cross_entropy(self.model(mixed).logits, soft)

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        loader = DataLoader(IndexedDataset(self.train_set), batch_size=self.config.batch_size, num_workers=self.config.workers)
        evaluation = self.task.evaluate(loader, self.device)
        measured = evaluation.get("unimodal_decoupled", evaluation["unimodal"])
        self.mixer.update(measured)
        return {
            "coefficients": {},
            "bmm": {
                "train_unimodal": measured,
                "smoothed": self.mixer.accuracy,
                "kappa": self.mixer.kappa,
                "weak": list(self.mixer.weak_modalities),
                "strength": self.mixer.strength,
            },
        }

    def state_dict(self) -> dict[str, Any]:
        return {"mixup": self.mixer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.mixer.load_state_dict(state["mixup"])


class ModulatorLoop(MethodLoop):
    """``gradmod.METHODS[name].loop == "modulator"``: ``observe()`` what the measure reads every step; the
    modulator scales the gradients in the optimizer's step pre-hook (or during backward with ``--apply
    features``). PDMP first ranks the modalities by training each alone (`unimodal_metrics`)."""

    kind = "modulator"

    def __init__(self, config: TrainConfig, task: Task, device: torch.device) -> None:
        super().__init__(config, task, device)
        ranking = None
        if "ranking" in inspect.signature(gradmod.METHODS[config.method].preset).parameters:
            metrics = config.pdmp_metrics or unimodal_metrics(task, config, device)
            ranking = gradmod.rank_modalities(metrics)
            self.pdmp = {"metrics": metrics, "ranking": list(ranking)}
        self.modulator = make_modulator(config, task, self.steps_per_epoch, ranking)

    def options(self) -> dict[str, Any]:
        return preset_options(gradmod.METHODS[self.config.method].preset, self.config)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        super().attach(optimizer)
        self.modulator.attach(optimizer)

    def loss(self, inputs: Mapping[str, Tensor], target: Tensor) -> Tensor:
        output = self.model(inputs)
        extra = {"features": output.features} if self.config.apply == "features" else {}
        self.modulator.observe(**observe_inputs(self.modulator, self.task, output, target), **extra)
        return self.model.loss(output, target)

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        first = epoch * self.steps_per_epoch
        records = [r for r in self.modulator.history if r["step"] >= first]
        if not records:
            return {"coefficients": {}}
        names = records[0]["coefficients"]
        return {"coefficients": {n: sum(r["coefficients"][n] for r in records) / len(records) for n in names}}

    def coefficients_per_step(self) -> list[dict[str, Any]]:
        return self.modulator.history

    def state_dict(self) -> dict[str, Any]:
        return {"modulator": self.modulator.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.modulator.load_state_dict(state["modulator"])


class ResponsesLoop(ModulatorLoop):
    """``"responses"`` (AGM, Li et al., *Boosting Multi-modal Model Performance with Adaptive Gradient
    Modulation*, ICCV 2023): every step runs the model on every coalition of modalities, the absent ones'
    inputs zeroed (`gradmod.agm.mono_responses`: 4 forward passes for two modalities), observes the
    mono-modal responses and computes the loss from ``mod.combine(responses)``. With ``--agm-clip c`` it
    clips every gradient to norm ``c`` when the fused head's weight gradient leaves ``[−c, c]``, as the
    official training loop does (`gradmod.agm.official_clip_`, ``c = 1`` for CREMA-D)."""

    kind = "responses"

    def __init__(self, config: TrainConfig, task: Task, device: torch.device) -> None:
        _needs_class_targets(config, task, "scores mono-modal responses against class labels")
        super().__init__(config, task, device)
        fusion = getattr(self.model, "fusion", None)
        self.head_weights = [] if fusion is None else [
            module.weight for module in fusion.modules() if isinstance(module, nn.Linear) and module.out_features == task.num_classes
        ]
        if config.agm_clip is not None and not self.head_weights:
            raise ValueError(f"--agm-clip reads the gradient of the fused head's weight, which the {task.name} model does not have")

    def options(self) -> dict[str, Any]:
        return {**super().options(), "agm_clip": self.config.agm_clip}

    def _logits(self, inputs: Mapping[str, Tensor]) -> Tensor:
        return _measured(self.model(inputs).logits)

    def step(self, inputs: Mapping[str, Tensor], target: Tensor) -> Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        measured = self.model.measure_target(target)
        responses = gradmod.agm.mono_responses(self.model, inputs, forward=self._logits)
        self.modulator.observe(responses=responses, target=measured)
        loss = F.cross_entropy(self.modulator.combine(responses), measured)
        loss.backward()
        if self.config.agm_clip is not None:
            for weight in self.head_weights:
                if gradmod.agm.official_clip_(self.model.parameters(), weight, self.config.agm_clip):
                    break
        self.optimizer.step()
        return loss.detach()


class BackwardLoop(MethodLoop):
    """``"backward"`` (MMPareto, Wei & Hu, *MMPareto: Boosting Multimodal Learning with Innocent Unimodal
    Assistance*, ICML 2024): a linear head per modality adds its cross-entropy to the fused one, and
    ``mod.backward(loss_fused, unimodal_losses)`` replaces ``loss.backward()``."""

    kind = "backward"

    def __init__(self, config: TrainConfig, task: Task, device: torch.device) -> None:
        _refuse(config, {**APPLIER_FIELDS, **WINDOW_FIELDS}, "modulation window or params applier")
        _needs_class_targets(config, task, "trains unimodal heads")
        super().__init__(config, task, device)
        self._add_unimodal_heads("trains unimodal heads")
        info = gradmod.METHODS[config.method]
        self.mod = info.preset(self.model.modality_modules(), rule=config.mmpareto_rule, **preset_options(info.preset, config))
        self._epoch_start = 0

    def options(self) -> dict[str, Any]:
        return {"gamma": self.mod.gamma, "mmpareto_rule": self.mod.rule}

    def start_epoch(self, epoch: int) -> None:
        self._epoch_start = self.mod.step_count

    def step(self, inputs: Mapping[str, Tensor], target: Tensor) -> Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        features = self.model.encode(inputs)
        fused = self.model.loss(self.model.head(features), target)
        unimodal = self._unimodal_losses(features, target)
        self.mod.backward(fused, unimodal)
        self.optimizer.step()
        return (fused + sum(unimodal.values())).detach()

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        records = [r for r in self.mod.history if r["step"] >= self._epoch_start]
        summary = {
            key: {name: sum(r[key][name] for r in records) / len(records) for name in self.mod.names}
            for key in ("cosine", "unimodal_weight", "scale")
        } if records else {}
        return {"coefficients": {}, "mmpareto": summary}

    def state_dict(self) -> dict[str, Any]:
        return {"mmpareto": self.mod.state_dict(), "epoch_start": self._epoch_start}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.mod.load_state_dict(state["mmpareto"])
        self._epoch_start = state["epoch_start"]


class TurnsLoop(MethodLoop):
    """``"turns"`` (MLA, Zhang et al., *Multimodal Representation Learning by Alternating Unimodal
    Adaptation*, CVPR 2024): per batch, one optimizer step per modality, in turn, each on that modality's
    features through the shared head (``--fusion shared``), whose weight gradient `gradmod.MLA` projects.
    Evaluation uses the head's entropy-weighted fusion, MLA's test-time fusion."""

    kind = "turns"

    def __init__(self, config: TrainConfig, task: Task, device: torch.device) -> None:
        _refuse(config, {**APPLIER_FIELDS, **WINDOW_FIELDS}, "modulation window or params applier")
        _needs_class_targets(config, task, "trains every modality through one classification head")
        super().__init__(config, task, device)
        if not isinstance(getattr(self.model, "fusion", None), SharedHead):
            raise ValueError(
                f"{config.method} trains every modality through one shared head: use --fusion shared (one linear "
                f"head, one feature width for all encoders); the {task.name} model with --fusion {config.fusion} has none"
            )
        info = gradmod.METHODS[config.method]
        projection = None if config.mla_projection == "none" else config.mla_projection
        self.head = self.model.fusion.linear
        self.mla = info.preset(
            self.model.modality_modules(), self.head, projection=projection, **preset_options(info.preset, config)
        )
        self._kept: dict[str, list[float]] = {}

    def options(self) -> dict[str, Any]:
        return {"alpha": self.mla.alpha, "mla_projection": self.config.mla_projection}

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        super().attach(optimizer)
        self.mla.attach(optimizer)

    def start_epoch(self, epoch: int) -> None:
        self._kept = {name: [] for name in self.mla.names}

    def step(self, inputs: Mapping[str, Tensor], target: Tensor) -> Tensor:
        features = self.model.encode(inputs)
        measured = self.model.measure_target(target)
        total = torch.zeros(())
        for name in self.mla.names:
            self.optimizer.zero_grad(set_to_none=True)
            rows = features[name].flatten(0, -2)
            self.mla.observe(name, rows)
            loss = F.cross_entropy(self.head(rows), measured)
            loss.backward()
            self.optimizer.step()
            total = total + loss.detach().cpu()
            kept = self.mla.last["kept"]
            if kept is not None:
                self._kept[name].append(kept)
        return total / len(self.mla.names)

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        kept = {name: sum(values) / len(values) for name, values in self._kept.items() if values}
        return {"coefficients": {}, "mla": {"kept": kept}}

    def state_dict(self) -> dict[str, Any]:
        return {"mla": self.mla.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.mla.load_state_dict(state["mla"])


class LossWeightsLoop(MethodLoop):
    """``"loss weights"`` (G-Blending, Wang, Tran & Feiszli, *What Makes Training Multi-modal Classification
    Networks Hard?*, CVPR 2020): the fused head and a linear head per modality are trained on ``Σ_k w_k L_k``.

    ``--gblending-holdout`` (default 8 %, as MultiBench) of the training split is held out and never
    trained on. At the start of every super-epoch (``--gblending-super-epoch`` epochs) the heads' mean
    losses on the rest of the training split and on the held-out part are measured
    (`gradmod.gblending.checkpoint`), and the weights re-estimated from the last two measurements: on the
    trajectory, one evaluation pass per super-epoch. The first super-epoch trains with equal weights.
    """

    kind = "loss weights"

    def __init__(self, config: TrainConfig, task: Task, device: torch.device) -> None:
        _refuse(config, {**APPLIER_FIELDS, **WINDOW_FIELDS}, "modulation window or params applier")
        _needs_class_targets(config, task, "trains unimodal heads")
        if FUSED_HEAD in task.modalities:
            raise ValueError(f"{config.method} names its fused head {FUSED_HEAD!r}, which is also a modality of {task.name}")
        super().__init__(config, task, device)
        self._add_unimodal_heads("trains unimodal heads")
        self.gb = gradmod.METHODS[config.method].preset((FUSED_HEAD, *task.modalities))

    def _training_split(self) -> Dataset:
        data = self.task.train_set
        held = max(1, round(self.config.gblending_holdout * len(data)))
        if held >= len(data):
            raise ValueError(f"{self.config.method}: a held-out split of {held} leaves nothing of {len(data)} training items to train on")
        generator = torch.Generator().manual_seed(self.config.seed + HOLDOUT_SEED_OFFSET)
        fit, self.held_out = random_split(data, [len(data) - held, held], generator)
        return fit

    def options(self) -> dict[str, Any]:
        return {
            "gblending_super_epoch": self.config.gblending_super_epoch,
            "gblending_holdout": self.config.gblending_holdout,
            "held_out_items": len(self.held_out),
        }

    def _heads(self, model: nn.Module, batch: Any) -> tuple[dict[str, Tensor], Tensor]:
        inputs, target = batch
        inputs, target = {n: x.to(self.device) for n, x in inputs.items()}, target.to(self.device)
        features = model.encode(inputs)
        logits = {FUSED_HEAD: _measured(model.head(features).logits)}
        logits.update({name: _measured(z) for name, z in model.unimodal_head_logits(features).items()})
        return logits, model.measure_target(target)

    def start_epoch(self, epoch: int) -> None:
        if epoch % self.config.gblending_super_epoch == 0:
            size = {"batch_size": self.config.batch_size, "num_workers": self.config.workers}
            measured = gradmod.gblending.checkpoint(
                self.model, self._heads, train=DataLoader(self.train_set, **size), held_out=DataLoader(self.held_out, **size)
            )
            self.gb.record(measured)

    def loss(self, inputs: Mapping[str, Tensor], target: Tensor) -> Tensor:
        features = self.model.encode(inputs)
        losses = {FUSED_HEAD: self.model.loss(self.model.head(features), target), **self._unimodal_losses(features, target)}
        return self.gb.loss(losses)

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        return {"coefficients": {}, "gblending": {"weights": self.gb.weights}}

    def state_dict(self) -> dict[str, Any]:
        return {"gblending": self.gb.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.gb.load_state_dict(state["gblending"])


#: The loop of each kind of gradmod method (`gradmod.methods.MethodInfo.loop`).
LOOPS: dict[str, type[MethodLoop]] = {
    loop.kind: loop for loop in (ModulatorLoop, ResponsesLoop, BackwardLoop, TurnsLoop, LossWeightsLoop)
}
#: The CLI's own methods: no modulation, and the data-level mixups of Ma, Ding & Chen (2025).
OWN_LOOPS: dict[str, type[MethodLoop]] = {"baseline": PlainLoop, "mm": MixupLoop, "bmm": BalancedMixupLoop}


def make_loop(config: TrainConfig, task: Task, device: torch.device) -> MethodLoop:
    """The loop of ``config.method``: `LOOPS` by its gradmod loop kind, or `OWN_LOOPS`."""
    info = gradmod.METHODS.get(config.method)
    if info is None:
        return OWN_LOOPS[config.method](config, task, device)
    if info.loop not in LOOPS:
        raise ValueError(f"gradmod method {config.method!r} enters a loop of kind {info.loop!r}, which the CLI does not drive")
    return LOOPS[info.loop](config, task, device)
