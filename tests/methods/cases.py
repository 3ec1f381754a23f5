"""The contract database: one `Case` per method of ``gradmod.METHODS``, in the spirit of torch's ``optim_db``.

A case says how to build the method over the tiny `Net` and how one training step of a plain loop drives it;
``tests/methods/test_contract.py`` runs the generic contract over every case (exact resume, versions, reset,
accumulation, skipped steps, bad inputs, the mistakes users make, two gloo ranks, the trainers). Most cases are
derived from the method's registry entry (`derived_case`: the kind says how a step drives it, ``loss_inputs`` what a
loss method reads); a method adds a line to `CASES` only where it needs more (a head, a per-epoch measure, a refusal).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import gradmod
from gradmod._internal import distributed
from gradmod.fusion import ConcatFusion
from gradmod.method import Method, MethodInfo

NAMES = ("audio", "visual")
IN_DIM, DIM, CLASSES = 6, 8, 4
Batch = tuple[dict[str, Tensor], Tensor]


class Net(nn.Module):
    """Per-modality MLP encoders of one width, a concat head, one linear head per modality, a shared linear head."""

    def __init__(self, names: Sequence[str] = NAMES) -> None:
        super().__init__()
        self.names = tuple(names)
        self.encoders = nn.ModuleDict({n: nn.Sequential(nn.Linear(IN_DIM, DIM), nn.ReLU(), nn.Linear(DIM, DIM)) for n in self.names})
        self.fusion = ConcatFusion({n: DIM for n in self.names}, CLASSES)
        self.unimodal = nn.ModuleDict({n: nn.Linear(DIM, CLASSES) for n in self.names})
        self.shared = nn.Linear(DIM, CLASSES)

    def encode(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {n: self.encoders[n](inputs[n]) for n in self.names}

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        return self.fusion(self.encode(inputs))


def batches(steps: int, batch: int = 8, names: Sequence[str] = NAMES, seed: int = 0) -> list[Batch]:
    """Deterministic batches in which the first modality carries the label more clearly (an imbalance)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        y = torch.randint(0, CLASSES, (batch,), generator=g)
        inputs = {n: F.one_hot(y, IN_DIM).float() * (3.0 if i == 0 else 0.5) + torch.randn(batch, IN_DIM, generator=g)
                  for i, n in enumerate(names)}
        out.append((inputs, y))
    return out


def provide(net: Net, names: Sequence[str], inputs: Mapping[str, Tensor], target: Tensor) -> dict[str, Any]:
    """The step inputs ``names`` (`gradmod.method.INPUTS`) from the tiny net (the CLI's provider in miniature)."""
    features = net.encode(inputs)
    logits = net.fusion(features)
    unimodal_heads = {n: net.unimodal[n](features[n]) for n in net.names}
    given = {
        "target": target,
        "features": features,
        "inputs": dict(inputs),
        "head": net.fusion,
        "logits": logits,
        "unimodal_logits": net.fusion.unimodal_logits(features),
        "unimodal_head_logits": unimodal_heads,
        "losses": {"fused": F.cross_entropy(logits, target), **{n: F.cross_entropy(z, target) for n, z in unimodal_heads.items()}},
    }
    return {name: given[name] for name in names}


# ------------------------------------------------------------------------------------------ one step per kind
def modulator_step(net: Net, method: Any, batch: Batch, scale: float = 1.0) -> Tensor:
    """Observe what the measure reads, backward the fused loss (the optimizer step applies the method)."""
    inputs, target = batch
    features = net.encode(inputs)
    logits = net.fusion(features)
    reads = method.measure.inputs
    if "zeta" in reads:
        method.observe(zeta=torch.sigmoid(logits[:, :1]).expand(-1, 3))
    else:
        method.observe(logits=net.fusion.unimodal_logits(features), target=target)
    return scale * F.cross_entropy(logits, target)


def responses_step(net: Net, method: Any, batch: Batch, scale: float = 1.0) -> Tensor:
    inputs, target = batch
    responses = gradmod.methods.agm.mono_responses(net, inputs, forward=net)
    method.observe(responses=responses, target=target)
    return scale * F.cross_entropy(method.combine(responses), target)


def backward_step(net: Net, method: Any, batch: Batch, scale: float = 1.0) -> None:
    inputs, target = batch
    features = net.encode(inputs)
    fused = scale * F.cross_entropy(net.fusion(features), target)
    method.backward(fused, {n: scale * F.cross_entropy(net.unimodal[n](features[n]), target) for n in net.names})


def loss_step(net: Net, method: Any, batch: Batch, scale: float = 1.0) -> Tensor:
    inputs, target = batch
    return scale * method.loss(**provide(net, method.loss_inputs, inputs, target))


def forward_step(net: Net, method: Any, batch: Batch, scale: float = 1.0) -> Tensor:
    inputs, target = batch
    given = provide(net, method.forward_inputs, inputs, target)
    features, keep = method(**given)
    logits = net.fusion(features)
    return scale * F.cross_entropy(logits if keep is None else logits[keep], target if keep is None else target[keep])


def plain_step(net: Net, method: Any, batch: Batch, scale: float = 1.0) -> Tensor:
    inputs, target = batch
    return scale * F.cross_entropy(net(inputs), target)


#: How one step of a plain loop drives a method of each kind: the loss to backward (``None``: the method ran the
#: backward itself).
KIND_STEPS: dict[str, Callable[[Net, Any, Batch], Tensor | None]] = {
    "modulator": modulator_step,
    "responses": responses_step,
    "backward": backward_step,
    "loss": loss_step,
    "forward": forward_step,
    "epoch": plain_step,
}


def modalities(net: Net) -> dict[str, nn.Module]:
    return dict(net.encoders)


@dataclass
class Case:
    """How the contract tests build and drive one method.

    Attributes:
        key: the registry key.
        build: ``net -> method`` (not attached).
        step: ``(net, method, batch, scale)``, one step's work before ``optimizer.step()``: returns the loss (times
            ``scale``, the share of an accumulated micro-batch) to backward, or ``None`` when the method ran the
            backward itself (MMPareto's ``backward``, MLA's turns).
        turns: optimizer steps per batch (MLA: one per modality).
        accumulates: ``True`` when k micro-batches give the gradient of one batch of k·b; otherwise why not.
        attaches: whether the method hooks the optimizer (``attach``) in a plain loop.
        shards: ``True`` when two ranks on the halves of each batch give one process's run on the whole batch;
            otherwise why not (the replicas must stay identical either way).
        rank_records: why the method's records (``history``) are of each rank's own batch, where they are (its
            decisions, the state, stay identical across ranks); empty when the records are the whole batch's.
        bad: calls that must raise, with the error type and a fragment of the message that names the problem.
    """

    key: str
    build: Callable[[Net], Method]
    step: Callable[[Net, Any, Batch], Tensor | None]
    turns: int = 1
    accumulates: bool | str = True
    attaches: bool = False
    shards: bool | str = True
    rank_records: str = ""
    bad: list[tuple[Callable[[Net, Any], Any], type[Exception], str]] = field(default_factory=list)

    @property
    def info(self) -> MethodInfo:
        return gradmod.METHODS[self.key]


def derived_case(key: str, **overrides: Any) -> Case:
    """A method's case from its registry entry: built over the encoders (``modalities``), or the heads (``heads``)
    or names (``names``), with the strength's default, driven by its kind's step."""
    info = gradmod.METHODS[key]
    parameters = inspect.signature(info.preset).parameters
    first = next(iter(parameters))
    strength = {} if info.strength is None else {info.strength.keyword: info.strength.default}

    def build(net: Net) -> Method:
        known = {"modalities": modalities(net), "heads": ("fused", *net.names), "names": net.names}
        keywords = {"num_classes": CLASSES} if "num_classes" in parameters else {}
        return info.preset(known[first], **strength, **keywords)

    attaches = info.kind in ("modulator", "responses", "backward", "turns")
    return Case(key, build, KIND_STEPS[info.kind], attaches=attaches, **overrides)


def _turns(net: Net, method: Any, batch: Batch, scale: float = 1.0) -> None:
    """MLA's turns are driven by `run_step` (one optimizer step per modality)."""
    raise AssertionError("MLA's steps are its turns")


def _mla(net: Net) -> Method:
    return gradmod.MLA(modalities(net), net.shared)


@torch.no_grad()
def decoupled_accuracy(net: Net, data: Sequence[Batch]) -> dict[str, float]:
    """Each modality's accuracy from its decoupled logits on ``data`` (B-MM's per-epoch measure)."""
    hits = {n: 0 for n in net.names}
    count = 0
    for inputs, target in data:
        for name, logits in net.fusion.unimodal_logits(net.encode(inputs)).items():
            hits[name] += int((logits.argmax(1) == target).sum())
        count += len(target)
    return {name: value / count for name, value in hits.items()}


#: The fixed data of the per-epoch measures (B-MM's accuracies, G-Blending's checkpoints).
MEASURED = batches(2, seed=7)


def rank_share(data: Sequence[Batch]) -> list[Batch]:
    """This rank's half of every batch under ``torch.distributed`` (as a ``DistributedSampler`` shards a pass),
    else ``data``."""
    if not distributed():
        return list(data)
    world, rank = dist.get_world_size(), dist.get_rank()
    return [({n: x.chunk(world)[rank] for n, x in inputs.items()}, target.chunk(world)[rank]) for inputs, target in data]


def _bmm(net: Net) -> Method:
    return gradmod.BalancedMixup(
        net.names, CLASSES, degree=1.0, warmup_epochs=0, seed=0, measure=lambda: decoupled_accuracy(net, MEASURED)
    )


def _gblending(net: Net) -> Method:
    def heads(model: Net, batch: Batch):
        inputs, target = batch
        features = model.encode(inputs)
        return {"fused": model.fusion(features), **{n: model.unimodal[n](features[n]) for n in model.names}}, target

    def measure():
        return gradmod.methods.gblending.checkpoint(net, heads, train=rank_share(MEASURED[:1]), held_out=rank_share(MEASURED[1:]))

    return gradmod.GBlending(("fused", *net.names), measure=measure)


def _bmm_step(net: Net, method: Any, batch: Batch, scale: float = 1.0) -> Tensor:
    inputs, target = batch
    mixed, soft = method(inputs, target)
    return gradmod.methods.mixup.soft_cross_entropy(net(mixed), soft)


def _mm(net: Net) -> Method:
    return gradmod.MultimodalMixup(0.4, generator=torch.Generator().manual_seed(0))


def _mm_step(net: Net, method: Any, batch: Batch, scale: float = 1.0) -> Tensor:
    inputs, target = batch
    features = net.encode(inputs)
    mixed, soft = method(torch.cat([features[n] for n in net.names], 1), target, CLASSES)
    parts = dict(zip(net.names, mixed.split(DIM, 1)))
    return gradmod.methods.mixup.soft_cross_entropy(net.fusion(parts), soft)


def _umt(net: Net) -> Method:
    """UMT's teachers: the encoders of another net, made from a fixed seed (the tests need no trained teachers;
    a run builds them from its trained unimodal models, which a resumed run loads again)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        teachers = Net(net.names).encoders
    return gradmod.UMT(dict(teachers))


def _encoded(model: Net, batch: Batch) -> tuple[dict[str, Tensor], Tensor]:
    """The ``forward(model, batch) -> (features, target)`` of the methods' per-epoch passes."""
    inputs, target = batch
    return model.encode(inputs), target


def _pmr(net: Net) -> Method:
    from gradmod.methods.pmr import prototype_pass

    return gradmod.PMR(net.names, CLASSES, measure=lambda: prototype_pass(net, _encoded, rank_share(MEASURED), CLASSES))


def _relearning(net: Net) -> Method:
    from gradmod.methods.relearning import pooled_features

    def features(split: str):
        return pooled_features(net, _encoded, rank_share(MEASURED if split == "train" else batches(2, seed=8)))

    return gradmod.Relearning(modalities(net), CLASSES, features, reinit_every=1)


class _Items(torch.utils.data.Dataset):
    """Samples of `MEASURED` one by one, the training set valuation re-samples."""

    def __init__(self) -> None:
        self.items = [({n: x[i] for n, x in inputs.items()}, target[i]) for inputs, target in MEASURED for i in range(len(target))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


def _valuation(net: Net) -> Method:
    from gradmod.methods.valuation import coalition_correct

    dataset = _Items()
    loader = torch.utils.data.DataLoader(dataset, batch_size=8)
    return gradmod.ModalityValuation(
        net.names, dataset, lambda: coalition_correct(net, _encoded, net.fusion, loader), warmup_epochs=0, seed=0
    )


def _valuation_step(net: Net, method: Any, batch: Batch, scale: float = 1.0) -> Tensor:
    """A plain step on the batch (the re-sampled data change which batches an epoch holds, not the step)."""
    inputs, target = batch
    return scale * F.cross_entropy(net(inputs), target)


def _pdmp(net: Net) -> Method:
    return gradmod.PDMP(modalities(net), ("audio", "visual"), 1.0, 0.5)


def _ogm(net: Net, preset: type = gradmod.OGM) -> Method:
    return preset(modalities(net), 0.8)


def _bad_observe(**inputs: Any) -> Callable[[Net, Any], Any]:
    return lambda net, method: method.observe(**inputs)


_LOGITS = {"audio": torch.randn(4, CLASSES), "visual": torch.randn(4, CLASSES)}
_Y = torch.tensor([0, 1, 2, 3])
#: The bad inputs every method that observes decoupled logits must refuse by name.
LOGIT_MISTAKES = [
    (_bad_observe(logits={"audio": _LOGITS["audio"]}, target=_Y), ValueError, "missing ['visual']"),
    (_bad_observe(logits={**_LOGITS, "text": _LOGITS["audio"]}, target=_Y), ValueError, "unknown ['text']"),
    (_bad_observe(logits={**_LOGITS, "audio": torch.full((4, CLASSES), float("nan"))}, target=_Y), ValueError, "NaN"),
    (_bad_observe(logits={**_LOGITS, "audio": torch.randn(4, CLASSES, 2)}, target=_Y), ValueError, "[batch, classes]"),
    (_bad_observe(logits=_LOGITS, target=torch.tensor([0, 1, 2])), ValueError, "target must be [batch]"),
    (_bad_observe(logits=_LOGITS, target=torch.tensor([0, 1, 2, 9])), ValueError, "outside [0, 4)"),
]

#: Why a loss method's records differ between ranks: they are means over the rank's own batch.
RANK_LOSSES = "its records are the terms of each rank's own batch, as a trainer's logged loss is"

#: Every method's case (the keys of gradmod.METHODS, in its order).
CASES: dict[str, Case] = {
    "ogm": Case("ogm", _ogm, modulator_step, attaches=True, bad=LOGIT_MISTAKES),
    "ogm_ge": Case("ogm_ge", lambda net: _ogm(net, gradmod.OGMGE), modulator_step, attaches=True, bad=LOGIT_MISTAKES),
    "dgm": derived_case("dgm", bad=LOGIT_MISTAKES[:2]),
    "decoupling_free": Case(
        "decoupling_free", lambda net: _ogm(net, gradmod.DecouplingFree), modulator_step, attaches=True,
        bad=[(_bad_observe(zeta=torch.full((4, 3), 1.5)), ValueError, "zeta lies outside [0, 1]")],
    ),
    "pdmp": Case("pdmp", _pdmp, modulator_step, attaches=True, bad=LOGIT_MISTAKES),
    "mm": Case("mm", _mm, _mm_step, accumulates="its mixing weight is drawn per call",
               shards="its mixing weight and partners are drawn per call, within each rank's batch"),
    "bmm": Case("bmm", _bmm, _bmm_step, accumulates="its partners are drawn per call",
                shards="its partners are drawn per call, within each rank's batch"),
    "mla": Case("mla", _mla, _turns, turns=2, attaches=True, accumulates="MLA takes one optimizer step per modality"),
    "gblending": Case("gblending", _gblending, loss_step),
    "agm": derived_case("agm", accumulates=(
        "its coefficients act during backward, so each micro-batch's backward uses the coefficients of the evidence "
        "observed so far (methods/agm.md, accumulation)"
    )),
    "mmpareto": derived_case("mmpareto"),
    "umt": Case("umt", _umt, loss_step, rank_records=RANK_LOSSES),
    "ume": derived_case("ume", rank_records=RANK_LOSSES),
    "dgl": derived_case("dgl", rank_records=RANK_LOSSES),
    "mbsd": derived_case("mbsd", rank_records=RANK_LOSSES),
    "lfm": derived_case("lfm", rank_records=RANK_LOSSES),
    "reconboost": derived_case("reconboost", rank_records=RANK_LOSSES),
    "pmr": Case("pmr", _pmr, loss_step, accumulates="the slower modality is decided per micro-batch"),
    "amco": derived_case("amco", accumulates="its counter advances and its mask is drawn per call"),
    "cml": derived_case("cml", accumulates="its removal orders are drawn per call",
                        shards="its removal orders are drawn per call, within each rank's batch", rank_records=RANK_LOSSES),
    "relearning": Case("relearning", _relearning, plain_step, shards=(
        "each rank clusters its share of the splits, and the mean of the shares' purities is not one fit's purity"
    )),
    "mmcosine": Case("mmcosine", lambda net: gradmod.fusion.MMCosineFusion({n: DIM for n in net.names}, CLASSES), plain_step),
    "valuation": Case("valuation", _valuation, _valuation_step),
    "opm": Case(
        "opm", lambda net: gradmod.methods.opm.OPM(net.names, warmup_epochs=0, seed=0), forward_step,
        accumulates="its masks are drawn per call",
        shards="every rank draws its own masks at the rates of its own batch (docs/methods/opm.md, randomness)",
        rank_records="its rates and masks are those of each rank's own batch",
    ),
}


def fresh(key: str, seed: int = 0, *, step_pre_hook: Callable[..., None] | None = None):
    """``(net, method, optimizer, case)``: the tiny net from ``seed``, the case's method and an SGD optimizer
    (momentum 0.9) over both, attached where the case attaches; ``step_pre_hook`` (an optimizer step pre-hook)
    runs before the method's own hooks, as DDP's gradient average does."""
    torch.manual_seed(seed)
    net = Net()
    the_case = case(key)
    method = the_case.build(net)
    extra = [] if getattr(method, "extra", None) is None else list(method.extra.parameters())
    optimizer = torch.optim.SGD([*net.parameters(), *extra], lr=0.05, momentum=0.9)
    if step_pre_hook is not None:
        optimizer.register_step_pre_hook(step_pre_hook)
    if the_case.attaches:
        method.attach(optimizer)
    return net, method, optimizer, the_case


def train(key: str, data, net=None, method=None, optimizer=None, epochs: int = 1, first_epoch: int = 0):
    """``epochs`` epochs of the case's plain loop on ``data`` (a `fresh` net, method and optimizer unless given)."""
    if net is None:
        net, method, optimizer, _ = fresh(key)
    the_case = case(key)
    for epoch in range(first_epoch, first_epoch + epochs):
        method.start_epoch(epoch)
        for batch in data:
            run_step(net, method, optimizer, batch, the_case)
        method.end_epoch(epoch)
    return net, method, optimizer


def same_state(a, b, where: str, close: bool = False) -> None:
    """``a`` equals ``b`` leaf by leaf (nested dicts, lists, tensors, numbers): bit for bit (NaN equal to NaN), or
    (``close``) to float32 round-off."""
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            same_state(a[k], b[k], f"{where}.{k}", close)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same_state(x, y, f"{where}[{i}]", close)
    elif isinstance(a, torch.Tensor):
        if close:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=where)
        else:
            assert torch.equal(a, b), where
    elif isinstance(a, float) and close:
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6, nan_ok=True), where
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), where


def case(key: str) -> Case:
    """The case of ``key``: its entry in `CASES`, else the one derived from its registry entry."""
    return CASES.get(key) or derived_case(key)


def run_step(net: Net, method: Any, optimizer: torch.optim.Optimizer, batch: Batch, the_case: Case) -> None:
    """One batch of a plain loop: the case's step, backward, ``optimizer.step()`` (MLA: one step per modality)."""
    if the_case.key == "mla":
        inputs, target = batch
        features = net.encode(inputs)
        for name in net.names:  # the encoders' graphs are separate: each turn frees its own
            optimizer.zero_grad(set_to_none=True)
            method.observe(name, features[name])
            F.cross_entropy(net.shared(features[name]), target).backward()
            optimizer.step()
        return
    optimizer.zero_grad(set_to_none=True)
    loss = the_case.step(net, method, batch)
    if loss is not None:
        loss.backward()
    optimizer.step()
