"""What every gradmod method is: one contract (`Method`), a kind that says how it steps, a registry entry.

**The contract.** Every method holds named units (its modalities, or G-Blending's heads), a versioned
``state_dict()`` that migrates older versions and refuses newer ones by name, exact resume, ``reset()``, a
`gradmod.history.History` (``history``, ``last``) whose records are ``{"step", "status", <field>: {unit:
value}}``, a ``repr``, and the epoch hooks ``start_epoch(epoch)`` / ``end_epoch(epoch)`` that trainers call
(no-ops unless the method works per epoch). ``scalars()`` flattens the last record for a logger.

**The kinds** (`KINDS`): how a method enters a training step.

| kind | per step, in your loop | examples |
| --- | --- | --- |
| ``modulator`` | ``attach(optimizer)`` once; ``observe(...)`` after the forward pass | OGM-GE, DGM, PDMP |
| ``responses`` | a modulator whose loss is computed from ``combine(responses)`` | AGM |
| ``backward`` | ``backward(losses...)`` instead of ``loss.backward()`` (or ``observe`` + a trainer) | MMPareto |
| ``turns`` | one optimizer step per modality, each ``observe(name, ...)`` | MLA |
| ``loss`` | the loss to backward comes from the method (``loss(...)``) | G-Blending, DGL, UMT |
| ``forward`` | the head's input comes from the method (``features, keep = method(...)``) | OPM |
| ``data`` | the batch (inputs and soft targets) or the epoch's data comes from the method | MM, B-MM, valuation |
| ``epoch`` | nothing per step; ``end_epoch`` acts between epochs | Diagnosing & Re-learning |
| ``head`` | a fusion head (an ``nn.Module`` of `gradmod.fusion`) trained on the plain loss | MMCosine |

**Inputs by name** (`INPUTS`). What a method reads in a step — a measure's ``inputs``, a loss method's
``loss_inputs``, a forward method's ``forward_inputs`` — is named from one vocabulary, so that a training loop
that can give these can drive any method of the kind: see `INPUTS`.

`MethodInfo` is what the registry (`gradmod.METHODS`) records of a method: its preset, kind, paper, docs
page, strength and sweep, what it needs from a loop, and the options the training CLI exposes.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from gradmod._state import Migration, migrated
from gradmod.history import History

__all__ = [
    "HEADS",
    "INPUTS",
    "KINDS",
    "Fit",
    "Method",
    "MethodInfo",
    "Option",
    "Strength",
    "check_units",
    "float_or_none",
]

#: Every kind of method, and what a training step must do for it.
KINDS: dict[str, str] = {
    "modulator": "attach(optimizer) once; observe(...) after each forward pass; the optimizer's step applies it",
    "responses": "a modulator: observe the mono-modal responses; compute the loss from combine(responses)",
    "backward": "backward(multimodal_loss, unimodal_losses) replaces loss.backward()",
    "turns": "one optimizer step per modality and batch, each announced by observe(name, ...)",
    "loss": "the training loss is the method's loss(...) of the heads' losses or outputs",
    "forward": "the head's input is the method's: features, keep = method(...) in the forward pass",
    "data": "the training batch (mixed inputs and soft targets) or the epoch's data is the method's",
    "epoch": "nothing per step; end_epoch(epoch) acts between epochs",
    "head": "a fusion head (nn.Module) trained on the plain loss",
}

#: What a method may read in a step, by the keyword it takes (the vocabulary of ``measure.inputs``,
#: ``loss_inputs`` and ``forward_inputs``); a loop that provides these drives any method of its kind.
INPUTS: dict[str, str] = {
    "target": "[B] class indices (or [B, C] multi-hot where a method allows it)",
    "logits": "the fused logits [B, C], with grad",
    "unimodal_logits": "{modality: [B, C]} logits of a head split per modality (decoupled), with grad",
    "features": "{modality: [B, D_m]} the encoders' outputs, with grad",
    "head": "the fusion head: a callable {modality: features} -> fused logits (a modality's features may be zeros)",
    "unimodal_head_logits": "{modality: [B, C]} one linear head per modality on its own features, with grad",
    "losses": "{head: 0-d loss}: the fused head's cross-entropy under 'fused' and each unimodal head's",
    "inputs": "{modality: the raw input batch}",
    "zeta": "the fusion gate ζ (a [B, ...] tensor for two modalities, or {modality: gate})",
    "scores": "{modality: [B, C] scores in [0, 1]} (a decision unit's, for multi-label data)",
}

#: What a method needs from the model's head (`Fit.head`).
HEADS: dict[str, str] = {
    "decoupled": "per-modality logits: a concat or sum head split per modality, or unimodal heads",
    "gate": "a fusion gate ζ (gated sum, FiLM with ζ)",
    "unimodal heads": "one classification head per modality besides the fused head",
    "shared": "one linear head shared by every modality (one feature width)",
    "coalitions": "a model that runs with any modality's input zeroed",
    "features": "the fused feature before the head",
    "inputs": "the raw inputs of every modality",
    "any": "nothing beyond the fused output",
}


@dataclass(frozen=True)
class Strength:
    """A method's main hyper-parameter: its preset keyword, default and scale.

    ``stronger`` says which way acts more: ``"larger"`` (most) or ``"smaller"`` (a regulariser, such as
    MLA's). The accuracy benchmark sweeps ``default × factor`` over the registry's ``sweep`` factors.
    """

    keyword: str
    default: float
    meaning: str
    stronger: str = "larger"

    def __post_init__(self) -> None:
        if self.stronger not in ("larger", "smaller"):
            raise ValueError(f"Strength.stronger must be 'larger' or 'smaller', got {self.stronger!r}")


@dataclass(frozen=True)
class Option:
    """A hyper-parameter the training CLI exposes as ``--<method>-<keyword>`` (underscores as dashes).

    ``loop=True``: an option of the training loop of the method's kind (a held-out fraction, a clip), not a
    keyword of the preset.
    """

    keyword: str
    default: Any
    help: str
    type: Callable[[str], Any] = str
    choices: tuple[Any, ...] | None = None
    loop: bool = False


def float_or_none(text: str) -> float | None:
    """An `Option` type: a number, or ``none``."""
    return None if text == "none" else float(text)


@dataclass(frozen=True)
class Fit:
    """What a method needs from a training loop, and what it acts on (the loop-fit table of `gradmod.diagnose`).

    ``acts_on``: ``"gradient scale"`` (a positive factor per modality — Adam-type optimizers cancel a constant
    one), ``"gradient direction"``, ``"loss"``, ``"data"`` or ``"parameters"``.
    """

    head: str
    acts_on: str
    multilabel: bool = False
    max_modalities: int | None = None
    accumulation: bool = True
    distributed: bool = True
    trainers: tuple[str, ...] = ("lightning", "transformers")

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"Fit.head must be one of {sorted(HEADS)}, got {self.head!r}")


@dataclass(frozen=True)
class MethodInfo:
    """One method of the catalogue: everything tools derive from it (CLI, benchmarks, docs, diagnose).

    Attributes:
        key: its one name (``gradmod.METHODS`` key, the CLI's ``--method``).
        preset: the class users build.
        title: its name in tables.
        kind: one of `KINDS`.
        paper: authors, title and venue.
        page: its docs page (relative to ``docs/``).
        observes: what the loop gives it each step.
        cost: what it adds per step or epoch.
        fit: what it needs from the loop (`Fit`).
        strength: its main hyper-parameter (``None``: nothing to set).
        sweep: the factors of the strength's default the accuracy benchmark tries.
        options: further hyper-parameters the training CLI exposes.
    """

    key: str
    preset: type
    title: str
    kind: str
    paper: str
    page: str
    observes: str
    cost: str
    fit: Fit
    strength: Strength | None = None
    sweep: tuple[float, ...] = (1 / 3, 1.0, 3.0)
    options: tuple[Option, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"method {self.key!r}: kind must be one of {sorted(KINDS)}, got {self.kind!r}")
        if not self.key.isidentifier() or self.key != self.key.lower():
            raise ValueError(f"method key {self.key!r} must be a lower-case identifier")


class Method(ABC):
    """The contract every gradmod method keeps (module docstring).

    Subclasses set ``kind`` and ``state_version``, build ``self.names`` and ``self._history``, and implement
    `_extra_state` / `_load_extra_state` (their own state besides the version, names and history) and
    `_reset`. ``_migrations[v]`` turns a saved state of version ``v`` into version ``v + 1``.
    """

    kind: ClassVar[str]
    state_version: ClassVar[int] = 1
    _migrations: ClassVar[Mapping[int, Migration]] = {}
    #: The version a state without a ``"version"`` key has.
    _first_version: ClassVar[int] = 1

    names: tuple[str, ...]
    _history: History
    #: A method's own trainable parameters (an extra layer, a learned rate), or ``None``: add
    #: ``method.extra.parameters()`` to the optimizer; they are saved in the method's ``state_dict``.
    extra: nn.Module | None = None

    # ------------------------------------------------------------------ history
    @property
    def history(self) -> list[dict[str, Any]]:
        """Every recorded step, oldest first: ``{"step", "status", <field>: {unit: float}, ...}``."""
        return self._history.records()

    @property
    def last(self) -> dict[str, Any] | None:
        """The record of the last recorded step (as in `history`), or ``None``."""
        return self._history.last()

    @property
    def history_dropped(self) -> int:
        """How many old steps the history dropped to keep its bound (0 when unbounded)."""
        return self._history.dropped

    def scalars(self) -> dict[str, float]:
        """The last record flattened for a logger: ``{"<field>/<unit>": value, "active": 1.0 or 0.0}``.

        ``active`` is 1 when the last recorded step applied the method (status ``"applied"``); values that are
        not finite (a field that does not apply to a unit at that step) are left out. Empty before any step.
        """
        record = self.last
        if record is None:
            return {}
        values = {"active": 1.0 if record["status"] == "applied" else 0.0}
        for key, value in record.items():
            if isinstance(value, Mapping):
                values.update({f"{key}/{unit}": float(v) for unit, v in value.items() if math.isfinite(v)})
        return values

    # ------------------------------------------------------------------ epochs
    def start_epoch(self, epoch: int) -> None:
        """Called by trainers before epoch ``epoch`` (0-based) trains; methods that work per epoch override it."""

    def end_epoch(self, epoch: int) -> None:
        """Called by trainers after epoch ``epoch``'s last step; methods that work per epoch override it."""

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything that changes results, with a ``"version"`` key (`load_state_dict` reads older versions)."""
        state = {"version": self.state_version, "names": list(self.names), **self._extra_state()}
        if self.extra is not None:
            state["extra"] = self.extra.state_dict()
        state["history"] = self._history.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict` of this method (an older version is migrated; a newer one raises)."""
        state = migrated(
            state,
            owner=type(self).__name__,
            current=self.state_version,
            names=self.names,
            migrations=self._migrations,
            first=self._first_version,
        )
        self._load_extra_state(state)
        if self.extra is not None:
            self.extra.load_state_dict(state["extra"])
        self._history.load_state_dict(state["history"])

    @abstractmethod
    def _extra_state(self) -> dict[str, Any]:
        """The method's own state besides version, names and history."""

    @abstractmethod
    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Restore what `_extra_state` saved (``state`` is migrated to the current version)."""

    def reset(self) -> None:
        """Forget everything learnt or counted since construction: history, counters, running statistics."""
        self._history.clear()
        self._reset()

    @abstractmethod
    def _reset(self) -> None:
        """The method's own part of `reset`."""

    # ------------------------------------------------------------------ messages
    def _warn_once(self, key: str, message: str, stacklevel: int = 4) -> None:
        """``RuntimeWarning`` ``gradmod <Class>: message``, once per ``key`` (the keys are saved with the state)."""
        warned = self.__dict__.setdefault("_warned", set())
        if key not in warned:
            warned.add(key)
            warnings.warn(
                f"gradmod {type(self).__name__}: {message} (this warning is shown once)", RuntimeWarning, stacklevel=stacklevel
            )


def check_units(units: Sequence[str], what: str) -> tuple[str, ...]:
    """``units`` as a tuple of two or more distinct non-empty names, else a ``ValueError`` naming ``what``."""
    if isinstance(units, str) or not all(isinstance(u, str) and u for u in units):
        raise ValueError(f"{what} must be a sequence of non-empty names, got {units!r}")
    names = tuple(units)
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"{what} must name two or more distinct units, got {list(names)}")
    return names
