"""The equations several methods share, as pure tensor functions: scores, ratios, coefficients, noise scales.

Every function is stateless and differentiable-free (inputs are detached where it matters); the
`gradmod.Modulator` and the methods of `gradmod.methods` compose them. A method's own equations live beside
it (`gradmod.methods.dgm.dgm_evidence`, `gradmod.methods.pdmp.pdmp_coefficients`, …). The papers (full
references on the docs' references page):

* **OGM-GE** — Peng et al., *Balanced Multimodal Learning via On-the-fly Gradient Modulation*, CVPR 2022:
  the score, the ratio and the coefficient that OGM, OGM-GE, DGM, the decoupling-free method and PDMP share.
* **Shapley values** of coalition outputs (Shapley, *A Value for n-Person Games*, 1953), which AGM (Li et al.,
  *Boosting Multi-modal Model Performance with Adaptive Gradient Modulation*, ICCV 2023), modality valuation
  and `gradmod.diagnose` compute over subsets of modalities.
* **DGM** — Fu, Gao & Xu, *Multimodal Imbalance-Aware Gradient Modulation for Weakly-supervised
  Audio-Visual Video Parsing*: the restoring noise of eq. (9) (`noise_scale`).

M > 2 modalities: every "ratio of this modality to the other" becomes the ratio of this modality's
evidence to the mean evidence of the others, `discrepancy_ratios`; for M = 2 it is exactly the
paper's two-modality ratio.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from gradmod._internal import (
    STD_EPS,
    check_count,
    check_logits_target,
    constants,
    real_scalar,
    stack_evidence,
    std_eps,
    unstack_evidence,
    wide_dtype,
)

__all__ = [
    "NOISE_KINDS",
    "coalitions",
    "decouple_linear",
    "discrepancy_ratios",
    "ge_noise_std",
    "noise_scale",
    "ogm_coefficients",
    "ogm_coefficients_of",
    "ogm_scores",
    "ratios_of",
    "shapley_values",
    "tanh_damping",
]

#: ``nll_loss``'s ignore index when no target is to be ignored (no class index is this negative).
_NEVER_A_CLASS = -(2**63)

#: The GE noise kinds: ``"ge"`` (OGM-GE, ε ~ N(0, σ²)), ``"restore"`` (DGM, total variance restored to σ²),
#: ``"paper"`` (DGM eq. (9) as printed, ε ~ N(0, (μ²+1)σ²)).
NOISE_KINDS = ("ge", "restore", "paper")


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
    check_count(features, "decouple_linear", minimum=1)
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


def discrepancy_ratios(evidence: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Discrepancy ratio of each modality: ``ρ_u = e_u / mean_{v≠u} e_v``.

    For two modalities this is OGM-GE's ``s_a / s_v`` (and DGM's ω, eq. (6), when the evidence is DGM
    evidence). A zero denominator gives ``+inf`` (handled by the policies, never NaN).
    """
    check_count(evidence, "discrepancy_ratios")
    e, out_dtype = stack_evidence(evidence)
    return unstack_evidence(list(evidence), ratios_of(e), out_dtype)


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
    check_count(evidence, "ogm_coefficients")
    e, out_dtype = stack_evidence(evidence)
    return unstack_evidence(list(evidence), ogm_coefficients_of(e, alpha), out_dtype)


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


def coalitions(names: Sequence[str]) -> list[frozenset[str]]:
    """Every subset of ``names``, the empty one first, by size and then in the order of ``names``."""
    names = list(names)
    return [frozenset(subset) for size in range(len(names) + 1) for subset in itertools.combinations(names, size)]



def shapley_values(outputs: Mapping[frozenset[str], Tensor], names: Sequence[str]) -> dict[str, Tensor]:
    """The Shapley value of each modality for the coalition outputs ``f(S)`` (one tensor per subset ``S``):

    ``φ_m = Σ_{S ⊆ N∖{m}} |S|! (M − |S| − 1)! / M! · (f(S ∪ {m}) − f(S))``.

    They add up to ``f(N) − f(∅)`` (efficiency), a modality that changes no output gets 0, and an additive
    ``f(S) = b + Σ_{m ∈ S} g_m`` gives ``φ_m = g_m``. ``outputs`` must hold all ``2^M`` subsets (pass zeros
    for ``∅`` to get the official responses ``φ_m + f(∅)/M``). Differentiable.
    """
    names = list(names)
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"shapley_values needs two or more distinct modality names, got {names}")
    missing = [sorted(subset) for subset in coalitions(names) if subset not in outputs]
    if missing:
        raise ValueError(f"coalition outputs are missing for the subsets {missing} of {names}")
    m = len(names)
    values = {}
    for name in names:
        others = [other for other in names if other != name]
        terms = []
        for size in range(m):
            weight = math.factorial(size) * math.factorial(m - size - 1) / math.factorial(m)
            for subset in itertools.combinations(others, size):
                present = frozenset(subset)
                terms.append(weight * (outputs[present | {name}] - outputs[present]))
        values[name] = torch.stack(terms).sum(0)
    return values


def __getattr__(name: str):  # names that moved to their method's module (gradmod._deprecated)
    from gradmod._deprecated import moved_attribute

    return moved_attribute(__name__, name)
