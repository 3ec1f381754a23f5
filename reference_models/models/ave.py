"""An AVGA/PSP-style model for audio-visual event localisation (AVE): 28 events + background, per segment.

Inputs (the AVE-ECCV18 pre-extracted features): audio ``[B, T, 128]`` (VGGish), visual
``[B, T, 7, 7, 512]`` (VGG-19 pool5 grid), ``T = 10`` one-second segments.

* **Visual encoder**: audio-guided visual attention over the spatial grid (Tian et al., ECCV 2018,
  additive form ``α_k = softmax_k(wᵀ·tanh(W_v·v_k + W_a·a))``, attended ``Σ_k α_k·v_k``), then a
  bidirectional LSTM over the segments. The guide is the raw audio *input* feature, so no audio-encoder
  parameter receives gradient through the visual branch: the two encoders' parameters stay disjoint.
* **Audio encoder**: a bidirectional LSTM over the segments.
* **Head**: a `gradmod.fusion` head applied to every segment independently (features flattened
  to ``[B·T, D]``), logits ``[B, T, 29]``.

For the modulators' measure, ``unimodal_logits`` (decouplable heads) and ``zeta`` (gated heads) are the
head's per-segment values flattened to ``[B·T, ·]``: every segment is one OGM-GE "sample", and
`AVEModel.measure_target` flattens the ``[B, T]`` segment labels to match. The loss is the
cross-entropy over all segments.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference_models.models.common import (
    FusedClassifier,
    ModelOutput,
    check_inputs,
    check_shape,
    make_fusion,
)

__all__ = ["AVEModel", "AudioGuidedAttention", "TemporalEncoder", "GuidedVisualEncoder", "NUM_AVE_CLASSES"]

#: 28 event classes and background (class index 28).
NUM_AVE_CLASSES = 29


class AudioGuidedAttention(nn.Module):
    """Attend over a visual grid ``[B, T, H, W, C_v]`` guided by audio ``[B, T, C_a]`` → ``[B, T, C_v]``.

    ``α_{t,k} = softmax_k(wᵀ·tanh(W_v·v_{t,k} + W_a·a_t))`` over the ``H·W`` regions; output ``Σ_k α_{t,k}·v_{t,k}``.
    """

    def __init__(self, visual_dim: int, audio_dim: int, hidden: int) -> None:
        super().__init__()
        self.visual_proj = nn.Linear(visual_dim, hidden)
        self.audio_proj = nn.Linear(audio_dim, hidden)
        self.score = nn.Linear(hidden, 1, bias=False)

    def forward(self, visual: Tensor, audio: Tensor) -> Tensor:
        regions = visual.flatten(2, 3)  # [B, T, H·W, C_v]
        energy = torch.tanh(self.visual_proj(regions) + self.audio_proj(audio).unsqueeze(2))
        weights = torch.softmax(self.score(energy), dim=2)  # [B, T, H·W, 1]
        return (weights * regions).sum(dim=2)


class TemporalEncoder(nn.Module):
    """Bidirectional one-layer LSTM over segments: ``[B, T, in_dim] -> [B, T, 2·hidden]``."""

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.lstm = nn.LSTM(in_dim, hidden, batch_first=True, bidirectional=True)

    def forward(self, sequence: Tensor) -> Tensor:
        check_shape(sequence, (None, None, self.in_dim), "segment features")
        return self.lstm(sequence)[0]


class GuidedVisualEncoder(nn.Module):
    """Audio-guided spatial attention, then a `TemporalEncoder`: ``[B, T, H, W, C_v] -> [B, T, 2·hidden]``."""

    def __init__(self, visual_dim: int, audio_dim: int, attention_dim: int, hidden: int) -> None:
        super().__init__()
        self.visual_dim = visual_dim
        self.attention = AudioGuidedAttention(visual_dim, audio_dim, attention_dim)
        self.temporal = TemporalEncoder(visual_dim, hidden)

    def forward(self, visual: Tensor, guide: Tensor) -> Tensor:
        check_shape(visual, (None, None, None, None, self.visual_dim), "visual grid features")
        return self.temporal(self.attention(visual, guide))


class AVEModel(FusedClassifier):
    """Per-segment AVE classifier; see the module docstring. Feature width ``2·hidden`` per modality."""

    def __init__(
        self,
        fusion: str = "concat",
        audio_dim: int = 128,
        visual_dim: int = 512,
        hidden: int = 128,
        attention_dim: int = 256,
        num_classes: int = NUM_AVE_CLASSES,
    ) -> None:
        super().__init__(
            {
                "audio": TemporalEncoder(audio_dim, hidden),
                "visual": GuidedVisualEncoder(visual_dim, audio_dim, attention_dim, hidden),
            },
            make_fusion(fusion, 2 * hidden, num_classes, ("audio", "visual")),
        )

    def encode(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{"audio": [B, T, D], "visual": [B, T, D]}``; the visual encoder is guided by the audio input."""
        check_inputs(inputs, self.modalities, "inputs")
        audio, visual = inputs["audio"], inputs["visual"]
        if audio.shape[:2] != visual.shape[:2]:
            raise ValueError(f"audio {tuple(audio.shape)} and visual {tuple(visual.shape)} differ in [batch, segments]")
        return {"audio": self.encoders["audio"](audio), "visual": self.encoders["visual"](visual, audio)}

    def head(self, features: Mapping[str, Tensor]) -> ModelOutput:
        """The fusion head on every segment: logits ``[B, T, C]``; measure fields flattened to ``[B·T, ·]``."""
        flat = self._flatten(features)
        batch, segments = features["audio"].shape[:2]
        output = super().head(flat)
        output.logits = output.logits.view(batch, segments, -1)
        output.features = dict(features)
        return output

    def decoupled_logits(self, features: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
        """OGM-GE's evaluation logits of every segment, ``[B, T, C]`` per modality (see `FusedClassifier`)."""
        flat = self._flatten(features)
        batch, segments = features["audio"].shape[:2]
        logits = super().decoupled_logits(flat)
        return None if logits is None else {name: x.view(batch, segments, -1) for name, x in logits.items()}

    def _flatten(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Per-segment features ``[B, T, D]`` as rows ``[B·T, D]``, checked to share ``[B, T]``."""
        check_inputs(features, self.modalities, "features")
        batch, segments = features["audio"].shape[:2]
        for name, feature in features.items():
            check_shape(feature, (batch, segments, None), f"features[{name!r}]")
        return {name: f.reshape(batch * segments, -1) for name, f in features.items()}

    def measure_target(self, target: Tensor) -> Tensor:
        """Segment labels ``[B, T]`` flattened to ``[B·T]``, the rows of ``unimodal_logits``."""
        check_shape(target, (None, None), "AVE target")
        return target.reshape(-1)

    def loss(self, output: ModelOutput, target: Tensor) -> Tensor:
        """Cross-entropy over all segments: logits ``[B, T, C]`` against labels ``[B, T]``."""
        check_shape(target, tuple(output.logits.shape[:2]), "AVE target")
        return F.cross_entropy(output.logits.flatten(0, 1), target.reshape(-1))
