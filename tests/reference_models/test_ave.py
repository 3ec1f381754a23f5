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


def test_labels_that_are_not_one_hot_are_rejected(tmp_path: Path) -> None:
    write_ave(tmp_path, np.zeros((2, 10), dtype=np.int64), {"train": [0, 1]})
    with h5py.File(tmp_path / "labels.h5", "r+") as handle:
        handle["avadataset"][1, 4, :] = 0.0
    dataset = AVE(tmp_path, "train")
    assert dataset[0][1].tolist() == [0] * 10
    with pytest.raises(ValueError, match="video 1"):
        dataset[1]
