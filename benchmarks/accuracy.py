"""Accuracy of every gradmod method against plain joint training on AV-digits, over seeds, under one budget.

Every method of `reference_models.train.METHODS` is trained with `reference_models.train.train`
on the embedded AV-digits dataset, once per seed, with the same epochs, data, optimizer and the CLI's
default hyper-parameters (nothing is tuned per method). ``decoupling_free`` needs a ζ-gated head
(``fusion="gated"``); every other method uses the concat head. The baseline is run once per head the
selected methods use, so each method is compared with joint training on its own head.

Reported per method, as mean ± sample std (n − 1) over seeds: final test accuracy of the fused model and
of each modality alone (the fused head with the other modality's features zeroed), the difference to the
baseline on the same head paired by seed (same data, same initialisation) with the number of seeds where
the method is ahead, the imbalance ratio ``ρ = acc_audio / acc_visual`` of the test unimodal accuracies
(per epoch; its mean over epochs and its final value) and the wall time. It writes ``accuracy.json``
(every run, every epoch, every step's coefficients) and ``accuracy.md`` (the table) under ``--out``,
after each run, and the PNG plots under ``--plots``.

    OMP_NUM_THREADS=1 python benchmarks/accuracy.py --quick     # smoke run, < 1 min
    OMP_NUM_THREADS=1 python benchmarks/accuracy.py --seeds 0 1 2 --epochs 6 --num-train 3000 \\
        --out benchmarks/results --plots docs/benchmarks/img   # the run of docs/benchmarks/accuracy.md
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from reference_models.data.avdigits import make_avdigits  # noqa: E402
from reference_models.plots import bar_chart  # noqa: E402
from reference_models.train import METHODS, TrainConfig, train  # noqa: E402

#: The modality AV-digits makes dominant (clean tones) and the weak one (noisy glyphs); ρ = dominant / weak.
DOMINANT, WEAK = "audio", "visual"
#: Methods whose measure needs a ζ-gated head; the others run on the decouplable concat head.
GATED_METHODS = {"decoupling_free": "gated"}
DEFAULT_HEAD = "concat"
#: The documented budget (docs/benchmarks/accuracy.md): 6 epochs of 3000 training samples (282 SGD steps) per
#: run, which keeps 9 runs × 3 seeds near 25 minutes on 2 shared CPU cores; the test split keeps its default size.
BUDGET = {"epochs": 6, "num_train": 3000}
#: The smoke run of ``--quick``: 1 epoch, 1 seed, a tiny dataset.
QUICK = {"epochs": 1, "seeds": [0], "num_train": 320, "num_test": 160}


# ------------------------------------------------------------------------------------------ the runs
def fusion_for(method: str) -> str:
    """The fusion head ``method`` runs on: a ζ-gated head for decoupling-free, concat otherwise."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    return GATED_METHODS.get(method, DEFAULT_HEAD)


def run_plan(methods: Sequence[str]) -> list[tuple[str, str]]:
    """``(method, fusion)`` pairs to train: each method on its head, plus the baseline on every head used."""
    if not methods:
        raise ValueError("no methods selected")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; expected names from {METHODS}")
    plan = [("baseline", head) for head in dict.fromkeys(fusion_for(m) for m in methods)]
    plan += [(m, fusion_for(m)) for m in dict.fromkeys(methods) if m != "baseline"]
    return plan


def run_key(method: str, fusion: str) -> str:
    """Row name: the method, with the head spelled out for the baselines (one per head)."""
    return f"baseline ({fusion})" if method == "baseline" else method


def imbalance_ratio(unimodal: Mapping[str, float]) -> float | None:
    """``ρ = acc_dominant / acc_weak`` of one evaluation (the test-set analogue of paper 001's κ, eq. (5));
    ``None`` (undefined) when the weak modality's accuracy is zero."""
    for name in (DOMINANT, WEAK):
        if name not in unimodal:
            raise ValueError(f"unimodal accuracies lack {name!r}: got {sorted(unimodal)}")
    weak = unimodal[WEAK]
    return unimodal[DOMINANT] / weak if weak > 0 else None


def summarize_run(method: str, fusion: str, seed: int, results: Mapping[str, Any], total_s: float) -> dict[str, Any]:
    """The compact record of one training run that the JSON keeps."""
    epochs = [
        {
            "epoch": r["epoch"] + 1,
            "train_loss": r["train_loss"],
            "accuracy": r["test"]["accuracy"],
            "unimodal": r["test"]["unimodal"],
            "imbalance_ratio": imbalance_ratio(r["test"]["unimodal"]),
            "mean_coefficients": r["coefficients"],
            **({"bmm": r["bmm"]} if "bmm" in r else {}),
        }
        for r in results["history"]
    ]
    ratios = [e["imbalance_ratio"] for e in epochs if e["imbalance_ratio"] is not None]
    return {
        "key": run_key(method, fusion),
        "method": method,
        "fusion": fusion,
        "seed": seed,
        "accuracy": results["final"]["accuracy"],
        "macro_f1": results["final"]["macro_f1"],
        "unimodal": results["final"]["unimodal"],
        "imbalance_ratio_final": epochs[-1]["imbalance_ratio"],
        "imbalance_ratio_mean": statistics.fmean(ratios) if ratios else None,
        "train_s": results["wall_time_s"],
        "total_s": total_s,
        "pdmp": results["pdmp"],
        "epochs": epochs,
        "coefficients_per_step": [{"step": r["step"], **r["coefficients"]} for r in results["coefficients_per_step"]],
    }


# ------------------------------------------------------------------------------------------ statistics
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1; 0 for a single value)."""
    if not values:
        raise ValueError("mean_std of no values")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _defined(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None]


def runs_by_key(runs: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Runs grouped by row name (method, or baseline per head), in the order they ran."""
    grouped: dict[str, list[Mapping[str, Any]]] = {}
    for run in runs:
        grouped.setdefault(run["key"], []).append(run)
    return grouped


def summarize(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per method (in run order): means ± stds over seeds, and the paired difference to the
    baseline on the same head (``method − baseline`` per seed, over the seeds both have)."""
    by_key = runs_by_key(runs)
    rows = []
    for key, group in by_key.items():
        fusion = group[0]["fusion"]
        row: dict[str, Any] = {
            "name": key,
            "method": group[0]["method"],
            "fusion": fusion,
            "seeds": [r["seed"] for r in group],
            "fused": mean_std([r["accuracy"] for r in group]),
            "macro_f1": mean_std([r["macro_f1"] for r in group]),
            DOMINANT: mean_std([r["unimodal"][DOMINANT] for r in group]),
            WEAK: mean_std([r["unimodal"][WEAK] for r in group]),
            "train_s": mean_std([r["train_s"] for r in group]),
            "total_s": mean_std([r["total_s"] for r in group]),
        }
        for field in ("imbalance_ratio_mean", "imbalance_ratio_final"):
            defined = _defined([r[field] for r in group])
            row[field] = mean_std(defined) if defined else None
        baseline = {r["seed"]: r for r in by_key.get(run_key("baseline", fusion), [])}
        paired = [(r, baseline[r["seed"]]) for r in group if r["seed"] in baseline]
        if group[0]["method"] != "baseline" and paired:
            for label, read in (("fused", lambda r: r["accuracy"]), (WEAK, lambda r: r["unimodal"][WEAK])):
                deltas = [read(r) - read(b) for r, b in paired]
                row[f"delta_{label}"] = mean_std(deltas)
                row[f"wins_{label}"] = [sum(d > 0 for d in deltas), len(deltas)]
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ output
def _pct(pair: Sequence[float] | None, signed: bool = False) -> str:
    if pair is None:
        return "—"
    mean, std = pair
    return f"{100 * mean:{'+' if signed else ''}.1f} ± {100 * std:.1f}"


def _plain(pair: Sequence[float] | None, digits: int) -> str:
    return "—" if pair is None else f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def _delta(row: Mapping[str, Any], label: str) -> str:
    if f"delta_{label}" not in row:
        return "—"
    wins, total = row[f"wins_{label}"]
    return f"{_pct(row[f'delta_{label}'], signed=True)} ({wins}/{total})"


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The results table: accuracies in %, mean ± std over seeds; Δ paired by seed with (seeds ahead / seeds)."""
    header = (
        f"| method | head | fused acc. | {DOMINANT} alone | {WEAK} alone | Δ fused vs baseline | Δ {WEAK} vs baseline "
        f"| ρ mean over epochs | ρ final | train time (s) |"
    )
    lines = [header, "|" + " --- |" * 10]
    for row in rows:
        cells = [
            row["name"], row["fusion"], _pct(row["fused"]), _pct(row[DOMINANT]), _pct(row[WEAK]),
            _delta(row, "fused"), _delta(row, WEAK), _plain(row["imbalance_ratio_mean"], 2),
            _plain(row["imbalance_ratio_final"], 2), _plain(row["train_s"], 0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(meta: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str:
    """``accuracy.md``: the command, the budget, the machine and the table."""
    budget = meta["budget"]
    machine = meta["machine"]
    return "\n".join([
        "# AV-digits accuracy benchmark (measured)",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Budget: {budget['epochs']} epochs, seeds {budget['seeds']}, AV-digits {budget['dataset']}; "
        f"{budget['optimizer']} lr {budget['lr']}, batch {budget['batch_size']}; CLI-default hyper-parameters "
        "for every method (no per-method tuning).",
        "",
        f"Machine: {machine['cpu']} ({machine['cpu_count']} logical CPUs, {machine['torch_threads']} torch threads), "
        f"torch {machine['torch']}, device {machine['device']}, {machine['platform']}.",
        "",
        markdown_table(rows),
        "",
        f"Accuracies in % (test set, {budget['dataset']['num_test']} samples), mean ± sample std over seeds. "
        f"Δ: method − baseline on the same head, paired by seed, with (seeds where the method is ahead / seeds). "
        f"ρ = {DOMINANT} alone / {WEAK} alone (test accuracy), per epoch. Train time: the epochs' wall time "
        "(PDMP's unimodal ranking stage and data generation excluded; see `total_s` in accuracy.json).",
        "",
    ])


#: What every run shares, read back from the first run's resolved `TrainConfig`.
SHARED_TRAINING = ("epochs", "optimizer", "lr", "momentum", "weight_decay", "batch_size", "lr_step")
SHARED_HYPER_PARAMETERS = (
    "alpha", "gamma", "gamma_p", "gamma_r", "pdmp_budget", "mixup_alpha", "bmm_degree", "bmm_warmup",
    "apply", "param_filter", "noise", "modulation_start", "modulation_end",
)


def budget_record(resolved: Mapping[str, Any], seeds: Sequence[int], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The budget every run shares: seeds, dataset, optimizer settings and every method's hyper-parameters."""
    return {
        "seeds": list(seeds),
        "dataset": dataset_options(overrides),
        **{k: resolved[k] for k in SHARED_TRAINING},
        "hyper_parameters": {k: resolved[k] for k in SHARED_HYPER_PARAMETERS},
    }


def machine_info() -> dict[str, Any]:
    """Where the numbers were measured."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        lines = cpuinfo.read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def dataset_options(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The generator's effective keyword arguments: `make_avdigits`'s defaults with ``overrides``."""
    defaults = {
        name: p.default for name, p in inspect.signature(make_avdigits).parameters.items()
        if p.default is not inspect.Parameter.empty and name != "seed"
    }
    return {**defaults, **overrides}


# ------------------------------------------------------------------------------------------ plots
def _seed_mean(series: Sequence[Sequence[float | None]]) -> list[float]:
    """Element-wise mean over seeds of equally long series (undefined entries skipped; NaN if all are)."""
    return [statistics.fmean(_defined(values)) if _defined(values) else math.nan for values in zip(*series)]


def plot_accuracy(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Grouped bars: fused and unimodal test accuracy per method, mean ± std over seeds."""
    keys = ["fused", f"{DOMINANT} alone", f"{WEAK} alone"]
    bars = [{"name": r["name"], keys[0]: r["fused"], keys[1]: r[DOMINANT], keys[2]: r[WEAK]} for r in rows]
    bar_chart(bars, path, keys, "AV-digits: final test accuracy (mean ± std over seeds)")


def plot_epochs(runs: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Per epoch, mean over seeds: fused accuracy, weak-modality accuracy and the imbalance ratio ρ."""
    panels = (
        ("fused test accuracy", lambda e: e["accuracy"]),
        (f"{WEAK} alone: test accuracy", lambda e: e["unimodal"][WEAK]),
        (f"ρ = {DOMINANT} / {WEAK}", lambda e: e["imbalance_ratio"]),
    )
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for index, (key, group) in enumerate(runs_by_key(runs).items()):
        epochs = [e["epoch"] for e in group[0]["epochs"]]
        dashes = "--" if group[0]["method"] == "baseline" else "-"
        for ax, (_, read) in zip(axes, panels):
            curve = _seed_mean([[read(e) for e in run["epochs"]] for run in group])
            ax.plot(epochs, curve, dashes, color=f"C{index % 10}", marker="o", ms=3, label=key)
    for ax, (title, _) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel("epoch")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _coefficient_panel(ax: plt.Axes, group: Sequence[Mapping[str, Any]]) -> None:
    """Each modality's coefficient per optimizer step, mean over seeds."""
    length = min(len(r["coefficients_per_step"]) for r in group)
    steps = [c["step"] for c in group[0]["coefficients_per_step"][:length]]
    for index, name in enumerate((DOMINANT, WEAK)):
        curves = [[c[name] for c in r["coefficients_per_step"][:length]] for r in group]
        ax.plot(steps, _seed_mean(curves), color=f"C{index}", lw=0.7, label=f"k {name}")
    ax.set_xlabel("optimizer step")


def _bmm_panel(ax: plt.Axes, group: Sequence[Mapping[str, Any]]) -> None:
    """B-MM's imbalance factor κ per modality (training set, after each epoch) and the mixing strength λ
    it sets for the next epoch, mean over seeds."""
    epochs = [e["epoch"] for e in group[0]["epochs"]]
    for index, name in enumerate((DOMINANT, WEAK)):
        kappa = _seed_mean([[e["bmm"]["kappa"].get(name) for e in r["epochs"]] for r in group])
        ax.plot(epochs, kappa, "o-", color=f"C{index}", label=f"κ {name}")
    strength = _seed_mean([[e["bmm"]["strength"] for e in r["epochs"]] for r in group])
    ax.plot(epochs, strength, "s-", color="black", label="mixing strength λ (next epoch)")
    ax.set_xlabel("epoch (κ measured after it)")


def plot_coefficients(runs: Sequence[Mapping[str, Any]], path: Path) -> bool:
    """One panel per gradient method (coefficients per step, mean over seeds) and one for B-MM (κ and
    mixing strength per epoch). Returns ``False`` (no file) when no selected method has coefficients."""
    groups = {k: g for k, g in runs_by_key(runs).items() if g[0]["coefficients_per_step"] or g[0]["method"] == "bmm"}
    if not groups:
        return False
    columns = min(3, len(groups))
    rows = math.ceil(len(groups) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(groups):]:
        ax.set_axis_off()
    for ax, (key, group) in zip(axes.flat, groups.items()):
        (_bmm_panel if group[0]["method"] == "bmm" else _coefficient_panel)(ax, group)
        ax.set_title(key)
        ax.legend(fontsize=7)
    fig.suptitle("modulation coefficients (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------ CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=BUDGET["epochs"])
    parser.add_argument("--num-train", type=int, default=BUDGET["num_train"], help="AV-digits train size")
    parser.add_argument("--num-test", type=int, help="AV-digits test size (default: make_avdigits's)")
    parser.add_argument("--out", type=Path, help="folder for accuracy.json and accuracy.md (default: benchmarks/results)")
    parser.add_argument("--plots", type=Path, help="folder for the PNG plots (default: docs/benchmarks/img)")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 1 epoch, seed 0, 320/160 samples, output in a temp folder"
    )
    args = parser.parse_args(argv)
    repo = Path(__file__).resolve().parents[1]
    if args.quick:
        scratch = Path(tempfile.gettempdir()) / "gradmod_accuracy_quick"
        args.epochs, args.seeds = QUICK["epochs"], QUICK["seeds"]
        args.num_train, args.num_test = QUICK["num_train"], QUICK["num_test"]
        args.out, args.plots = args.out or scratch, args.plots or scratch
    args.out = args.out or repo / "benchmarks" / "results"
    args.plots = args.plots or repo / "docs" / "benchmarks" / "img"
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct, got {args.seeds}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {k: v for k, v in (("num_train", args.num_train), ("num_test", args.num_test)) if v is not None}
    plan = run_plan(args.methods)
    args.out.mkdir(parents=True, exist_ok=True)
    args.plots.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/accuracy.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine_info(),
        "plan": [run_key(m, f) for m, f in plan],
    }
    runs: list[dict[str, Any]] = []
    started = time.perf_counter()
    # seeds outermost: an interrupted benchmark still holds every method for the seeds it finished
    for seed in args.seeds:
        for method, fusion in plan:
            config = TrainConfig(
                dataset="avdigits", method=method, fusion=fusion, epochs=args.epochs, seed=seed,
                avdigits=overrides, device=args.device, progress=False,
            )
            run_started = time.perf_counter()
            results = train(config)
            runs.append(summarize_run(method, fusion, seed, results, time.perf_counter() - run_started))
            meta.setdefault("budget", budget_record(results["config"], args.seeds, overrides))
            rows = summarize(runs)
            meta["elapsed_s"] = time.perf_counter() - started
            (args.out / "accuracy.json").write_text(json.dumps({**meta, "summary": rows, "runs": runs}, indent=1))
            (args.out / "accuracy.md").write_text(markdown_report(meta, rows))
            print(f"[accuracy] {run_key(method, fusion)} seed {seed}: fused {runs[-1]['accuracy']:.3f} "
                  f"{WEAK} {runs[-1]['unimodal'][WEAK]:.3f} ({meta['elapsed_s']:.0f} s so far)", flush=True)
    rows = summarize(runs)
    plot_accuracy(rows, args.plots / "accuracy.png")
    plot_epochs(runs, args.plots / "accuracy_epochs.png")
    plot_coefficients(runs, args.plots / "accuracy_coefficients.png")
    print(markdown_table(rows))
    print(f"wrote {args.out / 'accuracy.json'}, {args.out / 'accuracy.md'} and plots under {args.plots}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
