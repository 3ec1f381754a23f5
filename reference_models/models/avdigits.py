"""The AV-digits reference model: a small CNN per modality, then a `gradmod.fusion` head."""

from __future__ import annotations

from torch import Tensor, nn

from reference_models.models.common import FusedClassifier, check_shape, make_fusion

__all__ = ["AVDigitsModel", "SmallCNN"]


class SmallCNN(nn.Module):
    """Three 3×3 conv blocks (16, 32, 32 channels; BatchNorm, ReLU; 2×2 max-pool after the first two),
    an adaptive average pool to a 4×4 grid (keeps the coarse layout a glyph or a tone pattern needs),
    then Linear → ReLU: ``[B, C_in, H, W] -> [B, dim]`` for any ``H, W >= 4``."""

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        widths = (in_channels, 16, 32, 32)
        layers: list[nn.Module] = []
        for index, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
            if index < 2:
                layers.append(nn.MaxPool2d(2))
        layers += [nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(widths[-1] * 16, dim), nn.ReLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        check_shape(x, (None, self.in_channels, None, None), "SmallCNN input")
        return self.net(x)


class AVDigitsModel(FusedClassifier):
    """Audio spectrogram ``[B, 1, 40, 32]`` and digit image ``[B, 1, 28, 28]``, each through a
    `SmallCNN` to ``dim`` features, fused by ``fusion`` (a `reference_models.models.common.FUSION_KINDS` kind)
    into 10 logits."""

    def __init__(self, fusion: str = "concat", dim: int = 64, num_classes: int = 10) -> None:
        modalities = ("audio", "visual")
        super().__init__(
            {name: SmallCNN(1, dim) for name in modalities}, make_fusion(fusion, dim, num_classes, modalities)
        )
