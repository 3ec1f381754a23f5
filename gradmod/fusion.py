"""Late-fusion heads that the modulation methods need, and the SimAM² energy attention.

Every head maps named per-modality feature vectors ``features[u]: [B, D_u]`` to class logits ``[B, C]``
and shares one interface, `Fusion`:

* ``modalities`` — the modality names, in order; ``forward(features)`` — the logits;
* ``decouplable`` — whether per-modality logits exist; ``unimodal_logits(features)`` returns them
  (OGM-GE, DGM) or raises ``TypeError`` that names the alternative;
* gated heads record their last gate in ``zeta`` (attached to the graph, ``None`` before the first
  forward): for two modalities the ``[B, D]`` tensor ζ that weights ``modalities[0]`` in
  ``U = ζ·X₁ + (1 − ζ)·X₂`` (SimAM² eq. (4)); for ``M > 2`` a dict name → gate whose gates sum to
  one elementwise. `gradmod.functional.zeta_evidence` turns it into the eq. (11) evidence.

SimAM² and the decoupling-free modulation are from Sun et al., *More than Vanilla Fusion: a Simple,
Decoupling-free, Attention Module for Multimodal Fusion Based on Signal Theory* (ICASSP 2024); equation
numbers below are that paper's.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from gradmod._internal import real_scalar
from gradmod.functional import decouple_linear

__all__ = [
    "Fusion",
    "ConcatFusion",
    "SumFusion",
    "GatedSumFusion",
    "FiLMFusion",
    "SimAM2",
    "simam_inverse_energy",
    "degradation_factor",
    "simam2_energy",
]

#: Floor of the SimAM denominator ``4(σ² + λ)``: only reached when a channel is (numerically) constant,
#: where ``(t − μ)² ≤ (n − 1)·σ²`` keeps the quotient bounded by ``(n − 1)/4`` anyway.
_DENOMINATOR_FLOOR = 1e-12


def _wide(x: Tensor) -> Tensor:
    """``x`` in float32 or wider: the energies divide by variances, which half precision underflows."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _check_positive(value: float, name: str) -> float:
    return real_scalar(value, name, strict=True)


# --------------------------------------------------------------------------------------------------
# SimAM² math (section 2.1), pure functions
# --------------------------------------------------------------------------------------------------


def simam_inverse_energy(x: Tensor, lambda_: float) -> Tensor:
    """Importance ``1/e_t*`` of every neuron: the inverse of the minimal energy, eq. (3).

    ``1/e_t*(λ) = ((t − μ̂)² + 2σ̂² + 2λ) / (4(σ̂² + λ)) = (t − μ̂)² / (4(σ̂² + λ)) + ½``, the SimAM closed
    form, with ``μ̂`` and ``σ̂² = Σ(x − μ̂)² / (n − 1)`` taken over the ``n`` neurons of one channel of one
    sample: the ``D`` entries of a ``[B, D]`` vector, or the spatial positions of a ``[B, C, *spatial]``
    map. A constant channel gives exactly ``½`` (no neuron stands out) and the value never exceeds
    ``(n − 1)/4 + ½``. Computed in float32 or wider.
    """
    if x.dim() < 2:
        raise ValueError(f"SimAM needs a [batch, features] or [batch, channels, *spatial] tensor, got shape {tuple(x.shape)}")
    dims = (1,) if x.dim() == 2 else tuple(range(2, x.dim()))
    n = math.prod(x.shape[d] for d in dims)
    if n < 2:
        raise ValueError(f"SimAM needs at least 2 neurons per channel to have a variance, got {n} (shape {tuple(x.shape)})")
    xw = _wide(x)
    squared_deviation = (xw - xw.mean(dim=dims, keepdim=True)).square()
    variance = squared_deviation.sum(dim=dims, keepdim=True) / (n - 1)
    return squared_deviation / (4.0 * (variance + lambda_)).clamp_min(_DENOMINATOR_FLOOR) + 0.5


def degradation_factor(gate_variance: Tensor, gate_variance_max: Tensor, scale: float, lambda_: float) -> Tensor:
    """Degradation factor, eq. (6): ``r = tanh((s·Σ_i var(ζ_i) + λ) / (Σ_i var_max(ζ_i) + λ))``.

    ``gate_variance`` holds each gate neuron's variance within the batch, ``gate_variance_max`` its
    highest recorded variance (same shape); both are summed over all their elements. ``r ∈ (0, 1)`` for
    ``λ > 0``.
    """
    _check_positive(lambda_, "lambda_")
    ratio = (scale * gate_variance.sum() + lambda_) / (gate_variance_max.sum() + lambda_)
    return torch.tanh(ratio)


def simam2_energy(fused: Tensor, parts: Sequence[Tensor], gates: Sequence[Tensor], r: Tensor) -> Tensor:
    """Degraded fusion energy, eq. (7), on inverse energies: ``E* = (2 − r)·ι_U − Σ_u ζ_u²·ι_u``.

    Eq. (7) reads ``E* = e_U − ζ²e₁ − (1 − ζ)²e₂ + (1 − r)e_U``, whose first three terms are, by eq. (5),
    the mutual-energy term ``2ζ(1 − ζ)·E(x₁, x₂)``. Using that product instead of ``E`` itself never
    divides by ``ζ(1 − ζ)``, so ``ζ ∈ {0, 1}`` stays finite. ``fused`` is ``ι_U`` (with λ), ``parts`` the
    ``ι_u`` (λ = 0) and ``gates`` the ``ζ_u`` (already broadcastable to them); for two modalities
    ``gates = (ζ, 1 − ζ)``, for ``M`` the superposition ``U = Σ_u ζ_u X_u`` generalises eq. (5) term by term.
    """
    if len(parts) != len(gates):
        raise ValueError(f"got {len(parts)} unimodal energies but {len(gates)} gates")
    unimodal = sum(gate.square() * part for gate, part in zip(gates, parts))
    return (2.0 - r) * fused - unimodal


class SimAM2(nn.Module):
    """SimAM², the energy attention on a gated superposition of modalities (eqs. (1)–(8)).

    ``forward(signals, gates)`` fuses ``U = Σ_u ζ_u·X_u`` (eq. (4); two modalities: ``gates = (ζ, 1 − ζ)``)
    and returns ``sigmoid(E*) ⊙ U`` (eq. (8)) with ``E*`` of eq. (7) from the per-modality energies
    (λ = 0), the fused energy (λ) and the degradation factor ``r`` of eq. (6).

    Readings of the paper, chosen here:

    * **Population.** The "neurons of a channel" of eqs. (1)–(3) are, per sample, the ``D`` entries of a
      ``[B, D]`` feature vector, or the spatial positions of one channel of a ``[B, C, *spatial]`` map
      (as in SimAM). So the attention is batch-independent: evaluation with batch 1 is well defined.
    * **Inverse energy.** Eqs. (5)–(8) are applied to the importances ``ι = 1/e*`` of
      `simam_inverse_energy`, not to ``e*``: SimAM's code feeds ``sigmoid(1/e*)``, and low energy
      marks the distinctive neurons that §2 says deserve priority; ``sigmoid(e*)`` would favour the least
      distinctive ones.
    * **Gates.** ``ζ_u`` is ``[B, C]``: one weight per feature of a vector, per channel of a map (eq. (4):
      "the same number of channels"). The gates must sum to one elementwise (not checked, to avoid a host
      synchronisation). ``var(ζ_i)`` of eq. (6) is the population variance over the batch (0 for batch 1),
      summed over every gate and neuron; for two modalities ``var(1 − ζ) = var(ζ)``, so the ratio is
      exactly eq. (6).
    * **var_max.** A per-gate, per-neuron running maximum ``[num_signals, num_channels]``, a buffer (in
      ``state_dict``), updated before ``r`` is computed and only in training mode; evaluation uses the
      stored record. ``r`` is a measured statistic: no gradient flows through it.
    * **Degenerate cases.** ``λ > 0`` is required, so ``r`` is defined when the gates do not vary; a
      constant channel has importance ``½``; ``ζ ∈ {0, 1}`` needs no division (`simam2_energy`).
      The output is finite for any finite input.

    Args:
        num_channels: ``D`` of ``[B, D]`` signals, or ``C`` of ``[B, C, *spatial]`` signals.
        num_signals: number of fused signals (modalities), at least 2.
        lambda_: λ of eqs. (3) and (6); the paper uses "usually 1e-6".
        scale: ``s`` of eq. (6); the paper sets it "roughly ... around 2.5".
    """

    var_max: Tensor

    def __init__(self, num_channels: int, num_signals: int = 2, lambda_: float = 1e-6, scale: float = 2.5) -> None:
        super().__init__()
        if num_channels < 1:
            raise ValueError(f"num_channels must be >= 1, got {num_channels}")
        if num_signals < 2:
            raise ValueError(f"SimAM² fuses at least 2 signals, got num_signals={num_signals}")
        _check_positive(lambda_, "lambda_")
        _check_positive(scale, "scale")
        self.num_channels = num_channels
        self.num_signals = num_signals
        self.lambda_ = float(lambda_)
        self.scale = float(scale)
        self.register_buffer("var_max", torch.zeros(num_signals, num_channels))

    def extra_repr(self) -> str:
        return f"num_channels={self.num_channels}, num_signals={self.num_signals}, lambda_={self.lambda_}, scale={self.scale}"

    def _check_inputs(self, signals: Sequence[Tensor], gates: Sequence[Tensor]) -> None:
        if len(signals) != self.num_signals or len(gates) != self.num_signals:
            raise ValueError(
                f"SimAM2 was built for {self.num_signals} signals, got {len(signals)} signals and {len(gates)} gates"
            )
        shape = signals[0].shape
        if len(shape) < 2 or shape[1] != self.num_channels:
            raise ValueError(
                f"signals must be [batch, {self.num_channels}] or [batch, {self.num_channels}, *spatial], got {tuple(shape)}"
            )
        for i, signal in enumerate(signals):
            if signal.shape != shape:
                raise ValueError(f"signal {i} has shape {tuple(signal.shape)}, signal 0 has {tuple(shape)}")
        for i, gate in enumerate(gates):
            if gate.shape != shape[:2]:
                raise ValueError(f"gate {i} must be [batch, channels] = {tuple(shape[:2])}, got {tuple(gate.shape)}")

    def forward(self, signals: Sequence[Tensor], gates: Sequence[Tensor]) -> Tensor:
        """Return ``sigmoid(E*) ⊙ Σ_u ζ_u·X_u`` (eqs. (4), (8)), in the signals' dtype."""
        self._check_inputs(signals, gates)
        spatial = (1,) * (signals[0].dim() - 2)
        wide_gates = [_wide(g).reshape(*g.shape, *spatial) for g in gates]
        wide_signals = [_wide(s) for s in signals]
        fused = sum(g * s for g, s in zip(wide_gates, wide_signals))

        with torch.no_grad():
            gate_variance = torch.stack([_wide(g) for g in gates]).var(dim=1, correction=0)
            if self.training:
                self.var_max.copy_(torch.maximum(self.var_max, gate_variance.to(self.var_max.dtype)))
            r = degradation_factor(gate_variance, self.var_max, self.scale, self.lambda_)

        energy = simam2_energy(
            fused=simam_inverse_energy(fused, self.lambda_),
            parts=[simam_inverse_energy(s, 0.0) for s in wide_signals],
            gates=wide_gates,
            r=r,
        )
        return (torch.sigmoid(energy) * fused).to(signals[0].dtype)


# --------------------------------------------------------------------------------------------------
# Fusion heads
# --------------------------------------------------------------------------------------------------


class Fusion(nn.Module, ABC):
    """Base of the fusion heads: named ``[B, D_u]`` features → ``[B, C]`` logits.

    Subclasses set ``decouplable`` and implement ``forward``; decouplable heads override
    `unimodal_logits`. Inputs are checked: a missing or unknown modality, a tensor that is not
    ``[B, D_u]``, a width other than the head's or unequal batch sizes raise ``ValueError``.
    """

    #: Whether per-modality logits are defined (`unimodal_logits`).
    decouplable: ClassVar[bool] = False

    def __init__(self, in_features: Mapping[str, int], num_classes: int) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        names = list(in_features)
        if len(names) < 2:
            raise ValueError(f"a fusion head needs at least 2 modalities, got {names}")
        for name in names:
            if not isinstance(name, str) or not name or "." in name:
                raise ValueError(f"modality names must be non-empty strings without '.', got {name!r}")
            width = in_features[name]
            if not isinstance(width, int) or width < 1:
                raise ValueError(f"feature width of modality {name!r} must be an int >= 1, got {width!r}")
        self.modalities: tuple[str, ...] = tuple(names)
        self.in_features: dict[str, int] = dict(in_features)
        self.num_classes = num_classes

    @property
    def gates(self) -> dict[str, Tensor] | None:
        """The last fusion gate of each modality by name (``{m₀: ζ, m₁: 1 − ζ}`` for two), ``None`` if ungated.

        Pass this to ``observe(zeta=head.gates)``: named gates cannot credit the wrong modality, whatever
        order the head keeps its modalities in (FiLM puts the modulated one first).
        """
        zeta = getattr(self, "zeta", None)
        if zeta is None or isinstance(zeta, dict):
            return zeta
        first, second = self.modalities
        return {first: zeta, second: 1.0 - zeta}

    def ordered(self, features: Mapping[str, Tensor]) -> list[Tensor]:
        """Check ``features`` and return its tensors in `modalities` order."""
        if not isinstance(features, Mapping):
            raise ValueError(f"features must be a mapping modality name -> [batch, width] tensor, got {type(features).__name__}")
        missing = [name for name in self.modalities if name not in features]
        unknown = [name for name in features if name not in self.in_features]
        if missing or unknown:
            raise ValueError(
                f"{type(self).__name__} expects modalities {list(self.modalities)}; missing {missing}, unknown {unknown}"
            )
        tensors = [features[name] for name in self.modalities]
        batch = tensors[0].shape[0] if tensors[0].dim() == 2 else None
        for name, tensor in zip(self.modalities, tensors):
            expected = self.in_features[name]
            if tensor.dim() != 2 or tensor.shape[1] != expected:
                raise ValueError(
                    f"features[{name!r}] must be [batch, {expected}], got shape {tuple(tensor.shape)}"
                )
            if tensor.shape[0] != batch:
                raise ValueError(
                    f"features[{name!r}] has batch {tensor.shape[0]}, features[{self.modalities[0]!r}] has {batch}"
                )
        return tensors

    @abstractmethod
    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        """Class logits ``[B, C]``."""

    def unimodal_logits(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Per-modality logits; this head mixes modalities non-linearly, so they are not defined."""
        raise TypeError(
            f"{type(self).__name__} mixes modalities non-linearly, so it has no per-modality logits. Measure "
            "the imbalance from its fusion gate ζ (`.zeta`; GatedSumFusion, or FiLMFusion(zeta=True)) with "
            "gradmod.DecouplingFree (SimAM² eq. (11)), or train unimodal auxiliary heads on the features "
            "(DGM's modality-separated decision unit) and pass their logits instead."
        )


class ConcatFusion(Fusion):
    """One linear layer on the concatenated features: ``logits = [f_1, …, f_M]·Wᵀ + b``.

    Decoupled logits (OGM-GE official ``train_epoch``): ``f_u·W[:, block_u]ᵀ + b/M`` with column blocks in
    `modalities` order, so they sum to the forward logits.

    Attributes:
        linear: the ``nn.Linear`` over the concatenated features (``in_features = Σ_u D_u``); its weight is the
            fused head's weight that AGM's official clip reads (`gradmod.methods.agm.official_clip_`).
    """

    decouplable = True

    def __init__(self, in_features: Mapping[str, int], num_classes: int, bias: bool = True) -> None:
        super().__init__(in_features, num_classes)
        self.linear = nn.Linear(sum(self.in_features.values()), num_classes, bias=bias)

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        return self.linear(torch.cat(self.ordered(features), dim=1))

    def unimodal_logits(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each modality's decoupled logits ``f_u·W[:, block_u]ᵀ + b/M`` (`gradmod.functional.decouple_linear`):
        they sum to the forward logits, and are what OGM-GE measures."""
        tensors = dict(zip(self.modalities, self.ordered(features)))
        return decouple_linear(self.linear.weight, self.linear.bias, tensors)


class SumFusion(Fusion):
    """A linear layer per modality, summed: ``logits = Σ_u (f_u·W_uᵀ + b_u)`` (OGM-GE's sum head).

    Decoupled logits are each branch's own output with its **full** bias ``b_u`` (the official
    ``train_epoch``), so they sum exactly to the forward logits.
    """

    decouplable = True

    def __init__(self, in_features: Mapping[str, int], num_classes: int) -> None:
        super().__init__(in_features, num_classes)
        self.branches = nn.ModuleDict({name: nn.Linear(width, num_classes) for name, width in self.in_features.items()})

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        return torch.stack(list(self.unimodal_logits(features).values())).sum(dim=0)

    def unimodal_logits(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each branch's own logits ``f_u·W_uᵀ + b_u``, with its full bias: they sum to the forward logits."""
        tensors = self.ordered(features)
        return {name: self.branches[name](f) for name, f in zip(self.modalities, tensors)}


class _ModalityGate(nn.Module):
    """Learnable per-channel weights of ``M`` inputs that sum to one: softmax over ``M`` of a linear map
    of the concatenated inputs. For ``M = 2`` this is ``ζ = sigmoid(l₁ − l₂)``, a sigmoid gate."""

    def __init__(self, num_inputs: int, dim: int) -> None:
        super().__init__()
        self.num_inputs = num_inputs
        self.dim = dim
        self.linear = nn.Linear(num_inputs * dim, num_inputs * dim)

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        """``[B, M, D]`` gates, summing to one over ``M``."""
        logits = self.linear(torch.cat(list(inputs), dim=1))
        return torch.softmax(logits.reshape(-1, self.num_inputs, self.dim), dim=1)


def _record(names: Sequence[str], gates: Tensor) -> Tensor | dict[str, Tensor]:
    """The ``zeta`` attribute from ``[B, M, D]`` gates: the first gate for two inputs, else name → gate."""
    if len(names) == 2:
        return gates[:, 0]
    return dict(zip(names, gates.unbind(dim=1)))


def _same_width(modalities: Sequence[str], dim: int) -> dict[str, int]:
    """``{name: dim}`` for heads whose inputs share one width; repeated names raise ``ValueError``."""
    names = tuple(modalities)
    if len(set(names)) != len(names):
        raise ValueError(f"modality names must be distinct, got {list(names)}")
    return {name: dim for name in names}


def _fixed_gates(like: Tensor, num_inputs: int, dim: int) -> Tensor:
    """``[B, M, D]`` gates all equal to ``1/M``: fixed-weight fusion (§2.2, "letting ζ = 0.5")."""
    return like.new_full((like.shape[0], num_inputs, dim), 1.0 / num_inputs)


def _superpose(inputs: Sequence[Tensor], gates: Tensor, simam: SimAM2 | None) -> Tensor:
    """``U = Σ_u ζ_u·X_u`` (SimAM² eq. (4)), passed through SimAM² (eq. (8)) when given."""
    per_input = gates.unbind(dim=1)
    if simam is None:
        return sum(gate * x for gate, x in zip(per_input, inputs))
    return simam(inputs, per_input)


class GatedSumFusion(Fusion):
    """ζ-weighted sum of equally wide features, then a linear classifier (eqs. (4), (8)).

    ``U = Σ_u ζ_u·X_u`` with per-channel gates from a softmax over the modalities of a linear map of the
    concatenated features; for two modalities this is eq. (4), ``U = ζ·X₁ + (1 − ζ)·X₂`` with
    ``ζ = sigmoid(l₁ − l₂)``, and for ``M > 2`` its generalisation (gates sum to one elementwise). With ``learn_gate=False`` the gates are
    fixed at ``1/M`` ("direct summation ... letting ζ = 0.5", §2.2). With ``simam=True``,
    `SimAM2` replaces ``U`` by ``sigmoid(E*) ⊙ U``. Logits ``= Linear(dim, num_classes)(U)``.

    ``zeta`` holds the last gate (see the module docstring); with a fixed gate it is the constant ``1/M``.
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        modalities: Sequence[str] = ("audio", "visual"),
        simam: bool = False,
        learn_gate: bool = True,
        lambda_: float = 1e-6,
        scale: float = 2.5,
    ) -> None:
        super().__init__(_same_width(modalities, dim), num_classes)
        self.dim = dim
        self.gate = _ModalityGate(len(self.modalities), dim) if learn_gate else None
        self.simam = SimAM2(dim, len(self.modalities), lambda_, scale) if simam else None
        self.classifier = nn.Linear(dim, num_classes)
        self.zeta: Tensor | dict[str, Tensor] | None = None

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        tensors = self.ordered(features)
        gates = _fixed_gates(tensors[0], len(tensors), self.dim) if self.gate is None else self.gate(tensors)
        self.zeta = _record(self.modalities, gates)
        return self.classifier(_superpose(tensors, gates, self.simam))


class FiLMFusion(Fusion):
    """FiLM fusion (eq. (9)), optionally ζ-weighted (eq. (10)) and with SimAM², two modalities.

    ``γ, β = f(x_c), h(x_c)`` (one linear layer ``dim → 2·dim``) from the ``condition`` modality ``c``;
    ``F`` is the other, modulated, modality. Fused representation:

    * ``zeta=False``: ``γ ⊙ F + β`` (eq. (9));
    * ``zeta=True``: ``ζ·(γ ⊙ F) + (1 − ζ)·β`` (eq. (10)) with ``ζ`` a learnable per-channel gate on
      ``[γ ⊙ F, β]`` (as in `GatedSumFusion`). The two terms are treated as two modalities: the
      first term carries the modulated modality, ``β`` only the condition, so **ζ weights the modulated
      modality** and ``1 − ζ`` the condition modality;
    * ``simam=True``: `SimAM2` on the two terms; without a learnable ζ they get the fixed weight
      ``½`` (the §2.2 reading for fixed-weight fusion), i.e. ``U = ½(γ ⊙ F + β)`` before the attention,
      the factor ``½`` being absorbed by the classifier.

    `modalities` is stored as ``(modulated, condition)`` whatever the order given, so that ``zeta``
    always weights ``modalities[0]``, as `gradmod.functional.zeta_evidence` expects. ``zeta`` stays
    ``None`` without a learnable gate. Logits ``= Linear(dim, num_classes)(fused)``.
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        modalities: Sequence[str] = ("audio", "visual"),
        condition: str | None = None,
        zeta: bool = False,
        simam: bool = False,
        lambda_: float = 1e-6,
        scale: float = 2.5,
    ) -> None:
        names = tuple(_same_width(modalities, dim))
        if len(names) != 2:
            raise ValueError(f"FiLMFusion fuses exactly two modalities, got {list(names)}")
        condition = names[1] if condition is None else condition
        if condition not in names:
            raise ValueError(f"condition {condition!r} is not one of the modalities {list(names)}")
        modulated = names[0] if condition == names[1] else names[1]
        super().__init__({modulated: dim, condition: dim}, num_classes)
        self.dim = dim
        self.condition = condition
        self.film = nn.Linear(dim, 2 * dim)
        self.gate = _ModalityGate(2, dim) if zeta else None
        self.simam = SimAM2(dim, 2, lambda_, scale) if simam else None
        self.classifier = nn.Linear(dim, num_classes)
        self.zeta: Tensor | None = None

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        modulated, conditioning = self.ordered(features)
        gamma, beta = self.film(conditioning).chunk(2, dim=1)
        terms = [gamma * modulated, beta]
        if self.gate is None and self.simam is None:
            return self.classifier(terms[0] + terms[1])
        if self.gate is None:
            gates = _fixed_gates(modulated, 2, self.dim)
        else:
            gates = self.gate(terms)
            self.zeta = gates[:, 0]
        return self.classifier(_superpose(terms, gates, self.simam))


def __getattr__(name: str):  # MMCosine's head lives with its method (gradmod.methods.mmcosine)
    if name == "MMCosineFusion":
        from gradmod.methods.mmcosine import MMCosineFusion

        return MMCosineFusion
    raise AttributeError(f"module 'gradmod.fusion' has no attribute {name!r}")
