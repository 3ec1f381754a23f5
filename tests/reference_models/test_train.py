"""End-to-end smoke tests of the training CLI: every dataset × several methods for an epoch on tiny data."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from reference_models import train as train_module
from reference_models.train import METHODS, SELECTION_LABELS, TrainConfig, main, select_epochs, summary_lines, train
from tests.reference_models.fixtures import write_ave, write_cremad, write_llp

TINY_DIGITS = {"num_train": 96, "num_test": 48}


def tiny(**overrides):
    options = {"dataset": "avdigits", "epochs": 1, "batch_size": 32, "avdigits": TINY_DIGITS, "progress": False}
    return TrainConfig(**{**options, **overrides})


def check_results(results, modalities=("audio", "visual")):
    final = results["final"]
    assert 0.0 <= final["accuracy"] <= 1.0
    assert set(final["unimodal"]) == set(modalities)
    assert all(0.0 <= v <= 1.0 for v in final["unimodal"].values())
    assert math.isfinite(results["history"][-1]["train_loss"])


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_on_avdigits(method):
    fusion = "gated" if method == "decoupling_free" else "concat"
    # PDMP ranks by held-out unimodal accuracy: enough data that the two modalities do not tie
    digits = {"num_train": 600, "num_test": 48} if method == "pdmp" else TINY_DIGITS
    results = train(tiny(method=method, fusion=fusion, pdmp_budget=1, avdigits=digits))
    check_results(results)
    modulated = method not in ("baseline", "mm", "bmm")
    assert bool(results["coefficients_per_step"]) == modulated
    if method == "pdmp":
        assert sorted(results["pdmp"]["ranking"]) == ["audio", "visual"]
    if method == "bmm":
        assert "kappa" in results["history"][0]["bmm"]


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


def test_resume_continues_exactly(tmp_path):
    straight = train(tiny(method="ogm_ge", epochs=2, out=str(tmp_path / "a")))
    train(tiny(method="ogm_ge", epochs=1, out=str(tmp_path / "b")))
    resumed = train(tiny(method="ogm_ge", epochs=2, out=str(tmp_path / "b"), resume=True))
    assert resumed["final"] == straight["final"]
    assert resumed["coefficients_per_step"] == straight["coefficients_per_step"]
    for name in ("results.json", "curves.png", "checkpoint.pt"):
        assert (tmp_path / "b" / name).is_file()
    assert json.loads((tmp_path / "b" / "results.json").read_text())["final"] == straight["final"]


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


def test_cli_parses_every_option():
    config = train_module.parse_args(
        ["--method", "pdmp", "--pdmp-metrics", "audio=0.6,visual=0.4", "--noise", "none", "--epochs", "3"]
    )
    assert config.pdmp_metrics == {"audio": 0.6, "visual": 0.4} and config.noise is None and config.epochs == 3
    assert config.resolved().lr == train_module.DATASET_DEFAULTS["avdigits"]["lr"]
    with pytest.raises(ValueError, match="--resume needs --out"):
        TrainConfig(resume=True).resolved()


def test_pdmp_with_given_metrics_and_dgm_single_label():
    results = train(tiny(method="pdmp", pdmp_metrics={"audio": 0.9, "visual": 0.3}))
    assert results["pdmp"]["ranking"] == ["audio", "visual"]
    k = results["coefficients_per_step"][0]["coefficients"]
    assert k["audio"] >= 1.0 >= k["visual"]
    assert torch.isfinite(torch.tensor(results["final"]["accuracy"]))
    check_results(train(tiny(method="dgm")))


def test_demo_prints_the_comparison(tmp_path, monkeypatch, capsys):
    from reference_models import demo

    original = TrainConfig.resolved

    def small(self):
        return original(TrainConfig(**{**self.__dict__, "avdigits": TINY_DIGITS, "progress": False}))

    monkeypatch.setattr(TrainConfig, "resolved", small)
    assert demo.main(["--epochs", "1", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "baseline" in printed and "OGM-GE" in printed and "visual alone" in printed
    assert (tmp_path / "comparison.png").is_file() and Path(tmp_path / "comparison.json").is_file()


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
        TrainConfig.resolved = lambda self: original(TrainConfig(**{**self.__dict__, "avdigits": TINY_DIGITS}))
        assert main(argv) == 0
    finally:
        TrainConfig.resolved = original
    printed = capsys.readouterr().out
    assert "| masked audio=" in printed and "| decoupled audio=" in printed
    assert all(label in printed for label in SELECTION_LABELS.values())


def test_cli_methods_are_gradmod_methods_by_the_same_name():
    """One registry: each modulator method is gradmod.METHODS[name], its hyper-parameters from the config."""
    from reference_models.tasks import build_task
    from reference_models.train import MODULATOR_METHODS, make_modulator, parse_args

    import gradmod

    assert set(MODULATOR_METHODS) <= set(gradmod.METHODS)
    task = build_task("avdigits", max_items=8, avdigits_options={"num_train": 8, "num_test": 8})
    strengths = {"ogm": 0.3, "ogm_ge": 0.3, "decoupling_free": 0.3, "dgm": 0.7}
    for method in MODULATOR_METHODS:
        config = parse_args(["--method", method, "--alpha", "0.3", "--gamma", "0.7", "--gamma-p", "0.2"]).resolved()
        modulator = make_modulator(config, task, steps_per_epoch=1, pdmp_ranking=("visual", "audio"))
        assert isinstance(modulator, gradmod.Modulator), method
        if method == "pdmp":
            assert modulator.policy.ranking == ("visual", "audio") and modulator.policy.gamma_p == 0.2
        else:
            assert modulator.policy.strength == strengths[method], method
    assert make_modulator(parse_args(["--method", "mm"]).resolved(), task, 1) is None
