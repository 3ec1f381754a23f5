"""CREMA-D in the on-disk layout of the official OGM-GE code (``papers/README.md``, "CREMA-D protocol").

Default layout under ``root`` (the official defaults are ``--audio_path CREMA-D/AudioWAV`` and
``--visual_path CREMA-D``; its split files live in ``data/CREMAD/`` — copy them next to the data or
pass ``splits_root``)::

    root/train.csv                      6,698 rows, no header: ``1088_IOM_NEU_XX,NEU``
    root/test.csv                       744 rows, same format
    root/AudioWAV/<clip>.wav            the CREMA-D audio release (16 kHz mono)
    root/Image-{fps:02d}-FPS/<clip>/*.jpg  frames extracted at ``fps`` frames per second

``audio_root`` and ``visual_root`` override the two data folders; ``visual_root`` is the folder that
*holds* ``Image-{fps:02d}-FPS``, as in the official code.

Audio: the wav is read with ``soundfile`` (mixed to mono), resampled to 22,050 Hz, tiled to exactly
3 s, clipped to [−1, 1], and turned into ``log(|STFT| + 1e-7)`` with n_fft 512, hop 353 → [1, 257, 188].

Visual: ``num_frames`` frames at the centres of ``num_frames`` equal slices of the naturally sorted
jpg files (the official code draws random indices, then reads the *first* files in ``os.listdir``
order — an arbitrary order; we do not copy that), decoded as RGB with Pillow and transformed: train
RandomResizedCrop(224) + horizontal flip, test Resize((224, 224)), both ImageNet-normalised; the
frames of one clip share one crop/flip. Output [3, T, 224, 224].
"""

from __future__ import annotations

import csv
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio.functional as audio_functional
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

__all__ = [
    "CREMAD_CLASSES",
    "SAMPLE_RATE",
    "CLIP_SAMPLES",
    "N_FFT",
    "HOP_LENGTH",
    "IMAGE_SIZE",
    "CremaDClip",
    "CremaD",
    "log_spectrogram",
    "read_wav_mono",
    "read_rgb",
    "centre_indices",
]

#: Label order of the official code: NEU 0, HAP 1, SAD 2, FEA 3, DIS 4, ANG 5.
CREMAD_CLASSES: tuple[str, ...] = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
SAMPLE_RATE = 22_050
CLIP_SAMPLES = 3 * SAMPLE_RATE
N_FFT = 512
HOP_LENGTH = 353
LOG_EPSILON = 1e-7
IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLITS = ("train", "test")
_JPEG_SUFFIXES = (".jpg", ".jpeg")


def log_spectrogram(waveform: Tensor, sample_rate: int) -> Tensor:
    """Official CREMA-D audio feature of a mono waveform, shape [1, 257, 188].

    ``x`` = waveform resampled to 22,050 Hz, repeated until it covers 66,150 samples (3 s) and cut
    there, clipped to [−1, 1]; feature = ``log(|STFT(x)| + 1e-7)`` with a periodic Hann window of 512,
    hop 353, centred frames with reflect padding (librosa's default before 0.10), no normalisation.
    The official code tiles exactly three times, which is the same for every clip of at least 1 s; we
    tile as often as needed so shorter clips give the same shape.
    """
    if waveform.dim() != 1:
        raise ValueError(f"waveform must be 1-D (mono samples), got shape {tuple(waveform.shape)}")
    if waveform.numel() == 0:
        raise ValueError("waveform is empty")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if not torch.isfinite(waveform).all():
        raise ValueError("waveform holds non-finite samples")
    samples = waveform.to(torch.float32)
    if sample_rate != SAMPLE_RATE:
        samples = audio_functional.resample(samples, sample_rate, SAMPLE_RATE)
    repeats = math.ceil(CLIP_SAMPLES / samples.numel())
    samples = samples.repeat(repeats)[:CLIP_SAMPLES].clamp(-1.0, 1.0)
    spectrum = torch.stft(
        samples,
        n_fft=N_FFT,
        hop_length=HOP_LENGTH,
        window=torch.hann_window(N_FFT, dtype=samples.dtype),
        center=True,
        pad_mode="reflect",
        return_complex=True,
    )
    return torch.log(spectrum.abs() + LOG_EPSILON).unsqueeze(0)


def read_wav_mono(path: Path) -> tuple[Tensor, int]:
    """Read a wav file with ``soundfile`` as float32 in [−1, 1], channels averaged to mono."""
    data, sample_rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    if data.shape[0] == 0:
        raise ValueError(f"{path} holds no audio samples")
    return torch.from_numpy(data.mean(axis=1)), int(sample_rate)


def read_rgb(path: Path) -> Tensor:
    """Decode an image file as RGB uint8 [3, H, W] (with Pillow, as the official code)."""
    with Image.open(path) as image:
        pixels = np.array(image.convert("RGB"))
    return torch.from_numpy(pixels).permute(2, 0, 1)


def centre_indices(num_files: int, num_frames: int) -> list[int]:
    """Indices of the centres of ``num_frames`` equal slices of ``num_files`` items.

    ``index_i = floor((2i + 1) · num_files / (2 · num_frames))``; with fewer files than frames some
    files repeat.
    """
    if num_files <= 0 or num_frames <= 0:
        raise ValueError(f"need positive counts, got num_files={num_files}, num_frames={num_frames}")
    return [((2 * i + 1) * num_files) // (2 * num_frames) for i in range(num_frames)]


def _natural_key(name: str) -> list[int | str]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


@dataclass(frozen=True)
class CremaDClip:
    """One usable clip: its name, label index, wav file and sorted frame files."""

    name: str
    label: int
    wav: Path
    frames: tuple[Path, ...]


def _read_split(csv_path: Path) -> list[tuple[str, int]]:
    if not csv_path.is_file():
        raise FileNotFoundError(f"CREMA-D split file not found: {csv_path}")
    class_index = {name: index for index, name in enumerate(CREMAD_CLASSES)}
    rows = []
    with csv_path.open(encoding="utf-8-sig", newline="") as handle:
        for line_number, row in enumerate(csv.reader(handle), start=1):
            if not row:
                continue
            if len(row) != 2:
                raise ValueError(f"{csv_path}:{line_number}: expected 'clip,LABEL', got {row}")
            clip, label = row[0].strip(), row[1].strip()
            if label not in class_index:
                raise ValueError(
                    f"{csv_path}:{line_number}: unknown label {label!r}, expected one of {CREMAD_CLASSES}"
                )
            rows.append((clip, class_index[label]))
    if not rows:
        raise ValueError(f"CREMA-D split file {csv_path} lists no clips")
    return rows


def _frame_files(folder: Path) -> tuple[Path, ...]:
    if not folder.is_dir():
        return ()
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _JPEG_SUFFIXES]
    return tuple(sorted(files, key=lambda p: _natural_key(p.name)))


class CremaD(Dataset):
    """CREMA-D clips: ``dataset[i] -> ({"audio": [1, 257, 188], "visual": [3, T, 224, 224]}, label)``.

    Clips of the split file whose wav is missing, or whose frame folder is missing or holds no jpg,
    are skipped, listed in ``skipped`` and reported in one warning (the official code skips them
    silently). ``max_items`` keeps only the first usable clips (smoke runs).
    """

    modalities: tuple[str, ...] = ("audio", "visual")
    class_names: tuple[str, ...] = CREMAD_CLASSES
    num_classes: int = len(CREMAD_CLASSES)

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        fps: int = 1,
        num_frames: int = 1,
        train_transforms: bool | None = None,
        *,
        audio_root: str | Path | None = None,
        visual_root: str | Path | None = None,
        splits_root: str | Path | None = None,
        max_items: int | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"CREMA-D split must be one of {SPLITS}, got {split!r}")
        if fps <= 0 or num_frames <= 0:
            raise ValueError(f"fps and num_frames must be positive, got fps={fps}, num_frames={num_frames}")
        if max_items is not None and max_items <= 0:
            raise ValueError(f"max_items must be positive or None, got {max_items}")
        root = Path(root)
        self.split = split
        self.num_frames = num_frames
        self.audio_root = Path(audio_root) if audio_root is not None else root / "AudioWAV"
        self.frames_root = (Path(visual_root) if visual_root is not None else root) / f"Image-{fps:02d}-FPS"
        for folder in (self.audio_root, self.frames_root):
            if not folder.is_dir():
                raise FileNotFoundError(f"CREMA-D folder not found: {folder}")
        csv_path = (Path(splits_root) if splits_root is not None else root) / f"{split}.csv"

        self.clips: list[CremaDClip] = []
        self.skipped: list[str] = []
        rows = _read_split(csv_path)
        for clip, label in rows:
            wav = self.audio_root / f"{clip}.wav"
            frames = _frame_files(self.frames_root / clip)
            if wav.is_file() and frames:
                self.clips.append(CremaDClip(clip, label, wav, frames))
            else:
                self.skipped.append(clip)
        if not self.clips:
            raise FileNotFoundError(
                f"none of the {len(rows)} clips of {csv_path} has both <clip>.wav in {self.audio_root} "
                f"and jpg frames in {self.frames_root}/<clip>/"
            )
        if self.skipped:
            warnings.warn(
                f"CREMA-D {split}: skipped {len(self.skipped)} of {len(rows)} clips without a wav in "
                f"{self.audio_root} or jpg frames in {self.frames_root} (first: {self.skipped[:5]})",
                stacklevel=2,
            )
        if max_items is not None:
            self.clips = self.clips[:max_items]

        augment = split == "train" if train_transforms is None else train_transforms
        geometric: list[v2.Transform] = (
            [v2.RandomResizedCrop(IMAGE_SIZE), v2.RandomHorizontalFlip()]
            if augment
            else [v2.Resize((IMAGE_SIZE, IMAGE_SIZE))]
        )
        self.transform = v2.Compose(
            [*geometric, v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        )

    @property
    def labels(self) -> list[int]:
        """Label index of every clip, in dataset order."""
        return [clip.label for clip in self.clips]

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> tuple[dict[str, Tensor], int]:
        clip = self.clips[index]
        waveform, sample_rate = read_wav_mono(clip.wav)
        return {"audio": log_spectrogram(waveform, sample_rate), "visual": self._frames(clip)}, clip.label

    def _frames(self, clip: CremaDClip) -> Tensor:
        chosen = [clip.frames[i] for i in centre_indices(len(clip.frames), self.num_frames)]
        images = [read_rgb(path) for path in chosen]
        sizes = {tuple(image.shape) for image in images}
        if len(sizes) != 1:
            raise ValueError(f"frames of {clip.name} differ in size: {sorted(sizes)}")
        frames = self.transform(torch.stack(images))  # [T, 3, 224, 224], one crop for all frames
        return frames.permute(1, 0, 2, 3).contiguous()
