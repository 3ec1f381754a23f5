"""gradmod.diagnose.Monitor: changes nothing, records the right numbers, no host synchronisation, state."""

from __future__ import annotations

import collections
import math
import sys
from pathlib import Path

import pytest
import torch
from tiny import TinyModel, batches
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gradmod.diagnose import Monitor
from gradmod.functional import discrepancy_ratios, ogm_scores
from gradmod.measures import SoftmaxScore
from gradmod.methods.decoupling_free import ZetaGate
from gradmod.methods.dgm import DGMScore

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from diagnose_overhead import count_monitor_ops


def _train(monitor_kind: str | None, names=("audio", "visual"), epochs: int = 2, steps: int = 4):
    """SGD with momentum and dropout (which draws from torch's RNG) over a few steps."""
    torch.manual_seed(0)
    model = TinyModel(names)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    monitor = None
    if monitor_kind is not None:
        measure = {"softmax": SoftmaxScore(), "dgm": DGMScore(), "zeta": ZetaGate(), "none": None}
        monitor = Monitor(dict(model.encoders), measure=measure[monitor_kind])
        monitor.attach(optimizer)
    data = batches(steps, names=names)
    for epoch in range(epochs):
        if monitor is not None:
            monitor.start_epoch(epoch)
        for x, y in data:
            logits, decoupled, _, zeta = model(x)
            if monitor_kind in ("softmax", "dgm"):
                monitor.observe(logits=decoupled, target=y)
            elif monitor_kind == "zeta":
                monitor.observe(zeta=zeta)
            optimizer.zero_grad()
            nn.functional.cross_entropy(nn.functional.dropout(logits, 0.3), y).backward()
            optimizer.step()
        if monitor is not None:
            monitor.end_epoch(epoch)
    return model, optimizer, monitor


@pytest.mark.parametrize("kind", ["softmax", "dgm", "zeta", "none"])
def test_a_run_with_the_monitor_equals_a_run_without_it_bit_for_bit(kind):
    plain, plain_opt, _ = _train(None)
    plain_rng = torch.get_rng_state()
    watched, watched_opt, monitor = _train(kind)
    assert torch.equal(torch.get_rng_state(), plain_rng)
    for p, q in zip(plain.parameters(), watched.parameters(), strict=True):
        assert torch.equal(p, q)
    for p, q in zip(plain.parameters(), watched.parameters()):
        left, right = plain_opt.state.get(p, {}), watched_opt.state.get(q, {})
        assert left.keys() == right.keys()
        assert all(torch.equal(left[key], right[key]) for key in left)
    assert len(monitor.history) == 8 and len(monitor.epochs) == 2


def test_recorded_numbers_against_a_hand_computation():
    torch.manual_seed(0)
    model = TinyModel(("a", "b", "c"))
    monitor = Monitor(dict(model.encoders))
    x, y = batches(1, names=("a", "b", "c"))[0]
    logits, decoupled, _, _ = model(x)
    monitor.observe(logits=decoupled, target=y)
    monitor.observe(logits=decoupled, target=y)  # two micro-batches add up
    nn.functional.cross_entropy(logits, y).backward()
    monitor.step()
    record = monitor.last
    scores = {n: 2 * ogm_scores(decoupled[n], y) for n in "abc"}
    expected_ratios = discrepancy_ratios(scores)
    for n in "abc":
        params = [p for p in model.encoders[n].parameters()]
        g = math.sqrt(sum(float(p.grad.double().square().sum()) for p in params))
        w = math.sqrt(sum(float(p.detach().double().square().sum()) for p in params))
        assert record["evidence"][n] == pytest.approx(float(scores[n]), rel=1e-6)
        assert record["ratios"][n] == pytest.approx(float(expected_ratios[n]), rel=1e-5)
        assert record["grad_norm"][n] == pytest.approx(g, rel=1e-5)
        assert record["weight_norm"][n] == pytest.approx(w, rel=1e-5)
        assert record["grad_to_weight"][n] == pytest.approx(g / w, rel=1e-5)
    total = sum(record["grad_to_weight"].values())
    assert record["share"]["b"] == pytest.approx(record["grad_to_weight"]["b"] / total, rel=1e-6)
    assert sum(record["share"].values()) == pytest.approx(1.0)
    scalars = monitor.scalars()
    assert set(scalars) == {f"{f}/{n}" for f in ("ratios", "grad_to_weight", "share", "grad_norm") for n in "abc"}


def test_parameters_without_a_gradient_count_in_neither_norm():
    a, b = nn.Linear(3, 3), nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    monitor = Monitor({"a": a, "b": b}, measure=None)
    b[0](torch.randn(2, 3)).sum().backward()  # b[1] gets no gradient, a none at all
    monitor.step()
    record = monitor.last
    expected = math.sqrt(sum(float(p.detach().square().sum()) for p in b[0].parameters()))
    assert record["weight_norm"]["b"] == pytest.approx(expected, rel=1e-6)
    assert record["grad_norm"]["a"] == 0 and record["weight_norm"]["a"] == 0
    assert math.isnan(record["evidence"]["a"]) and record["status"] == "degenerate"


def test_observe_and_step_never_synchronise_and_stay_small():
    counted = count_monitor_ops()
    assert counted["host_synchronisations"] == 0
    assert counted["compute_operations"] == {"observe": 5, "step": 7}  # the counts the docs quote
    assert counted["operators"]["step"]["_foreach_norm"] == 1


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_every_records_one_step_in_k_and_observe_skips_the_others():
    torch.manual_seed(0)
    model = TinyModel()
    monitor = Monitor(dict(model.encoders), every=3)
    for x, y in batches(7):
        logits, decoupled, _, _ = model(x)
        if monitor.recording:
            monitor.observe(logits=decoupled, target=y)
        else:
            with _Ops() as skipped:
                monitor.observe(logits=decoupled, target=y)
            assert not skipped.ops
        model.zero_grad()
        nn.functional.cross_entropy(logits, y).backward()
        monitor.step()
    assert [r["step"] for r in monitor.history] == [0, 3, 6]
    assert all(r["status"] == "applied" for r in monitor.history)
    assert monitor.step_count == 7 and "every=3" in repr(monitor)


def test_skip_step_drops_the_evidence():
    model = TinyModel()
    monitor = Monitor(dict(model.encoders))
    x, y = batches(1)[0]
    monitor.observe(logits=model(x)[1], target=y)
    monitor.skip_step()
    with pytest.warns(RuntimeWarning, match="without observe"):
        monitor.step()
    assert monitor.last["status"] == "degenerate"


def test_the_hook_steps_it_and_a_closure_is_refused():
    model = TinyModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = Monitor(dict(model.encoders), measure=None)
    monitor.attach(optimizer)
    assert monitor.attached_to is optimizer
    model(batches(1)[0][0])[0].sum().backward()
    optimizer.step()
    assert monitor.step_count == 1
    with pytest.raises(RuntimeError, match="closure"):
        optimizer.step(lambda: None)
    monitor.detach()
    optimizer.step()
    assert monitor.step_count == 1


def test_state_round_trip_reset_and_version_refusal():
    _, _, monitor = _train("softmax")
    state = monitor.state_dict()
    fresh = Monitor(dict(TinyModel().encoders))
    fresh.load_state_dict(state)
    assert fresh.history == monitor.history and fresh.epochs == monitor.epochs and fresh.step_count == 8
    state["version"] = 99
    with pytest.raises(ValueError, match="newer"):
        fresh.load_state_dict(state)
    fresh.reset()
    assert fresh.history == [] and fresh.epochs == [] and fresh.step_count == 0 and fresh.scalars() == {}


def test_epoch_summaries_are_means_of_the_epoch_steps():
    _, _, monitor = _train("softmax", epochs=2, steps=3)
    history = monitor.history
    second = monitor.epochs[1]
    assert second["epoch"] == 1 and second["steps"] == 3 and second["observed"] == 3
    for field in ("ratios", "share", "grad_to_weight"):
        expected = sum(r[field]["visual"] for r in history[3:]) / 3
        assert second[field]["visual"] == pytest.approx(expected, rel=1e-6)
    assert monitor.summary()["steps"] == 6
    flat = monitor.epoch_scalars()
    assert flat["epoch_ratios/audio"] == pytest.approx(second["ratios"]["audio"])


def test_errors_and_warnings_name_the_problem():
    model = TinyModel()
    with pytest.raises(ValueError, match="two or more"):
        Monitor({"audio": model.encoders["audio"]})
    with pytest.raises(TypeError, match="Measure"):
        Monitor(dict(model.encoders), measure="softmax")
    with pytest.raises(ValueError, match="every"):
        Monitor(dict(model.encoders), every=0)
    monitor = Monitor(dict(model.encoders))
    x, y = batches(1)[0]
    with pytest.raises(TypeError, match="unexpected inputs"):
        monitor.observe(zeta=torch.rand(4))
    with pytest.raises(ValueError, match="missing"):
        monitor.observe(logits={"audio": model(x)[1]["audio"]}, target=y)
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="holds none of modality 'audio'"):
        monitor.attach(other)
    with pytest.raises(TypeError, match="measure=None"):
        Monitor(dict(model.encoders), measure=None).observe(logits={}, target=y)
    with pytest.warns(RuntimeWarning, match="end_epoch\\(0\\) but no optimizer step"):
        monitor.end_epoch(0)
    checked = Monitor(dict(model.encoders), validate=True)
    bad = {n: torch.full((4, 4), math.nan) for n in ("audio", "visual")}
    with pytest.raises(ValueError, match="NaN"):
        checked.observe(logits=bad, target=torch.zeros(4, dtype=torch.long))


def test_non_finite_evidence_and_missing_gradients_warn_at_the_epoch_end():
    model = TinyModel()
    monitor = Monitor(dict(model.encoders))
    y = torch.zeros(4, dtype=torch.long)
    monitor.observe(logits={"audio": torch.full((4, 4), math.nan), "visual": torch.randn(4, 4)}, target=y)
    model.encoders["audio"](torch.randn(4, 6)).sum().backward()  # nothing reaches visual
    monitor.step()
    with pytest.warns(RuntimeWarning) as caught:
        monitor.end_epoch(0)
    messages = " ".join(str(w.message) for w in caught)
    assert "no gradient reached modality 'visual'" in messages
    assert "evidence of modality 'audio' was not finite" in messages


def test_a_fused_optimizers_grad_scale_is_divided_out_and_a_skipped_step_records_nothing():
    encoders = {"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)}
    optimizer = torch.optim.SGD([p for m in encoders.values() for p in m.parameters()], lr=0.1)
    monitor = Monitor(encoders, measure=None)
    monitor.attach(optimizer)
    for p in optimizer.param_groups[0]["params"]:
        p.grad = torch.full_like(p, 4.0)
    optimizer.grad_scale = torch.tensor(4.0)  # what GradScaler sets on fused optimizers
    monitor._hook._pre_step(optimizer, (optimizer,), {})
    assert monitor.last["grad_norm"]["a"] == pytest.approx(math.sqrt(6.0))  # six ones, unscaled
    optimizer.found_inf = torch.tensor(1.0)
    monitor._hook._pre_step(optimizer, (optimizer,), {})
    assert monitor.step_count == 1
