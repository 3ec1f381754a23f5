"""The contract's two gloo ranks, run over every case of the database (tests/methods/cases.py).

Two processes each train every method on their half of each batch, their gradients averaged before each
optimizer step as DDP averages them; the two replicas must end bit-identical (parameters, the method's state and
its history — unless the case says why its records are of each rank's own batch), and equal to one process that
trains on the whole batches — or the case says why a split batch cannot give the whole batch's run. One spawn
serves every method: a worker trains them one after another.
"""

from __future__ import annotations

import copy
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from cases import batches, case, fresh, rank_share, same_state, train

import gradmod

KEYS = [key for key, info in gradmod.METHODS.items() if info.kind != "head"]
WORLD, STEPS, EPOCHS = 2, 2, 2
#: A collective that one rank never reaches fails the test instead of hanging it.
TIMEOUT = datetime.timedelta(seconds=60)


def average_gradients(optimizer: torch.optim.Optimizer, world: int) -> None:
    """DDP's gradient average, by hand: the ranks must agree on which parameters hold a gradient."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float64)
    agreed = present.clone()
    dist.all_reduce(agreed)
    if not torch.equal(agreed, present * world):
        raise RuntimeError("the ranks hold gradients for different parameters")
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def run(key: str, data, world: int = 1):
    """``EPOCHS`` epochs of the case's plain loop on ``data``; with ``world > 1`` on this rank's half of each batch
    (and of the per-epoch measures, where a case shards them), the gradients averaged over the ranks before each
    optimizer step and before the method's hooks, which act on the gradients DDP has averaged."""
    hook = None if world == 1 else (lambda opt, args, kwargs: average_gradients(opt, world))
    net, method, optimizer, _ = fresh(key, step_pre_hook=hook)
    train(key, rank_share(data), net, method, optimizer, epochs=EPOCHS)
    state = {k: v for k, v in method.state_dict().items() if k != "history"}
    params = [p.detach().clone() for group in optimizer.param_groups for p in group["params"]]
    return {"params": params, "state": copy.deepcopy(state), "history": method.history}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=TIMEOUT)
    results = {}
    for key in KEYS:
        try:
            results[key] = run(key, batches(STEPS), world)
        except Exception as error:  # noqa: BLE001 - reported by the key's test
            results[key] = {"error": f"{type(error).__name__}: {error}"}
    torch.manual_seed(rank)  # ranks seeded apart, as data-augmentation code often seeds them
    unseeded = gradmod.ModalityValuation(("audio", "visual"), list(range(4)), seed=None)
    results["valuation generator"] = unseeded.state_dict()["generator"]
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(WORLD, str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.distributed
@pytest.mark.parametrize("key", KEYS)
def test_two_gloo_ranks_stay_identical_and_equal_one_process_on_the_whole_batch(ranks, key):
    first, second = (results[key] for results in ranks)
    assert "error" not in first and "error" not in second, (first.get("error"), second.get("error"))
    the_case = case(key)
    same_state(first["params"], second["params"], f"{key}.params")
    same_state(first["state"], second["state"], f"{key}.state")
    if the_case.rank_records:
        assert len(first["history"]) == len(second["history"]), key
    else:
        same_state(first["history"], second["history"], f"{key}.history")
    if the_case.shards is not True:
        assert isinstance(the_case.shards, str) and the_case.shards
        return
    single = run(key, batches(STEPS))
    same_state(first["params"], single["params"], f"{key}.params", close=True)
    same_state(first["state"], single["state"], f"{key}.state", close=True)
    if not the_case.rank_records:
        same_state(first["history"], single["history"], f"{key}.history", close=True)


@pytest.mark.distributed
def test_modality_valuation_without_a_seed_draws_rank_zeros_plan_on_every_rank(ranks):
    """Every rank must re-sample the same epoch's data (a ``DistributedSampler`` then splits it)."""
    first, second = (results["valuation generator"] for results in ranks)
    assert torch.equal(first, second)
