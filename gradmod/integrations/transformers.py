"""Hugging Face Transformers: `GradModCallback` runs a gradmod method in the ``Trainer`` and logs what it decided.

```
trainer = Trainer(model, args, train_dataset=...)
GradModCallback(make_method).install(trainer)
# in the model's forward, where the loss is computed:
observe(self, logits={"audio": la, "visual": lv}, target=labels)
```

**Every kind of method** (`gradmod.method.KINDS`) but one:

* methods that act in the optimizer step — modulators (OGM-GE, DGM, PDMP, AGM, …), MMPareto's per-loss gradients
  — are attached at ``on_train_begin`` to the torch optimizer inside Accelerate's ``AcceleratedOptimizer``: their
  step pre-hook runs where the Trainer's ``on_pre_optimizer_step`` event does — after the accumulated backward
  passes and after the Trainer's gradient clipping (``max_grad_norm``), right before the step — but only for steps
  that really happen, so a step the fp16 ``GradScaler`` skips drops its evidence as in a plain loop. Report
  evidence with `observe` from the model's ``forward`` (MMPareto: ``observe(self, loss_mm, unimodal_losses)`` and
  return ``loss_mm + Σ unimodal`` as the loss).
* methods that give the loss or the batch (G-Blending, the mixups, …) are called from the model's ``forward``
  through `method_of`; the callback calls their epoch hooks (``on_epoch_begin`` / ``on_epoch_end``).
* MLA (kind ``"turns"``) takes one optimizer step per modality and batch; the Trainer steps once per batch, so the
  callback refuses it by name at ``train()`` start (use Lightning's manual optimization or your own loop).

The method's ``scalars()`` (``gradmod/<method>/<field>/<unit>``: coefficients, ratios, loss weights, ``active``)
join every log the Trainer writes (``logging_steps``): they are added to the ``logs`` of its ``log()`` and so reach
``trainer.state.log_history`` and the reporting integrations (``report_to``: TensorBoard, W&B, …) — which run in
the order of the Trainer's callbacks, so `GradModCallback.install` puts the callback before them (a callback given
in ``Trainer(callbacks=[...])`` comes after them and warns that its scalars reach the log history only). The
method's state is saved in every checkpoint folder (`GradModCallback.STATE_FILE`) and restored by
``trainer.train(resume_from_checkpoint=...)``.

Needs the ``transformers`` package: ``pip install 'gradmod[transformers]'``.
"""

from __future__ import annotations

import os
import warnings
import weakref
from typing import Any

import torch
from torch import nn

from gradmod.integrations._common import MethodDriver, MethodFactory, RenamedModulator, method_argument, require
from gradmod.method import Method

_transformers = require("transformers", extra="transformers", integration="transformers")
_trainer_utils = require("transformers.trainer_utils", extra="transformers", integration="transformers")
_integrations = require("transformers.integrations", extra="transformers", integration="transformers")

__all__ = ["GradModCallback", "method_of", "observe"]

#: The model each running callback trains (the model given to the Trainer) → that callback.
_TRAINING: weakref.WeakKeyDictionary[nn.Module, GradModCallback] = weakref.WeakKeyDictionary()


class GradModCallback(RenamedModulator, _transformers.TrainerCallback):
    """Run a gradmod method in the Hugging Face ``Trainer`` (module docstring).

    Args:
        method: a gradmod method (not attached to any optimizer: the callback attaches it), or a factory
            ``model -> method`` called at the start of each ``train()``, after the Trainer placed the model on its
            device.
        log: add the method's ``scalars()`` to the Trainer's logs.
    """

    #: The file, in each checkpoint folder, that holds the method's state.
    STATE_FILE = "gradmod_state.pt"

    def __init__(self, method: Method | MethodFactory | None = None, *, log: bool = True, **renamed: Any) -> None:
        method = method_argument(method, renamed, "GradModCallback")
        self._driver = MethodDriver(method, "the Hugging Face Trainer", "transformers")
        self.log_scalars = bool(log)
        self._attached = False
        self._installed = False
        self._warned_order = False

    @property
    def method(self) -> Any:
        """The method (built by the factory when the first ``train()`` started)."""
        if self._driver.method is None:
            raise RuntimeError("the method factory is called when Trainer.train starts; no training has started yet")
        return self._driver.method

    def install(self, trainer: _transformers.Trainer) -> GradModCallback:
        """Add this callback to ``trainer`` before its reporting integrations, so that they log its scalars."""
        callbacks = trainer.callback_handler.callbacks
        reporting = [i for i, cb in enumerate(callbacks) if type(cb).__module__.startswith(_integrations.__name__)]
        callbacks.insert(reporting[0] if reporting else len(callbacks), self)
        self._installed = True
        return self

    def on_train_begin(
        self,
        args: _transformers.TrainingArguments,
        state: _transformers.TrainerState,
        control: _transformers.TrainerControl,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        self._release()  # an earlier train() that raised left its attachment
        method = self._driver.start(model, optimizer, steps_per_batch=False)
        if state.global_step > 0:  # resumed: the Trainer loaded the checkpoint's trainer state
            method.load_state_dict(self._saved_state(args, state))
        if self._driver.stepped:
            method.attach(optimizer)  # through Accelerate's AcceleratedOptimizer to the torch optimizer
            self._attached = True
        _TRAINING[model] = self
        if self.log_scalars and not self._installed and args.report_to and args.report_to != ["none"]:
            self._warn_order(args.report_to)

    def _warn_order(self, report_to: Any) -> None:
        if not self._warned_order:
            self._warned_order = True
            warnings.warn(
                f"gradmod: GradModCallback was given in Trainer(callbacks=[...]), after the reporting integrations "
                f"{report_to}: its scalars reach trainer.state.log_history but not them; add it with "
                "GradModCallback(...).install(trainer) instead (this warning is shown once)",
                RuntimeWarning,
                stacklevel=2,
            )

    def on_epoch_begin(self, args: Any, state: _transformers.TrainerState, control: Any, **kwargs: Any) -> None:
        self.method.start_epoch(int(state.epoch or 0))

    def on_epoch_end(self, args: Any, state: _transformers.TrainerState, control: Any, **kwargs: Any) -> None:
        self.method.end_epoch(round(state.epoch) - 1)

    def on_log(self, args: Any, state: _transformers.TrainerState, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if not self.log_scalars or logs is None or "loss" not in logs and "train_loss" not in logs:
            return  # evaluation logs (the training logs and the closing summary, with train_loss, get the scalars)
        values = self._driver.scalars()
        logs.update(values)
        if state.log_history:
            state.log_history[-1].update(values)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._release()

    def on_save(
        self, args: _transformers.TrainingArguments, state: _transformers.TrainerState, control: Any, **kwargs: Any
    ) -> None:
        if args.should_save:
            saved = {"global_step": state.global_step, "method": self.method.state_dict()}
            torch.save(saved, os.path.join(_checkpoint_folder(args, state), self.STATE_FILE))

    def _release(self) -> None:
        if self._attached:
            self._driver.method.detach()
            self._attached = False
        for model in [model for model, callback in _TRAINING.items() if callback is self]:
            del _TRAINING[model]

    def _saved_state(self, args: _transformers.TrainingArguments, state: _transformers.TrainerState) -> dict[str, Any]:
        path = os.path.join(_checkpoint_folder(args, state), self.STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"training resumes at step {state.global_step}, but {path} does not exist: resume from a checkpoint "
                "that a Trainer with GradModCallback saved in its output_dir"
            )
        saved = torch.load(path, weights_only=True)
        if saved["global_step"] != state.global_step:
            raise ValueError(f"{path} was saved at step {saved['global_step']}, but training resumes at step {state.global_step}")
        return saved.get("method", saved.get("modulator"))  # "modulator": checkpoints of earlier releases


def _callback_of(model: nn.Module) -> GradModCallback:
    callback = _TRAINING.get(model)
    if callback is None:
        callback = next((cb for root, cb in _TRAINING.items() if any(m is model for m in root.modules())), None)
    if callback is None:
        raise RuntimeError(
            "no GradModCallback is training this model: add one to the Trainer (GradModCallback(...).install(trainer)) "
            "and call observe() from the forward of the Trainer's model (or of one of its submodules) during "
            "trainer.train()"
        )
    return callback


def method_of(model: nn.Module) -> Any:
    """The method of the `GradModCallback` training ``model`` (the Trainer's model or one of its submodules), e.g.
    for ``method_of(self).loss(losses)`` in ``forward``."""
    return _callback_of(model).method


def observe(model: nn.Module, *args: Any, **inputs: Any) -> None:
    """Report a training batch's evidence, from the forward of the model the ``Trainer`` trains.

    Inputs as for the method's ``observe``; the micro-batches of one optimizer step add up. In evaluation mode
    (``model.training`` is ``False``: the Trainer's evaluation and prediction loops) it records nothing, so one
    ``forward`` serves training and evaluation. ``model`` is the model given to the Trainer or one of its
    submodules.
    """
    if not model.training:
        return
    _callback_of(model).method.observe(*args, **inputs)


def _checkpoint_folder(args: _transformers.TrainingArguments, state: _transformers.TrainerState) -> str:
    """The folder the Trainer writes the checkpoint of ``state.global_step`` to."""
    return os.path.join(args.output_dir, f"{_trainer_utils.PREFIX_CHECKPOINT_DIR}-{state.global_step}")
