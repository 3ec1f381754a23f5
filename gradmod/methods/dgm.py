"""DGM: Fu, Gao & Xu, *Multimodal Imbalance-Aware Gradient Modulation for Weakly-supervised Audio-Visual Video
Parsing* — the imbalance metric of eq. (6), the coefficient of eq. (7), the covariance-restoring noise of eq. (9).

Evidence of modality ``u`` on a batch (`dgm_evidence`): ``e_u = Σ_n Σ_c s^u_n[c]·Y_n[c] + Σ_n Δs̄^u_n``, the
scores of the correct classes plus the correct/wrong discrepancy; ``ω_u = e_u / mean_{v≠u} e_v``
(`gradmod.functional.discrepancy_ratios`, eq. (6) for two modalities); ``μ_u = 1 − tanh(α·ω_u)`` for
``ω_u > 1`` (eq. (7): the paper's γ is this ``α``; `gradmod.policies.OGMPolicy`); the update ``μ·g + ε``
(eq. (9)). Measured on the modality-separated decision unit's pure unimodal scores (eq. (11)) for
multi-label data, or on decoupled logits (softmax scores) for single-label data.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from gradmod._internal import NOT_GIVEN, check_logits_target, checked_ignore_index, per_modality, renamed_keyword, target_problems
from gradmod.appliers import DEFAULT_BACKEND, Applier, Modality, ParamFilter, preset_applier
from gradmod.measures import IGNORE_INDEX, SCORE_TOLERANCE, Measure
from gradmod.method import Fit, MethodInfo, Strength
from gradmod.modulator import Modulator
from gradmod.policies import OGMPolicy

__all__ = ["DGM", "DGMScore", "dgm_evidence"]

#: DGM's published default strength (the paper's γ).
DEFAULT_ALPHA = 0.1


def dgm_evidence(scores: Tensor, target: Tensor, ignore_index: int | None = None) -> Tensor:
    """DGM evidence of one modality on a batch (Fu, Gao & Xu, eq. (6), numerator or denominator):

    ``e = Σ_n Σ_c s_n[c]·Y_n[c] + Σ_n Δs̄_n``,  ``Δs̄_n = mean_{c: Y=1} s_n[c] − mean_{c: Y=0} s_n[c]``.

    Args:
        scores: ``[B, C]`` confidence scores in ``[0, 1]`` (sigmoid outputs for multi-label; softmax
            probabilities for the single-label form).
        target: ``[B, C]`` multi-hot labels, or ``[B]`` class indices (single-label form: one-hot).
        ignore_index: with index targets, samples whose target equals it add nothing.

    A sample with no correct class (all-zero row) or no wrong class (all-one row) has no discrepancy:
    its missing mean counts as 0, so ``Δs̄ = mean_correct`` (no wrong class) or ``−mean_wrong``
    (no correct class). Returns a 0-d float tensor; no host synchronisation.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [batch, classes], got shape {tuple(scores.shape)}")
    s = scores.detach().float()
    if target.dim() == 1:
        check_logits_target(s, target, name="scores")
        index = target if ignore_index is None else torch.where(target != ignore_index, target, 0)
        y = torch.zeros_like(s).scatter_(1, index.long().unsqueeze(1), 1.0)
        if ignore_index is not None:  # an ignored row has no scores and no labels: it adds 0
            kept = (target != ignore_index).unsqueeze(1)
            s, y = s * kept, y * kept
    elif target.shape == s.shape:
        y = target.detach().float()
    else:
        raise ValueError(
            f"target must be [batch] indices or multi-hot of the scores' shape {tuple(s.shape)}, "
            f"got {tuple(target.shape)}"
        )
    n_correct = y.sum(1)
    n_wrong = y.shape[1] - n_correct
    mean_correct = (s * y).sum(1) / n_correct.clamp_min(1.0)
    mean_wrong = (s * (1.0 - y)).sum(1) / n_wrong.clamp_min(1.0)
    return (s * y).sum() + (mean_correct - mean_wrong).sum()



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
            evidence[name] = dgm_evidence(x, target, self.ignore_index)  # read for index targets only
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
                    (x >= -SCORE_TOLERANCE) & (x <= 1 + SCORE_TOLERANCE)
                ).all()
        return flags

    def __repr__(self) -> str:
        return f"DGMScore(ignore_index={self.ignore_index})"



class DGM(Modulator):
    """Dynamic gradient modulation (DGM) with its covariance-restoring noise.

    Evidence ``e_u = Σ_n Σ_c s^u_n[c]·Y_n[c] + Σ_n Δs̄^u_n`` (eq. 6), ``μ_u = 1 − tanh(α·ω_u)`` for
    ``ω_u = e_u / mean_{v≠u} e_v > 1`` (eq. 7, the paper's γ), update ``μ·g + ε`` (eq. 9). ``noise="restore"``
    (default) draws ``ε ~ N(0, (1−μ²)σ²)`` so the total variance is the unmodulated ``σ²`` — the stated intent
    of eq. (9); ``noise="paper"`` draws eq. (9) as printed, ``N(0, (μ²+1)σ²)``; ``None`` adds none.
    ``observe(scores={name: [B, C] in [0, 1]}, target=multi_hot)`` — with the modality-separated decision
    unit's pure unimodal scores (eq. 11) — or ``observe(logits=..., target=...)``.

    Args:
        modalities: name → encoder (``nn.Module`` or parameters), two or more.
        alpha: ``α ≥ 0``, the paper's γ; published default 0.1 (``gamma=`` is its old name).
        noise, apply, backend, param_filter, ignore_index, **options: as `gradmod.OGM`.
    """

    def __init__(
        self,
        modalities: Mapping[str, Modality],
        alpha: float = DEFAULT_ALPHA,
        *,
        noise: str | None = "restore",
        apply: str | Applier = "params",
        backend: str = DEFAULT_BACKEND,
        param_filter: ParamFilter | None = None,
        ignore_index: int | None = IGNORE_INDEX,
        **options: Any,
    ) -> None:
        gamma = renamed_keyword(options, "gamma", "alpha", "DGM")
        if gamma is not NOT_GIVEN:
            if alpha != DEFAULT_ALPHA:
                raise TypeError("DGM got alpha= and its old name gamma=: pass alpha= only")
            alpha = gamma
        applier = preset_applier(apply, noise, backend, param_filter)
        super().__init__(modalities, measure=DGMScore(ignore_index), policy=OGMPolicy(alpha), apply=applier, **options)


METHODS = (
    MethodInfo(
        key="dgm",
        preset=DGM,
        title="DGM",
        kind="modulator",
        paper="Fu, Gao & Xu, Multimodal Imbalance-Aware Gradient Modulation for Weakly-supervised Audio-Visual Video Parsing",
        page="methods/dgm.md",
        observes="unimodal scores or logits + target",
        cost="scale every modulated gradient and add the restoring noise",
        fit=Fit(head="decoupled", acts_on="gradient scale", multilabel=True),
        strength=Strength("alpha", DEFAULT_ALPHA, "α (the paper's γ) of μ = 1 − tanh(α·ω) for a modality whose ω exceeds 1"),
    ),
)
