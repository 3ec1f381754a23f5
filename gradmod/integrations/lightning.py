"""Lightning: `GradModCallback` runs any gradmod method in Lightning's ``Trainer`` and logs what it decided.

```
trainer = L.Trainer(callbacks=[GradModCallback(lambda module: gradmod.OGMGE(...))])
# in the LightningModule's training_step, after the forward pass:
observe(self, logits={"audio": la, "visual": lv}, target=y)
```

**Every kind of method** (`gradmod.method.KINDS`):

* methods that act in the optimizer step — modulators (OGM-GE, DGM, PDMP, AGM, …), MMPareto's per-loss
  gradients, MLA's turns — are stepped by the callback in ``on_before_optimizer_step``. Lightning runs
  ``training_step`` and ``backward`` inside a closure that it hands to ``optimizer.step(closure)``, so the
  step pre-hook of ``attach`` would run before the gradients exist; ``on_before_optimizer_step`` comes after
  the (accumulated) backward passes and, with ``precision="16-mixed"``, after the scaler unscaled the gradients,
  and **before** Lightning's gradient clipping. A step the ``GradScaler`` skips is not stepped, not counted, and
  its evidence is dropped, as in a plain loop. Report evidence with `observe` (``observe(self, logits=...,
  target=...)``; MMPareto: ``observe(self, loss_mm, unimodal_losses)`` and return ``loss_mm + Σ unimodal``;
  MLA: ``observe(self, name, features)`` before each of its ``manual_backward``/``opt.step()`` turns, with
  ``automatic_optimization = False`` — under automatic optimization the callback refuses MLA at ``fit`` start).
* methods that give the loss or the batch (G-Blending, the mixups, …) are called from ``training_step`` through
  `method_of` (``method_of(self).loss(losses)``); the callback calls their epoch hooks (G-Blending's held-out
  estimates with ``measure=``, B-MM's accuracies with ``measure=``).

Before and after every training epoch the callback calls ``start_epoch`` / ``end_epoch``; after every optimizer
step it logs the method's ``scalars()`` through ``LightningModule.log_dict`` as ``gradmod/<method>/<field>/<unit>``
(coefficients, ratios, loss weights, and ``active``: 1 on a step that applied the method) to whatever loggers the
trainer has (TensorBoard, W&B, CSV); a method that acts between epochs (Diagnosing & Re-learning) is logged after
each epoch instead, and a `gradmod.diagnose.Monitor`'s epoch means too (``gradmod/monitor/epoch_<field>/…``). The method's ``state_dict`` is saved in Lightning checkpoints and restored by
``Trainer.fit(ckpt_path=...)``.

Needs the ``lightning`` package: ``pip install 'gradmod[lightning]'``.
"""

from __future__ import annotations

from typing import Any

import torch

from gradmod.integrations._common import MethodDriver, MethodFactory, RenamedModulator, method_argument, require
from gradmod.method import Method

_pl = require("lightning.pytorch", extra="lightning", integration="lightning")

__all__ = ["GradModCallback", "method_of", "observe"]


class GradModCallback(RenamedModulator, _pl.Callback):
    """Run a gradmod method of any kind in Lightning's ``Trainer`` (module docstring), with one of its optimizers.

    Args:
        method: a gradmod method (not attached to any optimizer: the callback steps it), or a factory
            ``LightningModule -> method`` called at the start of each ``fit``, after the trainer moved the module to
            its device and configured the optimizers.
        optimizer_index: which of the trainer's optimizers (the order ``configure_optimizers`` returns them in)
            steps the method's parameters. Several optimizers: one callback each, with its own method and index.
        log: log the method's ``scalars()`` after each optimizer step (``log_dict``, ``on_step=True``).
    """

    def __init__(
        self, method: Method | MethodFactory | None = None, *, optimizer_index: int = 0, log: bool = True, **renamed: Any
    ) -> None:
        method = method_argument(method, renamed, "GradModCallback")
        if isinstance(optimizer_index, bool) or not isinstance(optimizer_index, int) or optimizer_index < 0:
            raise ValueError(f"optimizer_index must be an int >= 0, got {optimizer_index!r}")
        self._driver = MethodDriver(method, "Lightning's automatic optimization", "lightning")
        self.optimizer_index = optimizer_index
        self.log_scalars = bool(log)
        self._optimizer: torch.optim.Optimizer | None = None
        self._restored: dict[str, Any] | None = None  # a checkpoint's method state, loaded when the fit starts
        self._to_log = False

    @property
    def method(self) -> Any:
        """The method (built by the factory when the first ``fit`` started)."""
        if self._driver.method is None:
            raise RuntimeError("the method factory is called when Trainer.fit starts; no fit has started yet")
        return self._driver.method

    @property
    def state_key(self) -> str:
        return self._generate_state_key(optimizer_index=self.optimizer_index)

    def on_fit_start(self, trainer: _pl.Trainer, pl_module: _pl.LightningModule) -> None:
        optimizers = trainer.optimizers
        if self.optimizer_index >= len(optimizers):
            raise ValueError(
                f"GradModCallback(optimizer_index={self.optimizer_index}), but configure_optimizers returned "
                f"{len(optimizers)} optimizer(s)"
            )
        optimizer = optimizers[self.optimizer_index]
        method = self._driver.start(pl_module, optimizer, steps_per_batch=not pl_module.automatic_optimization)
        if self._restored is not None:
            method.load_state_dict(self._restored)
            self._restored = None
        self._optimizer = optimizer

    def on_train_epoch_start(self, trainer: _pl.Trainer, pl_module: _pl.LightningModule) -> None:
        self.method.start_epoch(trainer.current_epoch)

    def on_train_epoch_end(self, trainer: _pl.Trainer, pl_module: _pl.LightningModule) -> None:
        self.method.end_epoch(trainer.current_epoch)
        if self.log_scalars and trainer.loggers:
            values = self._driver.epoch_scalars()
            if values:
                pl_module.log_dict(values, on_step=False, on_epoch=True, prog_bar=False, logger=True)

    def on_before_optimizer_step(
        self, trainer: _pl.Trainer, pl_module: _pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if optimizer is not self._optimizer:
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        skipped = scaler is not None and scaler.is_enabled() and _scaler_skips(scaler, optimizer)
        self._driver.before_optimizer_step(skipped)
        self._to_log = not skipped

    def on_train_batch_end(self, trainer: _pl.Trainer, pl_module: _pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        if self.log_scalars and trainer.loggers and self._driver.logs_per_step and (self._to_log or not self._driver.stepped):
            values = self._driver.scalars()
            if values:
                pl_module.log_dict(values, on_step=True, on_epoch=False, prog_bar=False, logger=True)
        self._to_log = False

    def on_fit_end(self, trainer: _pl.Trainer, pl_module: _pl.LightningModule) -> None:
        self._optimizer = None

    def on_exception(self, trainer: _pl.Trainer, pl_module: _pl.LightningModule, exception: BaseException) -> None:
        self._optimizer = None

    def state_dict(self) -> dict[str, Any]:
        if self._restored is not None:
            return {"method": self._restored}
        return {} if self._driver.method is None else {"method": self._driver.method.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("method", state_dict.get("modulator"))  # "modulator": checkpoints of earlier releases
        if saved is None:
            raise ValueError("the checkpoint's GradModCallback state holds no method state")
        if self._optimizer is not None:  # restored after the fit started (strategies that restore late)
            self.method.load_state_dict(saved)
        else:
            self._restored = saved


def method_of(module: _pl.LightningModule, *, optimizer_index: int | None = None) -> Any:
    """The method of the module's `GradModCallback` (``optimizer_index`` picks one of several), e.g. for
    ``method_of(self).loss(losses)`` in ``training_step``."""
    return _callback_for(module.trainer, optimizer_index).method


def observe(module: _pl.LightningModule, *args: Any, optimizer_index: int | None = None, **inputs: Any) -> None:
    """Report a training batch to the callback's method, from ``training_step`` (gradmod's ``self.log``).

    Call it after the forward pass with what the method's ``observe`` takes (a modulator: ``logits=...,
    target=...``; MMPareto: the multimodal and unimodal losses; MLA: the turn's modality and features); the
    batches of one optimizer step (``accumulate_grad_batches``) add up. ``optimizer_index`` picks the
    `GradModCallback` when the trainer has several.
    """
    trainer = module.trainer
    callback = _callback_for(trainer, optimizer_index)
    if not trainer.training:
        stage = "no" if trainer.state.stage is None else repr(trainer.state.stage.value)
        raise RuntimeError(f"observe() reports training evidence, but the trainer is in {stage} stage: call it in training_step only")
    callback.method.observe(*args, **inputs)


def _callbacks(trainer: _pl.Trainer) -> list[GradModCallback]:
    return [cb for cb in trainer.callbacks if isinstance(cb, GradModCallback)]


def _callback_for(trainer: _pl.Trainer, optimizer_index: int | None) -> GradModCallback:
    callbacks = _callbacks(trainer)
    if not callbacks:
        raise RuntimeError("the trainer has no GradModCallback: Trainer(callbacks=[GradModCallback(...)])")
    if optimizer_index is None:
        if len(callbacks) > 1:
            indices = sorted(cb.optimizer_index for cb in callbacks)
            raise ValueError(f"the trainer has GradModCallbacks for optimizers {indices}: pass optimizer_index=")
        return callbacks[0]
    for callback in callbacks:
        if callback.optimizer_index == optimizer_index:
            return callback
    raise ValueError(f"no GradModCallback steps optimizer {optimizer_index}")


def _scaler_skips(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``scaler.step(optimizer)`` is about to skip the step (``inf``/``NaN`` gradients).

    The scaler's own record when Lightning unscaled the gradients; optimizers that unscale inside
    ``step()`` (``fused=True``) are checked the way ``scaler.step`` checks them.
    """
    found = scaler._found_inf_per_device(optimizer) or scaler._check_inf_per_device(optimizer)
    return bool(sum(value.item() for value in found.values()))
