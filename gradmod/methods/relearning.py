"""Diagnosing & Re-learning: each encoder is softly re-initialised by how much better its features separate the
classes on the training set than on held-out data.

Wei, Li, Feng & Hu, *Diagnosing and Re-learning for Balanced Multimodal Learning*, ECCV 2024 (arXiv 2407.09705);
official code GeWu-Lab/Diagnosing_Relearning_ECCV2024 @025085e (``code/ours.py`` ≈ L99–169, L418–427), from
which the rules below are read. At the end of epoch ``e`` with ``e % 20 == 0`` and ``e > 0``, at most three
times (``reinit_every``, ``max_reinits``), for every modality ``m``:

* **diagnose**: the pooled features of encoder ``m`` (eval mode) on the training set and on a held-out split
  (never the test split) are each MinMax-scaled to ``[−1, 1]`` and clustered on their own with k-means into
  ``C`` clusters (scikit-learn's ``KMeans(n_clusters=C, random_state=0)``); the purity of a clustering is
  ``P = (1/N)·Σ_k max_c n_kc`` (`purity`, ``n_kc`` the samples of class ``c`` in cluster ``k``); the learning
  state is the gap ``Δ_m = |P_train − P_held-out|`` (the paper's ``g^k``), large for an encoder that
  memorised its training set;
* **re-learn**: ``α_m = tanh(λ·Δ_m)`` (``λ`` = ``reinit_strength``, 3) and every parameter of encoder ``m``
  becomes ``θ ← α_m·θ⁰ + (1 − α_m)·θ`` (`soft_reinit_`), ``θ⁰`` its value when the method was built. The
  head, the batch-norm running statistics and the optimizer's state are left as they are.

Every modality is diagnosed and re-initialised on its own, so the rules hold for any ``M ≥ 2`` as written.
No per-step cost; per re-initialisation one pass of the encoders over the training set and the held-out split
and ``2M`` k-means fits (`cluster_purity`).

**Under** ``torch.distributed`` the purities are averaged over the ranks (one all-reduce of ``2M`` numbers)
before ``α`` is computed, so every replica is re-initialised alike: give every rank the whole splits to get one
process's diagnosis (each rank runs the same fits), or each rank its share to divide the fits' cost (the mean of
the shares' purities, not the purity of one fit of the whole split).

**k-means restarts.** The official call leaves ``n_init`` unset: scikit-learn < 1.4 then runs ten
initialisations and keeps the best, ≥ 1.4 runs one (``n_init="auto"`` with k-means++), and on overlapping
classes the purity differs (0.237 with one, 0.253 with ten, on the same data). gradmod uses ``n_init=10``:
``Δ`` is a difference of two purities, and a single initialisation adds its own noise to each — and ten was
the default the method was written against. ``n_init="auto"`` gives what the official script does under a
current scikit-learn.

**scikit-learn** is needed only here and only when a diagnosis runs: it is imported then, and its absence raises
an ``ImportError`` that says ``pip install 'gradmod[relearning]'``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradmod._internal import check_names, collective_device, distributed, eval_mode, per_modality, real_scalar
from gradmod.appliers import Modality, ParameterSelection
from gradmod.history import History
from gradmod.method import Fit, Method, MethodInfo, Option, Strength

__all__ = [
    "DEFAULT_N_INIT",
    "SPLITS",
    "Relearning",
    "cluster_purity",
    "pooled_features",
    "purity",
    "reinit_coefficients",
    "soft_reinit_",
]

#: The k-means restarts gradmod runs (scikit-learn's default before 1.4); ``"auto"`` is one with k-means++.
DEFAULT_N_INIT = 10
#: The two splits the ``features`` callable is asked for.
SPLITS = ("train", "held_out")
#: ``α_m`` at or above which a re-initialisation is warned about: the encoder is nearly back at its start.
NEARLY_RESET = 0.9
#: What `Relearning.history` records per modality and re-initialisation.
_RECORDED = ("train_purity", "held_out_purity", "gap", "reinit")

#: ``forward(model, batch) -> ({modality: [B, D_m] pooled features}, [B] targets)``, as `pooled_features` calls it.
Forward = Callable[[nn.Module, Any], "tuple[Mapping[str, Tensor], Tensor]"]
#: ``features(split) -> ({modality: [N, D_m]}, [N] labels)`` for ``split`` in `SPLITS`.
Features = Callable[[str], "tuple[Mapping[str, Tensor], Tensor]"]


def purity(labels: Tensor, clusters: Tensor) -> float:
    """``P = (1/N)·Σ_k max_c n_kc``: the share of samples whose cluster's majority class is their own class.

    ``labels`` and ``clusters`` are ``[N]`` integer tensors (any values: they are compared, not indexed). In
    ``(0, 1]``; 1 when every cluster holds one class.
    """
    labels, clusters = torch.as_tensor(labels).reshape(-1), torch.as_tensor(clusters).reshape(-1)
    if labels.shape != clusters.shape or labels.numel() == 0:
        raise ValueError(
            "labels and clusters must be two [N] tensors of one length N > 0, "
            f"got {tuple(labels.shape)}, {tuple(clusters.shape)}"
        )
    _, label_ids = torch.unique(labels, return_inverse=True)
    _, cluster_ids = torch.unique(clusters, return_inverse=True)
    classes = int(label_ids.max()) + 1
    counts = torch.bincount(cluster_ids * classes + label_ids, minlength=(int(cluster_ids.max()) + 1) * classes)
    return float(counts.reshape(-1, classes).max(dim=1).values.sum()) / labels.numel()


def _sklearn() -> tuple[Any, Any]:
    try:
        from sklearn.cluster import KMeans
        from sklearn.preprocessing import MinMaxScaler
    except ImportError as error:
        raise ImportError(
            "gradmod's Diagnosing & Re-learning clusters features with scikit-learn's KMeans, which is not installed: "
            "pip install 'gradmod[relearning]'"
        ) from error
    return KMeans, MinMaxScaler


def cluster_purity(
    features: Tensor, labels: Tensor, num_classes: int, *, n_init: int | str = DEFAULT_N_INIT, random_state: int = 0
) -> float:
    """The diagnosis of one encoder on one split: `purity` of ``KMeans(num_classes)`` on the features MinMax-scaled
    to ``[−1, 1]`` per dimension (scikit-learn's ``MinMaxScaler`` and ``KMeans(n_clusters=num_classes,
    random_state=random_state, n_init=n_init)``, as the official code calls them; float32 features stay float32)."""
    KMeans, MinMaxScaler = _sklearn()
    if not isinstance(features, Tensor) or features.dim() != 2:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"features must be a [N, D] tensor (pool them first), got {shape}")
    if features.shape[0] < num_classes:
        raise ValueError(
            f"k-means into {num_classes} clusters needs at least {num_classes} samples, got {features.shape[0]}"
        )
    values = features.detach().cpu()
    if values.dtype not in (torch.float32, torch.float64):
        values = values.float()
    if not torch.isfinite(values).all():
        raise ValueError("features contain NaN or inf")
    scaled = MinMaxScaler(feature_range=(-1, 1)).fit_transform(values.numpy())
    clusters = KMeans(n_clusters=num_classes, random_state=random_state, n_init=n_init).fit_predict(scaled)
    return purity(torch.as_tensor(labels).cpu(), torch.from_numpy(clusters))


def reinit_coefficients(
    train_purity: Mapping[str, float], held_out_purity: Mapping[str, float], reinit_strength: float
) -> dict[str, float]:
    """``α_m = tanh(λ·|P_train,m − P_held-out,m|)``, in ``[0, 1)``; 0 when the two purities are equal."""
    strength = real_scalar(reinit_strength, "reinit_strength")
    check_names(held_out_purity, list(train_purity), "the held-out purities")
    return {m: math.tanh(strength * abs(float(train_purity[m]) - float(held_out_purity[m]))) for m in train_purity}


@torch.no_grad()
def soft_reinit_(parameters: Sequence[Tensor], initial: Sequence[Tensor], alpha: float) -> None:
    """In place: ``θ ← α·θ⁰ + (1 − α)·θ`` for each parameter and its initial value (the parameter objects, and so
    the optimizer's state for them, are kept). ``α`` enters as a float64 0-d tensor, as in the official code."""
    if len(parameters) != len(initial):
        raise ValueError(f"{len(parameters)} parameters but {len(initial)} initial values")
    weight = torch.tensor(float(alpha), dtype=torch.float64)
    for p, p0 in zip(parameters, initial):
        if p.shape != p0.shape:
            raise ValueError(f"a parameter of shape {tuple(p.shape)} has an initial value of shape {tuple(p0.shape)}")
        p.copy_(weight * p0.to(device=p.device, dtype=p.dtype) + (1 - weight) * p)


@torch.no_grad()
def pooled_features(model: nn.Module, forward: Forward, loader: Iterable) -> tuple[dict[str, Tensor], Tensor]:
    """Every modality's features and the labels over ``loader``, concatenated on the CPU: ``({m: [N, D_m]}, [N])``.

    ``forward(model, batch)`` returns ``({modality: [B, D_m] pooled encoder features}, [B] targets)``. The model
    runs in eval mode (every module's mode is restored), without gradients.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    parts: dict[str, list[Tensor]] = {}
    labels: list[Tensor] = []
    with eval_mode(model):
        for batch in loader:
            features, target = forward(model, batch)
            if not parts:
                if not isinstance(features, Mapping) or len(features) < 2:
                    raise ValueError("forward() must return a mapping of two or more modality names to features")
                parts = {m: [] for m in features}
            features = per_modality(features, list(parts), "forward()'s features")
            for m, f in features.items():
                parts[m].append(f.detach().cpu())
            labels.append(torch.as_tensor(target).detach().cpu())
    if not labels:
        raise ValueError("the loader yielded no batch")
    return {m: torch.cat(f) for m, f in parts.items()}, torch.cat(labels)


class Relearning(Method):
    """Diagnosing & Re-learning (module docstring): at the end of every ``reinit_every``-th epoch (at most
    ``max_reinits`` times), `end_epoch` diagnoses each encoder and softly re-initialises it.

    Build it **before training**: each encoder's parameters at construction are its ``θ⁰`` (kept in the
    `state_dict`, so a resumed run re-initialises towards the same values).

    Args:
        encoders: modality name → encoder (an ``nn.Module`` or an iterable of parameters), two or more, no
            parameter shared; every parameter of an encoder is re-initialised.
        num_classes: ``C``, the number of k-means clusters.
        features: ``(split) -> ({modality: [N, D_m]}, [N] labels)`` for ``split`` ``"train"`` and ``"held_out"``
            (e.g. ``lambda split: pooled_features(model, forward, loaders[split])``); the held-out split is data
            the model does not train on and **not the test split**. ``None``: call `relearn` yourself.
        reinit_strength: ``λ ≥ 0`` of ``α = tanh(λ·Δ)`` (official ``--move_lambda``, 3); 0 never re-initialises.
        reinit_every: re-initialise after epochs ``e`` with ``e % reinit_every == 0``, ``e > 0`` (official 20).
        max_reinits: at most this many times (official 3).
        n_init: k-means restarts (an int, or ``"auto"``: scikit-learn ≥ 1.4's one); default 10.
        random_state: k-means' seed (official 0).

    The history has one record per re-initialisation (``step`` = the epoch): per modality ``train_purity``,
    ``held_out_purity``, ``gap`` ``Δ`` and ``reinit`` ``α``.
    """

    kind = "epoch"
    state_version = 1

    def __init__(
        self,
        encoders: Mapping[str, Modality] | nn.ModuleDict,
        num_classes: int,
        features: Features | None = None,
        *,
        reinit_strength: float = 3.0,
        reinit_every: int = 20,
        max_reinits: int = 3,
        n_init: int | str = DEFAULT_N_INIT,
        random_state: int = 0,
    ) -> None:
        if not isinstance(encoders, (Mapping, nn.ModuleDict)) or len(encoders) < 2:
            raise ValueError(
                "encoders must be a mapping of two or more modality names to encoders (modules or parameter lists)"
            )
        self._selection = ParameterSelection(encoders, None, require_some=True)
        self.names: tuple[str, ...] = self._selection.names
        self.num_classes = _count(num_classes, "num_classes", 2)
        if features is not None and not callable(features):
            raise TypeError(
                f"features must be a callable (split) -> ({{modality: [N, D]}}, labels), got {type(features).__name__}"
            )
        self.features = features
        self.reinit_strength = real_scalar(reinit_strength, "reinit_strength")
        self.reinit_every = _count(reinit_every, "reinit_every", 1)
        self.max_reinits = _count(max_reinits, "max_reinits", 0)
        if not (n_init == "auto" or (isinstance(n_init, int) and not isinstance(n_init, bool) and n_init >= 1)):
            raise ValueError(f"n_init must be an int >= 1 or 'auto', got {n_init!r}")
        self.n_init = n_init
        self.random_state = _count(random_state, "random_state", 0)
        self._initial = [[p.detach().clone() for p in group] for group in self._selection.groups()]
        self._history = History(self.names, fields=_RECORDED, dtype=torch.float64)
        self._due = 0  # epochs that met the schedule so far (the official ``flag_reinit``)
        self._last_epoch: int | None = None

    @property
    def initial(self) -> dict[str, list[Tensor]]:
        """``θ⁰``: each encoder's parameters at construction (or as restored by `load_state_dict`)."""
        return {m: list(group) for m, group in zip(self.names, self._initial)}

    @property
    def reinits(self) -> int:
        """How many re-initialisations ran."""
        return len(self._history) + self._history.dropped

    # ------------------------------------------------------------------ epochs
    def end_epoch(self, epoch: int) -> None:
        """After epoch ``epoch``: when it is due, diagnose with ``features`` and re-initialise (`relearn`)."""
        epoch = _count(epoch, "epoch", 0)
        if self._last_epoch is not None and epoch <= self._last_epoch:
            self._warn_once(
                "repeated-epoch",
                f"end_epoch({epoch}) came after end_epoch({self._last_epoch}); it is ignored: call end_epoch once per "
                "epoch, with increasing epochs",
                stacklevel=3,
            )
            return
        self._last_epoch = epoch
        if not (epoch > 0 and epoch % self.reinit_every == 0):
            return
        self._due += 1
        if self._due > self.max_reinits:
            return
        if self.features is None:
            self._warn_once(
                "no-features",
                f"epoch {epoch} is due for a diagnosis but no features= callable was given: build Relearning with "
                "features=(split) -> (features, labels), or call relearn(...) yourself",
                stacklevel=3,
            )
            return
        train, train_labels = self.features("train")
        held_out, held_out_labels = self.features("held_out")
        self._relearn(train, train_labels, held_out, held_out_labels, epoch)

    def relearn(
        self,
        train: Mapping[str, Tensor],
        train_labels: Tensor,
        held_out: Mapping[str, Tensor],
        held_out_labels: Tensor,
    ) -> dict[str, float]:
        """Diagnose every encoder from its features on the two splits and re-initialise it; returns ``{m: α_m}``.

        What `end_epoch` does on a due epoch; call it yourself without ``features=``.
        """
        return self._relearn(train, train_labels, held_out, held_out_labels, self._last_epoch or 0)

    def _relearn(
        self,
        train: Mapping[str, Tensor],
        train_labels: Tensor,
        held_out: Mapping[str, Tensor],
        held_out_labels: Tensor,
        epoch: int,
    ) -> dict[str, float]:
        train = per_modality(train, self.names, "the training features")
        held_out = per_modality(held_out, self.names, "the held-out features")
        for split, values, labels in (("training", train, train_labels), ("held-out", held_out, held_out_labels)):
            for m in self.names:
                if not isinstance(values[m], Tensor) or values[m].dim() != 2 or values[m].shape[0] != len(labels):
                    shape = tuple(values[m].shape) if isinstance(values[m], Tensor) else type(values[m]).__name__
                    raise ValueError(
                        f"the {split} features of {m!r} must be [N, D] with N = {len(labels)} labels, got {shape}"
                    )
        same = [m for m in self.names if train[m].shape == held_out[m].shape and torch.equal(train[m], held_out[m])]
        if same:
            self._warn_once(
                "same-split",
                f"the held-out features of {same} equal the training features, so their gap is 0: give features of "
                "held-out samples (not the training split, and not the test split)",
                stacklevel=4,
            )
        options = {"n_init": self.n_init, "random_state": self.random_state}
        p_train = {m: cluster_purity(train[m], train_labels, self.num_classes, **options) for m in self.names}
        p_held = {m: cluster_purity(held_out[m], held_out_labels, self.num_classes, **options) for m in self.names}
        if distributed():
            p_train, p_held = _rank_means(p_train), _rank_means(p_held)
        alpha = reinit_coefficients(p_train, p_held, self.reinit_strength)
        for m, params, initial in zip(self.names, self._selection.groups(), self._initial):
            soft_reinit_(params, initial, alpha[m])
        nearly = [m for m in self.names if alpha[m] >= NEARLY_RESET]
        if nearly:
            self._warn_once(
                "nearly-reset",
                f"the encoders of {nearly} were pulled {NEARLY_RESET:.0%} or more of the way back to their initial "
                "parameters (α = tanh(λ·Δ)); a smaller reinit_strength re-initialises less",
                stacklevel=4,
            )
        rows = [[table[m] for m in self.names] for table in (p_train, p_held)]
        rows += [[abs(p_train[m] - p_held[m]) for m in self.names], [alpha[m] for m in self.names]]
        self._history.append(epoch, [torch.tensor(row, dtype=torch.float64) for row in rows])
        return alpha

    # ------------------------------------------------------------------ state
    def _extra_state(self) -> dict[str, Any]:
        """``θ⁰``, the schedule's counters and the warnings shown."""
        return {
            "initial": {m: [p.clone() for p in group] for m, group in zip(self.names, self._initial)},
            "due": self._due,
            "last_epoch": self._last_epoch,
            "warned": sorted(self.__dict__.get("_warned", ())),
        }

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        initial = per_modality(state["initial"], self.names, "the saved initial parameters")
        restored = []
        for m, group in zip(self.names, self._selection.groups()):
            saved = list(initial[m])
            shapes = [tuple(p.shape) for p in group]
            if [tuple(t.shape) for t in saved] != shapes:
                raise ValueError(f"the saved initial parameters of {m!r} do not fit its encoder (shapes {shapes})")
            restored.append([torch.as_tensor(t).detach().clone() for t in saved])
        self._initial = restored
        self._due = int(state["due"])
        self._last_epoch = None if state["last_epoch"] is None else int(state["last_epoch"])
        self._warned = set(state["warned"])

    def _reset(self) -> None:
        """The schedule starts over (``θ⁰`` stays: it is the encoders' start, not something learnt)."""
        self._due = 0
        self._last_epoch = None
        self._warned = set()

    def __repr__(self) -> str:
        return (
            f"Relearning(modalities={list(self.names)}, num_classes={self.num_classes}, reinit_strength="
            f"{self.reinit_strength:g}, reinit_every={self.reinit_every}, max_reinits={self.max_reinits}, "
            f"n_init={self.n_init!r})"
        )


def _rank_means(values: Mapping[str, float]) -> dict[str, float]:
    """Each value's mean over the ranks of ``torch.distributed`` (one all-reduce of ``len(values)`` numbers)."""
    total = torch.tensor(list(values.values()), dtype=torch.float64, device=collective_device(torch.device("cpu")))
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return dict(zip(values, (total / dist.get_world_size()).tolist()))


def _count(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


METHODS = (
    MethodInfo(
        key="relearning",
        preset=Relearning,
        title="Diagnosing & Re-learning",
        kind="epoch",
        paper="Wei, Li, Feng & Hu, Diagnosing and Re-learning for Balanced Multimodal Learning, ECCV 2024",
        page="methods/relearning.md",
        observes="every reinit_every epochs: each encoder's pooled features on the training and a held-out split",
        cost="no per-step cost; per re-initialisation one encoder pass over both splits and 2M k-means fits",
        fit=Fit(head="any", acts_on="parameters"),
        strength=Strength(
            "reinit_strength", 3.0, "λ of α = tanh(λ·Δ): how far a purity gap pulls an encoder back to its start"
        ),
        options=(
            Option("reinit_every", 20, "diagnose and re-initialise after every this many epochs", int),
            Option("max_reinits", 3, "re-initialise at most this many times", int),
            Option(
                "holdout",
                0.1,
                "share of the training split held out for the diagnosis (never the test split)",
                float,
                loop=True,
            ),
        ),
    ),
)
