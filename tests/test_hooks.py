"""The optimizer step hook and the backward-pass monitor that gradmod's methods share (`gradmod._hooks`,
`gradmod._backward`), on plain parameters: what they call, when, and what they refuse."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from gradmod._backward import BackwardMonitor
from gradmod._hooks import StepHook, StepHooked, unheld_modality, unwrapped_optimizer


class Wrapper:
    """Holds an optimizer in ``.optimizer``."""

    def __init__(self, optimizer: object) -> None:
        self.optimizer = optimizer


class Accelerated(torch.optim.Optimizer):
    """An ``Optimizer`` subclass holding another in ``.optimizer``, as Accelerate's ``AcceleratedOptimizer`` is."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:  # no Optimizer.__init__: no state of its own
        self.optimizer = optimizer


class Owner(StepHooked):
    def __init__(self) -> None:
        self.calls: list[str] = []
        self._hook = StepHook("owner", lambda: self.calls.append("step"), lambda found_inf: self.calls.append("skip"))

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self.calls.append(f"check {type(optimizer).__name__}")


def sgd(*params: nn.Parameter, fused: bool = False) -> torch.optim.SGD:
    """SGD over ``params`` (one parameter of its own when none); ``fused`` takes GradScaler's ``found_inf``."""
    return torch.optim.SGD(params or [nn.Parameter(torch.ones(2))], lr=0.1, fused=fused)


# ------------------------------------------------------------------------------------------- StepHook


def test_attach_unwraps_checks_once_and_hooks_the_inner_optimizer():
    owner, optimizer = Owner(), sgd()
    handle = owner.attach(Wrapper(Accelerated(Accelerated(optimizer))))
    assert owner.attached_to is optimizer and owner.calls == ["check SGD"]
    optimizer.step()
    assert owner.calls == ["check SGD", "step"]
    with pytest.raises(ValueError, match="already attached to this optimizer"):
        owner.attach(optimizer)
    assert owner.calls == ["check SGD", "step"]  # an optimizer already hooked is not checked again
    with pytest.raises(ValueError, match="already attached to another optimizer"):
        owner.attach(sgd())
    handle.remove()
    assert owner.attached_to is None
    owner.attach(optimizer)
    assert owner.calls[-1] == "check SGD"
    owner.detach()
    optimizer.step()
    assert owner.attached_to is None and owner.calls.count("step") == 1
    owner.detach()  # detaching twice does nothing


def test_attach_refuses_what_is_not_an_optimizer_by_type():
    with pytest.raises(TypeError, match=r"^attach\(\) needs a torch.optim.Optimizer \(or a wrapper holding one\), got Wrapper$"):
        unwrapped_optimizer(Wrapper(object()))
    with pytest.raises(TypeError, match="got Linear"):
        Owner().attach(nn.Linear(2, 2))


def test_a_step_skipped_by_the_scaler_goes_to_skip_and_a_step_it_takes_to_step():
    owner, optimizer = Owner(), sgd(fused=True)
    owner.attach(optimizer)
    optimizer.found_inf = torch.tensor(0.0)  # GradScaler's flag on a fused optimizer, read on the host by default
    optimizer.step()
    optimizer.found_inf = torch.tensor(1.0)
    optimizer.step()
    assert owner.calls[1:] == ["step", "skip"]
    on_device = []
    hook = StepHook("owner", lambda: on_device.append("step"), lambda found_inf: on_device.append(found_inf.item()), on_device=True)
    other = sgd(fused=True)
    hook.attach(other)
    other.found_inf = torch.tensor(0.0)
    other.step()
    assert on_device == [0.0]  # the owner decides on the device: every step with a flag goes to skip


def test_a_step_with_a_closure_is_refused_by_name():
    owner, optimizer = Owner(), sgd()
    owner.attach(optimizer)
    with pytest.raises(RuntimeError, match=r"SGD.step\(\) was given a closure.*owner's pre-step hook"):
        optimizer.step(lambda: None)


# ------------------------------------------------------------------------------------- unheld_modality


def test_unheld_modality_names_the_first_modality_whose_trainable_parameters_the_optimizer_lacks():
    audio, visual, frozen = nn.Parameter(torch.ones(1)), nn.Parameter(torch.ones(1)), nn.Parameter(torch.ones(1), requires_grad=False)
    groups = {"audio": [audio], "visual": [visual, frozen], "text": [frozen]}
    assert unheld_modality(Wrapper(sgd(audio)), groups) == "visual"
    assert unheld_modality(sgd(audio, visual), groups) is None  # "text" has nothing to train
    assert unheld_modality(sgd(visual), groups) == "audio"
    assert unheld_modality(sgd(audio, frozen), {"audio": [audio], "visual": [frozen, visual]}) == "visual"
    partly = torch.optim.SGD([{"params": [audio]}, {"params": [visual], "lr": 0.5}], lr=0.1)
    assert unheld_modality(partly, groups) is None  # any parameter group counts


# ------------------------------------------------------------------------------------ BackwardMonitor


def monitored(count: int = 2):
    params = [nn.Parameter(torch.ones(3)) for _ in range(count)]
    passes: list[tuple[frozenset[int], bool]] = []
    monitor = BackwardMonitor(lambda reached, discarded: passes.append((reached, discarded)))
    monitor.watch([[p] for p in params])
    return monitor, params, passes


def test_one_pass_reports_once_with_every_modality_it_reached():
    monitor, (a, b, c), passes = monitored(3)
    (a.sum() + 2 * b.sum()).backward()
    assert passes == [(frozenset({0, 1}), False)]
    c.sum().backward()
    assert passes[-1] == (frozenset({2}), False) and len(passes) == 2


def test_accumulating_is_not_discarding_but_zeroing_or_dropping_a_gradient_is():
    monitor, (a, b), passes = monitored()
    (a.sum() + b.sum()).backward()
    (a.sum() + b.sum()).backward()  # accumulated: one more version on the same tensor
    assert passes[-1] == (frozenset({0, 1}), False) and not monitor.discarded()
    b.grad.zero_()
    assert monitor.discarded()
    (a.sum() + b.sum()).backward()
    assert passes[-1] == (frozenset({0, 1}), True)
    a.grad = None
    assert monitor.discarded()
    monitor.forget()
    assert not monitor.discarded()


def test_only_the_reached_modalities_are_recorded():
    monitor, (a, b), passes = monitored()
    b.grad = torch.ones(3)  # set by hand, never by a watched pass
    a.sum().backward()
    b.grad = None
    assert passes == [(frozenset({0}), False)] and not monitor.discarded()


def test_watching_again_unhooks_and_forgets_the_parameters_no_longer_watched():
    monitor, (a, b), passes = monitored()
    (a.sum() + b.sum()).backward()
    monitor.watch([[a]])
    b.grad = None
    assert not monitor.discarded()  # b's record went with its hook
    b.sum().backward()
    assert len(passes) == 1
    a.sum().backward()
    assert passes[-1] == (frozenset({0}), False)
    frozen = nn.Parameter(torch.ones(1), requires_grad=False)
    monitor.watch([[a, frozen]])
    assert len(monitor._hooks) == 1  # a parameter that takes no gradient is not hooked


def test_a_gradient_that_views_a_shared_buffer_counts_an_accumulation_as_at_least_one_more_version():
    monitor, (a, b), passes = monitored()
    bucket = torch.zeros(6)
    a.grad, b.grad = bucket[:3], bucket[3:]  # DDP's gradient_as_bucket_view: one counter for both
    (a.sum() + b.sum()).backward()
    (a.sum() + b.sum()).backward()  # each accumulation moves the shared counter twice
    assert passes[-1] == (frozenset({0, 1}), False)
    a.sum().backward()  # one accumulation moves it exactly once
    assert passes[-1] == (frozenset({0}), False)


def test_close_and_garbage_collection_remove_every_hook():
    monitor, (a, b), passes = monitored()
    monitor.close()
    (a.sum() + b.sum()).backward()
    assert passes == [] and not monitor.discarded()
    monitor, (c, _), passes = monitored()
    gone = weakref.ref(monitor)
    del monitor
    gc.collect()
    assert gone() is None
    c.sum().backward()
    assert passes == [] and not c._post_accumulate_grad_hooks
