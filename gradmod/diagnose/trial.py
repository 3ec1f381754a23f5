"""A trial on your own loop: the applicable methods and the baseline, side by side, over seeds.

The accuracy benchmark's protocol in miniature: every method (and the baseline, ``None``) is trained by
your ``train(method_key, budget)`` once per seed, from ``torch.manual_seed(seed)``, and scored by your
``evaluate(model) -> (fused accuracy, {modality: accuracy})`` on held-out data. The weak modality is the
baseline's least accurate one (mean over seeds) unless you name it; its *lift* under a method is its
accuracy minus the baseline's, paired by seed. Results are mean ± sample standard deviation over seeds.
Cost: ``(1 + number of methods) × seeds`` training runs of your budget.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gradmod.diagnose.fit import FitTable

__all__ = ["Trial", "TrialRow", "trial"]


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _shown(values: Sequence[float], signed: bool = False) -> str:
    mean, std = _mean_std(values)
    text = f"{100 * mean:+.1f}" if signed else f"{100 * mean:.1f}"
    return text if std is None else f"{text} ± {100 * std:.1f}"


@dataclass(frozen=True)
class TrialRow:
    """One method (``key=None``: the baseline) over the seeds: fused and weak-modality accuracies per seed,
    and the weak modality's lift over the baseline per seed (empty for the baseline)."""

    key: str | None
    fused: tuple[float, ...]
    weak: tuple[float, ...]
    lift: tuple[float, ...] = ()

    def summary(self) -> dict[str, Any]:
        """``{"fused": {"mean", "std"}, "weak": ..., "lift": ...}`` (the schema of ``benchmarks.json``)."""
        out = {}
        for name, values in (("fused", self.fused), ("weak", self.weak), ("lift", self.lift)):
            if values:
                mean, std = _mean_std(values)
                out[name] = {"mean": mean, "std": std}
        return out


@dataclass(frozen=True)
class Trial:
    """The result of `trial`: the weak modality, the budget and seeds, one `TrialRow` per method."""

    weak_modality: str
    budget: Any
    seeds: tuple[int, ...]
    rows: tuple[TrialRow, ...]

    def text(self) -> str:
        """A markdown table of fused accuracy, the weak modality's accuracy and its lift, in %."""
        lines = [
            f"| method | fused % | {self.weak_modality} % | lift of {self.weak_modality} (points) |",
            "| --- | --- | --- | --- |",
        ]
        for row in self.rows:
            lift = _shown(row.lift, signed=True) if row.lift else "—"
            lines.append(f"| {row.key or 'baseline'} | {_shown(row.fused)} | {_shown(row.weak)} | {lift} |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "weak_modality": self.weak_modality,
            "budget": self.budget,
            "seeds": list(self.seeds),
            "rows": [{"key": r.key, "fused": list(r.fused), "weak": list(r.weak), "lift": list(r.lift)} for r in self.rows],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Trial:
        rows = tuple(TrialRow(r["key"], tuple(r["fused"]), tuple(r["weak"]), tuple(r["lift"])) for r in data["rows"])
        return cls(data["weak_modality"], data["budget"], tuple(data["seeds"]), rows)


def _checked_score(result: Any, key: str | None) -> tuple[float, dict[str, float]]:
    who = "the baseline" if key is None else f"method {key!r}"
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], Mapping)):
        raise TypeError(f"evaluate(model) for {who} must return (fused accuracy, {{modality: accuracy}}), got {result!r}")
    fused, per = float(result[0]), {name: float(value) for name, value in result[1].items()}
    if not all(math.isfinite(v) for v in (fused, *per.values())):
        raise ValueError(f"evaluate(model) for {who} returned a non-finite accuracy: {result!r}")
    return fused, per


def trial(
    train: Callable[[str | None, Any], Any],
    evaluate: Callable[[Any], tuple[float, Mapping[str, float]]],
    methods: Iterable[str] | FitTable,
    *,
    budget: Any,
    seeds: Sequence[int] = (0, 1, 2),
    weak: str | None = None,
) -> Trial:
    """Train and score the baseline and each method over ``seeds`` (module docstring).

    ``methods``: keys of `gradmod.METHODS`, or a `gradmod.diagnose.FitTable` (its methods that fit).
    ``train(key, budget)`` returns the trained model (``key=None``: no method); torch's random state is
    set by ``torch.manual_seed(seed)`` before each call and restored after the trial, so derive other
    seeds (data order, numpy) from ``torch.initial_seed()``.
    """
    from gradmod.methods import METHODS

    keys = methods.keys("fits") if isinstance(methods, FitTable) else list(methods)
    unknown = [key for key in keys if key not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; gradmod.METHODS has {sorted(METHODS)}")
    seeds = tuple(int(s) for s in seeds)
    if not seeds:
        raise ValueError("trial needs at least one seed")
    scores: dict[str | None, list[tuple[float, dict[str, float]]]] = {}
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        for key in [None, *keys]:
            scores[key] = []
            for seed in seeds:
                torch.manual_seed(seed)
                scores[key].append(_checked_score(evaluate(train(key, budget)), key))
    base = scores[None]
    names = list(base[0][1])
    if weak is None:
        weak = min(names, key=lambda n: statistics.fmean(per[n] for _, per in base))
    for key, runs in scores.items():
        if any(weak not in per for _, per in runs):
            raise ValueError(f"evaluate(model) for {key or 'the baseline'} gave no accuracy for the weak modality {weak!r}")
    rows = []
    for key, runs in scores.items():
        fused = tuple(f for f, _ in runs)
        weak_acc = tuple(per[weak] for _, per in runs)
        lift = () if key is None else tuple(w - per[weak] for w, (_, per) in zip(weak_acc, base))
        rows.append(TrialRow(key, fused, weak_acc, lift))
    return Trial(weak, budget, seeds, tuple(rows))
