"""What every reference model shares: its output record, the encode → head protocol, fusion-head choice.

A model maps named inputs to a `ModelOutput` in two cheap-to-separate stages:

* ``encode(inputs) -> dict[str, Tensor]``: per-modality features (the modality's own encoder only);
* ``head(features) -> ModelOutput``: the fused prediction from (possibly masked) features.

``forward(inputs) == head(encode(inputs))``. A modality's unimodal prediction comes two ways, both
from one encoding: `MultimodalModel.masked_logits`, the fused head evaluated with every other
modality's features zeroed (gradmod's definition, any head), and `MultimodalModel.decoupled_logits`,
OGM-GE's evaluation convention (concat, sum and shared heads). Call it in ``eval()`` mode: heads with running statistics
(SimAM²'s ``var_max``) update them in training mode, and every call overwrites a gated head's ``.zeta``
attribute (``ModelOutput.zeta`` keeps the gates of the call that produced it).

``modality_modules()`` names, per modality, the parameters a gradient modulator scales (disjoint across
modalities); pass it to ``gradmod`` as the modality mapping. `FusedClassifier.add_unimodal_heads` gives a
model one linear classifier per modality on its encoder's features, for the methods that train unimodal
losses beside the fused one (MMPareto, G-Blending).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradmod.fusion import ConcatFusion, FiLMFusion, Fusion, GatedSumFusion, SumFusion
from gradmod.methods.mla import entropy_fusion

__all__ = [
    "FUSION_KINDS",
    "FusedClassifier",
    "ModelOutput",
    "MultimodalModel",
    "SharedHead",
    "check_inputs",
    "check_shape",
    "make_fusion",
    "mask_features",
]

#: Fusion heads `make_fusion` builds: concat / sum (decouplable, OGM-GE), ζ-gated sum with or
#: without SimAM² (Sun et al., ICASSP 2024, eqs. (4), (8)), FiLM plain (eq. (9)) or ζ-weighted (eq. (10)), and
#: one linear head shared by every modality (MLA, Zhang et al., CVPR 2024: `SharedHead`), and MMCosine's head of scaled
#: per-modality cosines (Xu et al., ICASSP 2023: `gradmod.fusion.MMCosineFusion`).
FUSION_KINDS = ("concat", "sum", "gated", "gated_simam", "film", "film_zeta", "shared", "mmcosine")


@dataclass
class ModelOutput:
    """What a reference model returns.

    Attributes:
        logits: the fused prediction before its final normalisation: ``[B, C]`` (CREMA-D, AV-digits),
            ``[B, T, C]`` per segment (AVE), or the video-level ``logit(P)`` ``[B, C]`` (LLP, whose
            prediction ``P`` is an attention-weighted mean of sigmoid outputs).
        features: the per-modality encoder features the head consumed.
        unimodal_logits: decoupled per-modality logits ``[N, C]`` of a decouplable head (OGM-GE's
            measure), ``None`` otherwise. Rows match `MultimodalModel.measure_target`.
        zeta: a gated head's fusion gates by modality name (``Fusion.gates``: ``{first: ζ, second: 1 − ζ}``
            for ``U = ζ·X_first + (1 − ζ)·X_second``, Sun et al., ICASSP 2024, eq. (4)), attached to the graph, else ``None``.
            Named, so that a head which reorders its modalities (FiLM) cannot credit the wrong one.
        unimodal_scores: per-modality scores in ``[0, 1]`` ``[B, C]`` for DGM's measure (Fu, Gao & Xu,
            eq. (6)): the modality-separated decision unit's video-level scores (LLP), else ``None``.
        snippet_probs: per-modality snippet-level probabilities ``[B, T, C]`` for parsing (LLP), else ``None``.
    """

    logits: Tensor
    features: dict[str, Tensor]
    unimodal_logits: dict[str, Tensor] | None = None
    zeta: Tensor | dict[str, Tensor] | None = None
    unimodal_scores: dict[str, Tensor] | None = None
    snippet_probs: dict[str, Tensor] | None = None


def check_inputs(inputs: Mapping[str, Tensor], modalities: tuple[str, ...], what: str) -> None:
    """Raise ``ValueError`` naming the missing / unknown modalities of ``inputs``."""
    if not isinstance(inputs, Mapping):
        raise ValueError(f"{what} must be a mapping modality name -> tensor, got {type(inputs).__name__}")
    missing = [name for name in modalities if name not in inputs]
    unknown = [name for name in inputs if name not in modalities]
    if missing or unknown:
        raise ValueError(f"{what} must have modalities {list(modalities)}; missing {missing}, unknown {unknown}")


def check_shape(tensor: Tensor, expected: tuple[int | None, ...], name: str) -> None:
    """Raise ``ValueError`` unless ``tensor`` has ``len(expected)`` dims matching the non-``None`` sizes."""
    if tensor.dim() != len(expected) or any(e is not None and s != e for s, e in zip(tensor.shape, expected)):
        pattern = ", ".join("B" if i == 0 and e is None else "*" if e is None else str(e) for i, e in enumerate(expected))
        raise ValueError(f"{name} must have shape [{pattern}], got {tuple(tensor.shape)}")


def mask_features(features: Mapping[str, Tensor], keep: str) -> dict[str, Tensor]:
    """``features`` with every modality but ``keep`` replaced by zeros (the unimodal-evaluation input)."""
    if keep not in features:
        raise ValueError(f"cannot keep modality {keep!r}: features have {list(features)}")
    return {name: f if name == keep else torch.zeros_like(f) for name, f in features.items()}


class MultimodalModel(nn.Module, ABC):
    """Base of the reference models: ``encoders`` (one per modality) then a subclass-defined `head`."""

    def __init__(self, encoders: Mapping[str, nn.Module]) -> None:
        super().__init__()
        if len(encoders) < 2:
            raise ValueError(f"a multimodal model needs at least 2 modalities, got {list(encoders)}")
        self.encoders = nn.ModuleDict(dict(encoders))
        self.modalities: tuple[str, ...] = tuple(encoders)

    def encode(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Per-modality features: each modality's encoder on its own input."""
        check_inputs(inputs, self.modalities, "inputs")
        return {name: self.encoders[name](inputs[name]) for name in self.modalities}

    @abstractmethod
    def head(self, features: Mapping[str, Tensor]) -> ModelOutput:
        """The fused prediction from per-modality features (possibly with some zeroed)."""

    def forward(self, inputs: Mapping[str, Tensor]) -> ModelOutput:
        return self.head(self.encode(inputs))

    def masked_logits(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each modality's unimodal prediction: ``head`` on ``features`` with the other modalities zeroed."""
        return {name: self.head(mask_features(features, keep=name)).logits for name in self.modalities}

    def decoupled_logits(self, features: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
        """Each modality's prediction as OGM-GE's evaluation computes it; ``None`` where it is not defined."""
        return None

    def modality_modules(self) -> dict[str, nn.Module]:
        """Per modality, the module whose parameters a gradient modulator scales (default: its encoder)."""
        return dict(self.encoders.items())

    def feature_widths(self) -> dict[str, int] | None:
        """Each modality's feature width (the last dimension of its `encode` output) where the head reads one
        feature vector per modality and row; ``None`` where it does not (LLP's attention layers)."""
        return None

    def add_unimodal_heads(self, num_classes: int, seed: int) -> nn.ModuleDict:
        """Give the model one linear classifier per modality on its encoder's features, ``unimodal_heads``.

        The heads are a submodule (saved and loaded with the model, outside `modality_modules`), initialised
        from ``seed`` alone: the model's own initialisation and torch's global random stream are left as
        they were. Raises ``ValueError`` where `feature_widths` is ``None``.
        """
        widths = self.feature_widths()
        if widths is None:
            raise ValueError(f"{type(self).__name__} has no per-modality feature vectors to put unimodal heads on")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            heads = nn.ModuleDict({name: nn.Linear(widths[name], num_classes) for name in self.modalities})
        device = next(self.parameters()).device
        self.unimodal_heads = heads.to(device)
        return self.unimodal_heads

    def unimodal_head_logits(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each unimodal head (`add_unimodal_heads`) on its modality's features: ``[..., C]`` per modality."""
        heads = getattr(self, "unimodal_heads", None)
        if heads is None:
            raise ValueError(f"{type(self).__name__} has no unimodal heads: call add_unimodal_heads first")
        check_inputs(features, self.modalities, "features")
        return {name: heads[name](features[name]) for name in self.modalities}

    def measure_target(self, target: Tensor) -> Tensor:
        """The target whose rows match ``unimodal_logits`` (here: ``target`` itself)."""
        return target

    def loss(self, output: ModelOutput, target: Tensor) -> Tensor:
        """Training loss: cross-entropy of ``output.logits`` ``[B, C]`` against class indices ``[B]``."""
        return F.cross_entropy(output.logits, target)


class FusedClassifier(MultimodalModel):
    """Encoders whose ``[B, D_u]`` features go into a `gradmod.fusion` head."""

    def __init__(self, encoders: Mapping[str, nn.Module], fusion: Fusion) -> None:
        super().__init__(encoders)
        if tuple(sorted(fusion.modalities)) != tuple(sorted(self.modalities)):
            raise ValueError(f"fusion head modalities {list(fusion.modalities)} differ from encoders {list(self.modalities)}")
        self.fusion = fusion

    def head(self, features: Mapping[str, Tensor]) -> ModelOutput:
        """Fused logits, plus the decoupled logits (decouplable heads) and the named gates (gated heads)."""
        check_inputs(features, self.modalities, "features")
        logits = self.fusion(features)
        unimodal = self.fusion.unimodal_logits(features) if self.fusion.decouplable else None
        return ModelOutput(logits, dict(features), unimodal, self.fusion.gates)

    def feature_widths(self) -> dict[str, int]:
        """The fusion head's input width per modality."""
        return dict(self.fusion.in_features)

    def masked_logits(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each modality's unimodal prediction: the fused head with the other modalities' features zeroed;
        for the `SharedHead`, the head on the modality's features (MLA's unimodal prediction: a zeroed
        modality would still take part in the entropy-weighted fusion with the head's bias)."""
        if isinstance(self.fusion, SharedHead):
            return self.decoupled_logits(features)
        return super().masked_logits(features)

    def decoupled_logits(self, features: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
        """OGM-GE's per-modality evaluation logits (the official ``valid()``); ``None`` for gated and FiLM heads.

        A modality's block of the head's weight applied to its features, plus the bias divided evenly
        among the modalities (``b/2`` for two). For the concat head these are its decoupled training
        logits; for the sum head each branch's weight with *half* its own bias, as ``valid()`` computes
        it — while the sum head's training measure (`SumFusion.unimodal_logits`) keeps the full bias.
        For the `SharedHead`, the shared head on each modality's features (its bias is not split: every
        modality's prediction has it whole).
        """
        check_inputs(features, self.modalities, "features")
        if self.fusion.decouplable and not isinstance(self.fusion, SumFusion):  # concat, shared, MMCosine
            return self.fusion.unimodal_logits(features)
        if isinstance(self.fusion, SumFusion):
            share = len(self.modalities)
            return {
                name: F.linear(features[name], branch.weight, None if branch.bias is None else branch.bias / share)
                for name, branch in self.fusion.branches.items()
            }
        return None


class SharedHead(Fusion):
    """One linear classifier shared by every modality, ``z_m = W·f_m + b`` (one width for all), fused by
    the entropy weights of MLA's test-time fusion (Zhang et al., *Multimodal Representation Learning by
    Alternating Unimodal Adaptation*, CVPR 2024; `gradmod.methods.mla.entropy_fusion`, per sample):
    ``Σ_m w_m z_m`` with ``w = softmax_m(−entropy(softmax(z_m)))``.

    ``unimodal_logits`` are the ``z_m``; ``linear`` is the head `gradmod.MLA` trains in turns. Trained
    jointly (``--method baseline --fusion shared``) the loss flows through the entropy weights too.
    """

    decouplable = True

    def __init__(self, dim: int, num_classes: int, modalities: tuple[str, ...]) -> None:
        super().__init__({name: dim for name in modalities}, num_classes)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        return entropy_fusion(self.unimodal_logits(features))

    def unimodal_logits(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {name: self.linear(f) for name, f in zip(self.modalities, self.ordered(features))}


def make_fusion(kind: str, dims: Mapping[str, int] | int, num_classes: int, modalities: tuple[str, ...]) -> Fusion:
    """Build the fusion head ``kind`` (one of `FUSION_KINDS`) over ``modalities``.

    ``dims`` is one width for all modalities or a mapping name → width; the gated, FiLM and shared heads
    need one common width. FiLM conditions the first modality on the second (``γ, β`` from ``modalities[1]``).
    """
    widths = {name: dims for name in modalities} if isinstance(dims, int) else dict(dims)
    check_inputs(widths, tuple(modalities), "dims")
    if kind in ("concat", "sum"):
        head_class = ConcatFusion if kind == "concat" else SumFusion
        return head_class(widths, num_classes)
    if kind == "mmcosine":
        from gradmod.fusion import MMCosineFusion

        return MMCosineFusion(widths, num_classes)
    if kind not in FUSION_KINDS:
        raise ValueError(f"unknown fusion kind {kind!r}; expected one of {FUSION_KINDS}")
    if len(set(widths.values())) != 1:
        raise ValueError(f"fusion {kind!r} needs one feature width for all modalities, got {widths}")
    dim = next(iter(widths.values()))
    if kind == "shared":
        return SharedHead(dim, num_classes, tuple(modalities))
    if kind.startswith("gated"):
        return GatedSumFusion(dim, num_classes, modalities, simam=kind == "gated_simam")
    return FiLMFusion(dim, num_classes, modalities, zeta=kind == "film_zeta")
