"""Measures: what a batch produced → one non-negative evidence value per modality.

A measure names the inputs it reads from `gradmod.Modulator.observe` and turns them into a
``{modality: 0-d tensor}`` mapping with `Measure.evidence`. Shapes, dtypes and names are checked there
(on the host, no synchronisation); `Measure.problems` returns device-side flags for bad *values* (NaN
logits, targets out of range, scores outside ``[0, 1]``), which the modulator reads with one host
synchronisation when it validates (``validate=True``) and never computes otherwise.

Evidence may be zero for a batch (an empty micro-batch, every target ignored, a softmax score that
underflows): that is a *degenerate* batch, not bad input; the modulator decides what to do with it
after summing the evidence of a step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from gradmod import functional as F
from gradmod._internal import check_logits_target, checked_ignore_index, per_modality, target_problems

#: How far scores may stray outside [0, 1] through floating-point rounding before they count as bad input.
SCORE_TOLERANCE = 1e-5
#: ``torch.nn.functional.cross_entropy``'s default ``ignore_index``.
IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX", "SCORE_TOLERANCE", "Measure", "SoftmaxScore"]


class Measure(ABC):
    """Base class: `evidence` per modality from the ``observe()`` inputs named in `inputs`."""

    #: keyword arguments of ``observe()`` this measure reads
    inputs: tuple[str, ...] = ()
    #: whether a fresh ``observe()`` is needed before each modulated step
    needs_observe: bool = True

    @abstractmethod
    def evidence(self, names: Sequence[str], **inputs: Any) -> dict[str, Tensor]:
        """Evidence per modality (0-d tensors, ``>= 0`` for valid input); raises on bad shapes or names."""

    def problems(self, names: Sequence[str], **inputs: Any) -> dict[str, Tensor]:
        """Message → 0-d bool tensor that is ``True`` when the input values are bad (checked on the device)."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SoftmaxScore(Measure):
    """OGM-GE's score: ``s_u = Σ_i softmax(z_u,i)[y_i]`` (`gradmod.functional.ogm_scores`).

    ``observe(logits={name: [B, C]}, target=[B])`` with the per-modality (decoupled) logits. Samples whose
    target is ``ignore_index`` (default −100, as in ``cross_entropy``) add nothing.
    """

    inputs = ("logits", "target")

    def __init__(self, ignore_index: int | None = IGNORE_INDEX) -> None:
        self.ignore_index = checked_ignore_index(ignore_index)

    def _checked(self, names: Sequence[str], logits: Any, target: Any) -> Mapping[str, Tensor]:
        logits = per_modality(logits, names, "observe(logits=...)")
        if target is None:
            raise ValueError("observe() needs target=[batch] class indices")
        for name in names:
            check_logits_target(logits[name], target, name=f"logits[{name!r}]")
        return logits

    def evidence(self, names, logits=None, target=None, **_):
        logits = self._checked(names, logits, target)
        return {name: F.ogm_scores(logits[name], target, self.ignore_index) for name in names}

    def problems(self, names, logits=None, target=None, **_):
        logits = self._checked(names, logits, target)
        flags: dict[str, Tensor] = {}
        for name in names:
            flags.update(target_problems(name, logits[name], target, self.ignore_index))
        return flags

    def __repr__(self) -> str:
        return f"SoftmaxScore(ignore_index={self.ignore_index})"




def __getattr__(name: str):  # names that moved to their method's module (gradmod._deprecated)
    from gradmod._deprecated import moved_attribute

    return moved_attribute(__name__, name)
