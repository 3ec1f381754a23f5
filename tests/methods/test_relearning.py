"""Diagnosing & Re-learning (Wei et al., ECCV 2024): purity and the re-initialisation as properties, the diagnosis
and the soft re-initialisation against a transcription of the official ``reinit_score``/``reinit``, the schedule,
errors, warnings and resume."""

from __future__ import annotations

import copy
import io
import math
import sys
import warnings

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from sklearn.cluster import KMeans
from sklearn.metrics import accuracy_score
from sklearn.preprocessing import MinMaxScaler
from tiny import TinyModel, batches
from torch import nn

from gradmod.methods.relearning import (
    METHODS,
    Relearning,
    cluster_purity,
    pooled_features,
    purity,
    reinit_coefficients,
    soft_reinit_,
)

NAMES = ("audio", "visual")


def make_model(names=NAMES, dim=8):
    """tiny.TinyModel with a batch norm in every encoder (statistics a re-initialisation must leave alone)."""
    model = TinyModel(names, dim=dim)
    for encoder in model.encoders.values():
        encoder.insert(1, nn.BatchNorm1d(dim))
    return model


def forward(model, batch):
    inputs, y = batch
    return model(inputs)[2], y


def splits(model, train, held_out):
    loaders = {"train": train, "held_out": held_out}
    return lambda split: pooled_features(model, forward, loaders[split])


def train_epoch(model, optimizer, data):
    model.train()
    for inputs, y in data:
        optimizer.zero_grad()
        F.cross_entropy(model(inputs)[0], y).backward()
        optimizer.step()


# ------------------------------------------------------------------ transcription of the official code
def official_purity_score(y_true, y_pred):
    """ours.py's purity_score: labels mapped to 0..K−1, a histogram per cluster, the majority voted, accuracy."""
    y_true = y_true.copy()
    y_voted_labels = np.zeros(y_true.shape)
    labels = np.unique(y_true)
    for k in range(labels.shape[0]):
        y_true[y_true == labels[k]] = k
    labels = np.unique(y_true)
    bins = np.concatenate((labels, [np.max(labels) + 1]), axis=0)
    for cluster in np.unique(y_pred):
        hist, _ = np.histogram(y_true[y_pred == cluster], bins=bins)
        y_voted_labels[y_pred == cluster] = np.argmax(hist)
    return accuracy_score(y_true, y_voted_labels)


def official_reinit(model, checkpoint, train, train_label, val, val_label, n_classes, move_lambda, n_init):
    """ours.py's reinit_score and reinit for two modalities: each split scaled and clustered on its own, gaps,
    tanh weights as float64 tensors, every encoder parameter blended with its initial value."""
    purities = []
    for fea, labels in (
        (train["audio"], train_label),
        (val["audio"], val_label),
        (train["visual"], train_label),
        (val["visual"], val_label),
    ):
        result = MinMaxScaler(feature_range=(-1, 1)).fit_transform(fea)
        y_pred = KMeans(n_clusters=n_classes, random_state=0, n_init=n_init).fit_predict(result)
        purities.append(official_purity_score(labels.numpy(), y_pred))
    weight_audio = torch.tanh(torch.tensor(move_lambda * np.abs(purities[0] - purities[1])))
    weight_visual = torch.tanh(torch.tensor(move_lambda * np.abs(purities[2] - purities[3])))
    for name, param in model.named_parameters():
        for key, weight in (("audio", weight_audio), ("visual", weight_visual)):
            if f"encoders.{key}" in name:
                param.data = weight * checkpoint[name] + (1 - weight) * param.data
    return purities, float(weight_audio), float(weight_visual)


@pytest.mark.parametrize("n_init", ["auto", 10])
def test_a_reinit_is_the_officials(n_init):
    torch.manual_seed(0)
    model, train, held_out = make_model(), batches(5, batch=8), batches(4, batch=8, seed=1)
    method = Relearning(
        {n: model.encoders[n] for n in NAMES}, 4, splits(model, train, held_out), reinit_strength=5.0, n_init=n_init
    )
    checkpoint = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    for _ in range(3):
        train_epoch(model, optimizer, train)
    official_model = copy.deepcopy(model)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    moments = copy.deepcopy(optimizer.state_dict())
    train_features, train_labels = splits(model, train, held_out)("train")
    held_features, held_labels = splits(model, train, held_out)("held_out")
    purities, w_audio, w_visual = official_reinit(
        official_model, checkpoint, train_features, train_labels, held_features, held_labels, 4, 5.0, n_init
    )
    alpha = method.relearn(train_features, train_labels, held_features, held_labels)
    assert alpha == pytest.approx({"audio": w_audio, "visual": w_visual}, rel=1e-12)
    assert 0 < w_audio < 1 or 0 < w_visual < 1  # something moved
    record = method.last
    assert [record["train_purity"]["audio"], record["held_out_purity"]["audio"]] == purities[:2]
    assert [record["train_purity"]["visual"], record["held_out_purity"]["visual"]] == purities[2:]
    for (name, p), q in zip(model.named_parameters(), official_model.parameters()):
        assert torch.equal(p, q), name
    assert all(torch.equal(buffers[k], v) for k, v in model.named_buffers())  # BN statistics untouched
    assert str(optimizer.state_dict()) == str(moments)  # optimizer state untouched
    assert all(p is q for p, q in zip(optimizer.param_groups[0]["params"], model.parameters()))


@settings(max_examples=40)
@given(labels=st.lists(st.integers(0, 4), min_size=1, max_size=40), seed=st.integers(0, 1000))
def test_purity_is_the_official_purity_score(labels, seed):
    clusters = torch.randint(0, 3, (len(labels),), generator=torch.Generator().manual_seed(seed))
    want = official_purity_score(np.array(labels), clusters.numpy())
    assert purity(torch.tensor(labels), clusters) == pytest.approx(want, abs=1e-12)


def test_purity_ignores_the_names_of_clusters_and_classes_and_is_one_for_pure_clusters():
    labels, clusters = torch.tensor([0, 0, 1, 1, 2, 2, 2]), torch.tensor([5, 5, 1, 1, 1, 0, 0])
    assert purity(labels, clusters) == pytest.approx(6 / 7)
    assert purity(labels * 10 + 3, (clusters + 1) * 7) == purity(labels, clusters)
    assert purity(labels, labels) == 1.0


def test_the_coefficient_grows_with_the_gap_and_is_zero_without_one():
    alpha = reinit_coefficients({"a": 0.9, "b": 0.5, "c": 0.4}, {"a": 0.5, "b": 0.5, "c": 0.5}, 3.0)
    assert alpha["b"] == 0.0 and alpha["c"] == pytest.approx(math.tanh(0.3))
    assert alpha["a"] == pytest.approx(math.tanh(1.2)) and alpha["a"] > alpha["c"]
    assert reinit_coefficients({"a": 0.9, "b": 0.1}, {"a": 0.1, "b": 0.9}, 0.0) == {"a": 0.0, "b": 0.0}


def test_soft_reinit_blends_in_place():
    p = nn.Parameter(torch.tensor([1.0, 2.0]))
    ident = id(p)
    soft_reinit_([p], [torch.tensor([3.0, 6.0])], 0.25)
    assert id(p) == ident and p.tolist() == [1.5, 3.0]
    soft_reinit_([p], [torch.tensor([3.0, 6.0])], 0.0)
    assert p.tolist() == [1.5, 3.0]
    soft_reinit_([p], [torch.tensor([3.0, 6.0])], 1.0)
    assert p.tolist() == [3.0, 6.0]


# ------------------------------------------------------------------ the schedule and M > 2
class Recorder:
    """A features callable with fixed, well-separated training and overlapping held-out features."""

    def __init__(self, names=NAMES):
        g = torch.Generator().manual_seed(0)
        self.labels = torch.arange(30) % 3
        self.train = {n: F.one_hot(self.labels, 3).float() * 4 + torch.randn(30, 3, generator=g) for n in names}
        self.held_out = {n: F.one_hot(self.labels, 3).float() + torch.randn(30, 3, generator=g) for n in names}
        self.calls: list[str] = []

    def __call__(self, split):
        self.calls.append(split)
        return (self.train if split == "train" else self.held_out), self.labels


def test_the_schedule_every_k_epochs_at_most_n_times():
    model, recorder = make_model(), Recorder()
    method = Relearning(
        {n: model.encoders[n] for n in NAMES}, 3, recorder, reinit_every=2, max_reinits=2, reinit_strength=1.0
    )
    for epoch in range(9):
        method.end_epoch(epoch)
    assert [r["step"] for r in method.history] == [2, 4] and method.reinits == 2
    assert recorder.calls == ["train", "held_out"] * 2
    assert all(r["gap"]["audio"] > 0.2 and 0 < r["reinit"]["audio"] < 1 for r in method.history)


def test_three_modalities_each_move_by_their_own_gap():
    names = ("audio", "visual", "text")
    model, recorder = make_model(names), Recorder(names)
    recorder.held_out["text"] = recorder.train["text"]  # no gap for text: it stays
    method = Relearning({n: model.encoders[n] for n in names}, 3, recorder, reinit_every=1, reinit_strength=1.0)
    method.encoders_before = copy.deepcopy(model.state_dict())
    for n in names:  # move away from θ⁰ so the pull is visible
        with torch.no_grad():
            for p in model.encoders[n].parameters():
                p.add_(1.0)
    moved = copy.deepcopy(model.state_dict())
    with pytest.warns(RuntimeWarning, match=r"held-out features of \['text'\] equal the training features"):
        method.end_epoch(1)
    record = method.last
    assert record["reinit"]["text"] == 0.0 and record["reinit"]["audio"] > 0
    assert torch.equal(model.state_dict()["encoders.text.0.weight"], moved["encoders.text.0.weight"])
    alpha = record["reinit"]["audio"]
    want = alpha * method.encoders_before["encoders.audio.0.weight"] + (1 - alpha) * moved["encoders.audio.0.weight"]
    torch.testing.assert_close(model.state_dict()["encoders.audio.0.weight"], want)
    assert torch.equal(model.state_dict()["head.weight"], moved["head.weight"])  # the head is untouched


# ------------------------------------------------------------------ messages
def test_errors_name_the_problem(monkeypatch):
    model = make_model()
    encoders = {n: model.encoders[n] for n in NAMES}
    with pytest.raises(ValueError, match="n_init"):
        Relearning(encoders, 3, n_init=0)
    with pytest.raises(ValueError, match="num_classes"):
        Relearning(encoders, 1)
    with pytest.raises(ValueError, match="two or more"):
        Relearning({"audio": model.encoders["audio"]}, 3)
    method = Relearning(encoders, 3)
    recorder = Recorder()
    with pytest.raises(ValueError, match=r"missing \['visual'\]"):
        method.relearn({"audio": recorder.train["audio"]}, recorder.labels, recorder.held_out, recorder.labels)
    with pytest.raises(ValueError, match=r"held-out features of 'audio' must be \[N, D\] with N = 29"):
        method.relearn(recorder.train, recorder.labels, recorder.held_out, recorder.labels[:29])
    with pytest.raises(ValueError, match="at least 3 samples"):
        cluster_purity(torch.randn(2, 3), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="pool them first"):
        cluster_purity(torch.randn(6, 3, 2), torch.zeros(6), 3)
    with pytest.raises(ValueError, match="NaN or inf"):
        cluster_purity(torch.full((6, 2), float("nan")), torch.zeros(6), 3)
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)
    with pytest.raises(ImportError, match=r"pip install 'gradmod\[relearning\]'"):
        cluster_purity(torch.randn(6, 2), torch.zeros(6), 3)


def test_warnings_for_a_repeated_epoch_missing_features_and_a_near_reset():
    model = make_model()
    encoders = {n: model.encoders[n] for n in NAMES}
    method = Relearning(encoders, 3, reinit_every=1)
    with pytest.warns(RuntimeWarning, match=r"no features= callable"):
        method.end_epoch(1)
    with pytest.warns(RuntimeWarning, match=r"ignored"):
        method.end_epoch(1)
    strong = Relearning(encoders, 3, Recorder(), reinit_every=1, reinit_strength=100.0)
    with pytest.warns(RuntimeWarning, match="back to their initial"):
        strong.end_epoch(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Relearning(encoders, 3, Recorder(), reinit_every=5).end_epoch(4)


# ------------------------------------------------------------------ state
def test_resume_equals_an_uninterrupted_run():
    torch.manual_seed(1)
    train, held_out = batches(4, batch=8), batches(3, batch=8, seed=2)
    options = {"reinit_every": 2, "max_reinits": 2, "reinit_strength": 6.0}

    def run(model, method, optimizer, epochs):
        for epoch in epochs:
            train_epoch(model, optimizer, train)
            method.end_epoch(epoch)

    model = make_model()
    straight_model = copy.deepcopy(model)
    straight = Relearning(
        {n: straight_model.encoders[n] for n in NAMES}, 4, splits(straight_model, train, held_out), **options
    )
    straight_opt = torch.optim.SGD(straight_model.parameters(), lr=0.2, momentum=0.9)
    run(straight_model, straight, straight_opt, range(6))

    first = Relearning({n: model.encoders[n] for n in NAMES}, 4, splits(model, train, held_out), **options)
    first_opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    run(model, first, first_opt, range(3))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": first_opt.state_dict(), "method": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed_model = make_model()
    resumed_model.load_state_dict(saved["model"])
    resumed = Relearning(
        {n: resumed_model.encoders[n] for n in NAMES}, 4, splits(resumed_model, train, held_out), **options
    )
    resumed_opt = torch.optim.SGD(resumed_model.parameters(), lr=0.2, momentum=0.9)
    resumed_opt.load_state_dict(saved["opt"])
    resumed.load_state_dict(saved["method"])  # θ⁰ of the original run, not of the loaded weights
    run(resumed_model, resumed, resumed_opt, range(3, 6))
    for a, b in zip(resumed_model.state_dict().values(), straight_model.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.history == straight.history and [r["step"] for r in straight.history] == [2, 4]
    assert any(r["reinit"]["audio"] > 0 for r in straight.history)


def test_a_newer_state_is_refused_and_reset_restarts_the_schedule():
    model = make_model()
    method = Relearning(
        {n: model.encoders[n] for n in NAMES}, 3, Recorder(), reinit_every=1, max_reinits=1, reinit_strength=1.0
    )
    method.end_epoch(1)
    state = method.state_dict()
    state["version"] = 99
    with pytest.raises(ValueError, match="newer"):
        Relearning({n: model.encoders[n] for n in NAMES}, 3).load_state_dict(state)
    other = make_model(dim=6)
    with pytest.raises(ValueError, match="do not fit"):
        Relearning({n: other.encoders[n] for n in NAMES}, 3).load_state_dict(method.state_dict())
    method.end_epoch(2)
    assert method.reinits == 1
    method.reset()
    method.end_epoch(1)
    assert method.reinits == 1 and len(method.history) == 1
    assert "n_init=10" in repr(method)


def test_the_registry_entry():
    (info,) = METHODS
    assert info.key == "relearning" and info.preset is Relearning and info.kind == "epoch"
    assert info.strength.keyword == "reinit_strength" and info.strength.default == 3.0
