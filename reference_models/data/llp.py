"""LLP (Look, Listen and Parse) features and annotations in the layout of AVVP-ECCV20.

AVVP-ECCV20 = Tian, Li & Xu, "Unified Multisensory Perception: Weakly-Supervised Audio-Visual Video
Parsing", ECCV 2020 (official code: github.com/YapengTian/AVVP-ECCV20).

Layout under ``root`` (the official ``data/`` CSVs next to the released ``feats`` folder)::

    root/AVVP_train.csv, AVVP_val_pd.csv, AVVP_test_pd.csv
        tab-separated, header ``filename  event_labels``; filename ``<11-char YouTube id>_<start>_<end>``,
        event_labels comma-separated class names (video-level, weak)
    root/AVVP_eval_audio.csv, AVVP_eval_visual.csv
        tab-separated, header ``filename  onset  offset  event_labels``; one row per event, integer
        seconds, the event covering segments [onset, offset) (val and test videos only)
    root/feats/vggish/<id>.npy        [10, 128]   audio, one VGGish vector per 1-s snippet
    root/feats/res152/<id>.npy        [80, 2048]  appearance, ResNet-152 on 8 frames per snippet
    root/feats/r2plus1d_18/<id>.npy   [10, 512]   motion, R(2+1)D-18 per snippet

``feats_root`` overrides ``root/feats``. Feature files are named by the first 11 characters of the
filename, as the official loader's ``filename[:11]``: a YouTube id for most rows, whatever the
start/end times look like (some train rows carry decimal times, ``AP0061o0Nvk_101.8_111.8``).

The visual input is appearance and motion concatenated per snippet (Fu, Gao & Xu, "Multimodal
Imbalance-Aware Gradient Modulation for Weakly-supervised Audio-Visual Video Parsing",
implementation details): the 80 appearance rows are averaged in groups of 8 consecutive rows to 10
snippets — the official network average-pools the same groups after its first linear layer, which is
the same thing because a linear layer commutes with averaging — then joined with the motion
features → [10, 2560].

The dense labels are built as the official evaluation builds them, ``label[class, onset:offset] = 1``
per row, and rows it gets past are tolerated, counted and reported (`DataNote`): a row whose offset
precedes its onset marks nothing and is skipped; a zero-length row marks nothing; bounds outside
[0, 10] are clipped; non-integer bounds are truncated (the official ``int()``).
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from reference_models.data.notes import DataNote, warn_notes

__all__ = ["LLP_CLASSES", "NUM_SEGMENTS", "FEATURES", "LLP", "multi_hot", "video_id", "feature_shape_problem"]

#: The 25 event classes in the order of the official ``dataloader.py``.
LLP_CLASSES: tuple[str, ...] = (
    "Speech",
    "Car",
    "Cheering",
    "Dog",
    "Cat",
    "Frying_(food)",
    "Basketball_bounce",
    "Fire_alarm",
    "Chainsaw",
    "Cello",
    "Banjo",
    "Singing",
    "Chicken_rooster",
    "Violin_fiddle",
    "Vacuum_cleaner",
    "Baby_laughter",
    "Accordion",
    "Lawn_mower",
    "Motorcycle",
    "Helicopter",
    "Acoustic_guitar",
    "Telephone_bell_ringing",
    "Baby_cry_infant_cry",
    "Blender",
    "Clapping",
)
NUM_SEGMENTS = 10
SPLIT_FILES = {"train": "AVVP_train.csv", "val": "AVVP_val_pd.csv", "test": "AVVP_test_pd.csv"}
EVAL_FILES = {"audio": "AVVP_eval_audio.csv", "visual": "AVVP_eval_visual.csv"}
EVAL_COLUMNS = ("filename", "onset", "offset", "event_labels")
FEATURES = {"audio": ("vggish", 128), "appearance": ("res152", 2048), "motion": ("r2plus1d_18", 512)}
_CLASS_INDEX = {name: index for index, name in enumerate(LLP_CLASSES)}
ID_LENGTH = 11
_ID = re.compile(r"[A-Za-z0-9_-]{11}")
_REVERSED = "eval rows whose offset precedes their onset: skipped (the official evaluation's slice is empty)"
_ZERO_LENGTH = "eval rows of zero length (offset = onset): they mark no segment, as in the official evaluation"
_OUTSIDE = f"eval rows with bounds outside [0, {NUM_SEGMENTS}]: clipped to the video"
_FRACTIONAL = "eval rows with non-integer bounds: truncated, as the official int()"
_SHOWN_MISSING = 5


def multi_hot(names: list[str], where: str) -> Tensor:
    """Float [25] vector with 1 at each named class."""
    target = torch.zeros(len(LLP_CLASSES))
    for name in names:
        if name not in _CLASS_INDEX:
            raise ValueError(f"{where}: unknown LLP class {name!r}")
        target[_CLASS_INDEX[name]] = 1.0
    return target


def _read_table(path: Path, columns: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    if not path.is_file():
        raise FileNotFoundError(f"LLP annotation file not found: {path}")
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}, header is {reader.fieldnames}")
        return [(reader.line_num, row) for row in reader]


def video_id(filename: str, where: str) -> str:
    """The feature-file name of a row: the filename's first 11 characters (the official ``filename[:11]``)."""
    if len(filename) < ID_LENGTH or not _ID.fullmatch(filename[:ID_LENGTH]):
        raise ValueError(
            f"{where}: filename {filename!r} does not start with an 11-character YouTube id "
            "(letters, digits, '-' or '_')"
        )
    return filename[:ID_LENGTH]


def feature_shape_problem(name: str, shape: tuple[int, ...]) -> str | None:
    """What is wrong with a feature array of ``shape`` for feature ``name`` (a key of ``FEATURES``), or ``None``.

    Every feature has 10 rows (one per snippet) of its width; appearance may have any multiple of 10
    (frames per snippet), averaged per snippet by the loader.
    """
    width = FEATURES[name][1]
    rows = shape[0] if len(shape) == 2 else 0
    rows_ok = rows == NUM_SEGMENTS or (name == "appearance" and rows > 0 and rows % NUM_SEGMENTS == 0)
    if rows_ok and shape[1] == width:
        return None
    expected_rows = "a multiple of 10" if name == "appearance" else "10"
    return f"feature shape {list(shape)}, expected {expected_rows} rows of width {width}"


def _segment_bound(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"{where}: onset/offset {text!r} is not a number of seconds")
    return value


def _oddity(onset: float, offset: float) -> str | None:
    """The kind of note an eval row with these bounds gets, if any."""
    if offset < onset:
        return _REVERSED
    if offset == onset:
        return _ZERO_LENGTH
    if min(onset, offset) < 0 or max(onset, offset) > NUM_SEGMENTS:
        return _OUTSIDE
    if not (onset.is_integer() and offset.is_integer()):
        return _FRACTIONAL
    return None


def _load_segment_labels(path: Path, wanted: set[str], notes: list[DataNote]) -> dict[str, Tensor]:
    """Per video, the [25, 10] 0/1 matrix with ``label[class, onset:offset] = 1`` for every row."""
    labels: dict[str, Tensor] = {}
    for line, row in _read_table(path, EVAL_COLUMNS):
        filename = row["filename"]
        if filename not in wanted:
            continue
        where = f"{path}:{line}"
        name = row["event_labels"]
        if name not in _CLASS_INDEX:
            raise ValueError(f"{where}: unknown LLP class {name!r}")
        onset, offset = _segment_bound(row["onset"], where), _segment_bound(row["offset"], where)
        matrix = labels.setdefault(filename, torch.zeros(len(LLP_CLASSES), NUM_SEGMENTS))
        kind = _oddity(onset, offset)
        if kind is not None:
            notes.append(DataNote(kind, where, "  ".join(row[column] for column in EVAL_COLUMNS)))
        first, last = (min(max(int(bound), 0), NUM_SEGMENTS) for bound in (onset, offset))
        matrix[_CLASS_INDEX[name], first:last] = 1.0  # empty when offset <= onset
    return labels


class LLP(Dataset):
    """LLP videos: ``dataset[i] -> ({"audio": [10, 128], "visual": [10, 2560]}, target [25])``.

    ``target`` is the video-level multi-hot label (float). For ``val``/``test``,
    `segment_labels` gives the dense audio and visual ground truth of the AVVP evaluation.
    ``max_items`` keeps only the first videos of the split (smoke runs).
    """

    modalities: tuple[str, ...] = ("audio", "visual")
    class_names: tuple[str, ...] = LLP_CLASSES
    num_classes: int = len(LLP_CLASSES)

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        feats_root: str | Path | None = None,
        max_items: int | None = None,
    ) -> None:
        if split not in SPLIT_FILES:
            raise ValueError(f"LLP split must be one of {tuple(SPLIT_FILES)}, got {split!r}")
        if max_items is not None and max_items <= 0:
            raise ValueError(f"max_items must be positive or None, got {max_items}")
        root = Path(root)
        self.split = split
        feats = Path(feats_root) if feats_root is not None else root / "feats"
        self.feature_dirs = {name: feats / folder for name, (folder, _) in FEATURES.items()}
        for folder in self.feature_dirs.values():
            if not folder.is_dir():
                raise FileNotFoundError(f"LLP feature folder not found: {folder}")

        split_path = root / SPLIT_FILES[split]
        rows = _read_table(split_path, ("filename", "event_labels"))
        if not rows:
            raise ValueError(f"LLP split file {split_path} lists no videos")
        rows = rows[:max_items] if max_items is not None else rows
        self.filenames = [row["filename"] for _, row in rows]
        self.video_ids = [video_id(row["filename"], f"{split_path}:{line}") for line, row in rows]
        self.targets = [
            multi_hot([name.strip() for name in row["event_labels"].split(",")], f"{split_path}:{line}")
            for line, row in rows
        ]
        self._check_feature_files()

        self.notes: list[DataNote] = []
        self._segment_labels: dict[str, dict[str, Tensor]] = {}
        if split != "train":
            wanted = set(self.filenames)
            self._segment_labels = {
                modality: _load_segment_labels(root / filename, wanted, self.notes)
                for modality, filename in EVAL_FILES.items()
            }
        warn_notes(f"LLP {split}", self.notes)

    def _check_feature_files(self) -> None:
        missing = [
            folder / f"{video}.npy"
            for video in self.video_ids
            for folder in self.feature_dirs.values()
            if not (folder / f"{video}.npy").is_file()
        ]
        if missing:
            shown = ", ".join(map(str, missing[:_SHOWN_MISSING]))
            raise FileNotFoundError(f"{len(missing)} LLP feature file(s) missing, first: {shown}")

    def __len__(self) -> int:
        return len(self.filenames)

    def _feature(self, name: str, video: str) -> np.ndarray:
        path = self.feature_dirs[name] / f"{video}.npy"
        array = np.load(path)
        problem = feature_shape_problem(name, array.shape)
        if problem is not None:
            raise ValueError(f"{path}: {problem}")
        if not np.isfinite(array).all():
            raise ValueError(f"{path} holds non-finite values")
        return array.astype(np.float32, copy=False)

    def __getitem__(self, index: int) -> tuple[dict[str, Tensor], Tensor]:
        video = self.video_ids[index]
        audio = torch.from_numpy(self._feature("audio", video))
        frames = torch.from_numpy(self._feature("appearance", video))
        appearance = frames.reshape(NUM_SEGMENTS, -1, frames.shape[-1]).mean(dim=1)
        motion = torch.from_numpy(self._feature("motion", video))
        visual = torch.cat([appearance, motion], dim=-1)
        return {"audio": audio, "visual": visual}, self.targets[index].clone()

    def segment_labels(self, index: int) -> dict[str, Tensor]:
        """Dense ground truth of video ``index``: ``{"audio": [25, 10], "visual": [25, 10]}`` of 0/1 floats.

        Videos without rows in an eval file have all-zero labels for that modality (as in the
        official evaluation). Only ``val`` and ``test`` carry dense labels.
        """
        if self.split == "train":
            raise ValueError("the LLP train split has only video-level labels; segment labels exist for val/test")
        filename = self.filenames[index]
        empty = torch.zeros(len(LLP_CLASSES), NUM_SEGMENTS)
        return {
            modality: labels.get(filename, empty).clone() for modality, labels in self._segment_labels.items()
        }
