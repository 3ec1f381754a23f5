"""`benchmarks/accuracy.py`: the gap closed, the sweep's grid and choice, the summary, and its smoke run."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import accuracy
from reference_models.train import METHODS, TrainConfig

FAST = settings(max_examples=50, deadline=None)
LEVEL = st.floats(0.0, 1.0)


# ---------------------------------------------------------------- gap closed
@FAST
@given(baseline=LEVEL, solo=LEVEL, joint=LEVEL)
def test_gap_closed_is_zero_at_the_baseline_one_at_solo_and_grows_with_the_joint_accuracy(baseline, solo, joint):
    gap = accuracy.gap_closed(joint, baseline, solo)
    if solo <= baseline:
        assert gap is None
        return
    assert accuracy.gap_closed(baseline, baseline, solo) == 0.0
    assert accuracy.gap_closed(solo, baseline, solo) == pytest.approx(1.0)
    assert gap == pytest.approx((joint - baseline) / (solo - baseline))
    assert (gap > 0) == (joint > baseline) and (gap < 0) == (joint < baseline)
    assert accuracy.gap_closed(min(joint + 0.01, 1.0), baseline, solo) >= gap


def test_gap_closed_rejects_what_is_not_an_accuracy():
    assert accuracy.gap_closed(0.54, 0.42, 0.87) == pytest.approx(0.12 / 0.45)
    with pytest.raises(ValueError, match="joint"):
        accuracy.gap_closed(math.nan, 0.4, 0.8)
    with pytest.raises(ValueError, match="solo"):
        accuracy.gap_closed(0.5, 0.4, None)


# ---------------------------------------------------------------- the sweep
def test_every_method_has_a_sweep_rule_and_the_grid_is_log_spaced_around_its_default():
    assert set(METHODS) == set(accuracy.SWEPT) | set(accuracy.UNSWEPT)
    assert not set(accuracy.SWEPT) & set(accuracy.UNSWEPT)
    assert accuracy.sweep_values("ogm") == [0.2667, 0.8, 2.4]  # the CLI's α
    assert accuracy.sweep_values("agm") == [0.3333, 1.0, 3.0]  # AGM's official α
    assert accuracy.sweep_values("mmpareto") == [0.3333, 1.0, 3.0]  # the paper rule's γ
    assert accuracy.sweep_values("dgm") == [0.03333, 0.1, 0.3]
    assert accuracy.sweep_values("mla") == [0.03333, 0.1, 0.3]
    assert accuracy.sweep_values("bmm") == [0.3333, 1.0, 3.0]
    assert accuracy.sweep_values("opm") == [0.1667, 0.5, 0.625]  # a drop rate must keep q_base·(1 + λ) < 1
    for method in accuracy.SWEPT:
        low, center, high = accuracy.sweep_values(method)
        assert center == accuracy.default_strength(method, accuracy.SWEPT[method])
        assert center / low == pytest.approx(3.0, rel=1e-3)
        assert high / center == pytest.approx(3.0 if method != "opm" else 1.25, rel=1e-3)


def _held_out(fused, weak):
    return {"val": {"accuracy": fused, "unimodal": {"audio": 0.8, "visual": weak}}}


def test_the_choice_keeps_fused_accuracy_then_maximises_the_weak_modality_on_held_out_items():
    baseline = _held_out(0.90, 0.50)
    candidates = [_held_out(0.91, 0.55), _held_out(0.90, 0.70), _held_out(0.85, 0.80)]
    assert accuracy.choose(candidates, baseline) is candidates[1]  # 0.80 visual costs fused accuracy
    below = [_held_out(0.80, 0.9), _held_out(0.88, 0.6)]
    assert accuracy.choose(below, baseline) is below[1]  # none keeps it: the best fused
    tied = [_held_out(0.92, 0.6), _held_out(0.95, 0.6)]
    assert accuracy.choose(tied, baseline) is tied[0]  # ties: the grid's order
    with pytest.raises(ValueError, match="at least one"):
        accuracy.choose([], baseline)


def test_the_plan_trains_every_head_and_the_weak_modality_alone_with_every_seed():
    specs = accuracy.base_specs(["mla", "decoupling_free", "gblending", "ogm"], [0, 1])
    keys = [(s["method"], s["fusion"], s["solo"], s["seed"]) for s in specs]
    for seed in (0, 1):
        for head in ("concat", "shared", "gated"):
            assert ("baseline", head, None, seed) in keys
        assert ("baseline", "concat", "visual", seed) in keys
        assert ("gblending", "concat", None, seed) in keys
    assert not any(s["method"] in ("ogm", "mla") for s in specs)  # swept: they wait for the sweep
    sweep = accuracy.sweep_specs(["ogm", "gblending"], 0)
    assert [(s["option"], s["value"]) for s in sweep] == [("alpha", v) for v in accuracy.sweep_values("ogm")]


# ---------------------------------------------------------------- the summary
def _run(method, seed, fused, weak, fusion="concat", solo=None, option=None, value=None):
    return {
        **accuracy.spec(method, fusion, seed, option=option, value=value, solo=solo),
        "key": accuracy.run_key(method, fusion, solo), "accuracy": fused, "macro_f1": fused,
        "unimodal": {"audio": 0.8, "visual": weak}, "imbalance_ratio_mean": 0.8 / weak,
        "imbalance_ratio_final": 0.8 / weak, "train_s": 1.0, "total_s": 1.0,
    }


def test_summary_closes_the_gap_against_the_concat_baseline_and_the_solo_run_of_each_seed():
    runs = [
        _run("baseline", 0, 0.90, 0.40), _run("baseline", 1, 0.90, 0.50),
        _run("baseline", 0, 0.20, 0.80, solo="visual"), _run("baseline", 1, 0.20, 0.90, solo="visual"),
        _run("ogm", 0, 0.91, 0.60, option="alpha", value=0.8), _run("ogm", 1, 0.92, 0.70, option="alpha", value=0.8),
        _run("ogm", 0, 0.70, 0.79, option="alpha", value=2.4),  # a sweep run the choice left out
        _run("baseline", 0, 0.88, 0.30, fusion="gated"), _run("decoupling_free", 0, 0.89, 0.40, fusion="gated"),
    ]
    rows = {row["name"]: row for row in accuracy.summarize(accuracy.final_runs(runs, {"ogm": 0.8}))}
    assert rows["ogm"]["gap_closed"][0] == pytest.approx(0.5)  # (0.6 − 0.4)/(0.8 − 0.4), (0.7 − 0.5)/(0.9 − 0.5)
    assert rows["ogm"]["gap_closed"][1] == pytest.approx(0.0)
    assert rows["ogm"]["delta_visual"][0] == pytest.approx(0.2) and rows["ogm"]["wins_fused"] == [2, 2]
    assert rows["solo (visual)"]["gap_closed"][0] == pytest.approx(1.0)
    assert rows["baseline (concat)"]["gap_closed"][0] == 0.0
    # the gap is the concat baseline's (plain joint training); Δ compares with the baseline on the same head
    assert rows["decoupling_free"]["gap_closed"][0] == pytest.approx(0.0)
    assert rows["decoupling_free"]["delta_visual"][0] == pytest.approx(0.1)
    assert rows["baseline (gated)"]["gap_closed"][0] == pytest.approx(-0.25)
    assert "delta_fused" not in rows["solo (visual)"]
    assert accuracy.goal_rows(list(rows.values())) == []  # 0.65 visual: below 80 %
    runs[4]["unimodal"]["visual"] = runs[5]["unimodal"]["visual"] = 0.85
    rows = accuracy.summarize(accuracy.final_runs(runs, {"ogm": 0.8}))
    assert accuracy.goal_rows(rows) == ["ogm"]


# ---------------------------------------------------------------- the smoke run
def test_the_quick_run_writes_the_tables_and_plots_and_resumes_without_training_again(tmp_path, capsys):
    argv = ["--quick", "--methods", "mla", "ogm", "--out", str(tmp_path), "--plots", str(tmp_path)]
    assert accuracy.main(argv) == 0
    stored = json.loads((tmp_path / "accuracy.json").read_text())
    names = {row["name"] for row in stored["summary"]}
    assert names == {"baseline (concat)", "baseline (shared)", "solo (visual)", "mla", "ogm"}
    assert all("gap_closed" in row for row in stored["summary"])
    report = (tmp_path / "accuracy.md").read_text()
    assert "gap closed" in report and "Goal (visual alone ≥ 80 %" in report
    for plot in ("accuracy_gap.png", "accuracy.png", "accuracy_epochs.png", "accuracy_coefficients.png"):
        assert (tmp_path / plot).is_file()
    capsys.readouterr()
    assert accuracy.main([*argv, "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "resuming: 5 runs kept" in printed and " seed 0: fused" not in printed
    assert len(json.loads((tmp_path / "accuracy.json").read_text())["runs"]) == 5


def test_methods_that_train_unimodal_heads_are_compared_with_the_control_too():
    runs = [
        _run("baseline", 0, 0.90, 0.40), _run("baseline", 0, 0.20, 0.80, solo="visual"),
        _run("unimodal_losses", 0, 0.93, 0.70),
        _run("mmpareto", 0, 0.94, 0.75, option="gamma", value=1.0), _run("ogm", 0, 0.91, 0.60, option="alpha", value=0.8),
    ]
    rows = {row["name"]: row for row in accuracy.summarize(accuracy.final_runs(runs, {"mmpareto": 1.0, "ogm": 0.8}))}
    assert rows["mmpareto"]["control_visual"][0] == pytest.approx(0.05)  # what its rule adds beyond summing the losses
    assert rows["mmpareto"]["control_wins_fused"] == [1, 1]
    assert "control_visual" not in rows["ogm"]  # no unimodal heads: the baseline is its reference
    table = accuracy.markdown_tables(list(rows.values()), [])
    assert "Δ visual vs control" in table and "+5.0 ± 0.0 (1/1)" in table


def test_the_plan_reads_heads_and_strengths_from_the_registry_and_each_dataset_has_its_profile():
    import gradmod

    for key, info in gradmod.METHODS.items():
        expected = {"gate": "gated", "shared": "shared"}.get(info.fit.head, "concat")
        assert accuracy.fusion_for(key) == (key if info.kind == "head" else expected), key
        assert TrainConfig(method=key).resolved().fusion == accuracy.fusion_for(key)
        assert (key in accuracy.SWEPT) == (info.strength is not None)
    assert accuracy.fusion_for("unimodal_losses") == "concat"
    try:
        profile = accuracy.select("avmnist")
        assert (accuracy.DOMINANT, accuracy.WEAK, accuracy.GOAL_WEAK) == ("visual", "audio", None)
        assert profile.stem == "accuracy_avmnist"
    finally:
        accuracy.select("avdigits")
    assert accuracy.WEAK == "visual"
    with pytest.raises(ValueError, match="unknown dataset"):
        accuracy.select("cremad")


def test_the_profiles_of_the_quick_run_replay_its_baseline_and_pass_the_diagnose_schema(tmp_path):
    from benchmarks import profiles
    from gradmod.diagnose import load_benchmarks, similar_benchmarks

    assert accuracy.main(["--quick", "--methods", "ogm", "unimodal_losses", "--out", str(tmp_path),
                          "--plots", str(tmp_path)]) == 0
    target = tmp_path / "benchmarks.json"
    assert profiles.main(["--dataset", "avdigits", "--results", str(tmp_path), "--out", str(target)]) == 0
    data = load_benchmarks(target)
    entry = data["datasets"]["avdigits"]
    stored = json.loads((tmp_path / "accuracy.json").read_text())
    runs = {run["key"]: run for run in stored["runs"]}
    assert entry["profile"]["joint"] == runs["baseline (concat)"]["unimodal"]["visual"]
    assert entry["profile"]["solo"] == runs["solo (visual)"]["unimodal"]["visual"]
    assert entry["profile"]["gap"] == pytest.approx(entry["profile"]["solo"] - entry["profile"]["joint"])
    assert entry["profile"]["batch_dominant"] in {"audio", "visual"} and entry["profile"]["batch_ratio"] > 0
    assert set(entry["methods"]) == {"ogm"}  # gradmod methods only: not the baseline or the control
    lift = runs["ogm"]["unimodal"]["visual"] - runs["baseline (concat)"]["unimodal"]["visual"]
    assert entry["methods"]["ogm"]["lift"] == {"mean": pytest.approx(lift), "std": None}
    assert "On avdigits (1 seed, 1 epoch, sgd lr 0.01, batch 64)" in similar_benchmarks(agrees=None, gap=None, data=data)[0]

    stored["runs"] = [dict(run, accuracy=run["accuracy"] / 2) if run["key"] == "baseline (concat)" else run
                      for run in stored["runs"]]
    (tmp_path / "accuracy.json").write_text(json.dumps(stored))
    with pytest.raises(RuntimeError, match="not the same run"):
        profiles.main(["--dataset", "avdigits", "--results", str(tmp_path), "--out", str(target)])
    # keeping the batch profile: no replay, the accuracies refreshed from the results
    assert profiles.main(["--dataset", "avdigits", "--results", str(tmp_path), "--out", str(target),
                          "--keep-batch-profile"]) == 0
    kept = load_benchmarks(target)["datasets"]["avdigits"]
    assert kept["profile"]["batch_ratio"] == entry["profile"]["batch_ratio"]
    assert kept["baseline"]["fused"]["mean"] == pytest.approx(runs["baseline (concat)"]["accuracy"] / 2)


def test_the_recipes_stability_is_the_largest_swing_between_epochs_before_the_decay_and_at_the_end():
    def run(fused, weak):
        epochs = [{"epoch": i + 1, "accuracy": f, "unimodal": {"visual": w}} for i, (f, w) in enumerate(zip(fused, weak))]
        return {"key": "baseline (concat)", "epochs": epochs}

    accuracy.select("avdigits")
    runs = [run([0.5, 0.9, 0.6, 0.80, 0.81, 0.80], [0.2, 0.6, 0.3, 0.50, 0.52, 0.51]),
            run([0.5, 0.7, 0.7, 0.80, 0.80, 0.80], [0.2, 0.4, 0.4, 0.50, 0.50, 0.50]),
            {"key": "ogm", "epochs": []}]  # another method's run is not the recipe's
    steady = accuracy.stability(runs, epochs=6, lr_step=3)
    assert steady["before_decay"]["fused"] == pytest.approx((0.4 + 0.2) / 2)  # epochs 1..3
    assert steady["before_decay"]["visual"] == pytest.approx((0.4 + 0.2) / 2)
    assert steady["final"]["fused"] == pytest.approx((0.01 + 0.0) / 2)  # epochs 4..6
    assert steady["final"]["visual"] == pytest.approx((0.02 + 0.0) / 2)
    assert accuracy.stability(runs, epochs=6, lr_step=None)["before_decay"]["fused"] == pytest.approx((0.4 + 0.2) / 2)
    line = accuracy.stability_line(steady, decays=True)
    assert "fused 0.5 and visual alone 1.0 points over the last 3 epochs, against 30.0 and 30.0 points before" in line
    with pytest.raises(ValueError, match="no concat baseline"):
        accuracy.stability(runs[2:], epochs=6, lr_step=3)


def _holds(obj, value, depth=0, seen=None) -> bool:
    """Whether ``value`` is a number held by ``obj`` or by what it holds (attributes, containers, 0-d tensors),
    leaving out the run's configuration, which holds every value asked for whether or not it is used."""
    import torch

    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 4 or isinstance(obj, type):
        return False
    seen.add(id(obj))
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return math.isclose(obj, value, rel_tol=1e-9)
    if isinstance(obj, torch.Tensor):
        return obj.numel() == 1 and math.isclose(float(obj), value, rel_tol=1e-6)
    if isinstance(obj, (list, tuple)):
        return any(_holds(item, value, depth + 1, seen) for item in obj)
    if isinstance(obj, dict):
        return any(_holds(item, value, depth + 1, seen) for item in obj.values())
    if hasattr(obj, "__dict__"):
        kept = (item for name, item in vars(obj).items() if name not in ("config", "method_options", "task"))
        return any(_holds(item, value, depth + 1, seen) for item in kept)
    return False


@pytest.mark.parametrize("method", sorted(accuracy.SWEPT))
def test_every_value_of_every_sweep_builds_the_methods_loop_and_reaches_it(method):
    """A value the sweep would train is one the method accepts (a bounded strength, such as OPM's drop rate,
    gets a grid inside its bounds), and the loop's method or head holds it: a strength the loop ignored
    would train every value of the sweep alike."""
    import dataclasses

    import torch

    from reference_models.loops import make_loop
    from reference_models.tasks import build_task

    accuracy.select("avdigits")
    for value in accuracy.sweep_values(method):
        config = accuracy.config_for(accuracy.spec(method, accuracy.fusion_for(method), 0, option=accuracy.SWEPT[method],
                                                   value=value), 1, {"num_train": 64, "num_test": 32}, 16, "cpu")
        if method == "pdmp":  # its ranking runs would tie on 64 items: given metrics skip them
            config = dataclasses.replace(config, options={"metrics": {"audio": 0.9, "visual": 0.3}})
        config = config.resolved()
        task = build_task(config.dataset, fusion=config.fusion, seed=0, dataset_options=config.dataset_options)
        loop = make_loop(config, task, torch.device("cpu"))
        assert _holds(loop, value), f"{method}: {accuracy.SWEPT[method]} = {value} does not reach its loop"


def test_a_method_that_is_the_head_is_compared_with_the_concat_baseline():
    accuracy.select("avdigits")
    assert accuracy.fusion_for("mmcosine") == "mmcosine" and accuracy.reference_head("mmcosine") == "concat"
    assert accuracy.reference_head("decoupling_free") == "gated" and accuracy.reference_head("mla") == "shared"
    runs = [_run("baseline", 0, 0.90, 0.40), _run("baseline", 0, 0.20, 0.80, solo="visual"),
            dict(_run("mmcosine", 0, 0.92, 0.50, option="scaling", value=10.0), fusion="mmcosine")]
    rows = {row["name"]: row for row in accuracy.summarize(accuracy.final_runs(runs, {"mmcosine": 10.0}))}
    assert rows["mmcosine"]["delta_visual"][0] == pytest.approx(0.10)


def test_the_sweep_chooses_for_a_head_method_against_the_concat_baseline():
    from types import SimpleNamespace

    accuracy.select("avdigits")
    args = SimpleNamespace(dataset_options={}, max_items=None, resume=False, seeds=[0], methods=["mmcosine", "ogm"])
    bench = accuracy.Benchmark(args, [])
    held_out = {"baseline": (0.90, 0.40), 3.333: (0.91, 0.45), 10.0: (0.89, 0.70), 30.0: (0.92, 0.50)}
    for value, (fused, weak) in held_out.items():
        method = "baseline" if value == "baseline" else "mmcosine"
        run = _run(method, 0, fused, weak, fusion="concat" if method == "baseline" else "mmcosine",
                   option=None if method == "baseline" else "scaling", value=None if method == "baseline" else value)
        bench.runs.append({**run, "val": {"accuracy": fused, "unimodal": {"audio": 0.8, "visual": weak}}})
    for value, weak in ((0.2667, 0.5), (0.8, 0.6), (2.4, 0.55)):
        run = _run("ogm", 0, 0.91, weak, option="alpha", value=value)
        bench.runs.append({**run, "val": {"accuracy": 0.91, "unimodal": {"audio": 0.8, "visual": weak}}})
    bench.choose_all()
    assert bench.chosen == {"mmcosine": 30.0, "ogm": 0.8}  # 10.0 loses fused accuracy against the concat baseline
