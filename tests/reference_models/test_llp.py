"""LLP loader on fixtures written in the AVVP-ECCV20 layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from reference_models.data.llp import LLP, LLP_CLASSES
from tests.reference_models.fixtures import LLP_EVAL_AUDIO, LLP_EVAL_VISUAL, LLP_SPLITS, write_llp


@pytest.fixture
def llp_root(tmp_path: Path) -> Path:
    return write_llp(tmp_path, LLP_SPLITS, LLP_EVAL_AUDIO, LLP_EVAL_VISUAL)


def _val(root: Path) -> LLP:
    """The val split, whose two odd eval rows are reported in two warnings."""
    with pytest.warns(UserWarning) as record:
        dataset = LLP(root, "val")
    assert len(record) == 2
    return dataset


def _index(name: str) -> int:
    return LLP_CLASSES.index(name)


def test_classes_and_interface() -> None:
    assert len(LLP_CLASSES) == 25 and LLP_CLASSES[0] == "Speech" and LLP_CLASSES[-1] == "Clapping"
    assert LLP.modalities == ("audio", "visual") and LLP.num_classes == 25


def test_train_items_shapes_targets_and_features(llp_root: Path) -> None:
    dataset = LLP(llp_root, "train")
    assert len(dataset) == 4
    assert dataset.video_ids == ["BjCEufrlXm4", "AP0061o0Nvk", "0PKI3zo26_4", "P7x4FV4lg_5"]
    for number, (_, names) in enumerate(LLP_SPLITS["train"]):
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
    val = _val(llp_root)
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
    third = val.segment_labels(2)
    assert third["audio"][_index("Cheering")].sum() == 0  # the reversed row marks nothing
    assert third["audio"][_index("Speech")].tolist() == [1] * 5 + [0] * 5
    test = LLP(llp_root, "test").segment_labels(0)
    assert test["audio"][_index("Speech")].tolist() == [0, 1, 1, 1, 1, 1, 1, 0, 0, 1]
    assert test["visual"][_index("Motorcycle")].tolist() == [0, 0, 0, 0, 1, 1, 0, 0, 0, 0]


def test_train_split_has_no_segment_labels(llp_root: Path) -> None:
    with pytest.raises(ValueError, match="video-level"):
        LLP(llp_root, "train").segment_labels(0)


def test_max_items_and_feats_root(llp_root: Path, tmp_path: Path) -> None:
    assert len(LLP(llp_root, "train", max_items=1)) == 1
    (llp_root / "feats").rename(tmp_path / "features")
    assert len(LLP(llp_root, "test", feats_root=tmp_path / "features")) == 1


def test_missing_files_are_named(llp_root: Path, tmp_path: Path) -> None:
    (llp_root / "feats" / "res152" / "AP0061o0Nvk.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 LLP feature file\(s\) missing, first: .*res152/AP0061o0Nvk\.npy"):
        LLP(llp_root, "train")
    with pytest.raises(FileNotFoundError, match="nothing/vggish"):
        LLP(llp_root, "train", feats_root=tmp_path / "nothing")
    (llp_root / "AVVP_eval_visual.csv").unlink()
    with pytest.raises(FileNotFoundError, match="AVVP_eval_visual.csv"):
        LLP(llp_root, "test")
    (llp_root / "AVVP_test_pd.csv").unlink()
    with pytest.raises(FileNotFoundError, match="AVVP_test_pd.csv"):
        LLP(llp_root, "test")
    with pytest.raises(ValueError, match="split"):
        LLP(llp_root, "eval")


def test_the_reversed_eval_row_is_skipped_counted_and_reported(llp_root: Path) -> None:
    with pytest.warns(UserWarning) as record:
        val = LLP(llp_root, "val")
    messages = [str(warning.message) for warning in record]
    reversed_rows = [m for m in messages if "offset precedes their onset" in m]
    assert len(reversed_rows) == 1 and reversed_rows[0].startswith("LLP val: 1 eval rows")
    assert "AVVP_eval_audio.csv:6: 8DF2PxdT5tE_390_400  9  0  Cheering" in reversed_rows[0]
    assert [(note.where.rsplit("/", 1)[1], note.kind.split(":")[0]) for note in val.notes] == [
        ("AVVP_eval_audio.csv:5", "eval rows of zero length (offset = onset)"),
        ("AVVP_eval_audio.csv:6", "eval rows whose offset precedes their onset"),
    ]


def test_eval_bounds_the_official_code_tolerates(tmp_path: Path) -> None:
    rows = [("4YdbENYcIyE_23_33", 3, 12, "Speech"), ("4YdbENYcIyE_23_33", "1.7", "2.2", "Dog"),
            ("4YdbENYcIyE_23_33", -2, 1, "Cat")]
    root = write_llp(tmp_path, {"val": LLP_SPLITS["val"][:1]}, rows)
    with pytest.warns(UserWarning) as record:
        labels = LLP(root, "val").segment_labels(0)["audio"]
    assert len(record) == 2  # two outside [0, 10], one non-integer
    assert labels[_index("Speech")].tolist() == [0, 0, 0] + [1] * 7
    assert labels[_index("Dog")].tolist() == [0, 1] + [0] * 8  # int(1.7) = 1, int(2.2) = 2
    assert labels[_index("Cat")].tolist() == [1] + [0] * 9


def test_bad_annotations_are_rejected(tmp_path: Path) -> None:
    root = write_llp(tmp_path / "b", {"val": LLP_SPLITS["val"][:1]}, [("4YdbENYcIyE_23_33", 0, 3, "Speech_x")])
    with pytest.raises(ValueError, match=r"AVVP_eval_audio.csv:2: unknown LLP class 'Speech_x'"):
        LLP(root, "val")
    root = write_llp(tmp_path / "d", {"val": LLP_SPLITS["val"][:1]}, [("4YdbENYcIyE_23_33", "one", 3, "Speech")])
    with pytest.raises(ValueError, match=r"AVVP_eval_audio.csv:2: onset/offset 'one' is not a number"):
        LLP(root, "val")
    root = write_llp(tmp_path / "c", {"train": [("notanid", ["Speech"])]})
    with pytest.raises(ValueError, match=r"AVVP_train.csv:2: filename 'notanid' does not start with an 11-char"):
        LLP(root, "train")
    (root / "AVVP_train.csv").write_text("filename\tevent_labels\nBjCEufrlX.4_20_30\tSpeech\n")
    with pytest.raises(ValueError, match="11-character YouTube id"):
        LLP(root, "train")
    (root / "AVVP_train.csv").write_text("name\tlabels\nBjCEufrlXm4_20_30\tSpeech\n")
    with pytest.raises(ValueError, match="missing column"):
        LLP(root, "train")


def test_wrong_feature_shape_is_rejected(llp_root: Path) -> None:
    np.save(llp_root / "feats" / "vggish" / "BjCEufrlXm4.npy", np.zeros((8, 128), dtype=np.float32))
    np.save(llp_root / "feats" / "r2plus1d_18" / "AP0061o0Nvk.npy", np.full((10, 512), np.nan, dtype=np.float32))
    dataset = LLP(llp_root, "train")
    with pytest.raises(ValueError, match="BjCEufrlXm4.npy.*expected 10 rows of width 128"):
        dataset[0]
    with pytest.raises(ValueError, match="AP0061o0Nvk.npy holds non-finite"):
        dataset[1]
