"""Is the reference model imbalanced? ``python -m reference_models.diagnose --dataset avmnist`` (or avdigits, cremad…).

Trains the dataset's reference model jointly (the concat head, the dataset's recipe: `reference_models.config`)
with a `gradmod.diagnose.Monitor` attached (each step's score ratio and each encoder's ``‖g‖/‖w‖``), then diagnoses
it on the test split with `gradmod.diagnose.diagnose`: each modality's accuracy with the others' features zeroed,
the Shapley values of accuracy, the decoupled head's accuracies, linear probes of the frozen encoders, and —
unless ``--no-solo`` — each encoder trained alone for as many steps as the joint run. Prints the report, and writes
``diagnosis.json`` and ``diagnosis.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

import gradmod
from gradmod.diagnose import Loop, Monitor, diagnose
from reference_models.config import DATASETS, TrainConfig
from reference_models.loops.plain import PlainLoop
from reference_models.tasks import Task
from reference_models.train import fit

__all__ = ["MonitoredLoop", "main", "train_monitored"]


class MonitoredLoop(PlainLoop):
    """The baseline's loop (`reference_models.loops.PlainLoop`) with a `gradmod.diagnose.Monitor` attached to its
    optimizer, fed each step's decoupled logits. The monitor changes no gradient, so the run is the CLI's baseline
    run with the same config, bit for bit. ``initial``: the encoders as initialised, for the solo runs."""

    def __init__(self, config: TrainConfig, task: Task, device: torch.device) -> None:
        super().__init__(config, task, device)
        self.initial = copy.deepcopy(task.model.encoders)
        self.monitor = Monitor(task.model.modality_modules())

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        super().attach(optimizer)
        self.monitor.attach(optimizer)

    def start_epoch(self, epoch: int) -> None:
        super().start_epoch(epoch)
        self.monitor.start_epoch(epoch)

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        record = super().end_epoch(epoch)
        self.monitor.end_epoch(epoch)
        return record

    def loss(self, inputs: Mapping[str, Tensor], target: Tensor) -> Tensor:
        output = self.model.head(self.model.encode(inputs))
        if output.unimodal_logits is not None:
            self.monitor.observe(logits=output.unimodal_logits, target=self.model.measure_target(target))
        return self.model.loss(output, target)


def train_monitored(config: TrainConfig) -> tuple[Task, MonitoredLoop, dict[str, Any]]:
    """The CLI's baseline run of ``config`` (`reference_models.train.fit`: the dataset's recipe, its LR schedule,
    ``val_size``) with a monitor attached: ``(task, loop, results)``; ``loop.monitor`` holds the measurements."""
    if config.method != "baseline" or config.solo is not None:
        raise ValueError(f"the diagnosis trains the joint baseline, not --method {config.method} / --solo {config.solo}")
    return fit(config, make=MonitoredLoop)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reference_models.diagnose", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=DATASETS, default="avmnist")
    parser.add_argument("--data-root", help="folder of the dataset's real files (cremad, ave, llp)")
    parser.add_argument("--epochs", type=int, help="joint training epochs (default: the dataset's recipe)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-items", type=int, help="cap each split (smoke runs)")
    parser.add_argument("--no-solo", dest="solo", action="store_false", help="skip training each encoder alone")
    parser.add_argument("--out", default="results/diagnose", help="folder for diagnosis.json and diagnosis.png")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    config = TrainConfig(dataset=args.dataset, data_root=args.data_root, epochs=args.epochs, seed=args.seed,
                         max_items=args.max_items, progress=args.progress, fusion="concat")
    task, loop, _ = train_monitored(config)
    monitor, initial, model = loop.monitor, loop.initial, task.model
    model.eval()
    resolved = config.resolved()
    test_loader = DataLoader(task.test_set, resolved.batch_size)
    train_loader = DataLoader(task.train_set, resolved.batch_size, shuffle=True, generator=torch.Generator().manual_seed(args.seed))
    report = diagnose(
        task.modalities, test_loader,
        encode=model.encode, head=lambda features: model.head(features).logits,
        unimodal_logits=lambda inputs: model.decoupled_logits(model.encode(inputs)),
        train_loader=train_loader, solo=(lambda name: copy.deepcopy(initial[name])) if args.solo else None,
        solo_steps=monitor.step_count, classes=task.num_classes, monitor=monitor,
        loop=Loop(head="split", unimodal_heads=True, optimizer=resolved.optimizer), seed=args.seed, modules=(model,),
    )
    print(report.summary())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report.to_json(out / "diagnosis.json")
    report.figure(out / "diagnosis.png")
    print(f"\nwrote {out / 'diagnosis.json'} and {out / 'diagnosis.png'} (gradmod {gradmod.__version__})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
