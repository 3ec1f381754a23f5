"""Accuracy of every method against plain joint training on AV-digits or AV-MNIST: a documented sweep, then seeds.

Every method of `reference_models.config.METHODS` — the CLI's baseline and its ``unimodal_losses`` control, and
every method of ``gradmod.METHODS`` — is trained with `reference_models.train.train` on an embedded dataset
(``--dataset``: the generated AV-digits, or AV-MNIST's real recordings and handwriting), under one budget
(epochs, data, optimizer) per dataset (`PROFILES`). Each method runs on the head its registry entry asks for
(`fusion_for`: a ζ-gated head for the gate, the shared head for MLA; concat otherwise). The baseline is run once
per head used, and the weak modality is trained alone (``--solo``, concat head) with every seed: the reference of
the "gap closed". The control (``unimodal_losses``: the same unimodal heads as the methods that add them, the
losses simply summed) is the row a method that trains unimodal heads must beat to be credited with its own rule.

**The sweep.** Each method's main strength (``gradmod.METHODS[key].strength``) gets the same grid: its default
times its registry ``sweep`` factors (1/3, 1 and 3), trained with the first seed. ``--val-size`` items of the
training split are held out of training in every run, and the value is chosen on them, never on test (`choose`):
the value with the best held-out weak-modality accuracy among those whose held-out fused accuracy is at least the
baseline's; if none is, the best held-out fused accuracy. The other seeds then train at the chosen value (the first
seed's run is the sweep's). Methods without a strength are run at their defaults (`unswept`).

Reported per method, as mean ± sample std (n − 1) over seeds: final test accuracy of the fused model and of each
modality alone (the fused head with the other modality's features zeroed; MLA's shared head on that modality's
features), the difference to the baseline on the same head paired by seed (and to the control, for the methods with
unimodal heads), with the number of seeds where the method is ahead, the **gap closed** for the weak modality
(`gap_closed`), the imbalance ratio ``ρ = acc_dominant / acc_weak`` and the wall time. It writes
``accuracy[_<dataset>].json`` (every run, every epoch, every step's coefficients) and ``.md`` (the tables) under
``--out`` after each run, and the PNG plots under ``--plots`` at the end. ``--resume`` keeps the runs an
interrupted benchmark wrote.

    OMP_NUM_THREADS=1 python benchmarks/accuracy.py --quick     # smoke run, about 20 s
    OMP_NUM_THREADS=1 python benchmarks/accuracy.py --jobs 2 \\
        --out benchmarks/results --plots docs/benchmarks/img   # the run of docs/benchmarks/accuracy.md
    OMP_NUM_THREADS=1 python benchmarks/accuracy.py --dataset avmnist --jobs 2   # its AV-MNIST table
"""

from __future__ import annotations

import argparse
import concurrent.futures
import inspect
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import gradmod
from reference_models.data.avdigits import make_avdigits
from reference_models.config import default_fusion
from reference_models.plots import bar_chart
from reference_models.train import METHODS, TrainConfig, train

@dataclass(frozen=True)
class Profile:
    """One dataset's benchmark: which modality dominates and which is weak, the budget, the smoke run, the goal."""

    dataset: str
    title: str
    dominant: str
    weak: str
    #: epochs, ``val_size`` and the dataset's own options (its generator's sizes for AV-digits)
    budget: dict[str, Any]
    quick: dict[str, Any]
    #: the weak modality's alone accuracy the goal asks for (``None``: no goal stated)
    goal_weak: float | None
    #: the stem of the result files: ``<stem>.json``, ``<stem>.md``, ``<stem>_gap.png``, …
    stem: str


#: The benchmarks. AV-digits: clean tones dominate noisy glyphs (6 epochs of 6000 training samples, 564 SGD steps,
#: with 500 more generated and held out for the sweep; the solo visual run reaches about 80 %). AV-MNIST: the FSDD
#: training split (2,700 recordings, 270 held out for the sweep) with the dataset's SGD recipe (lr 0.01 then 0.001
#: for the last epochs, which keeps eval-mode accuracy from swinging between epochs: docs/benchmarks/accuracy.md).
PROFILES: dict[str, Profile] = {
    "avdigits": Profile(
        "avdigits", "AV-digits", "audio", "visual", {"epochs": 6, "val_size": 500, "num_train": 6500},
        {"epochs": 1, "seeds": [0], "val_size": 40, "num_train": 360, "num_test": 160}, 0.80, "accuracy",
    ),
    "avmnist": Profile(
        "avmnist", "AV-MNIST", "visual", "audio", {"epochs": 9, "val_size": 270},
        {"epochs": 1, "seeds": [0], "val_size": 20, "max_items": 200}, None, "accuracy_avmnist",
    ),
}

#: The benchmark of this run (`select`): the modules' functions read its modalities and title.
PROFILE = PROFILES["avdigits"]
DOMINANT, WEAK = PROFILE.dominant, PROFILE.weak
GOAL_WEAK = PROFILE.goal_weak


def select(dataset: str) -> Profile:
    """Make ``dataset``'s profile the one every function of this script uses (modalities, goal, titles)."""
    global PROFILE, DOMINANT, WEAK, GOAL_WEAK
    if dataset not in PROFILES:
        raise ValueError(f"unknown dataset {dataset!r}; the benchmarks: {sorted(PROFILES)}")
    PROFILE = PROFILES[dataset]
    DOMINANT, WEAK, GOAL_WEAK = PROFILE.dominant, PROFILE.weak, PROFILE.goal_weak
    return PROFILE


#: The CLI's control: the same unimodal heads as the methods that add them, the losses summed.
CONTROL = "unimodal_losses"
DEFAULT_HEAD = "concat"
#: Each swept method's strength keyword, from the registry.
SWEPT = {key: info.strength.keyword for key, info in gradmod.METHODS.items() if info.strength is not None}


#: Options whose defaults assume the papers' long schedules (50–100 epochs), scaled to the few epochs of these
#: budgets so that the methods act at all, in every run of the method (documented on the accuracy page): OPM's and
#: valuation's warm-ups (6 and 5 epochs, longer than or as long as AV-digits' whole run), Diagnosing &
#: Re-learning's diagnosis every 20 epochs (never within 9), ReconBoost's 4 + 4 epochs per stage (one member only
#: within 9; BalanceBenchmark's 1 + 1).
SCALED: dict[str, dict[str, Any]] = {
    "opm": {"warmup_epochs": 1},
    "valuation": {"warmup_epochs": 1},
    "relearning": {"reinit_every": 2},
    "reconboost": {"boost_epochs": 1, "correct_epochs": 1},
}
#: Strength keywords renamed since runs were stored (``--resume`` reads them under the new names).
RENAMED_OPTIONS = {("dgm", "gamma"): "alpha", ("agm", "alpha"): "sharpness", ("mla", "alpha"): "regularization",
                   ("mm", "mixup_alpha"): "concentration", ("bmm", "bmm_degree"): "degree"}


def unswept() -> dict[str, str]:
    """The methods run at their defaults, and why."""
    reasons = {"baseline": "no method", CONTROL: "the control: no strength"}
    reasons.update({
        key: f"{info.title} has no strength to set" for key, info in gradmod.METHODS.items() if info.strength is None
    })
    return reasons


UNSWEPT = unswept()


# ------------------------------------------------------------------------------------------ the plan
def fusion_for(method: str) -> str:
    """The fusion head ``method`` runs on (`reference_models.config.default_fusion`)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    return default_fusion(method)


def reference_head(method: str) -> str:
    """The head of the baseline a method is compared with: its own (`fusion_for`), or the concat baseline's for
    a method that *is* the head (MMCosine: the head is what it changes)."""
    info = gradmod.METHODS.get(method)
    return DEFAULT_HEAD if info is not None and info.kind == "head" else fusion_for(method)


def run_key(method: str, fusion: str, solo: str | None = None) -> str:
    """Row name: the method, the head spelled out for the baselines (one per head), or the solo run."""
    if solo is not None:
        return f"solo ({solo})"
    return f"baseline ({fusion})" if method == "baseline" else method


def base_specs(methods: Sequence[str], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """The runs that do not depend on the sweep: per seed, the baseline on every head the selected methods
    use, the weak modality alone, and the methods without a strength."""
    if not methods:
        raise ValueError("no methods selected")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; expected names from {METHODS}")
    missing = [m for m in methods if m not in SWEPT and m not in UNSWEPT]
    if missing:
        raise ValueError(f"methods {missing} are in neither SWEPT nor UNSWEPT: say what their sweep varies")
    heads = dict.fromkeys([DEFAULT_HEAD, *(fusion_for(m) for m in methods if gradmod.METHODS.get(m) is None
                                          or gradmod.METHODS[m].kind != "head")])
    specs = []
    for seed in seeds:
        specs += [spec("baseline", head, seed) for head in heads]
        specs.append(spec("baseline", DEFAULT_HEAD, seed, solo=WEAK))
        specs += [spec(m, fusion_for(m), seed) for m in dict.fromkeys(methods) if m in UNSWEPT and m != "baseline"]
    return specs


def spec(method: str, fusion: str, seed: int, *, option: str | None = None, value: float | None = None,
         solo: str | None = None) -> dict[str, Any]:
    """One training run: method, head, seed, and the swept option's value (``None``: the CLI's default)."""
    return {"method": method, "fusion": fusion, "seed": seed, "option": option, "value": value, "solo": solo}


def default_strength(method: str, option: str) -> float:
    """The value the training CLI uses for ``method``'s strength ``option`` when it is not set (its registry default)."""
    strength = gradmod.METHODS[method].strength
    if strength is None or strength.keyword != option:
        raise ValueError(f"{method}'s strength is not {option!r}")
    return float(strength.default)


def sweep_values(method: str) -> list[float]:
    """The grid of ``method``'s strength: its default times each factor of its registry ``sweep``, rounded to 4
    significant digits."""
    center = default_strength(method, SWEPT[method])
    return [float(f"{center * factor:.4g}") for factor in gradmod.METHODS[method].sweep]


def sweep_specs(methods: Sequence[str], seed: int) -> list[dict[str, Any]]:
    """The sweep: every swept method at every value of its grid, with ``seed``."""
    return [
        spec(m, fusion_for(m), seed, option=SWEPT[m], value=value)
        for m in dict.fromkeys(methods) if m in SWEPT for value in sweep_values(m)
    ]


def choose(candidates: Sequence[Mapping[str, Any]], baseline: Mapping[str, Any]) -> Mapping[str, Any]:
    """The sweep's choice among runs of one method and seed, on the held-out (val) split only.

    Among the runs whose held-out fused accuracy is at least the baseline's (same seed, same head), the
    one with the best held-out weak-modality accuracy; if there is none, the one with the best held-out
    fused accuracy. Ties go to the earlier run of ``candidates`` (the grid's order).
    """
    if not candidates:
        raise ValueError("choose() needs at least one candidate run")
    floor = baseline["val"]["accuracy"]
    keeping = [run for run in candidates if run["val"]["accuracy"] >= floor]
    if keeping:
        return max(keeping, key=lambda run: run["val"]["unimodal"][WEAK])
    return max(candidates, key=lambda run: run["val"]["accuracy"])


# ------------------------------------------------------------------------------------------ one run
def gap_closed(joint: float, baseline: float, solo: float) -> float | None:
    """The share of the weak modality's gap that a method closed: ``(joint − baseline) / (solo − baseline)``.

    ``joint``: the weak modality's alone accuracy after the method's joint training; ``baseline``: after
    plain joint training; ``solo``: after training it alone. 0 is the baseline, 1 the solo accuracy,
    negative a method that widened the gap. ``None`` (undefined) when the solo run is not above the baseline.
    """
    for name, value in (("joint", joint), ("baseline", baseline), ("solo", solo)):
        if not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise ValueError(f"{name} accuracy must be a finite number, got {value!r}")
    if solo <= baseline:
        return None
    return (joint - baseline) / (solo - baseline)


def imbalance_ratio(unimodal: Mapping[str, float]) -> float | None:
    """``ρ = acc_dominant / acc_weak`` of one evaluation (the test-set analogue of B-MM's κ, Ma, Ding & Chen,
    2025, eq. (5)); ``None`` (undefined) when the weak modality's accuracy is zero."""
    for name in (DOMINANT, WEAK):
        if name not in unimodal:
            raise ValueError(f"unimodal accuracies lack {name!r}: got {sorted(unimodal)}")
    weak = unimodal[WEAK]
    return unimodal[DOMINANT] / weak if weak > 0 else None


def _scores(evaluation: Mapping[str, Any]) -> dict[str, Any]:
    return {"accuracy": evaluation["accuracy"], "unimodal": evaluation["unimodal"]}


#: The keys every epoch record of `reference_models.train.train` has; a method's own entries are the others.
_STANDARD_RECORD = ("epoch", "train_loss", "test", "val", "coefficients", "elapsed_s")


def summarize_run(run: Mapping[str, Any], results: Mapping[str, Any], total_s: float) -> dict[str, Any]:
    """The compact record of one training run that the JSON keeps."""
    epochs = [
        {
            "epoch": r["epoch"] + 1,
            "train_loss": r["train_loss"],
            "accuracy": r["test"]["accuracy"],
            "unimodal": r["test"]["unimodal"],
            "imbalance_ratio": imbalance_ratio(r["test"]["unimodal"]),
            "mean_coefficients": r["coefficients"],
            **{key: value for key, value in r.items() if key not in _STANDARD_RECORD},
        }
        for r in results["history"]
    ]
    ratios = [e["imbalance_ratio"] for e in epochs if e["imbalance_ratio"] is not None]
    last = results["history"][-1]
    return {
        **run,
        "key": run_key(run["method"], run["fusion"], run["solo"]),
        "options": results["method"]["options"],
        "accuracy": results["final"]["accuracy"],
        "macro_f1": results["final"]["macro_f1"],
        "unimodal": results["final"]["unimodal"],
        "val": _scores(last["val"]) if "val" in last else None,
        "imbalance_ratio_final": epochs[-1]["imbalance_ratio"],
        "imbalance_ratio_mean": statistics.fmean(ratios) if ratios else None,
        "train_s": results["wall_time_s"],
        "total_s": total_s,
        "pdmp": results["pdmp"],
        "epochs": epochs,
        "coefficients_per_step": [{"step": r["step"], **r["coefficients"]} for r in results["coefficients_per_step"]],
    }


def config_for(run: Mapping[str, Any], epochs: int, dataset: Mapping[str, Any], val_size: int, device: str) -> TrainConfig:
    """The `TrainConfig` of one run (``dataset`` holds the dataset's options and, for smoke runs, ``max_items``)."""
    options = dict(dataset)
    max_items = options.pop("max_items", None)
    return TrainConfig(
        dataset=PROFILE.dataset, method=run["method"], fusion=run["fusion"], epochs=epochs, seed=run["seed"],
        solo=run["solo"], val_size=val_size, dataset_options=options, max_items=max_items, device=device,
        progress=False, strength=None if run["option"] is None else run["value"], options=dict(SCALED.get(run["method"], {})),
    )


def train_one(job: tuple[str, dict[str, Any], int, dict[str, Any], int, str, int]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train one run (in a worker process under ``--jobs``); returns its summary and its resolved config."""
    profile, run, epochs, dataset, val_size, device, threads = job
    select(profile)
    torch.set_num_threads(threads)
    started = time.perf_counter()
    results = train(config_for(run, epochs, dataset, val_size, device))
    return summarize_run(run, results, time.perf_counter() - started), results["config"]


def identity(run: Mapping[str, Any]) -> tuple:
    """What makes two runs the same run (under one budget)."""
    return (run["method"], run["fusion"], run["seed"], run["option"], run["value"], run["solo"])


# ------------------------------------------------------------------------------------------ statistics
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1; 0 for a single value)."""
    if not values:
        raise ValueError("mean_std of no values")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _defined(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None]


def runs_by_key(runs: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Runs grouped by row name (method, baseline per head, solo), in the order they ran."""
    grouped: dict[str, list[Mapping[str, Any]]] = {}
    for run in runs:
        grouped.setdefault(run["key"], []).append(run)
    return grouped


def final_runs(runs: Sequence[Mapping[str, Any]], chosen: Mapping[str, float]) -> list[Mapping[str, Any]]:
    """The runs the results table reports: every unswept run, and each swept method's runs at its chosen value."""
    return [run for run in runs if run["option"] is None or chosen.get(run["method"]) == run["value"]]


def summarize(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per method (in run order): means ± stds over seeds, the paired difference to the baseline on the
    same head (``method − baseline`` per seed), and the weak modality's gap closed (`gap_closed`) per seed
    against the concat baseline and the solo run of that seed."""
    by_key = runs_by_key(runs)
    reference = {r["seed"]: r for r in by_key.get(run_key("baseline", DEFAULT_HEAD), [])}
    solo = {r["seed"]: r for r in by_key.get(run_key("baseline", DEFAULT_HEAD, WEAK), [])}
    rows = []
    for key, group in by_key.items():
        fusion = group[0]["fusion"]
        row: dict[str, Any] = {
            "name": key,
            "method": group[0]["method"],
            "fusion": fusion,
            "option": group[0]["option"],
            "value": group[0]["value"],
            "seeds": [r["seed"] for r in group],
            "fused": mean_std([r["accuracy"] for r in group]),
            "macro_f1": mean_std([r["macro_f1"] for r in group]),
            DOMINANT: mean_std([r["unimodal"][DOMINANT] for r in group]),
            WEAK: mean_std([r["unimodal"][WEAK] for r in group]),
            "train_s": mean_std([r["train_s"] for r in group]),
            "total_s": mean_std([r["total_s"] for r in group]),
        }
        for field in ("imbalance_ratio_mean", "imbalance_ratio_final"):
            defined = _defined(r[field] for r in group)
            row[field] = mean_std(defined) if defined else None
        references = {"delta": run_key("baseline", fusion if group[0]["method"] == "baseline" else reference_head(group[0]["method"]))}
        info = gradmod.METHODS.get(group[0]["method"])
        if info is not None and info.fit.head == "unimodal heads":
            references["control"] = run_key(CONTROL, DEFAULT_HEAD)
        for prefix, reference_key in references.items():
            against = {r["seed"]: r for r in by_key.get(reference_key, [])}
            paired = [(r, against[r["seed"]]) for r in group if r["seed"] in against]
            if group[0]["method"] != "baseline" and group[0]["solo"] is None and paired:
                for label, read in (("fused", lambda r: r["accuracy"]), (WEAK, lambda r: r["unimodal"][WEAK])):
                    deltas = [read(r) - read(b) for r, b in paired]
                    row[f"{prefix}_{label}"] = mean_std(deltas)
                    row[f"{_wins(prefix)}_{label}"] = [sum(d > 0 for d in deltas), len(deltas)]
        gaps = _defined(
            gap_closed(r["unimodal"][WEAK], reference[r["seed"]]["unimodal"][WEAK], solo[r["seed"]]["unimodal"][WEAK])
            for r in group if r["seed"] in reference and r["seed"] in solo
        )
        row["gap_closed"] = mean_std(gaps) if gaps else None
        rows.append(row)
    return rows


#: The final epochs whose steadiness `stability` reports (the epochs a method is compared on).
STEADY_EPOCHS = 3


def largest_swing(run: Mapping[str, Any], first: int, last: int) -> dict[str, float]:
    """The largest change of the fused and the weak modality's test accuracy between consecutive epochs among
    epochs ``first``..``last`` (1-based, inclusive) of one run."""
    epochs = [e for e in run["epochs"] if first <= e["epoch"] <= last]
    if len(epochs) < 2:
        raise ValueError(f"epochs {first}..{last} hold fewer than two records")
    pairs = list(zip(epochs, epochs[1:]))
    return {
        "fused": max(abs(b["accuracy"] - a["accuracy"]) for a, b in pairs),
        WEAK: max(abs(b["unimodal"][WEAK] - a["unimodal"][WEAK]) for a, b in pairs),
    }


def stability(runs: Sequence[Mapping[str, Any]], epochs: int, lr_step: int | None) -> dict[str, dict[str, float]]:
    """Whether the recipe's eval-mode accuracy holds still where the methods are compared: for the concat
    baseline's runs, the mean over seeds of `largest_swing` over the last `STEADY_EPOCHS` epochs (``"final"``),
    and before the learning rate decays (``"before_decay"``: epochs 1..``lr_step``, or the whole run)."""
    baselines = [r for r in runs if r["key"] == run_key("baseline", DEFAULT_HEAD)]
    if not baselines:
        raise ValueError("no concat baseline run to measure the recipe's stability on")
    windows = {"before_decay": (1, lr_step or epochs), "final": (max(1, epochs - STEADY_EPOCHS + 1), epochs)}
    return {
        name: {key: statistics.fmean(largest_swing(r, *window)[key] for r in baselines) for key in ("fused", WEAK)}
        for name, window in windows.items()
    }


def stability_line(steady: Mapping[str, Mapping[str, float]], decays: bool) -> str:
    """The report's sentence on `stability`."""
    return (
        f"Stability (baseline, concat; the largest change between consecutive epochs, mean over seeds): fused "
        f"{100 * steady['final']['fused']:.1f} and {WEAK} alone {100 * steady['final'][WEAK]:.1f} points over the "
        f"last {STEADY_EPOCHS} epochs, against {100 * steady['before_decay']['fused']:.1f} and "
        f"{100 * steady['before_decay'][WEAK]:.1f} points " + ("before the learning rate decays." if decays else "over the whole run.")
    )


def goal_rows(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The methods that meet the goal: mean weak-alone accuracy ≥ `GOAL_WEAK` and mean fused accuracy at or
    above the concat baseline's (plain joint training)."""
    reference = next((r for r in rows if r["name"] == run_key("baseline", DEFAULT_HEAD)), None)
    if reference is None or GOAL_WEAK is None:
        return []
    return [
        r["name"] for r in rows
        if r["method"] != "baseline" and r[WEAK][0] >= GOAL_WEAK and r["fused"][0] >= reference["fused"][0]
    ]


def sweep_table(runs: Sequence[Mapping[str, Any]], chosen: Mapping[str, float], seed: int) -> list[dict[str, Any]]:
    """Per swept method and value (the sweep's ``seed``): held-out fused and weak accuracy, whether it was
    chosen, and the held-out fused accuracy of the baseline on the method's head (the choice's floor)."""
    floors = {run["fusion"]: run["val"]["accuracy"] for run in runs
              if run["key"] == run_key("baseline", run["fusion"]) and run["seed"] == seed}
    return [
        {
            "method": run["method"], "option": run["option"], "value": run["value"], "val": run["val"],
            "chosen": chosen.get(run["method"]) == run["value"], "baseline_fused": floors.get(run["fusion"]),
        }
        for run in runs if run["option"] is not None and run["seed"] == seed
    ]


# ------------------------------------------------------------------------------------------ output
def _pct(pair: Sequence[float] | None, signed: bool = False) -> str:
    if pair is None:
        return "—"
    mean, std = pair
    return f"{100 * mean:{'+' if signed else ''}.1f} ± {100 * std:.1f}"


def _plain(pair: Sequence[float] | None, digits: int) -> str:
    return "—" if pair is None else f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def _wins(prefix: str) -> str:
    """The key stem of the seeds-ahead counts of a difference (``wins_`` for the baseline's, ``control_wins_``)."""
    return "wins" if prefix == "delta" else f"{prefix}_wins"


def _delta(row: Mapping[str, Any], label: str, prefix: str = "delta") -> str:
    if f"{prefix}_{label}" not in row:
        return "—"
    wins, total = row[f"{_wins(prefix)}_{label}"]
    return f"{_pct(row[f'{prefix}_{label}'], signed=True)} ({wins}/{total})"


def _setting(row: Mapping[str, Any]) -> str:
    return "default" if row["option"] is None else f"{row['option']} = {row['value']:g}"


def markdown_tables(rows: Sequence[Mapping[str, Any]], sweep: Sequence[Mapping[str, Any]]) -> str:
    """The results: accuracies and gap closed, differences to the baseline, and the sweep."""
    lines = [
        f"| method | head | setting | fused acc. | {DOMINANT} alone | {WEAK} alone | gap closed | time (s) |",
        "|" + " --- |" * 8,
    ]
    for row in rows:
        cells = [row["name"], row["fusion"], _setting(row), _pct(row["fused"]), _pct(row[DOMINANT]), _pct(row[WEAK]),
                 _plain(row["gap_closed"], 2), _plain(row["total_s"], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"| method | Δ fused vs baseline | Δ {WEAK} vs baseline | Δ {WEAK} vs control | ρ mean over epochs | ρ final |",
        "|" + " --- |" * 6,
    ]
    for row in rows:
        cells = [row["name"], _delta(row, "fused"), _delta(row, WEAK), _delta(row, WEAK, "control"),
                 _plain(row["imbalance_ratio_mean"], 2), _plain(row["imbalance_ratio_final"], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    if sweep:
        lines += ["", f"| method | value | held-out fused | held-out {WEAK} alone | chosen |", "|" + " --- |" * 5]
        for entry in sweep:
            val = entry["val"]
            cells = [entry["method"], f"{entry['option']} = {entry['value']:g}", f"{100 * val['accuracy']:.1f}",
                     f"{100 * val['unimodal'][WEAK]:.1f}", "yes" if entry["chosen"] else ""]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _grids(grid: Mapping[str, Sequence[float]] | Sequence[float]) -> str:
    """The sweep's factors: one grid for every method (older results), or the common one and the exceptions."""
    if not isinstance(grid, Mapping):
        return str([round(f, 4) for f in grid])
    counts: dict[tuple[float, ...], list[str]] = {}
    for method, factors in grid.items():
        counts.setdefault(tuple(round(f, 4) for f in factors), []).append(method)
    common = max(counts, key=lambda factors: len(counts[factors]))
    others = [f"{', '.join(methods)} {list(factors)}" for factors, methods in counts.items() if factors != common]
    return str(list(common)) + (f" ({'; '.join(others)})" if others else "")


def markdown_report(meta: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], sweep: Sequence[Mapping[str, Any]]) -> str:
    """``accuracy.md``: the command, the budget, the machine, the goal's verdict, the recipe's stability and the
    tables."""
    budget = meta["budget"]
    machine = meta["machine"]
    steady = meta.get("stability")
    steadiness = "" if steady is None else stability_line(steady, bool(budget.get("lr_step")))
    met = goal_rows(rows)
    verdict = (
        f"met by {', '.join(met)}" if met else "not met by any method"
    )
    return "\n".join([
        f"# {PROFILE.title} accuracy benchmark (measured)",
        "",
        f"Command: `{meta['command']}`" + "".join(f"; tables and plots rewritten by `{c}`" for c in meta.get("rewritten_by", [])),
        "",
        (f"Budget: {budget['epochs']} epochs, seeds {budget['seeds']}, {PROFILE.title} {budget['dataset']}, "
        f"{budget['val_size']} training items held out for the sweep; {budget['optimizer']} lr {budget['lr']}, "
        f"batch {budget['batch_size']}. Sweep: each method's strength × {_grids(budget['grid'])} on seed "
        f"{budget['seeds'][0]}, chosen on the held-out items."),
        "",
        (f"Machine: {machine['cpu']} ({machine['cpu_count']} logical CPUs, {budget['jobs']} parallel runs of "
        f"{budget['threads']} torch thread(s)), torch {machine['torch']}, device {machine['device']}, "
        f"{machine['platform']}. Wall time: {meta.get('elapsed_s', 0.0):.0f} s for {meta.get('runs_done', 0)} runs."),
        "",
        (f"Goal ({WEAK} alone ≥ {100 * GOAL_WEAK:.0f} % with fused accuracy at or above the concat baseline): "
        f"{verdict}." if GOAL_WEAK is not None else f"Goal: none stated; the gap closed measures how far each method "
        f"brings the {WEAK} branch towards its solo run."),
        "",
        *([steadiness, ""] if steadiness else []),
        markdown_tables(rows, sweep),
        "",
        (f"Accuracies in % (test set), mean ± sample std over seeds. Gap "
        f"closed: ({WEAK} alone − baseline (concat)) / (solo − baseline (concat)) per seed. Δ: method − baseline "
        f"on the same head, paired by seed, with (seeds where the method is ahead / seeds). ρ = {DOMINANT} alone / "
        f"{WEAK} alone (test accuracy), per epoch. Held-out: the {budget['val_size']} held-out training items, "
        "first seed, after the last epoch. Δ control: method − the unimodal_losses control (the same unimodal heads, "
        "losses summed), for the methods that train unimodal heads. Time: a run's wall time, what it trains before its "
        "first epoch included (ReconBoost's and UMT's unimodal models, PDMP's ranking runs; the epochs alone are "
        f"`train_s` in {PROFILE.stem}.json)."),
        "",
    ])


#: What every run shares, read back from the first run's resolved `TrainConfig`.
SHARED_TRAINING = ("epochs", "optimizer", "lr", "momentum", "weight_decay", "batch_size", "lr_step", "val_size")


def budget_record(resolved: Mapping[str, Any], args: argparse.Namespace, dataset: Mapping[str, Any]) -> dict[str, Any]:
    """The budget every run shares: seeds, dataset, optimizer settings, parallelism."""
    return {
        "seeds": list(args.seeds),
        "dataset": dataset_options(dataset),
        **{k: resolved[k] for k in SHARED_TRAINING},
        "grid": {m: list(gradmod.METHODS[m].sweep) for m in dict.fromkeys(args.methods) if m in SWEPT},
        "jobs": args.jobs,
        "threads": args.threads,
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
        "torch": torch.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def dataset_options(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The dataset's effective options: AV-digits' generator's keyword arguments (`make_avdigits`'s defaults with
    ``overrides``), AV-MNIST's knobs as given (all off by default)."""
    if PROFILE.dataset != "avdigits":
        return dict(overrides)
    defaults = {
        name: p.default for name, p in inspect.signature(make_avdigits).parameters.items()
        if p.default is not inspect.Parameter.empty and name != "seed"
    }
    return {**defaults, **overrides}


# ------------------------------------------------------------------------------------------ plots
def _seed_mean(series: Sequence[Sequence[float | None]]) -> list[float]:
    """Element-wise mean over seeds of equally long series (undefined entries skipped; NaN if all are)."""
    return [statistics.fmean(_defined(values)) if _defined(values) else math.nan for values in zip(*series)]


def goal_gap(runs: Sequence[Mapping[str, Any]]) -> float | None:
    """The gap closed that `GOAL_WEAK` means, mean over seeds (``None`` without baseline and solo runs)."""
    by_key = runs_by_key(runs)
    reference = {r["seed"]: r["unimodal"][WEAK] for r in by_key.get(run_key("baseline", DEFAULT_HEAD), [])}
    solo = {r["seed"]: r["unimodal"][WEAK] for r in by_key.get(run_key("baseline", DEFAULT_HEAD, WEAK), [])}
    if GOAL_WEAK is None:
        return None
    gaps = _defined(gap_closed(GOAL_WEAK, reference[s], solo[s]) for s in reference if s in solo)
    return statistics.fmean(gaps) if gaps else None


#: Bar colours of the gap plot: matplotlib's cycle without its grey, which marks a fused accuracy below the baseline.
COLORS = [f"C{i}" for i in range(10) if i != 7]


def plot_gap(rows: Sequence[Mapping[str, Any]], runs: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Horizontal bars, largest first: the weak modality's gap closed per method (mean ± std over seeds);
    hatched where the fused accuracy is below the concat baseline's; lines at the goal and at solo."""
    # the concat baseline is 0 and the solo run 1 by definition: drawn as lines, not bars
    shown = [r for r in rows if r["gap_closed"] is not None and (r["method"] != "baseline" or r["fusion"] != DEFAULT_HEAD)]
    shown.sort(key=lambda r: -r["gap_closed"][0])
    reference = next((r for r in rows if r["name"] == run_key("baseline", DEFAULT_HEAD)), None)
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(shown) + 1.9))
    for index, row in enumerate(shown):
        below = reference is not None and row["fused"][0] < reference["fused"][0]
        mean, std = row["gap_closed"]
        ax.barh(index, mean, xerr=std, capsize=3, color="0.75" if below else COLORS[index % len(COLORS)],
                hatch="//" if below else None, edgecolor="black", linewidth=0.5)
        ax.text(max(mean + std, 0.0) + 0.04, index, f"{mean:.2f} ({100 * row[WEAK][0]:.0f} %)", va="center", fontsize=8)
    ax.set_yticks(range(len(shown)), [f"{r['name']} ({_setting(r)})" if r["option"] else r["name"] for r in shown])
    ax.invert_yaxis()
    ax.axvline(0.0, color="black", lw=0.8)
    ax.axvline(1.0, color="grey", ls=":", lw=1.2, label=f"solo: the {WEAK} branch trained alone")
    target = goal_gap(runs)
    if target is not None:
        ax.axvline(target, color="red", ls="--", lw=1.0, label=f"goal: {WEAK} alone ≥ {100 * GOAL_WEAK:.0f} %")
    ax.set_xlim(min(-0.5, ax.get_xlim()[0]), max(2.0, ax.get_xlim()[1]))
    ax.set_xlabel(f"gap closed = ({WEAK} alone − baseline) / (solo − baseline); label: gap ({WEAK} alone)")
    ax.set_title(f"{PROFILE.title}: share of the {WEAK} gap each method closes, mean ± std over seeds\n"
                 "grey, hatched: fused accuracy below the baseline's", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _panel_grid(count: int, most_columns: int, panel: tuple[float, float]) -> tuple[plt.Figure, list[plt.Axes]]:
    """A figure of ``count`` panels of size ``panel`` (inches), at most ``most_columns`` per row; spare cells hidden."""
    columns = min(most_columns, count)
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(panel[0] * columns, panel[1] * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_axis_off()
    return fig, list(axes.flat[:count])


def plot_sweep(sweep: Sequence[Mapping[str, Any]], path: Path) -> bool:
    """Per swept method: held-out fused and weak accuracy against the value (log scale), the choice ringed.
    Returns ``False`` (no file) without a sweep."""
    methods = list(dict.fromkeys(entry["method"] for entry in sweep))
    if not methods:
        return False
    fig, axes = _panel_grid(len(methods), 5, (3.2, 2.8))
    for ax, method in zip(axes, methods):
        entries = [e for e in sweep if e["method"] == method]
        values = [e["value"] for e in entries]
        for index, (label, read) in enumerate((("fused", lambda v: v["accuracy"]), (f"{WEAK} alone", lambda v: v["unimodal"][WEAK]))):
            ax.plot(values, [100 * read(e["val"]) for e in entries], "o-", color=f"C{index}", label=label)
            ax.plot([e["value"] for e in entries if e["chosen"]], [100 * read(e["val"]) for e in entries if e["chosen"]],
                    "o", ms=11, mfc="none", color="black")
        floor = entries[0]["baseline_fused"]
        if floor is not None:
            ax.axhline(100 * floor, color="C0", ls="--", lw=0.8, label="baseline fused")
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(values, [f"{v:g}" for v in values])
        ax.set_title(f"{method}: {entries[0]['option']}", fontsize=9)
        ax.set_ylabel("held-out accuracy (%)", fontsize=8)
    axes[0].legend(fontsize=7)
    fig.suptitle("the sweep: held-out accuracy against each value (first seed; ringed: chosen; dashed: the "
                 "baseline's held-out fused accuracy)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_accuracy(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Grouped bars: fused and unimodal test accuracy per method, mean ± std over seeds."""
    keys = ["fused", f"{DOMINANT} alone", f"{WEAK} alone"]
    bars = [{"name": r["name"], keys[0]: r["fused"], keys[1]: r[DOMINANT], keys[2]: r[WEAK]} for r in rows]
    bar_chart(bars, path, keys, f"{PROFILE.title}: final test accuracy (mean ± std over seeds)")


def plot_epochs(runs: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Per epoch, mean over seeds: fused accuracy, weak-modality accuracy and the imbalance ratio ρ."""
    panels = (
        ("fused test accuracy", lambda e: e["accuracy"]),
        (f"{WEAK} alone: test accuracy", lambda e: e["unimodal"][WEAK]),
        (f"ρ = {DOMINANT} / {WEAK}", lambda e: e["imbalance_ratio"]),
    )
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for index, (key, group) in enumerate(runs_by_key(runs).items()):
        epochs = [e["epoch"] for e in group[0]["epochs"]]
        dashes = "--" if group[0]["method"] == "baseline" else "-"
        for ax, (_, read) in zip(axes, panels):
            curve = _seed_mean([[read(e) for e in run["epochs"]] for run in group])
            ax.plot(epochs, curve, dashes, color=f"C{index % 10}", marker="o", ms=3, label=key)
    for ax, (title, _) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel("epoch")
    axes[0].legend(fontsize=7, ncol=2)
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
    if any(c[name] > 1.5 for r in group for c in r["coefficients_per_step"] for name in (DOMINANT, WEAK)):
        ax.set_yscale("log")


def _bmm_panel(ax: plt.Axes, group: Sequence[Mapping[str, Any]]) -> None:
    """B-MM's imbalance factor κ per modality (smoothed training-set accuracies, after each epoch) and the
    mixing strength λ it sets for the next epoch, mean over seeds."""
    epochs = [e["epoch"] for e in group[0]["epochs"]]
    for index, name in enumerate((DOMINANT, WEAK)):
        kappa = _seed_mean([[e["bmm"]["kappa"].get(name) for e in r["epochs"]] for r in group])
        ax.plot(epochs, kappa, "o-", color=f"C{index}", label=f"κ {name}")
    strength = _seed_mean([[e["bmm"]["strength"] for e in r["epochs"]] for r in group])
    ax.plot(epochs, strength, "s-", color="black", label="mixing strength λ (next epoch)")
    ax.set_xlabel("epoch (κ measured after it)")


def _weights(epoch: Mapping[str, Any]) -> dict[str, float]:
    """G-Blending's loss weights estimated at the start of an epoch (empty before the first estimate)."""
    return epoch.get("gblending", {}).get("weights", {})


def _weights_panel(ax: plt.Axes, group: Sequence[Mapping[str, Any]]) -> None:
    """G-Blending's loss weight of every head per epoch (after its estimate), mean over seeds."""
    epochs = [e["epoch"] for e in group[0]["epochs"]]
    heads = next((list(_weights(e)) for e in group[0]["epochs"] if _weights(e)), [])
    for index, head in enumerate(heads):
        weights = _seed_mean([[_weights(e).get(head) for e in r["epochs"]] for r in group])
        ax.plot(epochs, weights, "o-", color=f"C{index}", label=f"w {head}")
    ax.set_xlabel("epoch (the weights estimated at its start)")


def _panel(group: Sequence[Mapping[str, Any]]) -> Callable[[plt.Axes, Sequence[Mapping[str, Any]]], None] | None:
    first = group[0]
    if first["coefficients_per_step"]:
        return _coefficient_panel
    if first["epochs"] and "bmm" in first["epochs"][0]:
        return _bmm_panel
    if any(_weights(e) for e in first["epochs"]):
        return _weights_panel
    return None


def plot_coefficients(runs: Sequence[Mapping[str, Any]], path: Path) -> bool:
    """One panel per method with coefficients: per step for the modulators (AGM's on a log scale when they
    exceed 1.5), κ and the mixing strength per epoch for B-MM, the loss weights per epoch for G-Blending.
    Returns ``False`` (no file) when no selected method has any."""
    groups = {k: g for k, g in runs_by_key(runs).items() if _panel(g) is not None}
    if not groups:
        return False
    fig, axes = _panel_grid(len(groups), 3, (4.6, 3.6))
    for ax, (key, group) in zip(axes, groups.items()):
        _panel(group)(ax, group)
        ax.set_title(key)
        ax.legend(fontsize=7)
    fig.suptitle("modulation coefficients, B-MM's κ, G-Blending's weights (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------ CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=[m for m in METHODS if m != "baseline"],
                        default=[m for m in METHODS if m != "baseline"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--dataset", choices=tuple(PROFILES), default="avdigits")
    parser.add_argument("--epochs", type=int, help="default: the dataset's budget (PROFILES)")
    parser.add_argument("--num-train", type=int, help="AV-digits train size (with the held-out items)")
    parser.add_argument("--num-test", type=int, help="AV-digits test size (default: make_avdigits's)")
    parser.add_argument("--val-size", type=int, help="training items held out for the sweep's choice")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false", help="every method at its default")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained in parallel (processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--resume", action="store_true", help="keep the runs of the --out JSON made with this budget")
    parser.add_argument("--out", type=Path, help="folder for the JSON and markdown results (default: benchmarks/results)")
    parser.add_argument("--plots", type=Path, help="folder for the PNG plots (default: docs/benchmarks/img)")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 1 epoch, seed 0, tiny data, no sweep, output in a temp folder"
    )
    args = parser.parse_args(argv)
    profile = select(args.dataset)
    repo = Path(__file__).resolve().parents[1]
    plan = dict(profile.quick if args.quick else profile.budget)
    if args.quick:
        scratch = Path(tempfile.gettempdir()) / "gradmod_accuracy_quick"
        args.seeds, args.sweep = plan.pop("seeds"), False
        args.out, args.plots = args.out or scratch, args.plots or scratch
    args.max_items = plan.pop("max_items", None)
    for key in ("epochs", "val_size"):
        value = plan.pop(key)
        if getattr(args, key) is None or args.quick:
            setattr(args, key, value)
    args.dataset_options = plan
    for key in ("num_train", "num_test"):
        if getattr(args, key) is not None:
            if args.dataset != "avdigits":
                parser.error(f"--{key.replace('_', '-')} sizes the generated AV-digits, not {args.dataset}")
            args.dataset_options[key] = getattr(args, key)
    args.out = args.out or repo / "benchmarks" / "results"
    args.plots = args.plots or repo / "docs" / "benchmarks" / "img"
    if args.epochs < 1 or args.jobs < 1 or args.threads < 1:
        parser.error("--epochs, --jobs and --threads must be >= 1")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct, got {args.seeds}")
    return args


def _renamed(run: dict[str, Any]) -> dict[str, Any]:
    """A stored run with its strength under its current keyword (`RENAMED_OPTIONS`)."""
    option = RENAMED_OPTIONS.get((run["method"], run["option"]), run["option"])
    return {**run, "option": option}


class Benchmark:
    """The runs of one invocation: trains what is missing (in ``jobs`` processes), writes after every run."""

    def __init__(self, args: argparse.Namespace, argv: Sequence[str] | None) -> None:
        self.args = args
        self.dataset = dict(args.dataset_options)
        if args.max_items is not None:
            self.dataset["max_items"] = args.max_items
        self.command = " ".join(["python", "benchmarks/accuracy.py", *(sys.argv[1:] if argv is None else argv)])
        self.meta: dict[str, Any] = {"command": self.command, "machine": machine_info()}
        self.runs: list[dict[str, Any]] = []
        self.chosen: dict[str, float] = {}
        self.started = time.perf_counter()
        self.earlier_s = 0.0
        if args.resume:
            self._load()

    def _load(self) -> None:
        path = self.args.out / f"{PROFILE.stem}.json"
        if not path.is_file():
            return
        stored = json.loads(path.read_text())
        budget = stored.get("budget", {})
        same = (budget.get("epochs"), budget.get("dataset"), budget.get("val_size")) == (
            self.args.epochs, dataset_options(self.dataset), self.args.val_size)
        if same:
            self.meta["command"] = stored["command"]
            self.meta["rewritten_by"] = list(dict.fromkeys([*stored.get("rewritten_by", []), self.command]))
            self.runs = [_renamed(run) for run in stored["runs"]]
            self.earlier_s = stored.get("elapsed_s", 0.0)
            self.meta["budget"] = {**budget, "seeds": list(self.args.seeds)}  # jobs and threads: those of the training
            print(f"[accuracy] resuming: {len(self.runs)} runs kept from {path}", flush=True)

    def execute(self, specs: Sequence[dict[str, Any]]) -> None:
        done = {identity(run) for run in self.runs}
        todo = [s for s in specs if identity(s) not in done]
        jobs = [
            (PROFILE.dataset, s, self.args.epochs, self.dataset, self.args.val_size, self.args.device, self.args.threads)
            for s in todo
        ]
        if self.args.jobs == 1:
            for job in jobs:
                self._record(*train_one(job))
            return
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(self.args.jobs, mp_context=context) as pool:
            for future in concurrent.futures.as_completed([pool.submit(train_one, job) for job in jobs]):
                self._record(*future.result())

    def _record(self, run: dict[str, Any], resolved: Mapping[str, Any]) -> None:
        self.runs.append(run)
        self.meta.setdefault("budget", budget_record(resolved, self.args, self.dataset))
        self.write()
        value = "" if run["option"] is None else f" {run['option']}={run['value']:g}"
        print(f"[accuracy] {run['key']}{value} seed {run['seed']}: fused {run['accuracy']:.3f} {WEAK} "
              f"{run['unimodal'][WEAK]:.3f} ({self.elapsed():.0f} s so far)", flush=True)

    def elapsed(self) -> float:
        return self.earlier_s + time.perf_counter() - self.started

    def choose_all(self) -> None:
        """The sweep's choice per swept method (`choose`), from the first seed's runs."""
        seed = self.args.seeds[0]
        for method in self.args.methods:
            if method not in SWEPT:
                continue
            candidates = [r for r in self.runs if r["method"] == method and r["seed"] == seed and r["option"] is not None]
            candidates.sort(key=lambda r: sweep_values(method).index(r["value"]))
            baseline = next(r for r in self.runs if r["key"] == run_key("baseline", reference_head(method)) and r["seed"] == seed)
            self.chosen[method] = choose(candidates, baseline)["value"]

    def rows(self) -> list[dict[str, Any]]:
        return summarize(final_runs(self.runs, self.chosen))

    def write(self) -> None:
        rows = self.rows()
        sweep = sweep_table(self.runs, self.chosen, self.args.seeds[0])
        self.meta.update(elapsed_s=self.elapsed(), runs_done=len(self.runs), chosen=self.chosen, goal_met_by=goal_rows(rows))
        budget = self.meta.get("budget")
        decay = (budget or {}).get("lr_step") or 0
        if budget is not None and min(budget["epochs"], decay or budget["epochs"]) >= 2 and any(
            r["key"] == run_key("baseline", DEFAULT_HEAD) for r in self.runs
        ):
            self.meta["stability"] = stability(self.runs, budget["epochs"], budget.get("lr_step"))
        record = {**self.meta, "summary": rows, "sweep": sweep, "runs": self.runs}
        (self.args.out / f"{PROFILE.stem}.json").write_text(json.dumps(record, indent=1))
        (self.args.out / f"{PROFILE.stem}.md").write_text(markdown_report(self.meta, rows, sweep))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.plots.mkdir(parents=True, exist_ok=True)
    bench = Benchmark(args, argv)
    seeds = args.seeds
    if args.sweep:
        # the sweep and every run that does not depend on it, then the other seeds at the chosen values
        bench.execute(base_specs(args.methods, seeds) + sweep_specs(args.methods, seeds[0]))
        bench.choose_all()
        bench.execute([
            spec(m, fusion_for(m), seed, option=SWEPT[m], value=bench.chosen[m])
            for seed in seeds[1:] for m in dict.fromkeys(args.methods) if m in SWEPT
        ])
    else:
        bench.execute(base_specs(args.methods, seeds) + [
            spec(m, fusion_for(m), seed) for seed in seeds for m in dict.fromkeys(args.methods) if m in SWEPT
        ])
    bench.write()
    rows = bench.rows()
    final = final_runs(bench.runs, bench.chosen)
    sweep = sweep_table(bench.runs, bench.chosen, seeds[0])
    stem = PROFILE.stem
    plot_gap(rows, final, args.plots / f"{stem}_gap.png")
    plot_accuracy(rows, args.plots / f"{stem}.png")
    plot_epochs(final, args.plots / f"{stem}_epochs.png")
    plot_coefficients(final, args.plots / f"{stem}_coefficients.png")
    plot_sweep(sweep, args.plots / f"{stem}_sweep.png")
    print(markdown_tables(rows, sweep))
    print(f"wrote {args.out / f'{stem}.json'}, {args.out / f'{stem}.md'} and plots under {args.plots}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
