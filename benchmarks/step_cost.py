"""What every method costs per training step and per epoch, against plain joint training, on a reference model.

Every method of `reference_models.config.METHODS` — the CLI's baseline and its ``unimodal_losses`` control, and
every method of ``gradmod.METHODS`` — is built as `reference_models.train.prepare` builds a run (the dataset's
model and recipe, the head the method runs on, the options the accuracy benchmark scales to short runs), and
trained on the same batches, in the same rounds, interleaved, so that load drifting between rounds affects them
alike. A second baseline (``baseline (again)``) is timed like a method: its ratio to the first is the noise of the
measurement. Each round is one epoch of every method: its ``start_epoch``, ``--steps`` training steps, its
``end_epoch``; an untimed epoch 0 comes first (warm-ups end there: the options of `benchmarks.accuracy.SCALED`).

Reported per method, each ratio against the baseline on the method's reference head
(`benchmarks.accuracy.reference_head`) in the same round:

* **step ×** — the mean time of a training step (forward, the method's backward and step), the median over
  ``--rounds`` rounds;
* **epoch work ×** — the method's own work between epochs (``start_epoch`` + ``end_epoch``: prototypes,
  valuations, held-out estimates, diagnoses), as a multiple of a plain epoch's training steps
  (the run's full epoch: steps per epoch × the plain step). A method that acts every few epochs (Diagnosing &
  Re-learning) is averaged over the rounds, which are consecutive epochs;
* **epoch ×** — a whole training epoch: the method's steps per epoch (its own data may be smaller or larger)
  × its step, plus its epoch work, over the plain epoch (the mean over rounds). Evaluation is not included. A
  data method's epoch length follows its model's training accuracy (modality valuation re-samples the items
  it gets wrong): measured here on a model at the start of training, it is the longest it gets.

It prints the table and writes ``step_cost_<dataset>.json`` under ``--out`` (every round's times). Times depend
on the machine, the model and the batch; the ratios are what the table is for.

    OMP_NUM_THREADS=1 python benchmarks/step_cost.py                      # AV-MNIST, about 7 minutes
    OMP_NUM_THREADS=1 python benchmarks/step_cost.py --dataset avdigits
    OMP_NUM_THREADS=1 python benchmarks/step_cost.py --quick              # a smoke run on a few items
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.accuracy import SCALED, fusion_for, reference_head
from reference_models.train import METHODS, Prepared, TrainConfig, prepare

OUT = Path(__file__).resolve().parent / "results"
AGAIN = "baseline (again)"


@dataclass
class Timed:
    """One timed run: what it is, the run built for it, and its times per round."""

    name: str
    reference: str
    run: Prepared
    step_s: list[float] = field(default_factory=list)
    work_s: list[float] = field(default_factory=list)
    steps_per_epoch: list[int] = field(default_factory=list)


def baseline_name(head: str) -> str:
    return f"baseline ({head})"


def reference_of(name: str, method: str) -> str:
    """The baseline a run is compared with: the one on the method's reference head; a baseline is its own, its
    repeat the concat baseline's."""
    if method != "baseline":
        return baseline_name(reference_head(method))
    return baseline_name("concat") if name == AGAIN else name


def config_for(method: str, fusion: str, args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        dataset=args.dataset, method=method, fusion=fusion, seed=0, epochs=args.rounds + 1, max_items=args.max_items,
        device="cpu", progress=False, options=dict(SCALED.get(method, {})),
    )


def plan(methods: Sequence[str]) -> list[tuple[str, str, str]]:
    """``(name, method, head)`` of every timed run: a baseline on every reference head, its repeat, the methods."""
    heads = sorted({reference_head(m) for m in methods if m != "baseline"} | {"concat"})
    runs = [(baseline_name(head), "baseline", head) for head in heads]
    runs.append((AGAIN, "baseline", "concat"))
    runs += [(m, m, fusion_for(m)) for m in methods if m != "baseline"]
    return runs


def batches_of(timed: Timed, steps: int) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """The first ``steps`` batches of a seeded shuffle of what the method's coming epoch trains on (its loop's
    ``epoch_data``: the training split, less G-Blending's held-out part, or a data method's own items)."""
    run = timed.run
    loader = DataLoader(run.loop.epoch_data, batch_size=run.config.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    batches = []
    for inputs, target in loader:
        batches.append(({n: x.to(run.device) for n, x in inputs.items()}, target.to(run.device)))
        if len(batches) == steps:
            return batches
    raise ValueError(f"{timed.name} trains on {len(batches)} batches per epoch, fewer than --steps {steps}")


def epoch(timed: Timed, index: int, steps: int) -> None:
    """One epoch of ``timed``'s method, ``steps`` training steps long; its times appended (epoch 0 is the untimed
    warm-up)."""
    loop = timed.run.loop
    loop.model.train()
    started = time.perf_counter()
    loop.start_epoch(index)
    work = time.perf_counter() - started
    steps_per_epoch = math.ceil(len(loop.epoch_data) / timed.run.config.batch_size)
    batches = batches_of(timed, steps)
    started = time.perf_counter()
    for inputs, target in batches:
        loop.step(inputs, target)
    stepping = time.perf_counter() - started
    started = time.perf_counter()
    loop.end_epoch(index)
    work += time.perf_counter() - started
    if index > 0:
        timed.step_s.append(stepping / len(batches))
        timed.work_s.append(work)
        timed.steps_per_epoch.append(steps_per_epoch)


def ratios(timed: Timed, reference: Timed) -> dict[str, float]:
    """The ratios to ``reference`` in the same round: the step's median over rounds, the epoch's and its work's
    mean (the rounds are consecutive epochs, and some methods act only in some of them)."""
    step, work, whole = [], [], []
    for r, (t, w, n) in enumerate(zip(timed.step_s, timed.work_s, timed.steps_per_epoch)):
        plain_epoch = reference.steps_per_epoch[r] * reference.step_s[r]
        step.append(t / reference.step_s[r])
        work.append(w / plain_epoch)
        whole.append((n * t + w) / plain_epoch)
    return {"step": statistics.median(step), "epoch_work": statistics.mean(work), "epoch": statistics.mean(whole)}


def measure(args: argparse.Namespace, methods: Sequence[str]) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    runs = []
    for name, method, head in plan(methods):
        runs.append(Timed(name, reference_of(name, method), prepare(config_for(method, head, args))))
    for index in range(args.rounds + 1):
        order = runs[index % len(runs):] + runs[: index % len(runs)]  # a different method first in every round
        for timed in order:
            epoch(timed, index, args.steps if index > 0 else args.warmup_steps)
        print(f"round {index}/{args.rounds} done", file=sys.stderr)
    by_name = {timed.name: timed for timed in runs}
    rows = []
    for timed in runs:
        rows.append({
            "name": timed.name, "head": timed.run.config.fusion, "reference": timed.reference,
            "step_ms": 1e3 * statistics.median(timed.step_s), "epoch_work_s": statistics.mean(timed.work_s),
            "steps_per_epoch": statistics.median(timed.steps_per_epoch),
            **ratios(timed, by_name[timed.reference]),
            "rounds": {"step_s": timed.step_s, "epoch_work_s": timed.work_s, "steps_per_epoch": timed.steps_per_epoch},
        })
    return rows


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| method | head | step (ms) | step × | epoch work × | epoch × |", "|" + " --- |" * 6]
    for row in rows:
        lines.append(f"| {row['name']} | {row['head']} | {row['step_ms']:.1f} | {row['step']:.2f} | "
                     f"{row['epoch_work']:.2f} | {row['epoch']:.2f} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("avmnist", "avdigits"), default="avmnist")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="default: every method")
    parser.add_argument("--steps", type=int, default=12, help="timed training steps per round and method")
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds (epochs); the ratios are medians over them")
    parser.add_argument("--warmup-steps", type=int, default=3, help="steps of the untimed epoch 0")
    parser.add_argument("--max-items", type=int, default=None, help="a subset of the dataset (smoke runs)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier times)")
    parser.add_argument("--out", type=Path, default=OUT, help="directory of step_cost_<dataset>.json")
    parser.add_argument("--quick", action="store_true", help="smoke run: 120 items, 2 steps, 2 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.max_items, args.steps, args.rounds, args.warmup_steps = 120, 2, 2, 1
    for name in ("steps", "rounds", "warmup_steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = measure(args, args.methods)
    print(table(rows))
    result = {
        "command": "python benchmarks/step_cost.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "dataset": args.dataset, "steps": args.steps, "rounds": args.rounds, "max_items": args.max_items,
        "threads": args.threads, "elapsed_s": time.perf_counter() - started,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
                    "cpus": os.cpu_count()},
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"step_cost_{args.dataset}.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
