"""Speed of GE gradient modulation: kernels vs the reference loop, the memory-bandwidth floor and the training step.

For each device (CPU, and CUDA when present) and each workload — the OGM-GE CREMA-D model (two
torchvision ResNet-18 encoders, conv weights modulated, as in the official code) and synthetic parameter
lists of 1e6…1e9 elements — this times, in one run:

* ``official loop``: the OGM-GE code's per-parameter loop,
  ``grad = grad * coeff + torch.zeros_like(grad).normal_(0, grad.std().item() + 1e-8)``;
* every ``gradmod.kernels`` backend usable on the device (``reference``, ``foreach``, ``triton``), called
  once per modality as `gradmod.Modulator` does, with GE noise (``noise_scale = 1``);
* the bandwidth floor: ``3 × gradient bytes / copy bandwidth`` (one read for the statistics, one read +
  write for the update), the bandwidth measured with a large ``copy_`` (bytes read + written / time);
* CREMA-D only: the training step (forward, backward, SGD step), the step with ``gradmod.OGM(...,
  apply="features")`` and the step with ``gradmod.OGMGE`` on every backend.

It prints one table per device and workload (ratios: backend / floor, backend / official loop,
modulation / training step) and writes everything as JSON (``--out``). Times are the median over
``--rounds`` of the mean over ``--repeats`` back-to-back calls, synchronised at the end of each round.

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gradmod  # noqa: E402
from gradmod import filters  # noqa: E402
from gradmod.kernels import foreach as foreach_kernel  # noqa: E402
from gradmod.kernels import reference as reference_kernel  # noqa: E402

Grads = dict[str, list[Tensor]]
MODALITIES = ("audio", "visual")
#: Coefficients used for the modulation timings (a damped audio, an undamped visual, as OGM-GE produces).
COEFFICIENTS = {"audio": 0.6, "visual": 1.0}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def measure(cases: Mapping[str, Case], device: torch.device, repeats: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of every case, one value per round: (``repeats`` calls, synchronised) / ``repeats``.

    Rounds are interleaved across the cases (round 1 of every case, then round 2, …) so that drifting
    load on the machine biases no case; each case runs once untimed first (warm-up, compilation).
    """
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_index in range(rounds + 1):
        for name, case in cases.items():
            case.setup()
            synchronize(device)
            start = time.perf_counter()
            for _ in range(repeats if round_index else 1):
                case.run()
            synchronize(device)
            if round_index:
                times[name].append((time.perf_counter() - start) / repeats)
            case.teardown()
    return times


def copy_bandwidth(device: torch.device, megabytes: int, rounds: int) -> float:
    """Bytes per second moved by ``dst.copy_(src)`` (each byte counted once read and once written)."""
    src = torch.empty(megabytes * 2**20 // 4, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = measure({"copy": Case(lambda: dst.copy_(src))}, device, repeats=5, rounds=max(rounds, 3))["copy"]
    return 2 * src.numel() * src.element_size() / statistics.median(seconds)


def repeats_for(elements: int, requested: int) -> int:
    """Fewer repeats for big workloads (each call already runs long)."""
    return max(1, min(requested, int(2e8 // max(elements, 1))))


# ------------------------------------------------------------------------------------- modulation


def official_loop(grads: Grads) -> Grads:
    """The OGM-GE code's per-parameter loop: a new tensor per gradient, one ``.item()`` sync per tensor."""
    return {
        name: [grad * COEFFICIENTS[name] + torch.zeros_like(grad).normal_(0, grad.std().item() + 1e-8) for grad in tensors]
        for name, tensors in grads.items()
    }


def kernel_call(kernel: Callable, grads: Grads, device: torch.device) -> Callable[[], None]:
    """One call of ``kernel`` per modality with GE noise, as `gradmod.Modulator` makes them."""
    coefficients = {name: torch.tensor(COEFFICIENTS[name], device=device) for name in grads}
    noise_scale = torch.ones((), device=device)
    generator = torch.Generator(device).manual_seed(0)

    def call() -> None:
        for name, tensors in grads.items():
            kernel(tensors, coefficients[name], noise_scale, generator)

    return call


def available_kernels(device: torch.device) -> dict[str, Callable]:
    """The gradmod backends that run on ``device`` (Triton only compiled, on CUDA)."""
    kernels: dict[str, Callable] = {"reference": reference_kernel.modulate_, "foreach": foreach_kernel.modulate_}
    if device.type == "cuda":
        try:
            from gradmod.kernels import triton as triton_kernel
        except ImportError as error:
            print(f"  triton skipped: {error}")
        else:
            ok, reason = triton_kernel.is_available()
            if ok and not triton_kernel.INTERPRETED:
                kernels["triton"] = triton_kernel.modulate_
            else:
                print(f"  triton skipped: {reason}")
    return kernels


def time_modulation(grads: Grads, device: torch.device, args: argparse.Namespace) -> dict[str, list[float]]:
    """Seconds per modulation of ``grads`` (per round) for the official loop and every backend.

    The kernels modulate ``grads`` in place; they are restored before every round, so that repeated GE
    noise cannot grow them out of range (fp16).
    """
    pristine = {name: [g.clone() for g in tensors] for name, tensors in grads.items()}
    elements = sum(g.numel() for tensors in grads.values() for g in tensors)
    repeats = repeats_for(elements, args.repeats)

    def restore() -> None:
        for name, tensors in grads.items():
            for g, p in zip(tensors, pristine[name]):
                g.copy_(p)

    cases = {"official loop": Case(lambda: official_loop(grads))}
    for name, kernel in available_kernels(device).items():
        cases[name] = Case(kernel_call(kernel, grads, device), setup=restore)
    seconds = measure(cases, device, repeats, args.rounds)
    restore()
    return seconds


# -------------------------------------------------------------------------------------- workloads


def synthetic_gradients(elements: int, device: torch.device, dtype: torch.dtype) -> Grads:
    """``elements`` gradient elements in tensors of ResNet-18 conv-weight sizes, split over two modalities."""
    from torchvision.models import resnet18

    pattern = [p.numel() for p in resnet18(weights=None).parameters() if p.dim() == 4]
    sizes, total, i = [], 0, 0
    while total < elements:
        size = min(pattern[i % len(pattern)], elements - total)
        sizes.append(size)
        total += size
        i += 1
    grads: Grads = {name: [] for name in MODALITIES}
    for j, size in enumerate(sizes):
        grads[MODALITIES[j % 2]].append(torch.randn(size, device=device, dtype=dtype) * 1e-3)
    return grads


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
        features = output.features if modulator.apply == "features" else None
        modulator.observe(logits=output.unimodal_logits, target=target, features=features)
    model.loss(output, target).backward()
    optimizer.step()


def cremad_workload(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> tuple[Grads, dict[str, list[float]]]:
    """The conv-weight gradients of one step, and seconds per training step (per round), with and without modulation."""
    from reference_models.models.cremad import CremaDModel

    torch.manual_seed(0)
    model = CremaDModel(fusion="concat").to(device=device, dtype=dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    inputs, target = cremad_batch(args, device, dtype)
    modules = model.modality_modules()

    def step_with(modulator: gradmod.Modulator | None) -> Case:
        """The training step, with ``modulator`` attached to the optimizer during its rounds."""
        handles = []

        def attach() -> None:
            if modulator is not None:
                handles.append(modulator.attach(optimizer))

        def detach() -> None:
            while handles:
                handles.pop().remove()

        return Case(lambda: cremad_step(model, optimizer, inputs, target, modulator), attach, detach)

    cases = {
        "training step": step_with(None),
        "step + OGM features": step_with(gradmod.OGM(modules, alpha=0.8, apply="features", validate=False)),
    }
    for backend in available_kernels(device):
        modulator = gradmod.OGMGE(
            modules, alpha=0.8, param_filter=filters.conv_weights, backend=backend, validate=False
        )
        cases[f"step + OGM-GE ({backend})"] = step_with(modulator)
    steps = measure(cases, device, args.step_repeats, args.rounds)

    cremad_step(model, optimizer, inputs, target)
    grads = {
        name: [p.grad for p in module.parameters() if p.grad is not None and filters.conv_weights("", p)]
        for name, module in modules.items()
    }
    return grads, steps


# ---------------------------------------------------------------------------------------- reports


def _row(name: str, rounds: list[float], floor: float, official: float, step: float | None) -> dict:
    """Median milliseconds, spread across rounds ((max − min) / median) and the ratios of one timed case."""
    median = statistics.median(rounds)
    return {
        "name": name,
        "ms": median * 1e3,
        "spread": (max(rounds) - min(rounds)) / median,
        "rounds_ms": [t * 1e3 for t in rounds],
        "x_floor": None if floor is None else median / floor,
        "x_official": None if official is None else median / official,
        "x_step": None if step is None else median / step,
    }


def report(
    device: torch.device,
    workload: str,
    grads: Grads,
    bandwidth: float,
    seconds: dict[str, list[float]],
    steps: dict[str, list[float]],
) -> dict:
    """One table (printed) and its JSON record."""
    nbytes = sum(g.numel() * g.element_size() for tensors in grads.values() for g in tensors)
    floor = 3 * nbytes / bandwidth
    official = statistics.median(seconds["official loop"])
    step = statistics.median(steps["training step"]) if steps else None
    rows = [_row("bandwidth floor", [floor], floor, official, step)]
    rows += [_row(name, rounds, floor, official, step) for name, rounds in seconds.items()]
    step_rows = [_row(name, rounds, None, None, step) for name, rounds in steps.items()]

    elements = sum(g.numel() for tensors in grads.values() for g in tensors)
    tensors = sum(len(t) for t in grads.values())
    print(f"\n{device.type} · {workload}: {elements:,} elements in {tensors} tensors, {nbytes / 1e6:.1f} MB, "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"  {'':28s} {'ms':>10s} {'spread':>7s} {'/ floor':>8s} {'/ official':>11s} {'/ step':>7s}")

    def cell(value: float | None, width: int, digits: int) -> str:
        return " " * width if value is None else f"{value:{width}.{digits}f}"

    for row in rows + step_rows:
        print(f"  {row['name']:28s} {row['ms']:10.3f} {row['spread']:6.0%} {cell(row['x_floor'], 8, 2)} "
              f"{cell(row['x_official'], 11, 3)} {cell(row['x_step'], 7, 3)}")
    return {
        "device": device.type,
        "workload": workload,
        "elements": elements,
        "tensors": tensors,
        "bytes": nbytes,
        "bandwidth_bytes_per_s": bandwidth,
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", nargs="+", choices=["cpu", "cuda"], help="default: cpu, and cuda when present")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--synthetic", nargs="*", type=float, help="total elements of the synthetic lists "
                        "(default: 1e6 1e7 1e8 on CPU, 1e6 1e7 1e8 1e9 on CUDA)")
    parser.add_argument("--no-cremad", action="store_true", help="skip the CREMA-D model workload")
    shape = ("B", "T", "IMG", "F", "S")
    parser.add_argument("--cpu-sizes", nargs=5, type=int, default=[4, 1, 112, 129, 94], metavar=shape,
                        help="CREMA-D batch, frames, image side, spectrogram bins × steps on CPU")
    parser.add_argument("--cuda-sizes", nargs=5, type=int, default=[64, 1, 224, 257, 188], metavar=shape,
                        help="the same on CUDA (default: the official protocol, batch 64)")
    parser.add_argument("--repeats", type=int, default=None, help="calls per round (default 20 on CUDA, 3 on CPU)")
    parser.add_argument("--step-repeats", type=int, default=None, help="training steps per round (default 10 / 2)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bandwidth-mb", type=int, default=512, help="buffer size of the copy-bandwidth measurement")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round: a smoke run under a minute")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 1
        args.cpu_sizes = [2, 1, 32, 33, 24]
        args.bandwidth_mb = min(args.bandwidth_mb, 128)
    for flag in ("cpu_sizes", "cuda_sizes"):
        if getattr(args, flag)[0] < 2:
            parser.error(f"--{flag.replace('_', '-')}: batch must be >= 2 (batch norm in training mode)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress shows up when piped to a file
    names = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    devices = [torch.device(n) for n in names]
    if any(d.type == "cuda" for d in devices) and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but no CUDA device is available")
    dtype = DTYPES[args.dtype]
    results = {"environment": environment(devices), "command": " ".join(sys.argv), "config": {}, "results": []}
    for device in devices:
        cuda = device.type == "cuda"
        local = argparse.Namespace(**vars(args))
        local.repeats = args.repeats or (20 if cuda else 3 if not args.quick else 1)
        local.step_repeats = args.step_repeats or (10 if cuda else 2 if not args.quick else 1)
        sizes = args.synthetic
        if sizes is None:
            sizes = [1e6, 1e7] if args.quick else [1e6, 1e7, 1e8, 1e9] if cuda else [1e6, 1e7, 1e8]
        results["config"][device.type] = {k: v for k, v in vars(local).items() if k != "out"} | {"synthetic": sizes}
        bandwidth = copy_bandwidth(device, args.bandwidth_mb, args.rounds)
        if not args.no_cremad:
            grads, steps = cremad_workload(local, device, dtype)
            seconds = time_modulation(grads, device, local)
            workload = "CREMA-D ResNet-18 ×2 conv weights"
            results["results"].append(report(device, workload, grads, bandwidth, seconds, steps))
            del grads
        for elements in sizes:
            grads = synthetic_gradients(int(elements), device, dtype)
            seconds = time_modulation(grads, device, local)
            results["results"].append(report(device, f"synthetic {elements:.0e}", grads, bandwidth, seconds, {}))
            del grads
            if cuda:
                torch.cuda.empty_cache()
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=str))
        print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()
