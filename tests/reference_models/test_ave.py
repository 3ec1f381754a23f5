"""AVE loader on fixtures written in the AVE-ECCV18 h5 layout."""

from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from reference_models.data.ave import AVE, AVE_CLASSES, BACKGROUND
from tests.reference_models.fixtures import write_ave

ORDERS = {"train": [0, 2, 4], "val": [1], "test": [5, 3]}
AveData = tuple[Path, np.ndarray, dict[str, np.ndarray]]  # root, segment labels [N, 10], written arrays


@pytest.fixture
def ave_data(tmp_path: Path) -> AveData:
    labels = np.random.default_rng(1).integers(0, len(AVE_CLASSES), size=(6, 10))
    labels[0, :3] = BACKGROUND
    arrays = write_ave(tmp_path, labels, ORDERS)
    return tmp_path, labels, arrays


def test_classes_and_interface() -> None:
    assert len(AVE_CLASSES) == 29 and BACKGROUND == 28
    assert AVE_CLASSES[0] == "Church bell" and AVE_CLASSES[BACKGROUND] == "Background"
    assert AVE.modalities == ("audio", "visual") and AVE.num_classes == 29


def test_items_follow_the_split_order(ave_data: AveData) -> None:
    root, labels, arrays = ave_data
    for split, order in ORDERS.items():
        dataset = AVE(root, split)
        assert len(dataset) == len(order)
        for i, video in enumerate(order):
            inputs, target = dataset[i]
            assert inputs["audio"].shape == (10, 128) and inputs["audio"].dtype == torch.float32
            assert inputs["visual"].shape == (10, 7, 7, 512) and inputs["visual"].dtype == torch.float32
            assert target.shape == (10,) and target.dtype == torch.int64
            assert torch.equal(target, torch.from_numpy(labels[video]))
            assert torch.equal(inputs["audio"], torch.from_numpy(arrays["audio_feature"][video]))
            assert torch.equal(inputs["visual"], torch.from_numpy(arrays["visual_feature"][video]))
        dataset.close()


def test_background_segments_map_to_class_28(ave_data: AveData) -> None:
    root, _, _ = ave_data
    target = AVE(root, "train")[0][1]
    assert target[:3].tolist() == [BACKGROUND] * 3


def test_max_items(ave_data: AveData) -> None:
    assert len(AVE(ave_data[0], "train", max_items=2)) == 2


def test_pickles_after_use_and_works_in_worker_processes(ave_data: AveData) -> None:
    root, labels, _ = ave_data
    dataset = AVE(root, "test")
    first = dataset[0]  # opens the files in this process
    clone = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(clone[0][1], first[1])
    loader = DataLoader(dataset, batch_size=2, num_workers=1)
    inputs, target = next(iter(loader))
    assert inputs["visual"].shape == (2, 10, 7, 7, 512)
    assert torch.equal(target, torch.from_numpy(labels[ORDERS["test"]]))


def test_missing_file_is_named(ave_data: AveData) -> None:
    root, _, _ = ave_data
    (root / "val_order.h5").unlink()
    with pytest.raises(FileNotFoundError, match="val_order.h5"):
        AVE(root, "val")
    (root / "visual_feature.h5").unlink()
    with pytest.raises(FileNotFoundError, match="visual_feature.h5"):
        AVE(root, "train")


def test_wrong_key_shape_and_indices_are_rejected(ave_data: AveData) -> None:
    root, _, _ = ave_data
    with pytest.raises(ValueError, match="split"):
        AVE(root, "validation")
    with h5py.File(root / "test_order.h5", "w") as handle:
        handle.create_dataset("order", data=np.array([0, 6]))
    with pytest.raises(ValueError, match="6 videos"):
        AVE(root, "test")
    with h5py.File(root / "test_order.h5", "w") as handle:
        handle.create_dataset("indices", data=np.array([0]))
    with pytest.raises(KeyError, match="'order'"):
        AVE(root, "test")
    with h5py.File(root / "audio_feature.h5", "w") as handle:
        handle.create_dataset("avadataset", data=np.zeros((6, 10, 64), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[N, 10, 128\]"):
        AVE(root, "train")


def test_non_finite_features_are_rejected(tmp_path: Path) -> None:
    write_ave(tmp_path, np.zeros((2, 10), dtype=np.int64), {"train": [0, 1]})
    with h5py.File(tmp_path / "audio_feature.h5", "r+") as handle:
        handle["avadataset"][1, 2, 3] = np.inf
    dataset = AVE(tmp_path, "train")
    assert torch.isfinite(dataset[0][0]["audio"]).all()
    with pytest.raises(ValueError, match="audio_feature.h5: video 1 holds non-finite"):
        dataset[1]


def test_label_rows_that_are_not_one_hot_take_the_argmax_and_are_reported(tmp_path: Path) -> None:
    labels = np.zeros((3, 10), dtype=np.int64)
    labels[1, 4] = 7
    write_ave(tmp_path, labels, {"train": [0, 1, 2]})
    with h5py.File(tmp_path / "labels.h5", "r+") as handle:
        handle["avadataset"][1, 4, BACKGROUND] = 1.0  # two ones: classes 7 and 28 -> argmax 7
        handle["avadataset"][2, 0, :] = 0.0  # all zero -> argmax 0
        handle["avadataset"][2, 9, :] = 0.0
        handle["avadataset"][2, 9, 3] = 0.6  # a soft label -> argmax 3
    with pytest.warns(UserWarning, match=r"AVE train: 3 segment label rows that are not one-hot") as record:
        dataset = AVE(tmp_path, "train")
    assert len(record) == 1 and "video 1, segment 4: non-zero entries {7: 1.0, 28: 1.0}" in str(record[0].message)
    assert dataset[1][1].tolist() == [0, 0, 0, 0, 7, 0, 0, 0, 0, 0]
    assert dataset[2][1].tolist() == [0] * 9 + [3]
    assert [note.where.split(": ")[1] for note in dataset.notes] == [
        "video 1, segment 4", "video 2, segment 0", "video 2, segment 9"
    ]
    assert dataset.notes[1].detail == "all zero"


def test_psp_label_file_is_accepted_and_preferred(tmp_path: Path) -> None:
    labels = np.full((2, 10), 5, dtype=np.int64)
    write_ave(tmp_path, labels, {"test": [0, 1]})
    (tmp_path / "labels.h5").rename(tmp_path / "right_labels.h5")
    dataset = AVE(tmp_path, "test")
    assert dataset.labels_path.name == "right_labels.h5" and dataset.notes == []
    assert dataset[0][1].tolist() == [5] * 10
    with h5py.File(tmp_path / "labels.h5", "w") as handle:  # AVE-ECCV18's labels.h5 as well
        handle.create_dataset("avadataset", data=np.eye(29)[np.zeros((2, 10), dtype=np.int64)])
    with pytest.warns(UserWarning, match="label files found more than once"):
        both = AVE(tmp_path, "test")
    assert both.labels_path.name == "right_labels.h5" and both[0][1].tolist() == [5] * 10
    assert AVE(tmp_path, "test", labels_file="labels.h5")[0][1].tolist() == [0] * 10
    (tmp_path / "labels.h5").unlink()
    (tmp_path / "right_labels.h5").unlink()
    with pytest.raises(FileNotFoundError, match="right_labels.h5"):
        AVE(tmp_path, "test")


def test_label_file_of_another_size_is_rejected(tmp_path: Path) -> None:
    write_ave(tmp_path, np.zeros((2, 10), dtype=np.int64), {"train": [0, 1]})
    with h5py.File(tmp_path / "labels.h5", "w") as handle:
        handle.create_dataset("avadataset", data=np.zeros((3, 10, 29)))
    with pytest.raises(ValueError, match="disagree on the number of videos"):
        AVE(tmp_path, "train")
