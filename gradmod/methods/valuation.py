"""Modality valuation: per-sample Shapley contributions of the modalities, and re-sampling that trains the
low-contributing modality of each sample (or of the dataset) on its own.

Wei, Feng, Wang & Hu, *Enhancing Multimodal Cooperation via Sample-level Modality Valuation*, CVPR 2024
(arXiv 2309.06255); official code GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation @7ed12b0
(``code/sample_level.py`` ≈ L75–153, ``code/modality_level.py``, ``datasets/dataloader.py`` ≈ L150–186 and
L297–316), from which the rules below are read. A data-side method: the loss is the plain cross-entropy of
the fused head, and what changes is the epoch's training data.

**Valuation** (once per epoch after the warm-up: eval mode, no gradient, one pass over the training set in
its order). Coalition ``S`` of the modalities predicts with the features of the modalities outside ``S``
zeroed at the head (for a concat head ``z_a = W[h_a; 0] + b``); its value is

* ``v(S) = |S|·1[argmax z_S = y]`` — so ``v(all) = 2·1[fused right]`` and ``v(a), v(v) ∈ {0, 1}`` for two
  modalities, ``v(∅) = 0`` — and
* ``φ_m = Σ_{S ⊆ N∖{m}} |S|!(M − |S| − 1)!/M! · (v(S ∪ {m}) − v(S))``, the Shapley value
  (`gradmod.functional.shapley_values`, shared with `gradmod.diagnose`); for two modalities
  ``φ_a = (v_a + v_all − v_v)/2``, the official formula, and ``Σ_m φ_m = v(all)``. The values are
  multiples of ``1/M!``; `sample_contributions` snaps them to that grid, so that a value that is exactly 1
  is 1.0 in floating point for any ``M``.

**Sample level** (``level="sample"``, `sample_level_plan`): the epoch's data are the ``N`` originals
followed, per sample ``i`` and modality ``m``, by ``copies(φ_m,i)`` copies of sample ``i`` in which every
modality but ``m`` is zeroed, with ``copies(φ) = 3`` below −0.1, 2 on [−0.1, 0.4), 1 on [0.4, 1), 0 from 1
(`resample_copies`). The official rule writes open intervals ((0.4, 1), (−0.1, 0.4)), which give no copy
at exactly 0.4 or −0.1; no two-, three- or four-modality value lies there, so the rules are the same for
``M ≤ 4``. Net, for two modalities: a sample the fused head gets wrong gets 4 copies; one it gets right
gets 1 copy (of the modality that was wrong alone) when exactly one modality alone is right, else none.

**Modality level** (``level="modality"``, `subset_contributions`, `modality_level_count`): ``con_m`` =
mean ``φ_m`` over a subset of ``int(N·part_ratio)`` samples drawn with replacement; ``gap_m = 1 − con_m``;
the strongest modality ``s`` has the smallest gap; ``n = int((|gap_s − ḡ| / 3·2)·α·N)`` with ``ḡ`` the
mean gap of the others (the other's, for two modalities) and ``α`` = ``resample_strength``, computed in
the official order of floating-point operations (``N = 1000``, ``con = (0.9, 0.3)``: 399, not 400); the
epoch's data are the originals and ``n`` samples drawn with replacement with ``s`` zeroed. The draws come
from a CPU ``torch.Generator`` the method owns and saves (the official code uses numpy's global generator).

**More than two modalities**: the value function and the Shapley value are defined for any ``M``; a
sample-level copy keeps modality ``m`` alone (for two: "the other zeroed"), a modality-level copy zeroes
the strongest modality only.

**How a zeroed modality reaches the loop.** The epoch's data (`ModalityValuation.dataset`, a
`ResampledDataset`) yield ``(item, present)``: the training set's own item and a ``[M]`` float tensor of 1
(present) and 0 (zeroed), in modality order. The loop multiplies each modality's features by its column
before the head (`zero_absent`, or `ModalityValuation.mask`), as the official model does with its pooled
features, and trains ``CE(fused)`` on every item.

**Cost**: one evaluation pass over the training set per epoch after the warm-up (the encoders once, the
head ``2^M − 1`` times), and a longer epoch: about ``2.2·N`` items at 80 % training accuracy for two
modalities at the sample level; ``N + n`` at the modality level.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, SequentialSampler

from gradmod._internal import eval_mode, per_modality, real_scalar, seeded_generator
from gradmod.functional import coalitions, shapley_values
from gradmod.history import History
from gradmod.method import Fit, Method, MethodInfo, Option, check_units

__all__ = [
    "LEVELS",
    "ModalityValuation",
    "ResampledDataset",
    "coalition_correct",
    "coalition_values",
    "modality_level_count",
    "modality_level_plan",
    "resample_copies",
    "sample_contributions",
    "sample_level_plan",
    "subset_contributions",
    "zero_absent",
]

#: ``"sample"``: copies per sample from its own contributions; ``"modality"``: extra samples from the mean ones.
LEVELS = ("sample", "modality")
#: The thresholds of `resample_copies`: one more copy below each.
_COPY_THRESHOLDS = (1.0, 0.4, -0.1)
#: What `ModalityValuation.history` records per modality and valuation.
_RECORDED = ("contribution", "estimate", "zeroed")

#: ``forward(model, batch) -> ({modality: [B, D_m] features}, [B] targets)``, as `coalition_correct` calls it.
Forward = Callable[[nn.Module, Any], "tuple[Mapping[str, Tensor], Tensor]"]
#: ``head({modality: [B, D_m] features}) -> [B, C]`` fused logits (a modality's features may be zeros).
Head = Callable[[Mapping[str, Tensor]], Tensor]


# ----------------------------------------------------------------------------------------- valuation
def coalition_values(correct: Mapping[frozenset[str], Tensor], names: Sequence[str]) -> dict[frozenset[str], Tensor]:
    """``v(S) = |S|·1[correct_S]`` (float64, ``[N]``) for every coalition, ``v(∅) = 0``.

    ``correct`` maps every non-empty subset ``S`` of ``names`` to a ``[N]`` bool tensor: whether the head, with
    the features outside ``S`` zeroed, predicts each sample's label (``S`` = all: the fused prediction).
    """
    names = check_units(names, "modalities")
    subsets = coalitions(names)
    missing = [sorted(s) for s in subsets[1:] if s not in correct]
    if missing:
        raise ValueError(f"correct must hold every non-empty coalition of {list(names)}: missing {missing}")
    lengths = {tuple(sorted(s)): tuple(correct[s].shape) for s in subsets[1:]}
    if len(set(lengths.values())) != 1 or len(next(iter(lengths.values()))) != 1:
        raise ValueError(f"every coalition's correctness must be a [N] tensor of one length, got shapes {lengths}")
    full = correct[frozenset(names)]
    values = {frozenset(): torch.zeros(full.shape, dtype=torch.float64, device=full.device)}
    for subset in subsets[1:]:
        values[subset] = correct[subset].to(torch.float64) * len(subset)
    return values


def sample_contributions(correct: Mapping[frozenset[str], Tensor], names: Sequence[str]) -> dict[str, Tensor]:
    """The per-sample Shapley value ``φ_m`` of `coalition_values` (``[N]`` float64 per modality).

    Exact: the values are multiples of ``1/M!`` and are snapped to them (two modalities: ``φ_a = (v_a + v_all −
    v_v)/2``, in halves). ``Σ_m φ_m = v(all) = M·1[fused right]``.
    """
    names = list(names)
    grid = math.factorial(len(names))
    values = shapley_values(coalition_values(correct, names), names)
    return {m: torch.round(values[m] * grid) / grid for m in names}


def resample_copies(contribution: Tensor) -> Tensor:
    """``copies(φ)``: 3 below −0.1, 2 on [−0.1, 0.4), 1 on [0.4, 1), 0 from 1 on (``int64``, elementwise)."""
    return sum((contribution < bound).long() for bound in _COPY_THRESHOLDS)


def sample_level_plan(contributions: Mapping[str, Tensor], names: Sequence[str]) -> tuple[Tensor, Tensor]:
    """The sample-level epoch: ``(indices [L], present [L, M] bool)``.

    The ``N`` originals (every modality present) first, then per sample ``i`` in order and modality ``m`` in
    ``names`` order ``copies(φ_m,i)`` copies of ``i`` with only ``m`` present (the official order).
    """
    names = list(names)
    phi = torch.stack([contributions[m].cpu() for m in names], dim=1)  # [N, M]
    n, m = phi.shape
    counts = resample_copies(phi)
    copy_index = torch.arange(n).repeat_interleave(m).repeat_interleave(counts.flatten())
    copy_modality = torch.arange(m).repeat(n).repeat_interleave(counts.flatten())
    present = torch.cat([torch.ones(n, m, dtype=torch.bool), torch.nn.functional.one_hot(copy_modality, m).bool()])
    return torch.cat([torch.arange(n), copy_index]), present


def subset_contributions(contributions: Mapping[str, Tensor], subset: Tensor) -> dict[str, float]:
    """``con_m``: the mean ``φ_m`` over the samples ``subset`` (indices, repeats counted): ``Σ_{i ∈ subset} φ_m,i /
    |subset|``, a sum and one division as the official code computes it (exact in halves for two modalities)."""
    if subset.numel() == 0:
        raise ValueError("the subset that estimates the modality contributions is empty: raise part_ratio")
    return {m: float(phi.cpu()[subset.cpu().long()].sum()) / subset.numel() for m, phi in contributions.items()}


def modality_level_count(con: Mapping[str, float], total: int, resample_strength: float) -> tuple[int, str]:
    """The modality level's ``(n, strongest)``: how many extra samples, and which modality they zero.

    ``gap_m = 1 − con_m``; ``n = int((|gap_s − ḡ| / 3 * 2) * α * N)`` in this order of operations (the official
    one: ``con = (0.9, 0.3)``, ``N = 1000`` gives 399), ``s`` the modality with the smallest gap (the first on
    a tie), ``ḡ`` the mean gap of the others, ``N = total``, ``α = resample_strength``.
    """
    alpha = real_scalar(resample_strength, "resample_strength")
    if len(con) < 2:
        raise ValueError(f"the modality level needs the contributions of two or more modalities, got {list(con)}")
    gaps = {m: 1.0 - float(c) for m, c in con.items()}
    strongest = min(gaps, key=lambda m: gaps[m])
    others = [gap for m, gap in gaps.items() if m != strongest]
    difference = (abs(gaps[strongest] - sum(others) / len(others)) / 3 * 2) * alpha
    return int(difference * total), strongest


def modality_level_plan(total: int, names: Sequence[str], strongest: str, extra: Tensor) -> tuple[Tensor, Tensor]:
    """The modality-level epoch: ``(indices [N + n], present [N + n, M] bool)`` — the ``N = total`` originals,
    then the ``extra`` indices with ``strongest`` zeroed."""
    names = list(names)
    present = torch.ones(total + extra.numel(), len(names), dtype=torch.bool)
    present[total:, names.index(strongest)] = False
    return torch.cat([torch.arange(total), extra.cpu().long()]), present


def zero_absent(features: Mapping[str, Tensor], present: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
    """Each modality's ``[B, ...]`` features times its column of ``present`` (``[B, M]``, modality order): 0 where
    the item has that modality zeroed, unchanged (and differentiable) where present."""
    names = list(names)
    features = per_modality(features, names, "features")
    if not isinstance(present, Tensor) or present.dim() != 2 or present.shape[1] != len(names):
        shape = tuple(present.shape) if isinstance(present, Tensor) else type(present).__name__
        raise ValueError(
            f"present must be a [batch, {len(names)}] tensor (one column per modality {names}), got {shape}"
        )
    out = {}
    for k, m in enumerate(names):
        f = features[m]
        if f.shape[0] != present.shape[0]:
            raise ValueError(f"features[{m!r}] has batch {f.shape[0]}, present has {present.shape[0]} rows")
        column = present[:, k].to(device=f.device, dtype=f.dtype)
        out[m] = f * column.reshape(-1, *([1] * (f.dim() - 1)))
    return out


@torch.no_grad()
def coalition_correct(model: nn.Module, forward: Forward, head: Head, loader: Iterable) -> dict[frozenset[str], Tensor]:
    """The valuation pass: for every sample of ``loader`` in its order and every non-empty coalition ``S``,
    whether ``head`` predicts the label with the features outside ``S`` zeroed (``{S: [N] bool}``, on the CPU).

    ``forward(model, batch)`` returns ``({modality: [B, D_m] features}, [B] targets)``; ``head(features)`` the
    ``[B, C]`` fused logits. The model runs in eval mode (every module's mode is restored) without gradients.
    ``loader`` must visit the training set in its order (a ``DataLoader`` with a shuffling sampler raises):
    its ``i``-th sample is the training set's ``i``-th. Costs one forward pass of the encoders and ``2^M − 1``
    of the head per batch.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    shuffled = isinstance(loader, DataLoader) and not isinstance(loader.sampler, SequentialSampler)
    if shuffled:
        raise ValueError("the valuation loader must visit the training set in its order: build it with shuffle=False")
    results: dict[frozenset[str], list[Tensor]] = {}
    names: list[str] | None = None
    with eval_mode(model):
        for batch in loader:
            features, target = forward(model, batch)
            if names is None:
                if not isinstance(features, Mapping) or len(features) < 2:
                    raise ValueError("forward() must return a mapping of two or more modality names to features")
                names = list(features)
            features = per_modality(features, names, "forward()'s features")
            for subset in coalitions(names)[1:]:
                logits = head({m: f if m in subset else torch.zeros_like(f) for m, f in features.items()})
                if logits.dim() != 2 or logits.shape[0] != target.shape[0]:
                    raise ValueError(f"head() must return [batch, classes] logits, got shape {tuple(logits.shape)}")
                if not torch.isfinite(logits).all():
                    raise ValueError(f"the head's logits for the coalition {sorted(subset)} contain NaN or inf")
                results.setdefault(subset, []).append((logits.argmax(dim=1) == target.to(logits.device)).cpu())
    if names is None:
        raise ValueError("the valuation loader yielded no batch")
    return {subset: torch.cat(parts) for subset, parts in results.items()}


# ----------------------------------------------------------------------------------------- the epoch's data
class ResampledDataset(Dataset):
    """The epoch's data: item ``k`` is ``(base[indices[k]], present[k])``, ``present`` a ``[M]`` float32 tensor of
    1 (modality present) and 0 (zeroed) in modality order; batched by the default collate into ``[B, M]``."""

    def __init__(self, base: Dataset, indices: Tensor, present: Tensor) -> None:
        if indices.dim() != 1 or present.dim() != 2 or present.shape[0] != indices.shape[0]:
            raise ValueError(f"indices [L] and present [L, M] disagree: {tuple(indices.shape)}, {tuple(present.shape)}")
        self.base = base
        self.indices = indices.long()
        self.present = present.bool()
        self._rows = present.float()

    def __len__(self) -> int:
        return self.indices.shape[0]

    def __getitem__(self, k: int) -> tuple[Any, Tensor]:
        return self.base[int(self.indices[k])], self._rows[k]


class ModalityValuation(Method):
    """Modality valuation and re-sampling (module docstring): `start_epoch` values the training set and builds the
    epoch's data, `dataset`; the loop trains on it with `mask` applied to the features before the head.

    Args:
        modalities: the modality names (two or more), in the order of the ``present`` columns.
        dataset: the training set (a map-style dataset); the epoch's data wrap it.
        measure: ``() -> {coalition: [N] bool}``, the valuation pass over ``dataset`` in its order (e.g.
            ``functools.partial(coalition_correct, model, forward, head, unshuffled_loader)``), called by
            `start_epoch` from epoch ``warmup_epochs`` on. ``None``: call `update` yourself after `start_epoch` of
            every epoch past the warm-up.
        level: ``"sample"`` (default) or ``"modality"`` (`LEVELS`).
        warmup_epochs: epochs ``0 … warmup_epochs − 1`` train on the plain training set (official: 5).
        resample_strength: ``α ≥ 0`` of the modality level (official ``--alpha``, 1).
        part_ratio: the share of ``N`` drawn (with replacement) to estimate the modality level's contributions
            (official 0.2).
        seed: seed of the generator of the modality level's draws; ``None`` draws one from torch's global RNG
            (rank 0's under ``torch.distributed``, so that every rank re-samples the same epoch's data).

    The history has one record per valuation (``step`` = the epoch): per modality the mean ``contribution``
    ``φ_m`` over the training set, the modality level's subset ``estimate`` ``con_m`` (NaN at the sample
    level), and how many added items have it ``zeroed``.
    """

    kind = "data"
    state_version = 1

    def __init__(
        self,
        modalities: Sequence[str],
        dataset: Dataset,
        measure: Callable[[], Mapping[frozenset[str], Tensor]] | None = None,
        *,
        level: str = "sample",
        warmup_epochs: int = 5,
        resample_strength: float = 1.0,
        part_ratio: float = 0.2,
        seed: int | None = None,
    ) -> None:
        self.names: tuple[str, ...] = check_units(modalities, "modalities")
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(
                f"dataset must be a map-style dataset (with __getitem__ and __len__), got {type(dataset).__name__}"
            )
        if measure is not None and not callable(measure):
            raise TypeError(f"measure must be a callable () -> {{coalition: [N] bool}}, got {type(measure).__name__}")
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be an int >= 0, got {warmup_epochs!r}")
        self.base = dataset
        self.measure = measure
        self.level = level
        self.warmup_epochs = warmup_epochs
        self.resample_strength = real_scalar(resample_strength, "resample_strength")
        self.part_ratio = real_scalar(part_ratio, "part_ratio", strict=True)
        if self.part_ratio > 1.0:
            raise ValueError(f"part_ratio must lie in (0, 1], got {part_ratio!r}")
        self._generator = seeded_generator(seed, across_ranks=True)  # one plan of the epoch's data for every rank
        self._initial = self._generator.get_state()
        self._history = History(self.names, fields=_RECORDED, dtype=torch.float64)
        self._epoch: int | None = None  # the epoch the current data are for
        self._plan: tuple[Tensor, Tensor] | None = None  # (indices, present) of the current data; None: plain
        self._contributions: dict[str, Tensor] | None = None
        self._pending = False  # an epoch past the warm-up started without a valuation (no measure)

    @property
    def total(self) -> int:
        """``N``, the length of the training set."""
        return len(self.base)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ epochs
    def start_epoch(self, epoch: int) -> None:
        """Before epoch ``epoch``: the plain training set during the warm-up; from epoch ``warmup_epochs`` on, with
        ``measure``, the valuation pass and the re-sampled data (`update`). A second call for the same epoch (e.g.
        after resuming from a state saved in it) keeps the data it holds."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        if epoch == self._epoch:
            return
        self._epoch = epoch
        self._pending = False
        if epoch < self.warmup_epochs:
            self._plan = None
        elif self.measure is not None:
            self._update(self.measure(), epoch)
        else:
            self._pending = True  # `update` is due before the epoch's data are read

    def update(self, correct: Mapping[frozenset[str], Tensor]) -> ResampledDataset:
        """Value the training set from the valuation pass ``correct`` (`coalition_correct`) and make the epoch's
        data from it (what `start_epoch` does with ``measure``); returns them."""
        self._update(correct, 0 if self._epoch is None else self._epoch)
        return self.dataset

    def _update(self, correct: Mapping[frozenset[str], Tensor], epoch: int) -> None:
        if not isinstance(correct, Mapping):
            raise TypeError(
                f"the valuation must be a mapping coalition -> [N] bool tensor, got {type(correct).__name__}"
            )
        correct = {frozenset(s): torch.as_tensor(c).cpu() for s, c in correct.items()}
        unknown = [sorted(s) for s in correct if not s or not s <= set(self.names)]
        if unknown:
            raise ValueError(
                f"the valuation names coalitions {unknown} outside the non-empty subsets of {list(self.names)}"
            )
        contributions = sample_contributions(correct, self.names)  # checks the coalitions and their lengths
        length = len(correct[frozenset(self.names)])
        if length != self.total:
            raise ValueError(
                f"the valuation covers {length} samples, the training set has {self.total}: value every training "
                "sample once, in the dataset's order"
            )
        if not bool(correct[frozenset(self.names)].any()):
            self._warn_once(
                "all-wrong",
                "the fused head got no training sample right in the valuation pass, so every sample gets the most "
                "copies: is the valuation loader in the dataset's order, and the warm-up long enough?",
                stacklevel=4,
            )
        nan = [math.nan] * len(self.names)
        if self.level == "sample":
            indices, present = sample_level_plan(contributions, self.names)
            estimate = nan
        else:
            drawn = int(self.total * self.part_ratio)
            if drawn == 0:
                raise ValueError(f"part_ratio={self.part_ratio} of {self.total} samples draws none: raise part_ratio")
            subset = torch.randint(self.total, (drawn,), generator=self._generator)
            con = subset_contributions(contributions, subset)
            count, strongest = modality_level_count(con, self.total, self.resample_strength)
            extra = torch.randint(self.total, (count,), generator=self._generator)
            indices, present = modality_level_plan(self.total, self.names, strongest, extra)
            estimate = [con[m] for m in self.names]
        self._plan = (indices, present)
        self._contributions = contributions
        self._pending = False
        zeroed = (~present[self.total :]).sum(dim=0).double()
        mean = torch.stack([contributions[m].mean() for m in self.names])
        self._history.append(epoch, [mean, torch.tensor(estimate, dtype=torch.float64), zeroed])

    # ------------------------------------------------------------------ the data
    @property
    def dataset(self) -> ResampledDataset:
        """The epoch's data: the training set (warm-up) or the re-sampled one, as `ResampledDataset` items."""
        if self._epoch is None and self._plan is None:
            self._warn_once(
                "no-start",
                "dataset was read before start_epoch(epoch) was ever called, so it is the plain training set: call "
                "method.start_epoch(epoch) before each epoch and build that epoch's loader from method.dataset",
                stacklevel=3,
            )
        if self._pending:
            self._warn_once(
                "no-update",
                f"epoch {self._epoch} is past the warm-up but was not valued: build ModalityValuation with measure= "
                "or call update(correct) after start_epoch(epoch); until then the data are the last epoch's",
                stacklevel=3,
            )
        if self._plan is None:
            indices, present = torch.arange(self.total), torch.ones(self.total, len(self.names), dtype=torch.bool)
        else:
            indices, present = self._plan
        return ResampledDataset(self.base, indices, present)

    def mask(self, features: Mapping[str, Tensor], present: Tensor) -> dict[str, Tensor]:
        """The features with each item's zeroed modalities set to 0 (`zero_absent`), before the head."""
        return zero_absent(features, present, self.names)

    @property
    def contributions(self) -> dict[str, Tensor] | None:
        """The per-sample ``φ_m`` of the last valuation (``[N]`` float64 per modality), or ``None``."""
        return None if self._contributions is None else dict(self._contributions)

    # ------------------------------------------------------------------ state
    def _extra_state(self) -> dict[str, Any]:
        """The epoch, its data (indices and presence), the generator and the warnings shown."""
        plan = None if self._plan is None else {"indices": self._plan[0].clone(), "present": self._plan[1].clone()}
        return {
            "level": self.level,
            "total": self.total,
            "epoch": self._epoch,
            "plan": plan,
            "generator": self._generator.get_state(),
            "warned": sorted(self.__dict__.get("_warned", ())),
        }

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        if state["level"] != self.level:
            raise ValueError(
                f"state was saved at level={state['level']!r}, this ModalityValuation has level={self.level!r}"
            )
        if int(state["total"]) != self.total:
            raise ValueError(
                f"state was saved for a training set of {state['total']} samples, this one has {self.total}"
            )
        plan = state["plan"]
        if plan is not None:
            indices, present = torch.as_tensor(plan["indices"]).long(), torch.as_tensor(plan["present"]).bool()
            if present.shape != (indices.shape[0], len(self.names)) or (
                indices.numel() and int(indices.max()) >= self.total
            ):
                raise ValueError("the saved epoch data do not fit this training set and these modalities")
            plan = (indices, present)
        self._epoch = None if state["epoch"] is None else int(state["epoch"])
        self._plan = plan
        self._generator.set_state(state["generator"])
        self._warned = set(state["warned"])

    def _reset(self) -> None:
        self._epoch = None
        self._plan = None
        self._pending = False
        self._contributions = None
        self._generator.set_state(self._initial)
        self._warned = set()

    def __repr__(self) -> str:
        level = (
            ""
            if self.level == "sample"
            else f", resample_strength={self.resample_strength:g}, part_ratio={self.part_ratio:g}"
        )
        return (
            f"ModalityValuation(modalities={list(self.names)}, level={self.level!r}, warmup_epochs={self.warmup_epochs}"
            f"{level}, samples={self.total})"
        )


METHODS = (
    MethodInfo(
        key="valuation",
        preset=ModalityValuation,
        title="Modality valuation",
        kind="data",
        paper="Wei, Feng, Wang & Hu, Enhancing Multimodal Cooperation via Sample-level Modality Valuation, CVPR 2024",
        page="methods/valuation.md",
        observes="per epoch: each training sample's coalition predictions (features zeroed at the head)",
        cost="one evaluation pass over the training set per epoch; a longer epoch (≈ 2.2 N at 80 % accuracy)",
        # the Hugging Face Trainer builds its dataloader once per train(): the epoch's re-sampled data never reach it
        fit=Fit(head="coalitions", acts_on="data", trainers=("lightning",)),
        options=(
            Option("level", "sample", "re-sample per sample or per modality", str, LEVELS),
            Option("warmup_epochs", 5, "epochs trained on the plain training set first", int),
            Option(
                "resample_strength", 1.0, "α of the modality level: how many extra samples per contribution gap", float
            ),
            Option(
                "part_ratio", 0.2, "share of the training set that estimates the modality level's contributions", float
            ),
        ),
    ),
)
