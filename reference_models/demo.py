"""The main job: on real spoken and handwritten digits (the embedded AV-MNIST), show the imbalance and what a method
does about it, print the comparison and plot it.

``python -m reference_models.demo [--dataset avmnist|avdigits] [--method KEY] [--epochs N] [--seed S] [--out DIR]``
(``make demo``). Four runs share the data, the initialisation and every hyper-parameter (the dataset's recipe,
`reference_models.config.DATASET_DEFAULTS`): each modality trained alone (``--solo``), plain joint training, and
joint training with the method that the accuracy benchmark found best on this dataset (`best_method`: the largest
gap closed for the weak modality among the methods that keep the baseline's fused accuracy, read from
``benchmarks/results/``). Two runs train at a time, one torch thread each.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import gradmod
from reference_models.config import TrainConfig

__all__ = ["RESULTS", "best_method", "comparison_lines", "main"]

#: The accuracy benchmark's results per dataset (benchmarks/accuracy.py writes them).
RESULTS = {
    "avmnist": Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "accuracy_avmnist.json",
    "avdigits": Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "accuracy.json",
}
#: The method of the demo when no benchmark result says otherwise.
FALLBACK_METHOD = "ogm_ge"
#: The modalities of both embedded datasets.
MODALITIES = ("audio", "visual")


def best_method(path: Path) -> tuple[str, float | None, str]:
    """The benchmark's best method on a dataset: ``(key, its chosen strength or None, why)``.

    Among the rows of ``path`` (`benchmarks/accuracy.py`'s JSON) that are gradmod methods and whose mean fused
    accuracy is at least the concat baseline's, the one with the largest mean gap closed for the weak modality.
    `FALLBACK_METHOD` (with a reason saying so) when the file does not exist or no method qualifies.
    """
    if not path.is_file():
        return FALLBACK_METHOD, None, f"{path.name} not found: the accuracy benchmark has not run on this dataset"
    stored = json.loads(path.read_text())
    rows = {row["name"]: row for row in stored["summary"]}
    baseline = rows.get("baseline (concat)")
    candidates = [
        row for row in rows.values()
        if row["method"] in gradmod.METHODS and row.get("gap_closed") is not None
        and baseline is not None and row["fused"][0] >= baseline["fused"][0]
    ]
    if not candidates:
        return FALLBACK_METHOD, None, f"no method of {path.name} keeps the baseline's fused accuracy"
    best = max(candidates, key=lambda row: row["gap_closed"][0])
    why = (
        f"the benchmark's best on this data ({path.name}): gap closed {best['gap_closed'][0]:.2f} "
        f"with fused accuracy {100 * best['fused'][0]:.1f} % over seeds {best['seeds']}"
    )
    return best["method"], best["value"], why


def _train(job: tuple[dict[str, Any], bool]) -> dict[str, Any]:
    """One run in a worker process: one torch thread."""
    from reference_models.train import train

    options, progress = job
    torch.set_num_threads(1)
    return train(TrainConfig(**options, progress=progress))


def comparison_lines(results: Mapping[str, Mapping[str, Any]], modalities: Sequence[str]) -> list[str]:
    """The table the demo prints: fused accuracy, each modality alone, and the solo reference per modality."""
    solo = {name: results[f"{name} trained alone"]["final"]["unimodal"][name] for name in modalities}
    width = max(len("run"), *map(len, results))
    header = f"{'run':<{width}} {'fused acc':>9} " + " ".join(f"{m + ' alone':>13}" for m in modalities) + f" {'time (s)':>9}"
    lines = [header, "-" * len(header)]
    for name, result in results.items():
        final = result["final"]
        line = f"{name:<{width}} {final['accuracy']:>9.3f} " + " ".join(f"{final['unimodal'][m]:>13.3f}" for m in modalities)
        lines.append(line + f" {result['setup_s'] + result['wall_time_s']:>9.1f}")
    joint = results["joint training (baseline)"]["final"]["unimodal"]
    change = ", ".join(f"{m} {100 * (joint[m] - solo[m]):+.1f}" for m in modalities)
    lines.append("time: the run's wall time, what it trains before its first epoch included")
    lines.append(f"\neach modality alone after joint training, against its solo run (points): {change}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reference_models.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=tuple(RESULTS), default="avmnist")
    parser.add_argument("--method", choices=tuple(gradmod.METHODS), help="default: the benchmark's best on the dataset")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the dataset's recipe)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at a time (processes, one thread each)")
    parser.add_argument("--out", default="results/demo", help="output folder (JSON, PNG)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    if args.method is None:
        method, strength, why = best_method(RESULTS[args.dataset])
    else:
        method, strength, why = args.method, None, "chosen with --method"
    out = Path(args.out)
    info = gradmod.METHODS[method]
    if info.fit.head in ("shared", "gate"):
        parser.error(f"the demo compares runs on the concat head; {info.title} needs another head: pick another --method")
    shared = {"dataset": args.dataset, "epochs": args.epochs, "seed": args.seed}
    runs = {f"{name} trained alone": (f"solo_{name}", {"method": "baseline", "solo": name}) for name in MODALITIES}
    runs["joint training (baseline)"] = ("baseline", {"method": "baseline"})
    runs[f"joint training + {info.title}"] = (method, {"method": method, "strength": strength})
    print(f"== {args.dataset}: {', '.join(runs)} ==\n{info.title}: {why}", flush=True)
    jobs = [({**shared, **options, "out": str(out / folder)}, False) for folder, options in runs.values()]
    if args.jobs == 1:
        finished = [_train(job) for job in jobs]
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
            # the longest runs first (the method's, which may train unimodal models before its first epoch,
            # then the joint baseline), so that the solo runs fill the other worker
            finished = list(pool.map(_train, jobs[::-1]))[::-1]
    results = dict(zip(runs, finished))
    print(f"\n{args.dataset} test accuracy (alone = the fused head with the other modality's features zeroed)")
    print("\n".join(comparison_lines(results, MODALITIES)))
    from reference_models.plots import plot_comparison

    out.mkdir(parents=True, exist_ok=True)
    plot_comparison(results, out / "comparison.png")
    summary = {
        name: {"final": r["final"], "setup_s": r["setup_s"], "wall_time_s": r["wall_time_s"], "config": r["config"]}
        for name, r in results.items()
    }
    (out / "comparison.json").write_text(json.dumps({"method": method, "why": why, "runs": summary}, indent=2))
    print(f"\nwrote {out / 'comparison.png'} and {out / 'comparison.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
