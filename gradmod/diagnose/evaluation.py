"""Per-modality evaluation on held-out data, from your model and loaders: each function works alone.

What you pass:

* **loaders** — iterables of batches ``(inputs, target, ...)`` with ``inputs`` a mapping modality → input
  (a tensor, or a nested mapping or sequence of tensors) and ``target`` ``[B]`` class indices (rows equal
  to ``ignore_index`` −100 are not counted); any other batch layout through ``batch_of=lambda batch:
  (inputs, target)``.
* **the model**, in one of two ways: ``forward`` — the fused model, an ``nn.Module`` or callable taking the
  inputs dict (``forward(inputs)``) or one keyword per modality (``forward(**inputs)``), decided from its
  signature — whose absent modalities are removed from the *inputs* by ``mask(inputs, absent) ->
  inputs`` (default `zero_absent`: zeros of the same shape, BalanceBenchmark's convention); or ``encode``
  (inputs → ``{modality: features}``) and ``head`` (features dict → logits), whose absent modalities are
  zeroed *features* (the reference models' ``unimodal`` accuracy), encoding each batch once. An output
  may be the logits ``[B, C]``, a tuple or list whose first element they are, a mapping with
  ``"logits"``, or an object with ``.logits``.

Every function evaluates under ``torch.no_grad()`` with the modules it was given in eval mode, restored
afterwards: an ``nn.Module``, the module a bound method belongs to, and those listed in ``modules=``
(name there the models a lambda or closure calls, or their dropout and batch-norm layers stay in
training mode). It leaves torch's random state as it was (``torch.random.fork_rng``): evaluating
between epochs does not change the run, except that a loader with its own ``generator=`` advances it.
``device=None`` moves each batch to the device of the given modules' first parameter.

Costs, in passes over the held-out loader: `masked_accuracy` M forwards per batch (one encoding and M
head calls with ``encode``/``head``); `shapley_accuracy` and `coalition_accuracy` all ``2^M``
coalitions (4 for two modalities, 8 for three); `decoupled_accuracy` one; `linear_probe` one
encoding pass over each loader and an L-BFGS fit on the features; `solo_accuracy` trains one encoder
per modality for ``steps`` optimizer steps.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gradmod.functional import coalitions as all_coalitions
from gradmod.functional import shapley_values
from gradmod.measures import IGNORE_INDEX
from gradmod.method import check_units

__all__ = [
    "coalition_accuracy",
    "conditional_utilization",
    "decoupled_accuracy",
    "linear_probe",
    "masked_accuracy",
    "shapley_accuracy",
    "shapley_of",
    "solo_accuracy",
    "zero_absent",
]

#: ``batch_of(batch) -> (inputs, target)``: how a loader's batch splits.
BatchOf = Callable[[Any], "tuple[Mapping[str, Any], Tensor]"]
#: ``mask(inputs, absent) -> inputs`` with the modalities of ``absent`` removed.
Mask = Callable[[Mapping[str, Any], frozenset], Mapping[str, Any]]


# ---------------------------------------------------------------------- adapters
def zero_absent(inputs: Mapping[str, Any], absent: frozenset) -> dict[str, Any]:
    """The default ``mask``: the input of every modality in ``absent`` replaced by zeros of its shape, dtype
    and device (tensors inside mappings and sequences too); every other key as it is."""
    return {name: _zeros(value) if name in absent else value for name, value in inputs.items()}


def _zeros(value: Any) -> Any:
    if isinstance(value, Tensor):
        return torch.zeros_like(value)
    if isinstance(value, Mapping):
        return {key: _zeros(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_zeros(item) for item in value)
    raise TypeError(f"cannot zero an input of type {type(value).__name__}: pass mask=(inputs, present) -> inputs")


def _split(batch: Any, batch_of: BatchOf | None, index: int) -> tuple[Mapping[str, Any], Tensor]:
    if batch_of is not None:
        batch = batch_of(batch)
    if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], Mapping)):
        shown = f"a {type(batch).__name__} of {len(batch)} items" if isinstance(batch, (tuple, list)) else f"a {type(batch).__name__}"
        raise TypeError(
            f"batch {index} is {shown}: a batch must be (inputs, target, ...) with inputs a mapping modality -> "
            "input; pass batch_of=lambda batch: (inputs, target)"
        )
    inputs, target = batch[0], batch[1]
    if not isinstance(target, Tensor) or target.dim() != 1 or target.dtype.is_floating_point or target.dtype == torch.bool:
        shape = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
        raise ValueError(
            f"batch {index}: target must be [batch] integer class indices (the per-modality accuracies score "
            f"single-label classification), got {shape}"
        )
    return inputs, target


def _to(value: Any, device: torch.device | None) -> Any:
    if device is None:
        return value
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {key: _to(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to(item, device) for item in value)
    return value


def _batches(
    loader: Iterable[Any], names: Sequence[str], batch_of: BatchOf | None, device: torch.device | None
) -> Iterator[tuple[Mapping[str, Any], Tensor]]:
    count = 0
    for index, batch in enumerate(loader):
        inputs, target = _split(batch, batch_of, index)
        missing = [name for name in names if name not in inputs]
        if missing:
            raise ValueError(f"batch {index}: the inputs have keys {sorted(inputs)}, missing the modalities {missing}")
        count += 1
        yield _to(dict(inputs), device), _to(target, device)
    if not count:
        raise ValueError("the loader yielded no batch: evaluation needs held-out data")


def _caller(fn: Any, names: Sequence[str], what: str) -> Callable[[Mapping[str, Any]], Any]:
    """``fn`` as a function of one dict: ``fn(d)`` or ``fn(**d)``, decided from its signature."""
    if not callable(fn):
        raise TypeError(f"{what} must be callable, got {type(fn).__name__}")
    target = fn.forward if isinstance(fn, nn.Module) else fn
    try:
        parameters = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):  # no signature to read (a builtin): call it with the dict
        return fn
    keywords = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if set(names) <= keywords:
        return lambda values: fn(**values)
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    if len(required) == 1 or (not required and (positional or any(p.kind == p.VAR_POSITIONAL for p in parameters))):
        return fn
    if any(p.kind == p.VAR_KEYWORD for p in parameters):
        return lambda values: fn(**values)
    shown = ", ".join(p.name for p in parameters)
    raise TypeError(
        f"cannot tell how to call {what}({shown}): gradmod calls it with one mapping ({what}(inputs)) or with one "
        f"keyword per modality ({what}(**inputs), parameters named {list(names)}); wrap it in a lambda that does"
    )


def _logits(output: Any, what: str) -> Tensor:
    if isinstance(output, Tensor):
        logits = output
    elif isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        logits = output["logits"]
    elif isinstance(getattr(output, "logits", None), Tensor):
        logits = output.logits
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        logits = output[0]
    else:
        raise TypeError(
            f"{what} returned a {type(output).__name__}: it must return the logits [B, C], a tuple whose first "
            "element they are, a mapping with 'logits', or an object with .logits"
        )
    if logits.dim() != 2:
        raise ValueError(f"{what} must give logits [batch, classes], got shape {tuple(logits.shape)}")
    if not torch.isfinite(logits).all():
        raise ValueError(f"{what} gave NaN or inf logits")
    return logits


def _features(output: Any, names: Sequence[str], what: str) -> Mapping[str, Tensor]:
    if not isinstance(output, Mapping):
        raise TypeError(f"{what} must return a mapping modality -> tensor, got {type(output).__name__}")
    missing = [name for name in names if name not in output]
    if missing:
        raise ValueError(f"{what} returned {sorted(output)}: missing the modalities {missing}")
    return output


def _modules(*callables: Any) -> list[nn.Module]:
    found = []
    for fn in callables:
        module = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
        if isinstance(module, nn.Module) and all(module is not m for m in found):
            found.append(module)
    return found


def _device(device: torch.device | str | None, modules: Sequence[nn.Module]) -> torch.device | None:
    if device is not None:
        return torch.device(device)
    for module in modules:
        for p in module.parameters():
            return p.device
    return None


@contextlib.contextmanager
def _evaluating(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Eval mode (restored after), no gradient, torch's random state restored after."""
    modes = [(m, [sub.training for sub in m.modules()]) for m in modules]
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            for module in modules:
                module.eval()
            yield
    finally:
        for module, flags in modes:
            for sub, flag in zip(module.modules(), flags):
                sub.training = flag


class _Tally:
    """Correct predictions per key over the counted rows (targets other than ``ignore_index``), and the
    number of classes the logits had."""

    def __init__(self) -> None:
        self.correct: dict[Any, int] = {}
        self.samples = 0
        self.classes: int | None = None

    def count(self, target: Tensor) -> Tensor:
        keep = target != IGNORE_INDEX
        self.samples += int(keep.sum())
        return keep

    def add(self, key: Any, logits: Tensor, target: Tensor, keep: Tensor) -> None:
        if logits.shape[0] != target.shape[0]:
            raise ValueError(f"logits for {key!r} have {logits.shape[0]} rows, the target {target.shape[0]}")
        self.classes = logits.shape[1]
        hits = int(((logits.argmax(1) == target) & keep).sum())
        self.correct[key] = self.correct.get(key, 0) + hits

    def accuracies(self) -> dict[Any, float]:
        if not self.samples:
            raise ValueError(f"every target of the loader equals ignore_index {IGNORE_INDEX}: no row to score")
        return {key: hits / self.samples for key, hits in self.correct.items()}


@dataclass(frozen=True)
class _Feed:
    """How batches reach the model: their layout (``batch_of``), the device, and the modules put in eval
    mode besides those found among the callables (``modules=``: the models a closure calls)."""

    batch_of: BatchOf | None = None
    device: torch.device | str | None = None
    modules: tuple[nn.Module, ...] = ()

    def evaluating(self, *callables: Any) -> tuple[contextlib.AbstractContextManager, torch.device | None]:
        modules = _modules(*callables, *self.modules)
        return _evaluating(modules), _device(self.device, modules)


# ---------------------------------------------------------------------- coalitions
def coalition_accuracy(
    loader: Iterable[Any],
    names: Sequence[str],
    *,
    forward: Any = None,
    encode: Any = None,
    head: Any = None,
    mask: Mask | None = None,
    subsets: Iterable[Iterable[str]] | None = None,
    batch_of: BatchOf | None = None,
    device: torch.device | str | None = None,
    modules: Iterable[nn.Module] = (),
) -> dict[frozenset, float]:
    """Fused accuracy ``v(S)`` with only the modalities of ``S`` present, for every subset (default: all
    ``2^M``, the empty one included: accuracy with every input, or feature, zeroed).

    Give ``forward`` (absent inputs removed by ``mask``, default `zero_absent`) or ``encode`` and ``head``
    (absent features zeroed). Cost: one forward per subset and batch, or one encoding and one head call per
    subset and batch.
    """
    feed = _Feed(batch_of, device, tuple(modules))
    return _coalition_tally(loader, names, forward, encode, head, mask, subsets, feed).accuracies()


def _coalition_tally(
    loader: Iterable[Any],
    names: Sequence[str],
    forward: Any,
    encode: Any,
    head: Any,
    mask: Mask | None,
    subsets: Iterable[Iterable[str]] | None,
    feed: _Feed,
) -> _Tally:
    """The tally behind `coalition_accuracy` (its accuracies, rows scored and class count)."""
    names = check_units(tuple(names), "names")
    chosen = all_coalitions(names) if subsets is None else [frozenset(s) for s in subsets]
    unknown = sorted({n for s in chosen for n in s} - set(names))
    if unknown:
        raise ValueError(f"subsets name {unknown}, which are not among the modalities {list(names)}")
    predict, callables = _coalition_predictor(names, forward, encode, head, mask)
    tally = _Tally()
    context, device = feed.evaluating(*callables)
    with context:
        for inputs, target in _batches(loader, names, feed.batch_of, device):
            keep = tally.count(target)
            for subset, logits in predict(inputs, chosen).items():
                tally.add(subset, logits, target, keep)
    return tally


def _coalition_predictor(
    names: Sequence[str], forward: Any, encode: Any, head: Any, mask: Mask | None
) -> tuple[Callable[[Mapping[str, Any], list[frozenset]], dict[frozenset, Tensor]], tuple[Any, ...]]:
    if (forward is None) == (encode is None and head is None) or (encode is None) != (head is None):
        raise TypeError(
            "give forward= (the fused model: absent inputs are zeroed) or both encode= (inputs -> {modality: "
            "features}) and head= (features -> logits: absent features are zeroed), not both and not neither"
        )
    if forward is not None:
        call = _caller(forward, names, "forward")
        remove = zero_absent if mask is None else mask
        every = frozenset(names)

        def predict(inputs, subsets):
            return {s: _logits(call(remove(inputs, every - s)), "forward") for s in subsets}

        return predict, (forward, mask)
    if mask is not None:
        raise TypeError("mask= removes inputs before forward=; with encode= and head= the absent features are zeroed")
    call_encode, call_head = _caller(encode, names, "encode"), _caller(head, names, "head")

    def predict(inputs, subsets):
        features = _features(call_encode(inputs), names, "encode")
        out = {}
        for s in subsets:
            present = {n: f if n in s else torch.zeros_like(f) for n, f in features.items()}
            out[s] = _logits(call_head(present), "head")
        return out

    return predict, (encode, head)


def masked_accuracy(loader: Iterable[Any], names: Sequence[str], **how: Any) -> dict[str, float]:
    """Each modality's accuracy with every other modality removed: ``{m: v({m})}``; the arguments of
    `coalition_accuracy` (``forward`` and ``mask``, or ``encode`` and ``head``). Cost: M passes per batch."""
    names = check_units(tuple(names), "names")
    values = coalition_accuracy(loader, names, subsets=[{n} for n in names], **how)
    return {name: values[frozenset({name})] for name in names}


def shapley_of(values: Mapping[frozenset, float], names: Sequence[str]) -> dict[str, float]:
    """Shapley value of each modality for the coalition accuracies ``v(S)`` (`gradmod.functional.shapley_values`):
    ``φ_m = Σ_{S ⊆ N∖{m}} |S|!(M−|S|−1)!/M! · (v(S ∪ {m}) − v(S))``; ``Σ_m φ_m = v(N) − v(∅)``."""
    names = check_units(tuple(names), "names")
    outputs = {subset: torch.tensor(float(value), dtype=torch.float64) for subset, value in values.items()}
    return {name: float(value) for name, value in shapley_values(outputs, names).items()}


def shapley_accuracy(loader: Iterable[Any], names: Sequence[str], **how: Any) -> dict[str, float]:
    """Shapley values of fused accuracy over all ``2^M`` modality subsets (BalanceBenchmark's per-modality
    valuation: absent modalities zeroed, ``v(∅)`` the accuracy with all of them zeroed), `shapley_of` the
    `coalition_accuracy` table; arguments as `coalition_accuracy`. Cost: ``2^M`` passes per batch."""
    names = check_units(tuple(names), "names")
    return shapley_of(coalition_accuracy(loader, names, **how), names)


def conditional_utilization(values: Mapping[frozenset, float], names: Sequence[str]) -> dict[str, float]:
    """How much each modality adds to the others, ``u(m) = (v(N) − v(N∖{m})) / v(N)``, from coalition
    accuracies: for two modalities the Greedy-learner paper's ``u(m_j | m_i) = (A(m_i, m_j) − A(m_i)) /
    A(m_i, m_j)``. Near 0: the fused model does as well without ``m``."""
    names = check_units(tuple(names), "names")
    every = frozenset(names)
    needed = [every, *(every - {n} for n in names)]
    missing = [sorted(s) for s in needed if s not in values]
    if missing:
        raise ValueError(f"conditional utilisation needs the accuracies of the subsets {missing}")
    if values[every] == 0:
        raise ValueError("the fused accuracy is 0: conditional utilisation divides by it")
    return {n: (values[every] - values[every - {n}]) / values[every] for n in names}


def decoupled_accuracy(
    loader: Iterable[Any],
    names: Sequence[str],
    *,
    unimodal_logits: Any,
    batch_of: BatchOf | None = None,
    device: torch.device | str | None = None,
    modules: Iterable[nn.Module] = (),
) -> dict[str, float]:
    """Accuracy of each modality's own logits: ``unimodal_logits(inputs) -> {m: [B, C]}`` — a head that
    splits per modality (``lambda x: head.unimodal_logits(encode(x))``, OGM-GE's evaluation) or unimodal
    heads. One pass."""
    return _decoupled_tally(loader, names, unimodal_logits, _Feed(batch_of, device, tuple(modules))).accuracies()


def _decoupled_tally(loader: Iterable[Any], names: Sequence[str], unimodal_logits: Any, feed: _Feed) -> _Tally:
    names = check_units(tuple(names), "names")
    call = _caller(unimodal_logits, names, "unimodal_logits")
    tally = _Tally()
    context, device = feed.evaluating(unimodal_logits)
    with context:
        for inputs, target in _batches(loader, names, feed.batch_of, device):
            keep = tally.count(target)
            logits = _features(call(inputs), names, "unimodal_logits")
            for name in names:
                tally.add(name, _logits(logits[name], f"unimodal_logits[{name!r}]"), target, keep)
    return tally


# ---------------------------------------------------------------------- probes
def _encoded(
    encode: Callable[[Mapping[str, Any]], Any], loader: Iterable[Any], names: Sequence[str], batch_of: BatchOf | None, device
) -> tuple[dict[str, Tensor], Tensor]:
    """Every counted row's flattened features per modality (float32, on the host) and its target."""
    features: dict[str, list[Tensor]] = {name: [] for name in names}
    targets = []
    for inputs, target in _batches(loader, names, batch_of, device):
        keep = target != IGNORE_INDEX
        out = _features(encode(inputs), names, "encode")
        for name in names:
            f = out[name]
            if not isinstance(f, Tensor) or f.dim() < 1 or f.shape[0] != target.shape[0]:
                raise ValueError(f"encode's features of {name!r} must be a [batch, ...] tensor of the target's batch")
            features[name].append(f[keep].reshape(int(keep.sum()), -1).float().cpu())
        targets.append(target[keep].cpu())
    return {name: torch.cat(parts) for name, parts in features.items()}, torch.cat(targets).long()


def _fit_logistic(x: Tensor, y: Tensor, classes: int, steps: int, weight_decay: float) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression on standardised ``x``: ``W, b`` minimising
    ``CE(xW + b, y) + (λ/2)‖W‖²`` by full-batch L-BFGS from zeros (deterministic)."""
    weight = torch.zeros(x.shape[1], classes, dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(classes, dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, history_size=10, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(x @ weight + bias, y) + 0.5 * weight_decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def linear_probe(
    encode: Any,
    train_loader: Iterable[Any],
    test_loader: Iterable[Any],
    names: Sequence[str],
    *,
    classes: int | None = None,
    steps: int = 100,
    weight_decay: float = 1e-3,
    max_samples: int = 20_000,
    seed: int = 0,
    batch_of: BatchOf | None = None,
    device: torch.device | str | None = None,
    modules: Iterable[nn.Module] = (),
) -> dict[str, float]:
    """Held-out accuracy of a linear classifier on each frozen encoder's features (the field's "unimodal
    accuracy" of an encoder, apart from how the fused head uses it).

    ``encode(inputs) -> {m: [B, ...]}`` (flattened per row). Per modality: the features of ``train_loader``
    (at most ``max_samples`` rows, drawn with ``seed`` when there are more), standardised with their mean
    and standard deviation; a multinomial logistic regression with L2 penalty ``weight_decay`` fitted by
    full-batch L-BFGS for at most ``steps`` iterations from zero weights, on the host in float32; its
    accuracy on ``test_loader``. ``classes=None``: the largest target seen, plus one. Deterministic for a
    given ``seed``. Cost: one encoding pass over each loader; the fit is ``O(steps · N · D · C)``.
    """
    names = check_units(tuple(names), "names")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    call = _caller(encode, names, "encode")
    context, where = _Feed(batch_of, device, tuple(modules)).evaluating(encode)
    with context:
        train, train_y = _encoded(call, train_loader, names, batch_of, where)
        test, test_y = _encoded(call, test_loader, names, batch_of, where)
        count = int(max(train_y.max(), test_y.max())) + 1 if classes is None else int(classes)
        if int(max(train_y.max(), test_y.max())) >= count:
            raise ValueError(f"a target is >= classes={count}")
        if train_y.shape[0] > max_samples:
            rows = torch.randperm(train_y.shape[0], generator=torch.Generator().manual_seed(seed))[:max_samples]
            train = {name: f[rows] for name, f in train.items()}
            train_y = train_y[rows]
        result = {}
        for name in names:
            mean = train[name].mean(0)
            std = train[name].std(0, correction=0)
            std = torch.where(std > 1e-12, std, torch.ones_like(std))
            weight, bias = _fit_logistic((train[name] - mean) / std, train_y, count, steps, weight_decay)
            predicted = (((test[name] - mean) / std) @ weight + bias).argmax(1)
            result[name] = float((predicted == test_y).double().mean())
    return result


# ---------------------------------------------------------------------- trained alone
def solo_accuracy(
    test_loader: Iterable[Any],
    names: Sequence[str],
    *,
    factory: Callable[[str], nn.Module] | None = None,
    train_loader: Iterable[Any] | None = None,
    classes: int | None = None,
    steps: int = 200,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    trained: Callable[[str], Any] | None = None,
    batch_of: BatchOf | None = None,
    device: torch.device | str | None = None,
    modules: Iterable[nn.Module] = (),
) -> dict[str, float]:
    """Held-out accuracy of each modality's encoder trained alone, to compare with the joint model's.

    Either ``factory(name) -> nn.Module``, a fresh copy of that modality's encoder (input → features
    ``[B, ...]``, flattened per row): gradmod adds a linear head with ``classes`` outputs and trains both on
    that modality's inputs of ``train_loader`` with SGD (``lr``, ``momentum``, ``weight_decay``) and
    cross-entropy for ``steps`` optimizer steps (cycling the loader), from ``torch.manual_seed(seed)``
    (torch's random state is restored afterwards); give it the budget the joint run had. Or
    ``trained(name) -> predictor``, a model you trained alone (``predictor(input) -> logits``). Cost: the
    training, then one pass over ``test_loader`` per modality.
    """
    names = check_units(tuple(names), "names")
    if (factory is None) == (trained is None):
        raise TypeError("give factory= (name -> fresh encoder, trained here) or trained= (name -> your trained predictor)")
    predictors = {}
    if factory is not None:
        if train_loader is None or classes is None:
            raise TypeError("solo_accuracy(factory=...) trains the encoders: it needs train_loader= and classes=")
        for name in names:
            predictors[name] = _train_alone(name, factory, train_loader, int(classes), steps, lr, momentum, weight_decay, seed, batch_of, device)
    else:
        for name in names:
            predictors[name] = trained(name)
    tally = _Tally()
    context, where = _Feed(batch_of, device, tuple(modules)).evaluating(*predictors.values())
    with context:
        for inputs, target in _batches(test_loader, names, batch_of, where):
            keep = tally.count(target)
            for name in names:
                tally.add(name, _logits(predictors[name](inputs[name]), f"the solo predictor of {name!r}"), target, keep)
    return tally.accuracies()


def _train_alone(
    name: str,
    factory: Callable[[str], nn.Module],
    loader: Iterable[Any],
    classes: int,
    steps: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    seed: int,
    batch_of: BatchOf | None,
    device: torch.device | str | None,
) -> nn.Module:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        encoder = factory(name)
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"factory({name!r}) returned a {type(encoder).__name__}, not an nn.Module")
        where = _device(device, [encoder])
        model: nn.Module | None = None
        optimizer = None
        done = 0
        while done < steps:
            seen = 0
            for index, batch in enumerate(loader):
                inputs, target = _split(batch, batch_of, index)
                if name not in inputs:
                    raise ValueError(f"batch {index}: the inputs have keys {sorted(inputs)}, missing {name!r}")
                x, y = _to(inputs[name], where), _to(target, where)
                if model is None:
                    with torch.no_grad():
                        width = encoder(x).reshape(y.shape[0], -1).shape[1]
                    model = nn.Sequential(encoder, nn.Flatten(), nn.Linear(width, classes).to(where))
                    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
                model.train()
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x), y, ignore_index=IGNORE_INDEX).backward()
                optimizer.step()
                done += 1
                seen += 1
                if done == steps:
                    break
            if not seen:
                raise ValueError("train_loader yielded no batch")
    return model

