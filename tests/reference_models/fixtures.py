"""Writers of tiny datasets in exactly the real on-disk formats of CREMA-D, AVE and LLP.

Each writer takes a folder (a pytest ``tmp_path``) and produces the layout the loaders in
``reference_models.data`` read, with small, deterministic contents the tests can check.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np
import soundfile
from PIL import Image

from reference_models.data.ave import AVE_CLASSES
from reference_models.data.llp import LLP_CLASSES

CREMAD_WAV_RATE = 16_000  # the CREMA-D AudioWAV release: 16 kHz, 16-bit PCM, mono
#: A committed 16 kHz wav and its features computed with librosa: see ``data/make_cremad_reference.py``.
REFERENCE_DIR = Path(__file__).resolve().parent / "data"
CREMAD_REFERENCE_WAV = REFERENCE_DIR / "cremad_16k.wav"
CREMAD_REFERENCE = REFERENCE_DIR / "cremad_reference.npz"


def write_wav(path: Path, waveform: np.ndarray, sample_rate: int) -> None:
    """Write a mono (or [samples, channels]) float waveform as 16-bit PCM wav."""
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), waveform, sample_rate, subtype="PCM_16")


def tone(frequency: float, seconds: float, sample_rate: int, amplitude: float = 0.5) -> np.ndarray:
    """A sine tone as float32 samples."""
    time = np.arange(int(round(seconds * sample_rate))) / sample_rate
    return (amplitude * np.sin(2 * np.pi * frequency * time)).astype(np.float32)


def write_grey_jpeg(path: Path, level: int, height: int = 8, width: int = 8) -> None:
    """Write a flat RGB jpg of grey ``level`` (quality 100, so decoding gives ``level`` back)."""
    Image.fromarray(np.full((height, width, 3), level, dtype=np.uint8)).save(path, quality=100)


def write_frames(folder: Path, count: int, height: int = 8, width: int = 8, start: int = 0) -> list[Path]:
    """Write ``count`` jpg frames named like the official extractor (``{index:05d}.jpg``).

    Frame ``k`` is a flat image of grey level ``20 · (start + k) + 10``, so tests can tell frames apart.
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(count):
        path = folder / f"{(start + k) * 30:05d}.jpg"
        write_grey_jpeg(path, 20 * (start + k) + 10, height, width)
        paths.append(path)
    return paths


def write_cremad_split(path: Path, rows: Iterable[tuple[str, str]], byte_order_mark: bool = False) -> None:
    """Write a split file: no header, one ``clip,LABEL`` row per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8-sig" if byte_order_mark else "utf-8", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows(rows)


def write_cremad(
    root: Path,
    splits: Mapping[str, Sequence[tuple[str, str]]],
    *,
    fps: int = 1,
    frames_per_clip: int = 3,
    seconds: float = 1.5,
    without_wav: Iterable[str] = (),
    without_frames: Iterable[str] = (),
) -> Path:
    """CREMA-D layout: ``root/{split}.csv``, ``root/AudioWAV/<clip>.wav``, ``root/Image-{fps:02d}-FPS/<clip>/``.

    Clip ``i`` (over all splits) gets a tone of ``200 · (i + 1)`` Hz at 16 kHz. Clips in
    ``without_wav``/``without_frames`` are listed in the split file but lack that file/folder.
    """
    without_wav, without_frames = set(without_wav), set(without_frames)
    (root / "AudioWAV").mkdir(parents=True, exist_ok=True)
    (root / f"Image-{fps:02d}-FPS").mkdir(parents=True, exist_ok=True)
    clip_number = 0
    for split, rows in splits.items():
        write_cremad_split(root / f"{split}.csv", rows)
        for clip, _ in rows:
            clip_number += 1
            if clip not in without_wav:
                waveform = tone(200.0 * clip_number, seconds, CREMAD_WAV_RATE)
                write_wav(root / "AudioWAV" / f"{clip}.wav", waveform, CREMAD_WAV_RATE)
            if clip not in without_frames:
                write_frames(root / f"Image-{fps:02d}-FPS" / clip, frames_per_clip)
    return root


def write_ave(
    root: Path, segment_labels: np.ndarray, orders: Mapping[str, Sequence[int]], seed: int = 0
) -> dict[str, np.ndarray]:
    """AVE-ECCV18 layout: feature/label h5 files (key ``avadataset``), ``{split}_order.h5`` (key ``order``).

    ``segment_labels`` [N, 10] class indices (28 = background) become the one-hot ``labels.h5``;
    features are seeded Gaussian float32. Returns the written arrays by file stem.
    """
    root.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(seed)
    num_videos = segment_labels.shape[0]
    arrays = {
        "audio_feature": generator.standard_normal((num_videos, 10, 128)).astype(np.float32),
        "visual_feature": generator.standard_normal((num_videos, 10, 7, 7, 512)).astype(np.float32),
        "labels": np.eye(len(AVE_CLASSES), dtype=np.float64)[segment_labels],
    }
    for stem, array in arrays.items():
        with h5py.File(root / f"{stem}.h5", "w") as handle:
            handle.create_dataset("avadataset", data=array)
    for split, order in orders.items():
        with h5py.File(root / f"{split}_order.h5", "w") as handle:
            handle.create_dataset("order", data=np.asarray(order, dtype=np.int64))
    return arrays


def _write_tsv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


#: Filenames as in the real CSVs: most are ``<11-char YouTube id>_<start>_<end>``; some train rows carry
#: decimal times; some ids are shorter, so the official ``filename[:11]`` takes part of the start time.
LLP_SPLITS = {
    "train": [("BjCEufrlXm4_20_30", ["Speech", "Dog"]), ("AP0061o0Nvk_101.8_111.8", ["Singing", "Banjo"]),
              ("0PKI3zo26_4_12_22", ["Clapping"]), ("P7x4FV4lg_570_580", ["Frying_(food)"])],
    "val": [("4YdbENYcIyE_23_33", ["Baby_cry_infant_cry"]), ("KSRjje7GH44_60_70", ["Blender", "Speech"]),
            ("8DF2PxdT5tE_390_400", ["Cheering", "Speech"])],
    "test": [("HK1i4YyF5WU_30_40", ["Motorcycle", "Speech"])],
}
LLP_EVAL_AUDIO = [
    ("4YdbENYcIyE_23_33", 0, 4, "Baby_cry_infant_cry"),
    ("KSRjje7GH44_60_70", 8, 10, "Blender"),
    ("KSRjje7GH44_60_70", 0, 8, "Speech"),
    ("KSRjje7GH44_60_70", 9, 9, "Speech"),  # zero length, as in the real file: marks nothing
    ("8DF2PxdT5tE_390_400", 9, 0, "Cheering"),  # offset before onset, as in the real file: skipped
    ("8DF2PxdT5tE_390_400", 0, 5, "Speech"),
    ("HK1i4YyF5WU_30_40", 1, 7, "Speech"),
    ("HK1i4YyF5WU_30_40", 9, 10, "Speech"),
]
LLP_EVAL_VISUAL = [("KSRjje7GH44_60_70", 2, 5, "Blender"), ("HK1i4YyF5WU_30_40", 4, 6, "Motorcycle")]


def llp_features(index: int) -> dict[str, np.ndarray]:
    """Deterministic features of video ``index``: vggish [10, 128], res152 [80, 2048], r2plus1d_18 [10, 512].

    res152 row ``r`` is filled with ``r + 1000 · index``: rows 8s..8s+7 average to ``8s + 3.5 + 1000 · index``.
    """
    rows = np.arange(80, dtype=np.float32)[:, None] + 1000.0 * index
    return {
        "vggish": np.full((10, 128), float(index), dtype=np.float32),
        "res152": np.repeat(rows, 2048, axis=1),
        "r2plus1d_18": np.full((10, 512), -float(index), dtype=np.float32),
    }


def write_llp(
    root: Path,
    splits: Mapping[str, Sequence[tuple[str, Sequence[str]]]],
    eval_audio: Sequence[tuple[str, object, object, str]] = (),
    eval_visual: Sequence[tuple[str, object, object, str]] = (),
    without_features: Iterable[str] = (),
) -> Path:
    """AVVP-ECCV20 layout: tab-separated CSVs in ``root``, ``root/feats/{vggish,res152,r2plus1d_18}/<id>.npy``.

    ``splits`` maps ``train``/``val``/``test`` to (filename, class names) rows; the eval rows are
    (filename, onset, offset, class), written as given (strings such as ``"2.5"`` included). Video
    number ``i`` (over all splits) gets `llp_features` ``(i)`` under its id, the filename's first 11
    characters (as the official loader names them); ids in ``without_features`` get no feature files.
    """
    split_files = {"train": "AVVP_train.csv", "val": "AVVP_val_pd.csv", "test": "AVVP_test_pd.csv"}
    names = [name for rows in splits.values() for _, video_names in rows for name in video_names]
    unknown = [name for name in names if name not in LLP_CLASSES]
    if unknown:
        raise ValueError(f"fixture uses unknown LLP classes {unknown}")
    root.mkdir(parents=True, exist_ok=True)
    missing = set(without_features)
    number = 0
    for split, rows in splits.items():
        table = [(filename, ",".join(video_names)) for filename, video_names in rows]
        _write_tsv(root / split_files[split], ("filename", "event_labels"), table)
        for filename, _ in rows:
            video = filename[:11]
            if video not in missing:
                for folder, array in llp_features(number).items():
                    (root / "feats" / folder).mkdir(parents=True, exist_ok=True)
                    np.save(root / "feats" / folder / f"{video}.npy", array)
            number += 1
    for folder in ("vggish", "res152", "r2plus1d_18"):
        (root / "feats" / folder).mkdir(parents=True, exist_ok=True)
    header = ("filename", "onset", "offset", "event_labels")
    _write_tsv(root / "AVVP_eval_audio.csv", header, eval_audio)
    _write_tsv(root / "AVVP_eval_visual.csv", header, eval_visual)
    return root
