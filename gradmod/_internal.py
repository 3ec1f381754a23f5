"""Checks and constants shared by gradmod's modules (not public API).

Every error names what was wrong: the argument, the modality, the expected shape or range.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

#: Added to a gradient's standard deviation before it scales the GE noise: ``grad.std() + 1e-8`` in the
#: official OGM-GE code. One constant for every kernel.
STD_EPS = 1e-8


def real_scalar(value: Any, name: str, *, minimum: float = 0.0, strict: bool = False) -> float:
    """``value`` as a Python float: a finite real ``>= minimum`` (``> minimum`` when ``strict``).

    Accepts Python and numpy reals and 0-d real tensors. ``bool`` is rejected with a ``TypeError`` (``True``
    is an ``int`` to Python, but never a strength anyone meant), as are complex numbers and tensors that
    are not 0-d reals.
    """
    if isinstance(value, bool) or (isinstance(value, Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{name} must be a real number, got the bool {value!r}")
    if isinstance(value, Tensor):
        if value.dim() != 0 or value.is_complex():
            raise TypeError(f"{name} must be a real number or a 0-d real tensor, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < minimum or (strict and number == minimum):
        bound = "" if minimum == -math.inf else f" > {minimum:g}" if strict else f" >= {minimum:g}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r} (not finite or out of range)")
    return number


def check_names(given: Iterable[str], expected: Iterable[str], what: str) -> None:
    """Raise ``ValueError`` unless ``given`` names exactly the modalities ``expected`` (any order)."""
    given, expected = list(given), list(expected)
    missing = [name for name in expected if name not in given]
    unknown = [name for name in given if name not in expected]
    if missing or unknown:
        raise ValueError(f"{what} must name exactly the modalities {expected}: missing {missing}, unknown {unknown}")


def per_modality(value: Any, names: Iterable[str], what: str) -> Mapping[str, Any]:
    """``value`` checked to be a mapping that names exactly ``names``; a tensor or list gets a ``TypeError``."""
    names = list(names)
    if not isinstance(value, Mapping):
        raise TypeError(
            f"{what} must be a mapping modality name -> tensor for the modalities {names}, "
            f"got {type(value).__name__}"
        )
    check_names(value, names, what)
    return value


def check_logits_target(logits: Tensor, target: Tensor, name: str = "logits") -> None:
    """``logits`` ``[batch, classes]`` and ``target`` ``[batch]`` integer class indices (shapes and dtypes only)."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(logits).__name__}")
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a tensor of class indices, got {type(target).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"{name} must be [batch, classes], got shape {tuple(logits.shape)}")
    if target.dim() != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(
            f"target must be [batch] class indices matching {name} batch {logits.shape[0]}, "
            f"got shape {tuple(target.shape)}"
        )
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")


_CONSTANTS: dict[tuple[int, torch.device, torch.dtype], tuple[Tensor, Tensor, Tensor, Tensor]] = {}


def constants(m: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For ``m`` modalities (or classes): the matrix ``1 − I`` whose product with evidence sums the others,
    and zeros, ones and minus ones of length ``m`` — made once per (m, device, dtype), so that a step
    launches nothing to build them (a plain dict, which ``torch.compile`` reads as constants).
    """
    key = (m, torch.device(device), dtype)
    if key not in _CONSTANTS:
        ones = torch.ones(m, dtype=dtype, device=device)
        _CONSTANTS[key] = (1.0 - torch.eye(m, dtype=dtype, device=device), torch.zeros_like(ones), ones, -ones)
    return _CONSTANTS[key]


def wide_dtype(device: torch.device) -> torch.dtype:
    """float64 for evidence and ratios (float32 on MPS, which has no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


def distributed() -> bool:
    """Whether ``torch.distributed`` is available and initialised."""
    return dist.is_available() and dist.is_initialized()


def collective_device(device: torch.device) -> torch.device:
    """Where a tensor for a collective must live: the current CUDA device under NCCL, else ``device``."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def target_problems(name: str, logits: Tensor, target: Tensor, ignore_index: int | None) -> dict[str, Tensor]:
    """Device flags for bad logits/target values (a measure's ``problems``): NaN logits, classes out of range."""
    classes = logits.shape[1]
    outside = (target < 0) | (target >= classes)
    if ignore_index is not None:
        outside &= target != ignore_index
    return {
        f"logits of modality {name!r} contain NaN or inf": ~torch.isfinite(logits.detach()).all(),
        f"target holds class indices outside [0, {classes})": outside.any(),
    }


def checked_ignore_index(value: int | None) -> int | None:
    """``ignore_index`` checked to be an int (or ``None``)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(f"ignore_index must be an int or None, got {value!r}")
    return value


_STD_EPS_TENSORS: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def std_eps(device: torch.device, dtype: torch.dtype) -> Tensor:
    """`STD_EPS` as a cached 0-d tensor: adding it to a 0-d tensor is cheaper than adding a Python float."""
    key = (torch.device(device), dtype)
    if key not in _STD_EPS_TENSORS:
        _STD_EPS_TENSORS[key] = torch.tensor(STD_EPS, dtype=dtype, device=device)
    return _STD_EPS_TENSORS[key]


#: What `renamed_keyword` returns when the old keyword was not given.
NOT_GIVEN = object()


def renamed_keyword(options: dict[str, Any], old: str, new: str, owner: str) -> Any:
    """Pop a keyword that was renamed from ``options``: its value with a ``DeprecationWarning`` naming the new
    keyword, or `NOT_GIVEN`. The old name is accepted for one release."""
    if old not in options:
        return NOT_GIVEN
    warnings.warn(
        f"{owner}({old}=...) is renamed {owner}({new}=...); {old}= will be removed in the next release",
        DeprecationWarning,
        stacklevel=3,
    )
    return options.pop(old)


def check_count(mapping: Mapping[str, object], what: str, minimum: int = 2) -> None:
    if len(mapping) < minimum:
        raise ValueError(f"{what} needs at least {minimum} modalities, got {list(mapping)}")



def stack_evidence(evidence: Mapping[str, Tensor]) -> tuple[Tensor, torch.dtype]:
    """Evidence as one ``[M]`` float64 tensor (float32 on MPS, which has no float64), and the dtype to return.

    Sums of a few float32 values are exact in float64, so equal evidence gives ratios of exactly 1 — the
    policies jump at ``ρ = 1``, where a rounding error of one ulp would otherwise damp a balanced modality.
    Results are returned in the evidence's dtype promoted to at least float32.
    """
    values = [torch.as_tensor(e).detach().reshape(()) for e in evidence.values()]
    out_dtype = torch.promote_types(torch.float32, torch.result_type(torch.stack(values), 1.0))
    return torch.stack([v.to(wide_dtype(values[0].device)) for v in values]), out_dtype



def unstack_evidence(names: Sequence[str], values: Tensor, dtype: torch.dtype) -> dict[str, Tensor]:
    return dict(zip(names, values.to(dtype).unbind(0)))


def checked_unimodal_logits(
    logits: Mapping[str, Tensor], target: Tensor | None, names: Sequence[str], what: str
) -> dict[str, Tensor]:
    """``logits`` checked to be ``{name: [B, C]}`` for exactly ``names``, one shape, floating point, finite, a
    non-empty batch, and ``target`` (unless ``None``) ``[B]`` class indices in ``[0, C)``; returned in the order
    of ``names``. One host synchronisation (the finiteness and range checks).
    """
    logits = per_modality(logits, names, what)
    first = logits[names[0]]
    for name in names:
        z = logits[name]
        if target is not None:
            check_logits_target(z, target, name=f"{what}[{name!r}]")
        if not isinstance(z, Tensor) or z.dim() != 2 or z.shape != first.shape or not z.is_floating_point():
            shape = f"{z.dtype} {tuple(z.shape)}" if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(
                f"{what} must be floating-point [batch, classes] tensors of one shape; {name!r} is {shape}, "
                f"{names[0]!r} is {tuple(first.shape) if isinstance(first, Tensor) else type(first).__name__}"
            )
    if first.shape[0] == 0:
        raise ValueError(f"{what}: the batch is empty")
    classes = first.shape[1]
    checks = [~torch.isfinite(logits[name].detach()).all() for name in names]
    if target is not None:
        checks.append(((target < 0) | (target >= classes)).any().to(checks[0].device))
    flags = torch.stack(checks).tolist()
    bad = [name for name, flag in zip(names, flags) if flag]
    if bad:
        raise ValueError(f"{what} of modalities {bad} contain NaN or inf")
    if target is not None and flags[-1]:
        raise ValueError(f"target holds class indices outside [0, {classes})")
    return {name: logits[name] for name in names}


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside the block; every submodule's own mode restored afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


#: Seeds drawn for generators lie in [0, 2⁶²).
SEED_HIGH = 2**62


def rank_zero_seed(seed: int) -> int:
    """``seed`` as rank 0 holds it when ``torch.distributed`` is initialised (one broadcast), else ``seed``."""
    if distributed():
        shared = [seed]
        dist.broadcast_object_list(shared, src=0)
        seed = int(shared[0])
    return seed


def seeded_generator(seed: int | None, *, across_ranks: bool = False) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (an int ``>= 0``), or with a seed drawn from torch's global RNG when
    ``None`` (so ``torch.manual_seed`` fixes it) — with ``across_ranks``, rank 0's draw on every rank."""
    if seed is None:
        seed = int(torch.randint(0, SEED_HIGH, ()))
        if across_ranks:
            seed = rank_zero_seed(seed)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0 or None, got {seed!r}")
    return torch.Generator().manual_seed(seed)
