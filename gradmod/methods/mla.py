"""MLA: Zhang, Yoon, Bansal & Yao, *Multimodal Representation Learning by Alternating Unimodal
Adaptation*, CVPR 2024.

MLA trains one modality per optimizer step, in turn, through one **shared head**; while the head learns
a modality it should not forget what it learnt from the others, so its weight gradient is projected
orthogonally to the feature directions it was trained on before; at test time the per-modality
predictions are fused with weights from their entropies.

**How it relates to gradmod's pipeline.** A `gradmod.Modulator` turns evidence into one gradient
coefficient per modality per step. MLA has no evidence and no coefficient: its "measure" is the mean
head input of each step, its "policy" is the schedule (which modality a step trains), and its
"applier" acts on the shared head's weight gradient, ``G ← G·P``, in the optimizer's step pre-hook, as
`gradmod.ParamsApplier` does for encoders. `MLA` therefore reuses the pieces, not the `Modulator`: the
named modalities are resolved as appliers resolve them (`gradmod.appliers`), backward passes are
watched by the modulator's backward monitor (which modality a step's gradients reached, and whether they
were discarded by a skipped ``GradScaler`` step), and the state follows the modulator's conventions.

The loop, per batch (one forward pass of every encoder, then one step per modality)::

    features = {name: encoders[name](inputs[name]) for name in mla.names}
    for name in mla.names:
        optimizer.zero_grad()
        mla.observe(name, features[name])
        F.cross_entropy(head(features[name]), target).backward()
        optimizer.step()          # the pre-hook projects the head's weight gradient

**The projection** (`owm_update`) is the recursive projector of orthogonal weight modification (OWM):
starting from ``P = I``, after each step the step's mean head input ``r`` is stored,
``P ← P − (P r)(P r)ᵀ / (α + rᵀ P r)``. For ``α > 0`` this is ``P = (I + Σ r rᵀ/α)⁻¹`` (symmetric, its
eigenvalues in ``(0, 1]``), which damps the stored directions by ``α/(α + ‖r‖²)``-like factors; ``α = 0``
gives the exact orthogonal projector onto the complement of the stored directions (idempotent). A step
is projected with the projector of the steps *before* it, then its own direction is stored.

Differences from the official code (Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation,
``utils/utils.py`` ``GSPlugin`` and ``main.py``):

* The committed code never projects: its parameter-name test looks for ``"module.weight"`` where an
  ``nn.Linear`` names its weight ``"weight"``. ``projection=None`` is what it effectively runs.
* Where it did project (its first public commit), the denominator ``α + k rᵀ`` is an outer product, so the
  update divides elementwise by a ``d × d`` matrix; with non-negative features the result collapses onto
  the mean-feature direction, the opposite of an orthogonal projection. gradmod uses the inner product
  ``α + rᵀ P r`` of OWM.
* The official update stores the current batch's direction *before* projecting its gradient, rescales
  ``P`` to unit Frobenius norm (shrinking every head gradient by about ``1/√d``) and schedules
  ``α = 0.1^(1 + b/B)`` within each epoch (batch ``b`` of ``B``). gradmod projects with the directions of
  earlier steps, does not rescale, and keeps ``α`` constant.
* Test-time fusion: the official code takes the softmax over the **batch** axis of each modality's
  ``[B, C]`` logits and one entropy per modality and batch (``reading="batch"``); the paper's per-sample
  reading is the default (``reading="sample"``). Entropies use ``p log p = 0`` at ``p = 0`` where the
  official ``log`` would give NaN.

Under ``torch.distributed`` the mean head input is all-reduced before it is stored, so every rank holds
the same ``P``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradmod._backward import BackwardMonitor
from gradmod._hooks import StepHook, StepHooked, unheld_modality
from gradmod._internal import NOT_GIVEN, distributed, per_modality, real_scalar, renamed_keyword
from gradmod.appliers import Modality, ParameterSelection
from gradmod.history import History
from gradmod.method import Fit, Method, MethodInfo, Option, Strength

__all__ = ["MLA", "PROJECTIONS", "READINGS", "entropy_fusion", "entropy_weights", "owm_update"]

#: ``projection=`` values: ``"owm"`` (the recursive projector of `owm_update`) or ``None`` (no projection).
PROJECTIONS = ("owm", None)
#: ``reading=`` values of the test-time fusion: per ``"sample"`` (the paper) or over the ``"batch"`` axis
#: (the official code).
READINGS = ("sample", "batch")
#: What the history records per modality: ``trained`` (1 for the turn's modality, 0 for the others) and
#: ``kept`` (``‖G·P‖/‖G‖`` of the head's weight gradient at the turn's modality; NaN for the others).
_RECORDED = ("trained", "kept")
#: Below this share of the head's weight gradient kept by the projection, the head barely learns (warned).
FROZEN_HEAD = 0.01
#: How often (in steps) the kept share is read on the host to check for a frozen head.
_CHECK_EVERY = 32


def _span_tolerance(dtype: torch.dtype) -> float:
    """Relative squared residual below which a direction counts as already stored (``α = 0``)."""
    return math.sqrt(torch.finfo(dtype).eps)


def owm_update(projector: Tensor, direction: Tensor, regularization: float) -> Tensor:
    """Store ``direction`` ``r`` in the projector: ``P − (P r)(P r)ᵀ / (α + rᵀ P r)`` (a new tensor).

    The orthogonal-weight-modification projector, as MLA's head-gradient modification uses it. For
    ``α > 0``, starting from the identity, ``P = (I + Σ_i r_i r_iᵀ/α)⁻¹``: symmetric, eigenvalues in
    ``(0, 1]``, independent of the order of the ``r_i``. For ``α = 0`` it is the orthogonal projector onto
    the complement of the stored directions (idempotent, ``P r_i = 0``); a direction in their span, up to
    ``rᵀ P r ≤ √ε·‖r‖²`` (``ε`` the dtype's machine epsilon: above what rounding leaves once nearly dependent
    directions were stored), leaves ``P`` unchanged.

    Args:
        projector: ``[d, d]`` symmetric projector (floating point).
        direction: ``[d]`` direction to store, e.g. the mean head input of a step.
        regularization: ``α ≥ 0`` (MLA's ``regularization``).
    """
    alpha = real_scalar(regularization, "regularization")
    if projector.dim() != 2 or projector.shape[0] != projector.shape[1] or not projector.is_floating_point():
        raise ValueError(f"projector must be a square floating-point [d, d] matrix, got {projector.dtype} {tuple(projector.shape)}")
    if direction.shape != projector.shape[:1]:
        raise ValueError(f"direction must be [d] = [{projector.shape[0]}], got shape {tuple(direction.shape)}")
    return _store_(projector.clone(), direction, alpha)


def _store_(projector: Tensor, direction: Tensor, alpha: float) -> Tensor:
    """`owm_update` in place, on checked arguments: one rank-one update, no ``d × d`` temporary.

    ``s = P r / √(α + rᵀ P r)`` and ``P ← P − s sᵀ``, which keeps ``P`` exactly symmetric.
    """
    r = direction.to(projector.dtype)
    pr = projector @ r
    residual = r @ pr
    if alpha == 0.0 and not bool(residual > _span_tolerance(projector.dtype) * (r @ r)):
        return projector
    scaled = pr / torch.sqrt(alpha + residual)
    return projector.addr_(scaled, scaled, alpha=-1.0)


def entropy_weights(logits: Mapping[str, Tensor], reading: str = "sample") -> dict[str, Tensor]:
    """MLA's test-time fusion weights: ``w_m = softmax_m(−e_m)``, lower entropy ``e_m`` → larger weight.

    * ``reading="sample"`` (the paper): ``e_{m,i} = −Σ_c p_{m,i,c} log p_{m,i,c}`` with ``p`` the softmax
      over the classes of sample ``i``; weights ``[B]`` per modality.
    * ``reading="batch"`` (the official code): ``p`` is the softmax over the *batch* axis of the ``[B, C]``
      logits and ``e_m = −Σ_{i,c} p log p``; one weight (0-d) per modality, shared by the batch.

    ``softmax_m(−e_m)`` equals the official ``exp(max e − e_m) / Σ_k exp(max e − e_k)``. ``p log p`` is
    taken as 0 where ``p = 0``. Two or more modalities, ``[B, C]`` logits of one shape.
    """
    if reading not in READINGS:
        raise ValueError(f"reading must be one of {READINGS}, got {reading!r}")
    if not isinstance(logits, Mapping) or len(logits) < 2:
        raise ValueError("entropy_weights needs a mapping of two or more modality names to [batch, classes] logits")
    shapes = {name: tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__ for name, z in logits.items()}
    first = next(iter(logits.values()))
    if any(not isinstance(z, Tensor) or z.dim() != 2 or z.shape != first.shape for z in logits.values()):
        raise ValueError(f"logits must be [batch, classes] tensors of one shape, got {shapes}")
    axis = 1 if reading == "sample" else 0
    entropies = []
    for z in logits.values():
        p = torch.softmax(z.to(torch.promote_types(z.dtype, torch.float32)), dim=axis)
        e = torch.special.entr(p)
        entropies.append(e.sum(1) if reading == "sample" else e.sum())
    weights = torch.softmax(-torch.stack(entropies), dim=0)
    return dict(zip(logits, weights.unbind(0)))


def entropy_fusion(logits: Mapping[str, Tensor], reading: str = "sample") -> Tensor:
    """Fused logits ``Σ_m w_m z_m`` with `entropy_weights` (per sample or per batch), ``[B, C]``."""
    weights = entropy_weights(logits, reading)
    terms = [weights[name].to(z.dtype).reshape(-1, 1) * z for name, z in logits.items()]
    return torch.stack(terms).sum(0)


def _from_version_1(state: dict[str, Any]) -> dict[str, Any]:
    """Version 1 named the regulariser ``alpha`` and kept no history."""
    state["regularization"] = state.pop("alpha")
    width = len(_RECORDED) * len(state["names"]) + 3
    state["history"] = {"steps": [], "rows": torch.empty(0, width), "dropped": 0}
    return state


class MLA(StepHooked, Method):
    """Alternating unimodal steps through a shared head, with its weight gradient projected (MLA).

    Call `attach` once, then for every optimizer step `observe` which modality it trains and that
    modality's head inputs; the step pre-hook checks the step, projects the head's weight gradient and
    stores the step's mean head input (module docstring). At test time, `fused_logits`.

    Args:
        modalities: name → encoder (``nn.Module`` or parameters), two or more, no parameter shared.
        head: the shared head, applied to each modality's features alone; an ``nn.Linear`` whose
            ``in_features`` is the features' width when ``projection="owm"``, any module otherwise.
        projection: ``"owm"`` (default; `owm_update`) or ``None`` (no projection: what the official code
            effectively runs).
        regularization: ``α ≥ 0`` of `owm_update` (``0``: the exact orthogonal projector): a regulariser, so
            *smaller* projects harder; it acts against the squared norm of the mean head input (each stored
            direction ``r`` is damped by about ``α/(α + ‖r‖²)``), so pick it on that scale — a projection that keeps
            less than 1 % of the head's weight gradient is warned about. ``alpha=`` is its old name.

    Every step must train one modality: a step without `observe`, a backward pass that reached another
    modality's encoder, or none of the turn's encoder, raises a ``RuntimeError`` naming the problem.
    Use ``optimizer.zero_grad()`` with its default ``set_to_none=True``: a zero-filled gradient makes the
    optimizer apply momentum and weight decay to the other encoders at every turn (warned once).
    """

    kind = "turns"
    state_version = 2
    _migrations = {1: _from_version_1}

    def __init__(
        self,
        modalities: Mapping[str, Modality] | nn.ModuleDict,
        head: nn.Module,
        *,
        projection: str | None = "owm",
        regularization: float = 0.1,
        history_size: int | None = None,
        **renamed: Any,
    ) -> None:
        alpha = renamed_keyword(renamed, "alpha", "regularization", "MLA")
        if renamed:
            raise TypeError(f"MLA got unexpected keyword arguments {sorted(renamed)}")
        if alpha is not NOT_GIVEN:
            regularization = alpha
        if not isinstance(modalities, (Mapping, nn.ModuleDict)) or len(modalities) < 2:
            raise ValueError("modalities must be a mapping of two or more names to modules or parameter lists")
        if projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
        if not isinstance(head, nn.Module):
            raise TypeError(f"head must be the shared nn.Module, got {type(head).__name__}")
        if projection is not None and not isinstance(head, nn.Linear):
            raise TypeError(
                f"projection={projection!r} projects the weight gradient of a linear head: head must be an "
                f"nn.Linear, got {type(head).__name__} (projection=None trains any head)"
            )
        self.names: tuple[str, ...] = tuple(modalities)
        self.head = head
        self.projection = projection
        self.regularization = real_scalar(regularization, "regularization")
        self._selection = ParameterSelection(modalities, None, require_some=False)
        self._check_head_is_shared()
        self._projector: Tensor | None = None
        if projection is not None:
            weight = head.weight
            dtype = torch.float32 if weight.device.type == "mps" else torch.float64
            self._projector = torch.eye(weight.shape[1], dtype=dtype, device=weight.device)
        self._steps = 0
        self._turn: str | None = None
        self._feature_sum: Tensor | None = None
        self._feature_count = 0
        self._reached: set[int] = set()
        self._history = History(self.names, history_size, fields=_RECORDED)
        self._warned: set[str] = set()
        self._driven = False  # attached, or stepped by a trainer
        self._monitor = BackwardMonitor(self._pass_ended)
        self._monitor.watch(self._selection.groups())
        self._hook = StepHook("MLA", self.step, lambda found_inf: self._drop_turn())

    def _check_head_is_shared(self) -> None:
        owner = {id(p): (name, pname) for name, params in self._selection.named().items() for pname, p in params}
        for pname, p in self.head.named_parameters():
            if id(p) in owner:
                name, encoder_name = owner[id(p)]
                raise ValueError(
                    f"head parameter {pname!r} is also {encoder_name!r} of modality {name!r}: the shared head must "
                    "not be part of an encoder"
                )

    # ------------------------------------------------------------------ attach
    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """What `attach` checks, for trainers that call `step` themselves (Lightning's manual optimization): the
        optimizer holds the head's weight (when projecting) and parameters of every modality. Once attached, each
        ``optimizer.step()`` checks and projects its turn first; a step ``GradScaler`` skips drops its turn."""
        if self.projection is not None and unheld_modality(optimizer, {"head": [self.head.weight]}) is not None:
            raise ValueError("the optimizer does not hold the shared head's weight: attach MLA to the optimizer that steps the head")
        name = unheld_modality(optimizer, dict(zip(self.names, self._selection.groups())))
        if name is not None:
            raise ValueError(f"the optimizer holds none of modality {name!r}'s parameters: attach MLA to the optimizer that steps the encoders")
        self._driven = True

    # ------------------------------------------------------------------ observe
    @property
    def step_count(self) -> int:
        """Number of optimizer steps taken (one per turn; steps skipped by ``GradScaler`` excluded)."""
        return self._steps

    @property
    def projector(self) -> Tensor | None:
        """The current projector ``P`` (``[d, d]``, updated in place at each step), ``None`` without projection."""
        return self._projector

    def observe(self, name: str, features: Tensor) -> None:
        """The coming optimizer step trains modality ``name``; ``features`` ``[B, d]`` are its head inputs.

        Several calls before one step (micro-batches) add up; all must name the same modality.
        """
        if name not in self.names:
            raise ValueError(f"unknown modality {name!r}; the modalities are {list(self.names)}")
        if not isinstance(features, Tensor) or features.dim() != 2 or features.shape[0] == 0:
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(f"features of modality {name!r} must be a non-empty [batch, width] tensor, got {shape}")
        if self._projector is not None and features.shape[1] != self._projector.shape[0]:
            raise ValueError(
                f"features of modality {name!r} have width {features.shape[1]}, the head takes {self._projector.shape[0]}"
            )
        if self._monitor.discarded():  # the last turn's gradients were discarded without a step
            if not self._driven and self._steps == 0:
                raise RuntimeError(
                    "gradmod MLA: the last turn's gradients were used or discarded without MLA stepping: MLA is not "
                    "attached, so it neither projects the head's gradient nor checks the turns; call "
                    "mla.attach(optimizer) once before training"
                )
            self._drop_turn()
        if self._turn is not None and self._turn != name:
            raise ValueError(
                f"observe({name!r}) during modality {self._turn!r}'s turn: MLA trains one modality per optimizer "
                "step; call optimizer.step() before the next modality's turn"
            )
        self._turn = name
        if self._projector is not None:
            total = features.detach().to(self._projector.dtype).sum(0)
            self._feature_sum = total if self._feature_sum is None else self._feature_sum + total.to(self._feature_sum.device)
            self._feature_count += features.shape[0]

    def _pass_ended(self, reached: frozenset[int], discarded: bool) -> None:
        if discarded:
            self._drop_turn()
        self._reached |= reached

    def _drop_turn(self) -> None:
        self._turn = None
        self._feature_sum = None
        self._feature_count = 0
        self._reached.clear()
        self._monitor.forget()

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self) -> None:
        """Check the turn, project the head's weight gradient, store the turn's mean head input.

        Called by the hook of `attach`; call it yourself before ``optimizer.step()`` when not attached.
        """
        if self._turn is None:
            raise RuntimeError(
                "gradmod MLA: optimizer.step() without observe(name, features) since the last step: every MLA step "
                "trains one modality, named by observe()"
            )
        index = self.names.index(self._turn)
        self._check_reached(index)
        self._warn_zero_filled(index)
        kept = torch.full((len(self.names),), math.nan)
        trained = torch.zeros(len(self.names))
        trained[index] = 1.0
        if self._projector is not None:
            share = self._project()
            self._store_direction()
            kept = kept.to(share.device)
            kept[index] = share
            if self._steps % _CHECK_EVERY == 0:
                self._check_head_learns(float(share))
        self._history.append(self._steps, (trained, kept))
        self._steps += 1
        self._drop_turn()
        self._monitor.watch(self._selection.groups())

    def _check_reached(self, index: int) -> None:
        others = sorted(self.names[i] for i in self._reached if i != index)
        if others:
            raise RuntimeError(
                f"gradmod MLA: a backward pass during modality {self._turn!r}'s turn reached the encoder of {others}: "
                f"MLA trains one modality per step; compute this step's loss from {self._turn!r}'s features only"
            )
        trainable = any(p.requires_grad for p in self._selection.groups()[index])
        if trainable and index not in self._reached:
            raise RuntimeError(
                f"gradmod MLA: no backward pass reached modality {self._turn!r}'s encoder during its turn (were its "
                "features detached?)"
            )

    def _warn_zero_filled(self, index: int) -> None:
        filled = [
            name
            for i, (name, params) in enumerate(zip(self.names, self._selection.groups()))
            if i != index and any(p.grad is not None for p in params)
        ]
        if filled and "zero_filled" not in self._warned:
            self._warned.add("zero_filled")
            warnings.warn(
                f"gradmod MLA: modalities {filled} hold gradients during {self._turn!r}'s turn (not zeroed, or zero-filled "
                "by zero_grad(set_to_none=False)): optimizer.step() applies them, or momentum and weight decay, to "
                "those encoders at every turn; call zero_grad() (set_to_none=True) before each turn (shown once)",
                RuntimeWarning,
                stacklevel=4,
            )

    def _project(self) -> Tensor:
        """``G ← G·P`` on the head's weight gradient; returns ``‖G·P‖ / ‖G‖`` (a 0-d tensor, no sync)."""
        grad = self.head.weight.grad
        if grad is None:
            raise RuntimeError(
                f"gradmod MLA: the shared head's weight has no gradient at modality {self._turn!r}'s step: compute "
                "the turn's loss through the head given to MLA"
            )
        if grad.layout != torch.strided:
            raise ValueError(f"gradmod MLA: the head's weight gradient has layout {grad.layout}; MLA projects dense gradients")
        if self._projector.device != grad.device:
            self._projector = self._projector.to(grad.device)
        plain = grad.to(self._projector.dtype)
        projected = plain @ self._projector
        grad.copy_(projected)
        return projected.norm() / plain.norm().clamp_min(torch.finfo(plain.dtype).tiny)

    def _store_direction(self) -> None:
        total = torch.cat([self._feature_sum, self._feature_sum.new_tensor([self._feature_count])])
        if distributed():
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        mean = total[:-1] / total[-1]
        _store_(self._projector, mean.to(self._projector.device), self.regularization)

    # ------------------------------------------------------------------ test time
    def fused_logits(self, features: Mapping[str, Tensor], reading: str = "sample") -> Tensor:
        """Test-time fusion: the head on each modality's features, fused by `entropy_fusion`."""
        features = per_modality(features, self.names, "fused_logits(features=...)")
        return entropy_fusion({name: self.head(features[name]) for name in self.names}, reading)

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every step, oldest first: ``{"step", "status", "trained", "kept", "modality"}`` — ``trained`` and ``kept``
        per modality (``kept = ‖G·P‖/‖G‖`` of the head's weight gradient at the turn's modality, NaN elsewhere
        and without projection), ``modality`` the one the step trained. Reading synchronises once."""
        return [self._named_turn(record) for record in self._history.records()]

    @property
    def last(self) -> dict[str, Any] | None:
        """The last step's record (as in `history`), or ``None``."""
        record = self._history.last()
        return None if record is None else self._named_turn(record)

    @staticmethod
    def _named_turn(record: dict[str, Any]) -> dict[str, Any]:
        return {**record, "modality": next(name for name, flag in record["trained"].items() if flag == 1.0)}

    def _check_head_learns(self, kept: float) -> None:
        if kept < FROZEN_HEAD:
            self._warn_once(
                "frozen_head",
                f"the projection keeps {kept:.2%} of the shared head's weight gradient at step {self._steps}: the head "
                f"barely learns; regularization={self.regularization:g} is small against the squared norm of the mean "
                "head input, raise it towards that scale (or use projection=None)",
            )

    def skip_step(self) -> None:
        """The optimizer skips this step (``GradScaler`` found ``inf``): its turn is dropped, nothing is counted."""
        self._drop_turn()

    # ------------------------------------------------------------------ history and state
    def _extra_state(self) -> dict[str, Any]:
        """Everything that changes results: the projector, the step count and a turn observed but not stepped."""
        return {
            "projection": self.projection,
            "regularization": self.regularization,
            "projector": None if self._projector is None else self._projector.detach().cpu().clone(),
            "steps": self._steps,
            "turn": self._turn,
            "feature_sum": None if self._feature_sum is None else self._feature_sum.detach().cpu().clone(),
            "feature_count": self._feature_count,
            "warned": sorted(self._warned),
        }

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Restore a state saved by an MLA with the same modalities, projection and regularization."""
        for key, mine in (("projection", self.projection), ("regularization", self.regularization)):
            if state[key] != mine:
                raise ValueError(f"state_dict has {key}={state[key]!r}, this MLA has {key}={mine!r}")
        projector = state["projector"]
        if self._projector is not None:
            if tuple(projector.shape) != tuple(self._projector.shape):
                raise ValueError(f"saved projector is {tuple(projector.shape)}, this head needs {tuple(self._projector.shape)}")
            self._projector = projector.to(self._projector.device, self._projector.dtype).clone()
        self._steps = int(state["steps"])
        self._drop_turn()
        self._turn = state["turn"]
        saved_sum = state["feature_sum"]
        device = self.head.weight.device if self._projector is None else self._projector.device
        self._feature_sum = None if saved_sum is None else saved_sum.to(device).clone()
        self._feature_count = int(state["feature_count"])
        self._warned = set(state.get("warned", ()))

    def _reset(self) -> None:
        """Back to the identity projector and step 0."""
        if self._projector is not None:
            self._projector = torch.eye(self._projector.shape[0], dtype=self._projector.dtype, device=self._projector.device)
        self._steps = 0
        self._drop_turn()
        self._warned = set()

    def __repr__(self) -> str:
        return f"MLA(modalities={list(self.names)}, projection={self.projection!r}, regularization={self.regularization:g})"


METHODS = (
    MethodInfo(
        key="mla",
        preset=MLA,
        title="MLA",
        kind="turns",
        paper="Zhang et al., Multimodal Representation Learning by Alternating Unimodal Adaptation, CVPR 2024",
        page="methods/mla.md",
        observes="per step: the modality it trains + its head inputs",
        cost="M optimizer steps per batch; project the head's weight gradient, O(C·d²)",
        fit=Fit(head="shared", acts_on="gradient direction", trainers=("lightning",)),
        strength=Strength(
            "regularization", 0.1, "α of the projector P ← P − (Pr)(Pr)ᵀ/(α + rᵀPr): smaller projects harder", "smaller"
        ),
        options=(Option("projection", "owm", "the head-gradient projection; none is what the official code runs", str, ("owm", "none")),),
    ),
)
