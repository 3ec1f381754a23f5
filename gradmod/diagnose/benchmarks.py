"""What the benchmarks measured on data with an imbalance profile like yours: ``benchmarks.json``.

The file ships with the package (``gradmod/diagnose/benchmarks.json``); the accuracy benchmark writes it.
Schema version 1 (every number a fraction in ``[0, 1]`` unless said otherwise; ``{"mean", "std"}`` over the
seeds, ``std`` the sample standard deviation, ``null`` for one seed)::

    {
      "schema": 1,
      "measured": true,                 # false: a placeholder, nothing in it was measured
      "note": "free text",
      "datasets": {
        "<dataset>": {
          "measured": true,
          "modalities": ["audio", "visual"],
          "seeds": 3,                   # runs per method
          "budget": "30 epochs",        # free text: the training budget of every run
          "profile": {                  # the baseline's imbalance
            "batch_dominant": "audio",  # largest mean score ratio ρ over the baseline's last epoch
            "batch_ratio": 2.0,         # that ρ (a ratio, not a fraction)
            "under_trained": "visual",  # largest deficit against its solo run (null: none)
            "basis": "masked",          # which joint accuracy: "probe", "masked" or "decoupled"
            "joint": 0.55,              # the under-trained modality's joint accuracy (basis)
            "solo": 0.70,               # its accuracy trained alone, same budget
            "gap": 0.15                 # solo - joint
          },
          "baseline": {"fused": {"mean": 0.80, "std": 0.01}, "weak": {"mean": 0.55, "std": 0.02}},
          "methods": {                  # keys of gradmod.METHODS
            "ogm_ge": {
              "fused": {"mean": 0.82, "std": 0.01},   # fused held-out accuracy
              "weak": {"mean": 0.61, "std": 0.02},    # the under-trained modality's accuracy (basis)
              "lift": {"mean": 0.06, "std": 0.01}     # weak - the baseline's weak, paired by seed
            }
          }
        }
      }
    }

`load_benchmarks` reads and checks it; `similar_benchmarks` picks the measured datasets whose profile is
closest to yours and says what each method did there.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["BASES", "SCHEMA", "load_benchmarks", "similar_benchmarks", "validate_benchmarks"]

#: The schema version this module reads.
SCHEMA = 1
#: The joint accuracies a profile may compare with the solo run.
BASES = ("probe", "masked", "decoupled")


def _require(condition: bool, message: str) -> None:
    """A malformed file is a ``ValueError`` naming the field (its content, not a caller's argument, is wrong)."""
    if not condition:
        raise ValueError(f"benchmarks.json: {message}")


def _number(value: Any, where: str, *, fraction: bool = True) -> None:
    real = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    _require(real, f"{where} must be a finite number, got {value!r}")
    _require(not fraction or -1.0 <= value <= 1.0, f"{where} must be a fraction (accuracies in [0, 1], lifts in [-1, 1]), got {value!r}")


def _statistic(value: Any, where: str) -> None:
    shaped = isinstance(value, Mapping) and "mean" in value and "std" in value
    _require(shaped, f"{where} must be {{'mean': number, 'std': number or null}}, got {value!r}")
    _number(value["mean"], f"{where}.mean")
    if value["std"] is not None:
        _number(value["std"], f"{where}.std")


def _count(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int)


def validate_benchmarks(data: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the first field of ``data`` that breaks the schema (module docstring).

    Datasets marked ``"measured": false`` may hold ``null`` numbers; measured ones must hold every number.
    """
    _require(isinstance(data, Mapping), f"the file must hold an object, got {type(data).__name__}")
    version = data.get("schema")
    _require(_count(version) and version >= 1, f"'schema' must be an int >= 1, got {version!r}")
    _require(version <= SCHEMA, f"schema {version} is newer than this gradmod reads ({SCHEMA}): upgrade gradmod")
    _require(isinstance(data.get("measured"), bool), "'measured' must be true or false")
    datasets = data.get("datasets")
    _require(isinstance(datasets, Mapping), "'datasets' must be an object")
    for name, entry in datasets.items():
        where = f"datasets.{name}"
        _require(isinstance(entry, Mapping) and isinstance(entry.get("measured"), bool), f"{where}.measured must be true or false")
        modalities = entry.get("modalities")
        named = isinstance(modalities, list) and len(modalities) >= 2 and all(isinstance(m, str) for m in modalities)
        _require(named, f"{where}.modalities must list two or more names")
        if not entry["measured"]:
            continue
        _require(data["measured"], f"{where} is measured but the file says 'measured': false")
        seeds = entry.get("seeds")
        _require(_count(seeds) and seeds >= 1, f"{where}.seeds must be an int >= 1, got {seeds!r}")
        profile = entry.get("profile")
        _require(isinstance(profile, Mapping), f"{where}.profile must be an object")
        for key in ("batch_dominant", "under_trained"):
            value = profile.get(key)
            allowed = value in modalities or (value is None and key == "under_trained")
            _require(allowed, f"{where}.profile.{key} must be one of {modalities}, got {value!r}")
        _number(profile.get("batch_ratio"), f"{where}.profile.batch_ratio", fraction=False)
        if profile.get("under_trained") is not None:
            basis = profile.get("basis")
            _require(basis in BASES, f"{where}.profile.basis must be one of {BASES}, got {basis!r}")
            for key in ("joint", "solo", "gap"):
                _number(profile.get(key), f"{where}.profile.{key}")
        baseline = entry.get("baseline")
        _require(isinstance(baseline, Mapping), f"{where}.baseline must be an object")
        for key in ("fused", "weak"):
            _statistic(baseline.get(key), f"{where}.baseline.{key}")
        methods = entry.get("methods")
        _require(isinstance(methods, Mapping), f"{where}.methods must be an object")
        for key, result in methods.items():
            _require(isinstance(result, Mapping), f"{where}.methods.{key} must be an object")
            for stat in ("fused", "weak", "lift"):
                _statistic(result.get(stat), f"{where}.methods.{key}.{stat}")


def load_benchmarks(path: str | Path | None = None) -> dict[str, Any]:
    """The benchmark results: ``path``, or the ``benchmarks.json`` shipped in `gradmod.diagnose`; checked
    with `validate_benchmarks`."""
    if path is None:
        text = resources.files("gradmod.diagnose").joinpath("benchmarks.json").read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    data = json.loads(text)
    validate_benchmarks(data)
    return data


def _stat(value: Mapping[str, Any], scale: float = 100.0, signed: bool = False) -> str:
    mean = f"{value['mean'] * scale:+.1f}" if signed else f"{value['mean'] * scale:.1f}"
    return mean if value["std"] is None else f"{mean} ± {value['std'] * scale:.1f}"


def similar_benchmarks(
    *, agrees: bool | None, gap: float | None, data: Mapping[str, Any] | None = None, limit: int = 2
) -> list[str]:
    """Sentences on the measured datasets closest to a profile, or one sentence saying none is measured.

    A dataset matches when its batch ratio and its solo comparison relate as yours do (``agrees``: the
    modality the batch ratio calls dominant is not the under-trained one; ``None`` matches any); the
    matches are ordered by how close their ``gap`` (solo − joint of the under-trained modality) is to
    ``gap`` (``None``: file order). Each sentence gives the profile and every method's lift of the weak
    modality and fused accuracy, in points, mean ± std over the seeds.
    """
    data = load_benchmarks() if data is None else data
    validate_benchmarks(data)
    measured = {name: entry for name, entry in data["datasets"].items() if entry["measured"]}
    if not data["measured"] or not measured:
        placeholder = (
            "No benchmark result is measured yet (gradmod/diagnose/benchmarks.json is a placeholder): nothing here "
            "says which method helps on data like yours; run gradmod.diagnose.trial on your own loop."
        )
        return [placeholder]

    def relation(entry: Mapping[str, Any]) -> bool | None:
        profile = entry["profile"]
        return None if profile["under_trained"] is None else profile["batch_dominant"] != profile["under_trained"]

    chosen = [(name, entry) for name, entry in measured.items() if agrees is None or relation(entry) == agrees]
    if gap is not None:
        chosen.sort(key=lambda item: abs((item[1]["profile"]["gap"] or 0.0) - gap))
    if not chosen:
        return ["No measured benchmark has a profile like this one (batch ratio against the solo comparison)."]
    lines = []
    for name, entry in chosen[:limit]:
        profile = entry["profile"]
        head = (
            f"On {name} ({entry['seeds']} seed{'s' if entry['seeds'] != 1 else ''}, {entry.get('budget') or 'budget not stated'}) the batch ratio called "
            f"{profile['batch_dominant']} dominant (ρ = {profile['batch_ratio']:.2f})"
        )
        if profile["under_trained"] is not None:
            head += (
                f" and {profile['under_trained']} was {profile['gap'] * 100:.1f} points below its solo run "
                f"({profile['basis']} {profile['joint'] * 100:.1f} against {profile['solo'] * 100:.1f})"
            )
        baseline = entry["baseline"]
        parts = [f"baseline fused {_stat(baseline['fused'])} %, weak {_stat(baseline['weak'])} %"]
        ranked = sorted(entry["methods"].items(), key=lambda item: -item[1]["lift"]["mean"])
        parts += [
            f"{key}: weak {_stat(result['lift'], signed=True)} points, fused {_stat(result['fused'])} %"
            for key, result in ranked
        ]
        lines.append(f"{head}: " + "; ".join(parts) + ".")
    return lines
