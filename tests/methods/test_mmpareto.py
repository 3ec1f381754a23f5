"""MMPareto (Wei & Hu, ICML 2024): the two-task min-norm rule, the paper's and the official magnitude rules, the
drop-in backward, and a cross-check against a transcription of the official training step."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import assume, example, given
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

import gradmod
from gradmod.methods import mmpareto

NAMES = ("audio", "visual")
#: These unit tests call backward() without an optimizer to read the gradients; the contract tests check the warning
#: an unattached MMPareto gives in a training loop.
pytestmark = pytest.mark.filterwarnings("ignore:gradmod MMPareto. the gradients MMPareto wrote:RuntimeWarning")


class Net(nn.Module):
    """An encoder per modality, a concat head and one unimodal head per modality."""

    def __init__(self, names=NAMES, in_dim=5, dim=6, classes=4):
        super().__init__()
        self.names = tuple(names)
        self.encoders = nn.ModuleDict({n: nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(), nn.Linear(dim, dim)) for n in self.names})
        self.head = nn.Linear(dim * len(self.names), classes)
        self.unimodal = nn.ModuleDict({n: nn.Linear(dim, classes) for n in self.names})

    def forward(self, inputs):
        features = {n: self.encoders[n](inputs[n]) for n in self.names}
        return self.head(torch.cat([features[n] for n in self.names], 1)), {n: self.unimodal[n](f) for n, f in features.items()}


def batches(steps, names=NAMES, batch=12, in_dim=5, classes=4, seed=0):
    """Batches and, per batch, unimodal targets: the labels, or (every other batch) shuffled labels, whose
    unimodal gradients conflict with the multimodal one."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        y = torch.randint(0, classes, (batch,), generator=g)
        inputs = {n: F.one_hot(y, in_dim).float() * (2.0 if i == 0 else 0.5) + torch.randn(batch, in_dim, generator=g) for i, n in enumerate(names)}
        y_uni = y if step % 2 == 0 else y[torch.randperm(batch, generator=g)]
        out.append((inputs, y, y_uni))
    return out


def losses(model, inputs, y, y_uni):
    fused, unimodal = model(inputs)
    return F.cross_entropy(fused, y), {n: F.cross_entropy(z, y_uni) for n, z in unimodal.items()}


def make(model, **options):
    return gradmod.MMPareto({n: model.encoders[n] for n in model.names}, **options)


# ------------------------------------------------------------------ the official step, transcribed
def official_backward(model, loss_mm, unimodal, gamma=1.5):
    """The official training step's gradient, transcribed from its description: one backward per loss (grads
    cleared in between), cosine over each encoder's concatenated gradient, (½, ½) when positive, else the two-task
    min-norm weight (0.999 / 0.001 at the ends), then per parameter tensor new = 2(w_m g + w_u u),
    d = ‖grad of the summed loss‖ / ‖new‖, grad = γ·d·new if d > 1 else γ·new; heads keep the summed loss's."""
    params = dict(model.named_parameters())
    per_loss = {}
    for key, loss in [("both", loss_mm), *unimodal.items()]:
        model.zero_grad()
        loss.backward(retain_graph=True)
        per_loss[key] = {name: p.grad.clone() for name, p in params.items() if p.grad is not None}
    model.zero_grad()
    (loss_mm + sum(unimodal.values())).backward()
    weights = {}
    for modality in unimodal:
        names = [name for name in params if name.startswith(f"encoders.{modality}.")]
        g = torch.cat([per_loss["both"][name].flatten() for name in names])
        u = torch.cat([per_loss[modality][name].flatten() for name in names])
        if F.cosine_similarity(g, u, dim=0) > 0:
            w = 0.5
        else:
            v11, v12, v22 = (g * g).sum().item(), (g * u).sum().item(), (u * u).sum().item()
            w = 0.999 if v12 >= v11 else 0.001 if v12 >= v22 else -(v12 - v22) / (v11 + v22 - 2 * v12)
        weights[modality] = w
        for name in names:
            new = 2 * w * per_loss["both"][name] + 2 * (1 - w) * per_loss[modality][name]
            diff = torch.norm(params[name].grad) / torch.norm(new)
            params[name].grad = diff * new * gamma if diff > 1 else new * gamma
    return weights


def test_matches_the_official_step_on_identical_inputs():
    torch.manual_seed(0)
    model = Net()
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    mod = make(model, rule="official")
    expected = []
    for inputs, y, y_uni in batches(6):
        opt.zero_grad()
        mod.backward(*losses(model, inputs, y, y_uni))
        expected.append(official_backward(twin, *losses(twin, inputs, y, y_uni)))
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
        opt.step()
        twin_opt.step()
    cosines = [record["cosine"][n] for record in mod.history for n in NAMES]
    assert min(cosines) < 0 < max(cosines), "both branches (agreement and conflict) must have run"
    for record, want in zip(mod.history, expected):
        for n in NAMES:
            assert record["unimodal_weight"][n] == pytest.approx(1 - want[n], rel=1e-5)


# ------------------------------------------------------------------ the rule
vectors = st.integers(1, 6).flatmap(
    lambda d: st.tuples(st.lists(st.floats(-3, 3), min_size=d, max_size=d), st.lists(st.floats(-3, 3), min_size=d, max_size=d))
)


@given(vectors)
def test_the_min_norm_weight_is_optimal_on_small_examples(pair):
    g, u = (torch.tensor(v, dtype=torch.float64) for v in pair)
    w = mmpareto.min_norm_weight(g @ g, g @ u, u @ u)
    assert 0.0 <= w.item() <= 1.0
    grid = torch.linspace(0, 1, 2001, dtype=torch.float64)
    best = torch.linalg.vector_norm(grid[:, None] * g + (1 - grid[:, None]) * u, dim=1).min()
    assert torch.linalg.vector_norm(w * g + (1 - w) * u) <= best + 1e-9


@given(vectors, st.sampled_from(mmpareto.RULES), st.floats(0.01, 100.0))
@example(pair=([2.7581734853218215e-15, -0.125], [0.0, 1.0]), rule="paper", factor=1.0)  # g nearly cancels a part of u
@example(pair=([2.7581734853218215e-15, -0.125], [0.0, 1.0]), rule="paper", factor=2.17)
@example(pair=([2.0, 6.14196541913704e-10], [-1.0, 0.0]), rule="official", factor=3.0)  # |h| = 4e-10: rounding × 2.5e9
def test_the_combination_is_symmetric_positively_homogeneous_and_a_common_descent_direction(pair, rule, factor):
    g, u = ([torch.tensor(v, dtype=torch.float64)] for v in pair)
    combined, stats = mmpareto.combine_gradients(g, u, rule)
    swapped, swapped_stats = mmpareto.combine_gradients(u, g, rule)
    scaled, _ = mmpareto.combine_gradients([factor * g[0]], [factor * u[0]], rule)
    h = 2 * (1 - stats["unimodal_weight"]) * g[0] + 2 * stats["unimodal_weight"] * u[0]
    # rescaling h to |g + u| amplifies its rounding errors by (|g| + |u|) / |h|
    amplified = ((g[0].norm() + u[0].norm()) * (g[0] + u[0]).norm() / h.norm().clamp_min(1e-300)).item()
    torch.testing.assert_close(scaled[0], factor * combined[0], rtol=1e-9, atol=1e-9 + 1e-13 * factor * amplified)
    if rule == "paper":  # the official solver's 0.999 / 0.001 ends are not symmetric
        torch.testing.assert_close(swapped[0], combined[0], rtol=1e-9, atol=1e-13 * amplified + 1e-12)
        assert swapped_stats["unimodal_weight"].item() == pytest.approx(1 - stats["unimodal_weight"].item(), abs=1e-12)
        # the min-norm element d of the convex hull has <d, g_i> >= |d|^2 for both gradients
        assert (combined[0] @ g[0]).item() >= -1e-9 and (combined[0] @ u[0]).item() >= -1e-9
    if (g[0] @ u[0]).item() > 0:  # no conflict: the plain sum, times gamma
        torch.testing.assert_close(combined[0], (1.0 if rule == "paper" else 1.5) * (g[0] + u[0]), rtol=1e-9, atol=1e-9)


@given(
    st.integers(2, 6).flatmap(lambda d: st.tuples(*(st.lists(st.floats(-3, 3), min_size=d, max_size=d) for _ in range(2)))),
    st.floats(0.05, 20.0),
    st.floats(1e-12, 1e-6),
)
def test_nearly_cancelling_gradients_still_give_a_common_descent_direction(vectors_gv, ratio, tilt):
    """u = −ratio·g + tilt·v: the min-norm point is tiny next to g and u, and rescaling it to |g + u| must not
    carry the rounding error of w·g + (1 − w)·u out of the common descent cone."""
    g, v = (torch.tensor(x, dtype=torch.float64) for x in vectors_gv)
    assume(g.norm() > 1e-3 and v.norm() > 1e-3)
    u = -ratio * g + tilt * v
    combined, _ = mmpareto.combine_gradients([g], [u], "paper")
    d = combined[0]
    assert torch.isfinite(d).all()
    bound = 1e-9 * d.norm().item()
    assert (d @ g).item() >= -bound * g.norm().item() and (d @ u).item() >= -bound * u.norm().item()


def test_the_paper_rule_rescales_the_whole_encoder_and_the_official_rule_each_tensor_upwards():
    """Where the two rules differ: the norm of each tensor's share changes under the Pareto weights."""
    g = [torch.tensor([3.0, 0.0], dtype=torch.float64), torch.tensor([0.0, -0.2], dtype=torch.float64)]
    u = [torch.tensor([-1.0, 0.5], dtype=torch.float64), torch.tensor([2.0, 1.0], dtype=torch.float64)]
    paper, stats = mmpareto.combine_gradients(g, u, "paper", gamma=1.0)
    official, _ = mmpareto.combine_gradients(g, u, "official", gamma=1.0)
    flat = lambda ts: torch.cat(ts)
    v11, v12, v22 = flat(g) @ flat(g), flat(g) @ flat(u), flat(u) @ flat(u)
    assert v12 < 0
    w = mmpareto.min_norm_weight(v11, v12, v22)
    h = [2 * (w * a + (1 - w) * b) for a, b in zip(g, u)]
    plain = torch.linalg.vector_norm(flat(g) + flat(u))
    torch.testing.assert_close(flat(paper), plain / torch.linalg.vector_norm(flat(h)) * flat(h))
    assert stats["scale"].item() == pytest.approx(1.0)
    w_official = mmpareto.official_min_norm_weight(v11, v12, v22)
    for t, (a, b) in enumerate(zip(g, u)):
        h_t = 2 * (w_official * a + (1 - w_official) * b)
        d = torch.linalg.vector_norm(a + b) / torch.linalg.vector_norm(h_t)
        torch.testing.assert_close(official[t], (d if d > 1 else 1.0) * h_t)
    ups = [torch.linalg.vector_norm(a + b) > torch.linalg.vector_norm(2 * (w * a + (1 - w) * b)) for a, b in zip(g, u)]
    assert ups == [True, False]  # the second tensor is not rescaled down by the official rule
    difference = torch.linalg.vector_norm(flat(paper) - flat(official)) / torch.linalg.vector_norm(flat(paper))
    assert difference > 0.05


def test_zero_and_opposite_gradients_give_finite_results():
    zero, u = [torch.zeros(3)], [torch.tensor([1.0, -2.0, 0.5])]
    for rule in mmpareto.RULES:
        combined, _ = mmpareto.combine_gradients(zero, u, rule, gamma=1.0)
        torch.testing.assert_close(combined[0], u[0])  # a zero gradient conflicts with nothing
        opposite, _ = mmpareto.combine_gradients([-u[0]], u, rule, gamma=1.0)
        assert torch.isfinite(opposite[0]).all()
    stationary, _ = mmpareto.combine_gradients([-u[0]], u, "paper")
    assert torch.equal(stationary[0], torch.zeros(3))  # Pareto-stationary: no common descent direction
    assert mmpareto.official_min_norm_weight(0.0, 0.0, 1.0).item() == pytest.approx(0.999)  # the official solver's ends
    assert mmpareto.official_min_norm_weight(1.0, 0.0, 0.0).item() == pytest.approx(0.001)
    assert mmpareto.official_min_norm_weight(1.0, -1.0, 3.0).item() == pytest.approx(4 / 6)


# ------------------------------------------------------------------ the drop-in
def test_heads_get_the_plain_gradient_and_each_encoder_its_own_combination():
    torch.manual_seed(0)
    names = ("vision", "audio", "text")
    model = Net(names)
    mod = make(model)
    inputs, y, y_uni = batches(2, names=names)[1]
    loss_mm, unimodal = losses(model, inputs, y, y_uni)
    per_loss = {}
    for key, loss in [("mm", loss_mm), *unimodal.items()]:
        per_loss[key] = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True, allow_unused=True)
    mod.backward(loss_mm, unimodal)
    params = list(model.parameters())
    index = {id(p): i for i, p in enumerate(params)}
    for name in names:
        enc = [index[id(p)] for p in model.encoders[name].parameters()]
        want, _ = mmpareto.combine_gradients([per_loss["mm"][i] for i in enc], [per_loss[name][i] for i in enc])
        for i, w in zip(enc, want):
            torch.testing.assert_close(params[i].grad, w)
    for p in [*model.head.parameters(), *model.unimodal.parameters()]:
        i = index[id(p)]
        plain = sum(grads[i] for grads in per_loss.values() if grads[i] is not None)
        torch.testing.assert_close(p.grad, plain)
    assert set(mod.last) == {"step", "status", "cosine", "unimodal_weight", "scale"} and mod.last["step"] == 0


def _micro_batch_setup(rule):
    """A model, its copy for the whole batch, one batch and an MMPareto on the model, gradients zeroed."""
    torch.manual_seed(0)
    model = Net()
    whole = copy.deepcopy(model)
    inputs, y, y_uni = batches(2)[1]
    mod = make(model, rule=rule)
    model.zero_grad()
    return model, whole, inputs, y, y_uni, mod


@pytest.mark.parametrize("rule", mmpareto.RULES)
def test_accumulated_micro_batches_equal_one_batch(rule):
    model, whole, inputs, y, y_uni, mod = _micro_batch_setup(rule)
    for part in (slice(0, 6), slice(6, 12)):
        loss_mm, unimodal = losses(model, {n: x[part] for n, x in inputs.items()}, y[part], y_uni[part])
        mod.backward(loss_mm / 2, {n: loss / 2 for n, loss in unimodal.items()})
    make(whole, rule=rule).backward(*losses(whole, inputs, y, y_uni))
    for (name, p), q in zip(model.named_parameters(), whole.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert mod.step_count == 1 and len(mod.history) == 1
    model.zero_grad(set_to_none=False)  # gradients zeroed in place: a new step
    mod.backward(*losses(model, inputs, y, y_uni))
    assert mod.step_count == 2 and [r["step"] for r in mod.history] == [0, 1]


@pytest.mark.parametrize("rule", mmpareto.RULES)
def test_observed_micro_batches_take_the_scale_of_the_trainers_accumulated_backward(rule):
    """A trainer backwards (L_mm + Σ L_m) / k per micro-batch after ``observe``: the combination written at the
    step is that of the whole batch, as with ``backward``, whatever k the trainer divided by."""
    model, whole, inputs, y, y_uni, mod = _micro_batch_setup(rule)
    for part in (slice(0, 6), slice(6, 12)):
        loss_mm, unimodal = losses(model, {n: x[part] for n, x in inputs.items()}, y[part], y_uni[part])
        mod.observe(loss_mm, unimodal)  # the losses as the model returns them
        ((loss_mm + sum(unimodal.values())) / 2).backward()  # the trainer's backward, divided by k = 2
    mod.step()
    make(whole, rule=rule).backward(*losses(whole, inputs, y, y_uni))
    for (name, p), q in zip(model.named_parameters(), whole.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert mod.step_count == 1


def test_a_trainer_loss_that_is_not_the_observed_sum_is_an_error():
    torch.manual_seed(0)
    model = Net()
    inputs, y, y_uni = batches(2)[1]
    mod = make(model)
    loss_mm, unimodal = losses(model, inputs, y, y_uni)
    mod.observe(loss_mm, unimodal)
    (loss_mm + 3 * sum(unimodal.values())).backward()  # not a multiple of L_mm + Σ L_m
    with pytest.raises(RuntimeError, match="not a multiple of the gradient"):
        mod.step()
    model.zero_grad(set_to_none=True)
    loss_mm, unimodal = losses(model, inputs, y, y_uni)
    mod.observe(loss_mm, unimodal)  # and no backward at all before the step
    with pytest.raises(RuntimeError, match="no backward pass reached the encoders"):
        mod.step()


def test_gradients_already_in_grad_are_kept_and_added_to():
    torch.manual_seed(0)
    model = Net()
    alone = copy.deepcopy(model)
    inputs, y, y_uni = batches(2)[1]
    make(alone).backward(*losses(alone, inputs, y, y_uni))
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)  # e.g. another loss's backward() before this one
    mod = make(model)
    for _ in range(2):  # and the second call of the step rewrites the combination, not the earlier gradient
        loss_mm, unimodal = losses(model, inputs, y, y_uni)
        mod.backward(loss_mm / 2, {n: loss / 2 for n, loss in unimodal.items()})
    for (name, p), q in zip(model.named_parameters(), alone.parameters()):
        torch.testing.assert_close(p.grad, q.grad + 0.25, rtol=1e-5, atol=1e-7, msg=name)


def test_grad_scaler_sees_the_combined_gradients_and_skips_inf_steps():
    torch.manual_seed(0)
    model = Net()
    plain = copy.deepcopy(model)
    data = batches(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    mod, plain_mod = make(model), make(plain)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6)
    for index, (inputs, y, y_uni) in enumerate(data):
        opt.zero_grad()
        loss_mm, unimodal = losses(model, inputs, y, y_uni)
        factor = float("inf") if index == 1 else 1.0
        mod.backward(scaler.scale(loss_mm * factor), {n: scaler.scale(loss) for n, loss in unimodal.items()})
        scaler.step(opt)
        scaler.update()
        if index != 1:
            plain_opt.zero_grad()
            plain_mod.backward(*losses(plain, inputs, y, y_uni))
            plain_opt.step()
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_bad_input_fails_by_name():
    torch.manual_seed(0)
    model = Net()
    mod = make(model)
    inputs, y, y_uni = batches(1)[0]
    loss_mm, unimodal = losses(model, inputs, y, y_uni)
    with pytest.raises(ValueError, match=r"unimodal_losses must name exactly the modalities.*missing \['visual'\]"):
        mod.backward(loss_mm, {"audio": unimodal["audio"]})
    swapped = {"audio": unimodal["visual"], "visual": unimodal["audio"]}
    with pytest.raises(ValueError, match="the unimodal loss of modality 'audio' reaches none of 'audio''s encoder parameters"):
        mod.backward(loss_mm, swapped)
    with pytest.raises(ValueError, match=r"unimodal_losses\['visual'\] must be a 0-d floating-point loss tensor, got \(12,\)"):
        mod.backward(loss_mm, {"audio": unimodal["audio"], "visual": F.cross_entropy(model(inputs)[1]["visual"], y, reduction="none")})
    with pytest.raises(ValueError, match="multimodal_loss does not require grad"):
        mod.backward(loss_mm.detach(), unimodal)
    with pytest.raises(ValueError, match="rule must be one of"):
        make(model, rule="pareto")
    with pytest.raises(ValueError, match="gamma must be a finite number > 0"):
        make(model, gamma=0.0)
    with pytest.raises(ValueError, match="two or more names"):
        gradmod.MMPareto({"audio": model.encoders["audio"]})
    model.encoders["visual"].requires_grad_(False)
    with pytest.raises(ValueError, match=r"the encoders of \['visual'\] have no parameter that requires grad"):
        mod.backward(loss_mm, unimodal)
    assert all(p.grad is None for p in model.parameters()), "failed calls must leave the gradients alone"


def test_resuming_from_a_state_dict_follows_the_same_trajectory(tmp_path):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mod = make(model, rule="official", history_size=10)
    data = batches(5)
    for step, (inputs, y, y_uni) in enumerate(data):
        if step == 3:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "mod": mod.state_dict()}, tmp_path / "ck.pt")
        opt.zero_grad()
        mod.backward(*losses(model, inputs, y, y_uni))
        opt.step()
    resumed = Net()
    resumed_opt = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
    resumed_mod = make(resumed, rule="official", history_size=10)
    saved = torch.load(tmp_path / "ck.pt")
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    resumed_mod.load_state_dict(saved["mod"])
    for inputs, y, y_uni in data[3:]:
        resumed_opt.zero_grad()
        resumed_mod.backward(*losses(resumed, inputs, y, y_uni))
        resumed_opt.step()
    assert resumed_mod.history == mod.history and resumed_mod.step_count == 5
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="rule='official', gamma=1.5; this MMPareto has rule='paper'"):
        make(resumed).load_state_dict(saved["mod"])


# ------------------------------------------------------------------ torch.distributed
def run(model, data, rank=None, world=1, wrapped=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mod = make(model)
    for inputs, y, y_uni in data:
        if rank is not None:  # this rank's half of the global batch
            part = slice(rank * (y.shape[0] // world), (rank + 1) * (y.shape[0] // world))
            inputs, y, y_uni = {n: x[part] for n, x in inputs.items()}, y[part], y_uni[part]
        opt.zero_grad()
        mod.backward(*losses(wrapped or model, inputs, y, y_uni))
        opt.step()
    return mod


def _ddp_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = Net()
    mod = run(model, batches(4, seed=2), rank, world, DistributedDataParallel(model))
    torch.save({"params": [p.detach() for p in model.parameters()], "history": mod.history}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()


@pytest.mark.distributed
def test_two_gloo_ranks_agree_with_each_other_and_with_the_global_batch(tmp_path):
    """The per-loss encoder gradients are averaged over the ranks (one all_reduce per backward()) before the
    nonlinear combination, so every replica writes the global batch's combination; DDP averages the heads'."""
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["history"] == r1["history"]
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)
    torch.manual_seed(0)
    model = Net()
    single = run(model, batches(4, seed=2))
    assert min(r["cosine"]["visual"] for r in single.history) < 0
    for a, b in zip(r0["params"], model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
    for got, want in zip(r0["history"], single.history):
        for n in NAMES:
            assert got["unimodal_weight"][n] == pytest.approx(want["unimodal_weight"][n], rel=1e-4, abs=1e-6)


def test_the_history_keeps_the_last_steps_and_the_registry_names_mmpareto():
    torch.manual_seed(0)
    model = Net()
    mod = make(model, history_size=2)
    for inputs, y, y_uni in batches(4):
        model.zero_grad()
        mod.backward(*losses(model, inputs, y, y_uni))
    assert [r["step"] for r in mod.history] == [2, 3] and mod.history_dropped == 2
    with pytest.raises(ValueError, match="history_size must be None"):
        make(model, history_size=0)
    info = gradmod.METHODS["mmpareto"]
    assert info.preset is gradmod.MMPareto and info.kind == "backward"
