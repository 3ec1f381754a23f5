"""`benchmarks/step_cost.py`: the plan (a baseline per reference head, its repeat, every method), the ratios'
arithmetic, and its smoke run."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from benchmarks import step_cost
from reference_models.train import METHODS


def test_the_plan_times_a_baseline_on_every_reference_head_its_repeat_and_every_method():
    runs = step_cost.plan(list(METHODS))
    names = [name for name, _, _ in runs]
    assert names[:4] == ["baseline (concat)", "baseline (gated)", "baseline (shared)", "baseline (again)"]
    assert names[4:] == [m for m in METHODS if m != "baseline"]  # every method of the registry, once
    heads = dict((name, head) for name, _, head in runs)
    assert heads["mla"] == "shared" and heads["decoupling_free"] == "gated" and heads["mmcosine"] == "mmcosine"
    assert step_cost.reference_of("mmcosine", "mmcosine") == "baseline (concat)"  # the head is the method
    assert step_cost.reference_of("mla", "mla") == "baseline (shared)"
    assert step_cost.reference_of("baseline (again)", "baseline") == "baseline (concat)"
    assert step_cost.reference_of("baseline (gated)", "baseline") == "baseline (gated)"


def _timed(step_s, work_s, steps_per_epoch):
    return SimpleNamespace(step_s=step_s, work_s=work_s, steps_per_epoch=steps_per_epoch)


def test_the_ratios_are_taken_within_a_round_steps_by_median_epochs_by_mean():
    plain = _timed([0.1, 0.2, 0.4], [0.0, 0.0, 0.0], [10, 10, 10])
    method = _timed([0.2, 0.2, 2.0], [1.0, 0.0, 0.0], [20, 10, 10])
    ratios = step_cost.ratios(method, plain)
    assert ratios["step"] == pytest.approx(2.0)  # the median of 2, 1 and 5
    assert ratios["epoch_work"] == pytest.approx((1.0 / 1.0 + 0 + 0) / 3)  # a plain epoch: 10 steps × its step
    assert ratios["epoch"] == pytest.approx(((20 * 0.2 + 1.0) / 1.0 + 2.0 / 2.0 + 20.0 / 4.0) / 3)
    assert step_cost.ratios(plain, plain) == {"step": 1.0, "epoch_work": 0.0, "epoch": 1.0}


@pytest.mark.filterwarnings("ignore:gradmod Relearning")  # a few items: the diagnosis re-initialises much
def test_the_quick_run_writes_every_round_of_every_run(tmp_path, capsys):
    methods = ["baseline", "mla", "valuation", "relearning"]
    argv = ["--quick", "--methods", *methods, "--out", str(tmp_path)]
    result = step_cost.main(argv)
    stored = json.loads((tmp_path / "step_cost_avmnist.json").read_text())
    assert stored["rows"] == result["rows"] and stored["rounds"] == 2 and stored["steps"] == 2
    rows = {row["name"]: row for row in stored["rows"]}
    assert set(rows) == {"baseline (concat)", "baseline (shared)", "baseline (again)", *methods[1:]}
    for row in rows.values():
        assert all(len(values) == 2 for values in row["rounds"].values())
        assert all(math.isfinite(row[key]) and row[key] >= 0 for key in ("step", "epoch_work", "epoch", "step_ms"))
    assert rows["baseline (concat)"]["step"] == rows["baseline (shared)"]["step"] == 1.0
    assert rows["mla"]["reference"] == "baseline (shared)"
    # a valuation epoch holds every item and the re-sampled copies: never fewer steps than a plain epoch
    assert min(rows["valuation"]["rounds"]["steps_per_epoch"]) >= rows["baseline (concat)"]["steps_per_epoch"]
    printed = capsys.readouterr().out
    assert "| method | head | step (ms) | step × | epoch work × | epoch × |" in printed and "| relearning |" in printed


def test_counts_below_one_are_refused():
    with pytest.raises(SystemExit, match="--rounds must be >= 1"):
        step_cost.parse_args(["--rounds", "0"])
