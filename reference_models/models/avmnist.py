"""The AV-MNIST reference model: the AV-digits `SmallCNN` per modality, then a `gradmod.fusion` head."""

from __future__ import annotations

from reference_models.models.avdigits import SmallCNN
from reference_models.models.common import FusedClassifier, make_fusion

__all__ = ["AVMNISTModel"]


class AVMNISTModel(FusedClassifier):
    """Log-mel spectrogram ``[B, 1, 40, 101]`` of a spoken digit and MNIST image ``[B, 1, 28, 28]``, each
    through a `SmallCNN` to ``dim`` features, fused by ``fusion`` (a `reference_models.models.common.FUSION_KINDS`
    kind) into ``num_classes`` logits."""

    def __init__(self, fusion: str = "concat", dim: int = 64, num_classes: int = 10) -> None:
        modalities = ("audio", "visual")
        super().__init__(
            {name: SmallCNN(1, dim) for name in modalities}, make_fusion(fusion, dim, num_classes, modalities)
        )
