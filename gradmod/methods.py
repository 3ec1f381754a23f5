"""Method presets: each a named composition of measure, policy and apply mode over `Modulator`.

| preset | measure (``observe`` inputs) | policy | noise |
| --- | --- | --- | --- |
| `OGM` | softmax score of decoupled logits | ``1 − tanh(α·ρ)`` if ``ρ > 1`` | none |
| `OGMGE` | same | same | GE: ``N(0, σ(g)²)`` on every modality |
| `DGM` | paper 003 eq. (6) (scores + Δs̄) | eq. (7) ``1 − tanh(γ·ω)`` | eq. (9): ``"restore"`` |
| `DecouplingFree` | fusion gate ζ, paper 002 eq. (11) | OGM-GE's | GE |
| `PDMP` | softmax score (or static metrics) | gradmod's reading of paper 000 | none |
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gradmod.measures import DGMScore, SoftmaxScore, StaticMetrics, ZetaGate
from gradmod.modulator import Modality, Modulator
from gradmod.policies import PDMPPolicy, TanhDamping

__all__ = ["OGM", "OGMGE", "DGM", "DecouplingFree", "PDMP"]


def OGM(modalities: Mapping[str, Modality], alpha: float, **options: Any) -> Modulator:
    """On-the-fly gradient modulation (Peng et al., CVPR 2022), without GE noise.

    ``k_u = 1 − tanh(α·ρ_u)`` for ``ρ_u = s_u / mean_{v≠u} s_v > 1``, else 1; ``s_u = Σ_i softmax(z_u,i)[y_i]``.
    ``observe(logits={name: decoupled logits}, target=labels)``. ``alpha`` has no default, as in the
    official script (``--alpha`` is required). ``options`` go to `Modulator`.
    """
    return Modulator(modalities, measure=SoftmaxScore(), policy=TanhDamping(alpha), **options)


def OGMGE(modalities: Mapping[str, Modality], alpha: float, noise: str | None = "ge", **options: Any) -> Modulator:
    """OGM with generalization enhancement: every modality's gradient becomes ``k_u·g + N(0, (σ(g)+1e-8)²)``.

    The noise std is that of the *unscaled* gradient, and noise goes to every modality on every modulated
    step (also the one with ``k = 1``), as in the official code. To match the official script exactly, add
    ``param_filter=gradmod.filters.conv_weights`` and ``start_step, stop_step = epoch_window(0, 50, steps)``.
    """
    return Modulator(modalities, measure=SoftmaxScore(), policy=TanhDamping(alpha), noise=noise, **options)


def DGM(
    modalities: Mapping[str, Modality], gamma: float = 0.1, noise: str | None = "restore", **options: Any
) -> Modulator:
    """Dynamic gradient modulation, DGM (paper 003).

    Evidence ``e_u = Σ_n Σ_c s^u_n[c]·Y_n[c] + Σ_n Δs̄^u_n`` (eq. 6), ``μ_u = 1 − tanh(γ·ω_u)`` for
    ``ω_u = e_u / mean_{v≠u} e_v > 1`` (eq. 7), update ``μ·g + ε`` (eq. 9). ``noise="restore"`` (default)
    draws ``ε ~ N(0, (1−μ²)σ²)`` so the total variance is the unmodulated ``σ²`` — the stated intent of
    eq. (9); ``noise="paper"`` draws eq. (9) as printed, ``N(0, (μ²+1)σ²)``; ``None`` adds none.
    ``observe(scores={name: [B, C] in [0, 1]}, target=multi_hot)`` — with the MSDU's pure unimodal scores
    (eq. 11) — or ``observe(logits=..., target=...)``. Published default ``γ = 0.1``.
    """
    return Modulator(modalities, measure=DGMScore(), policy=TanhDamping(gamma), noise=noise, **options)


def DecouplingFree(
    modalities: Mapping[str, Modality], alpha: float, noise: str | None = "ge", **options: Any
) -> Modulator:
    """Decoupling-free OGM-GE (paper 002, sec. 2.3): the ratio comes from the fusion gate ζ, not decoupled logits.

    ``ρ_1 = Σ_i ζ_i / Σ_i (1 − ζ_i)``, ``ρ_2 = 1/ρ_1`` (eq. 11), then OGM-GE's coefficient and noise.
    ``observe(zeta=fusion.zeta)`` — ζ weights the first modality (``U = ζX₁ + (1−ζ)X₂``, eq. 4); for
    M > 2 modalities pass ``{name: gate}`` with gates summing to one. Works with heads that cannot be split
    per modality (gated sum, FiLM with ζ: `gradmod.fusion`).
    """
    return Modulator(modalities, measure=ZetaGate(), policy=TanhDamping(alpha), noise=noise, **options)


def PDMP(
    modalities: Mapping[str, Modality],
    ranking: Sequence[str],
    gamma_p: float,
    gamma_r: float,
    static_metrics: Mapping[str, float] | None = None,
    **options: Any,
) -> Modulator:
    """Performance-dominant modality prioritization — **gradmod's reading** of paper 000 (no equations published).

    ``ranking`` (best first, from `gradmod.rank_modalities` over independently trained unimodal
    models) fixes the dominant modality ``d``. Per step, with batch evidence ``e`` (softmax scores):
    ``k_d = 1 + γp·tanh(max(max_{u≠d} e_u/e_d − 1, 0))`` and ``k_u = 1 − tanh(γr·e_u/e_d)``.
    With ``static_metrics`` (the unimodal metrics), the evidence is those metrics: fixed coefficients, no
    ``observe()`` needed. The ranking is saved in the modulator's ``state_dict``.
    """
    measure = SoftmaxScore() if static_metrics is None else StaticMetrics(static_metrics)
    policy = PDMPPolicy(ranking, gamma_p, gamma_r)
    if sorted(policy.ranking) != sorted(modalities):
        raise ValueError(f"ranking {list(policy.ranking)} must name exactly the modalities {list(modalities)}")
    return Modulator(modalities, measure=measure, policy=policy, **options)
