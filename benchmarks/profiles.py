"""The imbalance profiles that `gradmod.diagnose` compares a model with: writes ``gradmod/diagnose/benchmarks.json``.

For every dataset of ``benchmarks/accuracy.py`` whose results exist (``benchmarks/results/<stem>.json``):

* **the profile** of the plain joint baseline (concat head): the weak modality's masked accuracy after joint
  training and after training it alone (the benchmark's solo runs), mean over seeds, and their gap; and the
  modality that the batch score ratio calls dominant, with its mean ρ over the last epoch — read by a
  `gradmod.diagnose.Monitor` on a replay of the benchmark's seed-0 baseline run
  (`reference_models.diagnose.train_monitored`: the monitor changes no gradient, so the replay is that run; its
  test accuracy is checked against the stored one);
* **the baseline**'s fused and weak accuracy, and **each method**'s (at the sweep's choice), with its lift of the
  weak modality over the baseline paired by seed; mean ± sample std over the seeds.

::

    python benchmarks/profiles.py                 # every dataset with results (one replayed run each)
    python benchmarks/profiles.py --dataset avmnist
    python benchmarks/profiles.py --dataset avmnist --keep-batch-profile   # new accuracies, no replay
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gradmod  # noqa: E402
from benchmarks import accuracy  # noqa: E402
from gradmod.diagnose import validate_benchmarks  # noqa: E402
from reference_models.diagnose import train_monitored  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TARGET = ROOT / "gradmod" / "diagnose" / "benchmarks.json"
SCHEMA = 1


def statistic(values: Sequence[float]) -> dict[str, float | None]:
    """``{"mean", "std"}``: the sample standard deviation, ``None`` for one value."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None}


def batch_profile(monitor_epochs: Sequence[Mapping[str, Any]]) -> tuple[str, float]:
    """The modality with the largest mean score ratio over the monitor's last epoch, and that ratio."""
    if not monitor_epochs or not monitor_epochs[-1].get("ratios"):
        raise ValueError("the monitor recorded no score ratio: the baseline's head gave no decoupled logits")
    ratios = monitor_epochs[-1]["ratios"]
    dominant = max(ratios, key=ratios.get)
    return dominant, float(ratios[dominant])


def dataset_entry(stored: Mapping[str, Any], profile: accuracy.Profile, batch: tuple[str, float],
                  modalities: Sequence[str]) -> dict[str, Any]:
    """One dataset's record of the schema (`gradmod.diagnose.benchmarks`) from the accuracy benchmark's stored
    results ``stored`` and the replayed baseline's ``batch`` profile (`batch_profile`: dominant modality, ρ)."""
    accuracy.select(profile.dataset)
    weak = profile.weak
    runs = accuracy.final_runs(stored["runs"], stored.get("chosen", {}))
    by_key = accuracy.runs_by_key(runs)
    baseline = {r["seed"]: r for r in by_key.get(accuracy.run_key("baseline", accuracy.DEFAULT_HEAD), [])}
    solo = {r["seed"]: r for r in by_key.get(accuracy.run_key("baseline", accuracy.DEFAULT_HEAD, weak), [])}
    seeds = sorted(set(baseline) & set(solo))
    if not seeds:
        raise ValueError(f"{profile.stem}.json has no seed with both the concat baseline and the {weak} solo run")
    joint = statistics.fmean(baseline[s]["unimodal"][weak] for s in seeds)
    alone = statistics.fmean(solo[s]["unimodal"][weak] for s in seeds)
    dominant, ratio = batch
    methods = {}
    for key, group in by_key.items():
        if key not in gradmod.METHODS:
            continue
        paired = [r for r in group if r["seed"] in baseline]
        if not paired:
            continue
        methods[key] = {
            "fused": statistic([r["accuracy"] for r in paired]),
            "weak": statistic([r["unimodal"][weak] for r in paired]),
            "lift": statistic([r["unimodal"][weak] - baseline[r["seed"]]["unimodal"][weak] for r in paired]),
        }
    budget = stored["budget"]
    return {
        "measured": True,
        "modalities": list(modalities),
        "seeds": len(seeds),
        "budget": f"{budget['epochs']} epoch{'s' if budget['epochs'] != 1 else ''}, {budget['optimizer']} "
                  f"lr {budget['lr']:g}, batch {budget['batch_size']}",
        "profile": {
            "batch_dominant": dominant, "batch_ratio": ratio, "under_trained": weak, "basis": "masked",
            "joint": joint, "solo": alone, "gap": alone - joint,
        },
        "baseline": {
            "fused": statistic([baseline[s]["accuracy"] for s in seeds]),
            "weak": statistic([baseline[s]["unimodal"][weak] for s in seeds]),
        },
        "methods": methods,
    }


def replay_baseline(stored: Mapping[str, Any], profile: accuracy.Profile) -> tuple[list[dict[str, Any]], tuple[str, ...]]:
    """The benchmark's seed-0 concat baseline, trained again with a monitor: its epochs and the modalities. Raises
    if the replay's test accuracy is not the stored run's (then the replay is another run)."""
    accuracy.select(profile.dataset)
    budget = stored["budget"]
    seed = stored["budget"]["seeds"][0]
    spec = accuracy.spec("baseline", accuracy.DEFAULT_HEAD, seed)
    stored_run = next(r for r in stored["runs"] if accuracy.identity(r) == accuracy.identity(spec))
    config = accuracy.config_for(spec, budget["epochs"], budget["dataset"], budget["val_size"], "cpu")
    torch.set_num_threads(budget["threads"])  # the benchmark's threads per run: the same arithmetic
    task, loop, results = train_monitored(config)
    if results["final"]["accuracy"] != stored_run["accuracy"]:
        raise RuntimeError(
            f"the replayed baseline reached {results['final']['accuracy']:.4f}, the stored run "
            f"{stored_run['accuracy']:.4f}: not the same run (another machine or torch version?)"
        )
    return loop.monitor.epochs, tuple(task.modalities)


def write(datasets: Mapping[str, Mapping[str, Any]], path: Path = TARGET) -> dict[str, Any]:
    """Merge ``datasets`` into the file at ``path`` (the other datasets kept), check it and write it."""
    current = json.loads(path.read_text()) if path.is_file() else {"datasets": {}}
    merged = {name: entry for name, entry in current.get("datasets", {}).items() if entry.get("measured")}
    merged.update(datasets)
    data = {
        "schema": SCHEMA,
        "measured": bool(merged),
        "note": "Written by benchmarks/profiles.py from benchmarks/accuracy.py's results; "
                "gradmod.diagnose.benchmarks documents the schema.",
        "datasets": merged,
    }
    validate_benchmarks(data)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return data


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=sorted(accuracy.PROFILES), action="append",
                        help="a dataset to profile (repeatable; default: every one with results)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the accuracy benchmark's results folder")
    parser.add_argument("--out", type=Path, default=TARGET)
    parser.add_argument("--keep-batch-profile", action="store_true",
                        help="refresh the accuracies from the results but keep the batch profile the file holds (a replay "
                             "on another machine can differ from the stored run in the last bits)")
    args = parser.parse_args(argv)
    current = json.loads(args.out.read_text())["datasets"] if args.out.is_file() else {}
    entries = {}
    for name in args.dataset or sorted(accuracy.PROFILES):
        profile = accuracy.PROFILES[name]
        path = args.results / f"{profile.stem}.json"
        if not path.is_file():
            print(f"[profiles] {name}: no {path.name}, skipped")
            continue
        stored = json.loads(path.read_text())
        if args.keep_batch_profile and name in current:
            kept = current[name]
            batch = (kept["profile"]["batch_dominant"], kept["profile"]["batch_ratio"])
            modalities = tuple(kept["modalities"])
        else:
            epochs, modalities = replay_baseline(stored, profile)
            batch = batch_profile(epochs)
        entries[name] = dataset_entry(stored, profile, batch, modalities)
        entry = entries[name]["profile"]
        print(f"[profiles] {name}: batch ratio calls {entry['batch_dominant']} dominant (ρ = {entry['batch_ratio']:.2f}); "
              f"{entry['under_trained']} {entry['joint']:.3f} joint against {entry['solo']:.3f} alone")
    write(entries, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
