"""Per-step cost of `gradmod.diagnose.Monitor` against a plain training step, on a small CPU model.

The model: two MLP encoders (input 64 → 256 → 256 → 128, ReLU) into a `gradmod.fusion.ConcatFusion` head
of 10 classes, batch 64, SGD with momentum, one CPU thread. Five steps are timed in the same rounds,
interleaved, so that load drifting between rounds affects them alike:

* ``plain`` — forward, cross-entropy, backward, ``optimizer.step()``;
* ``plain (again)`` — the same step a second time: the spread between the two is the noise of the
  measurement;
* ``monitor: norms`` — the plain step with ``Monitor(measure=None)`` attached (per-encoder ‖g‖, ‖w‖);
* ``monitor: norms + observe`` — with the default measure: the loop also computes the head's decoupled
  logits (``head.unimodal_logits``) and calls ``monitor.observe(...)``;
* ``monitor: every 10th, observe`` — the same with ``Monitor(every=10)``, the loop computing the decoupled
  logits only when ``monitor.recording``.

Each round runs ``--steps`` steps of every configuration; the reported time is the median over
``--rounds`` rounds of the mean step time of a round, and each ratio the median over rounds of the ratio
to ``plain`` in the same round. It also counts the operations ``observe()`` and ``step()`` dispatch (no
``_local_scalar_dense``, the operation of a host synchronisation). It prints a table and writes
``benchmarks/results/diagnose_overhead.json``.

    python benchmarks/diagnose_overhead.py            # about half a minute
    python benchmarks/diagnose_overhead.py --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from op_count import (  # the bookkeeping counter of the speed benchmark
    _NO_KERNEL,
    _Counter,
)
from torch import nn

from gradmod.diagnose import Monitor
from gradmod.fusion import ConcatFusion
from gradmod.measures import SoftmaxScore

OUT = Path(__file__).resolve().parent / "results" / "diagnose_overhead.json"
NAMES = ("audio", "visual")


def _model(seed: int) -> tuple[nn.ModuleDict, ConcatFusion, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    encoders = nn.ModuleDict(
        {n: nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 128)) for n in NAMES}
    )
    head = ConcatFusion({n: 128 for n in NAMES}, num_classes=10)
    optimizer = torch.optim.SGD([*encoders.parameters(), *head.parameters()], lr=0.01, momentum=0.9)
    return encoders, head, optimizer


def _batches(count: int) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        ({n: torch.randn(64, 64, generator=generator) for n in NAMES}, torch.randint(0, 10, (64,), generator=generator))
        for _ in range(count)
    ]


def _step_function(kind: str) -> tuple[Callable[[dict[str, torch.Tensor], torch.Tensor], None], Monitor | None]:
    encoders, head, optimizer = _model(0)
    monitor = None
    if kind.startswith("monitor"):
        every = 10 if "10th" in kind else 1
        monitor = Monitor(dict(encoders), measure=None if kind == "monitor: norms" else SoftmaxScore(), every=every)
        monitor.attach(optimizer)
    observe = "observe" in kind

    def step(x: dict[str, torch.Tensor], y: torch.Tensor) -> None:
        features = {n: encoders[n](x[n]) for n in NAMES}
        logits = head(features)
        if observe and monitor.recording:
            monitor.observe(logits=head.unimodal_logits(features), target=y)
        optimizer.zero_grad()
        nn.functional.cross_entropy(logits, y).backward()
        optimizer.step()

    return step, monitor


def count_monitor_ops() -> dict[str, object]:
    """Operations one ``observe()`` and one ``step()`` of a two-modality monitor dispatch (after three steps of a
    tiny model): per operator, the compute operations (views apart) and the host synchronisations."""
    torch.manual_seed(0)
    encoders = {n: nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)) for n in NAMES}
    monitor = Monitor(encoders)
    logits = {n: torch.randn(16, 6) for n in NAMES}
    target = torch.randint(0, 6, (16,))
    counted = {}
    for _ in range(3):
        for encoder in encoders.values():
            encoder.zero_grad()
            encoder(torch.randn(16, 8)).sum().backward()
        with _Counter() as observe:
            monitor.observe(logits=logits, target=target)
        with _Counter() as step:
            monitor.step()
        counted = {"observe": dict(observe.ops), "step": dict(step.ops)}
    compute = {part: sum(n for op, n in ops.items() if op not in _NO_KERNEL) for part, ops in counted.items()}
    syncs = sum(ops.get("_local_scalar_dense", 0) for ops in counted.values())
    return {"operators": counted, "compute_operations": compute, "host_synchronisations": syncs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="5 rounds of 10 steps")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    rounds, steps = (5, 10) if args.quick else (args.rounds, args.steps)
    torch.set_num_threads(1)
    kinds = ("plain", "plain (again)", "monitor: norms", "monitor: norms + observe", "monitor: every 10th, observe")
    functions = {kind: _step_function(kind) for kind in kinds}
    data = _batches(steps)
    for step, _ in functions.values():  # warm-up
        for x, y in data[:5]:
            step(x, y)
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(rounds):
        for kind in kinds:
            step = functions[kind][0]
            start = time.perf_counter()
            for x, y in data:
                step(x, y)
            times[kind].append((time.perf_counter() - start) / steps)
    results = {}
    for kind in kinds:
        ratios = [t / p for t, p in zip(times[kind], times["plain"])]
        results[kind] = {
            "median_ms": 1e3 * statistics.median(times[kind]),
            "min_ms": 1e3 * min(times[kind]),
            "max_ms": 1e3 * max(times[kind]),
            "ratio_to_plain": statistics.median(ratios),
        }
    ops = count_monitor_ops()
    compute, syncs = ops["compute_operations"], ops["host_synchronisations"]
    parameters = sum(p.numel() for p in _model(0)[0].parameters())
    print(f"Monitor overhead, CPU ({platform.processor() or platform.machine()}, 1 thread), torch {torch.__version__}")
    print(f"two encoders of {parameters // 2} parameters each (6 tensors), batch 64; {rounds} rounds of {steps} steps\n")
    print(f"{'step':<31}{'median ms':>10}{'min ms':>9}{'max ms':>9}{'/ plain':>9}")
    for kind, row in results.items():
        print(f"{kind:<31}{row['median_ms']:>10.3f}{row['min_ms']:>9.3f}{row['max_ms']:>9.3f}{row['ratio_to_plain']:>9.3f}")
    print(f"\noperations dispatched: observe {compute['observe']}, step {compute['step']} (views apart); host syncs: {syncs}")
    report = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "threads": 1,
        },
        "model": "two MLP encoders 64-256-256-128 + ConcatFusion(10 classes), batch 64, SGD momentum 0.9",
        "encoder_parameters": parameters // 2,
        "rounds": rounds,
        "steps_per_round": steps,
        "results": results,
        **ops,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
