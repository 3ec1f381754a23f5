"""The per-step bookkeeping: its device-operation budget, and the capture-safe mode (no host synchronisation,
no Python state a CUDA-graph replay would skip, no graph break in gradmod's own code)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

import gradmod

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from op_count import count_bookkeeping_ops  # noqa: E402

#: Device operations one observe() + step() may launch besides the kernels (two modalities, validate=False).
BUDGET = 16


def test_bookkeeping_stays_within_its_operation_budget():
    counted = count_bookkeeping_ops(validate=False)
    assert counted["compute_ops"] <= BUDGET, counted


class _NoHostSync(TorchFunctionMode):
    """Fails on every way gradmod's bookkeeping could read a tensor's value on the host.

    The kernels are left out: on the CPU they may read CPU scalars, which synchronises nothing; their
    capture-safe path on accelerators is the kernels' own tests' business.
    """

    READS = {Tensor.item, Tensor.tolist, Tensor.__bool__, Tensor.__int__, Tensor.__float__, Tensor.numpy, Tensor.cpu}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS and not _called_from_kernels():
            raise AssertionError(f"host synchronisation: {func.__name__}")
        return func(*args, **(kwargs or {}))


def _called_from_kernels() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if "gradmod/kernels" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def tiny(seed=0):
    torch.manual_seed(seed)
    audio, visual = nn.Linear(4, 4), nn.Linear(4, 4)
    return audio, visual


def batch(step: int):
    g = torch.Generator().manual_seed(step)
    return {"audio": torch.randn(8, 3, generator=g) * 3, "visual": torch.randn(8, 3, generator=g)}, torch.randint(0, 3, (8,), generator=g)


def run_steps(mod, encoders, steps, start=0, guard=None):
    for step in range(start, start + steps):
        for p in (*encoders[0].parameters(), *encoders[1].parameters()):
            p.grad = torch.full_like(p, 1.0 + step)
        logits, y = batch(step)
        if guard is None:
            mod.observe(logits=logits, target=y)
            mod.step()
        else:
            with guard():
                mod.observe(logits=logits, target=y)
                mod.step()
    return [p.grad.clone() for p in (*encoders[0].parameters(), *encoders[1].parameters())]


def state_of(obj, seen=None) -> object:
    """Python-side state of ``obj`` (recursively): tensors by identity, everything else by value."""
    seen = set() if seen is None else seen
    if isinstance(obj, Tensor):
        return ("tensor", id(obj))
    if id(obj) in seen or isinstance(obj, (nn.Module, torch.utils.hooks.RemovableHandle)):
        return ("seen", id(obj))
    if isinstance(obj, (list, tuple)):
        return [state_of(item, seen) for item in obj]
    if isinstance(obj, dict):
        return {str(key): state_of(value, seen) for key, value in obj.items()}
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith("gradmod"):
        seen.add(id(obj))
        return {key: state_of(value, seen) for key, value in vars(obj).items() if not key.startswith("_monitor")}
    return repr(obj) if not callable(obj) else ("callable", id(obj))


@pytest.mark.parametrize("apply", ["params", "features"])
def test_capture_safe_steps_read_nothing_on_the_host_and_change_no_python_state(apply):
    audio, visual = tiny()
    mod = gradmod.OGM({"audio": audio, "visual": visual}, alpha=0.8, validate=False, capture_safe=True, apply=apply,
                      start_step=1, stop_step=5)
    run_steps(mod, (audio, visual), 2)  # warm-up: buffers are made at the first step
    before = copy.deepcopy(state_of(mod))
    run_steps(mod, (audio, visual), 4, start=2, guard=_NoHostSync)
    assert state_of(mod) == before
    assert mod.step_count == 6
    assert [r["status"] for r in mod.history] == ["outside", "applied", "applied", "applied", "applied", "outside"]


def test_capture_safe_steps_equal_ordinary_steps():
    audio, visual = tiny()
    plain = gradmod.OGM({"audio": audio, "visual": visual}, alpha=0.8, validate=False, start_step=1, stop_step=4)
    expected = run_steps(plain, (audio, visual), 6)
    audio2, visual2 = tiny()
    safe = gradmod.OGM({"audio": audio2, "visual": visual2}, alpha=0.8, validate=False, capture_safe=True, start_step=1, stop_step=4)
    got = run_steps(safe, (audio2, visual2), 6)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    applied = [r for r in safe.history if r["status"] == "applied"]
    assert applied == plain.history


def test_capture_safe_without_evidence_is_a_neutral_degenerate_step():
    audio, visual = tiny()
    mod = gradmod.OGM({"audio": audio, "visual": visual}, alpha=0.8, validate=False, capture_safe=True)
    run_steps(mod, (audio, visual), 1)
    for p in (*audio.parameters(), *visual.parameters()):
        p.grad = torch.ones_like(p)
    mod.step()  # no observe(): zero evidence
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in (*audio.parameters(), *visual.parameters()))
    assert mod.last["status"] == "degenerate" and mod.step_count == 2


def test_capture_safe_state_dict_round_trip_and_reset():
    audio, visual = tiny()
    mod = gradmod.OGM({"audio": audio, "visual": visual}, alpha=0.8, validate=False, capture_safe=True)
    run_steps(mod, (audio, visual), 3)
    state = mod.state_dict()
    other = gradmod.OGM({"audio": audio, "visual": visual}, alpha=0.8, validate=False, capture_safe=True)
    run_steps(other, (audio, visual), 1)  # its buffers exist: loading writes into them
    buffers = (other._device_step, other._pending)
    other.load_state_dict(state)
    assert other.step_count == 3 and other.history == mod.history
    assert (other._device_step, other._pending) == buffers
    other.reset()
    assert other.step_count == 0 and other.history == []
    with pytest.raises(ValueError, match="validate=False"):
        gradmod.OGM({"audio": audio, "visual": visual}, alpha=0.8, capture_safe=True)


def test_capture_safe_skips_steps_grad_scaler_skips():
    audio, visual = tiny()
    mod = gradmod.OGM({"audio": audio, "visual": visual}, alpha=0.8, validate=False, capture_safe=True)
    opt = torch.optim.Adam([*audio.parameters(), *visual.parameters()], lr=0.1, fused=True)
    mod.attach(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    for step in range(3):
        opt.zero_grad()
        logits, y = batch(step)
        xa, xv = torch.randn(8, 4), torch.randn(8, 4)
        mod.observe(logits=logits, target=y)
        loss = audio(xa).sum() + visual(xv).sum()
        scaler.scale(loss * (float("inf") if step == 1 else 1.0)).backward()
        scaler.step(opt)
        scaler.update()
    assert mod.step_count == 2
    assert [r["step"] for r in mod.history] == [0, 1]


def test_modulator_steps_compile_without_graph_breaks_in_gradmods_own_code():
    """`torch._dynamo.explain` over observe() + step(): any break must come from the kernels, not the bookkeeping."""
    audio, visual = tiny()
    mod = gradmod.OGM({"audio": audio, "visual": visual}, alpha=0.8, validate=False, capture_safe=True,
                      apply=gradmod.ParamsApplier(backend="reference"))
    run_steps(mod, (audio, visual), 1)
    logits, y = batch(5)

    def step(logits, y):
        mod.observe(logits=logits, target=y)
        return mod.step()

    explanation = torch._dynamo.explain(step)(logits, y)
    outside_kernels = [
        reason for reason in explanation.break_reasons
        if not any("gradmod/kernels" in frame.filename for frame in reason.user_stack)
    ]
    assert outside_kernels == [], [str(reason.reason)[:200] for reason in outside_kernels]
