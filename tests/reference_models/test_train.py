"""End-to-end smoke tests of the training CLI: every dataset × several methods for an epoch on tiny data."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import gradmod
from reference_models import train as train_module
from reference_models.config import DATASET_DEFAULTS
from reference_models.train import (
    METHODS,
    SELECTION_LABELS,
    TrainConfig,
    main,
    select_epochs,
    summary_lines,
    train,
)
from tests.reference_models.fixtures import write_ave, write_cremad, write_llp

TINY_DIGITS = {"num_train": 96, "num_test": 48}


def tiny(**overrides):
    options = {"dataset": "avdigits", "epochs": 1, "batch_size": 32, "dataset_options": TINY_DIGITS, "progress": False}
    return TrainConfig(**{**options, **overrides})


def check_results(results, modalities=("audio", "visual")):
    final = results["final"]
    assert 0.0 <= final["accuracy"] <= 1.0
    assert set(final["unimodal"]) == set(modalities)
    assert all(0.0 <= v <= 1.0 for v in final["unimodal"].values())
    assert math.isfinite(results["history"][-1]["train_loss"])
    assert math.isfinite(results["setup_s"]) and results["setup_s"] >= 0.0  # before the first epoch


from reference_models.config import default_fusion


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_on_avdigits(method):
    # PDMP ranks by held-out unimodal accuracy: enough data that the two modalities do not tie
    digits = {"num_train": 600, "num_test": 48} if method == "pdmp" else TINY_DIGITS
    results = train(tiny(method=method, fusion=default_fusion(method), dataset_options=digits, epochs=2))
    check_results(results)
    info = gradmod.METHODS.get(method)
    assert results["method"]["loop"] == (info.kind if info else "plain")
    # InfoReg acts through pulls, recorded per epoch (its "pull" field), not coefficients per step
    modulated = info is not None and info.kind in ("modulator", "responses") and method != "inforeg"
    assert bool(results["coefficients_per_step"]) == modulated
    last = results["history"][-1]
    if method == "pdmp":
        assert sorted(results["pdmp"]["ranking"]) == ["audio", "visual"]
    if method == "inforeg":
        assert set(last["inforeg"]) == {"score", "rate", "pull"}
    if method == "bmm":
        assert set(last["bmm"]) == {"train_unimodal", "smoothed", "kappa", "weak", "strength"}
    if method == "agm":
        assert results["method"]["options"] == {"sharpness": 1.0, "cap": 10.0, "clip": 1.0}
    if method == "mmpareto":
        assert set(last["mmpareto"]) == {"cosine", "unimodal_weight", "scale"}
        assert results["method"]["options"] == {"gamma": 1.0, "rule": "paper"}
    if method == "mla":
        assert set(last["mla"]["kept"]) == {"audio", "visual"}
        assert all(0.0 < kept <= 1.0 for kept in last["mla"]["kept"].values())
    if method == "gblending":
        assert results["history"][0]["gblending"] == {}  # no estimate before epoch 1
        weights = results["history"][1]["gblending"]["weights"]
        assert set(weights) == {"fused", "audio", "visual"} and sum(weights.values()) == pytest.approx(1.0)
        assert weights != {"fused": 1 / 3, "audio": 1 / 3, "visual": 1 / 3}
        assert results["method"]["options"]["held_out_items"] == round(0.08 * TINY_DIGITS["num_train"])


@pytest.mark.parametrize("fusion", ["sum", "film_zeta", "gated_simam"])
def test_fusion_heads_with_their_methods(fusion):
    method = "ogm_ge" if fusion == "sum" else "decoupling_free"
    check_results(train(tiny(method=method, fusion=fusion)))


def test_features_mode_and_backends():
    check_results(train(tiny(method="ogm", apply="features")))
    check_results(train(tiny(method="ogm_ge", backend="reference", param_filter="conv")))


def test_a_head_without_decoupled_logits_gets_a_clear_error():
    with pytest.raises(ValueError, match="decoupling_free"):
        train(tiny(method="ogm_ge", fusion="film"))


def _without_times(history):
    return [{key: value for key, value in record.items() if key != "elapsed_s"} for record in history]


#: Methods whose schedule spans the run (LFM's weights): a run resumed with other --epochs is refused instead.
RUN_LONG_SCHEDULES = ("lfm",)


@pytest.mark.parametrize("method", [m for m in METHODS if m not in RUN_LONG_SCHEDULES])
def test_resume_continues_exactly(tmp_path, method):
    options = {"method": method, "fusion": default_fusion(method)}
    if method == "pdmp":
        options["options"] = {"metrics": {"audio": 0.9, "visual": 0.3}}
    straight = train(tiny(epochs=3, out=str(tmp_path / "a"), **options))
    train(tiny(epochs=1, out=str(tmp_path / "b"), **options))
    resumed = train(tiny(epochs=3, out=str(tmp_path / "b"), resume=True, **options))
    assert _without_times(resumed["history"]) == _without_times(straight["history"])
    assert resumed["coefficients_per_step"] == straight["coefficients_per_step"]
    for name in ("results.json", "curves.png", "checkpoint.pt"):
        assert (tmp_path / "b" / name).is_file()
    assert json.loads((tmp_path / "b" / "results.json").read_text())["final"] == straight["final"]


def test_a_schedule_over_the_whole_run_refuses_a_resume_with_other_epochs(tmp_path):
    train(tiny(method="lfm", epochs=1, out=str(tmp_path)))
    with pytest.raises(ValueError, match="state_dict has epochs=1, this LFM has epochs=3"):
        train(tiny(method="lfm", epochs=3, out=str(tmp_path), resume=True))
    resumed = train(tiny(method="lfm", epochs=1, out=str(tmp_path), resume=True))  # the same schedule: done already
    assert len(resumed["history"]) == 1


def test_cremad_trains_from_its_real_layout(tmp_path):
    rows = [(f"10{i:02d}_IEO_{label}_XX", label) for i, label in enumerate(["NEU", "HAP", "SAD", "ANG"])]
    write_cremad(tmp_path, {"train": rows, "test": rows[:2]})
    for method in ("baseline", "ogm_ge"):
        results = train(TrainConfig(dataset="cremad", data_root=str(tmp_path), method=method, epochs=1, batch_size=2, progress=False))
        check_results(results)
        assert "macro_f1" in results["final"]


def test_ave_trains_from_its_real_layout_and_selects_on_val(tmp_path):
    labels = np.random.default_rng(0).integers(0, 29, size=(6, 10))
    write_ave(tmp_path, labels, {"train": [0, 1, 2, 3], "val": [4], "test": [4, 5]})
    for method, epochs in (("dgm", 1), ("ogm_ge", 2)):
        results = train(TrainConfig(dataset="ave", data_root=str(tmp_path), method=method, epochs=epochs, batch_size=2, progress=False))
        check_results(results)
        assert all({"val", "test"} <= set(record) for record in results["history"])
        assert set(results["final"]["unimodal_decoupled"]) == {"audio", "visual"}
        selected = results["selection"]["val_selected"]
        assert selected["val"] == results["history"][selected["epoch"]]["val"]
        assert results["selection"]["metric"] == "segment accuracy"


def test_llp_trains_with_dgm_on_the_msdu_scores(tmp_path):
    videos = [(f"vid{i:08d}_{10 * i}.5_{10 * i + 10}.5", ["Speech", "Dog"] if i % 2 else ["Cat"]) for i in range(5)]
    eval_rows = [(videos[2][0], 0, 4, "Cat"), (videos[3][0], 2, 10, "Speech"), (videos[4][0], 9, 0, "Speech")]
    splits = {"train": videos[:3], "val": videos[4:], "test": videos[2:4]}
    write_llp(tmp_path, splits, eval_audio=eval_rows, eval_visual=eval_rows[:1])
    with pytest.warns(UserWarning, match="LLP val: 1 eval rows whose offset precedes their onset"):
        results = train(TrainConfig(dataset="llp", data_root=str(tmp_path), method="dgm", epochs=1, batch_size=2, progress=False))
    assert set(results["final"]["avvp"]) >= {"segment_type_av", "event_event_av"}
    assert "avvp" in results["history"][0]["val"] and "unimodal_decoupled" not in results["final"]
    assert results["selection"]["metric"] == "segment-level Type@AV F-score"
    assert results["coefficients_per_step"]
    with pytest.warns(UserWarning, match="LLP val"), pytest.raises(ValueError, match="decoupled"):
        train(TrainConfig(dataset="llp", data_root=str(tmp_path), method="ogm", epochs=1, batch_size=2, progress=False))


def test_cli_reports_a_wrong_data_root(tmp_path, capsys):
    assert main(["--dataset", "ave", "--data-root", str(tmp_path), "--no-progress"]) == 2
    assert "audio_feature.h5" in capsys.readouterr().err
    assert main(["--dataset", "cremad", "--no-progress"]) == 2
    assert "--data-root" in capsys.readouterr().err


def test_cli_parses_every_option(capsys):
    config = train_module.parse_args(
        ["--method", "pdmp", "--pdmp-metrics", "audio=0.6,visual=0.4", "--noise", "none", "--epochs", "3", "--gamma-r", "0.2"]
    )
    assert config.options == {"metrics": {"audio": 0.6, "visual": 0.4}} and config.noise is None and config.epochs == 3
    assert config.strength == 0.2
    assert config.resolved().lr == DATASET_DEFAULTS["avdigits"]["lr"]
    assert train_module.parse_args(["--method", "mmpareto", "--mmpareto-rule", "official"]).options == {"rule": "official"}
    assert train_module.parse_args(["--method", "agm", "--agm-clip", "none"]).options == {"clip": None}
    for argv, message in (
        (["--method", "ogm", "--sharpness", "2"], "--sharpness is not a hyper-parameter of ogm"),
        (["--method", "ogm", "--mmpareto-rule", "paper"], "--mmpareto-rule is an option of mmpareto, not of ogm"),
        (["--method", "ogm", "--strength", "1", "--alpha", "2"], "--strength and --alpha set the same value"),
    ):
        with pytest.raises(SystemExit):
            train_module.parse_args(argv)
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="gblending has no strength"):
        TrainConfig(method="gblending", strength=2.0).resolved()
    with pytest.raises(ValueError, match="baseline has no strength or options"):
        TrainConfig(options={"rule": "paper"}).resolved()
    with pytest.raises(ValueError, match="--resume needs --out"):
        TrainConfig(resume=True).resolved()


def test_the_previous_releases_flags_work_under_their_new_names_with_a_warning(capsys):
    old = train_module.parse_args(["--method", "mm", "--mixup-alpha", "0.3"])
    assert old == train_module.parse_args(["--method", "mm", "--concentration", "0.3"]) and old.strength == 0.3
    assert "--mixup-alpha is renamed --concentration" in capsys.readouterr().err
    config = train_module.parse_args(["--method", "bmm", "--bmm-degree=0.7", "--bmm-warmup", "2"])
    assert config.strength == 0.7 and config.options == {"warmup_epochs": 2}
    config = train_module.parse_args(["--method", "pdmp", "--gamma-p", "2", "--gamma-r", "0.1"])
    assert config.options == {"gamma_p": 2.0} and config.strength == 0.1
    assert "--gamma-p is renamed --pdmp-gamma-p" in capsys.readouterr().err


def test_pdmp_with_given_metrics_and_dgm_single_label():
    results = train(tiny(method="pdmp", options={"metrics": {"audio": 0.9, "visual": 0.3}}))
    assert results["pdmp"]["ranking"] == ["audio", "visual"]
    k = results["coefficients_per_step"][0]["coefficients"]
    assert k["audio"] >= 1.0 >= k["visual"]
    assert torch.isfinite(torch.tensor(results["final"]["accuracy"]))
    check_results(train(tiny(method="dgm")))


def test_demo_shows_the_imbalance_and_the_benchmarks_best_method(tmp_path, monkeypatch, capsys):
    from reference_models import demo

    original = TrainConfig.resolved

    def small(self):
        return original(TrainConfig(**{**self.__dict__, "dataset_options": TINY_DIGITS, "progress": False}))

    monkeypatch.setattr(TrainConfig, "resolved", small)
    assert demo.main(["--dataset", "avdigits", "--epochs", "1", "--jobs", "1", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    method, _, why = demo.best_method(demo.RESULTS["avdigits"])
    title = gradmod.METHODS[method].title
    for row in ("audio trained alone", "visual trained alone", "joint training (baseline)", f"joint training + {title}"):
        assert row in printed
    assert why in printed and "against its solo run (points): audio " in printed
    assert (tmp_path / "comparison.png").is_file() and Path(tmp_path / "comparison.json").is_file()
    assert json.loads((tmp_path / "comparison.json").read_text())["method"] == method


@pytest.mark.slow
def test_the_readmes_demo_output_is_what_the_demo_prints(tmp_path, capsys):
    """The README's ```text block is `make demo`'s output: every line but the times (about three minutes)."""
    from reference_models import demo

    def without_times(text):
        return [re.sub(r" +\d+\.\d$", "", line) for line in text.strip().splitlines()]

    assert demo.main(["--out", str(tmp_path)]) == 0
    printed = without_times(capsys.readouterr().out)
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    shown = without_times(readme.split("```text\n", 1)[1].split("```", 1)[0])
    missing = [line for line in shown if line not in printed]
    assert not missing, f"README lines the demo no longer prints: {missing}"


def test_the_demos_table_lines_up_whatever_the_methods_title():
    from reference_models import demo

    def result(fused, audio, visual, setup_s=0.5):
        return {"final": {"accuracy": fused, "unimodal": {"audio": audio, "visual": visual}}, "setup_s": setup_s,
                "wall_time_s": 1.0}

    results = {"audio trained alone": result(0.9, 0.9, 0.1), "visual trained alone": result(0.9, 0.1, 0.9),
               "joint training (baseline)": result(0.95, 0.5, 0.85),
               "joint training + Diagnosing & Re-learning": result(0.96, 0.6, 0.85, setup_s=40.0)}
    lines = demo.comparison_lines(results, ("audio", "visual"))
    table = [lines[0], *lines[2:6]]
    assert len({len(line) for line in table}) == 1  # every row as wide as the header
    assert table[1].endswith(" 1.5") and table[4].endswith(" 41.0")  # the time includes what trains before epoch 1
    assert {line.index("0.9") for line in table[1:3]} == {lines[0].index("fused acc") + 4}  # right-aligned under "fused acc"
    assert lines[-1].endswith("audio -40.0, visual -5.0")


def test_the_demo_picks_the_method_with_the_largest_gap_closed_that_keeps_the_fused_accuracy(tmp_path):
    from reference_models import demo

    def row(name, fused, gap, value=None):
        return {"name": name, "method": name.split()[0], "fused": [fused, 0.0], "gap_closed": gap, "value": value,
                "seeds": [0, 1, 2]}

    rows = [row("baseline (concat)", 0.90, [0.0, 0.0]), row("ogm_ge", 0.91, [0.3, 0.1], 0.8),
            row("mmpareto", 0.95, [0.9, 0.1], 1.0), row("agm", 0.85, [1.2, 0.1], 1.0), row("unimodal_losses", 0.96, [1.5, 0.0])]
    path = tmp_path / "accuracy.json"
    path.write_text(json.dumps({"summary": rows}))
    method, value, why = demo.best_method(path)
    assert (method, value) == ("mmpareto", 1.0) and "gap closed 0.90" in why  # agm drops the fused accuracy
    assert demo.best_method(tmp_path / "missing.json")[0] == demo.FALLBACK_METHOD


def _record(epoch, test, val=None):
    record = {"epoch": epoch, "test": {"accuracy": test}}
    return record if val is None else {**record, "val": {"accuracy": val}}


def test_selection_reports_last_best_test_and_val_selected_epochs():
    scores = [(0.5, 0.3), (0.8, 0.6), (0.8, 0.7), (0.6, 0.7), (0.7, 0.5)]  # (test, val) per epoch
    history = [_record(epoch, test, val) for epoch, (test, val) in enumerate(scores)]
    selection = select_epochs(history, "accuracy")
    assert selection["last_epoch"]["epoch"] == 4 and selection["last_epoch"]["test"]["accuracy"] == 0.7
    assert selection["best_test"]["epoch"] == 1  # the first epoch with the best test score (OGM-GE's `>`)
    assert selection["val_selected"]["epoch"] == 3  # the latest of the tied val scores (AVVP-ECCV20's `>=`)
    assert selection["val_selected"]["test"]["accuracy"] == 0.6
    assert {selection[key]["label"] for key in SELECTION_LABELS} == set(SELECTION_LABELS.values())
    assert select_epochs([_record(0, 0.5)], "accuracy")["val_selected"] is None


def test_results_and_cli_summary_label_every_report(tmp_path, capsys):
    results = train(tiny(method="ogm_ge", epochs=2, out=str(tmp_path)))
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["selection"] == results["selection"] and stored["selection"]["val_selected"] is None
    assert set(results["final"]["unimodal_decoupled"]) == {"audio", "visual"}
    lines = summary_lines(results)
    assert lines[0].startswith("test scores (accuracy; unimodal: masked") and len(lines) == 4
    assert lines[1].startswith("  last epoch (epoch 2): acc ") and "| decoupled audio=" in lines[1]
    assert lines[2].startswith(f"  {SELECTION_LABELS['best_test']} (epoch ")
    assert lines[3] == f"  {SELECTION_LABELS['val_selected']}: no val split for avdigits"
    argv = ["--epochs", "1", "--batch-size", "32", "--method", "baseline", "--no-progress"]
    original = TrainConfig.resolved
    try:
        TrainConfig.resolved = lambda self: original(TrainConfig(**{**self.__dict__, "dataset_options": TINY_DIGITS}))
        assert main(argv) == 0
    finally:
        TrainConfig.resolved = original
    printed = capsys.readouterr().out
    assert "| masked audio=" in printed and "| decoupled audio=" in printed
    assert all(label in printed for label in SELECTION_LABELS.values())


def test_cli_methods_are_the_cli_controls_and_every_gradmod_method_by_its_key():
    """One registry: the CLI's --method choices are its own two and gradmod.METHODS; strengths and options resolve
    from each method's entry (given values, else its defaults)."""
    from reference_models.config import CLI_METHODS, method_options

    assert METHODS == (*CLI_METHODS, *gradmod.METHODS)
    for key, info in gradmod.METHODS.items():
        resolved = method_options(TrainConfig(method=key))
        if info.strength is not None:
            assert resolved[info.strength.keyword] == info.strength.default, key
        assert {o.keyword for o in info.options} <= set(resolved), key
    assert method_options(TrainConfig(method="dgm", strength=0.7)) == {"alpha": 0.7}
    assert method_options(TrainConfig(method="agm", strength=0.3, options={"clip": None})) == {"sharpness": 0.3, "cap": 10.0, "clip": None}
    with pytest.raises(ValueError, match=r"mmpareto has no options --mmpareto-cap; its options: \['rule'\]"):
        method_options(TrainConfig(method="mmpareto", options={"cap": 1.0}))
    with pytest.raises(ValueError, match="--mmpareto-rule must be one of"):
        method_options(TrainConfig(method="mmpareto", options={"rule": "mine"}))


def test_every_gradmod_method_enters_through_the_loop_of_its_kind():
    """One dispatch: a gradmod method's CLI loop is the loop of gradmod.METHODS[name].kind (the data methods each
    have theirs); the CLI's own methods are CLI_LOOPS."""
    from reference_models.loops import CLI_LOOPS, LOOPS, make_loop
    from reference_models.loops.data import DATA_LOOPS
    from reference_models.tasks import build_task

    assert set(METHODS) == {*gradmod.METHODS, *CLI_LOOPS}
    for method in METHODS:
        task = build_task("avdigits", fusion=default_fusion(method), dataset_options={"num_train": 8, "num_test": 8})
        options = {"metrics": {"audio": 0.9, "visual": 0.3}} if method == "pdmp" else {}
        config = tiny(method=method, fusion=default_fusion(method), options=options)
        loop = make_loop(config.resolved(), task, torch.device("cpu"))
        info = gradmod.METHODS.get(method)
        expected = CLI_LOOPS.get(method) or DATA_LOOPS.get(method) or LOOPS[info.kind]
        assert type(loop) is expected, method
        assert loop.kind == (info.kind if info else "plain")
        assert (loop.method is None) == (info is None or info.kind == "head"), method  # a head is the model's


def test_the_control_adds_the_unimodal_heads_losses_to_the_fused_one():
    from reference_models.loops import make_loop
    from reference_models.tasks import build_task

    task = build_task("avdigits", dataset_options=TINY_DIGITS)
    loop = make_loop(tiny(method="unimodal_losses").resolved(), task, torch.device("cpu"))
    inputs, target = next(iter(torch.utils.data.DataLoader(task.train_set, batch_size=8)))
    features = task.model.encode(inputs)
    expected = task.model.loss(task.model.head(features), target) + sum(loop.unimodal_losses(features, target).values())
    assert loop.loss(inputs, target).item() == pytest.approx(expected.item(), rel=1e-6)
    check_results(train(tiny(method="unimodal_losses")))


def _task_of(kind, model, name="llp"):
    from reference_models.tasks import Task

    items = [({"audio": torch.zeros(2, 8), "visual": torch.zeros(2, 12)}, torch.zeros(5)) for _ in range(4)]
    return Task(name, kind, items, items, model, 5)


@pytest.mark.parametrize("method", ["agm", "mmpareto", "mla", "gblending"])
def test_methods_that_need_class_targets_name_what_is_missing(method):
    from reference_models.loops import make_loop
    from reference_models.models import LLPModel

    model = LLPModel(audio_dim=8, visual_dim=12, dim=16, num_classes=5, num_heads=2, dropout=0.0)
    config = TrainConfig(dataset="llp", data_root="unused", method=method).resolved()
    with pytest.raises(ValueError, match=f"^{method} .*class-index targets: llp's are multi-hot"):
        make_loop(config, _task_of("parsing", model), torch.device("cpu"))


@pytest.mark.parametrize("method", ["mmpareto", "gblending"])
def test_methods_with_unimodal_heads_need_one_feature_vector_per_modality(method):
    from reference_models.loops import make_loop
    from reference_models.models import LLPModel

    model = LLPModel(audio_dim=8, visual_dim=12, dim=16, num_classes=5, num_heads=2, dropout=0.0)
    config = TrainConfig(dataset="llp", data_root="unused", method=method).resolved()
    with pytest.raises(ValueError, match=f"^{method} trains unimodal heads: one linear head per modality"):
        make_loop(config, _task_of("classification", model), torch.device("cpu"))


def test_method_specific_errors_name_the_method_and_the_missing_piece():
    with pytest.raises(ValueError, match="^mla trains every modality through one shared head: use --fusion shared"):
        train(tiny(method="mla", fusion="concat"))
    with pytest.raises(ValueError, match="one feature width"):
        _unequal_shared()
    with pytest.raises(ValueError, match="^mmpareto has no modulation window or params applier: --apply do not"):
        train(tiny(method="mmpareto", apply="features"))
    with pytest.raises(ValueError, match="^agm has no params applier: --param-filter, --noise do not"):
        train(tiny(method="agm", param_filter="conv", noise="ge"))
    with pytest.raises(ValueError, match="^gblending has no modulation window .*--modulation-start"):
        train(tiny(method="gblending", modulation_start=1))
    with pytest.raises(ValueError, match="--solo trains one modality alone without any method"):
        train(tiny(method="ogm", solo="visual"))
    with pytest.raises(ValueError, match="--solo 'text' is not a modality of avdigits"):
        train(tiny(solo="text"))


def _unequal_shared():
    from reference_models.models.common import make_fusion

    return make_fusion("shared", {"audio": 4, "visual": 5}, 3, ("audio", "visual"))


def test_solo_trains_one_modality_alone_through_the_fused_head():
    from reference_models.loops import make_loop, make_optimizer
    from reference_models.tasks import build_task

    task = build_task("avdigits", dataset_options=TINY_DIGITS)
    loop = make_loop(tiny(solo="visual").resolved(), task, torch.device("cpu"))
    loop.attach(make_optimizer(tiny().resolved(), loop.parameters()))
    inputs, target = next(iter(torch.utils.data.DataLoader(task.train_set, batch_size=8)))
    loop.step(inputs, target)
    assert all(p.grad is None for p in task.model.encoders["audio"].parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in task.model.encoders["visual"].parameters())
    results = train(tiny(solo="visual"))
    assert results["method"]["options"] == {"solo": "visual"}


def test_val_size_holds_training_items_out_as_a_val_split():
    results = train(tiny(val_size=16, epochs=2))
    assert all("val" in record for record in results["history"])
    assert results["selection"]["val_selected"] is not None
    with pytest.raises(ValueError, match="leaves nothing"):
        train(tiny(val_size=TINY_DIGITS["num_train"]))


def test_bmm_sets_kappa_from_the_moving_average_of_the_decoupled_training_accuracies():
    results = train(tiny(method="bmm", epochs=3, dataset_options={"num_train": 192, "num_test": 48}))
    records = [record["bmm"] for record in results["history"]]
    assert records[0]["smoothed"] == records[0]["train_unimodal"]  # the first estimate is the epoch's own
    for before, now in zip(records, records[1:]):
        expected = {n: 0.5 * before["smoothed"][n] + 0.5 * now["train_unimodal"][n] for n in now["smoothed"]}
        assert now["smoothed"] == pytest.approx(expected)
        ratio = now["smoothed"]["audio"] / now["smoothed"]["visual"]
        assert now["kappa"]["audio"] == pytest.approx(ratio)
    assert any(r["smoothed"] != r["train_unimodal"] for r in records[1:])  # the average did move something
    assert results["method"]["options"]["smoothing"] == 0.5
