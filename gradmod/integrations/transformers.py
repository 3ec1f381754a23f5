"""Hugging Face Transformers: `GradModCallback` modulates the gradients of the ``Trainer``'s optimizer.

```
trainer = Trainer(model, args, train_dataset=..., callbacks=[GradModCallback(make_modulator)])
# in the model's forward, where the loss is computed:
observe(self, logits={"audio": la, "visual": lv}, target=labels)
```

The ``Trainer`` steps its optimizer through Accelerate's ``AcceleratedOptimizer``, without a closure.
At ``on_train_begin`` the callback attaches the modulator (`gradmod.Modulator.attach`) to the torch
optimizer inside: its step pre-hook runs where the Trainer's ``on_pre_optimizer_step`` event does —
after the accumulated backward passes and after the Trainer's gradient clipping (``max_grad_norm``),
right before the step — but only for steps that really happen, so a step the fp16 ``GradScaler``
skips drops its evidence as in a plain loop. The modulator's state is saved in every checkpoint folder
(`GradModCallback.STATE_FILE`) and restored by ``trainer.train(resume_from_checkpoint=...)``.

Needs the ``transformers`` package: ``pip install 'gradmod[transformers]'``.
"""

from __future__ import annotations

import os
import weakref
from typing import Any

import torch
from torch import nn

from gradmod.integrations._common import ModulatorFactory, ModulatorSource, require
from gradmod.modulator import Modulator

_transformers = require("transformers", extra="transformers", integration="transformers")
_trainer_utils = require("transformers.trainer_utils", extra="transformers", integration="transformers")

__all__ = ["GradModCallback", "observe"]

#: The model each running callback trains (the model given to the Trainer) → that callback.
_TRAINING: weakref.WeakKeyDictionary[nn.Module, GradModCallback] = weakref.WeakKeyDictionary()


class GradModCallback(_transformers.TrainerCallback):
    """Modulate the gradients of the ``Trainer``'s optimizer with a `gradmod.Modulator`.

    Each optimizer step (after ``gradient_accumulation_steps`` micro-batches), the modulator turns the
    evidence that `observe` gathered since the last step into one coefficient per modality and applies it
    to the gradients, after clipping and before the step.

    Args:
        modulator: a modulator (not attached to any optimizer: the callback attaches it), or a factory
            ``model -> Modulator`` called at the start of each ``train()``, after the Trainer placed the
            model on its device.
    """

    #: The file, in each checkpoint folder, that holds the modulator's state.
    STATE_FILE = "gradmod_state.pt"

    def __init__(self, modulator: Modulator | ModulatorFactory) -> None:
        self._source = ModulatorSource(modulator)
        self._modulator = modulator if isinstance(modulator, Modulator) else None
        self._attached = False

    @property
    def modulator(self) -> Modulator:
        """The modulator (built by the factory when the first ``train()`` started)."""
        if self._modulator is None:
            raise RuntimeError("the modulator factory is called when Trainer.train starts; no training has started yet")
        return self._modulator

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
        modulator = self._source.build(model)
        if modulator.attached_to is not None:
            raise ValueError(
                "the modulator is attached to an optimizer, but GradModCallback attaches it to the Trainer's: "
                "do not call attach() (or detach() it first)"
            )
        if state.global_step > 0:  # resumed: the Trainer loaded the checkpoint's trainer state
            modulator.load_state_dict(self._saved_state(args, state))
        modulator.attach(optimizer)  # through Accelerate's AcceleratedOptimizer to the torch optimizer
        self._modulator, self._attached = modulator, True
        _TRAINING[model] = self

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._release()

    def on_save(
        self, args: _transformers.TrainingArguments, state: _transformers.TrainerState, control: Any, **kwargs: Any
    ) -> None:
        if args.should_save:
            saved = {"global_step": state.global_step, "modulator": self.modulator.state_dict()}
            torch.save(saved, os.path.join(_checkpoint_folder(args, state), self.STATE_FILE))

    def _release(self) -> None:
        if self._attached:
            self._modulator.detach()
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
        return saved["modulator"]


def observe(model: nn.Module, **inputs: Any) -> None:
    """Report a training batch's evidence, from the forward of the model the ``Trainer`` trains.

    Inputs as for `gradmod.Modulator.observe`; the micro-batches of one optimizer step add up. In
    evaluation mode (``model.training`` is ``False``: the Trainer's evaluation and prediction loops) it
    records nothing, so one ``forward`` serves training and evaluation. ``model`` is the model given to
    the Trainer or one of its submodules.
    """
    if not model.training:
        return
    callback = _TRAINING.get(model)
    if callback is None:
        callback = next((cb for root, cb in _TRAINING.items() if any(m is model for m in root.modules())), None)
    if callback is None:
        raise RuntimeError(
            "no GradModCallback is training this model: pass one in Trainer(callbacks=[...]) and call observe() "
            "from the forward of the Trainer's model (or of one of its submodules) during trainer.train()"
        )
    callback.modulator.observe(**inputs)


def _checkpoint_folder(args: _transformers.TrainingArguments, state: _transformers.TrainerState) -> str:
    """The folder the Trainer writes the checkpoint of ``state.global_step`` to."""
    return os.path.join(args.output_dir, f"{_trainer_utils.PREFIX_CHECKPOINT_DIR}-{state.global_step}")
