"""MMCosine: Xu, Feng, Zhang & Hu, *MMCosine: Multi-Modal Cosine Loss Towards Balanced Audio-Visual Fine-Grained
Learning*, ICASSP 2023 (arXiv 2303.05338).

A linear fusion head lets the modality with the larger feature norm dominate the logits. MMCosine normalises
each modality's features and its block of the head's weight (per class) before the product, so every
modality contributes a cosine in ``[−1, 1]``:

``z_c = s · Σ_m cos(h_m, W_m[c]) = s · Σ_m ⟨h_m/‖h_m‖, W_m[c]/‖W_m[c]‖⟩``  (the paper's modality-wise L2
normalisation; official ``main_CD.py`` ≈ L114–117), trained with the plain cross-entropy ``CE(z, y)``; the
head has no bias (the official concat head has one, which the cosine logits never read). ``s`` is the
``scaling`` (10 officially, 15 in BalanceBenchmark). The decoupled logits are ``s·cos(h_m, W_m[c])``; they sum
to the fused logits. Any number of modalities: one weight block and one cosine each.

The official script does not run as committed (``defult=`` in an ``argparse`` call, an import of a
``utils`` package that is not in the repository, an undefined name ``x_film`` in its FiLM head); none of this
touches the formula. Its validation predicts with the model's plain linear output ``W·[h_a; h_v] + b`` and
uses the cosine logits only for the per-modality accuracies; `MMCosineFusion` always predicts with the
cosine logits it trains.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradmod._internal import real_scalar
from gradmod.fusion import Fusion
from gradmod.method import Fit, MethodInfo, Strength

__all__ = ["MMCosineFusion", "cosine_logits"]

#: ``s`` of the official script (``--scaling``); BalanceBenchmark uses 15.
DEFAULT_SCALING = 10.0


def cosine_logits(features: Tensor, weight: Tensor, scaling: float = DEFAULT_SCALING) -> Tensor:
    """``s · cos(h_i, W[c])`` ``[B, C]`` for features ``[B, D]`` and a weight ``[C, D]`` (``F.normalize``'s guard:
    a zero vector has cosine 0 with everything, and a finite gradient)."""
    return scaling * (F.normalize(features, dim=1) @ F.normalize(weight, dim=1).T)


class MMCosineFusion(Fusion):
    """The MMCosine head: ``z = s · Σ_m cos(h_m, W_m[c])`` per class (module docstring), no bias.

    ``linear`` is a bias-free ``nn.Linear`` over the concatenated features (as `gradmod.fusion.ConcatFusion`'s,
    same initialisation); ``W_m`` is its column block of modality ``m``, in `modalities` order. Decoupled
    logits (`unimodal_logits`) are ``s·cos(h_m, W_m[c])`` and sum exactly to the fused logits.

    Args:
        in_features: ``{modality: feature width}``, two or more.
        num_classes: ``C``.
        scaling: ``s > 0`` (10 officially; BalanceBenchmark 15).
    """

    decouplable = True

    def __init__(self, in_features: Mapping[str, int], num_classes: int, scaling: float = DEFAULT_SCALING) -> None:
        super().__init__(in_features, num_classes)
        self.scaling = real_scalar(scaling, "scaling", strict=True)
        self.linear = nn.Linear(sum(self.in_features.values()), num_classes, bias=False)

    def extra_repr(self) -> str:
        return f"modalities={list(self.modalities)}, num_classes={self.num_classes}, scaling={self.scaling:g}"

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        return torch.stack(list(self.unimodal_logits(features).values())).sum(dim=0)

    def unimodal_logits(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{m: s·cos(h_m, W_m[c])}``, ``[B, C]`` each."""
        tensors = self.ordered(features)
        logits, start = {}, 0
        for name, value in zip(self.modalities, tensors):
            width = self.in_features[name]
            logits[name] = cosine_logits(value, self.linear.weight[:, start : start + width], self.scaling)
            start += width
        return logits


METHODS = (
    MethodInfo(
        key="mmcosine",
        preset=MMCosineFusion,
        title="MMCosine",
        kind="head",
        paper="Xu et al., MMCosine: Multi-Modal Cosine Loss Towards Balanced Audio-Visual Fine-Grained Learning, ICASSP 2023",
        page="methods/mmcosine.md",
        observes="nothing: a fusion head (its logits) trained with the plain cross-entropy",
        cost="the L2 normalisation of M feature blocks and of the C×D_m weight blocks per forward pass",
        fit=Fit(head="any", acts_on="loss"),
        strength=Strength("scaling", DEFAULT_SCALING, "s of z = s·Σ_m cos(h_m, W_m[c]): the logits' scale (sharper softmax)"),
    ),
)
