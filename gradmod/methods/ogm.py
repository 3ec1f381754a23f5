"""OGM and OGM-GE: Peng et al., *Balanced Multimodal Learning via On-the-fly Gradient Modulation*, CVPR 2022.

Per step, the score of modality ``u`` is ``s_u = Σ_i softmax(z_u,i)[y_i]`` on its decoupled logits
(`gradmod.measures.SoftmaxScore`); its discrepancy ratio ``ρ_u = s_u / mean_{v≠u} s_v``
(`gradmod.functional.discrepancy_ratios`; for two modalities the paper's ``s_a / s_v``); its coefficient
``k_u = 1 − tanh(α·ρ_u)`` when ``ρ_u > 1``, else 1 (`gradmod.policies.OGMPolicy`). Every encoder gradient
becomes ``k_u·g`` (OGM), or ``k_u·g + ε`` with ``ε ~ N(0, (σ(g) + 1e-8)²)`` per parameter tensor, ``σ`` the std
of the *unscaled* gradient, on every modality and modulated step (OGM-GE's generalization enhancement).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gradmod.appliers import DEFAULT_BACKEND, Applier, Modality, ParamFilter, preset_applier
from gradmod.measures import IGNORE_INDEX, SoftmaxScore
from gradmod.method import Fit, MethodInfo, Strength
from gradmod.modulator import Modulator
from gradmod.policies import OGMPolicy

__all__ = ["OGM", "OGMGE"]

#: What ``alpha`` is, for the registry and the docs.
ALPHA = "α of k = 1 − tanh(α·ρ) for a modality whose ratio ρ exceeds 1; 0 modulates nothing"


class OGM(Modulator):
    """On-the-fly gradient modulation without GE noise (``noise="ge"`` is `OGMGE`).

    ``k_u = 1 − tanh(α·ρ_u)`` for ``ρ_u = s_u / mean_{v≠u} s_v > 1``, else 1; ``s_u = Σ_i softmax(z_u,i)[y_i]``.
    ``observe(logits={name: decoupled logits}, target=labels)``.

    Args:
        modalities: name → encoder (``nn.Module`` or parameters), two or more.
        alpha: ``α ≥ 0``; no default, as in the official script (``--alpha`` is required).
        noise: the params applier's noise (`gradmod.functional.noise_scale`).
        apply: ``"params"``, ``"features"`` or an applier (`gradmod.appliers`).
        backend: the kernel of the params applier (`gradmod.kernels`).
        param_filter: which parameters of each encoder the params applier scales (`gradmod.filters`).
        ignore_index: targets equal to it add no score (``cross_entropy``'s −100).
        **options: `gradmod.Modulator`'s window, seed, history and validation options.
    """

    def __init__(
        self,
        modalities: Mapping[str, Modality],
        alpha: float,
        *,
        noise: str | None = None,
        apply: str | Applier = "params",
        backend: str = DEFAULT_BACKEND,
        param_filter: ParamFilter | None = None,
        ignore_index: int | None = IGNORE_INDEX,
        **options: Any,
    ) -> None:
        applier = preset_applier(apply, noise, backend, param_filter)
        super().__init__(modalities, measure=SoftmaxScore(ignore_index), policy=OGMPolicy(alpha), apply=applier, **options)


class OGMGE(OGM):
    """OGM with generalization enhancement: every modality's gradient becomes ``k_u·g + N(0, (σ(g)+1e-8)²)``.

    The noise std is that of the *unscaled* gradient, and noise goes to every modality on every modulated
    step (also the one with ``k = 1``), as in the official code. To match the official script exactly, add
    ``param_filter=gradmod.filters.conv_weights`` and ``start_step, stop_step = epoch_window(0, 50, steps)``.
    Arguments as `OGM`, with ``noise="ge"``.
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
        ignore_index: int | None = IGNORE_INDEX,
        **options: Any,
    ) -> None:
        super().__init__(
            modalities, alpha, noise=noise, apply=apply, backend=backend, param_filter=param_filter,
            ignore_index=ignore_index, **options,
        )


_PAPER = "Peng et al., Balanced Multimodal Learning via On-the-fly Gradient Modulation, CVPR 2022"
_FIT = Fit(head="decoupled", acts_on="gradient scale")

METHODS = (
    MethodInfo(
        key="ogm",
        preset=OGM,
        title="OGM",
        kind="modulator",
        paper=_PAPER,
        page="methods/ogm-ge.md",
        observes="decoupled logits + target",
        cost="scale every modulated gradient: one pass",
        fit=_FIT,
        strength=Strength("alpha", 0.8, ALPHA),
    ),
    MethodInfo(
        key="ogm_ge",
        preset=OGMGE,
        title="OGM-GE",
        kind="modulator",
        paper=_PAPER,
        page="methods/ogm-ge.md",
        observes="decoupled logits + target",
        cost="scale every modulated gradient and add noise sized by its σ",
        fit=_FIT,
        strength=Strength("alpha", 0.8, ALPHA),
    ),
)
