"""AGM: adaptive gradient modulation through Shapley mono-modal responses.

Li et al., *Boosting Multi-modal Model Performance with Adaptive Gradient Modulation*, ICCV 2023 (official
code ``lihong2303/AGM_ICCV2023``). AGM splits the fused output ``f(N)`` of a batch into one *mono-modal
response* per modality and scales the gradient that flows back through each response:

* **Responses** (`mono_responses`, a helper that runs your model): the output ``f(S)`` of every coalition
  ``S`` of modalities, the absent ones' inputs zeroed, and the Shapley value of each modality,

  ``φ_m = Σ_{S ⊆ N∖{m}} |S|! (M − |S| − 1)! / M! · (f(S ∪ {m}) − f(S))``,

  so that ``f(N) = f(∅) + Σ_m φ_m``. Cost: ``2^M`` forward passes (``2^M − 1`` with the official
  convention, ``m_m = φ_m + f(∅)/M``, whose ``f(∅)`` terms cancel).
* **Measure** (`ResponseScore`): the score of a modality is the mean negative log-likelihood of its
  response, ``s_m = −(1/B) Σ_i log max(softmax(m_{m,i})[y_i], 10⁻⁸)``.
* **Policy** (`AGMPolicy`, stateful): the ratio ``ρ_m = exp((mean_k s_k − s_m) · M/(M − 1))``, for two
  modalities ``ρ_a = exp(s_v − s_a)``; the target ``τ_m``, the same formula on the running means
  ``S_m`` of the scores over the steps before this one; the coefficient
  ``c_m = exp(α · min(τ_m − ρ_m, cap))`` (``α`` is the preset's ``sharpness``: the paper's α, renamed so that
  ``alpha`` means OGM's α only); then ``S_m ← S_m (t − 1)/t + s_m/t``.
* **Applier** (`ResponseApplier`): the loss is computed from ``mod.combine(responses)``, which equals
  ``f(N)`` in the forward pass, and whose backward multiplies the gradient through each ``m_m`` by
  ``c_m``. The gradient through one response reaches several encoders (``f(N)`` and the masked
  outputs contain them all), so the applier checks that every backward pass went through *all* the
  responses, not that each encoder was reached through its own.

The preset `AGM` composes them over `gradmod.Modulator` (the window, the step counter, the history, the
``state_dict``, ``torch.distributed``). A drop-in::

    mod = gradmod.AGM({"audio": audio_net, "visual": visual_net}, sharpness=1.0)
    mod.attach(optimizer)
    responses = gradmod.agm.mono_responses(model, {"audio": a, "visual": v})   # 2^M forwards
    mod.observe(responses=responses, target=y)                                 # the coefficients
    loss = F.cross_entropy(mod.combine(responses), y)                          # = model(a, v)

**Evidence that adds up.** The modulator sums evidence over the micro-batches of a step and over
``torch.distributed`` ranks; AGM needs batch means. The evidence of modality ``m`` is therefore
``e_m = Σ_i (L + ℓ_{m,i} − (1/M) Σ_k ℓ_{k,i})`` with ``ℓ_{m,i} = log max(softmax(m_{m,i})[y_i], 10⁻⁸)``
and ``L = −log 10⁻⁸``: every term lies in ``[L/M, L(2M − 1)/M]``, so the evidence is positive,
``Σ_m e_m = M·L·B`` gives the sample count ``B``, and ``s_m − mean_k s_k = L − e_m/B`` the centred
scores, which are all AGM's ratios and targets depend on (`centered_scores`). Sums over any split of
the batch give exactly the scores of the whole batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradmod._internal import (
    NOT_GIVEN,
    check_logits_target,
    check_names,
    checked_ignore_index,
    eval_mode,
    per_modality,
    real_scalar,
    renamed_keyword,
    target_problems,
)
from gradmod.appliers import Applier, Modality, scale_grad
from gradmod.functional import coalitions, shapley_values
from gradmod.history import MODULATOR_FIELDS, Derived
from gradmod.measures import IGNORE_INDEX, Measure
from gradmod.method import Fit, MethodInfo, Option, Strength, float_or_none
from gradmod.modulator import Modulator

__all__ = [
    "AGM",
    "CONVENTIONS",
    "PROBABILITY_FLOOR",
    "AGMPolicy",
    "MonoResponses",
    "ResponseApplier",
    "ResponseScore",
    "agm_coefficients",
    "agm_ratios",
    "centered_scores",
    "coalitions",
    "mono_responses",
    "official_clip_",
    "response_evidence",
    "shapley_values",
]

#: The official code replaces a true-class probability below this by it before the logarithm.
PROBABILITY_FLOOR = 1e-8
#: ``L = −log 10⁻⁸``: the largest score one sample can have, the offset that keeps the evidence positive.
_CEILING = -math.log(PROBABILITY_FLOOR)
#: ``"shapley"``: the responses are the Shapley values ``φ_m`` and ``f(∅)`` is added unmodulated;
#: ``"official"``: ``m_m = φ_m + f(∅)/M``, as the official code computes them (``f(∅)`` cancels).
CONVENTIONS = ("shapley", "official")


# ----------------------------------------------------------------------------------------- responses


class MonoResponses(Mapping[str, Tensor]):
    """The mono-modal responses ``m_m`` of a batch, by modality (a read-only mapping), from `mono_responses`.

    Attributes:
        remainder: the part of ``f(N)`` no response carries: ``f(∅)`` under the Shapley convention,
            ``None`` under the official one (whose responses add up to ``f(N)``).
        full: ``f(N)``, the model's output with every modality present.
    """

    def __init__(self, responses: Mapping[str, Tensor], remainder: Tensor | None, full: Tensor) -> None:
        self._responses = dict(responses)
        self.remainder = remainder
        self.full = full

    def __getitem__(self, name: str) -> Tensor:
        return self._responses[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._responses)

    def __len__(self) -> int:
        return len(self._responses)

    def __repr__(self) -> str:
        shapes = {name: tuple(value.shape) for name, value in self._responses.items()}
        return f"MonoResponses({shapes}, remainder={'None' if self.remainder is None else 'f(∅)'})"


def mono_responses(
    model: nn.Module,
    inputs: Mapping[str, Tensor],
    *,
    convention: str = "shapley",
    forward: Callable[[dict[str, Tensor]], Tensor] | None = None,
    mask: Callable[[Tensor], Tensor] = torch.zeros_like,
    masked_eval: bool = True,
) -> MonoResponses:
    """Run ``model`` on every coalition of modalities and return the mono-modal responses (with gradients).

    The full coalition runs in the model's current mode; the others, each absent modality's input
    replaced by ``mask(input)`` (zeros, as the official code pads), run in eval mode when
    ``masked_eval`` (batch-norm statistics and dropout come from the full pass only, as in the official
    ``GradMod.forward``), with gradients, since the responses are what the loss is computed from.

    Cost: ``2^M`` forward passes of the model per batch for ``convention="shapley"`` (``2^M − 1`` for
    ``"official"``, which needs no ``f(∅)``): 4 (3) for two modalities, 8 (7) for three; the backward pass
    goes through all of them.

    Args:
        model: the multimodal model; called as ``model(**inputs)`` unless ``forward`` is given.
        inputs: modality name → input batch, two or more.
        convention: ``"shapley"`` (the Shapley values; ``f(∅)`` joins the output unmodulated) or
            ``"official"`` (``m_m = φ_m + f(∅)/M``, the official code's responses).
        forward: ``inputs mapping -> [B, C] logits``, for models with another signature, e.g.
            ``lambda x: model(x["audio"], x["visual"])[0]``.
        mask: what an absent modality's input becomes.
        masked_eval: run the masked coalitions in eval mode.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if not isinstance(inputs, Mapping) or len(inputs) < 2:
        raise ValueError("inputs must be a mapping of two or more modality names to input batches")
    if masked_eval and not isinstance(model, nn.Module):
        raise TypeError(f"masked_eval=True switches the model to eval mode: model must be an nn.Module, got {type(model).__name__}")
    names = list(inputs)
    call = forward if forward is not None else _keyword_call(model, names)
    full = _checked_output(call(dict(inputs)), names)
    outputs = {frozenset(names): full}
    wanted = [subset for subset in coalitions(names)[:-1] if subset or convention == "shapley"]
    with eval_mode(model) if masked_eval else contextlib.nullcontext():
        for subset in wanted:
            masked = {name: value if name in subset else mask(value) for name, value in inputs.items()}
            outputs[subset] = _checked_output(call(masked), sorted(subset), full.shape)
    if convention == "official":
        outputs[frozenset()] = torch.zeros_like(full)
    remainder = outputs[frozenset()] if convention == "shapley" else None
    return MonoResponses(shapley_values(outputs, names), remainder, full)


def _keyword_call(model: nn.Module, names: list[str]) -> Callable[[dict[str, Tensor]], Tensor]:
    """``model(**batch)``, with the ``TypeError`` of a model that takes other arguments pointing to ``forward=``."""

    def call(batch: dict[str, Tensor]) -> Tensor:
        try:
            return model(**batch)
        except TypeError as error:
            raise TypeError(
                f"mono_responses calls model(**inputs), i.e. model({', '.join(f'{n}=...' for n in names)}), and it "
                f"raised {error}; for a model with another signature pass forward=, e.g. "
                "forward=lambda x: model(x) for a forward that takes one mapping"
            ) from error

    return call


def _checked_output(output: Any, present: list[str], shape: torch.Size | None = None) -> Tensor:
    if not isinstance(output, Tensor) or output.dim() != 2:
        got = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise ValueError(f"the model's output with modalities {present} present must be [batch, classes] logits, got {got}")
    if shape is not None and output.shape != shape:
        raise ValueError(f"the model's output with modalities {present} present has shape {tuple(output.shape)}, the full one {tuple(shape)}")
    return output


# ----------------------------------------------------------------------------------------- scores
def _log_likelihoods(logits: Tensor, target: Tensor, ignore_index: int | None) -> tuple[Tensor, Tensor]:
    """``log max(softmax(z_i)[y_i], 10⁻⁸)`` per sample (float32 or wider) and the mask of counted samples."""
    check_logits_target(logits, target)
    kept = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    index = torch.where(kept, target, 0).long().unsqueeze(1)
    z = logits.detach()
    z = z if z.dtype in (torch.float32, torch.float64) else z.float()
    picked = torch.log_softmax(z, dim=1).gather(1, index).squeeze(1)
    return picked.clamp_min(-_CEILING), kept


def response_evidence(responses: Mapping[str, Tensor], target: Tensor, ignore_index: int | None = None) -> dict[str, Tensor]:
    """AGM's evidence of each modality on a batch (the module docstring derives it):

    ``e_m = Σ_i (L + ℓ_{m,i} − (1/M) Σ_k ℓ_{k,i})``, ``ℓ_{m,i} = log max(softmax(m_{m,i})[y_i], 10⁻⁸)``,
    ``L = −log 10⁻⁸``. Positive for a non-empty batch, 0 for an empty one; it adds up over any split
    of the batch. Samples whose target is ``ignore_index`` add nothing. No host synchronisation.
    """
    names = list(responses)
    if len(names) < 2:
        raise ValueError(f"AGM's evidence needs two or more modalities, got {names}")
    pairs = [_log_likelihoods(responses[name], target, ignore_index) for name in names]
    shapes = {name: tuple(responses[name].shape) for name in names}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"the responses of all modalities must have one shape, got {shapes}")
    likelihoods = torch.stack([ll for ll, _ in pairs])
    kept = pairs[0][1]
    centered = likelihoods - likelihoods.mean(0, keepdim=True)
    evidence = ((_CEILING + centered) * kept).sum(1)
    return dict(zip(names, evidence.unbind(0)))


def _stacked(evidence: Mapping[str, Tensor]) -> Tensor:
    values = [torch.as_tensor(value).detach().reshape(()) for value in evidence.values()]
    dtype = torch.float32 if values[0].device.type == "mps" else torch.float64  # MPS has no float64
    if len(values) < 2:
        raise ValueError(f"AGM needs two or more modalities, got {list(evidence)}")
    return torch.stack([value.to(dtype) for value in values])


def _centered(evidence: Tensor) -> Tensor:
    """``s_m − mean_k s_k = L − e_m / B`` with ``B = Σ_m e_m / (M·L)``, for stacked evidence ``[M]``."""
    count = evidence.sum() / (evidence.numel() * _CEILING)
    return _CEILING - evidence / count


def _ratios(centered: Tensor) -> Tensor:
    """``exp(−(s_m − mean_k s_k) · M/(M − 1))`` = ``exp(mean_{k≠m} s_k − s_m)``, for centred scores ``[M]``."""
    m = centered.numel()
    return torch.exp(-centered * (m / (m - 1)))


def _ratio_rows(evidence: Tensor) -> Tensor:
    """AGM's ratios of every row of recorded evidence ``[N, M]`` (the history's derived ``ratios``)."""
    m = evidence.shape[-1]
    count = evidence.sum(-1, keepdim=True) / (m * _CEILING)
    return torch.exp(-(_CEILING - evidence / count) * (m / (m - 1)))


def centered_scores(evidence: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The centred scores ``s_m − mean_k s_k`` of the batch (or step) that gave ``evidence`` (`response_evidence`).

    Read from a modulator's history: ``centered_scores(mod.history[-1]["evidence"])``.
    """
    return dict(zip(evidence, _centered(_stacked(evidence)).unbind(0)))


def agm_ratios(evidence: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """AGM's ratio of each modality, ``ρ_m = exp((mean_k s_k − s_m)·M/(M − 1))``, from its evidence.

    For two modalities ``ρ_a = exp(s_v − s_a)`` and ``ρ_v = 1/ρ_a``; in general ``Π_m ρ_m = 1``, and
    ``ρ_m > 1`` for a modality whose responses fit the labels better than the others' on average.
    """
    return dict(zip(evidence, _ratios(_centered(_stacked(evidence))).unbind(0)))


def agm_coefficients(
    ratios: Mapping[str, Tensor], targets: Mapping[str, Tensor], sharpness: float, cap: float | None = 10.0
) -> dict[str, Tensor]:
    """AGM's coefficient of each modality, ``c_m = exp(α · min(τ_m − ρ_m, cap))``, ``α = sharpness`` (``cap=None``:
    no cap).

    ``c_m < 1`` (damped) when the modality is further ahead than its running target, ``> 1`` (boosted)
    when it is behind it, 1 when on target; always in ``(0, exp(α·cap)]``.
    """
    sharpness = real_scalar(sharpness, "sharpness")
    cap = None if cap is None else real_scalar(cap, "cap")
    check_names(targets, list(ratios), "targets")
    gaps = {name: torch.as_tensor(targets[name]) - torch.as_tensor(ratios[name]) for name in ratios}
    return {name: torch.exp(sharpness * (gap if cap is None else gap.clamp_max(cap))) for name, gap in gaps.items()}


def official_clip_(parameters: Iterable[Tensor], head_weight: Tensor, max_value: float = 1.0) -> bool:
    """The official code's clipping, after ``backward()``: when an element of ``head_weight.grad`` (the fused
    head's weight) lies outside ``[−max_value, max_value]``, clip the norm of all ``parameters``' gradients to
    ``max_value`` (``clip_grad_norm_``). CREMA-D uses 1, UR-Funny 5. Returns whether it clipped (one host
    synchronisation). Without a ``cap`` the coefficients can be huge, and this is what keeps the step finite.
    """
    max_value = real_scalar(max_value, "max_value", strict=True)
    if head_weight.grad is None:
        raise ValueError("head_weight has no gradient: call official_clip_ after backward(), with the fused head's weight")
    clipped = bool((head_weight.grad.abs() > max_value).any())
    if clipped:
        nn.utils.clip_grad_norm_(parameters, max_norm=max_value)
    return clipped


# ----------------------------------------------------------------------------------------- measure
class ResponseScore(Measure):
    """AGM's evidence (`response_evidence`): ``observe(responses={name: [B, C]}, target=[B])``.

    ``responses`` is what `mono_responses` returns, or any mapping name → per-modality logits. Samples whose
    target is ``ignore_index`` (default −100, as in ``cross_entropy``) add nothing.
    """

    inputs = ("responses", "target")

    def __init__(self, ignore_index: int | None = IGNORE_INDEX) -> None:
        self.ignore_index = checked_ignore_index(ignore_index)

    def _checked(self, names: Sequence[str], responses: Any, target: Any) -> Mapping[str, Tensor]:
        responses = per_modality(responses, names, "observe(responses=...)")
        if target is None:
            raise ValueError("observe() for AGM needs target=[batch] class indices")
        for name in names:
            check_logits_target(responses[name], target, name=f"responses[{name!r}]")
        return responses

    def evidence(self, names, responses=None, target=None, **_):
        responses = self._checked(names, responses, target)
        return response_evidence({name: responses[name] for name in names}, target, self.ignore_index)

    def problems(self, names, responses=None, target=None, **_):
        responses = self._checked(names, responses, target)
        flags: dict[str, Tensor] = {}
        for name in names:  # a response is the modality's logits: the messages say so
            flags.update(target_problems(name, responses[name], target, self.ignore_index))
        return flags

    def __repr__(self) -> str:
        return f"ResponseScore(ignore_index={self.ignore_index})"


# ----------------------------------------------------------------------------------------- policy
class AGMPolicy:
    """AGM's coefficients (`agm_coefficients`) against running targets; stateful (``state_dict``).

    Each call computes ``c_m = exp(α · min(τ_m − ρ_m, cap))`` from the step's evidence and the running
    means of the centred scores *before* this step, and proposes their update
    ``S ← S (t − 1)/t + s/t``; `commit` (called by `ResponseApplier` when the step is over) makes it
    the state. A later call before the commit replaces the proposal: the next micro-batch of the same
    step (its evidence includes this one's), or the next step after one that ``GradScaler`` skipped
    (whose evidence the modulator dropped). ``t`` counts the committed steps: the official code's
    global step, never reset. A degenerate step (evidence not finite and > 0) changes nothing.
    Coefficients lie in ``(0, exp(α·cap)]``.
    """

    def __init__(self, sharpness: float = 1.0, cap: float | None = 10.0) -> None:
        self.sharpness = real_scalar(sharpness, "sharpness")
        self.cap = None if cap is None else real_scalar(cap, "cap")
        self._names: list[str] | None = None
        self._mean: Tensor | None = None  # running means of the centred scores, [M]
        self._count: Tensor = torch.zeros((), dtype=torch.float64)  # committed steps
        self._proposal: tuple[Tensor, Tensor] | None = None

    @property
    def coefficient_range(self) -> tuple[float, float]:
        if self.cap is None:
            return (0.0, math.inf)
        # exp(α·cap) one ulp up, so that torch's float64 exp of α·cap passes whichever way it rounds
        return (0.0, math.nextafter(math.exp(self.sharpness * self.cap), math.inf))

    @property
    def steps(self) -> int:
        """How many steps have updated the running means (``t`` of the next update is this + 1)."""
        return int(self._count.item())

    def targets(self) -> dict[str, Tensor] | None:
        """The current targets ``τ_m`` (``None`` before the first call)."""
        if self._names is None:
            return None
        mean = self._mean if self._mean is not None else torch.zeros(len(self._names), dtype=torch.float64)
        return dict(zip(self._names, _ratios(mean).unbind(0)))

    def __call__(self, evidence: Mapping[str, Tensor]) -> dict[str, Tensor]:
        names = list(evidence)
        if self._names is None:
            self._names = names
        elif names != self._names:
            raise ValueError(f"AGMPolicy holds running scores of {self._names}, called with {names}")
        e = _stacked(evidence)
        centered = _centered(e)
        mean = torch.zeros_like(e) if self._mean is None else self._mean.to(e)
        count = self._count.to(e)
        gaps = _ratios(mean) - _ratios(centered)
        coefficients = torch.exp(self.sharpness * (gaps if self.cap is None else gaps.clamp_max(self.cap)))
        usable = torch.isfinite(e).all() & (e > 0).all()
        updated = count + 1
        self._proposal = (
            torch.where(usable, mean * (count / updated) + centered / updated, mean),
            torch.where(usable, updated, count),
        )
        return dict(zip(names, coefficients.unbind(0)))

    def commit(self) -> None:
        """Make the update proposed by the last call the state (no-op without one)."""
        if self._proposal is not None:
            self._mean, self._count = self._proposal
            self._proposal = None

    def reset(self) -> None:
        """Forget the running means and the step count."""
        self._names, self._mean, self._proposal = None, None, None
        self._count = torch.zeros((), dtype=torch.float64)

    def state_dict(self) -> dict[str, Any]:
        return {
            "names": self._names,
            "mean": None if self._mean is None else self._mean.detach().cpu().clone(),
            "count": self._count.detach().cpu().clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict` (the running means of the same modalities, in the same order)."""
        names = state["names"]
        if names is not None and self._names is not None and list(names) != self._names:
            raise ValueError(f"the saved AGM state is for {list(names)}, this policy runs {self._names}")
        mean = state["mean"]
        if mean is not None and (names is None or tuple(mean.shape) != (len(names),)):
            raise ValueError(f"the saved AGM running means have shape {tuple(mean.shape)}, expected one per modality")
        self._names = None if names is None else list(names)
        self._mean = None if mean is None else mean.clone().to(torch.float64)
        self._count = torch.as_tensor(state["count"], dtype=torch.float64).clone()
        self._proposal = None

    def __repr__(self) -> str:
        return f"AGMPolicy(sharpness={self.sharpness:g}, cap={self.cap})"


# ----------------------------------------------------------------------------------------- applier
class ResponseApplier(Applier):
    """Multiply the gradient through each mono-modal response by its coefficient, during backward.

    `combine` returns ``Σ_m scale_grad(m_m, c_m)`` (plus the responses' ``remainder``), read when
    backward runs: call ``observe()`` before ``backward()``. Every backward pass inside the window that
    reaches the modalities' parameters must go through all the responses after an ``observe()``; the next
    step raises a ``RuntimeError`` otherwise. When a step ends it commits the policy's update.

    Args:
        policy: the `AGMPolicy` whose update each finished step commits (``None``: a stateless policy).
        keep_after_window: when the modulator gives no coefficients (outside the window, or a degenerate
            step), keep the last ones instead of 1, as the official code's backward hooks do after the
            last modulated epoch.
    """

    before_backward = True

    def __init__(self, policy: AGMPolicy | None = None, keep_after_window: bool = False) -> None:
        self._selection = None
        self.policy = policy
        self.keep_after_window = bool(keep_after_window)
        self._values: Tensor | None = None  # the coefficients in force ([M]), None: neutral
        self._live: dict[torch.device, Tensor] = {}  # one [M] buffer per device, read by backward
        self._through: set[int] = set()
        self._problems: list[str] = []

    def _buffer(self, device: torch.device) -> Tensor:
        if device not in self._live:
            values = torch.ones(len(self.names)) if self._values is None else self._values
            self._live[device] = values.detach().to(device=device, dtype=torch.float64).clone()
        return self._live[device]

    @property
    def coefficients(self) -> dict[str, float] | None:
        """The coefficients the next backward pass applies (``None``: 1 for every modality)."""
        return None if self._values is None else dict(zip(self.names, self._values.tolist()))

    def set_coefficients(self, coefficients: Tensor | None) -> None:
        if coefficients is None and self.keep_after_window and self._values is not None:
            return
        self._values = None if coefficients is None else coefficients.detach().double()
        values = torch.ones(len(self.names)) if self._values is None else self._values
        for device, buffer in self._live.items():
            buffer.copy_(values.to(device, non_blocking=True))

    def combine(self, responses: Mapping[str, Tensor]) -> Tensor:
        """``Σ_m m_m`` (+ ``responses.remainder``): the fused output, whose backward scales each ``m_m`` by ``c_m``."""
        given = per_modality(responses, self.names, "combine(responses)")
        total = getattr(responses, "remainder", None)
        for index, name in enumerate(self.names):
            response = given[name]
            if not isinstance(response, Tensor) or not response.requires_grad:
                raise ValueError(f"responses[{name!r}] does not require grad: compute the responses with gradients")
            scaled = scale_grad(response, self._buffer(response.device)[index])
            scaled.register_hook(self._passed(index))
            total = scaled if total is None else total + scaled
        return total

    def _passed(self, index: int) -> Callable[[Tensor], None]:
        def record(grad: Tensor) -> None:
            self._through.add(index)

        return record

    def after_pass(self, reached: frozenset[int], observed: bool, in_window: bool) -> None:
        if in_window and reached:
            if not observed:
                self._problems.append(
                    "a backward pass reached the modalities' parameters before observe() gave its coefficients: "
                    "call observe(responses=..., target=...) after the forward passes and before backward()"
                )
            else:
                missing = [name for index, name in enumerate(self.names) if index not in self._through]
                if missing:
                    self._problems.append(
                        f"a backward pass reached the modalities' parameters without passing through the responses "
                        f"of {missing}: compute the loss from mod.combine(responses)"
                    )
        self._through.clear()

    def check(self) -> None:
        if self._problems:
            problem, self._problems = self._problems[0], []
            raise RuntimeError(f"gradmod: AGM's coefficients were not applied: {problem}")

    def finish_step(self) -> None:
        if self.policy is not None:
            self.policy.commit()
        self.set_coefficients(None)
        self._through.clear()

    def apply(self, coefficients: Tensor, step: int, seed: int, active: Tensor | None = None) -> None:
        """Nothing to do after backward: `combine`'s backward applied the coefficients."""

    def state_dict(self) -> dict[str, Any]:
        """The coefficients in force (they matter across steps with ``keep_after_window``)."""
        return {"coefficients": None if self._values is None else self._values.detach().cpu().clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        values = state["coefficients"]
        if values is not None and tuple(values.shape) != (len(self.names),):
            raise ValueError(f"saved coefficients have shape {tuple(values.shape)}, expected ({len(self.names)},)")
        self._values = None
        self.set_coefficients(None if values is None else values.clone())

    def __repr__(self) -> str:
        return f"ResponseApplier(keep_after_window={self.keep_after_window})"


# ----------------------------------------------------------------------------------------- preset
class AGM(Modulator):
    """Adaptive gradient modulation (Li et al., *Boosting Multi-modal Model Performance with Adaptive Gradient
    Modulation*, ICCV 2023): `ResponseScore` → `AGMPolicy` → `ResponseApplier`.

    ``observe(responses=gradmod.methods.agm.mono_responses(model, inputs), target=y)``, then compute the loss
    from ``mod.combine(responses)``. AGM has its own applier, so there is no ``apply=``.

    Args:
        modalities: name → encoder, two or more.
        sharpness: ``α ≥ 0`` of ``c_m = exp(α·min(τ_m − ρ_m, cap))`` (the paper's α; official default 1.0;
            ``alpha=`` is its old name).
        cap: 10 in the official CREMA-D script, 7 for UR-Funny, ``None``: none, as for AVE, AV-MNIST and
            CMU-MOSEI.
        keep_after_window: keep the last coefficients after ``stop_step``, as the official code does.
        ignore_index: targets equal to it add no score.
        **options: `gradmod.Modulator`'s window, seed, history and validation options.
    """

    kind = "responses"
    applier: ResponseApplier
    policy: AGMPolicy
    _history_fields = (*MODULATOR_FIELDS[:1], Derived("ratios", "evidence", _ratio_rows), MODULATOR_FIELDS[2])

    def __init__(
        self,
        modalities: Mapping[str, Modality],
        sharpness: float = 1.0,
        *,
        cap: float | None = 10.0,
        keep_after_window: bool = False,
        ignore_index: int | None = IGNORE_INDEX,
        **options: Any,
    ) -> None:
        if "apply" in options:
            raise TypeError("AGM applies its coefficients through mod.combine(responses); apply= is not an option of AGM")
        alpha = renamed_keyword(options, "alpha", "sharpness", "AGM")
        if alpha is not NOT_GIVEN:
            sharpness = alpha
        policy = AGMPolicy(sharpness, cap)
        applier = ResponseApplier(policy, keep_after_window)
        super().__init__(modalities, measure=ResponseScore(ignore_index), policy=policy, apply=applier, **options)

    def combine(self, responses: Mapping[str, Tensor]) -> Tensor:
        """The output to compute the loss from: equals ``f(N)``; its backward scales each ``m_m`` by ``c_m``."""
        return self.applier.combine(responses)

    def _extra_state(self) -> dict[str, Any]:
        """The modulator's state, with the policy's running means and the coefficients in force."""
        return {**super()._extra_state(), "applier": self.applier.state_dict()}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        super()._load_extra_state(state)
        if "applier" in state:
            self.applier.load_state_dict(state["applier"])

    def _reset(self) -> None:
        """Forget the step counter, the running means and the coefficients in force."""
        super()._reset()
        self.applier.load_state_dict({"coefficients": None})


METHODS = (
    MethodInfo(
        key="agm",
        preset=AGM,
        title="AGM",
        kind="responses",
        paper="Li et al., Boosting Multi-modal Model Performance with Adaptive Gradient Modulation, ICCV 2023",
        page="methods/agm.md",
        observes="mono-modal responses + target",
        cost="every step: 2^M forward passes (4 for two modalities), backward through all",
        fit=Fit(head="coalitions", acts_on="gradient scale"),
        strength=Strength("sharpness", 1.0, "α of c = exp(α·min(τ − ρ, cap)): how hard a modality is pulled to its target"),
        options=(
            Option("cap", 10.0, "the cap of α·min(τ − ρ, cap) (10 for CREMA-D in the official code; none: no cap)", float_or_none),
            Option(
                "clip", 1.0, "clip every gradient to this norm when the fused head's weight gradient leaves [-c, c], as "
                "the official loop does (official_clip_); none: never", float_or_none, loop=True,
            ),
        ),
    ),
)
