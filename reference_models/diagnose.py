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
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import gradmod
from gradmod.diagnose import Loop, Monitor, diagnose
from reference_models.config import DATASETS, TrainConfig
from reference_models.loops import make_optimizer
from reference_models.tasks import build_task

__all__ = ["main", "train_monitored"]


def train_monitored(config: TrainConfig) -> tuple:
    """Joint training of the reference model on ``config`` with a monitor attached; ``(task, monitor, steps, initial
    encoders)``: the encoders as initialised, for the solo runs."""
    config = config.resolved()
    task = build_task(config.dataset, data_root=config.data_root, fusion=config.fusion, seed=config.seed,
                      max_items=config.max_items, dataset_options=config.dataset_options)
    model = task.model
    initial = copy.deepcopy(model.encoders)
    optimizer = make_optimizer(config, model.parameters())
    monitor = Monitor(model.modality_modules())
    monitor.attach(optimizer)
    steps = 0
    for epoch in range(config.epochs):
        model.train()
        monitor.start_epoch(epoch)
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        loader = DataLoader(task.train_set, config.batch_size, shuffle=True, generator=generator)
        for inputs, target in tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, disable=None if config.progress else True):
            optimizer.zero_grad(set_to_none=True)
            output = model(inputs)
            if output.unimodal_logits is not None:
                monitor.observe(logits=output.unimodal_logits, target=model.measure_target(target))
            model.loss(output, target).backward()
            optimizer.step()
            steps += 1
        monitor.end_epoch(epoch)
    return task, monitor, steps, initial


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
    task, monitor, steps, initial = train_monitored(config)
    model = task.model
    model.eval()
    resolved = config.resolved()
    test_loader = DataLoader(task.test_set, resolved.batch_size)
    train_loader = DataLoader(task.train_set, resolved.batch_size, shuffle=True, generator=torch.Generator().manual_seed(args.seed))
    report = diagnose(
        task.modalities, test_loader,
        encode=model.encode, head=lambda features: model.head(features).logits,
        unimodal_logits=lambda inputs: model.decoupled_logits(model.encode(inputs)),
        train_loader=train_loader, solo=(lambda name: copy.deepcopy(initial[name])) if args.solo else None,
        solo_steps=steps, classes=task.num_classes, monitor=monitor,
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
