"""The report: `Diagnosis` holds the measurements and says what they mean; `diagnose` measures them.

A `Diagnosis` keeps only measurements — held-out accuracies (coalitions, masked, decoupled, linear
probes, solo runs), the monitor's per-epoch summaries, the loop's description, a trial — and derives the
rest when asked: the Shapley values and conditional utilisation from the coalitions, the verdict
(`gradmod.diagnose.verdict`), the table of methods that fit the loop (`gradmod.diagnose.fit`), what the
benchmarks measured on data with a similar profile (`gradmod.diagnose.benchmarks`). `summary` writes it
as text, `figure` plots the monitor's epochs, `to_json` / `from_json` round-trip the measurements.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradmod._internal import check_names, real_scalar
from gradmod.diagnose import evaluation as E
from gradmod.diagnose.benchmarks import similar_benchmarks
from gradmod.diagnose.fit import FitTable, Loop, fit_table
from gradmod.diagnose.monitor import Monitor
from gradmod.diagnose.trial import Trial
from gradmod.diagnose.verdict import DEFAULT_THRESHOLD, Verdict, decide
from gradmod.functional import coalitions as all_coalitions
from gradmod.method import check_units

__all__ = ["SCHEMA", "Diagnosis", "diagnose"]

#: The version of `Diagnosis.to_json`'s layout.
SCHEMA = 1
_PER_MODALITY = ("masked", "decoupled", "probe", "solo")
_LABELS = {
    "masked": "masked (the other modalities' {masking} zeroed)",
    "decoupled": "decoupled logits",
    "probe": "linear probe of the frozen encoder",
    "solo": "the encoder trained alone",
}
_MASKINGS = (None, "inputs", "features")
_EPOCH_FIELDS = ("ratios", "grad_to_weight", "share", "grad_norm")


def _accuracy_map(values: Any, names: Sequence[str], what: str) -> dict[str, float] | None:
    if values is None:
        return None
    if not isinstance(values, Mapping):
        raise TypeError(f"Diagnosis.{what} must be a mapping modality -> accuracy, got {type(values).__name__}")
    check_names(values, names, f"Diagnosis.{what}")
    out = {}
    for name in names:
        value = float(values[name])
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"Diagnosis.{what}[{name!r}] must be an accuracy in [0, 1], got {values[name]!r}")
        out[name] = value
    return out


def _none_if_nan(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else value


@dataclass
class Diagnosis:
    """The measurements of one model, and what they say.

    Attributes:
        names: the modalities.
        samples: held-out rows the accuracies were measured on (sets the noise margin of the verdict).
        coalitions: fused accuracy ``v(S)`` per subset ``S`` of present modalities (`coalition_accuracy`).
        masking: what was zeroed for absent modalities: ``"inputs"`` or ``"features"``.
        masked, decoupled, probe, solo: accuracy per modality (`masked_accuracy`, `decoupled_accuracy`,
            `linear_probe`, `solo_accuracy`); ``masked`` is read from ``coalitions`` when not given.
        monitor: the `Monitor`'s per-epoch summaries (`Monitor.epochs`).
        measure: the monitor's measure (class name: ``"SoftmaxScore"``, ``"DGMScore"``, ``"ZetaGate"``).
        loop: the training loop's description, for the table of methods that fit it.
        trial: a `trial` of methods on the loop.
        threshold: the smallest accuracy difference the verdict counts (`gradmod.diagnose.verdict`).
    """

    names: tuple[str, ...]
    samples: int | None = None
    coalitions: dict[frozenset, float] | None = None
    masking: str | None = None
    masked: dict[str, float] | None = None
    decoupled: dict[str, float] | None = None
    probe: dict[str, float] | None = None
    solo: dict[str, float] | None = None
    monitor: list[dict[str, Any]] | None = None
    measure: str | None = None
    loop: Loop | None = None
    trial: Trial | None = None
    threshold: float = DEFAULT_THRESHOLD

    def __post_init__(self) -> None:
        self.names = check_units(tuple(self.names), "Diagnosis.names")
        if self.samples is not None and (isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1):
            raise ValueError(f"Diagnosis.samples must be None or an int >= 1, got {self.samples!r}")
        if self.masking not in _MASKINGS:
            raise ValueError(f"Diagnosis.masking must be one of {list(_MASKINGS)}, got {self.masking!r}")
        if self.coalitions is not None:
            table = {}
            for subset, value in self.coalitions.items():
                subset = frozenset(subset)
                if not subset <= set(self.names):
                    raise ValueError(f"Diagnosis.coalitions: subset {sorted(subset)} names modalities outside {list(self.names)}")
                table[subset] = float(value)
                if not 0.0 <= table[subset] <= 1.0:
                    raise ValueError(f"Diagnosis.coalitions[{sorted(subset)}] must be an accuracy in [0, 1], got {value!r}")
            self.coalitions = table
            if self.masked is None and all(frozenset({n}) in table for n in self.names):
                self.masked = {n: table[frozenset({n})] for n in self.names}
        for what in _PER_MODALITY:
            setattr(self, what, _accuracy_map(getattr(self, what), self.names, what))
        if self.loop is not None and not isinstance(self.loop, Loop):
            raise TypeError(f"Diagnosis.loop must be a gradmod.diagnose.Loop, got {type(self.loop).__name__}")
        if self.trial is not None and not isinstance(self.trial, Trial):
            raise TypeError(f"Diagnosis.trial must be a gradmod.diagnose.Trial, got {type(self.trial).__name__}")
        self.threshold = real_scalar(self.threshold, "threshold")
        if self.monitor is not None:
            self.monitor = [dict(epoch) for epoch in self.monitor]
            for epoch in self.monitor:
                for field in _EPOCH_FIELDS:
                    check_names(epoch.get(field, {}), self.names, f"Diagnosis.monitor epoch {epoch.get('epoch')} {field}")

    # ------------------------------------------------------------------ derived
    @property
    def fused(self) -> float | None:
        """Fused held-out accuracy, ``v(all)``."""
        return None if self.coalitions is None else self.coalitions.get(frozenset(self.names))

    @property
    def shapley(self) -> dict[str, float] | None:
        """Shapley value of accuracy per modality (`shapley_of`), when all ``2^M`` coalitions were measured."""
        if self.coalitions is None or any(s not in self.coalitions for s in all_coalitions(self.names)):
            return None
        return E.shapley_of(self.coalitions, self.names)

    @property
    def utilization(self) -> dict[str, float] | None:
        """Conditional utilisation per modality (`conditional_utilization`), when its coalitions were measured."""
        every = frozenset(self.names)
        needed = [every, *(every - {n} for n in self.names)]
        if self.coalitions is None or any(s not in self.coalitions for s in needed) or self.coalitions[every] == 0:
            return None
        return E.conditional_utilization(self.coalitions, self.names)

    @property
    def last_epoch(self) -> dict[str, Any] | None:
        """The monitor's last summary."""
        return self.monitor[-1] if self.monitor else None

    @property
    def verdict(self) -> Verdict:
        """The verdict (`gradmod.diagnose.verdict.decide`) of these measurements."""
        last = self.last_epoch
        return decide(
            self.names,
            probe=self.probe,
            masked=self.masked,
            decoupled=self.decoupled,
            solo=self.solo,
            samples=self.samples,
            ratios=None if last is None else last["ratios"],
            share=None if last is None else {n: v for n, v in last["share"].items() if v is not None and math.isfinite(v)} or None,
            measure=self.measure,
            threshold=self.threshold,
        )

    def fit_table(self) -> FitTable | None:
        """The methods of `gradmod.METHODS` against `loop` (`gradmod.diagnose.fit_table`), or ``None``."""
        return None if self.loop is None else fit_table(self.loop)

    def benchmarks(self) -> list[str]:
        """What the bundled benchmarks measured on the datasets whose profile is closest to this one."""
        verdict = self.verdict
        weak = verdict.weak
        agrees = None if verdict.batch_dominant is None or weak is None else verdict.batch_dominant != weak
        return similar_benchmarks(agrees=agrees, gap=verdict.weak_deficit)

    # ------------------------------------------------------------------ text and figure
    def summary(self) -> str:
        """The report as text: verdict, measurements, monitor epochs, methods for the loop, benchmarks, trial."""
        verdict = self.verdict
        out = [f"gradmod diagnosis of {', '.join(self.names)}: {verdict.headline}", "", "Verdict:"]
        out += [f"- {line}" for line in verdict.lines] or ["- nothing measured"]
        out += ["", "Measurements" + (f" (held-out, {self.samples} samples):" if self.samples else " (held-out):")]
        if self.fused is not None:
            out.append(f"- fused accuracy: {100 * self.fused:.1f} %")
        for what in _PER_MODALITY:
            values = getattr(self, what)
            if values is not None:
                label = _LABELS[what].format(masking=self.masking or "inputs or features")
                out.append(f"- {label}: " + ", ".join(f"{n} {100 * v:.1f} %" for n, v in values.items()))
        shapley = self.shapley
        if shapley is not None:
            empty = self.coalitions[frozenset()]
            total = self.fused - empty
            out.append(
                "- Shapley values of accuracy: " + ", ".join(f"{n} {v:+.3f}" for n, v in shapley.items())
                + f" (they add up to v(all) − v(∅) = {self.fused:.3f} − {empty:.3f} = {total:.3f}; "
                f"{2 ** len(self.names)} coalitions evaluated)"
            )
        utilization = self.utilization
        if utilization is not None:
            out.append(
                "- conditional utilisation u(m) = (v(all) − v(all without m)) / v(all): "
                + ", ".join(f"{n} {v:.3f}" for n, v in utilization.items())
            )
        if self.monitor:
            out += ["", f"Monitor, per epoch (measure {self.measure or 'none'}):", self._epoch_table()]
        table = self.fit_table()
        if table is not None:
            out += ["", "Methods for this loop:", table.text()]
            out += [f"- {effect.sentence()}" for effect in table.scaling]
        out += ["", "Benchmarks on data with a similar profile:"] + [f"- {line}" for line in self.benchmarks()]
        if self.trial is not None:
            out += ["", f"Trial on this loop ({len(self.trial.seeds)} seeds, budget {self.trial.budget}):", self.trial.text()]
        return "\n".join(out)

    def _epoch_table(self) -> str:
        head = ["epoch", "steps", *(f"ρ {n}" for n in self.names), *(f"share {n}" for n in self.names)]
        lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for epoch in self.monitor:
            cells = ["all" if epoch.get("epoch") is None else str(epoch["epoch"]), str(epoch.get("steps", ""))]
            cells += [_cell(epoch["ratios"][n], "{:.2f}") for n in self.names]
            cells += [_cell(epoch["share"][n], "{:.1f} %", 100) for n in self.names]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def figure(self, path: str | Path | None = None) -> Any:
        """Per-epoch curves of the monitor: each modality's mean score ratio ρ (top) and share of
        ``Σ‖g‖/‖w‖`` (bottom). Returns the matplotlib ``Figure`` (saved to ``path`` when given)."""
        try:
            from matplotlib.figure import Figure
            from matplotlib.ticker import MaxNLocator
        except ImportError as error:
            raise ImportError("Diagnosis.figure needs matplotlib: pip install 'gradmod[plot]'") from error
        epochs = [e for e in self.monitor or [] if e.get("epoch") is not None]
        if not epochs:
            raise ValueError(
                "Diagnosis.figure plots the monitor's per-epoch summaries, and this diagnosis has none: pass "
                "monitor= to diagnose() and call monitor.end_epoch(epoch) after each epoch"
            )
        figure = Figure(figsize=(7, 5))
        top, bottom = figure.subplots(2, 1, sharex=True)
        x = [e["epoch"] for e in epochs]
        for name in self.names:
            top.plot(x, [_nan(e["ratios"][name]) for e in epochs], marker="o", label=name)
            bottom.plot(x, [_nan(e["share"][name]) for e in epochs], marker="o", label=name)
        top.axhline(1.0, color="grey", linewidth=0.8)
        top.set_ylabel(f"score ratio ρ ({self.measure or 'no measure'})")
        bottom.set_ylabel("share of Σ‖g‖/‖w‖")
        bottom.set_ylim(0.0, 1.0)
        bottom.set_xlabel("epoch")
        bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
        top.legend()
        figure.tight_layout()
        if path is not None:
            figure.savefig(path, dpi=120)
        return figure

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """The measurements as JSON-ready values (non-finite numbers as ``null``), and the verdict for readers
        (``from_dict`` ignores it and derives it anew)."""
        monitor = None
        if self.monitor is not None:
            monitor = [
                {k: ({n: _none_if_nan(v) for n, v in val.items()} if isinstance(val, Mapping) else val) for k, val in e.items()}
                for e in self.monitor
            ]
        coalitions = None
        if self.coalitions is not None:
            order = {n: i for i, n in enumerate(self.names)}
            coalitions = [
                {"present": sorted(s, key=order.__getitem__), "accuracy": v}
                for s, v in sorted(self.coalitions.items(), key=lambda item: (len(item[0]), sorted(map(order.get, item[0]))))
            ]
        return {
            "schema": SCHEMA,
            "names": list(self.names),
            "samples": self.samples,
            "coalitions": coalitions,
            "masking": self.masking,
            **{what: getattr(self, what) for what in _PER_MODALITY},
            "monitor": monitor,
            "measure": self.measure,
            "loop": None if self.loop is None else self.loop.to_dict(),
            "trial": None if self.trial is None else self.trial.to_dict(),
            "threshold": self.threshold,
            "verdict": self.verdict.to_dict(),
        }

    def to_json(self, path: str | Path | None = None, indent: int = 2) -> str:
        """`to_dict` as JSON text (written to ``path`` when given)."""
        text = json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Diagnosis:
        version = data.get("schema")
        if not isinstance(version, int) or version > SCHEMA:
            raise ValueError(f"this diagnosis has schema {version!r}, newer than this gradmod reads ({SCHEMA}): upgrade gradmod")
        monitor = data.get("monitor")
        if monitor is not None:
            monitor = [
                {k: ({n: (math.nan if v is None else v) for n, v in val.items()} if isinstance(val, Mapping) else val) for k, val in e.items()}
                for e in monitor
            ]
        coalitions = data.get("coalitions")
        return cls(
            names=tuple(data["names"]),
            samples=data.get("samples"),
            coalitions=None if coalitions is None else {frozenset(c["present"]): c["accuracy"] for c in coalitions},
            masking=data.get("masking"),
            **{what: data.get(what) for what in _PER_MODALITY},
            monitor=monitor,
            measure=data.get("measure"),
            loop=None if data.get("loop") is None else Loop.from_dict(data["loop"]),
            trial=None if data.get("trial") is None else Trial.from_dict(data["trial"]),
            threshold=data.get("threshold", DEFAULT_THRESHOLD),
        )

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> Diagnosis:
        """A diagnosis from `to_json`'s text, or from the file it was written to."""
        text = str(text_or_path)
        if isinstance(text_or_path, Path) or not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text(encoding="utf-8")
        return cls.from_dict(json.loads(text))


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def _cell(value: float | None, pattern: str, scale: float = 1.0) -> str:
    return "—" if value is None or not math.isfinite(value) else pattern.format(scale * value)


def diagnose(
    names: Sequence[str],
    test_loader: Iterable[Any],
    *,
    forward: Any = None,
    encode: Any = None,
    head: Any = None,
    mask: E.Mask | None = None,
    unimodal_logits: Any = None,
    train_loader: Iterable[Any] | None = None,
    probe: bool | None = None,
    probe_steps: int = 100,
    solo: Any = None,
    trained: Any = None,
    solo_steps: int = 200,
    classes: int | None = None,
    shapley: bool = True,
    monitor: Monitor | None = None,
    loop: Loop | None = None,
    trial: Trial | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    seed: int = 0,
    batch_of: E.BatchOf | None = None,
    device: torch.device | str | None = None,
    modules: Iterable[nn.Module] = (),
) -> Diagnosis:
    """Measure what is given and return the `Diagnosis`.

    * ``forward`` (+ ``mask``) or ``encode`` + ``head``: the coalition accuracies on ``test_loader`` —
      all ``2^M`` subsets when ``shapley`` (the Shapley values), else the M singletons and the full set;
    * ``unimodal_logits``: the decoupled accuracies;
    * ``encode`` and ``train_loader``: linear probes (``probe=None`` runs them when both are given;
      ``True`` requires them), ``probe_steps`` L-BFGS iterations;
    * ``solo`` (a factory ``name -> fresh encoder``, trained here for ``solo_steps`` SGD steps on
      ``train_loader``) or ``trained`` (``name -> your solo predictor``): the solo accuracies — opt-in;
    * ``monitor``: its epoch summaries (or one summary of all its steps when no epoch was ended);
    * ``loop``, ``trial``, ``threshold``: kept as given.

    ``modules``: the models your callables call, put in eval mode during the evaluation (callables that are
    modules or bound methods of one are found by themselves). ``classes=None`` takes the class count from
    the fused logits. ``seed`` seeds the probes' subsampling
    and the solo training. Costs: see `gradmod.diagnose.evaluation`.
    """
    names = check_units(tuple(names), "names")
    modules = tuple(modules)
    feed = E._Feed(batch_of, device, modules)
    samples = classes_seen = None
    coalitions = masking = decoupled = probes = solos = None
    if forward is not None or head is not None:  # encode alone serves the probes
        subsets = None if shapley else [frozenset({n}) for n in names] + [frozenset(names)]
        model_encode = None if forward is not None else encode
        tally = E._coalition_tally(test_loader, names, forward, model_encode, head, mask, subsets, feed)
        coalitions, samples, classes_seen = tally.accuracies(), tally.samples, tally.classes
        masking = "inputs" if forward is not None else "features"
    if unimodal_logits is not None:
        tally = E._decoupled_tally(test_loader, names, unimodal_logits, feed)
        decoupled, samples, classes_seen = tally.accuracies(), samples or tally.samples, classes_seen or tally.classes
    count = classes if classes is not None else classes_seen
    if probe or (probe is None and encode is not None and train_loader is not None):
        if encode is None or train_loader is None:
            raise TypeError("diagnose(probe=True) fits linear probes on encoder features: it needs encode= and train_loader=")
        probes = E.linear_probe(encode, train_loader, test_loader, names, classes=count, steps=probe_steps, seed=seed,
                                batch_of=batch_of, device=device, modules=modules)
    if solo is not None or trained is not None:
        if solo is not None and count is None:
            raise TypeError("diagnose(solo=...) trains heads of classes outputs: pass classes= (or forward= to read it)")
        solos = E.solo_accuracy(test_loader, names, factory=solo, trained=trained, train_loader=train_loader, classes=count,
                                steps=solo_steps, seed=seed, batch_of=batch_of, device=device)
    epochs = measure = None
    if monitor is not None:
        if not isinstance(monitor, Monitor):
            raise TypeError(f"monitor must be a gradmod.diagnose.Monitor, got {type(monitor).__name__}")
        check_names(monitor.names, names, "the monitor's modalities")
        epochs = monitor.epochs or [s for s in [monitor.summary()] if s is not None] or None
        measure = None if monitor.measure is None else type(monitor.measure).__name__
    return Diagnosis(
        names, samples=samples, coalitions=coalitions, masking=masking, decoupled=decoupled, probe=probes, solo=solos,
        monitor=epochs, measure=measure, loop=loop, trial=trial, threshold=threshold,
    )
