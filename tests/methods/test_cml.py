"""CML (Ma et al., ICML 2023): removal orders and the rank penalty as properties; the step against transcriptions
of the official ``miwae/train.py`` (mean-imputed inputs, per-sample orders and hinges) and of BalanceBenchmark's
``CML_trainer.py`` (zeroed features at the head, one order per epoch, the batch-sum hinge); errors, resume."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from gradmod.fusion import ConcatFusion
from gradmod.methods import cml
from gradmod.methods.cml import (
    CML,
    batch_rank,
    confidence_rank,
    input_means,
    kept_modalities,
    removal_orders,
)

NAMES = ("audio", "visual")


class Net(nn.Module):
    """An encoder per modality and a concat head (decouplable), as BalanceBenchmark's models."""

    def __init__(self, names=NAMES, in_dim=5, dim=4, classes=3):
        super().__init__()
        self.names = tuple(names)
        self.encoders = nn.ModuleDict({n: nn.Sequential(nn.Linear(in_dim, dim), nn.Tanh()) for n in self.names})
        self.head = ConcatFusion({n: dim for n in self.names}, classes)

    def forward(self, inputs):
        features = {n: self.encoders[n](inputs[n]) for n in self.names}
        return self.head(features), features


class Flat(nn.Module):
    """The official MIWAE experiments' classifier on the concatenated views (one MLP)."""

    def __init__(self, widths, classes=3):
        super().__init__()
        self.widths = dict(widths)
        self.net = nn.Sequential(nn.Linear(sum(self.widths.values()), 6), nn.Tanh(), nn.Linear(6, classes))

    def forward(self, inputs):
        """``{modality: views}`` (gradmod's call) or the concatenated ``[B, p]`` data (the official call)."""
        flat = inputs if isinstance(inputs, torch.Tensor) else torch.cat([inputs[n] for n in self.widths], 1)
        return self.net(flat)


def batches(steps, names=NAMES, batch=12, in_dim=5, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        y = torch.randint(0, classes, (batch,), generator=g)
        out.append(({n: F.one_hot(y, in_dim).float() * (2.0 - i) + torch.randn(batch, in_dim, generator=g) for i, n in enumerate(names)}, y))
    return out


def step_both(loss, expected, ours, theirs):
    """Equal losses, then equal gradients of every parameter, then one optimizer step on each side."""
    torch.testing.assert_close(loss, expected)
    for (_, opt), value in ((ours, loss), (theirs, expected)):
        opt.zero_grad()
        value.backward()
    for p, q in zip(ours[0].parameters(), theirs[0].parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    ours[1].step()
    theirs[1].step()


# ------------------------------------------------------------------ 1. the equations
@given(batch=st.integers(1, 6), m=st.integers(2, 4), seed=st.integers(0, 1000))
def test_orders_are_permutations_and_inputs_remove_one_more_modality_each(batch, m, seed):
    orders = removal_orders(batch, m, torch.Generator().manual_seed(seed))
    assert torch.equal(orders.sort(1).values, torch.arange(m).expand(batch, m))
    kept = kept_modalities(orders)
    assert len(kept) == m and kept[0].all()
    for k in range(1, m):
        assert (kept[k].sum(1) == m - k).all() and (kept[k] <= kept[k - 1]).all()  # nested, one fewer each time
        assert not kept[k][torch.arange(batch), orders[:, k - 1]].any()  # input k removes the k-th of the order


def official_rank(confidence_list, predict_list, target, epsilon=0.0):
    """``miwae/train.py``, stage 2, the rank loop (trick 1 and trick 2), verbatim in structure."""
    rank_loss = 0
    for num in range(len(confidence_list) - 1):
        sign = (~(predict_list[num] != target)).long()
        rank_loss += torch.nn.ReLU()(torch.sub(confidence_list[num + 1], confidence_list[num]) * sign - epsilon).sum()
        sign1 = (predict_list[num + 1] != target) & (predict_list[num] != target)
        conf1 = confidence_list[num + 1].clone()
        conf2 = confidence_list[num].clone().detach()
        rank_loss += torch.nn.ReLU()(torch.sub(conf1, conf2) * sign1 - epsilon).sum()
    return rank_loss


@pytest.mark.parametrize("epsilon", [0.0, 0.05])
def test_the_rank_is_the_official_rank_with_both_branches(epsilon):
    g = torch.Generator().manual_seed(1)
    logits = [torch.randn(40, 3, generator=g, requires_grad=True) for _ in range(3)]
    target = torch.randint(0, 3, (40,), generator=g)
    probs = [torch.softmax(z, 1) for z in logits]
    predict = [p.max(1)[1] for p in probs]
    right = predict[0] == target
    both_wrong = (predict[1] != target) & (predict[0] != target)
    assert right.any() and both_wrong.any() and (probs[1].max(1)[0] > probs[0].max(1)[0]).any()
    ours = confidence_rank(logits, target, epsilon).sum()
    theirs = official_rank([p.max(1)[0] for p in probs], predict, target, epsilon)
    torch.testing.assert_close(ours, theirs)
    grads = torch.autograd.grad(ours, logits)
    for mine, want in zip(grads, torch.autograd.grad(theirs, logits)):
        torch.testing.assert_close(mine, want)


def test_a_batch_sum_lets_rises_cancel_drops():
    """Two samples: one gains 0.2 of confidence when a modality is removed, the other loses 0.2."""
    full = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.7, 0.2, 0.1]]))
    reduced = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]]))
    target = torch.tensor([0, 0])
    assert batch_rank([full, reduced]).item() == pytest.approx(0.0, abs=1e-7)  # BalanceBenchmark: no penalty
    assert confidence_rank([full, reduced], target).sum().item() == pytest.approx(0.2)  # per sample: the rise


def test_input_means_are_sample_means():
    data = [{"a": torch.tensor([[1.0], [3.0]])}, {"a": torch.tensor([[8.0]])}]
    assert input_means(data)["a"].item() == pytest.approx(4.0)  # the official mean of batch means would be 5.0


# ------------------------------------------------------------------ 2. the official step (imputed inputs)
def official_masks(orders, feature_per_view):
    """``get_multi_mask`` with the per-sample orders given (``random.shuffle`` drew them there)."""
    n, p = orders.shape[0], sum(feature_per_view)
    mask = torch.ones(n, p)
    mask_list = [mask.clone().bool()]
    for num in range(len(feature_per_view) - 1):
        for i in range(n):
            view = int(orders[i, num])
            begin, end = sum(feature_per_view[:view]), sum(feature_per_view[: view + 1])
            mask[i, begin:end] = 0
        mask_list.append(mask.clone().bool())
    return mask_list


def official_step(net, data, target, data_mean, orders, feature_per_view, beta=10, epsilon=0.0):
    """Stage 2 of ``miwae/train.py`` without the MIWAE reconstruction: inputs imputed with the data mean, the
    classification loss averaged over the inputs, the rank loss, ``cls_loss + rank_loss·β/100``."""
    mask_list = official_masks(orders, feature_per_view)
    cls_loss, confidence_list, predict_list = 0, [], []
    for mask in mask_list:
        partial = data.clone()
        partial[~mask] = data_mean.expand(data.shape[0], -1)[~mask]
        logits = net(partial)
        cls_loss += nn.CrossEntropyLoss()(logits, target)
        probability = F.softmax(logits, dim=1)
        _, predict = torch.max(probability, 1)
        confidence_list.append(torch.max(probability, axis=1)[0])
        predict_list.append(predict)
    cls_loss /= len(mask_list)
    return cls_loss + official_rank(confidence_list, predict_list, target, epsilon) * beta / 100


@pytest.mark.parametrize("names", [NAMES, ("a", "b", "c")])
def test_imputed_inputs_match_the_official_step(names):
    torch.manual_seed(0)
    widths = {n: 5 for n in names}
    net = Flat(widths)
    twin = copy.deepcopy(net)
    data = batches(6, names)
    fill = input_means(x for x, _ in data)
    method = CML(names, removal="inputs", model=net, fill=fill, margin=0.01)
    opt, twin_opt = torch.optim.SGD(net.parameters(), lr=0.5), torch.optim.SGD(twin.parameters(), lr=0.5)
    flat_mean = torch.cat([fill[n] for n in names]).float()
    for inputs, y in data:
        loss = method.loss(logits=net(inputs), inputs=inputs, target=y)
        expected = official_step(twin, torch.cat([inputs[n] for n in names], 1), y, flat_mean, method.orders, [5] * len(names), epsilon=0.01)
        step_both(loss, expected, (net, opt), (twin, twin_opt))
    assert len({tuple(row.tolist()) for row in method.orders}) > 1  # per-sample orders


# ------------------------------------------------------------------ 3. BalanceBenchmark's step (zeroed features)
def balancebenchmark_step(model, inputs, label, random_dict, lam=0.1):
    """``CMLTrainer.training_step``: out_p = out_s − u_m + b/M, modalities popped from the epoch's shuffled list,
    ``conf_loss`` = max(0, Σ(conf_p − conf_s)), loss = (CE(out) + Σ CE(out_p)) / M + λ·Σ conf_loss."""
    out_s, features = model(inputs)
    m = len(model.names)
    unimodal = model.head.unimodal_logits(features)
    random_dict = list(random_dict)
    loss, loss_c = 0, 0
    for i in range(m - 1):
        removed = random_dict.pop()
        out_p = out_s - unimodal[removed] + model.head.linear.bias / m
        conf_s, _ = torch.max(torch.softmax(out_s, 1), dim=1)
        conf_p, _ = torch.max(torch.softmax(out_p, 1), dim=1)
        if i == 0:
            loss = F.cross_entropy(out_s, label)
        loss = loss + F.cross_entropy(out_p, label)
        loss_c = loss_c + max(0, torch.sub(conf_p, conf_s).sum())
        out_s = out_p
    return loss / m + lam * loss_c


@pytest.mark.parametrize("names", [NAMES, ("a", "b", "c")])
def test_zeroed_features_match_balancebenchmark_with_its_order_and_hinge(names):
    torch.manual_seed(0)
    model = Net(names)
    twin = copy.deepcopy(model)
    method = CML(names, order="epoch", rank="batch")
    opt, twin_opt = torch.optim.SGD(model.parameters(), lr=0.5), torch.optim.SGD(twin.parameters(), lr=0.5)
    for epoch in range(3):
        method.start_epoch(epoch)
        for inputs, y in batches(4, names, seed=epoch):
            logits, features = model(inputs)
            loss = method.loss(logits=logits, features=features, head=model.head, target=y)
            order = [names[int(k)] for k in method.orders[0]]
            assert (method.orders == method.orders[0]).all()  # one order for every sample
            expected = balancebenchmark_step(twin, inputs, y, random_dict=order[::-1])  # pop() takes from the end
            step_both(loss, expected, (model, opt), (twin, twin_opt))


def test_the_port_hinge_and_the_official_hinge_differ_on_a_trained_model():
    """The difference the docs quote: the rank term and its gradient under both hinges, same inputs."""
    torch.manual_seed(0)
    model = Net()
    inputs, y = batches(1, batch=64, seed=3)[0]
    values = {}
    for rank in ("sample", "batch"):
        method = CML(NAMES, rank=rank, rank_weight=1.0, task="full")
        logits, features = model(inputs)
        loss = method.loss(logits=logits, features=features, head=model.head, target=y) - F.cross_entropy(logits, y)
        values[rank] = (loss.item(), torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))]))
    assert values["sample"][0] > values["batch"][0]
    relative = (values["sample"][1] - values["batch"][1]).norm() / values["sample"][1].norm()
    assert relative > 0.1


def test_orders_are_reproducible_and_differ_between_steps_and_epochs():
    model = Net()
    inputs, y = batches(1)[0]
    logits, features = model(inputs)
    orders = []
    for _ in range(2):
        method = CML(NAMES, seed=4)
        for _ in range(2):
            method.loss(logits=logits, features=features, head=model.head, target=y)
            orders.append(method.orders.clone())
    assert torch.equal(orders[0], orders[2]) and torch.equal(orders[1], orders[3]) and not torch.equal(orders[0], orders[1])
    epochs = CML(("a", "b", "c", "d"), order="epoch")
    seen = set()
    net = Net(("a", "b", "c", "d"))
    inputs, y = batches(1, ("a", "b", "c", "d"))[0]
    logits, features = net(inputs)
    for epoch in range(6):
        epochs.start_epoch(epoch)
        epochs.loss(logits=logits, features=features, head=net.head, target=y)
        seen.add(tuple(epochs.orders[0].tolist()))
    assert len(seen) > 1


# ------------------------------------------------------------------ 4. behaviour, errors, state
def test_ignored_samples_count_nowhere_and_task_full_keeps_the_full_cross_entropy():
    torch.manual_seed(0)
    model = Net()
    inputs, y = batches(1)[0]
    logits, features = model(inputs)
    ignored = y.clone()
    ignored[:4] = -100
    method = CML(NAMES, task="full", rank_weight=0.0)
    loss = method.loss(logits=logits, features=features, head=model.head, target=ignored)
    torch.testing.assert_close(loss, F.cross_entropy(logits[4:], y[4:]))
    assert method.orders.shape == (8, 2)


def test_history_records_the_rise_per_removed_modality():
    torch.manual_seed(0)
    model = Net()
    inputs, y = batches(1, batch=30)[0]
    logits, features = model(inputs)
    method = CML(NAMES)
    method.loss(logits=logits, features=features, head=model.head, target=y)
    first = method.orders[:, 0]
    confidence = torch.softmax(logits, 1).max(1).values
    for index, name in enumerate(NAMES):
        rows = first == index
        zeroed = {n: f * (0 if n == name else 1) for n, f in features.items()}
        rise = torch.softmax(model.head(zeroed), 1).max(1).values - confidence
        assert method.last["rise"][name] == pytest.approx(rise[rows].mean().item(), rel=1e-5)
    assert method.last_rank >= 0 and set(method.scalars()) >= {"rise/audio", "violations/visual"}


def test_bad_arguments_and_inputs_fail_by_name():
    with pytest.raises(ValueError, match="removal must be one of"):
        CML(NAMES, removal="dropout")
    with pytest.raises(TypeError, match="needs model="):
        CML(NAMES, removal="inputs")
    with pytest.raises(ValueError, match=r"missing \['visual'\]"):
        CML(NAMES, removal="inputs", model=lambda x: x, fill={"audio": torch.zeros(5)})
    with pytest.raises(ValueError, match="model= and fill= are for removal='inputs'"):
        CML(NAMES, model=lambda x: x)
    model = Net()
    inputs, y = batches(1)[0]
    logits, features = model(inputs)
    method = CML(NAMES)
    with pytest.raises(TypeError, match="needs features"):
        method.loss(logits=logits, target=y)
    with pytest.raises(ValueError, match="logits of modality 'fused' contain NaN"):
        method.loss(logits=torch.full_like(logits, float("nan")), features=features, head=model.head, target=y)
    with pytest.raises(ValueError, match="features of modalities \\['visual'\\] contain NaN"):
        method.loss(logits=logits, features={**features, "visual": features["visual"] * float("nan")}, head=model.head, target=y)
    with pytest.raises(ValueError, match="must return logits"):
        method.loss(logits=logits, features=features, head=lambda f: logits[:, :2], target=y)
    with pytest.raises(ValueError, match="empty batch"):
        method.loss(logits=logits[:0], features=features, head=model.head, target=y[:0])
    with pytest.raises(ValueError, match="every target equals ignore_index"):
        method.loss(logits=logits, features=features, head=model.head, target=torch.full_like(y, -100))
    epoch_order = CML(NAMES, order="epoch")
    with pytest.warns(RuntimeWarning, match="without start_epoch"):
        epoch_order.loss(logits=logits, features=features, head=model.head, target=y)


def run(model, method, opt, data, start, stop):
    for epoch in range(start, stop):
        method.start_epoch(epoch)
        for inputs, y in data:
            logits, features = model(inputs)
            opt.zero_grad()
            method.loss(logits=logits, features=features, head=model.head, target=y).backward()
            opt.step()


@pytest.mark.parametrize("order", ["sample", "epoch"])
def test_resume_follows_the_same_trajectory_bit_for_bit(order, tmp_path):
    data = batches(4, ("a", "b", "c"))
    torch.manual_seed(0)
    model = Net(("a", "b", "c"))
    method = CML(("a", "b", "c"), order=order, seed=7)
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    run(model, method, opt, data, 0, 2)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "method": method.state_dict()}, tmp_path / "ck.pt")
    run(model, method, opt, data, 2, 4)
    resumed = Net(("a", "b", "c"))
    resumed_method = CML(("a", "b", "c"), order=order, seed=7)
    resumed_opt = torch.optim.SGD(resumed.parameters(), lr=0.3, momentum=0.9)
    saved = torch.load(tmp_path / "ck.pt")
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    resumed_method.load_state_dict(saved["method"])
    run(resumed, resumed_method, resumed_opt, data, 2, 4)
    assert str(resumed_method.history) == str(method.history)  # NaN where a modality was never removed
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    method.reset()
    assert method.history == [] and method.orders is None
    with pytest.raises(ValueError, match="newer"):
        CML(("a", "b", "c"), order=order, seed=7).load_state_dict({**saved["method"], "version": 99})
    with pytest.raises(ValueError, match="CML state_dict has seed=7, this CML has seed=0"):
        CML(("a", "b", "c"), order=order).load_state_dict(saved["method"])


def test_repr_and_registry_entry():
    assert "removal='features'" in repr(CML(NAMES))
    info = cml.METHODS[0]
    assert info.key == "cml" and info.preset is CML and info.kind == "loss"
    assert CML(NAMES, removal="inputs", model=lambda x: x, fill={n: torch.zeros(1) for n in NAMES}).loss_inputs == ("logits", "inputs", "target")
