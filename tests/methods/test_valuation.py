"""Modality valuation (Wei et al., CVPR 2024): the Shapley contributions and both re-sampling schemes against
transcriptions of the official valuation pass and datasets, the epoch's data, errors, warnings and resume."""

from __future__ import annotations

import copy
import io
import itertools
import math
import warnings
from functools import partial

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradmod.functional import coalitions
from gradmod.methods.valuation import (
    METHODS,
    ModalityValuation,
    ResampledDataset,
    coalition_correct,
    modality_level_count,
    modality_level_plan,
    resample_copies,
    sample_contributions,
    sample_level_plan,
    subset_contributions,
    zero_absent,
)

NAMES = ("audio", "visual")


class Net(nn.Module):
    """Two encoders and a concat head, as the official AVClassifier (features zeroed at the head)."""

    def __init__(self, names=NAMES, in_dim=4, dim=5, classes=3):
        super().__init__()
        self.names = tuple(names)
        self.encoders = nn.ModuleDict(
            {n: nn.Sequential(nn.Linear(in_dim, dim), nn.BatchNorm1d(dim), nn.ReLU()) for n in names}
        )
        self.fc_out = nn.Linear(dim * len(names), classes)

    def encode(self, inputs):
        return {n: self.encoders[n](x) for n, x in inputs.items()}

    def head(self, features):
        return self.fc_out(torch.cat([features[n] for n in self.names], 1))


def dataset(n=24, names=NAMES, in_dim=4, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    xs = [F.one_hot(y, in_dim).float() * (2.0 - i) + torch.randn(n, in_dim, generator=g) for i in range(len(names))]
    return TensorDataset(*xs, y)


def forward(model, batch, names=NAMES):
    *xs, y = batch
    return model.encode(dict(zip(names, xs))), y


def measure(model, data, names=NAMES):
    loader = DataLoader(data, batch_size=7, shuffle=False)
    return partial(coalition_correct, model, partial(forward, names=names), model.head, loader)


# ------------------------------------------------------------------ transcriptions of the official code
def official_valuation(model, loader):
    """``execute_modulation`` of sample_level.py, written out again: eval mode, the fused prediction and the two
    with one modality's pooled features zeroed at the fusion layer, values 2/1/1, contributions per index."""
    contribution = {}
    model.eval()
    index = 0
    with torch.no_grad():
        for a_in, v_in, label in loader:
            a, v = model.encoders["audio"](a_in), model.encoders["visual"](v_in)
            out = model.fc_out(torch.cat((a, v), 1))
            out_v = model.fc_out(torch.cat((torch.zeros_like(a), v), 1))
            out_a = model.fc_out(torch.cat((a, torch.zeros_like(v)), 1))
            prediction, pred_v, pred_a = F.softmax(out, 1), F.softmax(out_v, 1), F.softmax(out_a, 1)
            for i in range(len(label)):
                value_all = 2.0 if np.argmax(prediction[i].numpy()) == label[i] else 0.0
                value_v = 1.0 if np.argmax(pred_v[i].numpy()) == label[i] else 0.0
                value_a = 1.0 if np.argmax(pred_a[i].numpy()) == label[i] else 0.0
                contribution[index] = ((value_a + value_all - value_v) / 2.0, (value_v + value_all - value_a) / 2.0)
                index += 1
    model.train()
    return contribution


def official_sample_level(length, contribution):
    """``AV_KS_Dataset_sample_level``'s lists (data index, drop: 0 none, 1 audio, 2 visual) as committed."""
    data, drop = list(range(length)), [0] * length
    for i in range(length):
        contrib_a, contrib_v = contribution[i]
        for contrib, dropped in ((contrib_a, 2), (contrib_v, 1)):
            if 0.4 < contrib < 1:
                copies = 1
            elif -0.1 < contrib < 0.4:
                copies = 2
            elif contrib < -0.1:
                copies = 3
            else:
                copies = 0
            data += [i] * copies
            drop += [dropped] * copies
    return data, drop


def official_modality_level(length, contribution, choice, sample_choice_of, alpha=1.0):
    """modality_level.py's subset estimate and ``AV_KS_Dataset_modality_level``'s lists, with the draws given."""
    part_cona = part_conv = 0.0
    for i in choice:
        part_cona += contribution[int(i)][0]
        part_conv += contribution[int(i)][1]
    part_cona /= len(choice)
    part_conv /= len(choice)
    gap_a, gap_v = 1.0 - part_cona, 1.0 - part_conv
    difference = (abs(gap_a - gap_v) / 3 * 2) * alpha
    resample_num = int(difference * length)
    data, drop = list(range(length)), [0] * length
    for i in sample_choice_of(resample_num):
        data.append(int(i))
        drop.append(2 if gap_a > gap_v else 1)
    return data, drop, resample_num


def as_drop(present):
    """gradmod's presence rows in the official drop codes (two modalities)."""
    return [0 if a and v else (1 if v else 2) for a, v in present.tolist()]


def every_pattern(names):
    """One sample per correctness pattern of the non-empty coalitions of ``names``."""
    subsets = coalitions(names)[1:]
    patterns = torch.tensor(list(itertools.product([False, True], repeat=len(subsets))))
    return {s: patterns[:, k] for k, s in enumerate(subsets)}


def test_the_valuation_pass_is_the_officials():
    torch.manual_seed(0)
    model, data = Net(), dataset(40)
    model.train()
    correct = measure(model, data)()
    assert model.training and model.encoders["audio"][1].training  # modes restored
    phi = sample_contributions(correct, NAMES)
    official = official_valuation(model, DataLoader(data, batch_size=7))
    assert phi["audio"].tolist() == [official[i][0] for i in range(40)]
    assert phi["visual"].tolist() == [official[i][1] for i in range(40)]


def test_the_sample_level_is_the_official_dataset_on_every_case():
    correct = every_pattern(NAMES)  # the 8 cases: each of a, v, fused right or wrong
    phi = sample_contributions(correct, NAMES)
    indices, present = sample_level_plan(phi, NAMES)
    data, drop = official_sample_level(8, {i: (phi["audio"][i].item(), phi["visual"][i].item()) for i in range(8)})
    assert indices.tolist() == data and as_drop(present) == drop
    fused_wrong = ~correct[frozenset(NAMES)]
    copies = torch.bincount(indices[8:], minlength=8) if len(indices) > 8 else torch.zeros(8)
    assert (copies[fused_wrong] == 4).all()  # net: every fused-wrong sample gets four copies


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_the_modality_level_is_the_official_dataset(seed):
    torch.manual_seed(seed)
    model, data = Net(), dataset(60, seed=seed)
    correct = measure(model, data)()
    phi = sample_contributions(correct, NAMES)
    generator = torch.Generator().manual_seed(seed)
    subset = torch.randint(60, (12,), generator=generator)
    con = subset_contributions(phi, subset)
    count, strongest = modality_level_count(con, 60, 1.5)
    extra = torch.randint(60, (count,), generator=generator)
    indices, present = modality_level_plan(60, NAMES, strongest, extra)
    contribution = {i: (phi["audio"][i].item(), phi["visual"][i].item()) for i in range(60)}
    data_list, drop, resample_num = official_modality_level(
        60, contribution, subset.tolist(), lambda n: extra[:n].tolist(), 1.5
    )
    assert resample_num == count and indices.tolist() == data_list and as_drop(present) == drop
    method = ModalityValuation(NAMES, data, level="modality", resample_strength=1.5, seed=seed)
    epoch_data = method.update(correct)  # draws the subset, then the extras, from its generator
    assert torch.equal(epoch_data.indices, indices) and torch.equal(epoch_data.present, present)
    assert method.last["estimate"] == pytest.approx(con)


@pytest.mark.parametrize(("con", "strongest", "dropped"), [((0.9, 0.3), "audio", 1), ((0.2, 0.7), "visual", 2)])
def test_the_stronger_modality_is_zeroed_in_both_branches(con, strongest, dropped):
    count, chosen = modality_level_count(dict(zip(NAMES, con)), 100, 1.0)
    assert chosen == strongest and count > 0
    _, present = modality_level_plan(100, NAMES, chosen, torch.arange(count))
    assert set(as_drop(present[100:])) == {dropped}


def test_the_float_order_is_the_officials():
    assert modality_level_count({"audio": 0.9, "visual": 0.3}, 1000, 1.0) == (399, "audio")  # not 400
    assert int(abs(0.9 - 0.3) * 2 / 3 * 1000) == 400  # the other order


@settings(max_examples=200)
@given(con_a=st.floats(-0.5, 1.5), con_v=st.floats(-0.5, 1.5), alpha=st.floats(0, 4), length=st.integers(1, 10**6))
def test_the_count_is_the_official_expression_bit_for_bit(con_a, con_v, alpha, length):
    gap_a, gap_v = 1.0 - con_a, 1.0 - con_v
    official = int(((abs(gap_a - gap_v) / 3 * 2) * alpha) * length)
    assert modality_level_count({"audio": con_a, "visual": con_v}, length, alpha)[0] == official


# ------------------------------------------------------------------ properties
@pytest.mark.parametrize("m", [2, 3, 4])
def test_the_gap_free_copy_rule_equals_the_official_one_for_up_to_four_modalities(m):
    names = [f"m{k}" for k in range(m)]
    phi = sample_contributions(every_pattern(names), names)
    values = torch.cat(list(phi.values())).unique()
    official = torch.tensor(
        [1 if 0.4 < v < 1 else 2 if -0.1 < v < 0.4 else 3 if v < -0.1 else 0 for v in values.tolist()]
    )
    assert torch.equal(resample_copies(values), official)


@pytest.mark.parametrize("m", [2, 3, 4])
def test_contributions_are_efficient_exact_and_symmetric(m):
    names = [f"m{k}" for k in range(m)]
    correct = every_pattern(names)
    phi = sample_contributions(correct, names)
    total = sum(phi.values())
    torch.testing.assert_close(total, correct[frozenset(names)].double() * m, rtol=0, atol=1e-12)  # Σφ = v(all)
    grid = math.factorial(m)
    assert all(torch.equal(p * grid, (p * grid).round()) for p in phi.values())
    everything_right = torch.stack([c for c in correct.values()]).all(0)
    assert all((p[everything_right] == 1.0).all() for p in phi.values())  # exactly 1: no copies
    renamed = {frozenset("m1" if n == "m0" else "m0" if n == "m1" else n for n in s): c for s, c in correct.items()}
    swapped = sample_contributions(renamed, names)
    assert torch.equal(swapped["m0"], phi["m1"]) and torch.equal(swapped["m1"], phi["m0"])


@settings(max_examples=40)
@given(a=st.floats(-3, 3), b=st.floats(-3, 3))
def test_fewer_copies_for_a_larger_contribution(a, b):
    low, high = sorted((a, b))
    assert resample_copies(torch.tensor(low)) >= resample_copies(torch.tensor(high))
    assert 0 <= resample_copies(torch.tensor(low)) <= 3


def test_three_modalities_copy_one_modality_alone():
    names = ["a", "b", "c"]
    correct = every_pattern(names)
    phi = sample_contributions(correct, names)
    indices, present = sample_level_plan(phi, names)
    n = len(correct[frozenset(names)])
    assert (present[n:].sum(1) == 1).all() and present[:n].all()
    assert len(indices) == n + int(sum(resample_copies(p).sum() for p in phi.values()))


def test_zero_absent_zeroes_rows_and_keeps_the_gradient():
    features = {"audio": torch.randn(3, 2, requires_grad=True), "visual": torch.randn(3, 2, 2, requires_grad=True)}
    present = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    out = zero_absent(features, present, NAMES)
    assert (out["visual"][1] == 0).all() and (out["audio"][2] == 0).all()
    assert torch.equal(out["audio"][:2], features["audio"][:2])
    sum(o.sum() for o in out.values()).backward()
    assert features["audio"].grad[:, 0].tolist() == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match=r"\[batch, 2\]"):
        zero_absent(features, present[:, :1], NAMES)


# ------------------------------------------------------------------ the method
def test_warm_up_then_resampled_data_rebuilt_each_epoch():
    torch.manual_seed(1)
    model, data = Net(), dataset(30)
    method = ModalityValuation(NAMES, data, measure(model, data), warmup_epochs=2)
    method.start_epoch(0)
    assert len(method.dataset) == 30 and method.history == []
    method.start_epoch(2)
    phi = sample_contributions(measure(model, data)(), NAMES)
    indices, present = sample_level_plan(phi, NAMES)
    epoch_data = method.dataset
    assert isinstance(epoch_data, ResampledDataset) and torch.equal(epoch_data.indices, indices)
    _, mask = epoch_data[len(epoch_data) - 1]
    assert mask.dtype == torch.float32 and mask.shape == (2,)
    _, present_batch = next(iter(DataLoader(epoch_data, batch_size=5)))
    assert present_batch.shape == (5, 2)
    record = method.last
    assert record["step"] == 2 and record["contribution"]["audio"] == pytest.approx(phi["audio"].mean().item())
    assert math.isnan(record["estimate"]["audio"])
    assert record["zeroed"]["visual"] == float((~present[30:, 1]).sum())
    method.start_epoch(2)  # again for the same epoch: kept
    assert len(method.history) == 1


def test_a_sample_level_epoch_trains():
    torch.manual_seed(2)
    model, data = Net(), dataset(32)
    method = ModalityValuation(NAMES, data, measure(model, data), warmup_epochs=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch in range(3):
        method.start_epoch(epoch)
        for (xa, xv, y), present in DataLoader(method.dataset, batch_size=8, shuffle=True):
            optimizer.zero_grad()
            features = method.mask(model.encode({"audio": xa, "visual": xv}), present)
            F.cross_entropy(model.head(features), y).backward()
            optimizer.step()
    assert len(method.history) == 2 and len(method.dataset) > 32


def run(method, model, optimizer, epochs, seed=0):
    for epoch in epochs:
        method.start_epoch(epoch)
        loader = DataLoader(
            method.dataset, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(seed + epoch)
        )
        for (xa, xv, y), present in loader:
            optimizer.zero_grad()
            F.cross_entropy(model.head(method.mask(model.encode({"audio": xa, "visual": xv}), present)), y).backward()
            optimizer.step()


@pytest.mark.parametrize("level", ["sample", "modality"])
def test_resume_equals_an_uninterrupted_run(level):
    torch.manual_seed(3)
    data = dataset(24)
    options = {"level": level, "warmup_epochs": 1, "seed": 5, "resample_strength": 3.0}
    model = Net()
    straight_model = copy.deepcopy(model)
    straight = ModalityValuation(NAMES, data, measure(straight_model, data), **options)
    straight_opt = torch.optim.SGD(straight_model.parameters(), lr=0.1, momentum=0.9)
    run(straight, straight_model, straight_opt, range(4))

    first = ModalityValuation(NAMES, data, measure(model, data), **options)
    first_opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    run(first, model, first_opt, range(2))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": first_opt.state_dict(), "method": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed_model = Net()
    resumed_model.load_state_dict(saved["model"])
    resumed = ModalityValuation(NAMES, data, measure(resumed_model, data), **{**options, "seed": 99})
    resumed_opt = torch.optim.SGD(resumed_model.parameters(), lr=0.1, momentum=0.9)
    resumed_opt.load_state_dict(saved["opt"])
    resumed.load_state_dict(saved["method"])
    assert torch.equal(resumed.dataset.indices, first.dataset.indices)  # the epoch's data come back too
    run(resumed, resumed_model, resumed_opt, range(2, 4))
    for a, b in zip(resumed_model.state_dict().values(), straight_model.state_dict().values()):
        assert torch.equal(a, b)
    assert repr(resumed.history) == repr(straight.history)
    if level == "modality":
        assert any(r["zeroed"]["audio"] + r["zeroed"]["visual"] > 0 for r in straight.history)


def test_errors_name_the_problem():
    torch.manual_seed(4)
    model, data = Net(), dataset(12)
    method = ModalityValuation(NAMES, data, level="modality", part_ratio=0.05)
    correct = measure(model, data)()
    correct[frozenset(NAMES)][0] = True  # one right: no all-wrong warning
    with pytest.raises(ValueError, match="draws none"):
        method.update(correct)
    with pytest.raises(ValueError, match="covers 11 samples, the training set has 12"):
        method.update({s: c[:11] for s, c in correct.items()})
    with pytest.raises(ValueError, match=r"missing \[\['audio'\]\]"):
        method.update({s: c for s, c in correct.items() if s != frozenset({"audio"})})
    with pytest.raises(ValueError, match="outside the non-empty subsets"):
        method.update({**correct, frozenset({"text"}): correct[frozenset(NAMES)]})
    with pytest.raises(ValueError, match="shuffle=False"):
        coalition_correct(model, forward, model.head, DataLoader(data, shuffle=True))
    with pytest.raises(ValueError, match="level"):
        ModalityValuation(NAMES, data, level="batch")
    with pytest.raises(ValueError, match="part_ratio"):
        ModalityValuation(NAMES, data, part_ratio=1.5)
    with pytest.raises(ValueError, match="warmup_epochs"):
        ModalityValuation(NAMES, data, warmup_epochs=-1)
    nan_head = lambda features: model.head(features) * float("nan")
    with pytest.raises(ValueError, match=r"coalition \['audio'\] contain NaN"):
        coalition_correct(model, forward, nan_head, DataLoader(data))


def test_warnings_for_a_forgotten_start_epoch_and_an_all_wrong_valuation():
    data = dataset(10)
    method = ModalityValuation(NAMES, data)
    with pytest.warns(RuntimeWarning, match=r"start_epoch\(epoch\)"):
        assert len(method.dataset) == 10
    wrong = {s: torch.zeros(10, dtype=torch.bool) for s in coalitions(NAMES)[1:]}
    with pytest.warns(RuntimeWarning, match="got no training sample right"):
        epoch_data = method.update(wrong)
    assert len(epoch_data) == 10 * 5  # four copies each
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        method.update({s: torch.ones(10, dtype=torch.bool) for s in coalitions(NAMES)[1:]})
    assert len(method.dataset) == 10
    method.start_epoch(7)  # past the warm-up, no measure, no update
    with pytest.warns(RuntimeWarning, match=r"call update\(correct\) after start_epoch"):
        assert len(method.dataset) == 10


def test_a_newer_state_is_refused_and_reset_forgets():
    data = dataset(10)
    method = ModalityValuation(NAMES, data, level="modality", seed=1, resample_strength=5.0)
    method.start_epoch(0)
    wrong = {
        s: torch.rand(10, generator=torch.Generator().manual_seed(k)) > 0.5 for k, s in enumerate(coalitions(NAMES)[1:])
    }
    first = method.update(wrong).indices.clone()
    assert len(first) > 10  # extras drawn
    state = method.state_dict()
    state["version"] = 99
    with pytest.raises(ValueError, match="newer"):
        ModalityValuation(NAMES, data, level="modality").load_state_dict(state)
    with pytest.raises(ValueError, match="level"):
        ModalityValuation(NAMES, data).load_state_dict(method.state_dict())
    method.reset()
    assert method.history == [] and method.contributions is None
    assert torch.equal(method.update(wrong).indices, first)  # the generator is back at its start
    assert "level='modality'" in repr(method)


def test_the_registry_entry():
    (info,) = METHODS
    assert info.key == "valuation" and info.preset is ModalityValuation and info.kind == "data"
    assert {o.keyword for o in info.options} >= {"level", "warmup_epochs", "resample_strength", "part_ratio"}
