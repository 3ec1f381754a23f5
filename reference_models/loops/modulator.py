"""The loops of modulators (``modulator``: OGM, OGM-GE, DGM, decoupling-free, PDMP, …) and of AGM's ``responses``.

A modulator observes what its measure reads each step (`observe_inputs`) and scales the gradients in the
optimizer's step pre-hook (or during backward with ``--apply features``). PDMP first ranks the modalities by
training each alone (`unimodal_metrics`). AGM runs the model on every coalition of modalities, the absent ones'
inputs zeroed (`gradmod.methods.agm.mono_responses`), and computes the loss from ``mod.combine(responses)``.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, random_split
from tqdm import tqdm

import gradmod
from reference_models.config import TrainConfig
from reference_models.loops.base import (
    MethodLoop,
    make_optimizer,
    provide_from_features,
    rows,
)
from reference_models.models.common import ModelOutput
from reference_models.tasks import IndexedDataset, Task

__all__ = ["PARAM_FILTERS", "ModulatorLoop", "ResponsesLoop", "make_modulator", "observe_inputs", "unimodal_metrics"]

PARAM_FILTERS = {"all": None, "weights": gradmod.filters.weights, "conv": gradmod.filters.conv_weights}


def make_modulator(loop: MethodLoop, ranking: Sequence[str] | None = None) -> gradmod.Modulator:
    """The modulator of the loop's method over the task model's modalities: its preset with the run's strength
    and options, the modulation window, the seed, the params applier's options where the preset has them."""
    config, info = loop.config, loop.info
    parameters = inspect.signature(info.preset).parameters
    takes_options = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())  # Modulator's window
    options: dict[str, Any] = dict(loop.preset_options)
    if takes_options:
        end = config.epochs - 1 if config.modulation_end is None else config.modulation_end
        start_step, stop_step = gradmod.epoch_window(config.modulation_start, end, loop.steps_per_epoch)
        options.update(start_step=start_step, stop_step=stop_step, seed=config.seed)
    else:  # a modulator with a window of its own (InfoReg's Fisher window)
        loop.refuse({"modulation_start": 0, "modulation_end": None}, "modulation window")
    if "apply" in parameters:
        options.update(apply=config.apply, backend=config.backend, param_filter=PARAM_FILTERS[config.param_filter])
        if config.noise != "default":
            options["noise"] = config.noise
        elif config.apply == "features":
            options["noise"] = None
    else:
        loop.refuse({"apply": "params", "backend": "auto", "param_filter": "all", "noise": "default"}, "params applier")
    if "ranking" in parameters:
        options["ranking"] = ranking
    return info.preset(loop.task.model.modality_modules(), **options)


def observe_inputs(modulator: gradmod.Modulator, task: Task, output: ModelOutput, target: Tensor) -> dict[str, Any]:
    """What the modulator's measure reads (``measure.inputs``), taken from a model output.

    A fusion gate for ``zeta``; a decision unit's pure unimodal scores for ``scores`` when the model has them
    (the MSDU of Fu, Gao & Xu), else decoupled per-modality logits for ``logits``. A clear error when the head
    cannot give what the measure reads.
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


def unimodal_metrics(task: Task, config: TrainConfig, device: torch.device, budget: int) -> dict[str, float]:
    """PDMP stage 1: train each modality's branch alone (others zeroed) for ``budget`` epochs from the same
    initialisation, and return its unimodal accuracy on a held-out 10% of the training split."""
    held = max(1, len(task.train_set) // 10)
    fit, held_out = random_split(task.train_set, [len(task.train_set) - held, held], torch.Generator().manual_seed(config.seed))
    initial = copy.deepcopy(task.model.state_dict())
    results = {}
    for name in task.modalities:
        task.model.load_state_dict(initial)
        optimizer = make_optimizer(config, task.model.parameters())
        loader = DataLoader(fit, config.batch_size, shuffle=True, generator=torch.Generator().manual_seed(config.seed))
        for _ in range(budget):
            for inputs, target in tqdm(loader, desc=f"PDMP unimodal {name}", leave=False, disable=None if config.progress else True):
                optimizer.zero_grad(set_to_none=True)
                inputs = {n: x.to(device) for n, x in inputs.items()}
                task.unimodal_loss(inputs, target.to(device), keep=name).backward()
                optimizer.step()
        evaluation = task.evaluate(DataLoader(IndexedDataset(held_out), config.batch_size), device)
        results[name] = evaluation["unimodal"][name]
    task.model.load_state_dict(initial)
    return results


class ModulatorLoop(MethodLoop):
    """Kind ``"modulator"``: ``observe()`` what the measure reads every step; the modulator scales the gradients in
    the optimizer's step pre-hook (or during backward with ``--apply features``). A preset that takes a ``ranking``
    (PDMP) first ranks the modalities by training each alone (`unimodal_metrics`), unless ``--pdmp-metrics`` gives
    the metrics."""

    kind = "modulator"

    def __init__(self, config: TrainConfig, task: Task, device: torch.device) -> None:
        super().__init__(config, task, device)
        ranking = None
        if "ranking" in inspect.signature(self.info.preset).parameters:
            metrics = self.method_options["metrics"] or unimodal_metrics(task, config, device, self.method_options["budget"])
            ranking = gradmod.rank_modalities(metrics)
            self.pdmp = {"metrics": metrics, "ranking": list(ranking)}
        self.method = self.modulator = make_modulator(self, ranking)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        super().attach(optimizer)
        self.modulator.attach(optimizer)

    def loss(self, inputs: Mapping[str, Tensor], target: Tensor) -> Tensor:
        """Observe what the measure reads; the loss is the model's, or the method's where it prescribes one
        (``loss_inputs``: InfoReg's fused and decoupled cross-entropies)."""
        output = self.model(inputs)
        extra = {"features": output.features} if self.config.apply == "features" else {}
        self.modulator.observe(**observe_inputs(self.modulator, self.task, output, target), **extra)
        if hasattr(self.modulator, "loss_inputs"):
            given = provide_from_features(self.modulator.loss_inputs, self, output.features, target, inputs)
            return self.modulator.loss(**given)
        return self.model.loss(output, target)

    def coefficients_per_step(self) -> list[dict[str, Any]]:
        """The modulator's records of the steps it applied coefficients at (``[]`` for a modulator that records
        none, such as InfoReg's pulls: its fields are in the epochs' records)."""
        history = self.modulator.history
        return history if history and "coefficients" in history[0] else []


class ResponsesLoop(ModulatorLoop):
    """Kind ``"responses"`` (AGM, Li et al., *Boosting Multi-modal Model Performance with Adaptive Gradient
    Modulation*, ICCV 2023): every step runs the model on every coalition of modalities, the absent ones' inputs
    zeroed (`gradmod.methods.agm.mono_responses`: 4 forward passes for two modalities), observes the mono-modal
    responses and computes the loss from ``mod.combine(responses)``. With ``--agm-clip c`` it clips every gradient
    to norm ``c`` when the fused head's weight gradient leaves ``[−c, c]``, as the official training loop does
    (`gradmod.methods.agm.official_clip_`, ``c = 1`` for CREMA-D)."""

    kind = "responses"

    def __init__(self, config: TrainConfig, task: Task, device: torch.device) -> None:
        super().__init__(config, task, device)
        self.needs_class_targets("scores mono-modal responses against class labels")
        fusion = getattr(self.model, "fusion", None)
        self.head_weights = [] if fusion is None else [
            module.weight for module in fusion.modules() if isinstance(module, nn.Linear) and module.out_features == task.num_classes
        ]
        self.clip = self.method_options["clip"]
        if self.clip is not None and not self.head_weights:
            raise ValueError(f"--agm-clip reads the gradient of the fused head's weight, which the {task.name} model does not have")

    def _logits(self, inputs: Mapping[str, Tensor]) -> Tensor:
        return rows(self.model(inputs).logits)

    def step(self, inputs: Mapping[str, Tensor], target: Tensor) -> Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        measured = self.model.measure_target(target)
        responses = gradmod.methods.agm.mono_responses(self.model, inputs, forward=self._logits)
        self.modulator.observe(responses=responses, target=measured)
        loss = F.cross_entropy(self.modulator.combine(responses), measured)
        loss.backward()
        if self.clip is not None:
            for weight in self.head_weights:
                if gradmod.methods.agm.official_clip_(self.model.parameters(), weight, self.clip):
                    break
        self.optimizer.step()
        return loss.detach()
