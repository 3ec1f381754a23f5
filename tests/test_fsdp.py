"""FSDP2 (``fully_shard``) and HSDP on CPU with gloo: sharded gradients are modulated with the statistics
of their whole tensors, match a one-process run, and draw the noise of their own slice.

Each world is spawned once (module-scoped fixtures) and runs every scenario; the tests read its results.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from test_distributed import assert_records_close
from tiny import TinyModel, batches

import gradmod
from gradmod.sharded import combine_moments, whole_stds

pytestmark = pytest.mark.distributed

STEPS = 3
MICRO = 2  # micro-batches per step; all but the last under set_requires_gradient_sync(False)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.clone()


def _spawn(worker, world: int, tmp_path: Path) -> list[dict]:
    mp.spawn(worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


def _mesh(world: int):
    if world == 4:  # HSDP: replicate over dimension 0, shard over dimension 1
        return init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh("cpu", (world,), mesh_dim_names=("shard",))


# ---------------------------------------------------------------- σ of whole tensors from shards
def _stds_scenario(mesh) -> dict:
    """whole_stds on hand-made DTensors against the std of the whole tensor, on every layout of the mesh."""
    g = torch.Generator().manual_seed(0)
    wholes = [torch.randn(7, 3, generator=g) * 3 + 1, torch.randn(1, generator=g), torch.randn(2, 5, generator=g)]
    wholes.append(torch.cat([torch.randn(9, 4, generator=g), 50 + torch.randn(3, 4, generator=g)]))
    layouts = [[Shard(0)], [Shard(1)]]
    if mesh.ndim == 2:
        layouts = [[Replicate(), Shard(0)], [Shard(0), Shard(1)], [Shard(0), Shard(0)]]
    found, expected = [], []
    for placements in layouts:
        dtensors = [distribute_tensor(w, mesh, placements) for w in wholes if w.dim() > max(p.dim for p in placements if p.is_shard())]
        found += [s.item() for s in whole_stds(dtensors)]
        expected += [d.full_tensor().std().item() if d.numel() > 1 else 0.0 for d in dtensors]
    return {"found": found, "expected": expected}


# ---------------------------------------------------------------- OGM-GE noise on designed gradients
def _designed(shape: torch.Size, g: torch.Generator) -> torch.Tensor:
    """Rows of the first half ~ N(0, 1), of the second ~ N(3, 0.5²): each shard's own σ is far from the whole's."""
    half = shape[0] // 2
    return torch.cat([torch.randn(half, *shape[1:], generator=g), 3 + 0.5 * torch.randn(shape[0] - half, *shape[1:], generator=g)])


def _noise_scenario(mesh) -> dict:
    torch.manual_seed(0)
    audio = nn.Linear(64, 128)
    visual = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 8))  # visual[1] stays a plain, replicated module
    fully_shard(audio, mesh=mesh)
    fully_shard(visual[0], mesh=mesh)
    mod = gradmod.OGMGE({"audio": audio, "visual": visual}, alpha=0.8, seed=5)
    g = torch.Generator().manual_seed(1)
    before = {}
    for name, p in [*audio.named_parameters("audio"), *visual.named_parameters("visual")]:
        before[name] = _designed(p.shape, g)
        p.grad = distribute_tensor(before[name], p.device_mesh, p.placements) if hasattr(p, "placements") else before[name].clone()
    y = torch.arange(32) % 4
    logits = {"audio": 6 * nn.functional.one_hot(y, 4).float(), "visual": torch.zeros(32, 4)}
    mod.observe(logits=logits, target=y)
    gathers, collective = [], "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
    original = getattr(dist, collective)
    setattr(dist, collective, lambda *args, **kwargs: gathers.append(1) or original(*args, **kwargs))
    try:
        mod.step()
    finally:
        setattr(dist, collective, original)
    named = dict([*audio.named_parameters("audio"), *visual.named_parameters("visual")])
    return {
        "before": before,
        "after": {name: _full(p.grad) for name, p in named.items()},
        "local": {name: (p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad).clone() for name, p in named.items()},
        "coefficients": mod.last["coefficients"],
        "gathers": len(gathers),
    }


def _partial_scenario(mesh) -> dict:
    """Gradients with a Partial placement (unreduced): refused with noise, untouched; scaled without."""
    torch.manual_seed(0)
    audio, visual = nn.Linear(4, 6), nn.Linear(4, 6)
    fully_shard(audio, mesh=mesh)
    fully_shard(visual, mesh=mesh)
    params = [*audio.parameters(), *visual.parameters()]
    y = torch.arange(8) % 4
    logits = {"audio": 6 * nn.functional.one_hot(y, 4).float(), "visual": torch.zeros(8, 4)}
    results = {}
    for preset in (gradmod.OGMGE, gradmod.OGM):
        mod = preset({"audio": audio, "visual": visual}, alpha=0.8, seed=1)
        for p in params:
            p.grad = DTensor.from_local(torch.ones(p.shape), mesh, [Partial()])
        mod.observe(logits=logits, target=y)
        try:
            mod.step()
            results[preset.__name__] = {"k": mod.last["coefficients"], "grads": [p.grad.to_local() for p in params]}
        except ValueError as error:
            results[preset.__name__] = {"error": str(error), "grads": [p.grad.to_local() for p in params]}
    return results


# ---------------------------------------------------------------- training against one process
def _rank_half(inputs, y, rank: int, world: int):
    half = y.shape[0] // world
    return {n: x[rank * half : (rank + 1) * half] for n, x in inputs.items()}, y[rank * half : (rank + 1) * half]


APPLY_MODES = ("params", "features")


def _ogm_training(mesh, rank: int, world: int, apply: str) -> dict:
    """OGM with MICRO micro-batches per step (FSDP2's gradient-sync switch), the modulator built before
    fully_shard, and the first audio layer left out of FSDP (a replicated, DDP-style module)."""
    torch.manual_seed(0)
    model = TinyModel()
    mod = gradmod.OGM({n: model.encoders[n] for n in model.names}, alpha=0.8, apply=apply)
    plain = list(model.encoders["audio"][0].parameters())
    fully_shard(model.encoders["visual"], mesh=mesh)
    fully_shard(model, mesh=mesh, ignored_params=set(plain))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mod.attach(optimizer)
    for step in range(STEPS):
        optimizer.zero_grad()
        for micro, (inputs, y) in enumerate(batches(MICRO, seed=100 + step)):
            model.set_requires_gradient_sync(micro == MICRO - 1)
            inputs, y = _rank_half(inputs, y, rank, world)
            logits, decoupled, features, _ = model(inputs)
            mod.observe(logits=decoupled, target=y, **({"features": features} if apply == "features" else {}))
            nn.functional.cross_entropy(logits, y).backward()
        for p in plain:  # what DDP would do for the module FSDP does not manage
            dist.all_reduce(p.grad)
            p.grad /= world
        optimizer.step()
    return {"params": [_full(p) for p in model.parameters()], "history": mod.history}


def single_process_ogm(apply: str) -> tuple[list[torch.Tensor], list[dict]]:
    torch.manual_seed(0)
    model = TinyModel()
    mod = gradmod.OGM({n: model.encoders[n] for n in model.names}, alpha=0.8, apply=apply)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mod.attach(optimizer)
    for step in range(STEPS):
        optimizer.zero_grad()
        for inputs, y in batches(MICRO, seed=100 + step):
            logits, decoupled, features, _ = model(inputs)
            mod.observe(logits=decoupled, target=y, **({"features": features} if apply == "features" else {}))
            nn.functional.cross_entropy(logits, y).backward()
        optimizer.step()
    return [p.detach() for p in model.parameters()], mod.history


# ---------------------------------------------------------------- resume through torch.distributed.checkpoint
def _sharded_ogmge(mesh):
    torch.manual_seed(0)
    model = TinyModel()
    model.gate.requires_grad_(False)  # unused by this loss: no optimizer state for a checkpoint to hold
    for name in model.names:
        fully_shard(model.encoders[name], mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mod = gradmod.OGMGE({n: model.encoders[n] for n in model.names}, alpha=0.8, seed=11)
    mod.attach(optimizer)
    return model, optimizer, mod


def _train(model, optimizer, mod, steps: range, rank: int, world: int) -> None:
    for step in steps:
        (inputs, y), = batches(1, seed=200 + step)
        inputs, y = _rank_half(inputs, y, rank, world)
        optimizer.zero_grad()
        logits, decoupled, _, _ = model(inputs)
        mod.observe(logits=decoupled, target=y)
        nn.functional.cross_entropy(logits, y).backward()
        optimizer.step()


def _resume_scenario(mesh, rank: int, world: int, out_dir: str) -> dict:
    model, optimizer, mod = _sharded_ogmge(mesh)
    _train(model, optimizer, mod, range(2), rank, world)
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=os.path.join(out_dir, "checkpoint"))
    saved = mod.state_dict()  # the same on every rank: rank 0 saves it, every rank loads it
    _train(model, optimizer, mod, range(2, 4), rank, world)
    straight = [_full(p) for p in model.parameters()]

    model, optimizer, mod = _sharded_ogmge(mesh)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=os.path.join(out_dir, "checkpoint"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    mod.load_state_dict(saved)
    _train(model, optimizer, mod, range(2, 4), rank, world)
    return {"straight": straight, "resumed": [_full(p) for p in model.parameters()], "history": mod.history}


# ---------------------------------------------------------------- accumulation with a reduce-scatter per pass
def _accumulation_scenario(mesh, rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = TinyModel()
    fully_shard(model, mesh=mesh)
    mod = gradmod.OGM({n: model.encoders[n] for n in model.names}, alpha=0.8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    mod.attach(optimizer)
    optimizer.zero_grad()
    for inputs, y in batches(MICRO, seed=300):
        inputs, y = _rank_half(inputs, y, rank, world)
        logits, decoupled, _, _ = model(inputs)
        mod.observe(logits=decoupled, target=y)
        nn.functional.cross_entropy(logits, y).backward()
    optimizer.step()
    return {"history": mod.history}


def _fsdp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = _mesh(world)
    results = {"rank": rank, "stds": _stds_scenario(mesh), "noise": _noise_scenario(mesh)}
    if world == 2:
        results["partial"] = _partial_scenario(mesh)
        results["ogm"] = {apply: _ogm_training(mesh, rank, world, apply) for apply in APPLY_MODES}
        results["resume"] = _resume_scenario(mesh, rank, world, out_dir)
        results["accumulation"] = _accumulation_scenario(mesh, rank, world)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    gc.collect()  # the scenarios' sharded models (reference cycles) go before the group, not at interpreter exit
    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory) -> list[dict]:
    return _spawn(_fsdp_worker, 2, tmp_path_factory.mktemp("fsdp"))


@pytest.fixture(scope="module")
def hsdp(tmp_path_factory) -> list[dict]:
    return _spawn(_fsdp_worker, 4, tmp_path_factory.mktemp("hsdp"))


# ---------------------------------------------------------------- tests
def _check_stds(results: list[dict]) -> None:
    for result in results:
        torch.testing.assert_close(torch.tensor(result["stds"]["found"]), torch.tensor(result["stds"]["expected"]), rtol=1e-5, atol=1e-7)


def _check_noise(results: list[dict]) -> None:
    """Per tensor, the added noise has the std of the whole unmodulated gradient; the halves differ."""
    noise = results[0]["noise"]
    assert noise["gathers"] == 1, "the statistics of all sharded tensors travel in one collective"
    k = noise["coefficients"]
    assert k["audio"] < 0.9 and k["visual"] == 1.0
    for name, before in noise["before"].items():
        added = noise["after"][name] - k[name.split(".")[0]] * before
        ratio = (added.std() / before.std()).item()
        bound = 6 / (2 * before.numel()) ** 0.5  # six standard errors of a sample std
        assert abs(ratio - 1) < max(bound, 0.05), f"{name}: noise std / σ(whole gradient) = {ratio:.3f}"
        if before.numel() >= 4096:
            half = before.shape[0] // 2
            a, b = added[:half].flatten(), added[half : 2 * half].flatten()
            for part in (a, b):  # both shards take the whole tensor's σ, not their own
                assert abs((part.std() / before.std()).item() - 1) < 0.08, f"{name}: a shard's noise has its own σ"
            correlation = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
            assert abs(correlation) < 0.1, f"{name}: two shards drew the same noise (correlation {correlation:.3f})"
    for result in results[1:]:  # the plain module is replicated: every rank adds the same noise
        torch.testing.assert_close(result["noise"]["after"]["visual.1.weight"], noise["after"]["visual.1.weight"], rtol=0, atol=0)


def test_whole_tensor_sigma_from_shards_two_ranks(fsdp):
    _check_stds(fsdp)


def test_ogm_ge_noise_has_the_whole_tensors_std_and_differs_across_shards(fsdp):
    _check_noise(fsdp)
    for result in fsdp[1:]:
        for name, after in result["noise"]["after"].items():  # full tensors agree: every rank saw the same step
            torch.testing.assert_close(after, fsdp[0]["noise"]["after"][name], rtol=0, atol=0)


def test_unreduced_partial_gradients_are_refused_with_noise_and_scaled_without(fsdp):
    for result in fsdp:
        noisy, plain = result["partial"]["OGMGE"], result["partial"]["OGM"]
        assert "Partial placement" in noisy["error"]
        assert all(torch.equal(g, torch.ones_like(g)) for g in noisy["grads"]), "a refused step changed gradients"
        k = plain["k"]
        assert k["audio"] < 0.9
        for g, name in zip(plain["grads"], ["audio"] * 2 + ["visual"] * 2):
            torch.testing.assert_close(g, torch.full_like(g, k[name]))


@pytest.mark.parametrize("apply", APPLY_MODES)
def test_fsdp_ogm_matches_one_process_on_the_whole_batch(fsdp, apply):
    params, history = single_process_ogm(apply)
    for result in fsdp:
        run = result["ogm"][apply]
        for sharded, single in zip(run["params"], params):
            torch.testing.assert_close(sharded, single, rtol=1e-5, atol=1e-6)
        assert_records_close(run["history"], history, rel=1e-5)
    assert min(record["coefficients"]["audio"] for record in history) < 0.95, "the run must modulate something"


def test_resume_through_distributed_checkpoint_continues_the_same_run(fsdp):
    for result in fsdp:
        resume = result["resume"]
        assert [record["step"] for record in resume["history"]] == [0, 1, 2, 3]
        for straight, resumed in zip(resume["straight"], resume["resumed"]):
            torch.testing.assert_close(resumed, straight, rtol=0, atol=0)


def test_accumulation_with_a_reduce_scatter_per_pass_keeps_every_micro_batch(fsdp):
    for result in fsdp:
        assert len(result["accumulation"]["history"]) == 1


@given(
    parts=st.lists(st.tuples(st.integers(0, 40), st.floats(-1e3, 1e3), st.floats(1e-3, 1e2)), min_size=1, max_size=6),
    seed=st.integers(0, 2**31 - 1),
)
def test_combine_moments_of_parts_is_the_moments_of_the_whole(parts, seed):
    """Merging the parts' (n, μ, M2) gives the whole's, in any order; empty parts add nothing."""
    g = torch.Generator().manual_seed(seed)
    values = [shift + scale * torch.randn(n, generator=g, dtype=torch.float64) for n, shift, scale in parts]
    zero = torch.zeros((), dtype=torch.float64)
    count = torch.tensor([float(len(v)) for v in values], dtype=torch.float64)
    mean = torch.stack([v.mean() if len(v) else zero for v in values])
    m2 = torch.stack([((v - v.mean()) ** 2).sum() if len(v) else zero for v in values])
    n, mu, total = combine_moments(count, mean, m2)
    whole = torch.cat(values)
    assert n.item() == whole.numel()
    if whole.numel() == 0:
        assert mu.item() == 0 and total.item() == 0
        return
    torch.testing.assert_close(mu, whole.mean(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(total, ((whole - whole.mean()) ** 2).sum(), rtol=1e-9, atol=1e-6)
    order = torch.randperm(len(values), generator=g)
    for merged, swapped in zip((n, mu, total), combine_moments(count[order], mean[order], m2[order])):
        torch.testing.assert_close(swapped, merged, rtol=1e-12, atol=1e-9)


def test_hsdp_replicas_draw_identical_noise_and_shards_differ(hsdp):
    _check_stds(hsdp)
    _check_noise(hsdp)
    # mesh [[0, 1], [2, 3]]: ranks 0 and 2 hold the same slices, as do ranks 1 and 3
    for a, b in ((0, 2), (1, 3)):
        for name, local in hsdp[a]["noise"]["local"].items():
            torch.testing.assert_close(hsdp[b]["noise"]["local"][name], local, rtol=0, atol=0)
    shard0, shard1 = hsdp[0]["noise"]["local"]["audio.weight"], hsdp[1]["noise"]["local"]["audio.weight"]
    assert not torch.equal(shard0, shard1)
