"""``python -m reference_models.diagnose``: the monitored baseline is the CLI's baseline run, and the command writes
its report."""

from __future__ import annotations

import json

import pytest
import torch

from reference_models import diagnose as diagnose_cli
from reference_models.train import TrainConfig, train
from tests.reference_models.test_train import TINY_DIGITS


def config(**overrides) -> TrainConfig:
    options = {"dataset": "avdigits", "epochs": 2, "batch_size": 32, "dataset_options": TINY_DIGITS,
               "progress": False, "lr_step": 1, "val_size": 32}
    return TrainConfig(**{**options, **overrides})


def test_the_monitored_run_is_the_baselines_run_bit_for_bit_with_its_schedule_and_val_split():
    task, loop, monitored = diagnose_cli.train_monitored(config())
    plain = train(config())
    assert monitored["history"][-1]["test"] == plain["history"][-1]["test"]
    assert monitored["history"][-1]["val"] == plain["history"][-1]["val"]
    assert monitored["history"][-1]["train_loss"] == plain["history"][-1]["train_loss"]
    steps_per_epoch = -(-(len(task.train_set)) // 32)
    assert loop.monitor.step_count == 2 * steps_per_epoch
    assert len(loop.monitor.epochs) == 2
    assert set(loop.initial) == {"audio", "visual"}
    changed = [not torch.equal(p, q) for p, q in zip(loop.initial.parameters(), task.model.encoders.parameters())]
    assert any(changed)  # the initial encoders are a copy, not the trained ones


def test_only_the_joint_baseline_is_diagnosed():
    with pytest.raises(ValueError, match="trains the joint baseline"):
        diagnose_cli.train_monitored(config(method="ogm_ge"))
    with pytest.raises(ValueError, match="trains the joint baseline"):
        diagnose_cli.train_monitored(config(solo="audio"))


def test_the_command_prints_the_report_and_writes_json_and_plot(tmp_path, capsys):
    assert diagnose_cli.main(["--dataset", "avmnist", "--epochs", "1", "--max-items", "120", "--no-solo",
                              "--no-progress", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "gradmod diagnosis of audio, visual" in printed
    stored = json.loads((tmp_path / "diagnosis.json").read_text())
    assert stored["names"] == ["audio", "visual"] and stored["samples"] == 120  # the capped test split
    assert len(stored["monitor"]) == 1 and "verdict" in stored
    assert (tmp_path / "diagnosis.png").stat().st_size > 0
