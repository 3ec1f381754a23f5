"""The first GPU run in one command: kernel checks, the speed benchmark, results as JSON and as the GPU
section of docs/benchmarks/speed.md, within a time budget (8 minutes on one H100/H200).

    make gpu-check                      # = python benchmarks/gpu_check.py (CUDA, the committed paths)
    python benchmarks/gpu_check.py --device cpu --dry-run --out /tmp/gpu.json --docs /tmp/speed.md

Stages, in this order, each in its own process with its own time limit (a crash or a hang in one — a CUDA
error poisons its process — costs only that stage; what a stage measured before it stopped is kept):

1. ``capture`` — the Triton step on CUDA: the deterministic part exact, the noise at the documented scale, a
   device step equal to a host step, launches per step (counted on the host and by the profiler), no host
   synchronisation, a CUDA graph of the step (device step incremented in place) replaying the eager
   step's result bit for bit, and the eager, replayed and host-side times of a CREMA-D-sized step;
2. ``speed`` — `benchmarks/speed.py` on CUDA: CREMA-D at batch 64, many small tensors, synthetic lists of
   1e6…1e9 elements, the bookkeeping count; it starts no workload it has no time left for;
3. ``tests`` — ``tests/test_kernels.py`` and ``tests/test_compile_kernels.py``, whose Triton tests then run
   compiled on the GPU;
4. ``compile`` — graph breaks of the kernel call under ``torch._dynamo.explain``, breaks that the kernels
   add to a compiled ``optimizer.step()`` with gradmod's hook, and inductor's compiled call against the
   eager one.

After every stage ``--out`` (default ``benchmarks/results/speed_gpu.json``) is rewritten; at the end the
marked GPU section of ``--docs`` (default ``docs/benchmarks/speed.md``) is replaced by the tables of this
run. The exit status is 0 when every stage passed. ``--dry-run`` runs every stage on the CPU under
``TRITON_INTERPRET=1`` with tiny sizes and a short budget (what CUDA alone can do is reported as skipped),
so that the script is exercised by the default test run before any GPU sees it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "speed_gpu.json"
DEFAULT_DOCS = ROOT / "docs" / "benchmarks" / "speed.md"
BEGIN, END = "<!-- gpu-results:begin -->", "<!-- gpu-results:end -->"
#: Seconds kept back at the end for writing the results.
RESERVE_S = 15


@dataclass(frozen=True)
class Stage:
    name: str
    #: Most seconds the stage may take (of the budget's 480 s; a dry run scales them down).
    limit_s: float
    #: Fewest seconds worth starting it with.
    minimum_s: float


STAGES = (Stage("capture", 45, 20), Stage("speed", 190, 60), Stage("tests", 150, 40), Stage("compile", 75, 25))


# --------------------------------------------------------------------------------------- stages


def _environment() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.machine()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError as error:
        info["triton"] = f"not importable ({error})"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def _groups(elements: int, device: str) -> list[list]:
    """Two modalities of gradients in ResNet-18 conv-weight sizes (as `benchmarks/speed.py` builds them)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from benchmarks.speed import grads_of, synthetic_workload

    torch.manual_seed(0)
    return grads_of(synthetic_workload(elements, torch.device(device), torch.float32))


def _count_launches(call: Callable[[], None]) -> int:
    """Triton launches made by ``call`` (counted where the kernels are launched)."""
    from gradmod.kernels import triton as triton_kernel

    launches = []
    originals = {name: getattr(triton_kernel, name) for name in ("_moments_kernel", "_update_kernel")}

    class Counting:
        def __init__(self, kernel) -> None:
            self.kernel = kernel

        def __getitem__(self, grid):
            launches.append(grid)
            return self.kernel[grid]

    try:
        for name, kernel in originals.items():
            setattr(triton_kernel, name, Counting(kernel))
        call()
    finally:
        for name, kernel in originals.items():
            setattr(triton_kernel, name, kernel)
    return len(launches)


def _guarded(checks: dict, name: str, measure: Callable[[], object]) -> object:
    """``checks[name] = measure()``, or ``"failed: …"`` when it raises: on a first run every check reports,
    whatever an earlier one did."""
    try:
        value = measure()
    except Exception as error:  # noqa: BLE001 — reported, and the stage fails on it
        traceback.print_exc()
        value = f"failed: {type(error).__name__}: {error}"
    checks[name] = value
    print(f"  {name}: {value}", flush=True)
    return value


def stage_capture(device: str, dry_run: bool) -> dict:
    """The Triton step's checks and times (see the module docstring)."""
    import torch

    from gradmod.kernels import NoiseKey, modulate_modalities_

    cuda = device == "cuda"
    pristine = _groups(20_000 if dry_run else 22_327_552, device)  # CREMA-D's conv weights: 22.3 M elements
    k = torch.tensor([0.6, 1.0], device=device)
    c = torch.ones(2, device=device)
    checks: dict = {"tensors": sum(len(g) for g in pristine), "elements": sum(t.numel() for g in pristine for t in g)}

    def fresh():
        return [[t.clone() for t in grads] for grads in pristine]

    def step(groups, key, scales=c) -> None:
        modulate_modalities_(groups, k, scales, key, "triton")

    def stepped(key, scales=c):
        out = fresh()
        step(out, key, scales)
        return out

    def same(first, second) -> bool:
        return all(torch.equal(a, b) for ga, gb in zip(first, second) for a, b in zip(ga, gb))

    def deterministic() -> bool:
        out = stepped(None, None)
        return all(torch.equal(o, t * float(k[m])) for m in range(2) for o, t in zip(out[m], pristine[m]))

    def noise_ratio() -> float:
        out = stepped(NoiseKey(1, 7))
        residuals = [(o - t * float(k[m])).std() / (t.std() + 1e-8) for m in range(2) for o, t in zip(out[m], pristine[m])]
        return statistics.median(r.item() for r in residuals)

    device_step = torch.tensor(7, device=device)
    groups = fresh()
    _guarded(checks, "deterministic part exact", deterministic)
    _guarded(checks, "noise std / σ (median, expected 1)", noise_ratio)
    _guarded(checks, "device step equals host step",
             lambda: same(stepped(NoiseKey(1, device_step)), stepped(NoiseKey(1, 7))))
    step(groups, NoiseKey(1, device_step))  # warm: tables cached
    _guarded(checks, "launches per step", lambda: _count_launches(lambda: step(groups, NoiseKey(1, device_step))))
    if not cuda:
        checks["skipped"] = "profiler kernel count, host synchronisation, CUDA graph and times need CUDA"
        return checks

    def profiled() -> int:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
            step(groups, NoiseKey(1, device_step))
            torch.cuda.synchronize()
        kernels = [e.name for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        checks["kernel names"] = sorted(set(kernels))
        return len(kernels)

    def synchronisation_free() -> bool:
        torch.cuda.set_sync_debug_mode("error")
        try:
            step(groups, NoiseKey(1, device_step))
        finally:
            torch.cuda.set_sync_debug_mode(0)
        return True

    graph = torch.cuda.CUDAGraph()

    def replayed() -> bool:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
            step(groups, NoiseKey(1, device_step))
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            step(groups, NoiseKey(1, device_step))
            device_step.add_(1)
        equal = True
        for value in (5, 6, 2**33 + 1):
            for grads, originals in zip(groups, pristine):
                for g, o in zip(grads, originals):
                    g.copy_(o)
            device_step.fill_(value)
            graph.replay()
            equal &= same(groups, stepped(NoiseKey(1, value))) and device_step.item() == value + 1
        return equal

    _guarded(checks, "kernels per step (profiler)", profiled)
    _guarded(checks, "no host synchronisation", synchronisation_free)
    replays = _guarded(checks, "graph replay equals eager step", replayed)
    _guarded(checks, "times", lambda: _step_times(lambda: step(groups, NoiseKey(1, device_step)),
                                                  graph if replays is True else None))
    return checks


def _step_times(eager: Callable[[], None], graph) -> dict:
    """Median times over 30 calls: an eager step on the host (the call returns before the GPU is done) and
    on the GPU, and a graph replay on the GPU (when the graph was captured)."""
    import torch

    def timed(call: Callable[[], None]) -> tuple[float, float]:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        host = time.perf_counter()
        call()
        host = time.perf_counter() - host
        end.record()
        torch.cuda.synchronize()
        return host * 1e3, start.elapsed_time(end)

    for _ in range(3):
        eager()
    eager_times = [timed(eager) for _ in range(30)]
    times = {
        "eager step host ms": statistics.median(t[0] for t in eager_times),
        "eager step GPU ms": statistics.median(t[1] for t in eager_times),
    }
    if graph is not None:
        times["graph replay GPU ms"] = statistics.median(timed(graph.replay)[1] for _ in range(30))
    return times


def stage_compile(device: str, dry_run: bool) -> dict:
    """Graph breaks of the kernel path and the compiled call against the eager one."""
    import torch
    from torch import nn
    from torch._dynamo.utils import counters

    import gradmod
    from gradmod.kernels import NoiseKey, modulate_modalities_

    backend = "triton" if device == "cuda" else "foreach"
    k = torch.tensor([0.6, 1.0], device=device)
    c = torch.ones(2, device=device)
    result: dict = {"backend": backend}

    def call(groups) -> None:
        modulate_modalities_(groups, k, c, NoiseKey(3, 5), backend)

    def kernel_call_breaks() -> int:
        torch._dynamo.reset()
        return torch._dynamo.explain(call)(_groups(10_000, device)).graph_break_count

    def optimizer_breaks(apply: bool) -> int:
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        audio, visual = nn.Linear(64, 8).to(device), nn.Linear(64, 8).to(device)
        optimizer = torch.optim.SGD([*audio.parameters(), *visual.parameters()], lr=0.1)
        modulator = gradmod.OGMGE({"audio": audio, "visual": visual}, alpha=0.5, backend=backend, validate=False)
        modulator.attach(optimizer)
        if not apply:
            modulator.applier.apply = lambda *args, **kwargs: None
        x, y = torch.randn(16, 64, device=device), torch.randint(0, 8, (16,), device=device)
        la, lv = audio(x), visual(x)
        modulator.observe(logits={"audio": la, "visual": lv}, target=y)
        nn.functional.cross_entropy(la + lv, y).backward()
        torch._dynamo.explain(optimizer.step)()
        return sum(counters["graph_break"].values())

    compiler = "aot_eager" if dry_run else "inductor"

    def compiled_equals_eager() -> bool:
        torch._dynamo.reset()
        compiled = torch.compile(call, backend=compiler, fullgraph=True)
        eager_groups, compiled_groups = _groups(10_000, device), _groups(10_000, device)
        call(eager_groups)
        compiled(compiled_groups)
        return all(torch.equal(a, b) for ga, gb in zip(eager_groups, compiled_groups) for a, b in zip(ga, gb))

    _guarded(result, "graph breaks in the kernel call", kernel_call_breaks)
    total = _guarded(result, "graph breaks of optimizer.step() with gradmod's hook", lambda: optimizer_breaks(True))
    if isinstance(total, int):
        _guarded(result, "graph breaks added by the kernels", lambda: total - optimizer_breaks(False))
    started = time.perf_counter()
    _guarded(result, f"{compiler} call equals eager", compiled_equals_eager)
    result[f"{compiler} compile + first call s"] = time.perf_counter() - started
    return result


STAGE_FUNCTIONS = {"capture": stage_capture, "compile": stage_compile}


# ------------------------------------------------------------------------------------ orchestration


def _run(command: list[str], limit_s: float, env: dict[str, str]) -> tuple[int | None, str]:
    """Run ``command`` in the repository root, streaming its output, killed (with its children) after
    ``limit_s``; returns the exit status (``None`` on timeout) and the output."""
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    lines: list[str] = []

    def pump() -> None:
        for line in process.stdout:
            lines.append(line)
            print("  | " + line, end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        status = process.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        status = None
    reader.join(timeout=10)
    return status, "".join(lines)


def _pytest_summary(output: str) -> dict:
    """Counts of pytest's last summary line, and the failed tests."""
    counts = {}
    summary = [line for line in output.splitlines() if re.search(r"\b(passed|failed|error|skipped)\b", line)]
    if summary:
        counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed)", summary[-1])}
    failed = [line.split(" ", 1)[1] for line in output.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    return {"counts": counts, "failed": failed}


def run_stage(stage: Stage, args: argparse.Namespace, limit_s: float, work: Path) -> dict:
    """Run one stage in its own process; its record: status, seconds, and what it measured."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.dry_run:
        env.update(TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    started = time.perf_counter()
    record: dict = {"limit_s": round(limit_s)}
    if stage.name == "tests":
        files = ["tests/test_kernels.py", "tests/test_compile_kernels.py"]
        selection = ["-k", "two_launches or traces_as_one_operator"] if args.dry_run else []
        status, output = _run([sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider", "-rfE",
                               "--durations=15", *selection], limit_s, env)
        record.update(_pytest_summary(output))
        passed = status == 0
    elif stage.name == "speed":
        partial = work / "speed.json"
        budget = max(limit_s - 45, 10)
        command = [sys.executable, "benchmarks/speed.py", "--device", args.device, "--out", str(partial),
                   "--budget-s", f"{budget:.0f}"]
        if args.dry_run:
            command += ["--quick", "--synthetic", "1e4", "--small", "4", "256", "--interpreted-triton",
                        "--repeats", "1", "--step-repeats", "1"]
        status, output = _run(command, limit_s, env)
        record["results"] = json.loads(partial.read_text()) if partial.exists() else None
        passed = status == 0
    else:
        result_file = work / f"{stage.name}.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--stage", stage.name, "--device", args.device,
                   "--result", str(result_file)] + (["--dry-run"] if args.dry_run else [])
        status, output = _run(command, limit_s, env)
        record["results"] = json.loads(result_file.read_text()) if result_file.exists() else None
        passed = status == 0 and _checks_pass(record["results"])
    record["status"] = "passed" if passed else "timed out" if status is None else "failed"
    record["seconds"] = round(time.perf_counter() - started, 1)
    if not passed:
        record["output_tail"] = output[-3000:]
    return record


def _checks_pass(results: dict | None) -> bool:
    """Every yes/no check of a stage said yes, every noise ratio is near 1 and no break was added."""
    if not results:
        return False
    for name, value in results.items():
        if isinstance(value, bool) and not value:
            return False
        if isinstance(value, str) and value.startswith("failed"):
            return False
        if name.startswith("noise std") and not 0.9 < value < 1.1:
            return False
        if name in ("launches per step", "kernels per step (profiler)") and value != 2:
            return False
        zero_breaks = name.startswith("graph breaks in the kernel call") or name == "graph breaks added by the kernels"
        if zero_breaks and value != 0:
            return False
    return True


# ---------------------------------------------------------------------------------------- report


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(report: dict) -> str:
    """The GPU section of docs/benchmarks/speed.md for this run."""
    env = report["environment"]
    where = env.get("gpu", "the CPU (dry run)")
    lines = [
        (f"Measured by `{report['command']}` on {where}, torch {env['torch']}, "
         f"Triton {env.get('triton')}, float32, in {report['seconds']:.0f} s."),
        "",
    ]
    if report.get("dry_run"):
        lines += ["!!! note \"Dry run\"", "    CPU under the Triton interpreter, tiny sizes: not a measurement.", ""]
    stages = report["stages"]
    lines += ["| stage | status | seconds |", "| --- | --- | ---: |"]
    lines += [f"| {name} | {record['status']} | {record.get('seconds', '')} |" for name, record in stages.items()]
    lines.append("")
    speed = (stages.get("speed") or {}).get("results") or {}
    device_type = "cpu" if report.get("dry_run") else "cuda"
    results = [r for r in speed.get("results", []) if r["device"] == device_type]
    if results:
        lines += ["Modulation, median of the rounds; floor = 1.5 × an in-place `mul_` over the same gradients,",
                  "timed in the same rounds (both ratios depend on the machine):", "",
                  "| workload | case | ms | / floor | / official |", "| --- | --- | ---: | ---: | ---: |"]
        for result in results:
            label = f"{result['workload']} ({result['tensors']} tensors)"
            for row in result["modulation"]:
                if row["name"] == "in-place mul_":
                    continue
                name = f"`{row['name']}`" if row["name"] in ("reference", "foreach", "triton") else row["name"]
                lines.append(f"| {label} | {name} | {_fmt(row['ms'], 3)} | {_fmt(row['x_floor'])} | "
                             f"{_fmt(row['x_official'], 3)} |")
                label = ""
        lines.append("")
        steps = [r for r in results if r["steps"]]
        for result in steps:
            lines += [f"Training step, {result['workload']}:", "",
                      "| case | ms | / step | spread |", "| --- | ---: | ---: | ---: |"]
            lines += [f"| {row['name']} | {_fmt(row['ms'], 2)} | {_fmt(row['x_step'], 3)} | {row['spread']:.0%} |"
                      for row in result["steps"]]
            lines.append("")
    for skipped in speed.get("skipped", []):
        lines.append(f"- not timed (time budget): {skipped['workload']}")
    bookkeeping = speed.get("bookkeeping")
    if bookkeeping:
        counts = ", ".join(f"{name}: {c['compute_ops']}" for name, c in bookkeeping.items())
        lines.append(f"- bookkeeping ops per modulator step (`benchmarks/op_count.py`): {counts}")
    for name in ("capture", "compile"):
        for check, value in ((stages.get(name) or {}).get("results") or {}).items():
            entries = value.items() if isinstance(value, dict) else [(check, value)]
            if check != "kernel names":
                lines += [f"- {name}: {entry}: {_fmt(number, 3)}" for entry, number in entries]
    tests = stages.get("tests") or {}
    if tests.get("counts"):
        lines.append("- tests: " + ", ".join(f"{n} {word}" for word, n in tests["counts"].items()))
    for failed in tests.get("failed", []):
        lines.append(f"- failed: `{failed[:80]}`")
    return "\n".join(lines).rstrip() + "\n"


def update_docs(page: Path, section: str) -> None:
    """Replace what lies between the GPU markers of ``page`` by ``section``."""
    text = page.read_text(encoding="utf-8")
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"{page}: expected one {BEGIN} … {END} section to replace")
    head, rest = text.split(BEGIN)
    tail = rest.split(END)[1]
    page.write_text(f"{head}{BEGIN}\n{section}{END}{tail}", encoding="utf-8")


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny sizes, short budget")
    parser.add_argument("--budget-s", type=float, default=None, help="total seconds (default 480, dry run 240)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JSON of the run")
    parser.add_argument("--docs", type=Path, default=DEFAULT_DOCS, help="the page whose GPU section is replaced")
    parser.add_argument("--no-docs", action="store_true", help="leave the documentation page alone")
    parser.add_argument("--stage", choices=sorted(STAGE_FUNCTIONS), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dry_run and args.device != "cpu":
        parser.error("--dry-run runs on the CPU: add --device cpu")
    if args.budget_s is None:
        args.budget_s = 240.0 if args.dry_run else 480.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stage:  # one stage, inside its own process
        sys.path.insert(0, str(ROOT))
        results = STAGE_FUNCTIONS[args.stage](args.device, args.dry_run)
        args.result.write_text(json.dumps(results, indent=2, default=str))
        print(json.dumps(results, indent=2, default=str), flush=True)
        return 0
    started = time.perf_counter()
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device here; for a rehearsal run --device cpu --dry-run")
    argv_shown = argv if argv is not None else sys.argv[1:]
    report = {"command": " ".join(["python benchmarks/gpu_check.py", *argv_shown]).strip(),
              "environment": _environment(), "dry_run": args.dry_run, "budget_s": args.budget_s, "stages": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    work_directory = tempfile.TemporaryDirectory(prefix="gpu_check_")
    work = Path(work_directory.name)
    scale = args.budget_s / 480.0

    def save() -> None:
        report["seconds"] = time.perf_counter() - started
        args.out.write_text(json.dumps(report, indent=2, default=str))

    save()
    for stage in STAGES:
        remaining = args.budget_s - (time.perf_counter() - started) - RESERVE_S
        limit = min(stage.limit_s * scale if not args.dry_run else stage.limit_s, remaining)
        if limit < stage.minimum_s * min(scale, 1.0):
            report["stages"][stage.name] = {"status": "skipped", "reason": f"{remaining:.0f} s left of the budget"}
            print(f"\n== {stage.name}: skipped ({remaining:.0f} s left)", flush=True)
            save()
            continue
        print(f"\n== {stage.name} (at most {limit:.0f} s)", flush=True)
        record = run_stage(stage, args, limit, work)
        report["stages"][stage.name] = record
        print(f"== {stage.name}: {record['status']} in {record['seconds']} s", flush=True)
        save()
    save()
    work_directory.cleanup()
    section = markdown(report)
    print("\n" + section)
    if not args.no_docs:
        update_docs(args.docs, section)
        print(f"updated the GPU section of {args.docs}")
    print(f"wrote {args.out}")
    return 0 if all(record["status"] == "passed" for record in report["stages"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
