"""Speed of GE gradient modulation: the backends vs the official loop, the memory floor and the training step.

For each device (CPU, and CUDA when present) and each workload — the OGM-GE CREMA-D model (two
torchvision ResNet-18 encoders, conv weights modulated, as in the official code), synthetic parameter
lists of 1e6…1e9 elements in ResNet-18 conv-weight sizes, and many small tensors — this times, in one
run and in the same rounds:

* ``in-place mul_``: ``torch._foreach_mul_`` by 1 over the same gradients — one read and one write of
  every byte. The **floor** of the modulation is 1.5 × this time: the update needs three passes over the
  gradient bytes (one read for σ, one read and one write for ``k·g + c·σ·z``);
* ``official loop``: the OGM-GE code's per-parameter loop, writing back to ``p.grad`` as it does,
  ``p.grad = p.grad * coeff + torch.zeros_like(p.grad).normal_(0, p.grad.std().item() + 1e-8)``;
* every ``gradmod.kernels`` backend usable on the device (``reference``, ``foreach``, ``triton``) through
  `gradmod.kernels.modulate_modalities_`, as the modulator calls it once per step for all modalities
  (``[p.grad for p in params]`` read at every call, coefficients on the device, GE noise ``c = 1``, the
  step counter advancing);
* CREMA-D only: the training step (forward, backward, SGD step), the step with ``gradmod.OGM(...,
  apply="features")`` and the step with ``gradmod.OGMGE`` on every backend.

It prints one table per device and workload — milliseconds, spread across rounds, and the ratios
``/ floor``, ``/ official`` and ``/ step`` — and the bookkeeping count of a modulator step
(`benchmarks/op_count.py`), and writes everything as JSON (``--out``, rewritten after every workload).
Times are the median over ``--rounds`` of the mean over the calls of a round, synchronised at the end of
each round; ``/ floor`` and ``/ official`` are medians over the rounds of ratios within a round (so load
that drifts between rounds cancels), ``/ step`` is a ratio of medians (the steps run in rounds of their
own). On CUDA the host time of a call (returning before the GPU finishes) is reported too. The
floor and the step are measured on the machine at hand, so ``/ floor`` and ``/ step`` depend on the
machine (memory bandwidth, CPU speed, batch size), not only on the code.

    python benchmarks/speed.py --quick                      # < 1 min on a laptop CPU
    python benchmarks/speed.py --out speed.json             # CPU (+ CUDA when present), default sizes
    python benchmarks/speed.py --device cuda --out gpu.json # the GPU table of docs/benchmarks/speed.md
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gradmod
from benchmarks.op_count import count_bookkeeping_ops
from gradmod import filters
from gradmod.kernels import NoiseKey, modulate_modalities_

#: A workload: for each modality, the parameters whose gradients are modulated.
Workload = dict[str, list[nn.Parameter]]
MODALITIES = ("audio", "visual")
#: Coefficients used for the modulation timings (a damped audio, an undamped visual, as OGM-GE produces).
COEFFICIENTS = {"audio": 0.6, "visual": 1.0}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Passes over the gradient bytes of the update (σ: one read; k·g + c·σ·z: one read, one write) …
UPDATE_PASSES = 3
#: … and of the in-place ``mul_`` it is compared with (one read, one write).
MUL_PASSES = 2


# ------------------------------------------------------------------------------------------ timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Case:
    """One timed thing: ``run`` is called; ``setup`` runs untimed before each round (e.g. restore gradients
    or attach a modulator) and ``teardown`` after it."""

    run: Callable[[], object]
    setup: Callable[[], None] = lambda: None
    teardown: Callable[[], None] = lambda: None


@dataclass
class Timing:
    """Seconds per call, one value per round: until synchronised (``device``) and until the calls returned
    (``host``, shorter on CUDA where calls return before the GPU has finished)."""

    device: list[float] = field(default_factory=list)
    host: list[float] = field(default_factory=list)


def measure(cases: Mapping[str, Case], device: torch.device, repeats: int, rounds: int) -> dict[str, Timing]:
    """Seconds per call of every case: (``repeats`` calls, synchronised) / ``repeats``, per round.

    Rounds are interleaved across the cases (round 1 of every case, then round 2, …) so that drifting
    load on the machine biases no case; each case runs once untimed first (warm-up, compilation).
    """
    times = {name: Timing() for name in cases}
    for round_index in range(rounds + 1):
        for name, case in cases.items():
            case.setup()
            synchronize(device)
            calls = repeats if round_index else 1
            start = time.perf_counter()
            for _ in range(calls):
                case.run()
            returned = time.perf_counter()
            synchronize(device)
            if round_index:
                times[name].device.append((time.perf_counter() - start) / calls)
                times[name].host.append((returned - start) / calls)
            case.teardown()
    return times


def repeats_for(elements: int, requested: int) -> int:
    """Fewer repeats for big workloads (each call already runs long)."""
    return max(1, min(requested, int(2e8 // max(elements, 1))))


# ------------------------------------------------------------------------------------- modulation


def grads_of(workload: Workload) -> list[list[Tensor]]:
    """The current gradients, per modality (read at every call, as the modulator does)."""
    return [[p.grad for p in params] for params in workload.values()]


def official_loop(workload: Workload) -> None:
    """The OGM-GE code's per-parameter loop: a new gradient per parameter, one ``.item()`` sync per tensor."""
    for name, params in workload.items():
        coeff = COEFFICIENTS[name]
        for p in params:
            p.grad = p.grad * coeff + torch.zeros_like(p.grad).normal_(0, p.grad.std().item() + 1e-8)


def inplace_pass(workload: Workload) -> None:
    """One read and one write of every gradient byte, in place: ``torch._foreach_mul_`` by 1."""
    torch._foreach_mul_([g for grads in grads_of(workload) for g in grads], 1.0)


def gradmod_call(workload: Workload, backend: str, device: torch.device) -> Callable[[], None]:
    """One `modulate_modalities_` step for all modalities with GE noise, the step counter advancing."""
    coefficients = torch.tensor([COEFFICIENTS[name] for name in workload], device=device)
    noise_scales = torch.ones(len(workload), device=device)
    step = [0]

    def call() -> None:
        step[0] += 1
        modulate_modalities_(grads_of(workload), coefficients, noise_scales, NoiseKey(0, step[0]), backend)

    return call


#: Largest workload (elements) timed with the interpreted Triton kernels in dry runs.
INTERPRETED_ELEMENTS = 100_000


def available_backends(device: torch.device, interpreted_triton: bool = False, elements: float = 0) -> list[str]:
    """The gradmod backends that run on ``device`` (Triton compiled on CUDA; interpreted on the CPU only when
    asked, for dry runs, and only up to `INTERPRETED_ELEMENTS` — the interpreter is orders of magnitude slower)."""
    backends = ["reference", "foreach"]
    interpreted_triton = interpreted_triton and elements <= INTERPRETED_ELEMENTS
    try:
        from gradmod.kernels import triton as triton_kernel
    except ImportError as error:
        print(f"  triton skipped: {error}")
        return backends
    ok, reason = triton_kernel.is_available()
    interpreted = triton_kernel.INTERPRETED
    usable = interpreted == (device.type == "cpu") and (interpreted_triton or not interpreted)
    if ok and usable:
        backends.append("triton")
    elif device.type == "cuda" or interpreted_triton:
        print(f"  triton skipped on {device.type}: {reason}")
    return backends


def time_modulation(workload: Workload, device: torch.device, args: argparse.Namespace) -> dict[str, Timing]:
    """Seconds per call (per round) of the in-place pass, the official loop and every backend.

    The gradients are restored before every round, so that repeated GE noise cannot grow them out of
    range (fp16).
    """
    pristine = [[g.clone() for g in grads] for grads in grads_of(workload)]
    elements = sum(g.numel() for grads in pristine for g in grads)

    def restore() -> None:
        for grads, originals in zip(grads_of(workload), pristine):
            for g, o in zip(grads, originals):
                g.copy_(o)

    cases = {
        "in-place mul_": Case(lambda: inplace_pass(workload), setup=restore),
        "official loop": Case(lambda: official_loop(workload), setup=restore),
    }
    for backend in available_backends(device, args.interpreted_triton, elements):
        cases[backend] = Case(gradmod_call(workload, backend, device), setup=restore)
    seconds = measure(cases, device, repeats_for(elements, args.repeats), args.rounds)
    restore()
    return seconds


# -------------------------------------------------------------------------------------- workloads


def _holders(sizes: list[int], device: torch.device, dtype: torch.dtype) -> Workload:
    """Parameters of the given sizes (storage-free expanded views) with random gradients, alternating modalities."""
    workload: Workload = {name: [] for name in MODALITIES}
    for index, size in enumerate(sizes):
        p = nn.Parameter(torch.zeros(1, device=device, dtype=dtype).expand(size))
        p.grad = torch.randn(size, device=device, dtype=dtype) * 1e-3
        workload[MODALITIES[index % 2]].append(p)
    return workload


def resnet18_conv_sizes() -> list[int]:
    """Elements of the conv weights of a torchvision ResNet-18 (3 input channels), in parameter order:
    the 7×7 stem, then per stage two basic blocks of two 3×3 convs, the first block of stages 2–4 with a
    1×1 downsampling conv after them."""
    sizes, channels = [64 * 3 * 7 * 7], 64
    for width in (64, 128, 256, 512):
        for block in range(2):
            sizes += [width * channels * 9, width * width * 9]
            if block == 0 and width != channels:
                sizes.append(width * channels)
            channels = width
    return sizes


def synthetic_workload(elements: int, device: torch.device, dtype: torch.dtype) -> Workload:
    """``elements`` gradient elements in tensors of ResNet-18 conv-weight sizes, split over two modalities."""
    pattern = resnet18_conv_sizes()
    sizes, total, i = [], 0, 0
    while total < elements:
        size = min(pattern[i % len(pattern)], elements - total)
        sizes.append(size)
        total += size
        i += 1
    return _holders(sizes, device, dtype)


def small_workload(count: int, size: int, device: torch.device, dtype: torch.dtype) -> Workload:
    """``count`` tensors of ``size`` elements (biases, norm weights): the per-tensor overhead dominates."""
    return _holders([size] * count, device, dtype)


def cremad_batch(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> tuple[dict[str, Tensor], Tensor]:
    """A random CREMA-D batch: spectrograms ``[B, 1, F, S]``, frames ``[B, 3, T, IMG, IMG]``, labels of 6 classes."""
    sizes = args.cuda_sizes if device.type == "cuda" else args.cpu_sizes
    batch, frames, image, freq, steps = sizes
    inputs = {
        "audio": torch.randn(batch, 1, freq, steps, device=device, dtype=dtype),
        "visual": torch.randn(batch, 3, frames, image, image, device=device, dtype=dtype),
    }
    return inputs, torch.randint(0, 6, (batch,), device=device)


def cremad_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, inputs: Mapping[str, Tensor], target: Tensor, modulator=None
) -> None:
    """Forward, backward and SGD step of the CREMA-D model (the modulator observes when given)."""
    optimizer.zero_grad()
    output = model(inputs)
    if modulator is not None:
        features = output.features if isinstance(modulator.applier, gradmod.FeaturesApplier) else None
        modulator.observe(logits=output.unimodal_logits, target=target, features=features)
    model.loss(output, target).backward()
    optimizer.step()


def cremad_workload(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> tuple[Workload, dict[str, Timing]]:
    """The conv weights of one step (with gradients), and seconds per training step (per round), with and
    without modulation. Every case trains its own copy of the model (same initial weights, same batch), so
    that no modulator watches another case's backward passes."""
    import copy

    from reference_models.models.cremad import CremaDModel

    torch.manual_seed(0)
    initial = CremaDModel(fusion="concat").to(device=device, dtype=dtype)
    inputs, target = cremad_batch(args, device, dtype)

    def step_with(make_modulator: Callable[[dict[str, nn.Module]], gradmod.Modulator] | None) -> Case:
        """The training step of a fresh copy of the model, with the modulator attached when given."""
        model = copy.deepcopy(initial)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
        modulator = None if make_modulator is None else make_modulator(model.modality_modules())
        if modulator is not None:
            modulator.attach(optimizer)
        return Case(lambda: cremad_step(model, optimizer, inputs, target, modulator))

    cases = {
        "training step": step_with(None),
        "step + OGM features": step_with(
            lambda modules: gradmod.OGM(modules, alpha=0.8, apply="features", validate=False)
        ),
    }
    conv_elements = sum(p.numel() for p in initial.parameters() if filters.conv_weights("", p))
    for backend in available_backends(device, args.interpreted_triton, conv_elements):
        cases[f"step + OGM-GE ({backend})"] = step_with(
            lambda modules, b=backend: gradmod.OGMGE(
                modules, alpha=0.8, param_filter=filters.conv_weights, backend=b, validate=False
            )
        )
    steps = measure(cases, device, args.step_repeats, args.rounds)
    del cases
    model = initial
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    cremad_step(model, optimizer, inputs, target)
    workload = {
        name: [p for p in module.parameters() if p.grad is not None and filters.conv_weights("", p)]
        for name, module in model.modality_modules().items()
    }
    return workload, steps


# ---------------------------------------------------------------------------------------- reports


def _ratio(rounds: list[float], reference: list[float] | None) -> float | None:
    """Median over the rounds of ``rounds[r] / reference[r]``: both timed in the same round, so load that
    drifts between rounds cancels."""
    if reference is None:
        return None
    return statistics.median(a / b for a, b in zip(rounds, reference, strict=True))


def _row(name: str, timing: Timing, floor: list[float] | None, official: list[float] | None,
         step: float | None) -> dict:
    """Median milliseconds (device and host), spread across rounds ((max − min) / median) and the ratios
    (to the floor and the official loop of the same rounds, to the median training step)."""
    rounds = timing.device
    median = statistics.median(rounds)
    return {
        "name": name,
        "ms": median * 1e3,
        "host_ms": statistics.median(timing.host) * 1e3 if timing.host else None,
        "spread": (max(rounds) - min(rounds)) / median if median else 0.0,
        "rounds_ms": [t * 1e3 for t in rounds],
        "x_floor": _ratio(rounds, floor),
        "x_official": _ratio(rounds, official),
        "x_step": None if step is None else median / step,
    }


def report(device: torch.device, workload_name: str, workload: Workload, seconds: dict[str, Timing],
           steps: dict[str, Timing]) -> dict:
    """One table (printed) and its JSON record."""
    grads = [g for grads in grads_of(workload) for g in grads]
    nbytes = sum(g.numel() * g.element_size() for g in grads)
    elements = sum(g.numel() for g in grads)
    mul = seconds.pop("in-place mul_")
    floor_rounds = [t * UPDATE_PASSES / MUL_PASSES for t in mul.device]
    floor = statistics.median(floor_rounds)
    official = seconds["official loop"].device
    step = statistics.median(steps["training step"].device) if steps else None
    rows = [
        _row("in-place mul_", mul, floor_rounds, official, step),
        _row("floor (1.5 × mul_)", Timing(floor_rounds, []), floor_rounds, official, step),
    ]
    rows += [_row(name, timing, floor_rounds, official, step) for name, timing in seconds.items()]
    step_rows = [_row(name, timing, None, None, step) for name, timing in steps.items()]
    cuda = device.type == "cuda"
    print(f"\n{device.type} · {workload_name}: {elements:,} elements in {len(grads)} tensors, {nbytes / 1e6:.1f} MB; "
          f"floor {floor * 1e3:.3f} ms = {UPDATE_PASSES * nbytes / floor / 1e9:.1f} GB/s over 3 passes")
    host = f" {'host ms':>8s}" if cuda else ""
    print(f"  {'':28s} {'ms':>10s} {'spread':>7s} {'/ floor':>8s} {'/ official':>11s} {'/ step':>7s}{host}")

    def cell(value: float | None, width: int, digits: int) -> str:
        return " " * width if value is None else f"{value:{width}.{digits}f}"

    for row in rows + step_rows:
        host_cell = f" {cell(row['host_ms'], 8, 3)}" if cuda else ""
        print(f"  {row['name']:28s} {row['ms']:10.3f} {row['spread']:6.0%} {cell(row['x_floor'], 8, 2)} "
              f"{cell(row['x_official'], 11, 3)} {cell(row['x_step'], 7, 3)}{host_cell}")
    return {
        "device": device.type,
        "workload": workload_name,
        "elements": elements,
        "tensors": len(grads),
        "bytes": nbytes,
        "floor_bytes_per_s": UPDATE_PASSES * nbytes / floor,
        "modulation": rows,
        "steps": step_rows,
    }


def environment(devices: list[torch.device]) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if any(d.type == "cuda" for d in devices):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def bookkeeping() -> dict:
    """Device operations of a modulator's ``observe()`` + ``step()`` beyond the kernels (`benchmarks/op_count.py`)."""
    counts = {f"validate={v}": count_bookkeeping_ops(validate=v) for v in (False, True)}
    summary = ", ".join(f"{name}: {c['compute_ops']} ops (+{c['view_ops']} views)" for name, c in counts.items())
    print(f"\nbookkeeping per step (observe + step, kernels excluded, any device): {summary}")
    return counts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", nargs="+", choices=["cpu", "cuda"], help="default: cpu, and cuda when present")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--synthetic", nargs="*", type=float, help="total elements of the synthetic lists "
                        "(default: 1e6 1e7 1e8 on CPU, 1e6 1e7 1e8 1e9 on CUDA)")
    parser.add_argument("--small", nargs=2, type=int, default=[200, 2048], metavar=("COUNT", "SIZE"),
                        help="the small-tensor workload: COUNT tensors of SIZE elements (COUNT 0: skip)")
    parser.add_argument("--no-cremad", action="store_true", help="skip the CREMA-D model workload")
    shape = ("B", "T", "IMG", "F", "S")
    parser.add_argument("--cpu-sizes", nargs=5, type=int, default=[4, 1, 112, 129, 94], metavar=shape,
                        help="CREMA-D batch, frames, image side, spectrogram bins × steps on CPU")
    parser.add_argument("--cuda-sizes", nargs=5, type=int, default=[64, 1, 224, 257, 188], metavar=shape,
                        help="the same on CUDA (default: the official protocol, batch 64)")
    parser.add_argument("--repeats", type=int, default=None, help="calls per round (default 20 on CUDA, 3 on CPU)")
    parser.add_argument("--step-repeats", type=int, default=None, help="training steps per round (default 10 / 2)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new workload after this many seconds (the rest is listed as skipped)")
    parser.add_argument("--interpreted-triton", action="store_true",
                        help="time the Triton backend under TRITON_INTERPRET=1 on the CPU too (dry runs only)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round: a smoke run under a minute")
    parser.add_argument("--out", type=Path, help="write the results as JSON (after every workload)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 1
        args.cpu_sizes = [2, 1, 32, 33, 24]
        args.small = [min(args.small[0], 20), args.small[1]]
    for flag in ("cpu_sizes", "cuda_sizes"):
        if getattr(args, flag)[0] < 2:
            parser.error(f"--{flag.replace('_', '-')}: batch must be >= 2 (batch norm in training mode)")
    return args


def _workloads(args: argparse.Namespace, device: torch.device) -> list[tuple[str, Callable]]:
    """``(name, build)`` pairs in the order they run; ``build`` returns the workload and its step timings."""
    dtype = DTYPES[args.dtype]
    cuda = device.type == "cuda"
    sizes = args.synthetic
    if sizes is None:
        sizes = [1e6, 1e7] if args.quick else [1e6, 1e7, 1e8, 1e9] if cuda else [1e6, 1e7, 1e8]
    plan: list[tuple[str, Callable]] = []
    if not args.no_cremad:
        plan.append(("CREMA-D ResNet-18 ×2 conv weights", lambda: cremad_workload(args, device, dtype)))
    count, size = args.small
    if count > 0:
        plan.append((f"small: {count} × {size}", lambda: (small_workload(count, size, device, dtype), {})))
    for elements in sizes:
        plan.append((f"synthetic {elements:.0e}", lambda n=int(elements): (synthetic_workload(n, device, dtype), {})))
    return plan


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    sys.stdout.reconfigure(line_buffering=True)  # progress shows up when piped to a file
    names = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    devices = [torch.device(n) for n in names]
    if any(d.type == "cuda" for d in devices) and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but no CUDA device is available")
    command = " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])])
    results = {"environment": environment(devices), "command": command, "config": {}, "results": [], "skipped": [],
               "failed": []}

    def save() -> None:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2, default=str))

    try:
        results["bookkeeping"] = bookkeeping()
    except Exception as error:  # noqa: BLE001 — recorded; the timings still run
        traceback.print_exc()
        results["failed"].append({"device": "any", "workload": "bookkeeping count", "error": repr(error)})
    save()
    for device in devices:
        cuda = device.type == "cuda"
        local = argparse.Namespace(**vars(args))
        local.repeats = args.repeats or (20 if cuda else 3 if not args.quick else 1)
        local.step_repeats = args.step_repeats or (10 if cuda else 2 if not args.quick else 1)
        results["config"][device.type] = {k: v for k, v in vars(local).items() if k != "out"}
        for name, build in _workloads(local, device):
            if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
                print(f"\n{device.type} · {name}: skipped (time budget of {args.budget_s:.0f} s spent)")
                results["skipped"].append({"device": device.type, "workload": name, "reason": "time budget"})
                continue
            try:
                workload, steps = build()
                seconds = time_modulation(workload, device, local)
                results["results"].append(report(device, name, workload, seconds, steps))
            except Exception as error:  # noqa: BLE001 — recorded; the next workloads still run
                traceback.print_exc()
                results["failed"].append({"device": device.type, "workload": name, "error": repr(error)})
            save()
            workload = steps = None
            if cuda:
                torch.cuda.empty_cache()
    results["seconds"] = time.perf_counter() - started
    save()
    if args.out:
        print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    raise SystemExit(1 if main()["failed"] else 0)
