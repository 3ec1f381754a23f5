"""Two gloo ranks on CPU: evidence is all-reduced, noise is replica-identical, replicas stay equal."""

import contextlib
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tiny import TinyModel, batches

import gradmod

STEPS = 4
pytestmark = pytest.mark.distributed


def train(model, mod, data, rank=None, world=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mod.attach(opt)
    for inputs, y in data:
        if rank is not None:  # this rank's half of the global batch
            half = y.shape[0] // world
            inputs = {n: x[rank * half : (rank + 1) * half] for n, x in inputs.items()}
            y = y[rank * half : (rank + 1) * half]
        opt.zero_grad(set_to_none=True)
        logits, decoupled, _, _ = model(inputs)
        mod.observe(logits=decoupled, target=y)
        nn.functional.cross_entropy(logits, y).backward()
        opt.step()
    return mod.history


def assert_records_close(found, expected, rel=1e-4, abs=1e-6):
    """The history ``found`` (distributed) records the evidence and coefficients of ``expected``."""
    assert len(found) == len(expected)
    for found_record, expected_record in zip(found, expected):
        for key in ("evidence", "coefficients"):
            for name, value in expected_record[key].items():
                assert found_record[key][name] == pytest.approx(value, rel=rel, abs=abs)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = TinyModel()
    ddp = DistributedDataParallel(model, find_unused_parameters=True)  # the ζ gate is not in this loss
    unseeded = gradmod.OGMGE({n: model.encoders[n] for n in model.names}, alpha=0.8)
    mod = gradmod.OGMGE({n: model.encoders[n] for n in model.names}, alpha=0.8, seed=7)
    history = train(ddp, mod, batches(STEPS), rank=rank, world=world)
    torch.save(
        {"params": [p.detach() for p in model.parameters()], "history": history, "seed": unseeded.seed},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    del ddp  # its reducer goes before the group it holds, not at interpreter exit
    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()


def test_two_gloo_ranks_match_each_other_and_a_single_process_run(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["seed"] == r1["seed"], "seed=None must be broadcast from rank 0"
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b), "replicas diverged"
    assert r0["history"] == r1["history"]

    torch.manual_seed(0)
    model = TinyModel()
    mod = gradmod.OGMGE({n: model.encoders[n] for n in model.names}, alpha=0.8, seed=7)
    single = train(model, mod, batches(STEPS))
    assert len(single) == STEPS
    assert_records_close(r0["history"], single)
    for a, b in zip(r0["params"], model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-4, atol=1e-5)


MICRO = 2  # micro-batches per optimizer step in the accumulation scenarios


def _accumulate(ddp, mod, micros, rank=None, world=1, no_sync=False):
    """One step's backward passes over ``micros``; with ``no_sync`` all but the last skip DDP's all-reduce."""
    for index, (inputs, y) in enumerate(micros):
        if rank is not None:
            half = y.shape[0] // world
            inputs = {n: x[rank * half : (rank + 1) * half] for n, x in inputs.items()}
            y = y[rank * half : (rank + 1) * half]
        skip = no_sync and index < len(micros) - 1
        with ddp.no_sync() if skip else contextlib.nullcontext():
            logits, decoupled, _, _ = ddp(inputs)
            mod.observe(logits=decoupled, target=y)
            nn.functional.cross_entropy(logits, y).backward()


def _no_sync_run(model, ddp, rank=None, world=1):
    """OGM-GE with MICRO micro-batches per step; under DDP (``rank`` given) no_sync() on all but the last."""
    mod = gradmod.OGMGE({n: model.encoders[n] for n in model.names}, alpha=0.8, seed=7)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mod.attach(optimizer)
    for step in range(STEPS):
        optimizer.zero_grad()
        _accumulate(ddp, mod, batches(MICRO, seed=20 + step), rank, world, no_sync=rank is not None)
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()], mod.history


def _seams_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.manual_seed(100 + rank)  # per-rank torch seeds, as data-augmentation code often sets them
    model = TinyModel()
    early = gradmod.OGMGE({n: model.encoders[n] for n in model.names}, alpha=0.8)  # before init_process_group
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    (inputs, y), = batches(1, seed=rank)
    logits, decoupled, _, _ = model(inputs)
    early.observe(logits=decoupled, target=y)
    nn.functional.cross_entropy(logits, y).backward()
    try:
        early.step()
    except RuntimeError as error:
        results["error"] = str(error)

    for bucket_view in (False, True):  # accumulation without no_sync(): DDP writes .grad every pass
        torch.manual_seed(0)
        model = TinyModel()
        ddp = DistributedDataParallel(model, find_unused_parameters=True, gradient_as_bucket_view=bucket_view)
        mod = gradmod.OGM({n: model.encoders[n] for n in model.names}, alpha=0.8)
        _accumulate(ddp, mod, batches(MICRO, seed=10 + rank))
        mod.step()
        results["bucket_view" if bucket_view else "evidence"] = mod.last and mod.last["evidence"]

    torch.manual_seed(0)
    model = TinyModel()
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    results["params"], results["history"] = _no_sync_run(model, ddp, rank, world)
    torch.save(results, os.path.join(out_dir, f"seams{rank}.pt"))
    del ddp  # its reducer goes before the group it holds, not at interpreter exit
    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def seams(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("seams")
    mp.spawn(_seams_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    return [torch.load(tmp_path / f"seams{r}.pt") for r in (0, 1)]


def _accumulated_evidence() -> dict[str, float]:
    """The OGM evidence of both ranks' micro-batches, summed, for the model as initialised."""
    torch.manual_seed(0)
    model = TinyModel()
    expected = {"audio": 0.0, "visual": 0.0}
    for rank in (0, 1):
        for inputs, y in batches(MICRO, seed=10 + rank):
            _, decoupled, _, _ = model(inputs)
            for name, z in decoupled.items():
                expected[name] += gradmod.functional.ogm_scores(z, y).item()
    return expected


def test_differing_rank_seeds_are_detected(seams):
    for result in seams:
        assert "ranks hold different noise seeds" in result["error"]


def test_ddp_accumulation_without_no_sync_keeps_all_evidence(seams):
    for result in seams:
        for name, value in _accumulated_evidence().items():
            assert result["evidence"][name] == pytest.approx(value, rel=1e-5)


def test_ddp_bucket_view_accumulation_keeps_all_evidence(seams):
    for result in seams:
        assert result["bucket_view"] is not None, "the step was not modulated: its evidence was dropped"
        for name, value in _accumulated_evidence().items():
            assert result["bucket_view"][name] == pytest.approx(value, rel=1e-5)


def test_ddp_no_sync_accumulation_modulates_once_per_step_with_every_micro_batch(seams):
    """DDP's no_sync(): every micro-batch's evidence counts, one modulation per step, as in one process."""
    torch.manual_seed(0)
    model = TinyModel()
    params, history = _no_sync_run(model, model)  # one process: the whole micro-batches, nothing to sync
    assert [record["step"] for record in history] == list(range(STEPS))
    for result in seams:
        assert result["history"] == seams[0]["history"]
        for a, b in zip(result["params"], seams[0]["params"]):
            assert torch.equal(a, b), "replicas diverged"
        assert_records_close(result["history"], history)
        for a, b in zip(result["params"], params):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
