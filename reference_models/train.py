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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, random_split
from tqdm import tqdm

import gradmod
from gradmod.mla import PROJECTIONS
from gradmod.mmpareto import RULES
from reference_models.loops import (
    MODULATOR_METHODS,
    PARAM_FILTERS,
    make_loop,
    make_modulator,
    make_optimizer,
    observe_inputs,
    unimodal_metrics,
)
from reference_models.models.common import FUSION_KINDS
from reference_models.tasks import DATASETS, IndexedDataset, Task, build_task

__all__ = [
    "METHODS",
    "MODULATOR_METHODS",
    "TrainConfig",
    "main",
    "make_modulator",
    "observe_inputs",
    "select_epochs",
    "summary_lines",
    "train",
    "unimodal_metrics",
]

#: Every ``--method``: no modulation, every gradmod method by its `gradmod.METHODS` name, and the data-level
#: mixups of Ma, Ding & Chen (2025).
METHODS = ("baseline", *gradmod.METHODS, "mm", "bmm")
#: Offset of the seed that draws the ``--val-size`` split from the run's seed.
VAL_SEED_OFFSET = 30_011

#: Per-dataset training defaults: OGM-GE's CREMA-D protocol (SGD 1e-3, momentum 0.9, wd 1e-4, StepLR(70, 0.1),
#: batch 64); Fu, Gao & Xu's Adam 5e-4, ×0.25 every 6 epochs, for LLP; what works on the generated AV-digits in a
#: few CPU minutes.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "avdigits": {"optimizer": "sgd", "lr": 0.01, "batch_size": 64, "epochs": 6, "lr_step": None, "lr_gamma": 0.1},
    "cremad": {"optimizer": "sgd", "lr": 1e-3, "batch_size": 64, "epochs": 100, "lr_step": 70, "lr_gamma": 0.1},
    "ave": {"optimizer": "adam", "lr": 1e-3, "batch_size": 64, "epochs": 30, "lr_step": 15, "lr_gamma": 0.1},
    "llp": {"optimizer": "adam", "lr": 5e-4, "batch_size": 128, "epochs": 25, "lr_step": 6, "lr_gamma": 0.25},
}


@dataclass
class TrainConfig:
    """Everything that defines a run; ``None`` fields take the dataset's `DATASET_DEFAULTS` (training) or
    the method's own default (``alpha``, ``gamma``)."""

    dataset: str = "avdigits"
    method: str = "baseline"
    fusion: str = "concat"
    data_root: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_step: int | None = None
    lr_gamma: float | None = None
    seed: int = 0
    apply: str = "params"
    backend: str = "auto"
    param_filter: str = "all"
    modulation_start: int = 0
    modulation_end: int | None = None
    alpha: float | None = None
    gamma: float | None = None
    noise: str | None = "default"
    gamma_p: float = 1.0
    gamma_r: float = 0.5
    pdmp_metrics: dict[str, float] | None = None
    pdmp_budget: int = 1
    agm_clip: float | None = 1.0
    mmpareto_rule: str = "paper"
    mla_projection: str = "owm"
    gblending_super_epoch: int = 1
    gblending_holdout: float = 0.08
    mixup_alpha: float = 0.4
    bmm_degree: float = 1.0
    bmm_warmup: int = 1
    bmm_smoothing: float = 0.5
    solo: str | None = None
    val_size: int | None = None
    max_items: int | None = None
    avdigits: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    workers: int = 0
    out: str | None = None
    resume: bool = False
    progress: bool = True

    def resolved(self) -> TrainConfig:
        """A copy with the dataset defaults filled in and every choice validated."""
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; expected one of {DATASETS}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {METHODS}")
        if self.fusion not in FUSION_KINDS:
            raise ValueError(f"unknown fusion {self.fusion!r}; expected one of {FUSION_KINDS}")
        if self.param_filter not in PARAM_FILTERS:
            raise ValueError(f"unknown param filter {self.param_filter!r}; expected one of {tuple(PARAM_FILTERS)}")
        if self.mmpareto_rule not in RULES:
            raise ValueError(f"unknown MMPareto rule {self.mmpareto_rule!r}; expected one of {RULES}")
        projections = tuple(p or "none" for p in PROJECTIONS)
        if self.mla_projection not in projections:
            raise ValueError(f"unknown MLA projection {self.mla_projection!r}; expected one of {projections}")
        filled = {k: v for k, v in DATASET_DEFAULTS[self.dataset].items() if getattr(self, k) is None}
        config = dataclasses.replace(self, **filled)
        if config.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {config.optimizer!r}")
        if config.epochs < 1 or config.batch_size < 1:
            raise ValueError("epochs and batch size must be >= 1")
        if config.resume and config.out is None:
            raise ValueError("--resume needs --out (the folder holding checkpoint.pt)")
        if config.solo is not None and config.method != "baseline":
            raise ValueError(f"--solo trains one modality alone without any method: use --method baseline, not {config.method}")
        if config.gblending_super_epoch < 1 or not 0.0 < config.gblending_holdout < 1.0:
            raise ValueError("--gblending-super-epoch must be >= 1 and --gblending-holdout in (0, 1)")
        if not 0.0 <= config.bmm_smoothing < 1.0:
            raise ValueError(f"--bmm-smoothing must lie in [0, 1), got {config.bmm_smoothing}")
        if config.agm_clip is not None and not config.agm_clip > 0:
            raise ValueError(f"--agm-clip must be > 0 (or none), got {config.agm_clip}")
        if config.val_size is not None and config.val_size < 1:
            raise ValueError(f"--val-size must be >= 1, got {config.val_size}")
        return config


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
def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train(config: TrainConfig) -> dict[str, Any]:
    """Run one training job; returns the results (also written to ``out/results.json`` when ``out`` is set)."""
    config = config.resolved()
    device = _device(config.device)
    task = build_task(
        config.dataset, data_root=config.data_root, fusion=config.fusion, seed=config.seed,
        max_items=config.max_items, avdigits_options=config.avdigits,
    )
    if config.val_size is not None:
        _hold_out_val(task, config)
    model = task.model.to(device)
    loop = make_loop(config, task, device)
    loader_args = {"batch_size": config.batch_size, "num_workers": config.workers}
    evaluation_loaders = {
        split: DataLoader(IndexedDataset(dataset), **loader_args)
        for split, dataset in (("val", task.val_set), ("test", task.test_set))
        if dataset is not None
    }
    out = Path(config.out) if config.out else None
    checkpoint_path = out / "checkpoint.pt" if out else None
    optimizer = make_optimizer(config, model)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, config.lr_step, config.lr_gamma) if config.lr_step else None
    loop.attach(optimizer)

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
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        loader = DataLoader(loop.train_set, shuffle=True, generator=generator, **loader_args)
        total_loss, batches = 0.0, 0
        for inputs, target in tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, disable=None if config.progress else True):
            inputs, target = {n: x.to(device) for n, x in inputs.items()}, target.to(device)
            total_loss += loop.step(inputs, target).item()
            batches += 1
        if scheduler is not None:
            scheduler.step()
        record: dict[str, Any] = {"epoch": epoch, "train_loss": total_loss / max(batches, 1), **loop.end_epoch(epoch)}
        for split, split_loader in evaluation_loaders.items():
            record[split] = task.evaluate(split_loader, device)
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
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        from reference_models.plots import plot_run

        plot_run(results, out / "curves.png")
    return results


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
def _metrics_arg(text: str) -> dict[str, float]:
    try:
        return {name: float(value) for name, value in (item.split("=") for item in text.split(","))}
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected name=value,name=value, got {text!r}") from error


def _clip_arg(text: str) -> float | None:
    if text == "none":
        return None
    try:
        return float(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a positive number or none, got {text!r}") from error


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser(prog="python -m reference_models.train", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--dataset", choices=DATASETS, default="avdigits")
    add("--method", choices=METHODS, default="baseline")
    add("--fusion", choices=FUSION_KINDS, default="concat")
    add("--data-root", help="folder of the dataset's real files (cremad, ave, llp); scan it first with "
        "python -m reference_models.check")
    add("--epochs", type=int)
    add("--batch-size", type=int)
    add("--optimizer", choices=("sgd", "adam"))
    add("--lr", type=float)
    add("--lr-step", type=int, help="StepLR period in epochs")
    add("--lr-gamma", type=float, help="StepLR decay factor")
    add("--weight-decay", type=float, default=1e-4)
    add("--seed", type=int, default=0)
    add("--apply", choices=("params", "features"), default="params")
    add("--backend", choices=gradmod.kernels.BACKENDS, default="auto")
    add("--param-filter", choices=tuple(PARAM_FILTERS), default="all")
    add("--modulation-start", type=int, default=0, help="first modulated epoch")
    add("--modulation-end", type=int, help="last modulated epoch (inclusive; default: the last epoch)")
    add("--alpha", type=float, help="strength α: OGM / OGM-GE (Peng et al., CVPR 2022) and decoupling-free (Sun et "
        "al., ICASSP 2024), default 0.8; AGM (Li et al., ICCV 2023), default 1.0; MLA's projection (Zhang et al., "
        "CVPR 2024), default 0.1")
    add("--gamma", type=float, help="DGM γ (Fu, Gao & Xu, eq. (7); default 0.1); MMPareto's magnitude γ (Wei & Hu, "
        "ICML 2024; default 1 with --mmpareto-rule paper, 1.5 with official)")
    add("--noise", choices=("default", "none", "ge", "restore", "paper"), default="default")
    add("--gamma-p", type=float, default=1.0, help="PDMP γp (dominant modality)")
    add("--gamma-r", type=float, default=0.5, help="PDMP γr (the rest)")
    add("--pdmp-metrics", type=_metrics_arg, help="unimodal metrics, e.g. audio=0.61,visual=0.52 (default: measured)")
    add("--pdmp-budget", type=int, default=1, help="epochs of unimodal training to rank the modalities")
    add("--agm-clip", type=_clip_arg, default=1.0, help="AGM (Li et al., ICCV 2023): clip every gradient to this "
        "norm when the fused head's weight gradient leaves [-c, c], as its official loop does; none: never")
    add("--mmpareto-rule", choices=RULES, default="paper", help="MMPareto (Wei & Hu, ICML 2024): the paper's "
        "whole-encoder rescaling or the official code's per-tensor one")
    add("--mla-projection", choices=tuple(p or "none" for p in PROJECTIONS), default="owm", help="MLA (Zhang et "
        "al., CVPR 2024): the head-gradient projection; none is what the official code runs")
    add("--gblending-super-epoch", type=int, default=1, help="G-Blending (Wang, Tran & Feiszli, CVPR 2020): "
        "re-estimate the loss weights every this many epochs")
    add("--gblending-holdout", type=float, default=0.08, help="G-Blending: fraction of the training split held "
        "out to estimate the weights (MultiBench's 8%%)")
    add("--mixup-alpha", type=float, default=0.4, help="MM Beta(α, α) (Ma, Ding & Chen, 2025, eq. (3))")
    add("--bmm-degree", type=float, default=1.0, help="B-MM degree β (Ma, Ding & Chen, 2025, eq. (7))")
    add("--bmm-warmup", type=int, default=1, help="B-MM warm-up epochs")
    add("--bmm-smoothing", type=float, default=0.5, help="B-MM: weight of the past in the moving average of the "
        "unimodal accuracies that set κ (0: each epoch's own, as printed in the paper)")
    add("--solo", help="with --method baseline: train this modality alone (the others' features zeroed)")
    add("--val-size", type=int, help="hold this many training items out as a val split (datasets without one)")
    add("--max-items", type=int, help="cap each split (smoke runs)")
    add("--device", default="auto")
    add("--workers", type=int, default=0)
    add("--out", help="folder for checkpoint.pt, results.json (per-epoch val/test scores; last, best-test and "
        "val-selected epochs) and curves.png")
    add("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    add("--no-progress", dest="progress", action="store_false")
    args = vars(parser.parse_args(argv))
    if args["noise"] == "none":
        args["noise"] = None
    return TrainConfig(**args)


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
