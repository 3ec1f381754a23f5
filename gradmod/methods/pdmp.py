"""PDMP — **gradmod's reading** of *PDMP: Rethinking Balanced Multimodal Learning via Performance-Dominant Modality
Prioritization* (arXiv:2604.05773), which publishes no equations.

Two stages: (1) rank the modalities by independently trained unimodal models (`rank_modalities`), (2)
asymmetric coefficients with two hyper-parameters, γp for the performance-dominant modality ``d`` and γr for
the rest (`pdmp_coefficients`): ``k_d = 1 + γp·tanh(max(max_{u≠d} e_u/e_d − 1, 0))`` and
``k_u = 1 − tanh(γr·e_u/e_d)``, on batch softmax scores (or fixed unimodal metrics, `StaticMetrics`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gradmod._internal import check_count, check_names, real_scalar, stack_evidence, unstack_evidence
from gradmod.appliers import DEFAULT_BACKEND, Applier, Modality, ParamFilter, preset_applier
from gradmod.measures import IGNORE_INDEX, Measure, SoftmaxScore
from gradmod.method import Fit, MethodInfo, Option, Strength
from gradmod.modulator import Modulator
from gradmod.policies import StackedPolicy

__all__ = ["PDMP", "PDMPPolicy", "StaticMetrics", "pdmp_coefficients", "pdmp_coefficients_of", "rank_modalities"]


def rank_modalities(metrics: Mapping[str, float]) -> tuple[str, ...]:
    """Rank modalities by a unimodal performance metric, best first (PDMP's first stage).

    Higher is better (accuracy, macro-F1, …). Ties cannot be ranked and raise ``ValueError``.
    """
    check_count(metrics, "rank_modalities")
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
    e, out_dtype = stack_evidence(evidence)
    return unstack_evidence(names, pdmp_coefficients_of(e, names.index(ranking[0]), gamma_p, gamma_r), out_dtype)



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



@dataclass
class PDMPPolicy(StackedPolicy):
    """PDMP (gradmod's reading): `pdmp_coefficients` with a fixed ranking.

    Coefficients lie in ``[0, 1 + γp]``: the dominant modality in ``[1, 1 + γp]``, the others in ``[0, 1]``.
    """

    ranking: Sequence[str]
    gamma_p: float
    gamma_r: float

    def __post_init__(self) -> None:
        self.ranking = tuple(self.ranking)
        if len(self.ranking) < 2 or len(set(self.ranking)) != len(self.ranking):
            raise ValueError(f"ranking must name two or more distinct modalities, got {list(self.ranking)}")
        self.gamma_p = real_scalar(self.gamma_p, "gamma_p")
        self.gamma_r = real_scalar(self.gamma_r, "gamma_r")

    @property
    def coefficient_range(self) -> tuple[float, float]:
        return (0.0, 1.0 + self.gamma_p)

    def stacked(self, evidence: Tensor, names: Sequence[str]) -> Tensor:
        check_names(names, self.ranking, "the modalities of the evidence")
        return pdmp_coefficients_of(evidence, list(names).index(self.ranking[0]), self.gamma_p, self.gamma_r)

    def state_dict(self) -> dict[str, Any]:
        return {"ranking": list(self.ranking)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the ranking; it must rank the same modalities (in any order)."""
        check_names(state["ranking"], self.ranking, "the saved PDMP ranking")
        self.ranking = tuple(state["ranking"])



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



def parse_metrics(text: str) -> dict[str, float]:
    """``"audio=0.61,visual=0.52"`` → ``{"audio": 0.61, "visual": 0.52}`` (the training CLI's ``--pdmp-metrics``)."""
    try:
        return {name: float(value) for name, value in (item.split("=") for item in text.split(","))}
    except ValueError as error:
        raise ValueError(f"expected name=value,name=value, got {text!r}") from error


class PDMP(Modulator):
    """Performance-dominant modality prioritization — gradmod's reading (the paper publishes no equations).

    ``ranking`` (best first, from `rank_modalities` over independently trained unimodal models) fixes the
    dominant modality ``d``. Per step, with batch evidence ``e`` (softmax scores):
    ``k_d = 1 + γp·tanh(max(max_{u≠d} e_u/e_d − 1, 0))`` and ``k_u = 1 − tanh(γr·e_u/e_d)``.
    With ``static_metrics`` (the unimodal metrics), the evidence is those metrics: fixed coefficients, no
    ``observe()`` needed. The ranking is saved in the modulator's ``state_dict``.

    Args:
        modalities: name → encoder, two or more.
        ranking: the modalities, best first.
        gamma_p: ``γp ≥ 0``, the dominant modality's boost.
        gamma_r: ``γr ≥ 0``, the others' damping.
        static_metrics: fixed unimodal metrics instead of batch scores.
        noise, apply, backend, param_filter, ignore_index, **options: as `gradmod.OGM`.
    """

    def __init__(
        self,
        modalities: Mapping[str, Modality],
        ranking: Sequence[str],
        gamma_p: float,
        gamma_r: float,
        *,
        static_metrics: Mapping[str, float] | None = None,
        noise: str | None = None,
        apply: str | Applier = "params",
        backend: str = DEFAULT_BACKEND,
        param_filter: ParamFilter | None = None,
        ignore_index: int | None = IGNORE_INDEX,
        **options: Any,
    ) -> None:
        policy = PDMPPolicy(ranking, gamma_p, gamma_r)
        if sorted(policy.ranking) != sorted(modalities):
            raise ValueError(f"ranking {list(policy.ranking)} must name exactly the modalities {list(modalities)}")
        measure = SoftmaxScore(ignore_index) if static_metrics is None else StaticMetrics(static_metrics)
        applier = preset_applier(apply, noise, backend, param_filter)
        super().__init__(modalities, measure=measure, policy=policy, apply=applier, **options)


METHODS = (
    MethodInfo(
        key="pdmp",
        preset=PDMP,
        title="PDMP (gradmod's reading)",
        kind="modulator",
        paper="PDMP: Rethinking Balanced Multimodal Learning via Performance-Dominant Modality Prioritization, arXiv:2604.05773",
        page="methods/pdmp.md",
        observes="decoupled logits + target, or static metrics",
        cost="before training: one unimodal run per modality; per step as OGM",
        fit=Fit(head="decoupled", acts_on="gradient scale"),
        strength=Strength("gamma_r", 0.5, "γr of k_u = 1 − tanh(γr·e_u/e_d) for every modality but the dominant d"),
        options=(
            Option("gamma_p", 1.0, "γp, the dominant modality's boost", float),
            Option("metrics", None, "the unimodal metrics to rank by, e.g. audio=0.61,visual=0.52 (default: measured)", parse_metrics, loop=True),
            Option("budget", 1, "epochs of unimodal training per modality to measure the ranking metrics", int, loop=True),
        ),
    ),
)
