"""AVE (Audio-Visual Event) pre-extracted features in the layout of AVE-ECCV18 and PSP.

AVE-ECCV18 = Tian et al., "Audio-Visual Event Localization in Unconstrained Videos", ECCV 2018;
PSP = Zhou et al., "Positive Sample Propagation along the Audio-Visual Event Line", CVPR 2021.
Layout under ``root`` (their ``data/`` folder)::

    root/audio_feature.h5    key "avadataset": [N, 10, 128]        VGGish, one vector per 1-s segment
    root/visual_feature.h5   key "avadataset": [N, 10, 7, 7, 512]   VGG-19 pool5 maps per segment
    root/labels.h5           key "avadataset": [N, 10, 29]          one-hot; class 28 = background
      (or PSP's right_labels.h5, same format; preferred when both are there)
    root/{train,val,test}_order.h5  key "order": [n] indices into N (4,143 videos: 3,339 / 402 / 402)

A segment's class is the argmax of its label row, as the official ``compute_acc`` takes it; rows
that are not one-hot are counted and reported (`DataNote`), never an error. Labels are read once;
the feature files are opened lazily, once per process (h5py handles cannot be pickled or shared
across a fork), so the dataset works with any number of DataLoader workers.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from reference_models.data.notes import DataNote, warn_notes

__all__ = ["AVE_CLASSES", "NUM_SEGMENTS", "BACKGROUND", "LABEL_FILES", "AVE", "segment_classes"]

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
FEATURE_FILES = {
    "audio": ("audio_feature.h5", (NUM_SEGMENTS, 128)),
    "visual": ("visual_feature.h5", (NUM_SEGMENTS, 7, 7, 512)),
}
LABEL_SHAPE = (NUM_SEGMENTS, len(AVE_CLASSES))
#: Label files looked for, in order of preference: PSP's ``right_labels.h5`` (its README spells it
#: ``right_label.h5``), then AVE-ECCV18's ``labels.h5``.
LABEL_FILES = ("right_labels.h5", "right_label.h5", "labels.h5")
_NOT_ONE_HOT = "segment label rows that are not one-hot: class = the row's argmax, as the official compute_acc"
_SEVERAL_LABEL_FILES = "label files found more than once: the first of LABEL_FILES used"


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


def _videos_in(path: Path, segment_shape: tuple[int, ...]) -> int:
    """Number of videos in ``path`` after checking its dataset is [N, *segment_shape]."""
    with h5py.File(path, "r") as handle:
        shape = _dataset_in(handle, FEATURE_KEY, path).shape
    if tuple(shape[1:]) != segment_shape:
        expected = ", ".join(map(str, segment_shape))
        raise ValueError(f"{path}: expected {FEATURE_KEY!r} of shape [N, {expected}], got {list(shape)}")
    return shape[0]


def segment_classes(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class index of every label row ``[..., 29]`` (its argmax) and whether the row is exactly one-hot."""
    rows = np.asarray(rows)
    ones = rows == 1
    one_hot = np.all(ones | (rows == 0), axis=-1) & (ones.sum(axis=-1) == 1)
    return rows.argmax(axis=-1).astype(np.int64), one_hot


def _row_values(row: np.ndarray) -> str:
    nonzero = {int(c): float(row[c]) for c in np.flatnonzero(row)}
    return f"non-zero entries {nonzero}" if nonzero else "all zero"


def _find_labels(root: Path, labels_file: str | None, notes: list[DataNote]) -> Path:
    if labels_file is not None:
        path = root / labels_file
        _require_file(path)
        return path
    found = [root / name for name in LABEL_FILES if (root / name).is_file()]
    if not found:
        raise FileNotFoundError(f"AVE labels not found: none of {LABEL_FILES} in {root}")
    if len(found) > 1:
        notes.append(DataNote(_SEVERAL_LABEL_FILES, str(root), f"{[p.name for p in found]}: {found[0].name} used"))
    return found[0]


class AVE(Dataset):
    """AVE videos: ``dataset[i] -> ({"audio": [10, 128], "visual": [10, 7, 7, 512]}, target [10])``.

    ``target`` holds the class index of each 1-s segment (0..27 events, 28 background), int64: the
    argmax of its label row. ``labels_file`` names the label file (default: the first of
    `LABEL_FILES` present). Rows that are not one-hot, and label files found twice, are recorded in
    ``notes`` and reported in one warning per kind. ``max_items`` keeps only the first videos of the
    split (smoke runs).
    """

    modalities: tuple[str, ...] = ("audio", "visual")
    class_names: tuple[str, ...] = AVE_CLASSES
    num_classes: int = len(AVE_CLASSES)

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        labels_file: str | None = None,
        max_items: int | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"AVE split must be one of {SPLITS}, got {split!r}")
        if max_items is not None and max_items <= 0:
            raise ValueError(f"max_items must be positive or None, got {max_items}")
        root = Path(root)
        self.split = split
        self.notes: list[DataNote] = []
        self.paths = {name: root / filename for name, (filename, _) in FEATURE_FILES.items()}
        for path in self.paths.values():
            _require_file(path)
        self.labels_path = _find_labels(root, labels_file, self.notes)
        num_videos = self._check_features()
        order = _read_order(root / f"{split}_order.h5", num_videos)
        self.order = order[:max_items] if max_items is not None else order
        self.targets = self._read_targets()
        warn_notes(f"AVE {split}", self.notes)
        self._handles: dict[str, h5py.File] | None = None
        self._owner_pid: int | None = None

    def _check_features(self) -> int:
        counts = {name: _videos_in(self.paths[name], shape) for name, (_, shape) in FEATURE_FILES.items()}
        counts["labels"] = _videos_in(self.labels_path, LABEL_SHAPE)
        if len(set(counts.values())) != 1:
            raise ValueError(f"AVE feature and label files disagree on the number of videos: {counts}")
        return counts["audio"]

    def _read_targets(self) -> Tensor:
        """[n, 10] class indices of the split's videos; rows that are not one-hot become notes."""
        with h5py.File(self.labels_path, "r") as handle:
            rows = np.asarray(handle[FEATURE_KEY][()])[self.order]
        classes, one_hot = segment_classes(rows)
        for item, segment in zip(*np.nonzero(~one_hot)):
            where = f"{self.labels_path}: video {self.order[item]}, segment {segment}"
            self.notes.append(DataNote(_NOT_ONE_HOT, where, _row_values(rows[item, segment])))
        return torch.from_numpy(classes)

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
        return features, self.targets[index].clone()
