"""Reference models for AV-digits, CREMA-D, AVE and LLP, sharing one encode → head protocol (see `.common`)."""

from reference_models.models.avdigits import AVDigitsModel
from reference_models.models.ave import AVEModel
from reference_models.models.common import (
    FUSION_KINDS,
    FusedClassifier,
    ModelOutput,
    MultimodalModel,
    SharedHead,
    make_fusion,
    mask_features,
)
from reference_models.models.cremad import CremaDModel
from reference_models.models.llp import LLPModel

__all__ = [
    "FUSION_KINDS",
    "AVDigitsModel",
    "AVEModel",
    "CremaDModel",
    "FusedClassifier",
    "LLPModel",
    "ModelOutput",
    "MultimodalModel",
    "SharedHead",
    "make_fusion",
    "mask_features",
]
