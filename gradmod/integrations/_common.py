"""What the trainer integrations share (not public API): the optional import, the method source, and the driver
that runs a method of any kind at a trainer's events.

A trainer owns the loop, so a callback cannot use a method's ``attach``: it drives the method by its kind
(`gradmod.method.KINDS`) instead. At the start of training it checks that the trainer can run the method at all
(`MethodDriver.start`): one optimizer step per modality and batch (``"turns"``) needs a loop that steps several
times per batch. Before each optimizer step it steps the methods that act there (`STEPPED_KINDS`), or tells them
the step was skipped; before and after every epoch it calls ``start_epoch`` / ``end_epoch``; after each step it
reads ``scalars()`` for the trainer's logger (`MethodDriver.scalars`; after each epoch for the kinds of
`EPOCH_KINDS`, `MethodDriver.epoch_scalars`).
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import nn

from gradmod.method import Method

__all__ = ["EPOCH_KINDS", "STEPPED_KINDS", "MethodDriver", "MethodFactory", "RenamedModulator", "method_argument", "require"]

#: Builds the method from the model when training starts (after the trainer moved the model).
MethodFactory = Callable[[nn.Module], Method]
#: The kinds that act in the optimizer step (a trainer steps them before ``optimizer.step()``); the others act
#: through the loss, the batch or the epoch hooks. A passive monitor (`gradmod.diagnose`) steps too.
STEPPED_KINDS = ("modulator", "responses", "backward", "turns")
#: The kinds whose decisions are made between epochs: logged after each epoch, not after each step.
EPOCH_KINDS = ("epoch",)


def require(module: str, *, extra: str, integration: str) -> ModuleType:
    """Import ``module`` or raise an ``ImportError`` that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"gradmod.integrations.{integration} needs the {module.split('.')[0]!r} package: "
            f"pip install 'gradmod[{extra}]'"
        ) from error


def method_argument(method: Any, renamed: dict[str, Any], owner: str) -> Any:
    """The callbacks' ``method`` argument, also accepted under its old name ``modulator=`` (with a warning)."""
    if "modulator" in renamed:
        warnings.warn(
            f"{owner}(modulator=...) is renamed {owner}(method=...); modulator= will be removed in the next release",
            DeprecationWarning,
            stacklevel=3,
        )
        if method is not None:
            raise TypeError(f"{owner} got both method= and its old name modulator=")
        method = renamed.pop("modulator")
    if renamed:
        raise TypeError(f"{owner} got unexpected keyword arguments {sorted(renamed)}")
    if method is None:
        raise TypeError(f"{owner} needs a method: a gradmod method or a factory model -> method")
    return method


class RenamedModulator:
    """The callbacks' old attribute ``modulator``, now ``method``: kept for one release, with a warning."""

    method: Any

    @property
    def modulator(self) -> Any:
        warnings.warn(
            f"{type(self).__name__}.modulator is renamed .method; .modulator will be removed in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.method


def _is_method(value: Any) -> bool:
    return isinstance(value, Method) or hasattr(value, "kind") and hasattr(value, "state_dict") and hasattr(value, "scalars")


class MethodDriver:
    """One method (given, or built by a factory when training starts) run at a trainer's events.

    Args:
        method: a gradmod method (not attached to an optimizer: the trainer steps it), or a factory
            ``model -> method`` called when training starts, after the trainer placed the model on its device.
        trainer: the trainer's name, for messages (``"Lightning"``, ``"the Hugging Face Trainer"``).
        trainer_key: the trainer as `gradmod.method.Fit.trainers` names it (``"lightning"``, ``"transformers"``).
    """

    def __init__(self, method: Method | MethodFactory, trainer: str, trainer_key: str) -> None:
        if _is_method(method):
            self._given: Any = method
            self._factory: MethodFactory | None = None
        elif isinstance(method, nn.Module):
            raise TypeError(
                f"expected a gradmod method or a factory model -> method, got the module {type(method).__name__}: a "
                "fusion head (MMCosineFusion) is part of the model and trains with it, no callback drives it"
            )
        elif callable(method):
            self._given, self._factory = None, method
        else:
            raise TypeError(f"expected a gradmod method or a factory model -> method, got {type(method).__name__}")
        self.trainer, self.trainer_key = trainer, trainer_key
        self.method: Any = self._given

    def start(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, *, steps_per_batch: bool) -> Any:
        """Build the method (a factory), check the trainer can run its kind, and check the optimizer.

        ``steps_per_batch``: whether the trainer takes several optimizer steps per batch (Lightning's manual
        optimization can; the Hugging Face Trainer cannot), which the ``"turns"`` kind needs.
        """
        method = self._given if self._factory is None else self._factory(model)
        if not _is_method(method):
            raise TypeError(f"the method factory returned a {type(method).__name__}, not a gradmod method")
        kind = method.kind
        if kind == "turns" and not steps_per_batch:
            raise ValueError(
                f"{type(method).__name__} takes one optimizer step per modality and batch, which {self.trainer} does "
                "not do here; under Lightning set automatic_optimization = False and step the optimizer once per "
                "modality in training_step (the Hugging Face Trainer steps once per batch: use Lightning or your own loop)"
            )
        from gradmod.methods import METHODS, key_of

        info = METHODS.get(key_of(method))
        if info is not None and self.trainer_key not in info.fit.trainers:
            raise ValueError(
                f"{info.title} does not run under {self.trainer} (gradmod.METHODS[{info.key!r}].fit.trainers = "
                f"{info.fit.trainers}): docs/{info.page} says why and how to train it"
            )
        if kind in STEPPED_KINDS:
            if getattr(method, "attached_to", None) is not None:
                raise ValueError(
                    f"the {type(method).__name__} is attached to an optimizer, but the callback steps it itself: do not "
                    "call attach() (or detach() it first)"
                )
            if optimizer is None:
                raise ValueError(f"{type(method).__name__} acts in the optimizer step, but {self.trainer} gave no optimizer")
            method.check_optimizer(optimizer)
        self.method = method
        return method

    @property
    def stepped(self) -> bool:
        """Whether the method acts in the optimizer step."""
        return self.method.kind in STEPPED_KINDS

    def before_optimizer_step(self, skipped: bool) -> None:
        """Step the method (or drop the step a ``GradScaler`` skips) right before ``optimizer.step()``."""
        if not self.stepped:
            return
        if skipped:
            self.method.skip_step()
        else:
            self.method.step()

    @property
    def logs_per_step(self) -> bool:
        """Whether the method's scalars are logged after each step (else after each epoch)."""
        return self.method.kind not in EPOCH_KINDS

    def epoch_scalars(self, prefix: str = "gradmod") -> dict[str, float]:
        """What to log after an epoch: the scalars of a method that acts between epochs, and a monitor's epoch means
        (``epoch_scalars()``: ``<prefix>/monitor/epoch_<field>/<modality>``)."""
        values = {} if self.logs_per_step else self.scalars(prefix)
        epoch_means = getattr(self.method, "epoch_scalars", None)
        if callable(epoch_means):
            from gradmod.methods import key_of

            values.update({f"{prefix}/{key_of(self.method)}/{k}": v for k, v in epoch_means().items()})
        return values

    def scalars(self, prefix: str = "gradmod") -> dict[str, float]:
        """What the method decided at its last recorded step, as ``{"<prefix>/<method>/<field>/<unit>": value}``."""
        from gradmod.integrations.tensorboard import tags

        return tags(self.method, prefix)
