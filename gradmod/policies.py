"""Policies: evidence → one coefficient per modality.

**The policy contract.** Any callable is a policy::

    policy(evidence: Mapping[str, Tensor]) -> Mapping[str, Tensor | float]

It receives one 0-d evidence tensor per modality (the evidence of the whole step: every ``observe()``
since the last step, summed over ``torch.distributed`` ranks) and returns a mapping with **exactly the
modality names**, each value a **finite real 0-d tensor or Python/numpy real** inside the policy's range:
``policy.coefficient_range`` when the policy defines it, else ``[0, inf)``. The modulator checks this
once per step, before any gradient is touched (`check_coefficients`); a policy that breaks it raises
`PolicyError` and leaves the gradients, the step counter and the pending evidence as they were.

Policies may keep state (e.g. a ranking) by defining ``state_dict()`` / ``load_state_dict()``; the
modulator saves it with its own. The built-in policies are thin wrappers over `gradmod.functional` and
`StackedPolicy` subclasses: they also compute every coefficient from the stacked evidence vector in a few
device operations, and their range is guaranteed by construction (property-tested), so a modulator that
does not validate on the host (``validate=False``) checks only the evidence of their steps on the device.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gradmod import functional as F
from gradmod._internal import check_names, real_scalar

__all__ = ["OGMPolicy", "Policy", "PolicyError", "StackedPolicy", "check_coefficients", "coefficient_range"]

Policy = Any  # any callable ``(Mapping[str, Tensor]) -> Mapping[str, Tensor | float]``

#: The range of a policy that does not declare ``coefficient_range``.
DEFAULT_RANGE = (0.0, math.inf)


class PolicyError(ValueError):
    """A policy's output broke the policy contract (names, type, shape, finiteness or range)."""


def coefficient_range(policy: Policy) -> tuple[float, float]:
    """``policy.coefficient_range`` if declared (a ``(low, high)`` pair), else ``[0, inf)``."""
    low, high = getattr(policy, "coefficient_range", DEFAULT_RANGE)
    return float(low), float(high)


def check_coefficients(output: Any, names: Sequence[str], policy: Policy, device: torch.device) -> Tensor:
    """The policy's ``output`` as one ``[M]`` tensor in ``names`` order (float64 when a coefficient is float64, so
    that tiny coefficients reach float64 gradients intact; else float32), its *structure* checked.

    Raises `PolicyError` unless ``output`` is a mapping with exactly ``names``, each value a real 0-d
    tensor or real number. Values (finite, in `coefficient_range`) are checked by the caller, on the host
    or on the device (no synchronisation here).
    """
    if not isinstance(output, Mapping):
        raise PolicyError(f"policy {policy!r} returned {type(output).__name__}, not a mapping modality name -> coefficient")
    try:
        check_names(output, names, f"the output of policy {policy!r}")
    except ValueError as error:
        raise PolicyError(str(error)) from None
    values = []
    for name in names:
        value = output[name]
        if isinstance(value, Tensor):
            if value.dim() != 0 or value.is_complex() or value.dtype == torch.bool:
                raise PolicyError(
                    f"policy {policy!r} gave modality {name!r} a {value.dtype} tensor of shape {tuple(value.shape)}: "
                    "a coefficient is a real 0-d tensor or a number"
                )
            values.append(value.detach().to(device))
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            values.append(torch.tensor(float(value), device=device))
        else:
            raise PolicyError(f"policy {policy!r} gave modality {name!r} a {type(value).__name__}: a coefficient is a real number")
    dtype = torch.float64 if any(v.dtype == torch.float64 for v in values) else torch.float32
    return torch.stack([v.to(dtype) for v in values])


def range_message(policy: Policy, names: Sequence[str], coefficients: Sequence[float]) -> str | None:
    """Why host-side ``coefficients`` break the contract's value rules, or ``None`` when they do not."""
    low, high = coefficient_range(policy)
    for name, value in zip(names, coefficients):
        if not math.isfinite(value) or not low <= value <= high:
            return (
                f"policy {policy!r} gave modality {name!r} the coefficient {value}, outside its range "
                f"[{low:g}, {high:g}] or not finite; no gradient was changed"
            )
    return None


class StackedPolicy(ABC):
    """A policy that also maps the stacked evidence ``[M]`` (modality order) to the coefficients ``[M]``.

    Subclasses promise coefficients that are finite and inside ``coefficient_range`` for every evidence
    vector (zeros, infinities and NaN included): the modulator does not check their values on the device.
    """

    coefficient_range: tuple[float, float]

    @abstractmethod
    def stacked(self, evidence: Tensor, names: Sequence[str]) -> Tensor:
        """Coefficients ``[M]`` for the evidence ``[M]`` of the modalities ``names``, in the evidence's dtype."""

    def __call__(self, evidence: Mapping[str, Tensor]) -> dict[str, Tensor]:
        names = list(evidence)
        stacked = torch.stack([torch.as_tensor(evidence[name]).detach().reshape(()).double() for name in names])
        return dict(zip(names, self.stacked(stacked, names).unbind(0)))


@dataclass
class OGMPolicy(StackedPolicy):
    """``k_u = 1 − tanh(strength·ρ_u)`` if ``ρ_u > 1`` else ``1`` (`gradmod.functional.ogm_coefficients`).

    OGM-GE's coefficient with ``strength = α``; DGM's eq. (7) with ``strength = γ`` (Fu, Gao & Xu); the
    decoupling-free method uses it with ζ evidence. Coefficients lie in ``[0, 1]``.
    """

    strength: float
    coefficient_range = (0.0, 1.0)

    def __post_init__(self) -> None:
        self.strength = real_scalar(self.strength, "alpha/gamma (the policy's strength)")

    def stacked(self, evidence: Tensor, names: Sequence[str]) -> Tensor:
        return F.ogm_coefficients_of(evidence, self.strength)




def __getattr__(name: str):  # names that moved to their method's module (gradmod._deprecated)
    from gradmod._deprecated import moved_attribute

    return moved_attribute(__name__, name)
