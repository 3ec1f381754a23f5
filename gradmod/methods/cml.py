"""CML: Ma, Zhang, Zhang, Wu, Fu, Zhou & Hu, *Calibrating Multimodal Learning*, ICML 2023 (arXiv 2306.01265).

A multimodal classifier should not become *more* confident when it loses a modality: the paper's calibration
rule says confidence must not rise as modalities are removed. CML adds a rank penalty on every rise to the
task loss. Official code ``QingyangZhang/CML`` (``miwae/train.py``, the MIWAE experiments; ``cpm/`` the same
rule on CPM-Nets). Equations numbered here (the paper's text was not available).

Per sample ``i``, a random order of the ``M`` modalities; input ``k`` (``k = 0 … M − 1``) is the sample with the
first ``k`` modalities of its order removed (input 0 is the full sample, input ``M − 1`` keeps one modality).
With ``c_{k,i} = max_c softmax(z_{k,i})_c`` the confidence and ``ŷ_{k,i}`` the prediction on input ``k``:

* **Rank** (C1) ``R = Σ_{k=0}^{M−2} Σ_i ReLU((c_{k+1,i} − c_{k,i})·1[ŷ_{k,i} = y_i] − ε)
  + ReLU((c_{k+1,i} − sg(c_{k,i}))·1[ŷ_{k+1,i} ≠ y_i ∧ ŷ_{k,i} ≠ y_i] − ε)`` (`confidence_rank`): a rise is
  penalised where the fuller input was right, and where both were wrong (with ``c_k`` detached, so only the
  reduced input's confidence is pushed down); each sample has its own hinge, summed over the batch.
* **Loss** (C2) ``L = (1/M) Σ_k CE(z_k, y) + β/100 · R`` (official: the task loss averaged over every input;
  ``β = 10`` in the README, so the weight is ``rank_weight = 0.1``); ``task="full"`` keeps ``CE(z_0, y)`` only.

What "removed" means (``removal=``):

* ``"features"`` (BalanceBenchmark's reading): the encoders' features of the removed modalities are zeroed at
  the fusion head, ``z_k = head(h ⊙ keep_k)``. For a linear concat head this is BalanceBenchmark's
  ``out − u_m + b/M``.
* ``"inputs"`` (the official reading): the removed modalities' *inputs* are replaced by a fill value (the
  official mean imputation; `input_means`) and the model runs again, ``z_k = model(x ⊙ keep_k + fill ⊙ ¬keep_k)``.

The order of removals (``order=``): ``"sample"`` (official: a random permutation per sample and step) or
``"epoch"`` (BalanceBenchmark: one permutation for every sample, drawn per epoch). Both are counter-based — a
function of ``seed`` and the step (or epoch) — so a resumed run draws the same orders.

BalanceBenchmark's hinge (``rank="batch"``, its ``conf_loss``): ``ReLU(Σ_i (c_{k+1,i} − c_{k,i}) − ε)`` per
removal, with no correctness condition and no both-wrong term. A batch sum lets rises cancel drops: a batch
where half the samples gain confidence and half lose as much is not penalised at all (its sample-selection
mask is computed and discarded).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gradmod._internal import (
    check_logits_target,
    per_modality,
    real_scalar,
    target_problems,
)
from gradmod.history import History
from gradmod.measures import IGNORE_INDEX
from gradmod.method import Fit, Method, MethodInfo, Option, Strength, check_units

__all__ = [
    "CML",
    "ORDERS",
    "RANKS",
    "REMOVALS",
    "TASKS",
    "batch_rank",
    "confidence_rank",
    "input_means",
    "kept_modalities",
    "removal_orders",
]

#: ``removal=``: zeroed features at the head, or imputed inputs through the model.
REMOVALS = ("features", "inputs")
#: ``order=``: a random order per sample and step (official), or one per epoch (BalanceBenchmark).
ORDERS = ("sample", "epoch")
#: ``rank=``: per-sample hinges (official), or BalanceBenchmark's hinge of the batch sum.
RANKS = ("sample", "batch")
#: ``task=``: the cross-entropy averaged over every input (official), or of the full input only.
TASKS = ("all", "full")
#: ``β/100`` with the README's ``β = 10`` (BalanceBenchmark's ``lam`` is the same 0.1).
DEFAULT_RANK_WEIGHT = 0.1
#: What the history records per modality and step.
_RECORDED = ("rise", "violations")


# ----------------------------------------------------------------------------------------- equations
def removal_orders(batch: int, modalities: int, generator: torch.Generator | None = None) -> Tensor:
    """``[batch, M]`` int64: row ``i`` is sample ``i``'s order of removal, a uniform random permutation."""
    return torch.rand(batch, modalities, generator=generator).argsort(dim=1)


def kept_modalities(orders: Tensor) -> list[Tensor]:
    """For orders ``[B, M]``: the ``[B, M]`` bool masks of the modalities input ``k`` keeps, ``k = 0 … M − 1``.

    Input ``k`` removes the first ``k`` modalities of each sample's order; input 0 keeps every modality.
    """
    position = orders.argsort(dim=1)  # position[i, m]: when modality m is removed from sample i
    return [position >= k for k in range(orders.shape[1])]


def confidence_rank(logits: Sequence[Tensor], target: Tensor, margin: float = 0.0) -> Tensor:
    """(C1), per sample: ``[M − 1, B]`` hinge terms for the inputs ``z_0 … z_{M−1}`` (fuller first).

    ``ReLU((c_{k+1} − c_k)·1[ŷ_k = y] − ε) + ReLU((c_{k+1} − sg(c_k))·1[ŷ_{k+1} ≠ y ∧ ŷ_k ≠ y] − ε)``; sum
    them for the official rank loss.
    """
    margin = real_scalar(margin, "margin")
    confidence, prediction = zip(*(torch.softmax(z, dim=1).max(dim=1) for z in logits))
    terms = []
    for k in range(len(logits) - 1):
        right = (prediction[k] == target).to(confidence[k].dtype)
        both_wrong = ((prediction[k + 1] != target) & (prediction[k] != target)).to(confidence[k].dtype)
        terms.append(
            F.relu((confidence[k + 1] - confidence[k]) * right - margin)
            + F.relu((confidence[k + 1] - confidence[k].detach()) * both_wrong - margin)
        )
    return torch.stack(terms)


def batch_rank(logits: Sequence[Tensor], margin: float = 0.0) -> Tensor:
    """BalanceBenchmark's ``conf_loss``: ``[M − 1]`` hinges ``ReLU(Σ_i (c_{k+1,i} − c_{k,i}) − ε)`` of the batch sums."""
    margin = real_scalar(margin, "margin")
    confidence = [torch.softmax(z, dim=1).max(dim=1).values for z in logits]
    return torch.stack([F.relu((confidence[k + 1] - confidence[k]).sum() - margin) for k in range(len(logits) - 1)])


@torch.no_grad()
def input_means(batches: Iterable[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The mean input of every modality over ``batches`` of ``{modality: [B, ...]}``: a fill for ``removal="inputs"``.

    The mean over all samples, in float64 then the inputs' dtype (the official ``get_mean`` averages the batch
    means, which weighs a short last batch more).
    """
    sums: dict[str, Tensor] = {}
    count = 0
    for batch in batches:
        for name, value in batch.items():
            total = value.double().sum(0)
            sums[name] = total if name not in sums else sums[name] + total
        count += next(iter(batch.values())).shape[0]
    if count == 0:
        raise ValueError("input_means() got no samples")
    return {name: (total / count) for name, total in sums.items()}


def _generator(seed: int, counter: int) -> torch.Generator:
    """The generator of step (or epoch) ``counter``: a pure function of it and the seed."""
    return torch.Generator().manual_seed(seed * 1_000_003 + counter)


# ----------------------------------------------------------------------------------------- the method
class CML(Method):
    """Calibrating multimodal learning: penalise confidence that rises when modalities are removed.

    ``loss(...)`` returns (C2), ``task + rank_weight · R``, with the inputs ``z_1 … z_{M−1}`` made by removing
    modalities as ``removal`` says (module docstring). ``loss_inputs``: ``("logits", "features", "head",
    "target")`` for ``removal="features"``, ``("logits", "inputs", "target")`` for ``removal="inputs"``.

    Args:
        modalities: the modality names, two or more.
        removal: ``"features"`` (zero the removed modalities' features at ``head``) or ``"inputs"`` (replace their
            inputs by ``fill`` and run ``model``).
        model: with ``removal="inputs"``, ``{modality: input batch} -> [B, C]`` logits (your model in its current mode).
        fill: with ``removal="inputs"``, ``{modality: tensor}`` broadcastable to one sample's input (`input_means`).
        rank_weight: ``β/100 ≥ 0`` of (C2).
        margin: ``ε ≥ 0`` of (C1).
        order: ``"sample"`` (official) or ``"epoch"`` (BalanceBenchmark; call `start_epoch` every epoch).
        rank: ``"sample"`` (official per-sample hinges) or ``"batch"`` (BalanceBenchmark's batch-sum hinge).
        task: ``"all"`` (mean cross-entropy over every input, official) or ``"full"`` (the full input's only).
        seed: the seed of the removal orders.
        ignore_index: samples whose target equals it add nothing.
    """

    kind = "loss"
    state_version = 1
    loss_inputs: tuple[str, ...] = ("logits", "features", "head", "target")

    def __init__(
        self,
        modalities: Sequence[str],
        *,
        removal: str = "features",
        model: Callable[[Mapping[str, Tensor]], Tensor] | None = None,
        fill: Mapping[str, Tensor] | None = None,
        rank_weight: float = DEFAULT_RANK_WEIGHT,
        margin: float = 0.0,
        order: str = "sample",
        rank: str = "sample",
        task: str = "all",
        seed: int = 0,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        self.names: tuple[str, ...] = check_units(modalities, "modalities")
        for name, value, allowed in (("removal", removal, REMOVALS), ("order", order, ORDERS), ("rank", rank, RANKS), ("task", task, TASKS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if removal == "inputs":
            if not callable(model):
                raise TypeError("CML(removal='inputs') needs model=<a callable {modality: inputs} -> logits>")
            fill = per_modality(fill, self.names, "CML(fill=...)")
            if not all(isinstance(value, torch.Tensor) and torch.isfinite(value).all() for value in fill.values()):
                raise ValueError("fill must map every modality to a finite tensor (e.g. gradmod.methods.cml.input_means(...))")
            self.loss_inputs = ("logits", "inputs", "target")
        elif model is not None or fill is not None:
            raise ValueError("model= and fill= are for removal='inputs'; removal='features' zeroes features at head=")
        for name, value in (("seed", seed), ("ignore_index", ignore_index)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
        self.removal, self.order, self.rank, self.task = removal, order, rank, task
        self.model = model
        self.fill = None if fill is None else {name: fill[name] for name in self.names}
        self.rank_weight = real_scalar(rank_weight, "rank_weight")
        self.margin = real_scalar(margin, "margin")
        self.seed = seed
        self.ignore_index = ignore_index
        self._history = History(self.names, fields=_RECORDED, dtype=torch.float64)
        self._reset()

    def start_epoch(self, epoch: int) -> None:
        """Epoch ``epoch`` (0-based) begins: with ``order="epoch"``, its removal order is drawn."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self._epoch = epoch

    @property
    def last_rank(self) -> float | None:
        """The rank loss ``R`` of the last step (before ``rank_weight``), or ``None``."""
        return self._last_rank

    @property
    def orders(self) -> Tensor | None:
        """The last step's removal orders ``[B, M]`` (modality indices, first removed first), or ``None``."""
        return self._orders_used

    # ------------------------------------------------------------------ the loss
    def loss(
        self,
        *,
        logits: Tensor,
        target: Tensor,
        features: Mapping[str, Tensor] | None = None,
        head: Callable[[Mapping[str, Tensor]], Tensor] | None = None,
        inputs: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """(C2) ``task + rank_weight · R`` on this batch; ``logits`` are the full input's ``[B, C]`` (with grad)."""
        keep = self._checked(logits, target)
        logits, target = logits[keep], target[keep]
        batch = target.shape[0]
        orders = self._orders(batch).to(target.device)
        kept = kept_modalities(orders)
        if self.removal == "features":
            reduced = self._on_zeroed_features(features, head, kept[1:], keep, logits)
        else:
            reduced = self._on_imputed_inputs(inputs, kept[1:], keep, logits)
        every = [logits, *reduced]
        task = sum(F.cross_entropy(z, target) for z in every) / len(every) if self.task == "all" else F.cross_entropy(logits, target)
        if self.rank == "sample":
            rank = confidence_rank(every, target, self.margin).sum()
        else:
            rank = batch_rank(every, self.margin).sum()
        self._record(every, target, orders, rank)
        return task + self.rank_weight * rank

    def _checked(self, logits: Tensor, target: Tensor) -> Tensor:
        """The samples that count (``target != ignore_index``), after the checks (one host synchronisation)."""
        check_logits_target(logits, target)
        if target.shape[0] == 0:
            raise ValueError("loss() got an empty batch")
        problems = target_problems("fused", logits, target, self.ignore_index)
        keep = target != self.ignore_index
        problems["every target equals ignore_index: the batch has nothing to learn"] = ~keep.any()
        flags = torch.stack([flag.reshape(()) for flag in problems.values()]).tolist()
        for message, flag in zip(problems, flags):
            if flag:
                raise ValueError(message)
        return keep

    def _orders(self, batch: int) -> Tensor:
        if self.order == "sample":
            return removal_orders(batch, len(self.names), _generator(self.seed, self._step))
        if self._epoch is None:
            self._warn_once(
                "no_epoch",
                "order='epoch' without start_epoch(epoch): every epoch removes the modalities in epoch 0's order; call "
                "cml.start_epoch(epoch) before every epoch",
                stacklevel=4,
            )
        order = removal_orders(1, len(self.names), _generator(self.seed, self._epoch or 0))
        return order.expand(batch, -1)

    def _on_zeroed_features(
        self,
        features: Mapping[str, Tensor] | None,
        head: Callable[[Mapping[str, Tensor]], Tensor] | None,
        kept: list[Tensor],
        keep: Tensor,
        logits: Tensor,
    ) -> list[Tensor]:
        """``z_k = head(h ⊙ keep_k)``: the head on the features with the removed modalities' zeroed."""
        if features is None or not callable(head):
            raise TypeError(
                "CML(removal='features').loss() needs features={modality: [B, D]} and head=<the fusion head, a "
                "callable {modality: features} -> logits>"
            )
        features = per_modality(features, self.names, "loss(features=...)")
        selected = {}
        for name in self.names:
            value = features[name]
            if not isinstance(value, Tensor) or value.dim() < 2 or value.shape[0] != keep.shape[0]:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"features[{name!r}] must be [batch={keep.shape[0]}, ...], got {shape}")
            selected[name] = value[keep]
        bad = [n for n, flag in zip(self.names, torch.stack([~torch.isfinite(v.detach()).all() for v in selected.values()]).tolist()) if flag]
        if bad:
            raise ValueError(f"features of modalities {bad} contain NaN or inf")
        return [self._checked_output(head(self._removed(selected, mask, zeros=True)), logits, "head") for mask in kept]

    def _on_imputed_inputs(self, inputs: Mapping[str, Tensor] | None, kept: list[Tensor], keep: Tensor, logits: Tensor) -> list[Tensor]:
        """``z_k = model(x ⊙ keep_k + fill ⊙ ¬keep_k)``: the model on the inputs with the removed modalities' imputed."""
        if inputs is None:
            raise TypeError("CML(removal='inputs').loss() needs inputs={modality: input batch}")
        inputs = per_modality(inputs, self.names, "loss(inputs=...)")
        selected = {name: inputs[name][keep] for name in self.names}
        return [self._checked_output(self.model(self._removed(selected, mask, zeros=False)), logits, "model") for mask in kept]

    def _removed(self, values: Mapping[str, Tensor], kept: Tensor, zeros: bool) -> dict[str, Tensor]:
        """``values`` with each sample's removed modalities zeroed (features) or replaced by ``fill`` (inputs)."""
        out = {}
        for index, name in enumerate(self.names):
            value = values[name]
            flag = kept[:, index].reshape(-1, *([1] * (value.dim() - 1)))
            other = torch.zeros((), dtype=value.dtype, device=value.device) if zeros else self.fill[name].to(value.device, value.dtype)
            out[name] = torch.where(flag, value, other)
        return out

    def _checked_output(self, output: Tensor, logits: Tensor, what: str) -> Tensor:
        if not isinstance(output, Tensor) or output.shape != logits.shape:
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(f"{what}(...) on a batch with modalities removed must return logits {tuple(logits.shape)}, got {shape}")
        return output

    def _record(self, every: list[Tensor], target: Tensor, orders: Tensor, rank: Tensor) -> None:
        """Per modality: the mean confidence rise when it is removed, and the share of those removals that raised
        the confidence of a sample predicted right before (the official rank's first condition)."""
        with torch.no_grad():
            confidence, prediction = zip(*(torch.softmax(z.detach(), dim=1).max(dim=1) for z in every))
            rises = torch.stack([confidence[k + 1] - confidence[k] for k in range(len(every) - 1)]).double()  # [M−1, B]
            violated = torch.stack([(rises[k] > 0) & (prediction[k] == target) for k in range(len(every) - 1)]).double()
            removed = F.one_hot(orders[:, : len(every) - 1].T, len(self.names)).double()  # [M−1, B, M]
            count = removed.sum((0, 1))  # a modality never removed gets NaN (the field does not apply)
            row = tuple(((values.unsqueeze(2) * removed).sum((0, 1)) / count).cpu() for values in (rises, violated))
        self._history.append(self._step, row)
        self._last_rank = float(rank.detach())
        self._orders_used = orders
        self._step += 1

    # ------------------------------------------------------------------ state
    def _extra_state(self) -> dict[str, Any]:
        """The configuration, the epoch, the step (the orders are a function of them and the seed), the warnings."""
        return {
            "removal": self.removal,
            "order": self.order,
            "rank": self.rank,
            "task": self.task,
            "rank_weight": self.rank_weight,
            "margin": self.margin,
            "seed": self.seed,
            "epoch": self._epoch,
            "step": self._step,
            "warned": sorted(self.__dict__.get("_warned", ())),
        }

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        for key in ("removal", "order", "rank", "task", "rank_weight", "margin", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(f"CML state_dict has {key}={state[key]!r}, this CML has {key}={getattr(self, key)!r}")
        self._epoch = state["epoch"]
        self._step = int(state["step"])
        self._last_rank, self._orders_used = None, None
        self._warned = set(state["warned"])

    def _reset(self) -> None:
        self._epoch: int | None = None
        self._step = 0
        self._last_rank: float | None = None
        self._orders_used: Tensor | None = None
        self._warned: set[str] = set()

    def __repr__(self) -> str:
        return (
            f"CML(modalities={list(self.names)}, removal={self.removal!r}, rank_weight={self.rank_weight:g}, "
            f"margin={self.margin:g}, order={self.order!r}, rank={self.rank!r}, task={self.task!r})"
        )


METHODS = (
    MethodInfo(
        key="cml",
        preset=CML,
        title="CML",
        kind="loss",
        paper="Ma et al., Calibrating Multimodal Learning, ICML 2023",
        page="methods/cml.md",
        observes="per step: fused logits, targets, and the features with the head (or the inputs with the model)",
        cost="M − 1 more head passes (removal='features') or model passes (removal='inputs') per step",
        fit=Fit(head="coalitions", acts_on="loss"),
        strength=Strength("rank_weight", DEFAULT_RANK_WEIGHT, "β/100: weight of the rank penalty on confidence that rises when a modality is removed"),
        options=(
            Option("removal", "features", "what removing a modality means: zeroed features at the head, or imputed inputs", str, REMOVALS),
            Option("rank", "sample", "per-sample hinges (official), or BalanceBenchmark's hinge of the batch sum", str, RANKS),
            Option("order", "sample", "removal order: per sample and step (official), or per epoch (BalanceBenchmark)", str, ORDERS),
        ),
    ),
)
