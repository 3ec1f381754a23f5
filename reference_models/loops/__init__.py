"""How each training method enters the CLI's epoch loop: one module per kind of method (`gradmod.method.KINDS`).

`make_loop` picks the loop of a run's method: the CLI's own (`PlainLoop`, `ControlLoop`), else the loop of the
method's kind (``gradmod.METHODS[key].kind``, `LOOPS`; the data methods each have theirs, `DATA_LOOPS`).
"""

from __future__ import annotations

import torch

from reference_models.config import TrainConfig
from reference_models.loops.backward import BackwardLoop
from reference_models.loops.base import MethodLoop, make_optimizer, provide
from reference_models.loops.data import DATA_LOOPS
from reference_models.loops.epoch import EpochLoop
from reference_models.loops.forward import ForwardLoop
from reference_models.loops.loss import LossLoop
from reference_models.loops.modulator import (
    ModulatorLoop,
    ResponsesLoop,
    make_modulator,
    observe_inputs,
    unimodal_metrics,
)
from reference_models.loops.plain import ControlLoop, HeadLoop, PlainLoop
from reference_models.loops.turns import TurnsLoop
from reference_models.tasks import Task

__all__ = [
    "CLI_LOOPS",
    "LOOPS",
    "MethodLoop",
    "make_loop",
    "make_modulator",
    "make_optimizer",
    "observe_inputs",
    "provide",
    "unimodal_metrics",
]

#: The loop of each kind of gradmod method.
LOOPS: dict[str, type[MethodLoop]] = {
    loop.kind: loop
    for loop in (ModulatorLoop, ResponsesLoop, BackwardLoop, TurnsLoop, LossLoop, ForwardLoop, EpochLoop, HeadLoop)
}
#: The CLI's own methods (`reference_models.config.CLI_METHODS`).
CLI_LOOPS: dict[str, type[MethodLoop]] = {"baseline": PlainLoop, "unimodal_losses": ControlLoop}


def make_loop(config: TrainConfig, task: Task, device: torch.device) -> MethodLoop:
    """The loop of ``config.method``: `CLI_LOOPS`, `DATA_LOOPS` by key, else `LOOPS` by the method's kind."""
    if config.method in CLI_LOOPS:
        return CLI_LOOPS[config.method](config, task, device)
    info = config.info
    if info.kind == "data" and config.method in DATA_LOOPS:
        return DATA_LOOPS[config.method](config, task, device)
    if info.kind not in LOOPS:
        raise ValueError(f"gradmod method {config.method!r} is of kind {info.kind!r}, which the CLI does not drive")
    return LOOPS[info.kind](config, task, device)
