"""UMT and UME (Du et al., ICML 2023): UMT's loss against a transcription of BalanceBenchmark's ``UMT_trainer.py``
(teachers in train mode) and with frozen eval-mode teachers, UME's independent training and averaged prediction,
errors by name and exact resume."""

from __future__ import annotations

import copy
import math

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

from gradmod.methods import umt
from gradmod.methods.umt import UME, UMT, umt_loss, unimodal_ensemble

NAMES = ("audio", "visual")


def encoder() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU())


class AVNet(nn.Module):
    """Two encoders with batch norm and a concat head."""

    def __init__(self):
        super().__init__()
        self.encoders = nn.ModuleDict({n: encoder() for n in NAMES})
        self.head = nn.Linear(12, 3)

    def forward(self, inputs):
        features = {n: self.encoders[n](inputs[n]) for n in NAMES}
        return self.head(torch.cat([features[n] for n in NAMES], 1)), features


def batches(count=3, seed=0, batch=8):
    g = torch.Generator().manual_seed(seed)
    return [
        ({n: torch.randn(batch, 5, generator=g) + 2.0 for n in NAMES}, torch.randint(0, 3, (batch,), generator=g))
        for _ in range(count)
    ]


def teachers(seed=10):
    torch.manual_seed(seed)
    return {n: encoder() for n in NAMES}


# ------------------------------------------------------------------ BalanceBenchmark's port, transcribed
def balancebenchmark_loss(out, label, student_features, loaded_model, batch, scaling=10.0):
    """UMT_trainer.py, ``training_step``: the teachers stay in whatever mode they are (train: never set)."""
    loss = nn.CrossEntropyLoss()(out, label)
    for modality in loaded_model:
        with torch.no_grad():
            out_unimodal = loaded_model[modality](batch[modality])
        loss += scaling * nn.MSELoss()(out_unimodal, student_features[modality])
    return loss


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_loss_is_balancebenchmarks_with_teachers_in_the_chosen_mode(mode):
    torch.manual_seed(0)
    model = AVNet()
    mine, theirs = teachers(), teachers()
    for module in theirs.values():
        module.train(mode == "train")
    method = UMT(mine, teacher_mode=mode)
    for inputs, y in batches():
        out, features = model(inputs)
        loss = method.loss(logits=out, features=features, inputs=inputs, target=y)
        expected = balancebenchmark_loss(out, y, features, theirs, inputs)
        torch.testing.assert_close(loss, expected)
        grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
        for g, h in zip(grads, torch.autograd.grad(expected, list(model.parameters()))):
            torch.testing.assert_close(g, h)
    for name in NAMES:
        torch.testing.assert_close(mine[name][1].running_mean, theirs[name][1].running_mean)
    moved = not torch.equal(mine["audio"][1].running_mean, torch.zeros(6))
    assert moved == (mode == "train")  # eval-mode teachers keep their statistics


def test_eval_teachers_stay_fixed_even_when_the_model_is_put_in_train_mode():
    torch.manual_seed(1)
    model = AVNet()
    fixed = teachers()
    container = nn.ModuleDict({"model": model, "teachers": nn.ModuleDict(fixed)})
    method = UMT(fixed)
    container.train()  # a loop's model.train() reaches the teachers registered inside it
    before = {n: copy.deepcopy(fixed[n].state_dict()) for n in NAMES}
    inputs, y = batches(1)[0]
    out, features = model(inputs)
    loss = method.loss(out, features, inputs, y)
    loss.backward()
    for n in NAMES:
        for key, value in fixed[n].state_dict().items():
            assert torch.equal(value, before[n][key])
        assert all(p.grad is None for p in fixed[n].parameters())
    taught = method.teacher_features(inputs)
    expected = umt_loss(out, y, features, taught, 10.0)
    torch.testing.assert_close(loss, expected)
    assert method.last["loss"]["fused"] == pytest.approx(F.cross_entropy(out, y).item(), rel=1e-6)


@settings(max_examples=25)
@given(seed=st.integers(0, 1000), weight=st.floats(0.0, 20.0))
def test_the_distillation_is_zero_at_the_teachers_features_and_grows_with_the_weight(seed, weight):
    g = torch.Generator().manual_seed(seed)
    logits, y = torch.randn(4, 3, generator=g), torch.randint(0, 3, (4,), generator=g)
    features = {n: torch.randn(4, 6, generator=g) for n in NAMES}
    ce = F.cross_entropy(logits, y)
    torch.testing.assert_close(umt_loss(logits, y, features, features, weight), ce)
    shifted = {n: f + 1.0 for n, f in features.items()}
    torch.testing.assert_close(umt_loss(logits, y, features, shifted, weight), ce + weight * 2.0)


# ------------------------------------------------------------------ UME
def test_ume_trains_each_modality_as_if_alone_and_averages_the_predictions():
    data = batches(4, seed=3)
    torch.manual_seed(2)
    joint = nn.ModuleDict({n: nn.Linear(5, 3) for n in NAMES})
    alone = copy.deepcopy(joint)
    method = UME(NAMES)
    opt = torch.optim.SGD(joint.parameters(), lr=0.1, momentum=0.9)
    for inputs, y in data:
        opt.zero_grad()
        method.loss({n: joint[n](inputs[n]) for n in NAMES}, y).backward()
        opt.step()
    for n in NAMES:
        single = torch.optim.SGD(alone[n].parameters(), lr=0.1, momentum=0.9)
        for inputs, y in data:
            single.zero_grad()
            F.cross_entropy(alone[n](inputs[n]), y).backward()
            single.step()
    for p, q in zip(joint.parameters(), alone.parameters()):
        torch.testing.assert_close(p, q)
    logits = {n: joint[n](data[0][0][n]) for n in NAMES}
    probs = (torch.softmax(logits["audio"], 1) + torch.softmax(logits["visual"], 1)) / 2
    torch.testing.assert_close(method.predict(logits), probs)
    torch.testing.assert_close(UME(NAMES, average="logits").predict(logits), (logits["audio"] + logits["visual"]) / 2)
    weighted = UME(NAMES, weights={"audio": 3.0, "visual": 1.0}).predict(logits)
    torch.testing.assert_close(weighted, 0.75 * torch.softmax(logits["audio"], 1) + 0.25 * torch.softmax(logits["visual"], 1))
    assert len(method.history) == 4 and set(method.last["loss"]) == set(NAMES)


@settings(max_examples=25)
@given(seed=st.integers(0, 1000), m=st.integers(2, 4))
def test_the_ensemble_is_a_distribution_and_symmetric(seed, m):
    g = torch.Generator().manual_seed(seed)
    logits = {f"m{k}": 3 * torch.randn(5, 4, generator=g) for k in range(m)}
    probs = unimodal_ensemble(logits)
    torch.testing.assert_close(probs.sum(1), torch.ones(5))
    torch.testing.assert_close(unimodal_ensemble(dict(reversed(list(logits.items())))), probs)
    same = unimodal_ensemble({name: logits["m0"] for name in logits})
    torch.testing.assert_close(same, torch.softmax(logits["m0"], 1))


# ------------------------------------------------------------------ errors and warnings
def test_bad_use_fails_by_name():
    torch.manual_seed(3)
    model = AVNet()
    inputs, y = batches(1)[0]
    out, features = model(inputs)
    method = UMT(teachers())
    with pytest.raises(TypeError, match="teachers must be a mapping"):
        UMT([encoder(), encoder()])
    with pytest.raises(TypeError, match=r"the teachers of \['visual'\] are not nn.Modules"):
        UMT({"audio": encoder(), "visual": lambda x: x})
    with pytest.raises(ValueError, match="teacher_mode must be one of"):
        UMT(teachers(), teacher_mode="frozen")
    with pytest.raises(ValueError, match="'fused' names the task loss"):
        UMT({"fused": encoder(), "audio": encoder()})
    with pytest.raises(ValueError, match=r"missing \['visual'\]"):
        method.loss(out, {"audio": features["audio"]}, inputs, y)
    with pytest.raises(ValueError, match=r"features\['visual'\] must have the teacher's shape \(8, 6\)"):
        method.loss(out, {**features, "visual": features["visual"][:, :4]}, inputs, y)
    with pytest.raises(ValueError, match=r"features\['audio'\] and inputs\['audio'\] have batch 3, the logits 8"):
        method.loss(out, {**features, "audio": features["audio"][:3]}, {**inputs, "audio": inputs["audio"][:3]}, y)
    with pytest.raises(ValueError, match=r"features of modalities \['audio'\] contain NaN"):
        method.loss(out, {**features, "audio": torch.full((8, 6), math.nan)}, inputs, y)
    with pytest.raises(ValueError, match="logits contain NaN"):
        method.loss(torch.full((8, 3), math.inf), features, inputs, y)
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        method.loss(out, features, inputs, torch.full((8,), 5))
    broken = UMT({"audio": encoder(), "visual": nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6))})
    with torch.no_grad():
        broken.teachers["visual"][2].weight.fill_(math.nan)
    with pytest.raises(ValueError, match=r"the teachers of \['visual'\] returned NaN"):
        broken.loss(out, features, inputs, y)

    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(TypeError, match="returned tuple"):
        UMT({"audio": Pair(), "visual": encoder()}).loss(out, features, inputs, y)
    with pytest.raises(ValueError, match="average must be one of"):
        UME(NAMES, average="votes")
    with pytest.raises(ValueError, match="weights are all 0"):
        UME(NAMES, weights={"audio": 0.0, "visual": 0.0})


def test_a_teacher_that_is_the_models_own_encoder_is_warned():
    torch.manual_seed(4)
    model = AVNet().eval()
    method = UMT(dict(model.encoders))
    inputs, y = batches(1)[0]
    out, features = model(inputs)
    with pytest.warns(RuntimeWarning, match=r"teachers of \['audio', 'visual'\] return exactly the model's own features"):
        method.loss(out, features, inputs, y)


# ------------------------------------------------------------------ state
def run(model, method, data, opt):
    for inputs, y in data:
        opt.zero_grad()
        out, features = model(inputs)
        method.loss(out, features, inputs, y).backward()
        opt.step()


def test_exact_resume_with_drifting_teachers_restores_their_statistics(tmp_path):
    data = batches(4, seed=5)
    torch.manual_seed(5)
    model = AVNet()
    method = UMT(teachers(), teacher_mode="train")
    run(model, method, data, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))

    torch.manual_seed(5)
    first = AVNet()
    first_method = UMT(teachers(), teacher_mode="train")
    opt = torch.optim.SGD(first.parameters(), lr=0.1, momentum=0.9)
    run(first, first_method, data[:2], opt)
    torch.save({"model": first.state_dict(), "opt": opt.state_dict(), "umt": first_method.state_dict()}, tmp_path / "c.pt")
    saved = torch.load(tmp_path / "c.pt")
    resumed = AVNet()
    resumed.load_state_dict(saved["model"])
    resumed_method = UMT(teachers(), teacher_mode="train")  # fresh teachers: their drift comes from the state
    resumed_method.load_state_dict(saved["umt"])
    opt = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
    opt.load_state_dict(saved["opt"])
    run(resumed, resumed_method, data[2:], opt)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert resumed_method.history == method.history
    for a, b in zip(method.teachers.buffers(), resumed_method.teachers.buffers()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="newer"):
        UMT(teachers(), teacher_mode="train").load_state_dict({**saved["umt"], "version": 99})
    with pytest.raises(ValueError, match="teacher_mode='train', this UMT has teacher_mode='eval'"):
        UMT(teachers()).load_state_dict(saved["umt"])
    method.reset()
    assert method.history == [] and "teacher_mode='train'" in repr(method)


def test_ume_state_and_the_registry_entries():
    method = UME(NAMES, average="logits")
    method.loss({n: torch.randn(3, 2) for n in NAMES}, torch.tensor([0, 1, 0]))
    other = UME(NAMES, average="logits")
    other.load_state_dict(method.state_dict())
    assert other.history == method.history
    with pytest.raises(ValueError, match="average='logits', this UME has average='probabilities'"):
        UME(NAMES).load_state_dict(method.state_dict())
    with pytest.raises(ValueError, match="newer"):
        UME(NAMES).load_state_dict({**method.state_dict(), "version": 99})
    method.reset()
    assert method.history == []
    infos = {info.key: info for info in umt.METHODS}
    assert infos["umt"].preset is UMT and infos["ume"].preset is UME
    assert {info.kind for info in infos.values()} == {"loss"}
    assert UMT.loss_inputs == ("logits", "features", "inputs", "target") and infos["umt"].strength.default == 10.0
