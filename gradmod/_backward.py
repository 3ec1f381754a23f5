"""Watching the backward passes that reach the modulated parameters (not public API).

The modulator needs two facts about gradients that no optimizer hook reports:

* **Were the gradients of the pending evidence discarded?** A ``GradScaler`` that skips an ``inf`` step
  never calls ``optimizer.step()``, so the evidence observed for it would leak into the next step. The
  explicit marker: at the end of every backward pass the state of each parameter's ``.grad`` is recorded
  (a weak reference to the tensor and its in-place version counter). A gradient that is later ``None``,
  another tensor, or changed in place (``zero_grad(set_to_none=False)``) was discarded — unless the change
  is exactly one more backward accumulation, which the accumulate hooks see (version + 1 on the same tensor).
  Gradients that are views of one shared buffer (DDP's ``gradient_as_bucket_view=True``, FSDP2's shards)
  share its counter, which the other parameters' accumulations move too: for them an accumulation is
  "at least one more", so zeroing such gradients in place cannot be told from accumulating
  (``set_to_none=True``, torch's default, is still seen).
* **Which modalities did a pass reach?** Features mode must know that a pass reached an encoder's
  parameters without passing its scaled feature tensor.

Records are taken in an end-of-pass callback queued twice (a callback queued from a callback runs after
every callback queued during the pass), so in-place writes that other libraries make at the end of the
pass (DDP copies the all-reduced bucket back into ``.grad``) are part of the recorded state.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

__all__ = ["BackwardMonitor"]

_Record = tuple[weakref.ReferenceType, int]


def _queue_callback(callback: Callable[[], None]) -> None:
    """Run ``callback`` when the current backward pass ends (the engine's queue, as DDP and FSDP use it)."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)


def _version_holder(grad: Tensor) -> Tensor:
    """The tensor whose version counter moves when ``grad`` changes in place: a DTensor's local shard
    (FSDP2 accumulates into it, never touching the wrapper's counter), else the gradient itself."""
    return getattr(grad, "_local_tensor", grad)


def _remove_hooks(hooks: dict[int, RemovableHandle]) -> None:
    for handle in hooks.values():
        handle.remove()
    hooks.clear()


class BackwardMonitor:
    """Accumulate hooks on the parameters of each modality, and the state of their gradients after each pass.

    ``on_pass_end(reached, discarded)`` is called at the end of every backward pass that accumulated into a
    watched parameter: ``reached`` the modality indices whose parameters it reached, ``discarded`` whether
    gradients recorded at the end of an earlier pass had been discarded before this one accumulated.
    """

    def __init__(self, on_pass_end: Callable[[frozenset[int], bool], None]) -> None:
        self._on_pass_end = on_pass_end
        self._hooks: dict[int, RemovableHandle] = {}
        self._modality: dict[int, int] = {}
        self._params: dict[int, Tensor] = {}
        self._records: dict[int, _Record] = {}
        self._reached: set[int] = set()
        self._discarded_in_pass = False
        self._pass_open = False
        weakref.finalize(self, _remove_hooks, self._hooks)

    def watch(self, groups: Sequence[Sequence[Tensor]]) -> None:
        """Hook every parameter of ``groups`` (one list per modality) that requires grad; unhook the rest."""
        wanted = {id(p): (index, p) for index, params in enumerate(groups) for p in params if p.requires_grad}
        for key in [key for key in self._hooks if key not in wanted]:
            self._hooks.pop(key).remove()
            for table in (self._params, self._records, self._modality):
                table.pop(key, None)
        this = weakref.ref(self)  # the hooks must not keep the monitor (and its modulator) alive

        def accumulated(parameter: Tensor) -> None:
            monitor = this()
            if monitor is not None:
                monitor._accumulated(parameter)

        for key, (index, p) in wanted.items():
            self._modality[key] = index
            if key not in self._hooks:
                self._params[key] = p
                self._hooks[key] = p.register_post_accumulate_grad_hook(accumulated)

    def close(self) -> None:
        """Remove every hook."""
        _remove_hooks(self._hooks)
        for table in (self._params, self._records, self._modality):
            table.clear()

    def discarded(self) -> bool:
        """Whether a gradient recorded at the end of the last pass has since been discarded or changed."""
        return any(not self._intact(key, 0) for key in self._records)

    def forget(self) -> None:
        """Drop the records: the gradients were used by a step (or their evidence was dropped)."""
        self._records.clear()

    def _intact(self, key: int, accumulations: int) -> bool:
        reference, version = self._records[key]
        grad = self._params[key].grad
        if grad is None or reference() is not grad:
            return False
        counter = _version_holder(grad)
        if accumulations and counter._is_view():  # views of one buffer share its counter: others move it too
            return counter._version >= version + accumulations
        return counter._version == version + accumulations

    def _accumulated(self, parameter: Tensor) -> None:
        key = id(parameter)
        if key in self._records and not self._intact(key, 1):
            self._discarded_in_pass = True
        self._reached.add(self._modality[key])
        if not self._pass_open:
            self._pass_open = True
            _queue_callback(lambda: _queue_callback(self._end_pass))

    def _end_pass(self) -> None:
        for key in self._reached_keys():
            grad = self._params[key].grad
            if grad is not None:
                self._records[key] = (weakref.ref(grad), _version_holder(grad)._version)
        reached, discarded = frozenset(self._reached), self._discarded_in_pass
        self._reached.clear()
        self._discarded_in_pass = False
        self._pass_open = False
        self._on_pass_end(reached, discarded)

    def _reached_keys(self) -> list[int]:
        return [key for key, index in self._modality.items() if index in self._reached and key in self._params]
