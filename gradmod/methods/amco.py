"""AMCo: Zhou, Liang, Zheng, Xuan & Kumada, *Adaptive Mask Co-optimization for Modal Dependence in Multimodal
Learning*, ICASSP 2023.

A model comes to *depend* on the modality that is easiest to learn. AMCo masks that modality while the model
depends on it — an **adaptive mask** that makes the dependent modality harder to learn through the fusion, so
the model fits the others — and trains every modality's own decoupled logits besides (**co-optimisation**), so
the masked modality does not degrade. An extra ``C × C`` layer ``W*`` (``linear_star``) maps the fused logits
to the output. No official code exists; BalanceBenchmark's port (``balancemm/trainer/AMCo_trainer.py``,
``balancemm/models/avclassify_model.py``, ``BaseClassifierAMCoModel``) is what the field runs.

Per step (equations numbered here; the paper's text was not available, see the docs page):

1. **Schedule** ``p = sin(π/2 · min(ε, l)/ε)`` (A1), ``l`` a counter that starts at 0 every epoch and grows
   by ``Δl`` per step (`mask_ratio`).
2. **Mask** of a dependent modality ``m``: ``N = ⌊p·U⌋`` of its ``U`` units, drawn at random, are zeroed (A2,
   `unit_mask`); every sample of the batch shares the mask.
3. **Dependency** on modality ``m``: its share of the softmax over all ``M·C`` decoupled logits,
   ``s_m = (1/B) Σ_i Σ_c softmax([u_1, …, u_M]_i)[m, c]`` (A3, `dependency_shares`); ``m`` is dependent on the
   next step when ``s_m > σ`` (``σ = 0.5``: at most one modality).
4. **Loss** ``L = CE(W*·z̃, y) + Σ_m CE(u_m, y)`` (A4), ``z̃`` the fused logits with the dependent modality
   masked. At test time the model predicts ``W*·z`` (`AMCo.predict`).

Two readings of "masked" (``mask=``):

* ``"features"`` (default): the paper masks features (recalled: the paper's text was not readable here;
  the port's configuration carries an unused ``U: 512``, a feature width). The ``U = D_m`` feature units of
  the dependent modality are masked before the fusion head, ``z̃ = head(h̃)``; the co-optimisation terms and
  the dependency test use the unmasked decoupled logits ``u_m``; ``Δl = 0.01`` per step (``p`` reaches 1
  after 30 steps of each epoch).
* ``"logits"``: BalanceBenchmark's port. The ``U = C`` classes of the dependent modality's decoupled logits
  are masked, ``ũ_m = u_m ⊙ mask``, ``z̃ = Σ_m ũ_m``, and the co-optimisation terms and the dependency test
  use the masked ``ũ_m``; ``Δl = e/10`` in epoch ``e``, so epoch 0 never masks and from epoch ``e ≥ 1`` every
  class of the dependent modality is masked from step ``⌈3/e⌉`` on (its logits are 0: no gradient reaches
  it for the rest of the epoch). The port builds a ``[2, C]`` mask, which broadcasts against the ``[B, C]``
  logits only when ``nn.DataParallel`` scatters it over exactly two GPUs (one row each); gradmod applies
  the one ``[C]`` row to every sample, which is what those two GPUs compute. The port's evaluation
  recomputes the fused logits without ``W*``, a layer it trained through; `AMCo.predict` keeps it.

**M > 2 modalities**: the shares run over all ``M·C`` logits, so ``σ = 0.5`` still marks at most one
modality. Under ``torch.distributed`` the shares are all-reduced, so every rank masks the same modality, and
the masks are counter-based (a function of ``seed``, step and modality), hence the same on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from gradmod._internal import (
    check_logits_target,
    distributed,
    per_modality,
    real_scalar,
    target_problems,
)
from gradmod.history import History
from gradmod.measures import IGNORE_INDEX
from gradmod.method import Fit, Method, MethodInfo, Option, Strength, check_units

__all__ = ["MASKS", "AMCo", "dependency_shares", "mask_ratio", "unit_mask"]

#: ``mask=`` values: ``"features"`` (the paper's reading) or ``"logits"`` (BalanceBenchmark's port).
MASKS = ("features", "logits")
#: ε of the schedule (A1): the counter value at which every unit of a dependent modality is masked.
DEFAULT_EPSILON = 0.3
#: σ of the dependency test (A3).
DEFAULT_SIGMA = 0.5
#: Δl per step of the ``"features"`` schedule (``"logits"`` uses the port's ``epoch / 10``).
DEFAULT_INCREMENT = 0.01
#: What the history records per modality and step.
_RECORDED = ("masked", "share", "dependent")


# ----------------------------------------------------------------------------------------- equations
def mask_ratio(counter: float, epsilon: float = DEFAULT_EPSILON) -> float:
    """The share of units to mask, (A1): ``p = sin(π/2 · min(ε, l)/ε)`` for the counter ``l ≥ 0``.

    0 at ``l = 0``, rising to exactly 1 at ``l = ε`` and staying there.
    """
    epsilon = real_scalar(epsilon, "epsilon", strict=True)
    counter = real_scalar(counter, "the mask counter l")
    return math.sin(math.pi / 2 * (min(epsilon, counter) / epsilon))


def unit_mask(width: int, ratio: float, generator: torch.Generator | None = None) -> Tensor:
    """A ``[width]`` float mask with ``N = ⌊ratio·width⌋`` zeros at uniformly drawn positions, ones elsewhere (A2).

    ``⌊·⌋`` as the port's ``int(pt * n_classes)``; the positions come from ``generator`` (on the CPU).
    """
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"the mask width must be an int >= 1, got {width!r}")
    ratio = real_scalar(ratio, "the mask ratio")
    if ratio > 1:
        raise ValueError(f"the mask ratio must lie in [0, 1], got {ratio!r}")
    mask = torch.ones(width)
    mask[torch.randperm(width, generator=generator)[: int(ratio * width)]] = 0.0
    return mask


def dependency_shares(unimodal_logits: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Each modality's share of the softmax over all ``M·C`` decoupled logits, (A3).

    ``s_m = (1/B) Σ_i Σ_c softmax([u_1, …, u_M]_i)[m, c]``; the shares are detached, lie in ``[0, 1]`` and
    sum to 1, and swapping two modalities' logits swaps their shares.
    """
    names = list(unimodal_logits)
    if len(names) < 2:
        raise ValueError(f"dependency shares need two or more modalities, got {names}")
    logits = torch.stack([unimodal_logits[name].detach() for name in names], dim=1)  # [B, M, C]
    wide = logits if logits.dtype == torch.float64 else logits.float()
    probs = torch.softmax(wide.flatten(1), dim=1).view_as(wide)
    return dict(zip(names, probs.sum(2).mean(0).unbind(0)))


def _generator(seed: int, step: int, index: int) -> torch.Generator:
    """The generator of step ``step`` and modality ``index``: a pure function of them and the seed."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 64 + index)


# ----------------------------------------------------------------------------------------- the method
class AMCo(Method):
    """Adaptive mask co-optimisation: mask the modality the model depends on, train every modality's own logits.

    Per step, ``loss(...)`` returns ``CE(W*·z̃, y) + Σ_m CE(u_m, y)`` (module docstring, (A1)–(A4)); at test
    time ``predict(logits)`` gives ``W*·z``. ``W*`` is ``extra`` (an ``nn.Linear(C, C)``): add
    ``amco.extra.parameters()`` to the optimizer and move it with the model (``amco.extra.to(device)``); it
    is saved in ``state_dict()``. Call ``start_epoch(epoch)`` before every epoch: it resets the counter ``l``
    and the dependency flags, as the port does.

    Args:
        modalities: the modality names, two or more, in the order of the head's modalities.
        num_classes: ``C``.
        mask: ``"features"`` (default: mask the dependent modality's features before the head; needs
            ``features`` and ``head`` in `loss`) or ``"logits"`` (BalanceBenchmark's port: mask its decoupled
            logits; needs only ``unimodal_logits`` and ``target``).
        epsilon: ``ε > 0`` of (A1).
        sigma: ``σ ∈ (0, 1)`` of the dependency test (A3).
        increment: ``Δl ≥ 0`` per step; ``None``: 0.01 for ``"features"``, the port's ``epoch / 10`` for
            ``"logits"``.
        seed: the seed of the mask positions (counter-based: resumed runs draw the same masks).
        ignore_index: targets equal to it add no loss (``cross_entropy``'s −100).
    """

    kind = "loss"
    state_version = 1
    loss_inputs: tuple[str, ...] = ("features", "head", "unimodal_logits", "target")
    #: what `predict` reads: the test-time prediction goes through the extra layer it trains through
    predict_inputs = ("logits",)

    def __init__(
        self,
        modalities: Sequence[str],
        num_classes: int,
        *,
        mask: str = "features",
        epsilon: float = DEFAULT_EPSILON,
        sigma: float = DEFAULT_SIGMA,
        increment: float | None = None,
        seed: int = 0,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        self.names: tuple[str, ...] = check_units(modalities, "modalities")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
        self.num_classes = num_classes
        self.mask = mask
        self.epsilon = real_scalar(epsilon, "epsilon", strict=True)
        self.sigma = real_scalar(sigma, "sigma", strict=True)
        if self.sigma >= 1:
            raise ValueError(f"sigma must lie in (0, 1): a share never exceeds 1, got {sigma!r}")
        self.increment = None if increment is None else real_scalar(increment, "increment")
        for name, value in (("seed", seed), ("ignore_index", ignore_index)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
        self.seed = seed
        self.ignore_index = ignore_index
        if mask == "logits":
            self.loss_inputs = ("unimodal_logits", "target")
        self.extra = nn.Linear(num_classes, num_classes)
        self._initial_extra = {key: value.detach().clone() for key, value in self.extra.state_dict().items()}
        self._history = History(self.names, fields=_RECORDED, dtype=torch.float64)
        self._reset()

    # ------------------------------------------------------------------ epochs
    def start_epoch(self, epoch: int) -> None:
        """Epoch ``epoch`` (0-based) begins: the counter ``l`` restarts at 0 and no modality is dependent."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self._epoch = epoch
        self._counter = 0.0
        self._dependent = [False] * len(self.names)

    @property
    def step_increment(self) -> float:
        """``Δl`` of the current epoch: ``increment``, or its default for the mask (the port's ``epoch / 10``)."""
        if self.increment is not None:
            return self.increment
        return DEFAULT_INCREMENT if self.mask == "features" else (self._epoch or 0) / 10

    @property
    def ratio(self) -> float:
        """``p`` of (A1) for the coming step."""
        return mask_ratio(self._counter, self.epsilon)

    @property
    def dependent(self) -> dict[str, bool]:
        """Which modalities the coming step masks (the dependency test of the last step)."""
        return dict(zip(self.names, self._dependent))

    @property
    def masks(self) -> dict[str, Tensor]:
        """The masks the last step applied, by modality (``[D_m]`` or ``[C]``; none for an unmasked modality)."""
        return dict(self._masks)

    # ------------------------------------------------------------------ the loss
    def loss(
        self,
        *,
        unimodal_logits: Mapping[str, Tensor],
        target: Tensor,
        features: Mapping[str, Tensor] | None = None,
        head: Callable[[Mapping[str, Tensor]], Tensor] | None = None,
    ) -> Tensor:
        """The step's loss (A4): ``CE(W*·z̃, y) + Σ_m CE(u_m, y)``, and the dependency test for the next step.

        ``unimodal_logits``: ``{modality: [B, C]}`` decoupled logits (with grad) of the unmasked features;
        ``features`` ``{modality: [B, D_m]}`` and ``head`` (``{modality: features} -> [B, C]`` fused logits)
        with ``mask="features"``.
        """
        if self._epoch is None:
            self._warn_once(
                "no_epoch",
                "loss() before any start_epoch(epoch): the mask counter l is never reset"
                + (" and the port's schedule (Δl = epoch/10) stays at epoch 0, which never masks" if self.increment is None
                   and self.mask == "logits" else "")
                + "; call amco.start_epoch(epoch) before every epoch",
                stacklevel=3,
            )
        unimodal = self._checked_logits(unimodal_logits, target)
        ratio = mask_ratio(self._counter, self.epsilon)
        if self.mask == "logits":
            masked = self._masked_logits(unimodal, ratio)
            fused, trained = sum(masked.values()), masked
        else:
            fused, trained = self._fused_on_masked_features(features, head, unimodal, ratio, target), unimodal
        shares = self._shares(trained)
        output = self.extra(fused)
        total = F.cross_entropy(output, target, ignore_index=self.ignore_index)
        total = total + sum(F.cross_entropy(trained[name], target, ignore_index=self.ignore_index) for name in self.names)
        self._record(shares, ratio)
        return total

    def predict(self, logits: Tensor) -> Tensor:
        """The logits to evaluate with: ``W*·z`` of the fused logits ``z`` ``[B, C]`` (no mask at test time)."""
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[1] != self.num_classes:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"predict() takes fused logits [batch, {self.num_classes}], got {shape}")
        return self.extra(logits)

    def _checked_logits(self, unimodal_logits: Mapping[str, Tensor], target: Tensor) -> dict[str, Tensor]:
        logits = per_modality(unimodal_logits, self.names, "loss(unimodal_logits=...)")
        problems: dict[str, Tensor] = {}
        for name in self.names:
            check_logits_target(logits[name], target, name=f"unimodal_logits[{name!r}]")
            if logits[name].shape[1] != self.num_classes:
                raise ValueError(f"unimodal_logits[{name!r}] has {logits[name].shape[1]} classes, AMCo was built for {self.num_classes}")
            problems.update(target_problems(name, logits[name], target, self.ignore_index))
        if target.shape[0] == 0:
            raise ValueError("loss() got an empty batch")
        problems["every target equals ignore_index: the batch has nothing to learn"] = (target == self.ignore_index).all()
        flags = torch.stack([flag.reshape(()) for flag in problems.values()]).tolist()
        for message, flag in zip(problems, flags):
            if flag:
                raise ValueError(message)
        return {name: logits[name] for name in self.names}

    def _masked_logits(self, unimodal: dict[str, Tensor], ratio: float) -> dict[str, Tensor]:
        """The port: one ``[C]`` class mask for every dependent modality's decoupled logits."""
        self._masks, self._fractions = {}, {}
        if not any(self._dependent):
            return unimodal
        first = unimodal[self.names[0]]
        mask = unit_mask(self.num_classes, ratio, _generator(self.seed, self._step, 0)).to(first.device, first.dtype)
        masked = dict(unimodal)
        for name, dependent in zip(self.names, self._dependent):
            if dependent:
                masked[name] = unimodal[name] * mask
                self._masks[name] = mask
                self._fractions[name] = int(ratio * self.num_classes) / self.num_classes
        return masked

    def _fused_on_masked_features(
        self,
        features: Mapping[str, Tensor] | None,
        head: Callable[[Mapping[str, Tensor]], Tensor] | None,
        unimodal: dict[str, Tensor],
        ratio: float,
        target: Tensor,
    ) -> Tensor:
        """The paper's reading: the head on the features with each dependent modality's units masked."""
        if features is None or head is None:
            raise TypeError(
                "AMCo(mask='features').loss() needs features={modality: [B, D]} and head=<the fusion head>; "
                "mask='logits' (BalanceBenchmark's port) needs only unimodal_logits and target"
            )
        if not callable(head):
            raise TypeError(f"head must be a callable {{modality: features}} -> fused logits, got {type(head).__name__}")
        features = per_modality(features, self.names, "loss(features=...)")
        batch = target.shape[0]
        flags = []
        for name in self.names:
            value = features[name]
            if not isinstance(value, Tensor) or value.dim() != 2 or value.shape[0] != batch:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"features[{name!r}] must be [batch={batch}, width], got {shape}")
            flags.append(~torch.isfinite(value.detach()).all())
        bad = [name for name, flag in zip(self.names, torch.stack(flags).tolist()) if flag]
        if bad:
            raise ValueError(f"features of modalities {bad} contain NaN or inf")
        self._masks, self._fractions = {}, {}
        masked = dict(features)
        for index, (name, dependent) in enumerate(zip(self.names, self._dependent)):
            if dependent:
                value = features[name]
                mask = unit_mask(value.shape[1], ratio, _generator(self.seed, self._step, index)).to(value.device, value.dtype)
                masked[name] = value * mask
                self._masks[name] = mask
                self._fractions[name] = int(ratio * value.shape[1]) / value.shape[1]
        fused = head(masked)
        if not isinstance(fused, Tensor) or fused.shape != unimodal[self.names[0]].shape:
            shape = tuple(fused.shape) if isinstance(fused, Tensor) else type(fused).__name__
            raise ValueError(f"head(features) must return fused logits [batch, {self.num_classes}], got {shape}")
        return fused

    def _shares(self, logits: dict[str, Tensor]) -> Tensor:
        """(A3) as one ``[M]`` tensor, averaged over every rank's samples under ``torch.distributed``."""
        shares = torch.stack(list(dependency_shares(logits).values()))
        if distributed():
            batch = logits[self.names[0]].shape[0]
            total = torch.cat([shares * batch, shares.new_tensor([batch])])
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
            shares = total[:-1] / total[-1]
        return shares

    def _record(self, shares: Tensor, ratio: float) -> None:
        """History row, warnings, and the next step's counter and dependency flags (one host synchronisation)."""
        shares = shares.detach().double().cpu()
        masked = torch.tensor([self._fractions.get(name, 0.0) for name in self.names], dtype=torch.float64)
        applied = torch.tensor([1.0 if name in self._masks else 0.0 for name in self.names], dtype=torch.float64)
        self._history.append(self._step, (masked, shares, applied), in_window=any(f > 0 for f in self._fractions.values()))
        full = [name for name, fraction in self._fractions.items() if fraction == 1.0]
        if full and self.mask == "logits":
            self._warn_once(
                "fully_masked",
                f"every class of {full}'s decoupled logits is masked (p = {ratio:.3g}): they are 0, so nothing trains "
                "that modality until the dependency test clears it or the next start_epoch() (the port's schedule masks "
                "everything from step ⌈3/e⌉ of epoch e; mask='features' keeps training it through its own logits)",
            )
        self._dependent = [share > self.sigma for share in shares.tolist()]
        self._counter += self.step_increment
        self._step += 1

    # ------------------------------------------------------------------ state
    def _extra_state(self) -> dict[str, Any]:
        """The configuration, the epoch, the counter ``l``, the dependency flags, the step and the warnings."""
        return {
            "mask": self.mask,
            "epsilon": self.epsilon,
            "sigma": self.sigma,
            "increment": self.increment,
            "seed": self.seed,
            "epoch": self._epoch,
            "counter": self._counter,
            "dependent": list(self._dependent),
            "step": self._step,
            "warned": sorted(self.__dict__.get("_warned", ())),
        }

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        for key in ("mask", "epsilon", "sigma", "increment", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(f"AMCo state_dict has {key}={state[key]!r}, this AMCo has {key}={getattr(self, key)!r}")
        self._epoch = state["epoch"]
        self._counter = float(state["counter"])
        self._dependent = [bool(flag) for flag in state["dependent"]]
        self._step = int(state["step"])
        self._masks, self._fractions = {}, {}
        self._warned = set(state["warned"])

    def _reset(self) -> None:
        """Back to the constructed state: counters, flags, warnings, and ``W*`` as it was initialised."""
        self._epoch: int | None = None
        self._counter = 0.0
        self._dependent = [False] * len(self.names)
        self._step = 0
        self._masks: dict[str, Tensor] = {}
        self._fractions: dict[str, float] = {}
        self._warned: set[str] = set()
        self.extra.load_state_dict(self._initial_extra)  # W* as constructed

    def __repr__(self) -> str:
        return (
            f"AMCo(modalities={list(self.names)}, num_classes={self.num_classes}, mask={self.mask!r}, "
            f"epsilon={self.epsilon:g}, sigma={self.sigma:g}, increment={self.increment!r})"
        )


METHODS = (
    MethodInfo(
        key="amco",
        preset=AMCo,
        title="AMCo",
        kind="loss",
        paper="Zhou et al., Adaptive Mask Co-optimization for Modal Dependence in Multimodal Learning, ICASSP 2023",
        page="methods/amco.md",
        observes="per step: decoupled logits and targets (and the features and the head, mask='features')",
        cost="one more head pass on the masked features, a C×C layer, M unimodal losses",
        fit=Fit(head="decoupled", acts_on="loss"),
        strength=Strength(
            "epsilon", DEFAULT_EPSILON, "ε of p = sin(π/2·min(ε, l)/ε): the counter l at which a dependent modality is fully masked",
            "smaller",
        ),
        options=(
            Option("mask", "features", "what is masked: the dependent modality's features, or its logits (BalanceBenchmark's port)", str, MASKS),
            Option("sigma", DEFAULT_SIGMA, "σ: a modality whose softmax share exceeds it is masked on the next step", float),
        ),
    ),
)
