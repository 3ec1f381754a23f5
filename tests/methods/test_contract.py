"""The contract every method keeps, run over every case of the database (tests/methods/cases.py).

Per method: a case exists; exact resume mid-run (bit for bit, model, optimizer and method restored); a newer
state version and another method's names are refused by name; ``reset()`` gives a fresh method's state; k
accumulated micro-batches equal one batch of k·b (or the case says why not); a step ``GradScaler`` skips changes
nothing; bad inputs are refused by name (for every loss and forward method: a missing modality, NaN values, an
empty batch); a method that acts in the optimizer step and was never attached says so;
its ``history``/``last``/``scalars()``/``repr`` are consistent. Method-specific behaviour is in each method's own
test file.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import gradmod
from cases import CASES, Net, batches, case, fresh, provide, run_step, same_state, train

KEYS = list(gradmod.METHODS)
#: The kinds whose methods have a ``state_dict`` of their own (a head's state is the model's).
STATEFUL = [key for key in KEYS if gradmod.METHODS[key].kind != "head"]


def test_every_method_has_a_case_and_every_case_a_method():
    assert set(CASES) <= set(gradmod.METHODS)
    for key in KEYS:
        assert case(key).key == key


@pytest.mark.parametrize("key", STATEFUL)
def test_resume_mid_run_is_exact(key):
    """Stopped after the first of two epochs and resumed from the states: the same run as one that never stopped."""
    data = batches(2)
    straight_net, straight, _ = train(key, data, epochs=2)
    net, method, optimizer, _ = fresh(key)
    train(key, data, net, method, optimizer)
    saved = copy.deepcopy({"net": net.state_dict(), "optimizer": optimizer.state_dict(), "method": method.state_dict(),
                           "rng": torch.get_rng_state()})
    resumed_net, resumed, resumed_optimizer, _ = fresh(key, seed=1)  # another initialisation: the state overrides it
    resumed_net.load_state_dict(saved["net"])
    resumed_optimizer.load_state_dict(saved["optimizer"])
    resumed.load_state_dict(saved["method"])
    torch.set_rng_state(saved["rng"])
    train(key, data, resumed_net, resumed, resumed_optimizer, first_epoch=1)
    for a, b in zip(straight_net.parameters(), resumed_net.parameters()):
        assert torch.equal(a, b), key
    same_state(resumed.history, straight.history, key)


@pytest.mark.parametrize("key", STATEFUL)
def test_a_newer_state_and_other_modalities_are_refused_by_name(key):
    _, method, _, _ = fresh(key)
    state = method.state_dict()
    assert state["version"] == type(method).state_version
    with pytest.raises(ValueError, match="newer"):
        method.load_state_dict({**state, "version": state["version"] + 1})
    with pytest.raises(ValueError, match=r"is for modalities \['audio', 'text'\]"):
        method.load_state_dict({**state, "names": ["audio", "text"]})
    method.load_state_dict(state)  # its own state loads


@pytest.mark.parametrize("key", STATEFUL)
def test_reset_gives_back_a_fresh_methods_state(key):
    net, method, optimizer, _ = fresh(key)
    fresh_state = copy.deepcopy(method.state_dict())
    train(key, batches(2), net, method, optimizer)
    method.reset()
    assert method.history == [] and method.last is None and method.scalars() == {}
    same_state(method.state_dict(), fresh_state, key)


@pytest.mark.parametrize("key", STATEFUL)
def test_accumulated_micro_batches_equal_one_batch_or_the_method_says_why_not(key):
    the_case = case(key)
    if the_case.accumulates is not True:
        assert isinstance(the_case.accumulates, str) and the_case.accumulates
        return
    (inputs, target), = batches(1, batch=8)
    halves = [({n: x[i : i + 4] for n, x in inputs.items()}, target[i : i + 4]) for i in (0, 4)]
    whole_net, whole, whole_optimizer, _ = fresh(key)
    whole_optimizer.param_groups[0]["momentum"] = 0.0
    whole.start_epoch(0)
    run_step(whole_net, whole, whole_optimizer, (inputs, target), the_case)
    net, method, optimizer, _ = fresh(key)
    optimizer.param_groups[0]["momentum"] = 0.0
    method.start_epoch(0)
    optimizer.zero_grad(set_to_none=True)
    for half in halves:
        loss = the_case.step(net, method, half, 1 / len(halves))
        if loss is not None:
            loss.backward()
    optimizer.step()
    for a, b in zip(whole_net.parameters(), net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("key", [k for k in STATEFUL if case(k).attaches])
def test_a_step_the_scaler_skips_changes_nothing_and_drops_the_step(key):
    """``skip_step()`` is what the attach hook and the trainer callbacks call for a step GradScaler skips."""
    data = batches(3)
    plain_net, plain, plain_optimizer, the_case = fresh(key)
    train(key, [data[0], data[2]], plain_net, plain, plain_optimizer)
    net, method, optimizer, _ = fresh(key)
    method.start_epoch(0)
    run_step(net, method, optimizer, data[0], the_case)
    counted = _count(method)
    optimizer.zero_grad(set_to_none=True)
    method.detach()
    if the_case.key == "mla":
        method.observe("audio", net.encode(data[1][0])["audio"])
    else:
        loss = the_case.step(net, method, data[1])
        if loss is not None:
            loss.backward()
    method.skip_step()
    assert _count(method) == counted
    method.attach(optimizer)
    run_step(net, method, optimizer, data[2], the_case)
    for a, b in zip(plain_net.parameters(), net.parameters()):
        assert torch.equal(a, b), key


def _count(method):
    return method.step_count


@pytest.mark.parametrize("key", [k for k in STATEFUL if case(k).bad])
def test_bad_inputs_are_refused_by_a_message_that_names_the_problem(key):
    net, method, _, the_case = fresh(key)
    for call, error, fragment in the_case.bad:
        with pytest.raises(error) as raised:
            call(net, method)
        assert fragment in str(raised.value), (key, str(raised.value))


LOSS_OR_FORWARD = [k for k in STATEFUL if gradmod.METHODS[k].kind in ("loss", "forward")]


def _corrupted(given: dict, mistake: str) -> tuple[dict, bool]:
    """The step inputs with one mistake: a modality ``missing`` from every per-modality mapping, the first
    modality's tensors ``nan``, or an ``empty`` batch; and whether the mistake could be made in them."""
    def change(value):
        if mistake == "missing":
            return {k: v for k, v in value.items() if k != "visual"}, True
        if mistake == "nan" and value["audio"].is_floating_point():
            return {**value, "audio": torch.full_like(value["audio"], math.nan)}, True
        if mistake == "empty" and value["audio"].dim() > 0:
            return {k: v[:0] for k, v in value.items()}, True
        return value, False

    made = False
    out = {}
    for name, value in given.items():
        if isinstance(value, dict) and {"audio", "visual"} <= set(value) and all(isinstance(v, torch.Tensor) for v in value.values()):
            value, changed = change(value)
            made |= changed
        elif mistake == "empty" and isinstance(value, torch.Tensor) and value.dim() > 0:
            value = value[:0]
        out[name] = value
    return out, made


@pytest.mark.parametrize("mistake, fragment", [("missing", "missing ['visual']"), ("nan", "NaN"), ("empty", "empty")])
@pytest.mark.parametrize("key", LOSS_OR_FORWARD)
def test_a_missing_modality_nan_values_or_an_empty_batch_are_refused_by_name(key, mistake, fragment):
    """What a loss or forward method reads (`cases.provide`), with one mistake: an error that names it."""
    net, method, _, _ = fresh(key)
    method.start_epoch(0)
    kind = gradmod.METHODS[key].kind
    inputs, target = batches(1)[0]
    given, made = _corrupted(provide(net, method.loss_inputs if kind == "loss" else method.forward_inputs, inputs, target), mistake)
    if not made:
        pytest.skip(f"{key} reads nothing this mistake can be made in (G-Blending: 0-d losses, no batch)")
    call = method.loss if kind == "loss" else method
    with pytest.raises(ValueError) as raised:
        call(**given)
    assert fragment in str(raised.value), (key, str(raised.value))


@pytest.mark.parametrize("key", [k for k in STATEFUL if case(k).attaches and k != "mla"])
def test_a_method_that_acts_in_the_optimizer_step_but_was_never_attached_says_so(key):
    """Forgetting attach() must not train the plain baseline silently: at the latest on the second step."""
    torch.manual_seed(0)
    net = Net()
    the_case = case(key)
    method = the_case.build(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    with pytest.warns(RuntimeWarning, match="attach"):
        for batch in batches(3):
            optimizer.zero_grad(set_to_none=True)
            loss = the_case.step(net, method, batch)
            if loss is not None:
                loss.backward()
            optimizer.step()


def test_mla_never_attached_says_so_by_the_second_turn():
    torch.manual_seed(0)
    net = Net()
    method = case("mla").build(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    inputs, target = batches(1)[0]
    with pytest.raises(RuntimeError, match="not attached"):
        for name in net.names:
            optimizer.zero_grad(set_to_none=True)
            features = net.encode(inputs)[name]
            method.observe(name, features)
            torch.nn.functional.cross_entropy(net.shared(features), target).backward()
            optimizer.step()


@pytest.mark.parametrize("key", STATEFUL)
def test_history_last_scalars_and_repr_agree(key):
    _, method, _ = train(key, batches(2), *(fresh(key)[:3]), epochs=2)
    history = method.history
    assert history, key
    same_state(method.last, history[-1], key)
    for record in history:
        assert {"step", "status"} <= set(record) and record["status"] in gradmod.history.STATUSES
    values = method.scalars()
    assert values["active"] in (0.0, 1.0)
    assert all(isinstance(v, float) and math.isfinite(v) for v in values.values())
    assert type(method).__name__ in repr(method)


@pytest.mark.parametrize("key", [k for k in KEYS if k not in STATEFUL])
def test_a_head_is_a_fusion_head_whose_per_modality_logits_add_up_to_its_output(key):
    torch.manual_seed(0)
    net = Net()
    head = case(key).build(net)
    assert isinstance(head, gradmod.fusion.Fusion) and head.decouplable
    features = net.encode(batches(1)[0][0])
    torch.testing.assert_close(sum(head.unimodal_logits(features).values()), head(features))


@pytest.mark.parametrize("key", STATEFUL)
def test_each_registry_entry_names_its_kind_and_a_strength_the_preset_takes(key):
    info = gradmod.METHODS[key]
    _, method, _, _ = fresh(key)
    assert method.kind == info.kind and isinstance(method, info.preset)
    if info.strength is not None:
        import inspect

        assert info.strength.keyword in inspect.signature(info.preset).parameters, key
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gradmod.methods.key_of(method) == key
