"""The real-data smoke check (``python -m reference_models.check``) on fixtures in the real layouts."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from reference_models.check import main
from tests.reference_models.fixtures import (
    CREMAD_REFERENCE_WAV,
    LLP_EVAL_AUDIO,
    LLP_EVAL_VISUAL,
    LLP_SPLITS,
    write_ave,
    write_cremad,
    write_llp,
)

CREMAD_SPLITS = {
    "train": [("1001_DFA_ANG_XX", "ANG"), ("1001_IEO_HAP_HI", "HAP"), ("1002_TIE_NEU_XX", "NEU")],
    "test": [("1004_IWL_SAD_XX", "SAD")],
}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def test_llp_with_the_real_oddities_passes_and_lists_them(tmp_path: Path, capsys) -> None:
    write_llp(tmp_path, LLP_SPLITS, LLP_EVAL_AUDIO, LLP_EVAL_VISUAL)
    code, out = run(capsys, "--dataset", "llp", "--data-root", str(tmp_path))
    assert code == 0 and out.rstrip().endswith("OK: 0 problem(s), 2 tolerated oddities")
    assert "train:\n  4 item(s)\n  vggish: [10, 128] ×4\n  res152: [80, 2048] ×4" in out
    assert "note: 1 eval rows whose offset precedes their onset" in out
    assert f"{tmp_path / 'AVVP_eval_audio.csv'}:6: 8DF2PxdT5tE_390_400  9  0  Cheering" in out
    assert "dense visual labels for 1 of 3 videos" in out
    assert "loaded 3 of 3 items: audio [10, 128], visual [10, 2560], target [25]" in out


def test_llp_feature_problems_fail_the_check(tmp_path: Path, capsys) -> None:
    write_llp(tmp_path, LLP_SPLITS, LLP_EVAL_AUDIO, LLP_EVAL_VISUAL)
    np.save(tmp_path / "feats" / "vggish" / "BjCEufrlXm4.npy", np.zeros((8, 128), dtype=np.float32))
    np.save(tmp_path / "feats" / "r2plus1d_18" / "HK1i4YyF5WU.npy", np.full((10, 512), np.nan, dtype=np.float32))
    (tmp_path / "feats" / "res152" / "4YdbENYcIyE.npy").unlink()
    code, out = run(capsys, "--dataset", "llp", "--data-root", str(tmp_path), "--all")
    assert code == 1 and "FAILED" in out.splitlines()[-1]
    assert "PROBLEM: " + str(tmp_path / "feats/vggish/BjCEufrlXm4.npy") + ": feature shape [8, 128]" in out
    assert "PROBLEM: 1 LLP feature file(s) missing, first: " + str(tmp_path / "feats/res152/4YdbENYcIyE.npy") in out
    assert "HK1i4YyF5WU.npy holds non-finite values" in out


def test_ave_non_one_hot_rows_are_notes_and_a_missing_split_is_a_problem(tmp_path: Path, capsys) -> None:
    write_ave(tmp_path, np.zeros((4, 10), dtype=np.int64), {"train": [0, 1], "val": [2], "test": [3]})
    with h5py.File(tmp_path / "labels.h5", "r+") as handle:
        handle["avadataset"][1, 2, :] = 0.0
    code, out = run(capsys, "--dataset", "ave", "--data-root", str(tmp_path))
    assert code == 0 and "note: 1 segment label rows that are not one-hot" in out
    assert f"{tmp_path / 'labels.h5'}: video 1, segment 2: all zero" in out
    assert "labels from labels.h5" in out and "loaded 2 of 2 items" in out
    (tmp_path / "val_order.h5").unlink()
    code, out = run(capsys, "--dataset", "ave", "--data-root", str(tmp_path))
    assert code == 1 and "val:\n  PROBLEM: AVE file not found: " + str(tmp_path / "val_order.h5") in out


def test_cremad_missing_clips_are_notes_and_an_unreadable_wav_is_a_problem(tmp_path: Path, capsys) -> None:
    write_cremad(tmp_path, CREMAD_SPLITS, without_wav=["1002_TIE_NEU_XX"], seconds=0.5)
    shutil.copy(CREMAD_REFERENCE_WAV, tmp_path / "AudioWAV" / "1004_IWL_SAD_XX.wav")
    code, out = run(capsys, "--dataset", "cremad", "--data-root", str(tmp_path), "--items", "1")
    assert code == 0
    assert f"{tmp_path / 'train.csv'}:3: 1002_TIE_NEU_XX: no wav" in out
    assert "note: 2 clips shorter than 1 s" in out and "1001_IEO_HAP_HI.wav: 0.50 s" in out
    assert "wav: 16000 Hz ×2; 1 channel(s) ×2; 0.50–0.50 s" in out
    assert "wav: 16000 Hz ×1; 1 channel(s) ×1; 1.55–1.55 s" in out
    assert "loaded 1 of 2 items: audio [1, 257, 188], visual [3, 1, 224, 224]" in out
    (tmp_path / "AudioWAV" / "1001_DFA_ANG_XX.wav").write_bytes(b"not a wav")
    code, out = run(capsys, "--dataset", "cremad", "--data-root", str(tmp_path), "--items", "0")
    assert code == 1 and "1001_DFA_ANG_XX.wav: unreadable wav" in out


def test_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["--data-root", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["--dataset", "llp", "--data-root", str(tmp_path), "--items", "-1"])
