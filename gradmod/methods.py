"""Method presets: each a named composition of measure, policy and applier over `Modulator`.

| method | preset | measure (``observe`` inputs) | policy | noise |
| --- | --- | --- | --- | --- |
| ``ogm`` | `OGM` | softmax score of decoupled logits | `OGMPolicy` ``1 − tanh(α·ρ)`` if ``ρ > 1`` | none |
| ``ogm_ge`` | `OGMGE` | same | same | GE: ``N(0, σ(g)²)`` on every modality |
| ``dgm`` | `DGM` | DGM eq. (6) (scores + Δs̄) | `OGMPolicy` with γ (DGM eq. (7)) | eq. (9): ``"restore"`` |
| ``decoupling_free`` | `DecouplingFree` | fusion gate ζ, SimAM² eq. (11) | `OGMPolicy` | GE |
| ``pdmp`` | `PDMP` | softmax score (or static metrics) | `PDMPPolicy` (gradmod's reading) | none |

`METHODS` maps each method's one name (the first column, also the training CLI's ``--method``) to its
preset, title and the ``observe()`` inputs it reads.

Every preset takes ``apply=`` (``"params"``, ``"features"`` or an applier) and, for the default params
applier, ``noise=`` (default: the method's), ``backend=`` and ``param_filter=`` (`gradmod.ParamsApplier`); the remaining
keyword arguments go to `Modulator` (window, seed, history, validation).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gradmod.agm import AGM
from gradmod.appliers import Applier, FeaturesApplier, Modality, ParamFilter, ParamsApplier
from gradmod.gblending import GBlending
from gradmod.measures import IGNORE_INDEX, DGMScore, SoftmaxScore, StaticMetrics, ZetaGate
from gradmod.mla import MLA
from gradmod.mmpareto import MMPareto
from gradmod.modulator import Modulator, make_applier
from gradmod.policies import OGMPolicy, PDMPPolicy

__all__ = ["OGM", "OGMGE", "DGM", "DecouplingFree", "PDMP", "METHODS", "MethodInfo"]

_DEFAULT_BACKEND = "auto"


def _applier(apply: str | Applier, noise: str | None, backend: str, param_filter: ParamFilter | None) -> Applier:
    """The params applier built from the preset's options, or ``apply`` when no params option was set."""
    if apply == "params":
        return ParamsApplier(noise=noise, backend=backend, param_filter=param_filter)
    applier = make_applier(apply)
    options = {"noise": noise, "param_filter": param_filter, "backend": None if backend == _DEFAULT_BACKEND else backend}
    given = sorted(name for name, value in options.items() if value is not None)
    if given:
        hint = " (features mode adds no noise: pass noise=None)" if isinstance(applier, FeaturesApplier) else ""
        raise ValueError(f"{', '.join(given)} configure the params applier, not {applier!r}{hint}")
    return applier


def OGM(
    modalities: Mapping[str, Modality],
    alpha: float,
    *,
    noise: str | None = None,
    apply: str | Applier = "params",
    backend: str = _DEFAULT_BACKEND,
    param_filter: ParamFilter | None = None,
    ignore_index: int | None = IGNORE_INDEX,
    **options: Any,
) -> Modulator:
    """On-the-fly gradient modulation (Peng et al., CVPR 2022), without GE noise (``noise="ge"`` is `OGMGE`).

    ``k_u = 1 − tanh(α·ρ_u)`` for ``ρ_u = s_u / mean_{v≠u} s_v > 1``, else 1; ``s_u = Σ_i softmax(z_u,i)[y_i]``.
    ``observe(logits={name: decoupled logits}, target=labels)``. ``alpha`` has no default, as in the
    official script (``--alpha`` is required). ``options`` go to `Modulator`.
    """
    applier = _applier(apply, noise, backend, param_filter)
    return Modulator(modalities, measure=SoftmaxScore(ignore_index), policy=OGMPolicy(alpha), apply=applier, **options)


def OGMGE(
    modalities: Mapping[str, Modality],
    alpha: float,
    *,
    noise: str | None = "ge",
    apply: str | Applier = "params",
    backend: str = _DEFAULT_BACKEND,
    param_filter: ParamFilter | None = None,
    ignore_index: int | None = IGNORE_INDEX,
    **options: Any,
) -> Modulator:
    """OGM with generalization enhancement: every modality's gradient becomes ``k_u·g + N(0, (σ(g)+1e-8)²)``.

    The noise std is that of the *unscaled* gradient, and noise goes to every modality on every modulated
    step (also the one with ``k = 1``), as in the official code. To match the official script exactly, add
    ``param_filter=gradmod.filters.conv_weights`` and ``start_step, stop_step = epoch_window(0, 50, steps)``.
    """
    applier = _applier(apply, noise, backend, param_filter)
    return Modulator(modalities, measure=SoftmaxScore(ignore_index), policy=OGMPolicy(alpha), apply=applier, **options)


def DGM(
    modalities: Mapping[str, Modality],
    gamma: float = 0.1,
    *,
    noise: str | None = "restore",
    apply: str | Applier = "params",
    backend: str = _DEFAULT_BACKEND,
    param_filter: ParamFilter | None = None,
    ignore_index: int | None = IGNORE_INDEX,
    **options: Any,
) -> Modulator:
    """Dynamic gradient modulation, DGM (Fu, Gao & Xu, *Multimodal Imbalance-Aware Gradient Modulation for
    Weakly-supervised Audio-Visual Video Parsing*).

    Evidence ``e_u = Σ_n Σ_c s^u_n[c]·Y_n[c] + Σ_n Δs̄^u_n`` (eq. 6), ``μ_u = 1 − tanh(γ·ω_u)`` for
    ``ω_u = e_u / mean_{v≠u} e_v > 1`` (eq. 7), update ``μ·g + ε`` (eq. 9). ``noise="restore"`` (default)
    draws ``ε ~ N(0, (1−μ²)σ²)`` so the total variance is the unmodulated ``σ²`` — the stated intent of
    eq. (9); ``noise="paper"`` draws eq. (9) as printed, ``N(0, (μ²+1)σ²)``; ``None`` adds none.
    ``observe(scores={name: [B, C] in [0, 1]}, target=multi_hot)`` — with the modality-separated decision
    unit's pure unimodal scores (eq. 11) — or ``observe(logits=..., target=...)``. Published default ``γ = 0.1``.
    """
    applier = _applier(apply, noise, backend, param_filter)
    return Modulator(modalities, measure=DGMScore(ignore_index), policy=OGMPolicy(gamma), apply=applier, **options)


def DecouplingFree(
    modalities: Mapping[str, Modality],
    alpha: float,
    *,
    noise: str | None = "ge",
    apply: str | Applier = "params",
    backend: str = _DEFAULT_BACKEND,
    param_filter: ParamFilter | None = None,
    **options: Any,
) -> Modulator:
    """Decoupling-free OGM-GE (Sun et al., *More than Vanilla Fusion*, ICASSP 2024, sec. 2.3): the ratio
    comes from the fusion gate ζ, not from decoupled logits.

    ``ρ_1 = Σ_i ζ_i / Σ_i (1 − ζ_i)``, ``ρ_2 = 1/ρ_1`` (eq. 11), then OGM-GE's coefficient and noise.
    ``observe(zeta=fusion.zeta)`` — ζ weights the first modality (``U = ζX₁ + (1−ζ)X₂``, eq. 4); for
    M > 2 modalities pass ``{name: gate}`` with gates summing to one. Works with heads that cannot be split
    per modality (gated sum, FiLM with ζ: `gradmod.fusion`).
    """
    applier = _applier(apply, noise, backend, param_filter)
    return Modulator(modalities, measure=ZetaGate(), policy=OGMPolicy(alpha), apply=applier, **options)


def PDMP(
    modalities: Mapping[str, Modality],
    ranking: Sequence[str],
    gamma_p: float,
    gamma_r: float,
    *,
    static_metrics: Mapping[str, float] | None = None,
    noise: str | None = None,
    apply: str | Applier = "params",
    backend: str = _DEFAULT_BACKEND,
    param_filter: ParamFilter | None = None,
    ignore_index: int | None = IGNORE_INDEX,
    **options: Any,
) -> Modulator:
    """Performance-dominant modality prioritization — **gradmod's reading** of *PDMP: Rethinking Balanced
    Multimodal Learning via Performance-Dominant Modality Prioritization* (arXiv:2604.05773), which
    publishes no equations.

    ``ranking`` (best first, from `gradmod.rank_modalities` over independently trained unimodal
    models) fixes the dominant modality ``d``. Per step, with batch evidence ``e`` (softmax scores):
    ``k_d = 1 + γp·tanh(max(max_{u≠d} e_u/e_d − 1, 0))`` and ``k_u = 1 − tanh(γr·e_u/e_d)``.
    With ``static_metrics`` (the unimodal metrics), the evidence is those metrics: fixed coefficients, no
    ``observe()`` needed. The ranking is saved in the modulator's ``state_dict``.
    """
    policy = PDMPPolicy(ranking, gamma_p, gamma_r)
    if sorted(policy.ranking) != sorted(modalities):
        raise ValueError(f"ranking {list(policy.ranking)} must name exactly the modalities {list(modalities)}")
    measure = SoftmaxScore(ignore_index) if static_metrics is None else StaticMetrics(static_metrics)
    applier = _applier(apply, noise, backend, param_filter)
    return Modulator(modalities, measure=measure, policy=policy, apply=applier, **options)


@dataclass(frozen=True)
class MethodInfo:
    """One gradient-modulation method: its preset, its title in tables, and what ``observe()`` needs.

    ``loop`` says how the method enters a training loop: ``"modulator"`` (the preset returns a
    `Modulator`: attach, then observe every step), ``"turns"`` (`gradmod.MLA`: one optimizer step per
    modality, each observed), ``"loss weights"`` (`gradmod.GBlending`: a weighted sum of head losses,
    re-estimated from checkpoints), ``"responses"`` (`gradmod.AGM`: a `Modulator` observing the mono-modal
    responses of `gradmod.agm.mono_responses`, the loss computed from its ``combine``) or ``"backward"``
    (`gradmod.MMPareto`: its ``backward(loss_mm, unimodal_losses)`` replaces ``loss.backward()``); the
    preset returns that object.
    """

    preset: Callable[..., Any]
    title: str
    observes: str
    loop: str = "modulator"


#: Every gradient-modulation method by its one name (the training CLI's ``--method``).
METHODS: dict[str, MethodInfo] = {
    "ogm": MethodInfo(OGM, "OGM", "decoupled logits + target"),
    "ogm_ge": MethodInfo(OGMGE, "OGM-GE", "decoupled logits + target"),
    "dgm": MethodInfo(DGM, "DGM", "unimodal scores or logits + target"),
    "decoupling_free": MethodInfo(DecouplingFree, "decoupling-free", "fusion gate ζ"),
    "pdmp": MethodInfo(PDMP, "PDMP (gradmod's reading)", "decoupled logits + target, or static metrics"),
    "agm": MethodInfo(AGM, "AGM", "mono-modal responses + target", "responses"),
    "mmpareto": MethodInfo(MMPareto, "MMPareto", "multimodal and unimodal losses", "backward"),
    "mla": MethodInfo(MLA, "MLA", "per step: the modality it trains + its head inputs", "turns"),
    "gblending": MethodInfo(GBlending, "G-Blending", "per super-epoch: train and held-out loss per head", "loss weights"),
}
