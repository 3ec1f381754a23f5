"""The papers' math as pure tensor functions: evidence, ratios, coefficients, noise scales.

Every function is stateless and differentiable-free (inputs are detached where it matters); the
`gradmod.Modulator` composes them. The papers (full references on the docs' references page):

* **OGM-GE** — Peng et al., *Balanced Multimodal Learning via On-the-fly Gradient Modulation*, CVPR 2022.
* **DGM** — Fu, Gao & Xu, *Multimodal Imbalance-Aware Gradient Modulation for Weakly-supervised
  Audio-Visual Video Parsing* (the DGM evidence, eq. (6); coefficient, eq. (7); noise, eq. (9)).
* **SimAM²** — Sun et al., *More than Vanilla Fusion: a Simple, Decoupling-free, Attention Module for
  Multimodal Fusion Based on Signal Theory*, ICASSP 2024 (the decoupling-free ratio, eq. (11)).
* **PDMP** — *PDMP: Rethinking Balanced Multimodal Learning via Performance-Dominant Modality
  Prioritization*, arXiv:2604.05773 (no equations published: gradmod's reading).
* **B-MM** — Ma, Ding & Chen, *Mixup Helps Understanding Multimodal Video Better*, 2025 (eqs. (5)–(7)).

M > 2 modalities: every "ratio of this modality to the other" becomes the ratio of this modality's
evidence to the mean evidence of the others, `discrepancy_ratios`; for M = 2 it is exactly the
paper's two-modality ratio.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from gradmod._internal import STD_EPS, check_logits_target, check_names, constants, real_scalar, std_eps, wide_dtype

__all__ = [
    "ogm_scores",
    "decouple_linear",
    "discrepancy_ratios",
    "ratios_of",
    "tanh_damping",
    "ogm_coefficients",
    "ogm_coefficients_of",
    "ge_noise_std",
    "noise_scale",
    "dgm_evidence",
    "zeta_evidence",
    "zeta_ratios",
    "rank_modalities",
    "pdmp_coefficients",
    "pdmp_coefficients_of",
    "imbalance_factor",
    "bmm_strength",
    "NOISE_KINDS",
]

#: ``nll_loss``'s ignore index when no target is to be ignored (no class index is this negative).
_NEVER_A_CLASS = -(2**63)

#: The GE noise kinds: ``"ge"`` (OGM-GE, ε ~ N(0, σ²)), ``"restore"`` (DGM, total variance restored to σ²),
#: ``"paper"`` (DGM eq. (9) as printed, ε ~ N(0, (μ²+1)σ²)).
NOISE_KINDS = ("ge", "restore", "paper")


def _check_count(mapping: Mapping[str, object], what: str, minimum: int = 2) -> None:
    if len(mapping) < minimum:
        raise ValueError(f"{what} needs at least {minimum} modalities, got {list(mapping)}")


def ogm_scores(logits: Tensor, target: Tensor, ignore_index: int | None = -100) -> Tensor:
    """OGM score of one modality on a batch: ``s = Σ_i softmax(logits_i)[y_i]`` (OGM-GE, Peng et al. 2022).

    Args:
        logits: ``[B, C]`` decoupled logits of one modality.
        target: ``[B]`` integer class indices.
        ignore_index: samples whose target equals it add nothing (−100, as in ``cross_entropy``); ``None``:
            every sample counts.

    Returns:
        0-d float tensor (float32 or wider) on ``logits.device``; 0 for an empty batch. Two device operations
        for float32 logits (the softmax, and ``nll_loss`` with weights −1 summing the true-class
        probabilities), no host synchronisation.
    """
    check_logits_target(logits, target)
    probs = torch.softmax(logits.detach().float() if logits.dtype != torch.float64 else logits.detach(), dim=1)
    minus_one = constants(logits.shape[1], logits.device, probs.dtype)[3]
    ignored = _NEVER_A_CLASS if ignore_index is None else ignore_index
    return torch.nn.functional.nll_loss(probs, target.long(), weight=minus_one, ignore_index=ignored, reduction="sum")


def decouple_linear(weight: Tensor, bias: Tensor | None, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Per-modality logits of a linear head over concatenated features (OGM-GE, official ``train_epoch``).

    ``logits_u = f_u · W[:, block_u]ᵀ + b / M`` with the column blocks taken in the mapping's order, so that
    ``Σ_u logits_u`` equals the full head's ``concat(f) · Wᵀ + b``. (For a *sum* head, whose branches are
    separate linear layers, use each branch's own layer with its full bias instead, as the official
    OGM-GE training loop does.)
    """
    _check_count(features, "decouple_linear", minimum=1)
    widths = {name: f.shape[-1] for name, f in features.items()}
    if sum(widths.values()) != weight.shape[1]:
        raise ValueError(
            f"feature widths {widths} add up to {sum(widths.values())}, but the head's weight has "
            f"{weight.shape[1]} input columns"
        )
    share = None if bias is None else bias / len(features)
    logits: dict[str, Tensor] = {}
    start = 0
    for name, feature in features.items():
        block = weight[:, start : start + widths[name]]
        start += widths[name]
        dtype = torch.promote_types(feature.dtype, weight.dtype)  # e.g. fp16 features outside autocast
        product = feature.to(dtype) @ block.to(dtype).T
        logits[name] = product if share is None else product + share.to(dtype)
    return logits


def _stack(evidence: Mapping[str, Tensor]) -> tuple[Tensor, torch.dtype]:
    """Evidence as one ``[M]`` float64 tensor (float32 on MPS, which has no float64), and the dtype to return.

    Sums of a few float32 values are exact in float64, so equal evidence gives ratios of exactly 1 — the
    policies jump at ``ρ = 1``, where a rounding error of one ulp would otherwise damp a balanced modality.
    Results are returned in the evidence's dtype promoted to at least float32.
    """
    values = [torch.as_tensor(e).detach().reshape(()) for e in evidence.values()]
    out_dtype = torch.promote_types(torch.float32, torch.result_type(torch.stack(values), 1.0))
    return torch.stack([v.to(wide_dtype(values[0].device)) for v in values]), out_dtype


def _unstack(names: Sequence[str], values: Tensor, dtype: torch.dtype) -> dict[str, Tensor]:
    return dict(zip(names, values.to(dtype).unbind(0)))


def discrepancy_ratios(evidence: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Discrepancy ratio of each modality: ``ρ_u = e_u / mean_{v≠u} e_v``.

    For two modalities this is OGM-GE's ``s_a / s_v`` (and DGM's ω, eq. (6), when the evidence is DGM
    evidence). A zero denominator gives ``+inf`` (handled by the policies, never NaN).
    """
    _check_count(evidence, "discrepancy_ratios")
    e, out_dtype = _stack(evidence)
    return _unstack(list(evidence), ratios_of(e), out_dtype)


def ratios_of(evidence: Tensor) -> Tensor:
    """`discrepancy_ratios` of stacked evidence ``[..., M]`` (M ≥ 2 along the last axis), same dtype.

    ``ρ_u = (M − 1)·e_u / Σ_{v≠u} e_v``: the sum of the others is a matrix product with ``1 − I`` (no
    cancellation of ``(Σ e) − e_u``), and for equal evidence numerator and denominator are the same exact
    value, so the ratio is exactly 1 (the policies jump at ``ρ = 1``).
    """
    m = evidence.shape[-1]
    if m > 2:  # sums of float32 evidence are exact in float64 (two modalities need no sum)
        evidence = evidence.to(wide_dtype(evidence.device))
    others = evidence @ constants(m, evidence.device, evidence.dtype)[0]
    return (evidence if m == 2 else evidence * (m - 1)) / others


def tanh_damping(ratio: Tensor, strength: float) -> Tensor:
    """``k = 1 − tanh(strength·ρ)`` where ``ρ > 1``, else ``1``: OGM-GE's coefficient and DGM's eq. (7).

    The result lies in ``[0, 1]``; it is ``0`` only in the limit ``ρ → ∞`` (a ratio of ``inf``), and ``1``
    for a ``NaN`` ratio (zero evidence everywhere) or ``strength = 0``.
    """
    if strength == 0:
        return torch.ones_like(ratio)
    zero = constants(1, ratio.device, ratio.dtype)[1][0]
    return 1.0 - torch.tanh(torch.where(ratio > 1.0, ratio * strength, zero))


def ogm_coefficients(evidence: Mapping[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """OGM coefficients: ``k_u = 1 − tanh(α·ρ_u)`` if ``ρ_u > 1`` else ``1`` (Peng et al. 2022).

    ``ρ_u`` from `discrepancy_ratios`. At most one modality of two is damped; with M > 2 every
    modality stronger than the mean of the others is damped. DGM's balance coefficient (Fu, Gao & Xu,
    eq. (7), ``μ_u = 1 − tanh(γ·ω_u)`` for ``ω_u > 1``) is the same function of its own evidence
    (`dgm_evidence`) with ``γ`` in place of ``α``; its published default is ``γ = 0.1``.
    """
    alpha = real_scalar(alpha, "alpha")
    _check_count(evidence, "ogm_coefficients")
    e, out_dtype = _stack(evidence)
    return _unstack(list(evidence), ogm_coefficients_of(e, alpha), out_dtype)


def ogm_coefficients_of(evidence: Tensor, alpha: float) -> Tensor:
    """`ogm_coefficients` of stacked evidence ``[M]`` (in its dtype; float64 for M > 2).

    ``ρ = e / mean_others(e)`` (`ratios_of`) and `tanh_damping`: seven device operations, no host
    synchronisation.
    """
    return tanh_damping(ratios_of(evidence), alpha)


def ge_noise_std(grad: Tensor) -> Tensor:
    """GE noise scale of one gradient tensor: ``σ(g) + 1e-8``, the unbiased std of its elements.

    As in the official OGM-GE code (``grad.std() + 1e-8``, of the *unscaled* gradient). A one-element
    tensor has no spread: its σ is defined as 0 (torch would give NaN). Computed in float32 or wider.
    """
    if grad.numel() <= 1:
        return torch.full((), STD_EPS, dtype=torch.float32, device=grad.device)
    g = grad.detach()
    if g.dtype not in (torch.float32, torch.float64):
        g = g.float()
    return torch.add(g.std(), std_eps(g.device, g.dtype))


def noise_scale(kind: str | None, coefficient: Tensor) -> Tensor | None:
    """Factor ``c`` in ``ε ~ N(0, (c·σ(g))²)`` for a modality whose gradient is scaled by ``k``.

    * ``"ge"`` — OGM-GE: ``c = 1`` on every modulated modality, whatever its ``k``.
    * ``"restore"`` — DGM's intent (Fu, Gao & Xu, text before eq. (9)): the scaled gradient lost variance
      ``(1 − μ²)σ²``; noise of exactly that variance restores it, ``c = √(1 − μ²)`` (needs ``μ ≤ 1``).
    * ``"paper"`` — DGM eq. (9) as printed: ``ε ~ N(0, (μ² + 1)σ²)``, ``c = √(μ² + 1)``.
    * ``None`` — no noise.
    """
    if kind is None:
        return None
    k = torch.as_tensor(coefficient).float()
    if kind == "ge":
        return torch.ones_like(k)
    if kind == "restore":
        return torch.sqrt((1.0 - k * k).clamp_min(0.0))
    if kind == "paper":
        return torch.sqrt(k * k + 1.0)
    raise ValueError(f"unknown noise kind {kind!r}; expected one of {NOISE_KINDS} or None")


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


def zeta_evidence(zeta: Tensor | Mapping[str, Tensor], names: Sequence[str]) -> dict[str, Tensor]:
    """Evidence from a fusion gate ζ (SimAM², eq. (11)): ``e_1 = Σ_i ζ_i``, ``e_2 = Σ_i (1 − ζ_i)``.

    ``zeta`` is a tensor (two modalities: the weight of ``names[0]`` in ``U = ζX₁ + (1−ζ)X₂``, eq. (4)),
    or a mapping name → gate for M ≥ 2 gates that sum to one elementwise (``e_u = Σ_i ζ_{u,i}``).
    The ratio of these evidences (`discrepancy_ratios`) is exactly eq. (11),
    ``ρ_1 = Σζ / Σ(1−ζ)``, ``ρ_2 = 1/ρ_1``.
    """
    if isinstance(zeta, Tensor):
        if len(names) != 2:
            raise ValueError(
                f"a single ζ tensor describes two modalities, but there are {len(names)} ({list(names)}): "
                "pass a mapping name -> gate instead"
            )
        z = zeta.detach().float()  # an empty ζ (empty batch) sums to zero evidence: a degenerate batch
        return {names[0]: z.sum(), names[1]: (1.0 - z).sum()}
    if not isinstance(zeta, Mapping):
        raise TypeError(f"zeta must be a tensor (two modalities) or a mapping name -> gate, got {type(zeta).__name__}")
    check_names(zeta, names, "zeta gates")
    return {name: zeta[name].detach().float().sum() for name in names}


def zeta_ratios(zeta: Tensor) -> tuple[Tensor, Tensor]:
    """Decoupling-free discrepancy ratios (SimAM², eq. (11)): ``ρ₁ = Σζ / Σ(1−ζ)`` and ``ρ₂ = 1/ρ₁``."""
    e = zeta_evidence(zeta, ("first", "second"))
    ratios = discrepancy_ratios(e)
    return ratios["first"], ratios["second"]


def rank_modalities(metrics: Mapping[str, float]) -> tuple[str, ...]:
    """Rank modalities by a unimodal performance metric, best first (PDMP's first stage).

    Higher is better (accuracy, macro-F1, …). Ties cannot be ranked and raise ``ValueError``.
    """
    _check_count(metrics, "rank_modalities")
    values = {name: real_scalar(value, f"metric of modality {name!r}", minimum=-math.inf) for name, value in metrics.items()}
    ordered = sorted(values, key=values.__getitem__, reverse=True)
    for better, worse in zip(ordered, ordered[1:]):
        if values[better] == values[worse]:
            raise ValueError(
                f"modalities {better!r} and {worse!r} tie at {values[better]}: PDMP needs a strict ranking"
            )
    return tuple(ordered)


def pdmp_coefficients(
    evidence: Mapping[str, Tensor], ranking: Sequence[str], gamma_p: float, gamma_r: float
) -> dict[str, Tensor]:
    """PDMP coefficients — **gradmod's reading** (the PDMP paper publishes no equations).

    With ``d = ranking[0]`` the performance-dominant modality:

    * ``k_d = 1 + γp · tanh(max(max_{u≠d} e_u/e_d − 1, 0))`` — never damped, boosted (boundedly, by at
      most ``γp``) only when another modality overtakes it on the batch evidence;
    * ``k_u = 1 − tanh(γr · e_u / e_d)`` for every other ``u`` — damped as it approaches ``d``.

    Hence ``k_d ≥ 1 ≥ k_u > 0`` for finite evidence. Non-positive ``e_d`` gives ``e_u/e_d = inf``: the
    others get ``k_u = 0`` and ``k_d = 1 + γp``.
    """
    gamma_p = real_scalar(gamma_p, "gamma_p")
    gamma_r = real_scalar(gamma_r, "gamma_r")
    names = list(evidence)
    check_names(ranking, names, "ranking")
    e, out_dtype = _stack(evidence)
    return _unstack(names, pdmp_coefficients_of(e, names.index(ranking[0]), gamma_p, gamma_r), out_dtype)


def pdmp_coefficients_of(evidence: Tensor, dominant: int, gamma_p: float, gamma_r: float) -> Tensor:
    """`pdmp_coefficients` of stacked evidence ``[M]``, the dominant modality at index ``dominant``."""
    e, d = evidence, dominant
    rel = e / e[d]
    rel = torch.where(e[d] > 0, rel, torch.full_like(rel, math.inf))
    rel = torch.nan_to_num(rel, nan=math.inf)
    others = torch.cat([rel[:d], rel[d + 1 :]])
    boost = 1.0 + gamma_p * torch.tanh((others.max() - 1.0).clamp_min(0.0))
    damped = 1.0 - torch.tanh(gamma_r * rel)
    return torch.where(torch.arange(e.numel(), device=e.device) == d, boost, damped)


def imbalance_factor(unimodal_accuracy: Mapping[str, float]) -> dict[str, float]:
    """B-MM imbalance factor after an epoch (Ma, Ding & Chen, eqs. (5)–(6), after Peng et al. 2022).

    ``κ_u = acc_u / mean_{v≠u} acc_v``, each ``acc_u`` the training-set accuracy with every other modality
    masked to zero. For two modalities ``κ_a = acc_a / acc_v`` and ``κ_v = 1/κ_a``. Zero accuracy of the
    others gives ``inf``.
    """
    values = {n: real_scalar(a, f"unimodal accuracy of {n!r}") for n, a in unimodal_accuracy.items()}
    tensors = {n: torch.tensor(a, dtype=torch.float64) for n, a in values.items()}
    if all(a == 0 for a in values.values()):
        raise ValueError("all unimodal accuracies are zero: the imbalance factor is undefined")
    return {n: float(r) for n, r in discrepancy_ratios(tensors).items()}


def bmm_strength(kappa: float, degree: float) -> float:
    """B-MM mixing strength of the weaker modality (Ma, Ding & Chen, eq. (7)): ``λ = tanh(β · (κ − 1))``.

    ``κ ≥ 1`` is the strong modality's imbalance factor (`imbalance_factor`), ``β = degree ≥ 0``.
    Monotone non-decreasing in ``κ``, in ``[0, 1)``, and 0 when balanced (``κ ≤ 1``).
    """
    degree = real_scalar(degree, "degree")
    if math.isnan(kappa):
        raise ValueError("imbalance factor is NaN")
    excess = max(kappa - 1.0, 0.0)
    return 0.0 if degree == 0 or excess == 0 else math.tanh(degree * excess)
