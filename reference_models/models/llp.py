"""A HAN-style MMIL model for weakly-supervised audio-visual video parsing (LLP) with the
modality-separated decision unit (MSDU) of Fu, Gao & Xu, "Multimodal Imbalance-Aware Gradient
Modulation for Weakly-supervised Audio-Visual Video Parsing", eq. (11).

Inputs: audio ``[B, T, 128]`` (VGGish), visual ``[B, T, 2560]`` (ResNet-152 appearance ⊕ R(2+1)D motion),
``T = 10`` one-second snippets; target: video-level multi-hot ``[B, 25]``. Pipeline (eq. (11)):

* ``e_u = ψ_u(x_u)``: per-modality snippet encoders (Linear → ReLU → Linear to ``dim``) — `encode`;
* MSDU: ``P^ms_u = sigmoid(φ^ms_u(e_u))``, ``A^ms_u = softmax_T(Atn^ms_u(e_u))`` on the pure unimodal
  features; the video-level score ``s_u = Σ_t A^ms_u ⊙ P^ms_u ∈ [0, 1]`` per class is what DGM measures
  (eq. (6), `gradmod.methods.dgm.dgm_evidence`): ``ModelOutput.unimodal_scores`` (the paper says
  ``P^ms`` and ``A^ms`` give ``s`` without a formula; this is the same attention pooling as ``P``'s);
* ``f_a, f_v = cro_att(e_a, e_v)``: a HAN hybrid-attention layer per modality (self-attention plus
  attention over the other modality, residual, LayerNorm, feed-forward), both computed from the
  encoder outputs (HAN shares one layer between the modalities and updates them in turn; separate layers
  keep each modality's parameters its own, so a modulator can scale them);
* ``P_u = sigmoid(φ_u(f_u))`` (snippet-level probabilities, ``ModelOutput.snippet_probs``) and attention
  logits ``Atn_u(f_u)``; ``A`` is the softmax of both modalities' attention logits over snippets *and*
  modalities jointly, per class, so ``P = Σ_t Σ_u A_{u,t} ⊙ P_{u,t} ∈ [0, 1]`` (eq. (11)'s
  ``Agg_T(A_a*P_a + A_v*P_v)``; HAN instead normalises its weights as a temporal softmax times a
  modality softmax: both make ``P`` a convex combination of snippet probabilities). ``ModelOutput.logits = logit(P)`` with ``P`` clipped to ``[1e-6, 1 − 1e-6]``
  (so ``sigmoid(logits)`` gives ``P`` back and ``BCE`` can be taken with logits).

Loss (`LLPModel.loss`): ``BCE(P, Y) + msdu_weight · Σ_u BCE(s_u, Y)`` (eq. (1) on ``P``; the paper
does not state how the MSDU heads are supervised: gradmod gives them the same video-level BCE, weight
1 by default, so their scores track each encoder's own evidence).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference_models.models.common import (
    ModelOutput,
    MultimodalModel,
    check_inputs,
    check_shape,
)

__all__ = ["LLPModel", "SnippetEncoder", "DecisionUnit", "HybridAttention", "NUM_LLP_CLASSES"]

#: The 25 LLP event categories.
NUM_LLP_CLASSES = 25
_LOGIT_EPS = 1e-6


class SnippetEncoder(nn.Module):
    """``ψ_u``: ``[B, T, in_dim] -> [B, T, dim]`` (Linear → ReLU → Linear, per snippet)."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.net = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def forward(self, snippets: Tensor) -> Tensor:
        check_shape(snippets, (None, None, self.in_dim), "snippet features")
        return self.net(snippets)


class DecisionUnit(nn.Module):
    """A classifier ``φ`` and an attention ``Atn``: ``[B, T, dim] ->`` (probabilities, attention logits), each ``[B, T, C]``."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.classifier = nn.Linear(dim, num_classes)
        self.attention = nn.Linear(dim, num_classes)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        return torch.sigmoid(self.classifier(features)), self.attention(features)


def attention_pool(probs: Tensor, attention_logits: Tensor) -> Tensor:
    """``Σ_n softmax_n(attention_logits) ⊙ probs`` over dim 1: ``[B, N, C] -> [B, C]``.

    A convex combination of probabilities; clamped to ``[0, 1]`` against rounding (saturated sigmoids
    summed with weights whose float sum is ``1 + ε``)."""
    return (torch.softmax(attention_logits, dim=1) * probs).sum(dim=1).clamp(0.0, 1.0)


def probability_bce(probs: Tensor, target: Tensor) -> Tensor:
    """Mean binary cross-entropy of probabilities (eq. (1)): ``F.binary_cross_entropy`` in float32 with
    autocast off (autocast refuses it), so it also runs in mixed-precision training."""
    with torch.autocast(device_type=probs.device.type, enabled=False):
        return F.binary_cross_entropy(probs.float(), target.float())


class HybridAttention(nn.Module):
    """HAN hybrid attention for one modality: ``h = LN(x + SelfAtt(x) + CrossAtt(x, other))``, ``out = LN(h + FFN(h))``."""

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.self_attention = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.cross_attention = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm_attention = nn.LayerNorm(dim)
        self.feed_forward = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim, dim))
        self.norm_output = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, other: Tensor) -> Tensor:
        attended = self.self_attention(x, x, x, need_weights=False)[0]
        crossed = self.cross_attention(x, other, other, need_weights=False)[0]
        hidden = self.norm_attention(x + self.dropout(attended) + self.dropout(crossed))
        return self.norm_output(hidden + self.dropout(self.feed_forward(hidden)))


class LLPModel(MultimodalModel):
    """HAN-style MMIL with the MSDU (Fu, Gao & Xu, eq. (11)); see the module docstring."""

    def __init__(
        self,
        audio_dim: int = 128,
        visual_dim: int = 2560,
        dim: int = 512,
        num_classes: int = NUM_LLP_CLASSES,
        num_heads: int = 1,
        dropout: float = 0.1,
        msdu_weight: float = 1.0,
    ) -> None:
        super().__init__({"audio": SnippetEncoder(audio_dim, dim), "visual": SnippetEncoder(visual_dim, dim)})
        if not msdu_weight >= 0.0:
            raise ValueError(f"msdu_weight must be >= 0, got {msdu_weight}")
        self.msdu_weight = msdu_weight
        self.msdu = nn.ModuleDict({name: DecisionUnit(dim, num_classes) for name in self.modalities})
        self.cross = nn.ModuleDict({name: HybridAttention(dim, num_heads, dropout) for name in self.modalities})
        self.decision = nn.ModuleDict({name: DecisionUnit(dim, num_classes) for name in self.modalities})

    def head(self, features: Mapping[str, Tensor]) -> ModelOutput:
        """MSDU scores, cross-attention, modality-specific decisions and their joint attention pooling."""
        check_inputs(features, self.modalities, "features")
        audio, visual = features["audio"], features["visual"]
        check_shape(visual, tuple(audio.shape), "features['visual'] (must match features['audio'])")
        scores = {name: attention_pool(*self.msdu[name](features[name])) for name in self.modalities}
        attended = {"audio": self.cross["audio"](audio, visual), "visual": self.cross["visual"](visual, audio)}
        decisions = {name: self.decision[name](attended[name]) for name in self.modalities}
        probs = torch.cat([decisions[name][0] for name in self.modalities], dim=1)  # [B, M·T, C]
        attention = torch.cat([decisions[name][1] for name in self.modalities], dim=1)
        video_probs = attention_pool(probs, attention)
        return ModelOutput(
            logits=torch.logit(video_probs, eps=_LOGIT_EPS),
            features=dict(features),
            unimodal_scores=scores,
            snippet_probs={name: decisions[name][0] for name in self.modalities},
        )

    def modality_modules(self) -> dict[str, nn.Module]:
        """Per modality ``ψ_u``, its cross-attention layer and ``φ_u``/``Atn_u`` (Fu, Gao & Xu, eq. (8): ``θ`` and ``α^w``).

        The MSDU heads are left out: they are the measure, and keep learning at the full rate.
        """
        return {
            name: nn.ModuleList([self.encoders[name], self.cross[name], self.decision[name]]) for name in self.modalities
        }

    def loss(self, output: ModelOutput, target: Tensor) -> Tensor:
        """``BCE(P, Y) + msdu_weight · Σ_u BCE(s_u, Y)`` for multi-hot ``target`` ``[B, C]``."""
        check_shape(target, tuple(output.logits.shape), "LLP target (multi-hot)")
        target = target.to(output.logits.dtype)
        if output.unimodal_scores is None:
            raise ValueError("output has no unimodal_scores: it does not come from LLPModel.head")
        loss = F.binary_cross_entropy_with_logits(output.logits, target)
        msdu = sum(probability_bce(score, target) for score in output.unimodal_scores.values())
        return loss + self.msdu_weight * msdu
