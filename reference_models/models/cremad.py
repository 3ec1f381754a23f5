"""The OGM-GE CREMA-D model: a ResNet-18 per modality, 512-d features, a `gradmod.fusion` head.

Audio: ``log|STFT|`` spectrogram ``[B, 1, 257, 188]`` through a ResNet-18 whose first convolution takes
one channel. Visual: frames ``[B, 3, T, 224, 224]`` folded into the batch (``B·T`` images) through a
ResNet-18, average-pooled over space and then over time. Both are torchvision ``resnet18(weights=None)``
without the final classifier (global average pool → 512-d), as in the official OGM-GE code (Peng et al.,
CVPR 2022) and its CREMA-D protocol; any spatial size works, so tests use tiny inputs.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models import resnet18

from reference_models.models.common import FusedClassifier, check_shape, make_fusion

__all__ = ["CremaDModel", "resnet18_features", "FrameEncoder", "SpectrogramEncoder"]

FEATURE_DIM = 512


def resnet18_features(in_channels: int) -> nn.Module:
    """Randomly initialised torchvision ResNet-18 with ``in_channels`` inputs and no classifier:
    ``[N, in_channels, H, W] -> [N, 512]``."""
    net = resnet18(weights=None)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    net.fc = nn.Identity()
    return net


class SpectrogramEncoder(nn.Module):
    """``[B, 1, F, T]`` spectrogram → ``[B, 512]`` (one-channel ResNet-18)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = resnet18_features(1)

    def forward(self, spectrogram: Tensor) -> Tensor:
        check_shape(spectrogram, (None, 1, None, None), "audio spectrogram")
        return self.backbone(spectrogram)


class FrameEncoder(nn.Module):
    """``[B, 3, T, H, W]`` frames → ``[B, 512]``: ResNet-18 on all ``B·T`` frames, mean over space and time."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = resnet18_features(3)

    def forward(self, frames: Tensor) -> Tensor:
        check_shape(frames, (None, 3, None, None, None), "visual frames")
        batch, channels, time, height, width = frames.shape
        folded = frames.transpose(1, 2).reshape(batch * time, channels, height, width)
        # equal-size frames: the mean of per-frame spatial means is the mean over time × space
        return self.backbone(folded).view(batch, time, FEATURE_DIM).mean(dim=1)


class CremaDModel(FusedClassifier):
    """CREMA-D emotion classifier (6 classes): ResNet-18 audio and visual encoders, ``fusion`` head."""

    def __init__(self, fusion: str = "concat", num_classes: int = 6) -> None:
        super().__init__(
            {"audio": SpectrogramEncoder(), "visual": FrameEncoder()},
            make_fusion(fusion, FEATURE_DIM, num_classes, ("audio", "visual")),
        )
