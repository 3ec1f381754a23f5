"""Measures: what a batch produced → one non-negative evidence value per modality.

A measure names the inputs it needs from `gradmod.Modulator.observe` and turns them into a
``{modality: 0-d tensor}`` mapping. All work stays on the device; `Measure.problems` returns
device-side flags that the modulator checks with a single host synchronisation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from gradmod import functional as F

#: How far scores may stray outside [0, 1] through floating-point rounding before they count as bad input.
_SCORE_TOLERANCE = 1e-5

__all__ = ["Measure", "SoftmaxScore", "DGMScore", "ZetaGate", "StaticMetrics"]


class Measure(ABC):
    """Base class: ``evidence(names, **inputs)`` and the names of the ``observe()`` inputs it needs."""

    #: keyword arguments of ``observe()`` this measure reads
    inputs: tuple[str, ...] = ()
    #: whether a fresh ``observe()`` is needed before each modulated step
    needs_observe: bool = True

    @abstractmethod
    def evidence(self, names: Sequence[str], **inputs: Any) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Evidence per modality, and named boolean 0-d tensors that are ``True`` for bad input."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _per_modality(names: Sequence[str], mapping: Mapping[str, Tensor] | None, what: str) -> Mapping[str, Tensor]:
    if mapping is None:
        raise ValueError(f"observe() needs {what}={{name: tensor}} for the modalities {list(names)}")
    missing = [n for n in names if n not in mapping]
    unknown = [n for n in mapping if n not in names]
    if missing or unknown:
        raise ValueError(
            f"observe({what}=...) must name exactly the modalities {list(names)}: "
            f"missing {missing}, unknown {unknown}"
        )
    return mapping


def _class_index_problems(name: str, logits: Tensor, target: Tensor) -> dict[str, Tensor]:
    classes = logits.shape[1]
    return {
        f"logits of modality {name!r} contain NaN or inf": ~torch.isfinite(logits.detach()).all(),
        f"target holds class indices outside [0, {classes})": ((target < 0) | (target >= classes)).any(),
    }


class SoftmaxScore(Measure):
    """OGM-GE's score: ``s_u = Σ_i softmax(z_u,i)[y_i]`` (`gradmod.functional.ogm_scores`).

    ``observe(logits={name: [B, C]}, target=[B])`` with the per-modality (decoupled) logits.
    """

    inputs = ("logits", "target")

    def evidence(self, names, logits=None, target=None, **_):
        logits = _per_modality(names, logits, "logits")
        if target is None:
            raise ValueError("observe() needs target=[batch] class indices")
        evidence, problems = {}, {}
        for name in names:
            z = logits[name]
            F._check_logits_target(z, target, name=f"logits[{name!r}]")
            problems.update(_class_index_problems(name, z, target))
            evidence[name] = F.ogm_scores(z, target.clamp(0, z.shape[1] - 1))
        return evidence, problems


class DGMScore(Measure):
    """DGM's evidence (paper 003, eq. (6)): `gradmod.functional.dgm_evidence` per modality.

    ``observe(scores={name: [B, C] in [0, 1]}, target=...)`` with multi-hot ``[B, C]`` or index ``[B]``
    targets; or ``observe(logits=..., target=...)``: logits become sigmoid scores for multi-hot targets and
    softmax probabilities for index targets (the single-label form).
    """

    inputs = ("scores", "logits", "target")

    def evidence(self, names, scores=None, logits=None, target=None, **_):
        if (scores is None) == (logits is None):
            raise ValueError("observe() for DGM needs exactly one of scores= or logits=")
        if target is None:
            raise ValueError("observe() for DGM needs target= (multi-hot [B, C] or class indices [B])")
        given = _per_modality(names, scores if scores is not None else logits, "scores" if scores is not None else "logits")
        evidence, problems = {}, {}
        for name in names:
            x = given[name].detach()
            if x.dim() != 2:
                raise ValueError(f"{'scores' if scores is not None else 'logits'}[{name!r}] must be [batch, classes], got {tuple(x.shape)}")
            if target.dim() == 1:
                F._check_logits_target(x, target, name=f"[{name!r}]")
                problems.update(_class_index_problems(name, x, target))
                target_used = target.clamp(0, x.shape[1] - 1)
            else:
                target_used = target
                problems["multi-hot target holds values outside [0, 1]"] = ((target < 0) | (target > 1)).any()
            if logits is not None:
                problems[f"logits of modality {name!r} contain NaN or inf"] = ~torch.isfinite(x).all()
                x = torch.softmax(x.float(), 1) if target.dim() == 1 else torch.sigmoid(x.float())
            else:  # pooled probabilities may overshoot [0, 1] by rounding: tolerate that, then clamp
                problems[f"scores of modality {name!r} lie outside [0, 1] or are not finite"] = ~(
                    (x >= -_SCORE_TOLERANCE) & (x <= 1 + _SCORE_TOLERANCE)
                ).all()
                x = x.clamp(0.0, 1.0)
            evidence[name] = F.dgm_evidence(x, target_used)
        return evidence, problems


class ZetaGate(Measure):
    """Decoupling-free evidence from the fusion gate ζ (paper 002, eq. (11)): `gradmod.functional.zeta_evidence`.

    ``observe(zeta=ζ)``: a tensor in ``[0, 1]`` weighting the first modality (two modalities), or a mapping
    name → gate for M ≥ 2 gates summing to one.
    """

    inputs = ("zeta",)

    def evidence(self, names, zeta=None, **_):
        if zeta is None:
            raise ValueError("observe() for the decoupling-free method needs zeta= (the fusion gate)")
        evidence = F.zeta_evidence(zeta, names)
        gates = [zeta] if isinstance(zeta, Tensor) else list(zeta.values())
        bad = torch.stack([~((g.detach() >= 0) & (g.detach() <= 1)).all() for g in gates]).any()
        return evidence, {"zeta lies outside [0, 1] or is not finite": bad}


class StaticMetrics(Measure):
    """Fixed evidence: a unimodal metric per modality (PDMP's static option). Needs no ``observe()``."""

    needs_observe = False

    def __init__(self, metrics: Mapping[str, float]):
        self.metrics = {name: float(value) for name, value in metrics.items()}

    def evidence(self, names, **_):
        if set(names) != set(self.metrics):
            raise ValueError(f"static metrics name {sorted(self.metrics)}, the modalities are {sorted(names)}")
        return {n: torch.tensor(self.metrics[n]) for n in names}, {}

    def __repr__(self) -> str:
        return f"StaticMetrics({self.metrics})"
