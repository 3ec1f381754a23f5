"""LLP loader on fixtures written in the AVVP-ECCV20 layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from reference_models.data.llp import LLP, LLP_CLASSES
from tests.reference_models.fixtures import write_llp

SPLITS = {
    "train": [("BjCEufrlXm4_20_30", ["Speech", "Dog"]), ("7nSYwyaP4QE_50_60", ["Singing", "Banjo"]),
              ("0PKI3zo26_4_12_22", ["Clapping"])],
    "val": [("4YdbENYcIyE_23_33", ["Baby_cry_infant_cry"]), ("KSRjje7GH44_60_70", ["Blender", "Speech"])],
    "test": [("HK1i4YyF5WU_30_40", ["Motorcycle", "Speech"])],
}
EVAL_AUDIO = [
    ("4YdbENYcIyE_23_33", 0, 4, "Baby_cry_infant_cry"),
    ("KSRjje7GH44_60_70", 8, 10, "Blender"),
    ("KSRjje7GH44_60_70", 0, 8, "Speech"),
    ("KSRjje7GH44_60_70", 9, 9, "Speech"),  # empty interval, as in the real file: marks nothing
    ("HK1i4YyF5WU_30_40", 1, 7, "Speech"),
    ("HK1i4YyF5WU_30_40", 9, 10, "Speech"),
]
EVAL_VISUAL = [("KSRjje7GH44_60_70", 2, 5, "Blender"), ("HK1i4YyF5WU_30_40", 4, 6, "Motorcycle")]


@pytest.fixture
def llp_root(tmp_path: Path) -> Path:
    return write_llp(tmp_path, SPLITS, EVAL_AUDIO, EVAL_VISUAL)


def _index(name: str) -> int:
    return LLP_CLASSES.index(name)


def test_classes_and_interface() -> None:
    assert len(LLP_CLASSES) == 25 and LLP_CLASSES[0] == "Speech" and LLP_CLASSES[-1] == "Clapping"
    assert LLP.modalities == ("audio", "visual") and LLP.num_classes == 25


def test_train_items_shapes_targets_and_features(llp_root: Path) -> None:
    dataset = LLP(llp_root, "train")
    assert len(dataset) == 3
    assert dataset.video_ids == ["BjCEufrlXm4", "7nSYwyaP4QE", "0PKI3zo26_4"]
    for number, (_, names) in enumerate(SPLITS["train"]):
        inputs, target = dataset[number]
        assert inputs["audio"].shape == (10, 128) and inputs["audio"].dtype == torch.float32
        assert inputs["visual"].shape == (10, 2560) and inputs["visual"].dtype == torch.float32
        assert target.dtype == torch.float32 and target.shape == (25,)
        assert set(target.nonzero().flatten().tolist()) == {_index(n) for n in names}
        assert torch.all(inputs["audio"] == number)
        snippet_means = torch.arange(10) * 8 + 3.5 + 1000 * number  # res152 rows averaged in groups of 8
        assert torch.allclose(inputs["visual"][:, :2048], snippet_means[:, None].expand(10, 2048))
        assert torch.all(inputs["visual"][:, 2048:] == -number)


def test_segment_labels_from_the_eval_files(llp_root: Path) -> None:
    val = LLP(llp_root, "val")
    first = val.segment_labels(0)
    assert set(first) == {"audio", "visual"}
    assert first["audio"].shape == (25, 10) and first["visual"].shape == (25, 10)
    assert first["audio"][_index("Baby_cry_infant_cry")].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert first["audio"].sum() == 4 and first["visual"].sum() == 0  # no visual rows: all zero
    second = val.segment_labels(1)
    assert second["audio"][_index("Speech")].tolist() == [1] * 8 + [0, 0]
    assert second["audio"][_index("Blender")].tolist() == [0] * 8 + [1, 1]
    assert second["visual"][_index("Blender")].tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0, 0]
    assert second["audio"].sum() == 10
    test = LLP(llp_root, "test").segment_labels(0)
    assert test["audio"][_index("Speech")].tolist() == [0, 1, 1, 1, 1, 1, 1, 0, 0, 1]
    assert test["visual"][_index("Motorcycle")].tolist() == [0, 0, 0, 0, 1, 1, 0, 0, 0, 0]


def test_train_split_has_no_segment_labels(llp_root: Path) -> None:
    with pytest.raises(ValueError, match="video-level"):
        LLP(llp_root, "train").segment_labels(0)


def test_max_items_and_feats_root(llp_root: Path, tmp_path: Path) -> None:
    assert len(LLP(llp_root, "train", max_items=1)) == 1
    (llp_root / "feats").rename(tmp_path / "features")
    assert len(LLP(llp_root, "val", feats_root=tmp_path / "features")) == 2


def test_missing_files_are_named(llp_root: Path, tmp_path: Path) -> None:
    (llp_root / "feats" / "res152" / "7nSYwyaP4QE.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"res152/7nSYwyaP4QE\.npy"):
        LLP(llp_root, "train")
    with pytest.raises(FileNotFoundError, match="nothing/vggish"):
        LLP(llp_root, "train", feats_root=tmp_path / "nothing")
    (llp_root / "AVVP_eval_visual.csv").unlink()
    with pytest.raises(FileNotFoundError, match="AVVP_eval_visual.csv"):
        LLP(llp_root, "val")
    (llp_root / "AVVP_test_pd.csv").unlink()
    with pytest.raises(FileNotFoundError, match="AVVP_test_pd.csv"):
        LLP(llp_root, "test")
    with pytest.raises(ValueError, match="split"):
        LLP(llp_root, "eval")


def test_bad_annotations_are_rejected(tmp_path: Path) -> None:
    root = write_llp(tmp_path / "a", {"val": SPLITS["val"]}, [("4YdbENYcIyE_23_33", 3, 12, "Speech")])
    with pytest.raises(ValueError, match="outside"):
        LLP(root, "val")
    root = write_llp(tmp_path / "b", {"val": SPLITS["val"]}, [("4YdbENYcIyE_23_33", 0, 3, "Speech_x")])
    with pytest.raises(ValueError, match="unknown LLP class 'Speech_x'"):
        LLP(root, "val")
    root = write_llp(tmp_path / "c", {"train": [("notanid", ["Speech"])]})
    with pytest.raises(ValueError, match="notanid"):
        LLP(root, "train")
    (root / "AVVP_train.csv").write_text("name\tlabels\nBjCEufrlXm4_20_30\tSpeech\n")
    with pytest.raises(ValueError, match="missing column"):
        LLP(root, "train")


def test_wrong_feature_shape_is_rejected(llp_root: Path) -> None:
    np.save(llp_root / "feats" / "vggish" / "BjCEufrlXm4.npy", np.zeros((8, 128), dtype=np.float32))
    np.save(llp_root / "feats" / "r2plus1d_18" / "7nSYwyaP4QE.npy", np.full((10, 512), np.nan, dtype=np.float32))
    dataset = LLP(llp_root, "train")
    with pytest.raises(ValueError, match="BjCEufrlXm4.npy.*expected 10 rows of width 128"):
        dataset[0]
    with pytest.raises(ValueError, match="7nSYwyaP4QE.npy holds non-finite"):
        dataset[1]
