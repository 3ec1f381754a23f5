"""Policies: evidence → one coefficient per modality. Thin, stateless wrappers over `gradmod.functional`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from gradmod import functional as F

__all__ = ["TanhDamping", "PDMPPolicy"]


@dataclass
class TanhDamping:
    """``k_u = 1 − tanh(strength·ρ_u)`` if ``ρ_u > 1`` else ``1``: OGM-GE (α) and DGM eq. (7) (γ)."""

    strength: float

    def __post_init__(self) -> None:
        F._check_strength(self.strength, "alpha/gamma")

    def __call__(self, evidence: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return F.ogm_coefficients(evidence, self.strength)


@dataclass
class PDMPPolicy:
    """PDMP (gradmod's reading): `gradmod.functional.pdmp_coefficients` with a fixed ranking."""

    ranking: Sequence[str]
    gamma_p: float
    gamma_r: float

    def __post_init__(self) -> None:
        self.ranking = tuple(self.ranking)
        F._check_strength(self.gamma_p, "gamma_p")
        F._check_strength(self.gamma_r, "gamma_r")

    def __call__(self, evidence: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return F.pdmp_coefficients(evidence, self.ranking, self.gamma_p, self.gamma_r)

    def state_dict(self) -> dict[str, Any]:
        return {"ranking": list(self.ranking)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.ranking = tuple(state["ranking"])
