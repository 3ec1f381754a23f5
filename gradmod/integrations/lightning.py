"""Lightning: `GradModCallback` modulates the gradients of one of the ``Trainer``'s optimizers.

```
trainer = L.Trainer(callbacks=[GradModCallback(lambda module: gradmod.OGMGE(...))])
# in the LightningModule's training_step, after the forward pass:
observe(self, logits={"audio": la, "visual": lv}, target=y)
```

Lightning runs ``training_step`` and ``backward`` inside a closure that it hands to
``optimizer.step(closure)`` (except under a ``GradScaler``), so the step pre-hook of
`gradmod.Modulator.attach` would run before the gradients exist. The callback steps the modulator in
``on_before_optimizer_step`` instead: after the (accumulated) backward passes and, with
``precision="16-mixed"``, after the scaler unscaled the gradients; **before** Lightning's gradient
clipping, so the clipped gradient is the one the optimizer applies, noise included. A step the
``GradScaler`` skips is not modulated, not counted, and its evidence is dropped, as in a plain loop.

Needs the ``lightning`` package: ``pip install 'gradmod[lightning]'``.
"""

from __future__ import annotations

from typing import Any

import torch

from gradmod.integrations._common import ModulatorFactory, ModulatorSource, require
from gradmod.modulator import Modulator

_pl = require("lightning.pytorch", extra="lightning", integration="lightning")

__all__ = ["GradModCallback", "observe"]


class GradModCallback(_pl.Callback):
    """Modulate the gradients of the trainer's optimizer ``optimizer_index`` with a `gradmod.Modulator`.

    Each optimizer step (after ``accumulate_grad_batches`` batches, or each ``opt.step()`` in manual
    optimization), the modulator turns the evidence that `observe` gathered since the last step into
    one coefficient per modality and applies it to the gradients: in ``on_before_optimizer_step``,
    before gradient clipping. The modulator's `state_dict` is saved in Lightning checkpoints and
    restored by ``Trainer.fit(ckpt_path=...)``.

    Args:
        modulator: a modulator (not attached to any optimizer: the callback steps it), or a factory
            ``LightningModule -> Modulator`` called at the start of each ``fit``, after the trainer
            moved the module to its device and configured the optimizers.
        optimizer_index: which of the trainer's optimizers (the order ``configure_optimizers``
            returns them in) steps the modulated encoders. Several optimizers: one callback each, with
            its own modulator and index.
    """

    def __init__(self, modulator: Modulator | ModulatorFactory, *, optimizer_index: int = 0) -> None:
        if isinstance(optimizer_index, bool) or not isinstance(optimizer_index, int) or optimizer_index < 0:
            raise ValueError(f"optimizer_index must be an int >= 0, got {optimizer_index!r}")
        self._source = ModulatorSource(modulator)
        self.optimizer_index = optimizer_index
        self._modulator = modulator if isinstance(modulator, Modulator) else None
        self._optimizer: torch.optim.Optimizer | None = None
        self._restored: dict[str, Any] | None = None  # a checkpoint's modulator state, loaded when the fit starts

    @property
    def modulator(self) -> Modulator:
        """The modulator (built by the factory when the first ``fit`` started)."""
        if self._modulator is None:
            raise RuntimeError("the modulator factory is called when Trainer.fit starts; no fit has started yet")
        return self._modulator

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
        modulator = self._source.build(pl_module)
        if modulator.attached_to is not None:
            raise ValueError(
                "the modulator is attached to an optimizer, but GradModCallback steps it itself: do not call "
                "attach() (or detach() it first)"
            )
        # attach()'s pre-hook would run before Lightning's closure computes the gradients, so the callback
        # steps the modulator itself, after the same checks
        modulator.check_optimizer(optimizer)
        if self._restored is not None:
            modulator.load_state_dict(self._restored)
            self._restored = None
        self._modulator, self._optimizer = modulator, optimizer

    def on_before_optimizer_step(
        self, trainer: _pl.Trainer, pl_module: _pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if optimizer is not self._optimizer:
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled() and _scaler_skips(scaler, optimizer):
            self._modulator.skip_step()
            return
        self._modulator.step()

    def on_fit_end(self, trainer: _pl.Trainer, pl_module: _pl.LightningModule) -> None:
        self._optimizer = None

    def on_exception(self, trainer: _pl.Trainer, pl_module: _pl.LightningModule, exception: BaseException) -> None:
        self._optimizer = None

    def state_dict(self) -> dict[str, Any]:
        if self._restored is not None:
            return {"modulator": self._restored}
        return {} if self._modulator is None else {"modulator": self._modulator.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "modulator" not in state_dict:
            raise ValueError("the checkpoint's GradModCallback state holds no modulator state")
        if self._optimizer is not None:  # restored after the fit started (strategies that restore late)
            self._modulator.load_state_dict(state_dict["modulator"])
        else:
            self._restored = state_dict["modulator"]


def observe(module: _pl.LightningModule, *, optimizer_index: int | None = None, **inputs: Any) -> None:
    """Report a training batch's evidence, from ``training_step`` (gradmod's ``self.log``).

    Call it after the forward pass, as `gradmod.Modulator.observe` (same inputs): once per batch; the
    batches of one optimizer step (``accumulate_grad_batches``) add up. ``optimizer_index`` picks the
    `GradModCallback` when the trainer has several.
    """
    trainer = module.trainer
    callback = _callback_for(trainer, optimizer_index)
    if not trainer.training:
        stage = "no" if trainer.state.stage is None else repr(trainer.state.stage.value)
        raise RuntimeError(f"observe() reports training evidence, but the trainer is in {stage} stage: call it in training_step only")
    callback.modulator.observe(**inputs)


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

