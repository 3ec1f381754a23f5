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

import torch
from torch import Tensor

from gradmod import functional as F
from gradmod._internal import check_logits_target, check_names, checked_ignore_index, per_modality, real_scalar, target_problems

#: How far scores may stray outside [0, 1] through floating-point rounding before they count as bad input.
_SCORE_TOLERANCE = 1e-5
#: ``torch.nn.functional.cross_entropy``'s default ``ignore_index``.
IGNORE_INDEX = -100

__all__ = ["Measure", "SoftmaxScore", "DGMScore", "ZetaGate", "StaticMetrics", "IGNORE_INDEX"]


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


class DGMScore(Measure):
    """DGM's evidence (Fu, Gao & Xu, eq. (6)): `gradmod.functional.dgm_evidence` per modality.

    ``observe(scores={name: [B, C] in [0, 1]}, target=...)`` with multi-hot ``[B, C]`` or index ``[B]``
    targets; or ``observe(logits=..., target=...)``: logits become sigmoid scores for multi-hot targets and
    softmax probabilities for index targets (the single-label form). Index targets equal to
    ``ignore_index`` (default −100) add nothing.
    """

    inputs = ("scores", "logits", "target")

    def __init__(self, ignore_index: int | None = IGNORE_INDEX) -> None:
        self.ignore_index = checked_ignore_index(ignore_index)

    def _checked(self, names, scores, logits, target) -> tuple[str, Mapping[str, Tensor]]:
        if (scores is None) == (logits is None):
            raise ValueError("observe() for DGM needs exactly one of scores= or logits=")
        if target is None:
            raise ValueError("observe() for DGM needs target= (multi-hot [B, C] or class indices [B])")
        kind = "scores" if scores is not None else "logits"
        given = per_modality(scores if scores is not None else logits, names, f"observe({kind}=...)")
        for name in names:
            x = given[name]
            if not isinstance(x, Tensor) or x.dim() != 2:
                shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(f"{kind}[{name!r}] must be a [batch, classes] tensor, got {shape}")
            if target.dim() == 1:
                check_logits_target(x, target, name=f"{kind}[{name!r}]")
            elif target.shape != x.shape:
                raise ValueError(
                    f"target must be [batch] indices or multi-hot of {kind}[{name!r}]'s shape {tuple(x.shape)}, "
                    f"got {tuple(target.shape)}"
                )
        return kind, given

    def evidence(self, names, scores=None, logits=None, target=None, **_):
        kind, given = self._checked(names, scores, logits, target)
        evidence = {}
        for name in names:
            x = given[name].detach().float()
            if kind == "logits":
                x = torch.softmax(x, 1) if target.dim() == 1 else torch.sigmoid(x)
            else:  # pooled probabilities may overshoot [0, 1] by rounding: `problems` tolerates that; clamp
                x = x.clamp(0.0, 1.0)
            evidence[name] = F.dgm_evidence(x, target, self.ignore_index)  # read for index targets only
        return evidence

    def problems(self, names, scores=None, logits=None, target=None, **_):
        kind, given = self._checked(names, scores, logits, target)
        flags: dict[str, Tensor] = {}
        for name in names:
            x = given[name].detach()
            if target.dim() == 1:
                flags.update(target_problems(name, x, target, self.ignore_index))
            else:
                flags["multi-hot target holds values outside [0, 1]"] = ((target < 0) | (target > 1)).any()
            if kind == "logits":
                flags[f"logits of modality {name!r} contain NaN or inf"] = ~torch.isfinite(x).all()
            else:
                flags[f"scores of modality {name!r} lie outside [0, 1] or are not finite"] = ~(
                    (x >= -_SCORE_TOLERANCE) & (x <= 1 + _SCORE_TOLERANCE)
                ).all()
        return flags

    def __repr__(self) -> str:
        return f"DGMScore(ignore_index={self.ignore_index})"


class ZetaGate(Measure):
    """Decoupling-free evidence from the fusion gate ζ (SimAM², eq. (11)): `gradmod.functional.zeta_evidence`.

    ``observe(zeta=ζ)``: a tensor in ``[0, 1]`` weighting the first modality (two modalities), or a mapping
    name → gate for M ≥ 2 gates summing to one. An empty ζ (empty batch) gives zero evidence.
    """

    inputs = ("zeta",)

    def evidence(self, names, zeta=None, **_):
        if zeta is None:
            raise ValueError("observe() for the decoupling-free method needs zeta= (the fusion gate)")
        return F.zeta_evidence(zeta, names)

    def problems(self, names, zeta=None, **_):
        gates = [zeta] if isinstance(zeta, Tensor) else list(per_modality(zeta, names, "observe(zeta=...)").values())
        bad = torch.stack([~((g.detach() >= 0) & (g.detach() <= 1)).all() for g in gates]).any()
        return {"zeta lies outside [0, 1] or is not finite": bad}


class StaticMetrics(Measure):
    """Fixed evidence: a unimodal metric per modality (PDMP's static option). Needs no ``observe()``."""

    needs_observe = False

    def __init__(self, metrics: Mapping[str, float]):
        if not isinstance(metrics, Mapping):
            raise TypeError(f"metrics must be a mapping modality name -> number, got {type(metrics).__name__}")
        self.metrics = {name: real_scalar(value, f"metric of modality {name!r}") for name, value in metrics.items()}

    def evidence(self, names, **_):
        check_names(self.metrics, names, "static metrics")
        return {n: torch.tensor(self.metrics[n]) for n in names}

    def __repr__(self) -> str:
        return f"StaticMetrics({self.metrics})"
