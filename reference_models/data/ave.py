"""AVE (Audio-Visual Event) pre-extracted features in the layout of YapengTian/AVE-ECCV18.

Layout under ``root`` (the official ``data/`` folder)::

    root/audio_feature.h5    key "avadataset": [N, 10, 128]        VGGish, one vector per 1-s segment
    root/visual_feature.h5   key "avadataset": [N, 10, 7, 7, 512]   VGG-19 pool5 maps per segment
    root/labels.h5           key "avadataset": [N, 10, 29]          one-hot; class 28 = background
    root/{train,val,test}_order.h5  key "order": [n] indices into N (4,143 videos: 3,339 / 402 / 402)

Files are opened lazily, once per process (h5py handles cannot be pickled or shared across a
fork), so the dataset works with any number of DataLoader workers.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["AVE_CLASSES", "NUM_SEGMENTS", "BACKGROUND", "AVE", "one_hot_to_index"]

#: The 28 event classes in the order of the official ``Annotations.txt``, then background (index 28).
AVE_CLASSES: tuple[str, ...] = (
    "Church bell",
    "Male speech, man speaking",
    "Bark",
    "Fixed-wing aircraft, airplane",
    "Race car, auto racing",
    "Female speech, woman speaking",
    "Helicopter",
    "Violin, fiddle",
    "Flute",
    "Ukulele",
    "Frying (food)",
    "Truck",
    "Shofar",
    "Motorcycle",
    "Acoustic guitar",
    "Train horn",
    "Clock",
    "Banjo",
    "Goat",
    "Baby cry, infant cry",
    "Bus",
    "Chainsaw",
    "Cat",
    "Horse",
    "Toilet flush",
    "Rodents, rats, mice",
    "Accordion",
    "Mandolin",
    "Background",
)
BACKGROUND = len(AVE_CLASSES) - 1
NUM_SEGMENTS = 10
SPLITS = ("train", "val", "test")
FEATURE_KEY = "avadataset"
ORDER_KEY = "order"
_FILES = {
    "audio": ("audio_feature.h5", (NUM_SEGMENTS, 128)),
    "visual": ("visual_feature.h5", (NUM_SEGMENTS, 7, 7, 512)),
    "labels": ("labels.h5", (NUM_SEGMENTS, len(AVE_CLASSES))),
}


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"AVE file not found: {path}")


def _dataset_in(handle: h5py.File, key: str, path: Path) -> h5py.Dataset:
    if key not in handle:
        raise KeyError(f"{path} has no dataset {key!r} (found {sorted(handle.keys())})")
    return handle[key]


def _read_order(path: Path, num_videos: int) -> np.ndarray:
    _require_file(path)
    with h5py.File(path, "r") as handle:
        raw = np.asarray(_dataset_in(handle, ORDER_KEY, path)[()])
    order = raw.reshape(-1) if raw.ndim > 1 and raw.size == raw.shape[0] else raw
    if order.ndim != 1 or order.size == 0:
        raise ValueError(f"{path}: {ORDER_KEY!r} must be a non-empty list of indices, got shape {raw.shape}")
    if not np.all(np.equal(np.mod(order, 1), 0)):
        raise ValueError(f"{path}: {ORDER_KEY!r} holds non-integer indices")
    order = order.astype(np.int64)
    if order.min() < 0 or order.max() >= num_videos:
        raise ValueError(
            f"{path}: indices span [{order.min()}, {order.max()}] "
            f"but the feature files hold {num_videos} videos"
        )
    return order


def one_hot_to_index(rows: np.ndarray, where: str) -> Tensor:
    """Class index of every one-hot row of ``rows`` [10, 29]; a row that is not one-hot is an error."""
    rows = np.asarray(rows)
    ones = rows == 1
    if not (np.all(ones | (rows == 0)) and np.all(ones.sum(axis=-1) == 1)):
        raise ValueError(f"AVE labels of {where} are not one-hot per segment")
    return torch.from_numpy(ones.argmax(axis=-1).astype(np.int64))


class AVE(Dataset):
    """AVE videos: ``dataset[i] -> ({"audio": [10, 128], "visual": [10, 7, 7, 512]}, target [10])``.

    ``target`` holds the class index of each 1-s segment (0..27 events, 28 background), int64.
    ``max_items`` keeps only the first videos of the split (smoke runs).
    """

    modalities: tuple[str, ...] = ("audio", "visual")
    class_names: tuple[str, ...] = AVE_CLASSES
    num_classes: int = len(AVE_CLASSES)

    def __init__(self, root: str | Path, split: str = "train", *, max_items: int | None = None) -> None:
        if split not in SPLITS:
            raise ValueError(f"AVE split must be one of {SPLITS}, got {split!r}")
        if max_items is not None and max_items <= 0:
            raise ValueError(f"max_items must be positive or None, got {max_items}")
        root = Path(root)
        self.split = split
        self.paths = {name: root / filename for name, (filename, _) in _FILES.items()}
        num_videos = self._check_features()
        order = _read_order(root / f"{split}_order.h5", num_videos)
        self.order = order[:max_items] if max_items is not None else order
        self._handles: dict[str, h5py.File] | None = None
        self._owner_pid: int | None = None

    def _check_features(self) -> int:
        counts = {}
        for name, (_, segment_shape) in _FILES.items():
            path = self.paths[name]
            _require_file(path)
            with h5py.File(path, "r") as handle:
                shape = _dataset_in(handle, FEATURE_KEY, path).shape
            if tuple(shape[1:]) != segment_shape:
                expected = ", ".join(map(str, segment_shape))
                raise ValueError(f"{path}: expected {FEATURE_KEY!r} of shape [N, {expected}], got {list(shape)}")
            counts[name] = shape[0]
        if len(set(counts.values())) != 1:
            raise ValueError(f"AVE feature files disagree on the number of videos: {counts}")
        return counts["audio"]

    def _files(self) -> dict[str, h5py.File]:
        pid = os.getpid()
        if self._handles is None or self._owner_pid != pid:
            self._handles = {name: h5py.File(path, "r") for name, path in self.paths.items()}
            self._owner_pid = pid
        return self._handles

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        state["_handles"] = None
        state["_owner_pid"] = None
        return state

    def close(self) -> None:
        """Close this process's file handles (they reopen on the next access)."""
        if self._handles is not None and self._owner_pid == os.getpid():
            for handle in self._handles.values():
                handle.close()
        self._handles = None
        self._owner_pid = None

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index: int) -> tuple[dict[str, Tensor], Tensor]:
        video = int(self.order[index])
        files = self._files()
        features = {}
        for modality in self.modalities:
            array = np.asarray(files[modality][FEATURE_KEY][video], dtype=np.float32)
            if not np.isfinite(array).all():
                raise ValueError(f"{self.paths[modality]}: video {video} holds non-finite features")
            features[modality] = torch.from_numpy(array)
        return features, one_hot_to_index(files["labels"][FEATURE_KEY][video], f"video {video}")
