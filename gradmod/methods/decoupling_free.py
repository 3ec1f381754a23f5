"""Decoupling-free gradient modulation: Sun et al., *More than Vanilla Fusion: a Simple, Decoupling-free,
Attention Module for Multimodal Fusion Based on Signal Theory*, ICASSP 2024, sec. 2.3.

The discrepancy ratio comes from the fusion gate ζ of ``U = ζX₁ + (1 − ζ)X₂`` (eq. 4), not from decoupled
logits: ``ρ_1 = Σ_i ζ_i / Σ_i (1 − ζ_i)``, ``ρ_2 = 1/ρ_1`` (eq. 11, `zeta_ratios`), then OGM-GE's coefficient
and noise. It works with heads that cannot be split per modality (gated sum, FiLM with ζ: `gradmod.fusion`).
M > 2 modalities: gates ``ζ_u`` summing to one elementwise, ``e_u = Σ_i ζ_{u,i}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from gradmod._internal import check_names, per_modality
from gradmod.appliers import DEFAULT_BACKEND, Applier, Modality, ParamFilter, preset_applier
from gradmod.functional import discrepancy_ratios
from gradmod.method import Fit, MethodInfo, Strength
from gradmod.methods.ogm import ALPHA
from gradmod.modulator import Modulator
from gradmod.policies import OGMPolicy
from gradmod.measures import Measure

__all__ = ["DecouplingFree", "ZetaGate", "zeta_evidence", "zeta_ratios"]


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



class ZetaGate(Measure):
    """Decoupling-free evidence from the fusion gate ζ (SimAM², eq. (11)): `zeta_evidence`.

    ``observe(zeta=ζ)``: a tensor in ``[0, 1]`` weighting the first modality (two modalities), or a mapping
    name → gate for M ≥ 2 gates summing to one. An empty ζ (empty batch) gives zero evidence.
    """

    inputs = ("zeta",)

    def evidence(self, names, zeta=None, **_):
        if zeta is None:
            raise ValueError("observe() for the decoupling-free method needs zeta= (the fusion gate)")
        return zeta_evidence(zeta, names)

    def problems(self, names, zeta=None, **_):
        gates = [zeta] if isinstance(zeta, Tensor) else list(per_modality(zeta, names, "observe(zeta=...)").values())
        bad = torch.stack([~((g.detach() >= 0) & (g.detach() <= 1)).all() for g in gates]).any()
        return {"zeta lies outside [0, 1] or is not finite": bad}



class DecouplingFree(Modulator):
    """Decoupling-free OGM-GE: the ratio comes from the fusion gate ζ, not from decoupled logits.

    ``ρ_1 = Σ_i ζ_i / Σ_i (1 − ζ_i)``, ``ρ_2 = 1/ρ_1`` (eq. 11), then OGM-GE's coefficient and noise.
    ``observe(zeta=fusion.zeta)`` — ζ weights the first modality (``U = ζX₁ + (1−ζ)X₂``, eq. 4); for
    M > 2 modalities pass ``{name: gate}`` with gates summing to one. Works with heads that cannot be split
    per modality (gated sum, FiLM with ζ: `gradmod.fusion`).

    Args:
        modalities: name → encoder, two or more.
        alpha: ``α ≥ 0`` of OGM's coefficient (no default, as OGM's).
        noise, apply, backend, param_filter, **options: as `gradmod.OGMGE`.
    """

    def __init__(
        self,
        modalities: Mapping[str, Modality],
        alpha: float,
        *,
        noise: str | None = "ge",
        apply: str | Applier = "params",
        backend: str = DEFAULT_BACKEND,
        param_filter: ParamFilter | None = None,
        **options: Any,
    ) -> None:
        applier = preset_applier(apply, noise, backend, param_filter)
        super().__init__(modalities, measure=ZetaGate(), policy=OGMPolicy(alpha), apply=applier, **options)


METHODS = (
    MethodInfo(
        key="decoupling_free",
        preset=DecouplingFree,
        title="decoupling-free",
        kind="modulator",
        paper="Sun et al., More than Vanilla Fusion: a Simple, Decoupling-free, Attention Module for Multimodal Fusion Based on Signal Theory, ICASSP 2024",
        page="methods/decoupling-free.md",
        observes="fusion gate ζ",
        cost="as OGM-GE; the gate is computed by the head anyway",
        fit=Fit(head="gate", acts_on="gradient scale"),
        strength=Strength("alpha", 0.8, ALPHA),
    ),
)
