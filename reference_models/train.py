"""Train a reference model with or without gradient modulation: ``python -m reference_models.train --help``.

One loop for every dataset × method × fusion head. Each method enters it through the loop of its kind
(`reference_models.loops`: ``gradmod.METHODS[name].loop`` for gradmod's methods). Per epoch it evaluates the
val split (AVE, LLP, or ``--val-size`` items held out of the training split) and the test split: fused
accuracy, macro-F1 and each modality's unimodal accuracy, both masked (the fused head with the other
modality's features zeroed) and decoupled (OGM-GE's convention, concat, sum and shared heads), and the
mean modulation coefficients. It saves a checkpoint (``--resume`` continues exactly), ``results.json`` and
``curves.png`` under ``--out``, and ends with the test scores of the last epoch, of the best epoch on test
and of the epoch selected on val, each labelled (`select_epochs`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, random_split
from tqdm import tqdm

import gradmod
from reference_models.config import (
    CLI_METHODS,
    DATASETS,
    METHODS,
    OPTIMIZERS,
    TrainConfig,
    strength_keywords,
)
from reference_models.loops import MethodLoop, make_loop, make_optimizer
from reference_models.loops.modulator import PARAM_FILTERS
from reference_models.models.common import FUSION_KINDS
from reference_models.tasks import IndexedDataset, Task, build_task

__all__ = ["METHODS", "Prepared", "TrainConfig", "fit", "main", "parse_args", "prepare", "select_epochs", "summary_lines", "train"]

#: Offset of the seed that draws the ``--val-size`` split from the run's seed.
VAL_SEED_OFFSET = 30_011


def _hold_out_val(task: Task, config: TrainConfig) -> None:
    """``--val-size``: move that many training items, drawn with the run's seed, into a val split."""
    if task.val_set is not None:
        raise ValueError(f"--val-size holds a val split out of the training split; {task.name} has its own val split")
    size = len(task.train_set)
    if config.val_size >= size:
        raise ValueError(f"--val-size {config.val_size} leaves nothing of the {size} training items to train on")
    generator = torch.Generator().manual_seed(config.seed + VAL_SEED_OFFSET)
    task.train_set, task.val_set = random_split(task.train_set, [size - config.val_size, config.val_size], generator)


# ---------------------------------------------------------------------------------------------- training
def _set_epoch(dataset: Any, epoch: int) -> None:
    """Tell a dataset that pairs its items per epoch (AV-MNIST's ``repair_every_epoch``) which epoch starts,
    through the subsets of held-out splits."""
    while dataset is not None:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
            return
        dataset = getattr(dataset, "dataset", None)
def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train(config: TrainConfig) -> dict[str, Any]:
    """Run one training job; returns the results (also written to ``out/results.json`` when ``out`` is set)."""
    return fit(config)[2]


@dataclasses.dataclass
class Prepared:
    """A run before its first epoch: the resolved config, the device, the task (data and model on the device),
    the method's loop and the optimizer it is attached to."""

    config: TrainConfig
    device: torch.device
    task: Task
    loop: MethodLoop
    optimizer: torch.optim.Optimizer


def prepare(config: TrainConfig, make: Callable[[TrainConfig, Task, torch.device], MethodLoop] = make_loop) -> Prepared:
    """Build what a run trains: data and model, the loop (``make``, by default the method's,
    `reference_models.loops.make_loop`) and its optimizer, attached."""
    config = config.resolved()
    device = _device(config.device)
    task = build_task(
        config.dataset, data_root=config.data_root, fusion=config.fusion, seed=config.seed,
        max_items=config.max_items, dataset_options=config.dataset_options,
    )
    if config.val_size is not None:
        _hold_out_val(task, config)
    task.model.to(device)
    loop = make(config, task, device)
    optimizer = make_optimizer(config, loop.parameters())
    loop.attach(optimizer)
    return Prepared(config, device, task, loop, optimizer)


def fit(
    config: TrainConfig, make: Callable[[TrainConfig, Task, torch.device], MethodLoop] = make_loop
) -> tuple[Task, MethodLoop, dict[str, Any]]:
    """`train`, returning the task (with its trained model) and the loop too; ``make`` builds the loop (by
    default the method's, `reference_models.loops.make_loop`)."""
    started = time.perf_counter()
    run = prepare(config, make)
    setup_s = time.perf_counter() - started  # data, model and what the loop trains before the first epoch
    config, device, task, loop, optimizer = run.config, run.device, run.task, run.loop, run.optimizer
    model = task.model
    loader_args = {"batch_size": config.batch_size, "num_workers": config.workers}
    evaluation_loaders = {
        split: DataLoader(IndexedDataset(dataset), **loader_args)
        for split, dataset in (("val", task.val_set), ("test", task.test_set))
        if dataset is not None
    }
    out = Path(config.out) if config.out else None
    checkpoint_path = out / "checkpoint.pt" if out else None
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, config.lr_step, config.lr_gamma) if config.lr_step else None

    history: list[dict[str, Any]] = []
    first_epoch, elapsed = 0, 0.0
    if config.resume and checkpoint_path is not None and checkpoint_path.is_file():
        state = torch.load(checkpoint_path, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        loop.load_state_dict(state["method"])
        torch.set_rng_state(state["torch_rng"])
        history, first_epoch, elapsed = state["history"], state["epoch"] + 1, state["elapsed"]

    for epoch in range(first_epoch, config.epochs):
        started = time.perf_counter()
        model.train()
        loop.start_epoch(epoch)
        _set_epoch(loop.train_set, epoch)
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        loader = DataLoader(loop.epoch_data, shuffle=True, generator=generator, **loader_args)
        total_loss, batches = 0.0, 0
        for inputs, target in tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, disable=None if config.progress else True):
            inputs, target = {n: x.to(device) for n, x in inputs.items()}, target.to(device)
            total_loss += loop.step(inputs, target).item()
            batches += 1
        if scheduler is not None:
            scheduler.step()
        record: dict[str, Any] = {"epoch": epoch, "train_loss": total_loss / max(batches, 1), **loop.end_epoch(epoch)}
        for split, split_loader in evaluation_loaders.items():
            record[split] = task.evaluate(split_loader, device, predict=loop.predictor)
        elapsed += time.perf_counter() - started
        record["elapsed_s"] = elapsed
        history.append(record)
        _print_epoch(config, record)
        if checkpoint_path is not None:
            out.mkdir(parents=True, exist_ok=True)
            state = {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "method": loop.state_dict(),
                "epoch": epoch, "history": history, "elapsed": elapsed, "torch_rng": torch.get_rng_state(),
                "config": dataclasses.asdict(config),
            }
            if scheduler is not None:
                state["scheduler"] = scheduler.state_dict()
            torch.save(state, checkpoint_path)

    results = {
        "config": dataclasses.asdict(config),
        "method": {"loop": loop.kind, "options": loop.options()},
        "final": history[-1]["test"],
        "selection": select_epochs(history, task.selection_metric),
        "history": history,
        "coefficients_per_step": loop.coefficients_per_step(),
        "pdmp": loop.pdmp,
        "wall_time_s": elapsed,
        "setup_s": setup_s,
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        from reference_models.plots import plot_run

        plot_run(results, out / "curves.png")
    return task, loop, results


#: What each report of `select_epochs` is, and which papers report that way.
SELECTION_LABELS = {
    "last_epoch": "last epoch",
    "best_test": "best test score over epochs (OGM-GE, PSP)",
    "val_selected": "epoch with the best val score (AVVP-ECCV20)",
}


def select_epochs(history: Sequence[Mapping[str, Any]], metric: str) -> dict[str, Any]:
    """The test scores of three epochs of a run, each labelled (`SELECTION_LABELS`).

    ``last_epoch``: the last one. ``best_test``: the first epoch whose test ``accuracy`` (the task's
    ``metric``) is the highest, as OGM-GE and PSP report. ``val_selected``: the epoch whose val
    ``accuracy`` is the highest, the latest among ties as AVVP-ECCV20's ``F >= best_F``, with its val
    and test scores; ``None`` without a val split.
    """
    last = history[-1]
    best = max(history, key=lambda record: record["test"]["accuracy"])
    reports: dict[str, Any] = {
        "metric": metric,
        "last_epoch": {"label": SELECTION_LABELS["last_epoch"], "epoch": last["epoch"], "test": last["test"]},
        "best_test": {"label": SELECTION_LABELS["best_test"], "epoch": best["epoch"], "test": best["test"]},
        "val_selected": None,
    }
    if "val" in last:
        chosen = max(reversed(history), key=lambda record: record["val"]["accuracy"])
        reports["val_selected"] = {
            "label": SELECTION_LABELS["val_selected"],
            "epoch": chosen["epoch"],
            "val": chosen["val"],
            "test": chosen["test"],
        }
    return reports


def _scores(evaluation: Mapping[str, Any]) -> str:
    """``acc 0.712 macro-F1 0.700 | masked audio=0.610 … | decoupled audio=0.630 …`` of one evaluation."""
    text = f"acc {evaluation['accuracy']:.3f}"
    if "macro_f1" in evaluation:
        text += f" macro-F1 {evaluation['macro_f1']:.3f}"
    for key, name in (("unimodal", "masked"), ("unimodal_decoupled", "decoupled")):
        if key in evaluation:
            text += f" | {name} " + " ".join(f"{n}={v:.3f}" for n, v in evaluation[key].items())
    return text


def _print_epoch(config: TrainConfig, record: Mapping[str, Any]) -> None:
    line = f"[{config.dataset}/{config.method}] epoch {record['epoch'] + 1}/{config.epochs}"
    line += f" loss {record['train_loss']:.4f}"
    if "val" in record:
        line += f" | val acc {record['val']['accuracy']:.3f}"
    line += f" | test {_scores(record['test'])}"
    if record["coefficients"]:
        line += " | mean k " + " ".join(f"{n}={v:.3f}" for n, v in record["coefficients"].items())
    print(line, flush=True)


def summary_lines(results: Mapping[str, Any]) -> list[str]:
    """The CLI's closing summary: the test scores of `select_epochs`' three reports, labelled."""
    selection = results["selection"]
    lines = [
        f"test scores ({selection['metric']}; unimodal: masked = other modality zeroed, "
        "decoupled = OGM-GE's per-modality logits with b/2)"
    ]
    for key, label in SELECTION_LABELS.items():
        report = selection[key]
        if report is None:
            lines.append(f"  {label}: no val split for {results['config']['dataset']}")
            continue
        chosen = f"epoch {report['epoch'] + 1}"
        if "val" in report:
            chosen += f", val acc {report['val']['accuracy']:.3f}"
        lines.append(f"  {label} ({chosen}): {_scores(report['test'])}")
    return lines


# ---------------------------------------------------------------------------------------------- CLI
def _method_help() -> str:
    own = "; ".join(f"{key}: {text}" for key, text in CLI_METHODS.items())
    return f"{own}; and every gradmod method by its gradmod.METHODS key ({', '.join(gradmod.METHODS)})"


#: Flags of the previous release → their names now (accepted for one release, with a warning on stderr).
RENAMED_FLAGS = {
    "--mixup-alpha": "--concentration",
    "--bmm-degree": "--degree",
    "--bmm-warmup": "--bmm-warmup-epochs",
    "--gamma-p": "--pdmp-gamma-p",
}


def _renamed_flags(argv: Sequence[str]) -> list[str]:
    """``argv`` with the flags of `RENAMED_FLAGS` under their new names, each rename reported on stderr."""
    renamed = []
    for word in argv:
        flag, sep, value = word.partition("=")
        if flag in RENAMED_FLAGS:
            print(f"warning: {flag} is renamed {RENAMED_FLAGS[flag]}; {flag} will be removed in the next release",
                  file=sys.stderr)
            word = RENAMED_FLAGS[flag] + sep + value
        renamed.append(word)
    return renamed


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """The CLI's arguments as a `TrainConfig`; each method's strength and options come from its registry entry."""
    parser = argparse.ArgumentParser(prog="python -m reference_models.train", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--dataset", choices=DATASETS, default="avdigits")
    add("--method", choices=METHODS, default="baseline", help=_method_help())
    add("--fusion", choices=FUSION_KINDS, help="the fusion head (default: the one the method needs, else concat)")
    add("--data-root", help="folder of the dataset's real files (cremad, ave, llp); scan it first with "
        "python -m reference_models.check")
    add("--epochs", type=int)
    add("--batch-size", type=int)
    add("--optimizer", choices=OPTIMIZERS)
    add("--lr", type=float)
    add("--lr-step", type=int, help="StepLR period in epochs")
    add("--lr-gamma", type=float, help="StepLR decay factor")
    add("--weight-decay", type=float, default=1e-4)
    add("--seed", type=int, default=0)
    add("--strength", type=float, help="the method's main hyper-parameter (gradmod.METHODS[method].strength), "
        "also settable by its own name below")
    for keyword, keys in strength_keywords().items():
        meaning = gradmod.METHODS[keys[0]].strength.meaning
        add(f"--{keyword.replace('_', '-')}", type=float, dest=f"strength:{keyword}", default=argparse.SUPPRESS,
            help=f"the strength of {', '.join(keys)}: {meaning}".replace("%", "%%"))
    group = parser.add_argument_group("method options", "--<method>-<option>, from each method's gradmod.METHODS entry")
    for key, info in gradmod.METHODS.items():
        for option in info.options:
            choices = None if option.choices is None else [str(c) for c in option.choices]
            group.add_argument(
                f"--{key}-{option.keyword.replace('_', '-')}", dest=f"option:{key}:{option.keyword}", type=option.type,
                default=argparse.SUPPRESS,
                choices=choices if option.type is str else None, help=f"{info.title}: {option.help} (default {option.default})".replace("%", "%%"),
            )
    add("--apply", choices=gradmod.appliers.APPLY_MODES, default="params")
    add("--backend", choices=gradmod.kernels.BACKENDS, default="auto")
    add("--param-filter", choices=tuple(PARAM_FILTERS), default="all")
    add("--noise", choices=("default", "none", *gradmod.functional.NOISE_KINDS), default="default")
    add("--modulation-start", type=int, default=0, help="first modulated epoch")
    add("--modulation-end", type=int, help="last modulated epoch (inclusive; default: the last epoch)")
    add("--solo", help="with --method baseline: train this modality alone (the others' features zeroed)")
    add("--val-size", type=int, help="hold this many training items out as a val split (datasets without one)")
    add("--max-items", type=int, help="cap each split (smoke runs)")
    add("--device", default="auto")
    add("--workers", type=int, default=0)
    add("--out", help="folder for checkpoint.pt, results.json (per-epoch val/test scores; last, best-test and "
        "val-selected epochs) and curves.png")
    add("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    add("--no-progress", dest="progress", action="store_false")
    args = vars(parser.parse_args(_renamed_flags(sys.argv[1:] if argv is None else argv)))
    if args["noise"] == "none":
        args["noise"] = None
    method = args["method"]
    info = gradmod.METHODS.get(method)
    for dest in [d for d in args if d.startswith("strength:")]:
        value, keyword = args.pop(dest), dest.split(":", 1)[1]
        if info is None or info.strength is None or info.strength.keyword != keyword:
            own = "none" if info is None or info.strength is None else f"--{info.strength.keyword.replace('_', '-')}"
            parser.error(f"--{keyword.replace('_', '-')} is not a hyper-parameter of {method} (its strength: {own})")
        if args["strength"] is not None:
            parser.error(f"--strength and --{keyword.replace('_', '-')} set the same value: pass one")
        args["strength"] = value
    options = {}
    for dest in [d for d in args if d.startswith("option:")]:
        value, (_, key, keyword) = args.pop(dest), dest.split(":")
        if key != method:
            parser.error(f"--{key}-{keyword.replace('_', '-')} is an option of {key}, not of {method}")
        options[keyword] = value
    return TrainConfig(**args, options=options)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        results = train(parse_args(argv))
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
