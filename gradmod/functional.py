"""The papers' math as pure tensor functions: evidence, ratios, coefficients, noise scales.

Every function is stateless and differentiable-free (inputs are detached where it matters); the
`gradmod.Modulator` composes them. Paper files are those in ``shared/papers``:

* OGM-GE — Peng et al., CVPR 2022 (summarised in ``papers/README.md``).
* ``000`` PDMP, ``001`` MM / B-MM, ``002`` SimAM² + decoupling-free ratio, ``003`` DGM + MSDU.

M > 2 modalities: every "ratio of this modality to the other" becomes the ratio of this modality's
evidence to the mean evidence of the others, `discrepancy_ratios`; for M = 2 it is exactly the
paper's two-modality ratio.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "ogm_scores",
    "decouple_linear",
    "discrepancy_ratios",
    "tanh_damping",
    "ogm_coefficients",
    "ge_noise_std",
    "noise_scale",
    "dgm_evidence",
    "dgm_coefficients",
    "zeta_evidence",
    "zeta_ratios",
    "rank_modalities",
    "pdmp_coefficients",
    "imbalance_factor",
    "bmm_strength",
    "NOISE_KINDS",
]

#: The GE noise kinds: ``"ge"`` (OGM-GE, ε ~ N(0, σ²)), ``"restore"`` (DGM, total variance restored to σ²),
#: ``"paper"`` (DGM eq. (9) as printed, ε ~ N(0, (μ²+1)σ²)).
NOISE_KINDS = ("ge", "restore", "paper")

_STD_EPS = 1e-8


def _check_names(mapping: Mapping[str, object], what: str, minimum: int = 2) -> None:
    if len(mapping) < minimum:
        raise ValueError(f"{what} needs at least {minimum} modalities, got {list(mapping)}")


def _check_logits_target(logits: Tensor, target: Tensor, name: str = "logits") -> None:
    if logits.dim() != 2:
        raise ValueError(f"{name} must be [batch, classes], got shape {tuple(logits.shape)}")
    if target.dim() != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(
            f"target must be [batch] class indices matching {name} batch {logits.shape[0]}, "
            f"got shape {tuple(target.shape)}"
        )
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")


def ogm_scores(logits: Tensor, target: Tensor) -> Tensor:
    """OGM score of one modality on a batch: ``s = Σ_i softmax(logits_i)[y_i]`` (OGM-GE, Peng et al. 2022).

    Args:
        logits: ``[B, C]`` decoupled logits of one modality.
        target: ``[B]`` integer class indices.

    Returns:
        0-d float tensor (float32 or wider) on ``logits.device``; no host synchronisation.
    """
    _check_logits_target(logits, target)
    probs = torch.softmax(logits.detach().float(), dim=1)
    return probs.gather(1, target.long().unsqueeze(1)).sum()


def decouple_linear(weight: Tensor, bias: Tensor | None, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Per-modality logits of a linear head over concatenated features (OGM-GE, official ``train_epoch``).

    ``logits_u = f_u · W[:, block_u]ᵀ + b / M`` with the column blocks taken in the mapping's order, so that
    ``Σ_u logits_u`` equals the full head's ``concat(f) · Wᵀ + b``. (For a *sum* head, whose branches are
    separate linear layers, use each branch's own layer with its full bias instead: see ``papers/README.md``.)
    """
    _check_names(features, "decouple_linear", minimum=1)
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
    dtype = torch.float32 if values[0].device.type == "mps" else torch.float64
    return torch.stack([v.to(dtype) for v in values]), out_dtype


def _unstack(names: Sequence[str], values: Tensor, dtype: torch.dtype) -> dict[str, Tensor]:
    return dict(zip(names, values.to(dtype).unbind(0)))


def discrepancy_ratios(evidence: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Discrepancy ratio of each modality: ``ρ_u = e_u / mean_{v≠u} e_v``.

    For two modalities this is OGM-GE's ``s_a / s_v`` (and DGM's ω, paper 003 eq. (6), when the
    evidence is DGM evidence). A zero denominator gives ``+inf`` (handled by the policies, never NaN).
    """
    _check_names(evidence, "discrepancy_ratios")
    e, out_dtype = _stack(evidence)
    m = e.numel()
    not_self = 1.0 - torch.eye(m, dtype=e.dtype, device=e.device)
    others = (not_self @ e) / (m - 1)  # Σ_{v≠u} e_v without the cancellation of (Σ e) − e_u
    return _unstack(list(evidence), e / others, out_dtype)


def tanh_damping(ratio: Tensor, strength: float) -> Tensor:
    """``k = 1 − tanh(strength·ρ)`` where ``ρ > 1``, else ``1``: OGM-GE's coefficient, DGM eq. (7).

    The result lies in ``[0, 1]``; it is ``0`` only in the limit ``ρ → ∞`` (a ratio of ``inf``).
    """
    ratio = torch.nan_to_num(ratio, nan=1.0)
    damped = 1.0 - torch.tanh(strength * ratio.clamp_min(0.0))
    return torch.where(ratio > 1.0, damped, torch.ones_like(damped))


def _check_strength(value: float, name: str) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _damp_stronger(evidence: Mapping[str, Tensor], strength: float, name: str) -> dict[str, Tensor]:
    _check_strength(strength, name)
    return {modality: tanh_damping(r, strength) for modality, r in discrepancy_ratios(evidence).items()}


def ogm_coefficients(evidence: Mapping[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """OGM coefficients: ``k_u = 1 − tanh(α·ρ_u)`` if ``ρ_u > 1`` else ``1`` (Peng et al. 2022).

    ``ρ_u`` from `discrepancy_ratios`. At most one modality of two is damped; with M > 2 every
    modality stronger than the mean of the others is damped.
    """
    return _damp_stronger(evidence, alpha, "alpha")


def ge_noise_std(grad: Tensor) -> Tensor:
    """GE noise scale of one gradient tensor: ``σ(g) + 1e-8``, the unbiased std of its elements.

    As in the official OGM-GE code (``grad.std() + 1e-8``, of the *unscaled* gradient). A one-element
    tensor has no spread: its σ is defined as 0 (torch would give NaN). Computed in float32 or wider.
    """
    if grad.numel() <= 1:
        return torch.full((), _STD_EPS, dtype=torch.float32, device=grad.device)
    g = grad.detach()
    if g.dtype not in (torch.float32, torch.float64):
        g = g.float()
    return g.std() + _STD_EPS


def noise_scale(kind: str | None, coefficient: Tensor) -> Tensor | None:
    """Factor ``c`` in ``ε ~ N(0, (c·σ(g))²)`` for a modality whose gradient is scaled by ``k``.

    * ``"ge"`` — OGM-GE: ``c = 1`` on every modulated modality, whatever its ``k``.
    * ``"restore"`` — DGM's intent (paper 003, text before eq. (9)): the scaled gradient lost variance
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


def dgm_evidence(scores: Tensor, target: Tensor) -> Tensor:
    """DGM evidence of one modality on a batch (paper 003, eq. (6), numerator or denominator):

    ``e = Σ_n Σ_c s_n[c]·Y_n[c] + Σ_n Δs̄_n``,  ``Δs̄_n = mean_{c: Y=1} s_n[c] − mean_{c: Y=0} s_n[c]``.

    Args:
        scores: ``[B, C]`` confidence scores in ``[0, 1]`` (sigmoid outputs for multi-label; softmax
            probabilities for the single-label form).
        target: ``[B, C]`` multi-hot labels, or ``[B]`` class indices (single-label form: one-hot).

    A sample with no correct class (all-zero row) or no wrong class (all-one row) has no discrepancy:
    its missing mean counts as 0, so ``Δs̄ = mean_correct`` (no wrong class) or ``−mean_wrong``
    (no correct class). Returns a 0-d float tensor; no host synchronisation.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [batch, classes], got shape {tuple(scores.shape)}")
    s = scores.detach().float()
    if target.dim() == 1:
        _check_logits_target(s, target, name="scores")
        y = torch.zeros_like(s).scatter_(1, target.long().unsqueeze(1), 1.0)
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


def dgm_coefficients(evidence: Mapping[str, Tensor], gamma: float = 0.1) -> dict[str, Tensor]:
    """DGM balance coefficients (paper 003, eq. (7)): ``μ_u = 1 − tanh(γ·ω_u)`` if ``ω_u > 1`` else ``1``.

    ``ω_u`` is the eq. (6) ratio of DGM evidences (`dgm_evidence`), generalised to M modalities by
    `discrepancy_ratios`. Published default ``γ = 0.1``.
    """
    return _damp_stronger(evidence, gamma, "gamma")


def zeta_evidence(zeta: Tensor | Mapping[str, Tensor], names: Sequence[str]) -> dict[str, Tensor]:
    """Evidence from a fusion gate ζ (paper 002, eq. (11)): ``e_1 = Σ_i ζ_i``, ``e_2 = Σ_i (1 − ζ_i)``.

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
        z = zeta.detach().float()
        if z.numel() == 0:
            raise ValueError("zeta is empty")
        return {names[0]: z.sum(), names[1]: (1.0 - z).sum()}
    missing = set(names) - set(zeta)
    unknown = set(zeta) - set(names)
    if missing or unknown:
        raise ValueError(f"zeta gates must be named {list(names)}; missing {sorted(missing)}, unknown {sorted(unknown)}")
    return {name: zeta[name].detach().float().sum() for name in names}


def zeta_ratios(zeta: Tensor) -> tuple[Tensor, Tensor]:
    """Decoupling-free discrepancy ratios (paper 002, eq. (11)): ``ρ₁ = Σζ / Σ(1−ζ)`` and ``ρ₂ = 1/ρ₁``."""
    e = zeta_evidence(zeta, ("first", "second"))
    ratios = discrepancy_ratios(e)
    return ratios["first"], ratios["second"]


def rank_modalities(metrics: Mapping[str, float]) -> tuple[str, ...]:
    """Rank modalities by a unimodal performance metric, best first (PDMP stage 1, paper 000).

    Higher is better (accuracy, macro-F1, …). Ties cannot be ranked and raise ``ValueError``.
    """
    _check_names(metrics, "rank_modalities")
    values = {}
    for name, value in metrics.items():
        v = float(value)
        if not math.isfinite(v):
            raise ValueError(f"metric of modality {name!r} is not finite: {value!r}")
        values[name] = v
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
    """PDMP coefficients — **gradmod's reading** (paper 000 gives no equations; see ``papers/README.md``).

    With ``d = ranking[0]`` the performance-dominant modality:

    * ``k_d = 1 + γp · tanh(max(max_{u≠d} e_u/e_d − 1, 0))`` — never damped, boosted (boundedly, by at
      most ``γp``) only when another modality overtakes it on the batch evidence;
    * ``k_u = 1 − tanh(γr · e_u / e_d)`` for every other ``u`` — damped as it approaches ``d``.

    Hence ``k_d ≥ 1 ≥ k_u > 0`` for finite evidence. Non-positive ``e_d`` gives ``e_u/e_d = inf``: the
    others get ``k_u = 0`` and ``k_d = 1 + γp``.
    """
    _check_strength(gamma_p, "gamma_p")
    _check_strength(gamma_r, "gamma_r")
    names = list(evidence)
    if sorted(ranking) != sorted(names):
        raise ValueError(f"ranking {list(ranking)} must name exactly the modalities {names}")
    e, out_dtype = _stack(evidence)
    d = names.index(ranking[0])
    rel = e / e[d]
    rel = torch.where(e[d] > 0, rel, torch.full_like(rel, math.inf))
    rel = torch.nan_to_num(rel, nan=math.inf)
    others = torch.cat([rel[:d], rel[d + 1 :]])
    boost = 1.0 + gamma_p * torch.tanh((others.max() - 1.0).clamp_min(0.0))
    damped = 1.0 - torch.tanh(gamma_r * rel)
    k = torch.where(torch.arange(len(names), device=e.device) == d, boost, damped)
    return _unstack(names, k, out_dtype)


def imbalance_factor(unimodal_accuracy: Mapping[str, float]) -> dict[str, float]:
    """B-MM imbalance factor after an epoch (paper 001, eqs. (5)–(6), after Peng et al. 2022).

    ``κ_u = acc_u / mean_{v≠u} acc_v``, each ``acc_u`` the training-set accuracy with every other modality
    masked to zero. For two modalities ``κ_a = acc_a / acc_v`` and ``κ_v = 1/κ_a``. Zero accuracy of the
    others gives ``inf``.
    """
    tensors = {n: torch.tensor(float(a), dtype=torch.float64) for n, a in unimodal_accuracy.items()}
    for name, t in tensors.items():
        if not (torch.isfinite(t) and t >= 0):
            raise ValueError(f"unimodal accuracy of {name!r} must be finite and >= 0, got {unimodal_accuracy[name]!r}")
    if all(t == 0 for t in tensors.values()):
        raise ValueError("all unimodal accuracies are zero: the imbalance factor is undefined")
    return {n: float(r) for n, r in discrepancy_ratios(tensors).items()}


def bmm_strength(kappa: float, degree: float) -> float:
    """B-MM mixing strength of the weaker modality (paper 001, eq. (7)): ``λ = tanh(β · (κ − 1))``.

    ``κ ≥ 1`` is the strong modality's imbalance factor (`imbalance_factor`), ``β = degree ≥ 0``.
    Monotone non-decreasing in ``κ``, in ``[0, 1)``, and 0 when balanced (``κ ≤ 1``).
    """
    _check_strength(degree, "degree")
    if math.isnan(kappa):
        raise ValueError("imbalance factor is NaN")
    excess = max(kappa - 1.0, 0.0)
    return 0.0 if degree == 0 or excess == 0 else math.tanh(degree * excess)
