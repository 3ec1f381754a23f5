"""gradmod.diagnose's loop-fit table, the optimizer-scaling measurement, the benchmarks file and the trial."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

import gradmod.diagnose as D
from gradmod.method import Fit, MethodInfo
from gradmod.methods import METHODS


def _info(key: str, fit: Fit, kind: str = "modulator") -> MethodInfo:
    return MethodInfo(key, object, key.upper(), kind, "paper", "page.md", "observes", "cost", fit)


def test_the_table_covers_every_registered_method_in_order():
    table = D.fit_table(D.Loop())
    assert [row.key for row in table.rows] == list(METHODS)
    assert all(row.status in ("fits", "needs", "cannot") for row in table.rows)
    assert all(f"`{key}`" in table.text() for key in METHODS)


def test_a_split_head_sgd_loop():
    table = D.fit_table(D.Loop(head="split"))
    for row in table.rows:
        fit = METHODS[row.key].fit
        assert (row.status == "fits") == (fit.head in ("decoupled", "coalitions", "features", "inputs", "any")), row
        if row.status == "needs":
            assert row.reasons == (f"needs {D.fit.HEADS[fit.head]}",)
    assert table.scaling == () and not any(row.notes for row in table.rows)


def test_a_gated_head_multilabel_loop_in_transformers_with_adamw():
    loop = D.Loop(head="gated", multilabel=True, trainer="transformers", optimizer=torch.optim.AdamW(nn.Linear(1, 1).parameters()))
    assert loop.optimizer == "adamw" and loop.adaptive
    table = D.fit_table(loop)
    for row in table.rows:
        fit = METHODS[row.key].fit
        if not fit.multilabel:
            assert row.status == "cannot" and any("multi-label" in r for r in row.reasons)
        if fit.acts_on == "gradient scale":
            assert row.notes and "adamw" in row.notes[0] and "measured" in row.notes[0]
    assert [effect.optimizer for effect in table.scaling] == ["sgd", "adamw"]


def test_every_constraint_of_fit_is_read():
    methods = {
        "few": _info("few", Fit(head="decoupled", acts_on="gradient scale", max_modalities=2)),
        "noacc": _info("noacc", Fit(head="any", acts_on="loss", accumulation=False)),
        "local": _info("local", Fit(head="any", acts_on="loss", distributed=False)),
        "manual": _info("manual", Fit(head="any", acts_on="loss", trainers=("lightning",))),
        "heads": _info("heads", Fit(head="unimodal heads", acts_on="loss"), kind="loss"),
    }
    loop = D.Loop(head="other", modalities=3, accumulation=True, distributed="fsdp", trainer="transformers", optimizer="lbfgs")
    table = D.fit_table(loop, methods)
    reasons = {row.key: " ".join(row.reasons) for row in table.rows}
    assert "3 modalities; the method takes at most 2" in reasons["few"]
    assert "lbfgs's step(closure)" in reasons["few"]
    assert "accumulates gradients" in reasons["noacc"] and "FSDP" in reasons["local"]
    assert "gradmod drives the method in: lightning" in reasons["manual"]
    assert table.row("heads").status == "needs"
    assert table.keys("cannot") == ["few", "noacc", "local", "manual"]
    fine = D.fit_table(D.Loop(unimodal_heads=True), methods)
    assert fine.keys() == list(methods)


def test_what_each_head_provides():
    assert D.Loop(head="shared").provides() >= {"decoupled", "shared"}
    assert "decoupled" not in D.Loop(head="gated").provides()
    assert D.Loop(head="gated", unimodal_heads=True).provides() >= {"gate", "decoupled", "unimodal heads"}
    assert "coalitions" not in D.Loop(zeroable=False).provides()
    assert D.fit_table(D.Loop(head="shared")).row("ogm").status == "fits"


def test_loop_errors_name_the_field():
    with pytest.raises(ValueError, match="Loop.head"):
        D.Loop(head="attention")
    with pytest.raises(ValueError, match="Loop.optimizer"):
        D.Loop(optimizer="lion")
    with pytest.raises(ValueError, match="Loop.modalities"):
        D.Loop(modalities=1)
    with pytest.raises(ValueError, match="Loop.distributed"):
        D.Loop(distributed="deepspeed")
    with pytest.raises(TypeError, match="Loop"):
        D.fit_table({"head": "split"})
    with pytest.raises(KeyError, match="no method 'x'"):
        D.fit_table(D.Loop()).row("x")


def test_scaling_effect_measures_sgd_and_adam():
    sgd, adam = D.scaling_effect(("sgd", "adam"), k=0.25, steps=20)
    assert sgd.first_step == pytest.approx(0.25, rel=1e-5)  # SGD's first update is lr·k·g
    assert adam.first_step == pytest.approx(1.0, abs=1e-3)  # Adam's first update is lr·sign(g), up to ε
    assert abs(adam.after - 1.0) < abs(sgd.after - 1.0)
    assert D.scaling_effect(("adam",), k=0.25, steps=20) == (adam,)
    assert "adam: scaling one encoder's gradient by k = 0.25" in adam.sentence()
    with pytest.raises(ValueError, match="cannot run the optimizers \\['lion'\\]"):
        D.scaling_effect(("lion",))
    with pytest.raises(ValueError, match="k must be"):
        D.scaling_effect(k=0)


def test_the_shipped_benchmarks_file_holds_both_measured_datasets():
    data = D.load_benchmarks()
    D.validate_benchmarks(data)
    assert data["measured"] is True and data["schema"] == 1
    assert set(data["datasets"]) == {"avdigits", "avmnist"}
    for name, weak, dominant in (("avdigits", "visual", "audio"), ("avmnist", "audio", "visual")):
        entry = data["datasets"][name]
        assert entry["measured"] and entry["seeds"] == 3
        assert entry["profile"]["under_trained"] == weak and entry["profile"]["batch_dominant"] == dominant
        assert entry["profile"]["gap"] > 0.2  # the weak modality far below its solo run
        assert set(entry["methods"]) == set(METHODS)  # every method, at the sweep's choice
    lines = D.similar_benchmarks(agrees=True, gap=0.5)
    assert lines[0].startswith("On avmnist (3 seeds") and lines[1].startswith("On avdigits (3 seeds")


def test_a_placeholder_benchmarks_file_says_that_nothing_is_measured():
    data = copy.deepcopy(D.load_benchmarks())
    data["measured"] = False
    for entry in data["datasets"].values():
        entry["measured"] = False
    assert D.similar_benchmarks(agrees=True, gap=0.1, data=data)[0].startswith("No benchmark result is measured yet")


def _measured() -> dict:
    data = copy.deepcopy(D.load_benchmarks())
    data["measured"] = True
    data["datasets"] = {"avdigits": data["datasets"]["avdigits"]}
    entry = data["datasets"]["avdigits"]
    entry.update(measured=True, seeds=3, budget="10 epochs")
    entry["profile"] = {"batch_dominant": "audio", "batch_ratio": 2.0, "under_trained": "visual", "basis": "masked",
                        "joint": 0.5, "solo": 0.7, "gap": 0.2}
    entry["baseline"] = {"fused": {"mean": 0.8, "std": 0.01}, "weak": {"mean": 0.5, "std": 0.02}}
    entry["methods"] = {
        "ogm": {"fused": {"mean": 0.81, "std": 0.01}, "weak": {"mean": 0.55, "std": 0.02}, "lift": {"mean": 0.05, "std": 0.01}},
        "ogm_ge": {"fused": {"mean": 0.82, "std": 0.01}, "weak": {"mean": 0.58, "std": None}, "lift": {"mean": 0.08, "std": None}},
    }
    other = copy.deepcopy(entry)
    other["profile"] = dict(entry["profile"], batch_dominant="visual", gap=0.05)
    data["datasets"]["flipped"] = other
    return data


def test_similar_benchmarks_match_the_profile_and_quote_the_numbers(tmp_path):
    data = _measured()
    D.validate_benchmarks(data)
    lines = D.similar_benchmarks(agrees=True, gap=0.15, data=data)
    assert len(lines) == 1 and lines[0].startswith("On avdigits (3 seeds, 10 epochs)")
    assert lines[0].index("ogm_ge: weak +8.0 points") < lines[0].index("ogm: weak +5.0 ± 1.0 points")
    assert D.similar_benchmarks(agrees=False, gap=None, data=data)[0].startswith("On flipped")
    path = tmp_path / "benchmarks.json"
    path.write_text(json.dumps(data))
    assert D.load_benchmarks(path) == data


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(schema=2), "newer"),
        (lambda d: d.update(measured=False), "the file says 'measured': false"),
        (lambda d: d["datasets"]["avdigits"].update(seeds=0), "seeds must be an int >= 1"),
        (lambda d: d["datasets"]["avdigits"]["profile"].update(batch_dominant="text"), "batch_dominant must be one of"),
        (lambda d: d["datasets"]["avdigits"]["profile"].update(basis="guess"), "basis must be one of"),
        (lambda d: d["datasets"]["avdigits"]["methods"]["ogm"].pop("lift"), "methods.ogm.lift"),
        (lambda d: d["datasets"]["avdigits"]["baseline"]["fused"].update(mean=80.0), "fraction"),
        (lambda d: d["datasets"]["avdigits"]["profile"].update(batch_ratio=math.inf), "finite number"),
    ],
)
def test_a_malformed_benchmarks_file_names_its_field(edit, message):
    data = _measured()
    edit(data)
    with pytest.raises(ValueError, match=message):
        D.validate_benchmarks(data)


def test_trial_reports_lift_paired_by_seed():
    def train(key, budget):
        return {"key": key, "seed": torch.initial_seed(), "budget": budget}

    def evaluate(model):
        bonus = 0.1 if model["key"] == "ogm" else 0.0
        return 0.8 + bonus / 2, {"audio": 0.9, "visual": 0.4 + 0.01 * model["seed"] + bonus}

    rng = torch.get_rng_state()
    result = D.trial(train, evaluate, ["ogm", "mm"], budget=5, seeds=(0, 1, 2))
    assert torch.equal(torch.get_rng_state(), rng)
    assert result.weak_modality == "visual" and [r.key for r in result.rows] == [None, "ogm", "mm"]
    ogm = result.rows[1]
    assert ogm.lift == pytest.approx((0.1, 0.1, 0.1)) and ogm.weak == pytest.approx((0.5, 0.51, 0.52))
    summary = ogm.summary()
    assert summary["lift"]["mean"] == pytest.approx(0.1) and summary["lift"]["std"] == pytest.approx(0.0, abs=1e-12)
    assert "| ogm | 85.0 ± 0.0 | 51.0 ± 1.0 | +10.0 ± 0.0 |" in result.text()
    assert D.Trial.from_dict(result.to_dict()) == result
    table = D.fit_table(D.Loop())
    assert [r.key for r in D.trial(train, evaluate, table, budget=1, seeds=(0,)).rows][1:] == table.keys("fits")
    with pytest.raises(ValueError, match="unknown methods \\['nope'\\]"):
        D.trial(train, evaluate, ["nope"], budget=1)
    with pytest.raises(TypeError, match="fused accuracy"):
        D.trial(train, lambda model: 0.5, [], budget=1)
