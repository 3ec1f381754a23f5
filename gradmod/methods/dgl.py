"""DGL: Wei, Luo & Luo, *Boosting Multimodal Learning via Disentangled Gradient Learning*, ICCV 2025
(arXiv 2507.10213; official code ``shicaiwei123/ICCV2025-GDL``).

**Why.** Trained through a fusion head on the multimodal loss, every encoder receives a gradient that the
fusion shrinks, so even the dominant modality ends up below its unimodal model. DGL *disentangles* the
two roles of the loss: the encoders learn from unimodal losses only, the fusion head from the multimodal
loss only.

**The losses** (the official ``main_dgl.py`` training step and ``ConcatFusion_DGL``). The encoders run
once and give ``h_m``; ``H`` is the fusion head, ``sg`` the stop-gradient:

* fused logits on detached features, ``z = H(sg(h_1), …, sg(h_M))``: the head's only loss, ``L_f = CE(z, y)``;
* unimodal logits through the **same** head with the other modalities' features zeroed,
  ``z_m = H(0, …, h_m, …, 0)`` — for a linear head over the concatenated features ``W[0; h_m; 0] + b``,
  with its **full** bias ``b`` — and ``L_m = CE(z_m, y)``;
* encoder ``m`` learns from ``α·∇L_m`` only (``α`` is `DGL`'s ``unimodal_weight``, 4 in the official
  scripts); the head learns from ``∇L_f`` only.

The official step runs two backward passes, ``α(L_a + L_v)`` and then ``L_f``, with the head's gradients set
to ``None`` in between. gradmod runs **one** backward pass of ``L_f + α Σ_m L_m`` in which the unimodal
logits are computed with the head's parameters detached (``torch.func.functional_call``): the head's share
of the unimodal terms is never formed, and the encoders (behind ``h_m``) get exactly ``α ∇L_m``. Which
parameters are the head's is decided by the module given as ``head``, never by a parameter name.

**The official code's quirk** (``head_gradient="all"``): the official loop decides which parameters are the
fusion head's by ``'fusion' in name.split('.')[1]``, which only matches under ``nn.DataParallel``'s
``module.`` prefix. Run without it, no gradient is removed and the head also keeps ``α∇(L_a + L_v)``.

**The loop's clip.** After the backward passes the official loop clips the gradient of *every* parameter
jointly, ``clip_grad_norm_(model.parameters(), 40)`` (`OFFICIAL_CLIP_NORM`), then steps SGD (momentum 0.9,
weight decay 1e-4, lr 2e-3 in the run scripts). The clip is the training loop's, not part of the method:
`DGL` does not clip.

**M modalities.** Every equation is per modality; any ``M ≥ 2`` works the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from gradmod._internal import (
    check_logits_target,
    checked_ignore_index,
    per_modality,
    real_scalar,
)
from gradmod.functional import _NEVER_A_CLASS
from gradmod.history import History
from gradmod.measures import IGNORE_INDEX
from gradmod.method import Fit, Method, MethodInfo, Option, Strength, check_units

__all__ = [
    "DEFAULT_UNIMODAL_WEIGHT",
    "DGL",
    "FUSED",
    "HEAD_GRADIENTS",
    "OFFICIAL_CLIP_NORM",
    "dgl_logits",
    "dgl_losses",
    "zero_padded",
]

#: ``α``, the weight of each unimodal loss on its encoder: 4 in the official run scripts and argparse (5 also
#: appears in the scripts).
DEFAULT_UNIMODAL_WEIGHT = 4.0
#: The official loop's joint gradient-norm clip over every parameter, after the backward passes
#: (``clip_grad_norm_(model.parameters(), max_norm=40)``): the loop's, not the method's.
OFFICIAL_CLIP_NORM = 40.0
#: What the head learns from: ``"fused"`` (the paper: ``∇L_f`` only) or ``"all"`` (the official code run
#: without ``nn.DataParallel``: also ``α Σ_m ∇L_m``).
HEAD_GRADIENTS = ("fused", "all")
#: The unit of the history that holds the fused loss (the other units are the modalities).
FUSED = "fused"


def zero_padded(features: Mapping[str, Tensor], name: str) -> dict[str, Tensor]:
    """``features`` with every modality but ``name`` replaced by zeros of its shape: ``(0, …, h_m, …, 0)``."""
    return {other: value if other == name else torch.zeros_like(value) for other, value in features.items()}


def _frozen_head(head: nn.Module, features: Mapping[str, Tensor]) -> Tensor:
    """``head(features)`` with the head's parameters detached: gradient reaches the features only."""
    detached = {name: p.detach() for name, p in head.named_parameters()}
    return functional_call(head, detached, (dict(features),))


def dgl_logits(features: Mapping[str, Tensor], head: nn.Module, head_gradient: str = "fused") -> tuple[Tensor, dict[str, Tensor]]:
    """DGL's logits of one batch: ``(z, {m: z_m})`` with ``z = H(sg(h))`` and ``z_m = H(0, …, h_m, …, 0)``.

    ``z`` reaches the head's parameters only. ``head_gradient="fused"``: each ``z_m`` is computed with the
    head's parameters detached, so its gradient reaches the features ``h_m`` only; ``"all"``: through the
    head's parameters as well (the official code without ``nn.DataParallel``).
    """
    if head_gradient not in HEAD_GRADIENTS:
        raise ValueError(f"head_gradient must be one of {HEAD_GRADIENTS}, got {head_gradient!r}")
    fused = head({name: value.detach() for name, value in features.items()})
    unimodal = {}
    for name in features:
        padded = zero_padded(features, name)
        logits = _frozen_head(head, padded) if head_gradient == "fused" else head(padded)
        if not isinstance(logits, Tensor) or not isinstance(fused, Tensor) or logits.shape != fused.shape:
            raise ValueError(
                f"the head must map the features, and the features with all but {name!r}'s zeroed, to logits of "
                f"one shape; got {_shape(fused)} and {_shape(logits)}"
            )
        unimodal[name] = logits
    return fused, unimodal


def dgl_losses(
    features: Mapping[str, Tensor],
    head: nn.Module,
    target: Tensor,
    *,
    head_gradient: str = "fused",
    ignore_index: int | None = IGNORE_INDEX,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DGL's losses of one batch: ``(L_f, {m: L_m})``, ``L_f = CE(z, y)`` and ``L_m = CE(z_m, y)`` of `dgl_logits`.

    Targets equal to ``ignore_index`` count nowhere (``None``: every target counts).
    """
    fused, unimodal = dgl_logits(features, head, head_gradient)
    check_logits_target(fused, target, name="head(features)")
    ignored = _NEVER_A_CLASS if ignore_index is None else ignore_index
    return F.cross_entropy(fused, target, ignore_index=ignored), {
        name: F.cross_entropy(logits, target, ignore_index=ignored) for name, logits in unimodal.items()
    }


def _shape(value: Any) -> Any:
    return tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__


class DGL(Method):
    """Disentangled gradient learning: the encoders learn from their unimodal losses, the head from the fused loss.

    ``method.loss(features={name: h_m}, head=fusion_head, target=y)`` returns ``L_f + α Σ_m L_m`` to backward
    (module docstring): the fusion head gets ``∇L_f`` only, encoder ``m`` gets ``α ∇L_m`` only, in one
    backward pass. No optimizer hook, no state across steps besides the history.

    Args:
        modalities: the modality names, or a mapping whose keys are the names (e.g. name → encoder): two or more.
        unimodal_weight: ``α > 0``, the weight of each unimodal loss on its encoder (the official ``--alpha``,
            default 4): encoder ``m``'s gradient is ``α ∇L_m``; the head's is unaffected.
        head_gradient: ``"fused"`` (the paper) or ``"all"`` (the official code without ``nn.DataParallel``, whose
            head also keeps ``α Σ_m ∇L_m``; `HEAD_GRADIENTS`).
        ignore_index: targets equal to it count in no loss (``cross_entropy``'s −100).
        validate: check the features, the losses and the target range for every call (one host
            synchronisation); ``False`` checks shapes only.
        history_size: ``None`` keeps every call in `history`; an int keeps the last ones.

    The head is an ``nn.Module`` that maps ``{name: [B, D_m] features}`` to ``[B, C]`` logits and accepts
    zero features for any modality (a concat or sum head of `gradmod.fusion`, or the model's own head). It
    is called ``M + 1`` times per step (a head with batch-norm in train mode updates its running statistics
    at every call). The history records, per call, every modality's unimodal loss and, under `FUSED`, the fused
    loss: ``scalars()`` gives ``loss/<modality>`` and ``loss/fused``. Under ``DistributedDataParallel`` call
    the loss inside the wrapped module's forward (the head is called directly here), as for any loss that
    runs a submodule on its own.
    """

    kind = "loss"
    loss_inputs = ("features", "head", "target")
    state_version = 1

    def __init__(
        self,
        modalities: Sequence[str] | Mapping[str, Any],
        *,
        unimodal_weight: float = DEFAULT_UNIMODAL_WEIGHT,
        head_gradient: str = "fused",
        ignore_index: int | None = IGNORE_INDEX,
        validate: bool = True,
        history_size: int | None = None,
    ) -> None:
        names = tuple(modalities) if isinstance(modalities, (Mapping, nn.ModuleDict)) else modalities
        self.names: tuple[str, ...] = check_units(names, "modalities")
        if FUSED in self.names:
            raise ValueError(f"a modality named {FUSED!r} would collide with the history's fused-loss unit: rename it")
        self.unimodal_weight = real_scalar(unimodal_weight, "unimodal_weight", strict=True)
        if head_gradient not in HEAD_GRADIENTS:
            raise ValueError(f"head_gradient must be one of {HEAD_GRADIENTS}, got {head_gradient!r}")
        self.head_gradient = head_gradient
        self.ignore_index = checked_ignore_index(ignore_index)
        self.validate = bool(validate)
        self._calls = 0
        self._warned: set[str] = set()
        self._history = History((*self.names, FUSED), history_size, fields=("loss",))

    @property
    def call_count(self) -> int:
        """How many times `loss` was called."""
        return self._calls

    def loss(self, features: Mapping[str, Tensor], head: nn.Module, target: Tensor) -> Tensor:
        """The loss to backward: ``L_f + α Σ_m L_m`` (`dgl_losses`); each loss is recorded in the history."""
        features = per_modality(features, self.names, "loss(features=...)")
        if not isinstance(head, nn.Module):
            raise TypeError(
                f"head must be the fusion head as an nn.Module (DGL evaluates it with its parameters detached), got "
                f"{type(head).__name__}"
            )
        self._check_features(features)
        ordered = {name: features[name] for name in self.names}
        fused_logits, logits = dgl_logits(ordered, head, self.head_gradient)
        check_logits_target(fused_logits, target, name="head(features)")
        if self.validate:
            self._check_values(ordered, fused_logits, logits, target)
        ignored = _NEVER_A_CLASS if self.ignore_index is None else self.ignore_index
        fused = F.cross_entropy(fused_logits, target, ignore_index=ignored)
        unimodal = [F.cross_entropy(logits[name], target, ignore_index=ignored) for name in self.names]
        self._history.append(self._calls, (torch.stack([*unimodal, fused]).detach(),))
        self._calls += 1
        return fused + self.unimodal_weight * sum(unimodal)

    def _check_features(self, features: Mapping[str, Tensor]) -> None:
        batch = None
        for name in self.names:
            value = features[name]
            if not isinstance(value, Tensor) or value.dim() < 2 or not value.is_floating_point():
                raise ValueError(f"features[{name!r}] must be a floating-point [batch, ...] tensor, got {_shape(value)}")
            if value.shape[0] == 0:
                raise ValueError(f"features[{name!r}] is an empty batch: DGL needs at least one sample")
            if batch is not None and value.shape[0] != batch:
                raise ValueError(f"features[{name!r}] has batch {value.shape[0]}, features[{self.names[0]!r}] has {batch}")
            batch = value.shape[0]
        frozen = [name for name in self.names if not features[name].requires_grad]
        if frozen and torch.is_grad_enabled():
            self._warn_once(
                "frozen",
                f"features of {frozen} do not require grad: DGL trains each encoder through its unimodal loss only, "
                "so these encoders get no gradient; compute the features with grad (do not detach them)",
            )

    def _check_values(self, features: Mapping[str, Tensor], fused: Tensor, logits: Mapping[str, Tensor], target: Tensor) -> None:
        """One host synchronisation: finite features and logits, targets inside the head's classes, one target counted."""
        with torch.no_grad():
            flags = {f"features[{name!r}] contain NaN or inf": ~torch.isfinite(features[name]).all() for name in self.names}
            flags["the head's fused logits contain NaN or inf"] = ~torch.isfinite(fused).all()
            flags.update({f"the head's logits with only {name!r} contain NaN or inf": ~torch.isfinite(z).all() for name, z in logits.items()})
            classes = fused.shape[1]
            counted = torch.ones_like(target, dtype=torch.bool) if self.ignore_index is None else target != self.ignore_index
            flags[f"target holds class indices outside [0, {classes})"] = (counted & ((target < 0) | (target >= classes))).any()
            flags[f"every target equals ignore_index={self.ignore_index}: no sample to learn from"] = ~counted.any()
            raised = torch.stack(list(flags.values())).tolist()
        found = [message for message, flag in zip(flags, raised) if flag]
        if found:
            raise ValueError(f"gradmod DGL: {'; '.join(found)}")

    # ------------------------------------------------------------------ state
    def _extra_state(self) -> dict[str, Any]:
        """The call counter and the settings (DGL keeps nothing else across steps)."""
        return {
            "unimodal_weight": self.unimodal_weight,
            "head_gradient": self.head_gradient,
            "calls": self._calls,
            "warned": sorted(self._warned),
        }

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        """The settings must match this DGL's."""
        for key, mine in (("unimodal_weight", self.unimodal_weight), ("head_gradient", self.head_gradient)):
            if state[key] != mine:
                raise ValueError(f"state_dict was written with {key}={state[key]!r}; this DGL has {key}={mine!r}")
        self._calls = int(state["calls"])
        self._warned = set(state["warned"])

    def _reset(self) -> None:
        self._calls = 0
        self._warned = set()

    def __repr__(self) -> str:
        return (
            f"DGL(modalities={list(self.names)}, unimodal_weight={self.unimodal_weight:g}, "
            f"head_gradient={self.head_gradient!r})"
        )


METHODS = (
    MethodInfo(
        key="dgl",
        preset=DGL,
        title="DGL",
        kind="loss",
        paper="Wei, Luo & Luo, Boosting Multimodal Learning via Disentangled Gradient Learning, ICCV 2025",
        page="methods/dgl.md",
        observes="the encoders' features, the fusion head, the target",
        cost="M more forward passes of the fusion head (zero-padded features); one backward pass",
        fit=Fit(head="coalitions", acts_on="loss"),
        strength=Strength("unimodal_weight", DEFAULT_UNIMODAL_WEIGHT, "α: encoder m learns from α·∇CE(head(0, …, h_m, …, 0))"),
        options=(
            Option("head_gradient", "fused", "what the head learns from: the fused loss (paper) or all losses", str, HEAD_GRADIENTS),
            Option("clip_norm", OFFICIAL_CLIP_NORM, "joint gradient-norm clip over every parameter (the official loop's)", float, loop=True),
        ),
    ),
)
