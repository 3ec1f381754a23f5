"""Train a reference model with or without gradient modulation: ``python -m reference_models.train --help``.

One loop for every dataset × method × fusion head. Per epoch it evaluates the val split (AVE, LLP) and
the test split: fused accuracy, macro-F1 and each modality's unimodal accuracy, both masked (the fused
head with the other modality's features zeroed) and decoupled (OGM-GE's convention, concat and sum
heads), and the mean modulation coefficients. It saves a checkpoint (``--resume`` continues exactly),
``results.json`` and ``curves.png`` under ``--out``, and ends with the test scores of the last epoch,
of the best epoch on test and of the epoch selected on val, each labelled (`select_epochs`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, random_split
from tqdm import tqdm

import gradmod
from gradmod.mixup import BalancedMixup, MultimodalMixup, soft_cross_entropy
from reference_models.models.common import FUSION_KINDS, ModelOutput
from reference_models.tasks import DATASETS, IndexedDataset, Task, build_task

__all__ = ["METHODS", "TrainConfig", "train", "main", "unimodal_metrics", "select_epochs", "summary_lines"]

#: The gradient-modulation methods the CLI drives through a `gradmod.Modulator`, by their `gradmod.METHODS` name.
MODULATOR_METHODS = ("ogm", "ogm_ge", "pdmp", "dgm", "decoupling_free")
#: Every ``--method``: no modulation, the modulator methods, and the data-level mixups (Ma, Ding & Chen, 2025).
METHODS = ("baseline", *MODULATOR_METHODS, "mm", "bmm")
#: Preset keyword → the `TrainConfig` field that sets it (the presets' hyper-parameters share these names).
PRESET_OPTIONS = {"alpha": "alpha", "gamma": "gamma", "gamma_p": "gamma_p", "gamma_r": "gamma_r"}
PARAM_FILTERS = {"all": None, "weights": gradmod.filters.weights, "conv": gradmod.filters.conv_weights}

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
    """Everything that defines a run; ``None`` fields take the dataset's `DATASET_DEFAULTS`."""

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
    alpha: float = 0.8
    gamma: float = 0.1
    noise: str | None = "default"
    gamma_p: float = 1.0
    gamma_r: float = 0.5
    pdmp_metrics: dict[str, float] | None = None
    pdmp_budget: int = 1
    mixup_alpha: float = 0.4
    bmm_degree: float = 1.0
    bmm_warmup: int = 1
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
        filled = {k: v for k, v in DATASET_DEFAULTS[self.dataset].items() if getattr(self, k) is None}
        config = dataclasses.replace(self, **filled)
        if config.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {config.optimizer!r}")
        if config.epochs < 1 or config.batch_size < 1:
            raise ValueError("epochs and batch size must be >= 1")
        if config.resume and config.out is None:
            raise ValueError("--resume needs --out (the folder holding checkpoint.pt)")
        return config


# ---------------------------------------------------------------------------------------------- methods
def make_modulator(config: TrainConfig, task: Task, steps_per_epoch: int, pdmp_ranking: Sequence[str] | None = None):
    """The gradmod modulator of ``config.method`` over the task model's modalities (``None`` for non-gradient methods).

    The preset is ``gradmod.METHODS[config.method].preset``; its hyper-parameters come from the config fields of
    the same name (`PRESET_OPTIONS`), and ``ranking`` from PDMP's unimodal stage.
    """
    if config.method not in MODULATOR_METHODS:
        return None
    end = config.epochs - 1 if config.modulation_end is None else config.modulation_end
    start_step, stop_step = gradmod.epoch_window(config.modulation_start, end, steps_per_epoch)
    options: dict[str, Any] = {
        "apply": config.apply,
        "backend": config.backend,
        "param_filter": PARAM_FILTERS[config.param_filter],
        "start_step": start_step,
        "stop_step": stop_step,
        "seed": config.seed,
    }
    if config.noise != "default":
        options["noise"] = config.noise
    elif config.apply == "features":
        options["noise"] = None
    preset = gradmod.METHODS[config.method].preset
    parameters = _preset_parameters(config.method)
    options.update({name: getattr(config, field) for name, field in PRESET_OPTIONS.items() if name in parameters})
    if "ranking" in parameters:
        options["ranking"] = pdmp_ranking
    return preset(task.model.modality_modules(), **options)


def _preset_parameters(method: str) -> frozenset[str]:
    """The keyword parameters of ``method``'s gradmod preset (none for the CLI's other methods)."""
    if method not in MODULATOR_METHODS:
        return frozenset()
    return frozenset(inspect.signature(gradmod.METHODS[method].preset).parameters)


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
            "(FiLM and gated heads mix the modalities): use --fusion concat or sum, or --method decoupling_free "
            "with a gated head"
        )
    return {"logits": output.unimodal_logits, "target": task.model.measure_target(target)}


def _mix_features(mixer: MultimodalMixup, features: Mapping[str, Tensor], target: Tensor, classes: int):
    """MM (Ma, Ding & Chen, 2025, eq. (3)): mix the fused representation — all modalities' features with one λ and π."""
    names = list(features)
    widths = [features[n].shape[-1] for n in names]
    mixed, soft = mixer(torch.cat([features[n] for n in names], -1), target, classes)
    return dict(zip(names, mixed.split(widths, -1))), soft


def unimodal_metrics(task: Task, config: TrainConfig, device: torch.device) -> dict[str, float]:
    """PDMP stage 1: train each modality's branch alone (others zeroed) for ``pdmp_budget`` epochs from the
    same initialisation, and return its unimodal accuracy on a held-out 10% of the training split."""
    held = max(1, len(task.train_set) // 10)
    fit, held_out = random_split(task.train_set, [len(task.train_set) - held, held], torch.Generator().manual_seed(config.seed))
    initial = copy.deepcopy(task.model.state_dict())
    results = {}
    for name in task.modalities:
        task.model.load_state_dict(initial)
        optimizer = _optimizer(config, task.model)
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


# ---------------------------------------------------------------------------------------------- training
def _optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _epoch_coefficients(modulator, first_step: int) -> dict[str, float]:
    records = [r for r in modulator.history if r["step"] >= first_step] if modulator is not None else []
    if not records:
        return {}
    return {n: sum(r["coefficients"][n] for r in records) / len(records) for n in records[0]["coefficients"]}


def train(config: TrainConfig) -> dict[str, Any]:
    """Run one training job; returns the results (also written to ``out/results.json`` when ``out`` is set)."""
    config = config.resolved()
    device = _device(config.device)
    task = build_task(
        config.dataset, data_root=config.data_root, fusion=config.fusion, seed=config.seed,
        max_items=config.max_items, avdigits_options=config.avdigits,
    )
    model = task.model.to(device)
    loader_args = {"batch_size": config.batch_size, "num_workers": config.workers}
    steps_per_epoch = math.ceil(len(task.train_set) / config.batch_size)
    evaluation_loaders = {
        split: DataLoader(IndexedDataset(dataset), **loader_args)
        for split, dataset in (("val", task.val_set), ("test", task.test_set))
        if dataset is not None
    }
    out = Path(config.out) if config.out else None
    checkpoint_path = out / "checkpoint.pt" if out else None

    pdmp_ranking, pdmp_metrics = None, None
    if "ranking" in _preset_parameters(config.method):  # PDMP's first stage: rank the modalities
        pdmp_metrics = config.pdmp_metrics or unimodal_metrics(task, config, device)
        pdmp_ranking = gradmod.rank_modalities(pdmp_metrics)
    optimizer = _optimizer(config, model)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, config.lr_step, config.lr_gamma) if config.lr_step else None
    modulator = make_modulator(config, task, steps_per_epoch, pdmp_ranking)
    if modulator is not None:
        modulator.attach(optimizer)
    mm = MultimodalMixup(config.mixup_alpha, generator=torch.Generator().manual_seed(config.seed)) if config.method == "mm" else None
    bmm = BalancedMixup(task.modalities, task.num_classes, config.bmm_degree, config.bmm_warmup, seed=config.seed) if config.method == "bmm" else None
    if (mm or bmm) and task.kind != "classification":
        raise ValueError(f"{config.method} is defined for single-label classification (avdigits, cremad), not {config.dataset}")

    history: list[dict[str, Any]] = []
    first_epoch, elapsed = 0, 0.0
    if config.resume and checkpoint_path is not None and checkpoint_path.is_file():
        state = torch.load(checkpoint_path, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for obj, key in ((scheduler, "scheduler"), (modulator, "modulator"), (mm, "mixup"), (bmm, "mixup")):
            if obj is not None:
                obj.load_state_dict(state[key])
        torch.set_rng_state(state["torch_rng"])
        history, first_epoch, elapsed = state["history"], state["epoch"] + 1, state["elapsed"]

    for epoch in range(first_epoch, config.epochs):
        started = time.perf_counter()
        model.train()
        first_step = epoch * steps_per_epoch
        loader = DataLoader(task.train_set, shuffle=True, generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch), **loader_args)
        total_loss, batches = 0.0, 0
        for inputs, target in tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, disable=None if config.progress else True):
            inputs, target = {n: x.to(device) for n, x in inputs.items()}, target.to(device)
            optimizer.zero_grad(set_to_none=True)
            soft = None
            if bmm is not None:
                inputs, soft = bmm(inputs, target)
            features = model.encode(inputs)
            if mm is not None:
                features, soft = _mix_features(mm, features, target, task.num_classes)
            output = model.head(features)
            if modulator is not None:
                extra = {"features": output.features} if config.apply == "features" else {}
                modulator.observe(**observe_inputs(modulator, task, output, target), **extra)
            loss = model.loss(output, target) if soft is None else soft_cross_entropy(output.logits, soft)
            loss.backward()
            optimizer.step()
            total_loss += loss.item()
            batches += 1
        if scheduler is not None:
            scheduler.step()
        record: dict[str, Any] = {"epoch": epoch, "train_loss": total_loss / max(batches, 1)}
        if bmm is not None:
            train_eval = task.evaluate(DataLoader(IndexedDataset(task.train_set), **loader_args), device)
            bmm.update(train_eval["unimodal"])
            record["bmm"] = {"train_unimodal": train_eval["unimodal"], "kappa": bmm.kappa, "strength": bmm.strength}
        for split, split_loader in evaluation_loaders.items():
            record[split] = task.evaluate(split_loader, device)
        record["coefficients"] = _epoch_coefficients(modulator, first_step)
        elapsed += time.perf_counter() - started
        record["elapsed_s"] = elapsed
        history.append(record)
        _print_epoch(config, record)
        if checkpoint_path is not None:
            out.mkdir(parents=True, exist_ok=True)
            state = {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "history": history,
                "elapsed": elapsed, "torch_rng": torch.get_rng_state(), "config": dataclasses.asdict(config),
            }
            for obj, key in ((scheduler, "scheduler"), (modulator, "modulator"), (mm, "mixup"), (bmm, "mixup")):
                if obj is not None:
                    state[key] = obj.state_dict()
            torch.save(state, checkpoint_path)

    results = {
        "config": dataclasses.asdict(config),
        "final": history[-1]["test"],
        "selection": select_epochs(history, task.selection_metric),
        "history": history,
        "coefficients_per_step": modulator.history if modulator is not None else [],
        "pdmp": {"metrics": pdmp_metrics, "ranking": list(pdmp_ranking)} if pdmp_ranking else None,
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
    add("--alpha", type=float, default=0.8, help="OGM / OGM-GE / decoupling-free α")
    add("--gamma", type=float, default=0.1, help="DGM γ (Fu, Gao & Xu, eq. (7))")
    add("--noise", choices=("default", "none", "ge", "restore", "paper"), default="default")
    add("--gamma-p", type=float, default=1.0, help="PDMP γp (dominant modality)")
    add("--gamma-r", type=float, default=0.5, help="PDMP γr (the rest)")
    add("--pdmp-metrics", type=_metrics_arg, help="unimodal metrics, e.g. audio=0.61,visual=0.52 (default: measured)")
    add("--pdmp-budget", type=int, default=1, help="epochs of unimodal training to rank the modalities")
    add("--mixup-alpha", type=float, default=0.4, help="MM Beta(α, α)")
    add("--bmm-degree", type=float, default=1.0, help="B-MM degree β (eq. (7))")
    add("--bmm-warmup", type=int, default=1, help="B-MM warm-up epochs")
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
