"""G-Blending (Wang, Tran & Feiszli, CVPR 2020): the weights as a pure function, the cross-check with
transcriptions of MultiBench, BalanceBenchmark and VMZ, the estimator, the loss helper, resume and two gloo ranks."""

from __future__ import annotations

import copy
import math
import os
import warnings

import hypothesis.strategies as st
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import assume, given
from torch import nn

import gradmod
from gradmod.methods.gblending import (
    DEFAULT_TOLERANCE,
    GBlending,
    HeadLosses,
    blending_statistics,
    blending_weights,
    checkpoint,
)

HEADS = ("audio", "visual", "fused")
loss_values = st.floats(0.0, 5.0, allow_nan=False)


@st.composite
def checkpoint_pairs(draw, heads=HEADS):
    """Two checkpoints with train and held-out losses for every head."""
    values = {k: [draw(loss_values) for _ in range(4)] for k in heads}
    before = HeadLosses(train={k: v[0] for k, v in values.items()}, held_out={k: v[1] for k, v in values.items()})
    after = HeadLosses(train={k: v[2] for k, v in values.items()}, held_out={k: v[3] for k, v in values.items()})
    return before, after


def scaled(losses: HeadLosses, factor: float) -> HeadLosses:
    return HeadLosses(
        train={k: factor * v for k, v in losses.train.items()}, held_out={k: factor * v for k, v in losses.held_out.items()}
    )


# ------------------------------------------------------------------ 1. the weights
def test_the_statistics_follow_their_definitions():
    before = HeadLosses(train={"a": 1.0, "b": 2.0}, held_out={"a": 1.5, "b": 2.5})
    after = HeadLosses(train={"a": 0.5, "b": 1.0}, held_out={"a": 1.2, "b": 2.6})
    generalization, overfitting = blending_statistics(before, after)
    assert generalization == pytest.approx({"a": 0.3, "b": -0.1})  # held-out loss before − after
    assert overfitting == pytest.approx({"a": 0.2, "b": 1.1})  # (1.2 − 0.5) − (1.5 − 1.0); (2.6 − 1.0) − (2.5 − 2.0)
    assert blending_weights(before, after) == pytest.approx({"a": 1.0, "b": 0.0})


@given(pair=checkpoint_pairs())
def test_weights_are_non_negative_and_sum_to_one(pair):
    weights = blending_weights(*pair)
    assert set(weights) == set(HEADS)
    assert all(w >= 0.0 for w in weights.values())
    assert math.fsum(weights.values()) == pytest.approx(1.0, abs=1e-12)


@given(pair=checkpoint_pairs())
def test_weights_follow_the_heads_under_renaming(pair):
    before, after = pair
    rename = {"audio": "fused", "visual": "audio", "fused": "visual"}

    def renamed(c):
        return HeadLosses(train={rename[k]: v for k, v in c.train.items()}, held_out={rename[k]: v for k, v in c.held_out.items()})

    weights = blending_weights(before, after)
    for head, weight in blending_weights(renamed(before), renamed(after)).items():
        assert weight == pytest.approx(weights[next(k for k, v in rename.items() if v == head)], abs=1e-12)


@given(train=st.tuples(loss_values, loss_values), held_out=st.tuples(loss_values, loss_values))
def test_heads_that_changed_alike_weigh_alike(train, held_out):
    before = HeadLosses(train={k: train[0] for k in HEADS}, held_out={k: held_out[0] for k in HEADS})
    after = HeadLosses(train={k: train[1] for k in HEADS}, held_out={k: held_out[1] for k in HEADS})
    assert blending_weights(before, after) == pytest.approx({k: 1 / 3 for k in HEADS})


@given(pair=checkpoint_pairs(), factor=st.floats(0.1, 10.0))
def test_a_common_scale_of_the_losses_leaves_the_weights(pair, factor):
    _, overfitting = blending_statistics(*pair)
    assume(all(abs(o) > 10 * DEFAULT_TOLERANCE / min(factor, 1.0) for o in overfitting.values()))
    weights = blending_weights(*pair)
    for head, weight in blending_weights(scaled(pair[0], factor), scaled(pair[1], factor)).items():
        assert weight == pytest.approx(weights[head], rel=1e-9, abs=1e-12)


@given(pair=checkpoint_pairs(), share=st.floats(0.01, 1.0))
def test_a_head_whose_held_out_loss_falls_further_never_weighs_less(pair, share):
    """Lower audio's train and held-out losses alike after the super-epoch: ΔG grows, ΔO stays."""
    before, after = pair
    gain = share * min(after.train["audio"], after.held_out["audio"])
    better = HeadLosses(
        train={**after.train, "audio": after.train["audio"] - gain},
        held_out={**after.held_out, "audio": after.held_out["audio"] - gain},
    )
    assert blending_weights(before, better)["audio"] >= blending_weights(before, after)["audio"] - 1e-12


def test_a_head_whose_held_out_loss_rose_weighs_zero():
    before = HeadLosses(train={"a": 1.0, "b": 1.0}, held_out={"a": 1.2, "b": 1.2})
    after = HeadLosses(train={"a": 0.8, "b": 0.5}, held_out={"a": 1.1, "b": 1.4})
    assert blending_weights(before, after) == {"a": 1.0, "b": 0.0}


def test_no_overfitting_change_is_floored_at_the_tolerance():
    before = HeadLosses(train={"a": 1.0, "b": 1.0}, held_out={"a": 1.2, "b": 1.2})
    after = HeadLosses(train={"a": 0.9, "b": 0.9}, held_out={"a": 1.1, "b": 1.0})  # ΔO_a = 0, ΔO_b = −0.1
    score_a, score_b = 0.1 / DEFAULT_TOLERANCE**2, 0.2 / 0.1**2
    weights = blending_weights(before, after)
    assert weights["a"] == pytest.approx(score_a / (score_a + score_b))
    assert blending_weights(before, after, tolerance=1.0)["a"] == pytest.approx(0.1 / (0.1 + 0.2 / 1.0))


def test_when_no_head_generalised_the_weights_are_uniform():
    before = HeadLosses(train={"a": 1.0, "b": 1.0}, held_out={"a": 1.0, "b": 1.0})
    after = HeadLosses(train={"a": 0.5, "b": 0.4}, held_out={"a": 1.3, "b": 1.0})
    assert blending_weights(before, after) == {"a": 0.5, "b": 0.5}


@pytest.mark.parametrize(
    "train,held_out,error,message",
    [
        ({"a": float("nan"), "b": 1.0}, {"a": 1.0, "b": 1.0}, ValueError, "train loss of head 'a'"),
        ({"a": 1.0, "b": 1.0}, {"a": -0.5, "b": 1.0}, ValueError, "held-out loss of head 'a'"),
        ({"a": 1.0, "b": 1.0}, {"a": 1.0, "c": 1.0}, ValueError, r"missing \['b'\], unknown \['c'\]"),
        ({"a": 1.0, "b": True}, {"a": 1.0, "b": 1.0}, TypeError, "bool"),
        ([1.0, 1.0], {"a": 1.0, "b": 1.0}, TypeError, "mapping head name -> loss"),
    ],
)
def test_bad_losses_fail_by_name(train, held_out, error, message):
    with pytest.raises(error, match=message):
        HeadLosses(train=train, held_out=held_out)


def test_a_nan_or_inf_head_loss_is_refused_by_name_unless_validation_is_off():
    gb = GBlending(("fused", "audio", "visual"))
    losses = {"fused": torch.tensor(1.0), "audio": torch.tensor(math.nan), "visual": torch.tensor(math.inf)}
    with pytest.raises(ValueError, match=r"the losses of heads \['audio', 'visual'\] are NaN or inf"):
        gb.loss(losses)
    assert torch.isnan(GBlending(("fused", "audio", "visual"), validate=False).loss(losses))


def test_bad_weight_arguments_fail_by_name():
    one = HeadLosses(train={"a": 1.0}, held_out={"a": 1.0})
    with pytest.raises(ValueError, match="two or more heads"):
        blending_weights(one, one)
    two = HeadLosses(train={"a": 1.0, "b": 1.0}, held_out={"a": 1.0, "b": 1.0})
    with pytest.raises(ValueError, match="tolerance must be a finite number > 0"):
        blending_weights(two, two, tolerance=0.0)
    other = HeadLosses(train={"a": 1.0, "c": 1.0}, held_out={"a": 1.0, "c": 1.0})
    with pytest.raises(ValueError, match="heads of the second checkpoint"):
        blending_weights(two, other)


# ------------------------------------------------------------------ 2. transcriptions of other code
def multibench_weights(before: HeadLosses, after: HeadLosses, delta: bool) -> dict[str, float]:
    """MultiBench ``gradient_blend.py`` (``train_unimodal``/``train_multimodal`` and ``gb_estimate``)."""
    raw = {}
    for k in before.heads:
        ltN, lvN, ltNn, lvNn = before.train[k], before.held_out[k], after.train[k], after.held_out[k]
        oNn, oN = lvNn - ltNn, lvN - ltN
        if delta:
            oi, g = oNn - oN, lvNn - lvN
        else:
            oi = oNn if oNn >= 0 else 0.0001
            g = lvNn
        raw[k] = abs(g / (oi * oi))
    z = sum(raw.values())
    return {k: w / z for k, w in raw.items()}


def balancebenchmark_weights(before: HeadLosses, after: HeadLosses) -> dict[str, float]:
    """BalanceBenchmark ``GBlending_trainer.py`` (``super_epoch_origin``), on the same per-sample means."""
    raw = {}
    for k in before.heads:
        g = after.held_out[k] - before.held_out[k]
        o = (after.held_out[k] - after.train[k]) - (before.held_out[k] - before.train[k])
        raw[k] = abs(g) / (o**2)
    total = sum(raw.values())
    return {k: w / total for k, w in raw.items()}


@st.composite
def generalising_pairs(draw, heads=HEADS):
    """Every head's held-out loss falls (ΔG in [0.01, 0.9]) and its overfitting changes (|ΔO| in [0.05, 1])."""
    before, after = {}, {}
    for k in heads:
        t0, v0 = draw(st.floats(2.0, 3.0)), draw(st.floats(1.0, 3.0))
        g, o = draw(st.floats(0.01, 0.9)), draw(st.floats(0.05, 1.0)) * draw(st.sampled_from([-1.0, 1.0]))
        before[k], after[k] = (t0, v0), (t0 - g - o, v0 - g)  # after: O = (v0 − g) − (t0 − g − o) = O_before + o
    return (
        HeadLosses(train={k: v[0] for k, v in before.items()}, held_out={k: v[1] for k, v in before.items()}),
        HeadLosses(train={k: v[0] for k, v in after.items()}, held_out={k: v[1] for k, v in after.items()}),
    )


@given(pair=generalising_pairs())
def test_where_every_head_generalised_the_weights_are_multibench_delta_and_balancebenchmark(pair):
    ours = blending_weights(*pair)
    for theirs in (multibench_weights(*pair, delta=True), balancebenchmark_weights(*pair)):
        assert ours == pytest.approx(theirs, rel=1e-9)


def test_where_the_ports_differ():
    before = HeadLosses(train={"a": 1.0, "b": 1.0}, held_out={"a": 1.2, "b": 1.2})
    after = HeadLosses(train={"a": 0.8, "b": 0.6}, held_out={"a": 1.1, "b": 1.4})  # b's held-out loss rose
    assert blending_weights(before, after)["b"] == 0.0
    assert balancebenchmark_weights(before, after)["b"] > 0.0  # abs() rewards the head that got worse
    assert multibench_weights(before, after, delta=True)["b"] > 0.0
    # MultiBench's default divides the final held-out loss by the final overfitting squared: another ratio
    assert multibench_weights(before, after, delta=False) != pytest.approx(blending_weights(before, after))
    flat = HeadLosses(train={"a": 0.75, "b": 0.5}, held_out={"a": 0.95, "b": 0.75})  # ΔO_a = 0 exactly
    with pytest.raises(ZeroDivisionError):
        balancebenchmark_weights(before, flat)
    assert math.isfinite(blending_weights(before, flat)["a"])


def test_the_loss_is_vmz_weighted_sum():
    """VMZ ``loss_creator.py``, ``add_weighted_loss``: audio_weight·a_loss + visual_weight·v_loss + av_weight·av_loss."""
    gb = GBlending(("audio", "visual", "fused"))
    gb.update(
        HeadLosses(train={"audio": 1.0, "visual": 1.0, "fused": 1.0}, held_out={"audio": 1.3, "visual": 1.4, "fused": 1.2}),
        HeadLosses(train={"audio": 0.7, "visual": 0.9, "fused": 0.5}, held_out={"audio": 1.2, "visual": 1.1, "fused": 1.1}),
    )
    a_loss, v_loss, av_loss = torch.tensor(0.9, requires_grad=True), torch.tensor(1.3), torch.tensor(0.6)
    w = gb.weights
    expected = w["audio"] * a_loss + w["visual"] * v_loss + w["fused"] * av_loss
    blended = gb.loss({"audio": a_loss, "visual": v_loss, "fused": av_loss})
    torch.testing.assert_close(blended, expected)
    blended.backward()
    assert a_loss.grad.item() == pytest.approx(w["audio"])  # the head's gradient is scaled by its weight


# ------------------------------------------------------------------ 3. the estimator
def losses(train, held_out, heads=("a", "b")):
    return HeadLosses(train=dict(zip(heads, train)), held_out=dict(zip(heads, held_out)))


def test_record_estimates_from_consecutive_checkpoints():
    gb = GBlending(("a", "b"))
    assert gb.weights == {"a": 0.5, "b": 0.5}
    first, second, third = losses((1.0, 1.0), (1.2, 1.2)), losses((0.8, 0.6), (1.1, 1.0)), losses((0.6, 0.3), (1.05, 1.1))
    assert gb.record(first) is None and gb.weights == {"a": 0.5, "b": 0.5}
    assert gb.record(second) == pytest.approx(blending_weights(first, second))
    assert gb.record(third) == pytest.approx(blending_weights(second, third))
    assert gb.weights["b"] == 0.0 and len(gb.history) == 2
    assert gb.history[1]["generalization"]["b"] == pytest.approx(-0.1) and gb.history[1]["status"] == "applied"


def test_the_fallback_is_flagged_and_warned_once():
    gb = GBlending(("a", "b"))
    rising = [losses((1.0, 1.0), (1.0, 1.0)), losses((0.5, 0.5), (1.2, 1.3)), losses((0.4, 0.4), (1.4, 1.5))]
    gb.record(rising[0])
    with pytest.warns(RuntimeWarning, match="no head's held-out loss fell"):
        gb.record(rising[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gb.record(rising[2])
    assert gb.weights == {"a": 0.5, "b": 0.5} and [h["status"] for h in gb.history] == ["degenerate", "degenerate"]


def test_estimator_inputs_fail_by_name():
    with pytest.raises(ValueError, match="heads must name two or more distinct"):
        GBlending(("a", "a"))
    with pytest.raises(ValueError, match="sequence of non-empty names"):
        GBlending("ab")
    gb = GBlending(("a", "b"))
    with pytest.raises(ValueError, match="heads of the checkpoint"):
        gb.record(losses((1.0, 1.0), (1.0, 1.0), heads=("a", "c")))
    with pytest.raises(TypeError, match="HeadLosses"):
        gb.update({"a": 1.0}, {"a": 1.0})
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        gb.loss({"a": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="loss of head 'b' must be a 0-d tensor"):
        gb.loss({"a": torch.tensor(1.0), "b": torch.ones(3)})


class Heads(nn.Module):
    """Two encoders, a unimodal head each and a fused head; ``forward`` returns every head's logits."""

    def __init__(self):
        super().__init__()
        self.audio, self.visual = nn.Linear(4, 6), nn.Linear(3, 6)
        self.heads = nn.ModuleDict({"audio": nn.Linear(6, 3), "visual": nn.Linear(6, 3), "fused": nn.Linear(12, 3)})
        self.dropout = nn.Dropout(0.5)

    def forward(self, xa, xv):
        fa, fv = self.dropout(torch.relu(self.audio(xa))), self.dropout(torch.relu(self.visual(xv)))
        return {"audio": self.heads["audio"](fa), "visual": self.heads["visual"](fv), "fused": self.heads["fused"](torch.cat([fa, fv], 1))}


def forward(model, batch):
    xa, xv, y = batch
    return model(xa, xv), y


def loader(n_batches, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 4, generator=g), torch.randn(batch, 3, generator=g), torch.randint(0, 3, (batch,), generator=g)) for _ in range(n_batches)]


def test_checkpoint_is_the_mean_cross_entropy_in_eval_mode():
    torch.manual_seed(0)
    model = Heads()
    train, held_out = loader(3), loader(2, batch=5, seed=1)
    held_out[1][2][0] = -100  # an ignored target counts nowhere
    measured = checkpoint(model, forward, train=train, held_out=held_out)
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        for split, data, values in (("train", train, measured.train), ("held_out", held_out, measured.held_out)):
            for head in ("audio", "visual", "fused"):
                logits = torch.cat([model(xa, xv)[head] for xa, xv, _ in data])
                target = torch.cat([y for *_, y in data])
                assert values[head] == pytest.approx(nn.functional.cross_entropy(logits, target).item(), rel=1e-6), (split, head)


def test_checkpoint_names_bad_input():
    model = Heads()
    with pytest.raises(ValueError, match="train loader yielded no batch"):
        checkpoint(model, forward, train=[], held_out=loader(1))
    with pytest.raises(ValueError, match="two or more head names"):
        checkpoint(model, lambda m, b: ({"fused": m(*b[:2])["fused"]}, b[2]), train=loader(1), held_out=loader(1))
    with pytest.raises(ValueError, match="no sample with a target"):
        checkpoint(model, lambda m, b: (m(*b[:2]), torch.full_like(b[2], -100)), train=loader(1), held_out=loader(1))
    with pytest.raises(ValueError, match="train loss of heads \\['audio'\\] is not finite"):
        checkpoint(model, lambda m, b: ({**m(*b[:2]), "audio": torch.full((8, 3), float("nan"))}, b[2]), train=loader(1), held_out=loader(1))
    with pytest.raises(ValueError, match="target must be"):
        checkpoint(model, lambda m, b: (m(*b[:2]), b[2][:3]), train=loader(1), held_out=loader(1))


def test_a_super_epoch_loop_trains_with_the_estimated_weights():
    """The documented loop on the trajectory: record a checkpoint every super-epoch, train on the blended loss."""
    torch.manual_seed(0)
    model = Heads()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gb = GBlending(("audio", "visual", "fused"))
    train, held_out = loader(4), loader(2, seed=1)
    for epoch in range(4):
        if epoch % 2 == 0:
            gb.record(checkpoint(model, forward, train=train, held_out=held_out))
        for xa, xv, y in train:
            optimizer.zero_grad()
            logits = model(xa, xv)
            gb.loss({head: nn.functional.cross_entropy(z, y) for head, z in logits.items()}).backward()
            optimizer.step()
    assert len(gb.history) == 1 and gb.weights == gb.history[0]["weights"]
    assert math.fsum(gb.weights.values()) == pytest.approx(1.0)


# ------------------------------------------------------------------ 4. resume
def test_resume_gives_the_same_weights_and_history():
    checkpoints = [losses((1.0, 1.0), (1.2, 1.2)), losses((0.8, 0.6), (1.1, 1.0)), losses((0.6, 0.3), (1.05, 0.9))]
    straight = GBlending(("a", "b"))
    for c in checkpoints:
        straight.record(c)
    first = GBlending(("a", "b"))
    for c in checkpoints[:2]:
        first.record(c)
    resumed = GBlending(("a", "b"))
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    resumed.record(checkpoints[2])
    assert resumed.weights == straight.weights and resumed.history == straight.history
    with pytest.raises(ValueError, match=r"GBlending state_dict is for modalities \['a', 'b'\], this GBlending has \['a', 'c'\]"):
        GBlending(("a", "c")).load_state_dict(first.state_dict())


# ------------------------------------------------------------------ 5. two gloo ranks
def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = Heads()
    train, held_out = loader(4), loader(2, seed=1)
    gb = GBlending(("audio", "visual", "fused"))
    results = {}
    for step in range(2):
        shard = lambda data: data[rank::world]
        measured = checkpoint(model, forward, train=shard(train), held_out=shard(held_out))
        gb.record(measured)
        results[f"losses{step}"] = (measured.train, measured.held_out)
        with torch.no_grad():
            model.heads["audio"].weight.mul_(0.5)  # some change between the checkpoints
    results["weights"] = gb.weights
    local = HeadLosses(train={h: float(rank) for h in gb.heads}, held_out={h: 1.0 for h in gb.heads})
    try:
        gb.update(local, local)
    except ValueError as error:
        results["error"] = str(error)
    torch.save(results, os.path.join(out_dir, f"gb{rank}.pt"))
    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()


@pytest.mark.distributed
def test_two_gloo_ranks_measure_and_weigh_alike_and_refuse_differing_losses(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"gb{r}.pt") for r in (0, 1))
    assert r0["weights"] == r1["weights"]
    for result in (r0, r1):
        assert "ranks recorded different losses" in result["error"]
    torch.manual_seed(0)
    model = Heads()
    whole = checkpoint(model, forward, train=loader(4), held_out=loader(2, seed=1))
    for head in whole.heads:
        assert r0["losses0"][0][head] == pytest.approx(whole.train[head], rel=1e-9)
        assert r0["losses0"][1][head] == pytest.approx(whole.held_out[head], rel=1e-9)


def test_the_registry_names_gblending():
    info = gradmod.METHODS["gblending"]
    assert info.preset is GBlending and info.kind == "loss" and gradmod.GBlending is GBlending
