"""MMPareto: the multimodal and the unimodal gradient of each encoder, combined by the Pareto rule.

Wei & Hu, *MMPareto: Boosting Multimodal Learning with Innocent Unimodal Assistance*, ICML 2024 (official
code ``GeWu-Lab/MMPareto_ICML2024``). A model with a fused head and one unimodal head per modality is
trained on ``L_mm + Σ_m L_m``. For the parameters ``θ_m`` of encoder ``m`` take the gradient of the
multimodal loss, ``g = ∇_{θ_m} L_mm``, and of its unimodal loss, ``u = ∇_{θ_m} L_m``:

* **direction**: when they agree (``⟨g, u⟩ ≥ 0``) the weights are ``(½, ½)``; when they conflict, the
  two-task min-norm (MGDA) weights, ``w = argmin_{c ∈ [0, 1]} ‖c·g + (1 − c)·u‖``, closed form
  ``w = (‖u‖² − ⟨g, u⟩) / ‖g − u‖²`` (`min_norm_weight`); then ``h = 2(w·g + (1 − w)·u)``;
* **magnitude**: ``h`` is rescaled to the norm of the plain sum, ``γ · ‖g + u‖ · h/‖h‖`` over the whole
  encoder (``rule="paper"``, ``γ = 1``). The official code rescales each parameter tensor on its own and
  only upwards, and multiplies by ``γ = 1.5`` (``rule="official"``, `combine_gradients`).

The heads keep the plain gradient of ``L_mm + Σ_m L_m``.

**In a loop** (three lines): ``mod = MMPareto(encoders)``, ``mod.attach(optimizer)``, and
``mod.backward(loss_mm, {"audio": loss_a, "visual": loss_v})`` instead of ``loss.backward()``. A
``loss.backward()`` left in before it (its gradients would be added to MMPareto's) raises by name; a step
without ``mod.backward()`` warns. **In a trainer** that runs the backward pass itself, ``mod.observe(loss_mm,
unimodal_losses)`` in the training step (the trainer backwards ``loss_mm + Σ L_m``) and the callback's
``mod.step()`` before the optimizer step, which writes the combination into the encoders' gradients.

**How it relates to the pipeline.** MMPareto produces no coefficient per modality, so it is not a
measure → policy → applier composition of `gradmod.Modulator`; it needs the gradient of each loss
separately, which one ``backward()`` of the summed loss cannot give. It is a drop-in of one line instead:
``mod.backward(loss_mm, {"audio": loss_a, "visual": loss_v})`` replaces ``loss.backward()``, and writes
into ``.grad`` what the optimizer should see. It shares gradmod's conventions: named modalities whose
parameters are resolved from their modules when used (`gradmod.appliers`' selection), a per-step
`history`, a versioned `state_dict`, and ``torch.distributed`` (the per-loss gradients are averaged
across ranks before they are combined, as DDP averages the rest).

**Cost per** ``backward()``: one ``autograd.grad`` of ``L_mm`` down to the encoders, one of each ``L_m``
down to its encoder, and the ``backward()`` of the summed loss (for the heads): about three backward
passes instead of one (the official code runs ``M + 2``); memory for two more copies of the encoders'
gradients.

**Accumulation.** Several ``backward()`` calls before one optimizer step (micro-batches) accumulate the
per-loss gradients, and each call rewrites the encoders' ``.grad`` as the combination of everything
accumulated so far: the rule is nonlinear, and this makes k micro-batches equal one k-times larger
batch. A new step starts when the encoders' gradients were reset (``zero_grad()``) since the last
call. The encoders' ``.grad`` is final after every call, so gradient clipping and ``GradScaler`` work
as usual (pass ``scaler.scale(loss)`` for each loss).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradmod._backward import BackwardMonitor
from gradmod._hooks import StepHook, StepHooked, unheld_modality
from gradmod._internal import check_names, distributed, real_scalar
from gradmod.appliers import Modality, ParameterSelection
from gradmod.history import History
from gradmod.method import Fit, Method, MethodInfo, Option, Strength

__all__ = [
    "DEFAULT_GAMMA", "RULES", "MMPareto", "combine_gradients", "min_norm_weight", "official_min_norm_weight", "pareto_weight"]

#: ``"paper"``: exact min-norm weights, whole-encoder rescaling to ``γ·‖g + u‖``, ``γ = 1`` by default;
#: ``"official"``: the official code's weights (0.999/0.001 at the ends), per-tensor upward rescaling, ``γ = 1.5``.
RULES = ("paper", "official")
#: Relative tolerance of the trainer's encoder gradient against ``s·(g + u)`` in a step that `observe` deferred.
BACKWARD_MATCH = 1e-3
#: The magnitude γ of each rule when none is given: 1 for the paper's, 1.5 (hard-coded there) for the official code's.
DEFAULT_GAMMA = {"paper": 1.0, "official": 1.5}
#: What `MMPareto.history` records per modality and step.
_RECORDED = ("cosine", "unimodal_weight", "scale")


# ----------------------------------------------------------------------------------------- the rule
def min_norm_weight(v11: Tensor, v12: Tensor, v22: Tensor) -> Tensor:
    """The two-task min-norm weight ``w = argmin_{c ∈ [0, 1]} ‖c·g₁ + (1 − c)·g₂‖`` from the inner products
    ``v11 = ‖g₁‖²``, ``v12 = ⟨g₁, g₂⟩``, ``v22 = ‖g₂‖²``: ``clamp((v22 − v12) / (v11 + v22 − 2·v12), 0, 1)``,
    and ½ when ``g₁ = g₂`` (every ``c`` is optimal). Elementwise on tensors, no host synchronisation.
    """
    v11, v12, v22 = torch.as_tensor(v11), torch.as_tensor(v12), torch.as_tensor(v22)
    denominator = v11 + v22 - 2 * v12
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator > 0, ((v22 - v12) / safe).clamp(0.0, 1.0), torch.full_like(denominator, 0.5))


def official_min_norm_weight(v11: Tensor, v12: Tensor, v22: Tensor) -> Tensor:
    """The official solver's two-task weight (``MinNormSolver._min_norm_element_from2``): 0.999 when
    ``v12 ≥ v11``, 0.001 when ``v12 ≥ v22``, else ``(v22 − v12) / (v11 + v22 − 2·v12)``."""
    v11, v12, v22 = torch.as_tensor(v11), torch.as_tensor(v12), torch.as_tensor(v22)
    denominator = v11 + v22 - 2 * v12
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    inner = (v22 - v12) / safe
    return torch.where(v12 >= v11, torch.full_like(inner, 0.999), torch.where(v12 >= v22, torch.full_like(inner, 0.001), inner))


def pareto_weight(v11: Tensor, v12: Tensor, v22: Tensor, rule: str = "paper") -> Tensor:
    """The weight of the multimodal gradient (the unimodal one gets 1 minus it): ½ when the gradients do not
    conflict, the min-norm weight when they do. ``"paper"``: conflict means ``⟨g, u⟩ < 0`` (a zero
    gradient conflicts with nothing), exact weight; ``"official"``: conflict means cosine ``≤ 0``, the
    official solver's weight."""
    _check_rule(rule)
    v12 = torch.as_tensor(v12)
    if rule == "paper":
        return torch.where(v12 < 0, min_norm_weight(v11, v12, v22), torch.full_like(v12, 0.5))
    return torch.where(v12 > 0, torch.full_like(v12, 0.5), official_min_norm_weight(v11, v12, v22))


def _check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")


def _computable(tensor: Tensor) -> Tensor:
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """``Σ_t ⟨a_t, b_t⟩`` over paired tensors: each tensor's product in its dtype (float32 at least), their sum
    in float64."""
    return torch.stack([torch.dot(_computable(x).reshape(-1), _computable(y).reshape(-1)).double() for x, y in zip(a, b)]).sum()


def _rounding(tensors: Sequence[Tensor], magnitude: Tensor) -> Tensor:
    """A bound on the norm of the rounding error of ``h = 2(w·g + (1 − w)·u)`` (from the products and from
    ``w`` itself), for ``magnitude = ‖g‖ + ‖u‖``: a direction shorter than this is made of rounding errors."""
    return 16 * torch.finfo(tensors[0].dtype).eps * magnitude


def _orthogonal_to_difference(
    directions: Sequence[Tensor], multimodal: Sequence[Tensor], unimodal: Sequence[Tensor], squared_difference: Tensor, interior: Tensor
) -> list[Tensor]:
    """``h − (⟨h, g − u⟩ / ‖g − u‖²)·(g − u)`` where ``interior`` (the min-norm weight strictly inside (0, 1)).

    An interior min-norm point is orthogonal to ``g − u``, so the removed part is zero in exact arithmetic; in
    floating point it is the rounding error of ``w·g + (1 − w)·u``, which, when ``g`` and ``u`` nearly cancel,
    is comparable to ``h`` and would tilt the rescaled direction out of the common descent cone
    (``⟨ĝ, g⟩ < 0`` or ``⟨ĝ, u⟩ < 0``). What rounding leaves outside the span of ``g`` and ``u`` changes
    neither loss to first order."""
    differences = [g - u for g, u in zip(multimodal, unimodal)]
    along = _dot(directions, differences) / torch.where(interior, squared_difference, 1.0)
    along = torch.where(interior, along, 0.0)
    return [h - along.to(h.dtype) * d for h, d in zip(directions, differences)]


def combine_gradients(
    multimodal: Sequence[Tensor], unimodal: Sequence[Tensor], rule: str = "paper", gamma: float | None = None
) -> tuple[list[Tensor], dict[str, Tensor]]:
    """MMPareto's gradient for one encoder from its multimodal gradient ``g`` and unimodal gradient ``u``
    (paired lists of tensors, one pair per parameter).

    With ``w`` from `pareto_weight` (over the whole encoder) and ``h_t = 2(w·g_t + (1 − w)·u_t)``:

    * ``"paper"``: ``γ · ‖g + u‖ / ‖h‖ · h`` with norms over the whole encoder. When the gradients cancel
      (``h`` is no longer than its rounding error, e.g. exactly opposite gradients: Pareto-stationary, no
      common descent direction) the result is 0 rather than rounding errors rescaled to ``‖g + u‖``. Before
      rescaling, ``h``'s component along ``g − u`` (zero in exact arithmetic) is removed, so nearly cancelling
      gradients still give a common descent direction;
    * ``"official"``: per tensor ``t``, ``γ · d_t · h_t`` with ``d_t = ‖g_t + u_t‖ / ‖h_t‖`` when ``d_t > 1``,
      else ``γ · h_t``; a tensor whose ``h_t`` is no longer than its rounding error is not rescaled (the
      official code would divide by it, and give NaN for ``h_t = 0``).

    ``gamma=None``: 1 for ``"paper"``, 1.5 for ``"official"``. Returns the combined tensors and, as 0-d
    tensors, the cosine of ``g`` and ``u``, the unimodal weight ``1 − w`` and the scale
    ``‖result‖ / ‖g + u‖``. No host synchronisation.
    """
    _check_rule(rule)
    gamma = DEFAULT_GAMMA[rule] if gamma is None else real_scalar(gamma, "gamma", strict=True)
    if len(multimodal) != len(unimodal) or not multimodal:
        raise ValueError(f"need paired, non-empty lists of gradients, got {len(multimodal)} and {len(unimodal)}")
    for g, u in zip(multimodal, unimodal):
        if g.shape != u.shape:
            raise ValueError(f"paired gradients must have one shape, got {tuple(g.shape)} and {tuple(u.shape)}")
    v11, v12, v22 = _dot(multimodal, multimodal), _dot(multimodal, unimodal), _dot(unimodal, unimodal)
    weight = pareto_weight(v11, v12, v22, rule)
    directions = [2 * (weight.to(g.dtype) * g + (1 - weight).to(u.dtype) * u) for g, u in zip(multimodal, unimodal)]
    plain_norm = (v11 + 2 * v12 + v22).clamp_min(0).sqrt()
    if rule == "paper":
        interior = (v12 < 0) & (weight > 0) & (weight < 1)
        directions = _orthogonal_to_difference(directions, multimodal, unimodal, v11 + v22 - 2 * v12, interior)
        h_norm = _dot(directions, directions).sqrt()
        noise = _rounding(directions, v11.sqrt() + v22.sqrt())
        factor = gamma * torch.where(h_norm > noise, plain_norm / torch.where(h_norm > 0, h_norm, 1.0), 0.0)
        combined = [factor.to(h.dtype) * h for h in directions]
    else:
        combined = []
        for g, u, h in zip(multimodal, unimodal, directions):
            plain_t = torch.linalg.vector_norm(_computable(g + u))
            h_t = torch.linalg.vector_norm(_computable(h))
            magnitude = torch.linalg.vector_norm(_computable(g)) + torch.linalg.vector_norm(_computable(u))
            ratio = torch.where(h_t > _rounding([h], magnitude), plain_t / torch.where(h_t > 0, h_t, 1.0), 1.0)
            combined.append(gamma * torch.where(ratio > 1, ratio, 1.0).to(h.dtype) * h)
    result_norm = _dot(combined, combined).sqrt()
    stats = {
        "cosine": v12 / (v11 * v22).clamp_min(1e-16).sqrt(),
        "unimodal_weight": 1 - weight,
        "scale": torch.where(plain_norm > 0, result_norm / torch.where(plain_norm > 0, plain_norm, 1.0), 0.0),
    }
    return combined, stats


# ----------------------------------------------------------------------------------------- drop-in
def _from_version_1(state: dict[str, Any]) -> dict[str, Any]:
    """Version 1 kept its history as ``(step, stats [3, M])`` pairs and the drop count beside them."""
    entries = state.pop("history")
    rows = [torch.cat([stats.float().reshape(-1), torch.ones(3)]) for _, stats in entries]  # applied
    width = len(_RECORDED) * len(state["names"]) + 3
    state["history"] = {
        "steps": [int(step) for step, _ in entries],
        "rows": torch.stack(rows) if rows else torch.empty(0, width),
        "dropped": int(state.pop("dropped", 0)),
    }
    return state


class MMPareto(StepHooked, Method):
    """MMPareto as a drop-in: ``mod.backward(loss_mm, {name: unimodal loss})`` instead of ``loss.backward()``.

    Each call computes, for every modality's encoder, the gradient of the multimodal loss and of that
    modality's unimodal loss, combines them (`combine_gradients`) and writes the result into the encoders'
    ``.grad``; the other parameters (the heads) get the plain gradient of ``L_mm + Σ_m L_m``. Under
    ``torch.distributed`` the per-loss gradients are averaged across ranks first (one ``all_reduce`` per
    call), so every replica writes the same gradient, that of the global batch.

    Args:
        modalities: name → encoder (``nn.Module`` or iterable of parameters), two or more, no parameter
            shared; the unimodal heads belong to no modality.
        rule: ``"paper"`` (default) or ``"official"`` (`RULES`).
        gamma: the magnitude factor ``γ`` (default 1 for ``"paper"``, 1.5 for ``"official"``).
        history_size: ``None`` keeps every step in `history`; an int keeps the last ones.
    """

    kind = "backward"
    state_version = 2
    _migrations = {1: _from_version_1}

    def __init__(
        self,
        modalities: Mapping[str, Modality] | nn.ModuleDict,
        *,
        rule: str = "paper",
        gamma: float | None = None,
        history_size: int | None = None,
    ) -> None:
        if not isinstance(modalities, (Mapping, nn.ModuleDict)) or len(modalities) < 2:
            raise ValueError("modalities must be a mapping of two or more names to encoders (modules or parameter lists)")
        _check_rule(rule)
        self._selection = ParameterSelection(modalities, None, require_some=True)
        self.names: tuple[str, ...] = self._selection.names
        self.rule = rule
        self.gamma = DEFAULT_GAMMA[rule] if gamma is None else real_scalar(gamma, "gamma", strict=True)
        self._history = History(self.names, history_size, fields=_RECORDED)
        self._step = -1  # index of the current step (gradient round); -1 before the first backward()
        self._round_open = False  # a backward()/observe() round that no optimizer step has ended yet
        self._deferred = False  # observe(): the combination is written by step()
        # the current step: per parameter (by id) its parameter, accumulated (g, u) and the .grad before it
        self._accumulated: dict[int, tuple[Tensor, Tensor, Tensor, Tensor | None]] = {}
        self._written: list[tuple[Tensor, weakref.ReferenceType, int]] = []
        self._inside = False  # inside backward(): the passes the monitor sees are MMPareto's own
        self._foreign = False  # a backward pass outside MMPareto reached the encoders since their gradients were reset
        self._monitor = BackwardMonitor(self._pass_ended)
        self._monitor.watch(self._selection.groups())
        self._hook = StepHook("MMPareto", self.step, lambda found_inf: self.skip_step())
        self._driven = False  # attached, or stepped by a trainer

    @property
    def params(self) -> dict[str, list[Tensor]]:
        """The parameters of each modality's encoder (resolved now)."""
        return dict(zip(self.names, self._selection.groups()))

    @property
    def step_count(self) -> int:
        """How many steps (gradient rounds) `backward` or `observe` has seen."""
        return self._step + 1

    # --------------------------------------------------------------------------- attach
    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """What `attach` checks, for trainers that call `step` themselves: the optimizer holds the encoders. Once
        attached, `step` runs before every ``optimizer.step()`` (a step without `backward` or `observe` warns)."""
        name = unheld_modality(optimizer, self.params)
        if name is not None:
            raise ValueError(
                f"the optimizer holds none of modality {name!r}'s parameters: attach MMPareto to the optimizer that "
                "steps the encoders"
            )
        self._driven = True

    # --------------------------------------------------------------------------- backward
    def backward(self, multimodal_loss: Tensor, unimodal_losses: Mapping[str, Tensor], *, retain_graph: bool = False) -> None:
        """Backward pass of ``multimodal_loss + Σ unimodal_losses`` with the encoders' gradients combined.

        ``unimodal_losses`` maps each modality name to the loss of its unimodal head. Every loss is a 0-d
        tensor that requires grad; each unimodal loss must reach its own encoder. A backward pass that reached
        the encoders since their gradients were last reset, other than MMPareto's own (a ``loss.backward()``
        left in the loop), raises ``RuntimeError``: its gradients would be added to MMPareto's.
        """
        if self._foreign and not self._monitor.discarded():
            self._foreign = False
            raise RuntimeError(
                "gradmod MMPareto: a backward pass outside MMPareto.backward() reached the encoders since their "
                "gradients were reset, so they would get its gradient on top of MMPareto's (and the heads theirs twice): "
                "remove the loss.backward() before mod.backward(), or zero the gradients first"
            )
        losses = self._checked_losses(multimodal_loss, unimodal_losses)
        groups = self._accumulate_losses(losses)
        self._deferred = False
        for p in self._combined_params():
            p.grad = None  # the summed loss's gradient of the encoders is replaced below
        self._inside = True
        try:
            sum(losses).backward(retain_graph=retain_graph)
        finally:
            self._inside = False
        self._write(groups, record=True)

    def observe(self, multimodal_loss: Tensor, unimodal_losses: Mapping[str, Tensor]) -> None:
        """For trainers that run the backward pass themselves: take this batch's per-loss encoder gradients now
        (the losses' graphs are kept for the trainer's ``backward()`` of ``multimodal_loss + Σ unimodal_losses``);
        `step`, before the optimizer step, replaces the encoders' gradients by their combination, at the scale of
        the trainer's backward passes (a loss divided by the accumulation count, clipping)."""
        self._accumulate_losses(self._checked_losses(multimodal_loss, unimodal_losses))
        self._deferred = True

    def _accumulate_losses(self, losses: list[Tensor]) -> list[list[Tensor]]:
        """Add this call's per-loss encoder gradients to the round's (averaged over ranks); the encoder groups."""
        groups = [[p for p in params if p.requires_grad] for params in self._selection.groups()]
        frozen = [name for name, params in zip(self.names, groups) if not params]
        if frozen:
            raise ValueError(f"the encoders of {frozen} have no parameter that requires grad: MMPareto has nothing to combine there")
        everything = [p for params in groups for p in params]
        multimodal = list(torch.autograd.grad(losses[0], everything, retain_graph=True, allow_unused=True))
        unimodal: list[Tensor | None] = []
        for name, params, loss in zip(self.names, groups, losses[1:]):
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            if all(grad is None for grad in grads):
                raise ValueError(
                    f"the unimodal loss of modality {name!r} reaches none of {name!r}'s encoder parameters: "
                    f"pass the loss of {name!r}'s unimodal head as unimodal_losses[{name!r}]"
                )
            unimodal.extend(grads)
        reached = [g is not None or u is not None for g, u in zip(multimodal, unimodal)]
        with torch.no_grad():
            g_all = [torch.zeros_like(p) if g is None else g for p, g in zip(everything, multimodal)]
            u_all = [torch.zeros_like(p) if u is None else u for p, u in zip(everything, unimodal)]
            if distributed():
                g_all, u_all = self._averaged(g_all, u_all)
            if not self._round_open or not (self._intact() or self._deferred):
                if self._round_open and not self._driven:
                    self._warn_once(
                        "not_attached",
                        "the gradients MMPareto wrote were used or discarded and a new step began, but MMPareto never "
                        "stepped: attach it to the optimizer (mod.attach(optimizer)) so that a step without "
                        "mod.backward() is caught",
                    )
                self._start_step()
            for p, g, u, hit in zip(everything, g_all, u_all, reached):
                if hit:
                    self._accumulate(p, g, u)
        return groups

    def _combined_params(self) -> list[Tensor]:
        return [entry[0] for entry in self._accumulated.values()]

    @torch.no_grad()
    def _write(self, groups: list[list[Tensor]], record: bool, *, replace: bool = False) -> None:
        """Write the round's combination into the encoders' ``.grad`` (added to the gradient they held before the
        round, or ``replace``-ing what a trainer's backward left) and record (or amend) the round."""
        combined, stats = self._combined(groups)
        self._written = []
        for p, value in combined.items():
            base = None if replace else self._accumulated[id(p)][3]
            p.grad = value if base is None else base + value
            self._written.append((p, weakref.ref(p.grad), p.grad._version))
        self._monitor.forget()
        if record:
            self._record(stats)

    def _pass_ended(self, reached: frozenset[int], discarded: bool) -> None:
        if not self._inside:
            self._foreign = True

    def _checked_losses(self, multimodal_loss: Tensor, unimodal_losses: Mapping[str, Tensor]) -> list[Tensor]:
        if not isinstance(unimodal_losses, Mapping):
            raise TypeError(f"unimodal_losses must be a mapping modality name -> loss, got {type(unimodal_losses).__name__}")
        check_names(unimodal_losses, self.names, "unimodal_losses")
        losses = [("multimodal_loss", multimodal_loss)] + [(f"unimodal_losses[{n!r}]", unimodal_losses[n]) for n in self.names]
        for what, loss in losses:
            if not isinstance(loss, Tensor) or loss.dim() != 0 or not loss.dtype.is_floating_point:
                shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                raise ValueError(f"{what} must be a 0-d floating-point loss tensor, got {shape}")
            if not loss.requires_grad:
                raise ValueError(f"{what} does not require grad: compute it from the model's outputs, outside no_grad()")
        return [loss for _, loss in losses]

    @staticmethod
    def _averaged(g_all: list[Tensor], u_all: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """The per-loss gradients averaged over the ranks: one ``all_reduce`` of one flat buffer."""
        tensors = g_all + u_all
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= dist.get_world_size()
        pieces = [piece.view_as(t).to(t.dtype) for piece, t in zip(flat.split([t.numel() for t in tensors]), tensors)]
        return pieces[: len(g_all)], pieces[len(g_all) :]

    def _intact(self) -> bool:
        """Whether the encoders' gradients are still the ones the last call wrote (same step)."""
        if not self._written:
            return False
        return all(p.grad is not None and p.grad is ref() and p.grad._version == version for p, ref, version in self._written)

    def _start_step(self) -> None:
        self._step += 1
        self._round_open = True
        self._accumulated = {}
        self._written = []

    def _accumulate(self, p: Tensor, g: Tensor, u: Tensor) -> None:
        entry = self._accumulated.get(id(p))
        if entry is None:  # kept as they are, never written to (autograd may return expanded views)
            self._accumulated[id(p)] = (p, g, u, p.grad)
        else:
            self._accumulated[id(p)] = (p, entry[1] + g, entry[2] + u, entry[3])

    def _combined(self, groups: list[list[Tensor]]) -> tuple[dict[Tensor, Tensor], list[Tensor]]:
        """The combined gradient of every accumulated parameter, and the step's statistics (one ``[M]`` per field)."""
        combined: dict[Tensor, Tensor] = {}
        columns = []
        for params in groups:  # every modality has accumulated entries: its unimodal loss reached it
            entries = [self._accumulated[id(p)] for p in params if id(p) in self._accumulated]
            values, stats = combine_gradients([e[1] for e in entries], [e[2] for e in entries], self.rule, self.gamma)
            combined.update({e[0]: value for e, value in zip(entries, values)})
            columns.append(torch.stack([stats[key] for key in _RECORDED]))
        device = columns[0].device
        table = torch.stack([column.to(device) for column in columns], dim=1)
        return combined, list(table.unbind(0))

    # --------------------------------------------------------------------------- step
    def step(self) -> None:
        """Before the optimizer step (the hook of `attach`, or a trainer): write a combination that `observe`
        deferred, and end the round. A step with no `backward` or `observe` since the last one warns once: the
        encoders got whatever gradient the loop computed, not MMPareto's."""
        self._driven = True
        if self._deferred:
            groups = [[p for p in params if p.requires_grad] for params in self._selection.groups()]
            self._match_backward_scale()
            self._write(groups, record=True, replace=True)
            self._deferred = False
        elif not self._round_open:
            self._warn_once(
                "no_backward",
                "optimizer step without mod.backward() (or observe()) since the last step: the encoders got the loop's "
                "own gradient, not MMPareto's; call mod.backward(loss_mm, unimodal_losses) instead of loss.backward()",
            )
        self._round_open = False
        self._foreign = False
        self._monitor.forget()

    @torch.no_grad()
    def _match_backward_scale(self) -> None:
        """Scale the observed gradients to the trainer's: ``s = ⟨G, g + u⟩ / ‖g + u‖²`` over the encoders, with
        ``G`` their gradient at the step: a trainer resets the gradients before its first backward of a step — after
        the forward that calls `observe` (Lightning) or before it — so ``G`` is that of its backward passes alone,
        and the combination replaces it.

        A trainer backwards ``(L_mm + Σ L_m) / k`` for ``k`` accumulated micro-batches (and may clip), while
        `observe` took the gradients of the losses as given; the combination is homogeneous of degree 1, so scaling
        ``g`` and ``u`` by ``s`` gives it the trainer's scale. ``G`` must be ``s·(g + u)``: a trainer whose loss is
        not ``L_mm + Σ L_m`` (times one factor) raises ``RuntimeError``.
        """
        dot = total = actual = torch.zeros((), dtype=torch.float64)
        pairs = []
        for p, g, u, _ in self._accumulated.values():
            if p.grad is None:
                raise RuntimeError(
                    "gradmod MMPareto: observe() took this step's losses, but no backward pass reached the encoders "
                    "before the optimizer step: backward multimodal_loss + Σ unimodal_losses (return it as the loss)"
                )
            own = p.grad.double()
            both = (g + u).double()
            dot, total, actual = dot + (own * both).sum(), total + both.square().sum(), actual + own.square().sum()
            pairs.append((own, both))
        if total.item() == 0.0:
            return
        scale = dot / total
        residual = sum(((own - scale * both).square().sum() for own, both in pairs), torch.zeros((), dtype=torch.float64))
        if residual.item() > BACKWARD_MATCH**2 * actual.item():
            raise RuntimeError(
                "gradmod MMPareto: the encoders' gradient from the trainer's backward pass is not a multiple of the "
                "gradient of multimodal_loss + Σ unimodal_losses that observe() took: return exactly that sum as the "
                "loss (a loss term outside it would be overwritten)"
            )
        factor = scale.item()
        self._accumulated = {key: (p, g * factor, u * factor, base) for key, (p, g, u, base) in self._accumulated.items()}

    def skip_step(self) -> None:
        """The optimizer skips this step (``GradScaler`` found ``inf``): the round's gradients and its record are
        dropped, and it is not counted."""
        self._driven = True
        if self._round_open:
            if self._history.newest_step == self._step:
                self._history.drop_newest()
            self._step -= 1
        self._accumulated = {}
        self._written = []
        self._deferred = False
        self._round_open = False
        self._foreign = False

    # --------------------------------------------------------------------------- history and state
    def _record(self, stats: list[Tensor]) -> None:
        if self._history.newest_step == self._step:
            self._history.amend(stats)
        else:
            self._history.append(self._step, stats)

    def _extra_state(self) -> dict[str, Any]:
        """Step counter, rule and ``γ`` (the method keeps no other state across steps)."""
        return {"rule": self.rule, "gamma": self.gamma, "step": self._step, "warned": sorted(self.__dict__.get("_warned", ()))}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        """The modality names, the rule and ``γ`` must match."""
        if state["rule"] != self.rule or float(state["gamma"]) != self.gamma:
            raise ValueError(
                f"state_dict was written with rule={state['rule']!r}, gamma={state['gamma']}; this MMPareto has "
                f"rule={self.rule!r}, gamma={self.gamma}"
            )
        self._step = int(state["step"])
        self._warned = set(state.get("warned", ()))
        self.skip_step()

    def _reset(self) -> None:
        self._step = -1
        self._warned = set()
        self.skip_step()

    def __repr__(self) -> str:
        return f"MMPareto(modalities={list(self.names)}, rule={self.rule!r}, gamma={self.gamma:g})"


METHODS = (
    MethodInfo(
        key="mmpareto",
        preset=MMPareto,
        title="MMPareto",
        kind="backward",
        paper="Wei & Hu, MMPareto: Boosting Multimodal Learning with Innocent Unimodal Assistance, ICML 2024",
        page="methods/mmpareto.md",
        observes="the multimodal and unimodal losses",
        cost="every step: about two more backward passes through the encoders",
        fit=Fit(head="unimodal heads", acts_on="gradient direction"),
        strength=Strength("gamma", 1.0, "γ, the magnitude of the combined gradient relative to ‖g + u‖ (paper rule)"),
        options=(Option("rule", "paper", "the paper's whole-encoder rescaling or the official code's per-tensor one", str, RULES),),
    ),
)
