"""CREMA-D in the on-disk layout of the official OGM-GE code (Peng et al., CVPR 2022).

Default layout under ``root`` (the official defaults are ``--audio_path CREMA-D/AudioWAV`` and
``--visual_path CREMA-D``; its split files live in ``data/CREMAD/`` of the official repository:
copy them next to the data or pass ``splits_root``)::

    root/train.csv                      6,698 rows, no header: ``1088_IOM_NEU_XX,NEU``
    root/test.csv                       744 rows, same format
    root/AudioWAV/<clip>.wav            the CREMA-D audio release (16 kHz mono)
    root/Image-{fps:02d}-FPS/<clip>/*.jpg  frames extracted at ``fps`` frames per second

``audio_root`` and ``visual_root`` override the two data folders; ``visual_root`` is the folder that
*holds* ``Image-{fps:02d}-FPS``, as in the official code.

Audio, as the official ``librosa.load(wav, sr=22050)`` then ``librosa.stft``: the wav is read with
``soundfile`` (channels averaged), resampled to 22,050 Hz (`resample`, soxr ``soxr_hq`` by default,
which is what librosa >= 0.10 does), tiled to exactly 3 s, clipped to [−1, 1], and turned into
``log(|STFT| + 1e-7)`` with n_fft 512, hop 353, zero padding by default (librosa >= 0.9) →
[1, 257, 188].

Visual: ``num_frames`` jpg frames chosen by ``frame_choice`` (`FRAME_CHOICES`), decoded as RGB with
Pillow and transformed each on its own, as the official code does: train RandomResizedCrop(224) and
a horizontal flip, test Resize((224, 224)), both ImageNet-normalised. Output [3, T, 224, 224].
"""

from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import soxr
import torch
import torchaudio.functional as audio_functional
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

from reference_models.data.notes import DataNote, warn_notes

__all__ = [
    "CREMAD_CLASSES",
    "SAMPLE_RATE",
    "CLIP_SAMPLES",
    "N_FFT",
    "HOP_LENGTH",
    "IMAGE_SIZE",
    "RESAMPLERS",
    "PAD_MODES",
    "FRAME_CHOICES",
    "CremaDClip",
    "CremaD",
    "resample",
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
#: ``soxr_hq``: librosa >= 0.10's default; ``kaiser_best``: resampy, librosa < 0.10's default (needs the
#: ``resampy`` package); ``torchaudio``: torchaudio's default sinc resampler (far from both above 8 kHz).
RESAMPLERS = ("soxr_hq", "kaiser_best", "torchaudio")
#: STFT padding of the centred frames: ``constant`` (zeros) since librosa 0.9.0, ``reflect`` before.
PAD_MODES = ("constant", "reflect")
#: ``middle``: centres of equal slices of the time-ordered frames (gradmod's default, deterministic);
#: ``first``: the first files in directory order (``os.listdir``), what the official code reads;
#: ``random``: distinct random frames per draw, in time order (what the official code draws, then ignores).
FRAME_CHOICES = ("middle", "first", "random")
_JPEG_SUFFIXES = (".jpg", ".jpeg")
_SKIPPED = "clips skipped for a missing wav or missing jpg frames (the official code skips them silently)"
_EMPTY_ROWS = "empty rows skipped"
_EXTRA_COLUMNS = "rows with more than two columns: the first two used, as the official code does"


def resample(
    samples: np.ndarray, sample_rate: int, target_rate: int = SAMPLE_RATE, resampler: str = "soxr_hq"
) -> np.ndarray:
    """``librosa.resample(samples, orig_sr=sample_rate, target_sr=target_rate, res_type=resampler)``.

    1-D float32 samples; the result has librosa's length ``ceil(n · target_rate / sample_rate)``
    (zero-padded or cut at the end) and is returned unchanged when the rates agree.
    """
    if resampler not in RESAMPLERS:
        raise ValueError(f"resampler must be one of {RESAMPLERS}, got {resampler!r}")
    if sample_rate == target_rate:
        return samples
    if resampler == "soxr_hq":
        resampled = soxr.resample(samples, sample_rate, target_rate, quality="soxr_hq")
    elif resampler == "kaiser_best":
        try:
            import resampy
        except ImportError as error:
            raise ImportError("resampler='kaiser_best' needs the resampy package: pip install resampy") from error
        resampled = resampy.resample(samples, sample_rate, target_rate, filter="kaiser_best")
    else:
        resampled = audio_functional.resample(torch.from_numpy(samples), sample_rate, target_rate).numpy()
    length = int(np.ceil(samples.shape[-1] * (float(target_rate) / sample_rate)))
    return np.pad(resampled[:length], (0, max(0, length - resampled.shape[-1]))).astype(np.float32, copy=False)


def log_spectrogram(
    waveform: Tensor, sample_rate: int, *, resampler: str = "soxr_hq", pad_mode: str = "constant"
) -> Tensor:
    """Official CREMA-D audio feature of a mono waveform, shape [1, 257, 188].

    ``x`` = waveform `resample`-d to 22,050 Hz, repeated until it covers 66,150 samples (3 s) and cut
    there, clipped to [−1, 1]; feature = ``log(|STFT(x)| + 1e-7)`` with a periodic Hann window of 512,
    hop 353, centred frames padded by ``pad_mode`` (`PAD_MODES`), no normalisation. As in librosa, the
    STFT is computed in float64 and rounded to complex64 before the magnitude. The official code tiles
    exactly three times, which is the same for every clip of at least 1 s; we tile as often as needed
    so shorter clips give the same shape.
    """
    if waveform.dim() != 1:
        raise ValueError(f"waveform must be 1-D (mono samples), got shape {tuple(waveform.shape)}")
    if waveform.numel() == 0:
        raise ValueError("waveform is empty")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if not torch.isfinite(waveform).all():
        raise ValueError("waveform holds non-finite samples")
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
    samples = resample(waveform.to(torch.float32).numpy(), sample_rate, resampler=resampler)
    tiled = np.tile(samples, math.ceil(CLIP_SAMPLES / samples.size))[:CLIP_SAMPLES].clip(-1.0, 1.0)
    spectrum = torch.stft(
        torch.from_numpy(tiled).to(torch.float64),
        n_fft=N_FFT,
        hop_length=HOP_LENGTH,
        window=torch.hann_window(N_FFT, dtype=torch.float64),
        center=True,
        pad_mode=pad_mode,
        return_complex=True,
    )
    return torch.log(spectrum.to(torch.complex64).abs() + LOG_EPSILON).unsqueeze(0)


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
    """One usable clip: its name, label index, wav file and jpg frames.

    ``frames`` is in time order (file names sorted naturally), ``listed`` in directory order
    (``os.listdir``, the order the official code reads).
    """

    name: str
    label: int
    wav: Path
    frames: tuple[Path, ...]
    listed: tuple[Path, ...]


def _read_split(csv_path: Path, notes: list[DataNote]) -> list[tuple[int, str, int]]:
    """``(line number, clip, label index)`` of every row of a split file."""
    if not csv_path.is_file():
        raise FileNotFoundError(f"CREMA-D split file not found: {csv_path}")
    class_index = {name: index for index, name in enumerate(CREMAD_CLASSES)}
    rows = []
    with csv_path.open(encoding="utf-8-sig", newline="") as handle:
        for line_number, row in enumerate(csv.reader(handle), start=1):
            where = f"{csv_path}:{line_number}"
            if not any(cell.strip() for cell in row):
                notes.append(DataNote(_EMPTY_ROWS, where))
                continue
            if len(row) < 2:
                raise ValueError(f"{where}: expected 'clip,LABEL', got {row}")
            if len(row) > 2:
                notes.append(DataNote(_EXTRA_COLUMNS, where, ",".join(row)))
            clip, label = row[0].strip(), row[1].strip()
            if label not in class_index:
                raise ValueError(f"{where}: unknown label {label!r}, expected one of {CREMAD_CLASSES}")
            rows.append((line_number, clip, class_index[label]))
    if not rows:
        raise ValueError(f"CREMA-D split file {csv_path} lists no clips")
    return rows


def _listed_frames(folder: Path) -> tuple[Path, ...]:
    """The jpg files of ``folder`` in directory order; none if it is no folder."""
    if not folder.is_dir():
        return ()
    return tuple(folder / name for name in os.listdir(folder) if name.lower().endswith(_JPEG_SUFFIXES))


class CremaD(Dataset):
    """CREMA-D clips: ``dataset[i] -> ({"audio": [1, 257, 188], "visual": [3, T, 224, 224]}, label)``.

    Clips of the split file whose wav is missing, or whose frame folder is missing or holds no jpg,
    are skipped and listed in ``skipped``; they and other tolerated oddities of the split file are
    recorded in ``notes`` and reported in one warning per kind. ``max_items`` keeps only the first
    usable clips (smoke runs).

    Options: ``resampler`` (`RESAMPLERS`) and ``pad_mode`` (`PAD_MODES`) choose the librosa version the
    audio feature reproduces: the defaults match librosa >= 0.10 (soxr, zero padding), ``"kaiser_best"``
    with ``"reflect"`` librosa < 0.9. ``frame_choice`` (`FRAME_CHOICES`) picks the ``num_frames`` frames
    of a clip; ``"first"`` reproduces the official code.
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
        frame_choice: str = "middle",
        resampler: str = "soxr_hq",
        pad_mode: str = "constant",
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
        for name, value, choices in (
            ("frame_choice", frame_choice, FRAME_CHOICES),
            ("resampler", resampler, RESAMPLERS),
            ("pad_mode", pad_mode, PAD_MODES),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        root = Path(root)
        self.split = split
        self.num_frames = num_frames
        self.frame_choice = frame_choice
        self.resampler = resampler
        self.pad_mode = pad_mode
        self.audio_root = Path(audio_root) if audio_root is not None else root / "AudioWAV"
        self.frames_root = (Path(visual_root) if visual_root is not None else root) / f"Image-{fps:02d}-FPS"
        for folder in (self.audio_root, self.frames_root):
            if not folder.is_dir():
                raise FileNotFoundError(f"CREMA-D folder not found: {folder}")
        self.csv_path = (Path(splits_root) if splits_root is not None else root) / f"{split}.csv"

        self.notes: list[DataNote] = []
        self.clips: list[CremaDClip] = []
        self.skipped: list[str] = []
        rows = _read_split(self.csv_path, self.notes)
        for line_number, clip, label in rows:
            wav = self.audio_root / f"{clip}.wav"
            listed = _listed_frames(self.frames_root / clip)
            if wav.is_file() and listed:
                frames = tuple(sorted(listed, key=lambda p: _natural_key(p.name)))
                self.clips.append(CremaDClip(clip, label, wav, frames, listed))
                continue
            self.skipped.append(clip)
            missing = [what for what, absent in (("wav", not wav.is_file()), ("jpg frames", not listed)) if absent]
            detail = f"{clip}: no " + " and no ".join(missing)
            self.notes.append(DataNote(_SKIPPED, f"{self.csv_path}:{line_number}", detail))
        if not self.clips:
            raise FileNotFoundError(
                f"none of the {len(rows)} clips of {self.csv_path} has both <clip>.wav in {self.audio_root} "
                f"and jpg frames in {self.frames_root}/<clip>/"
            )
        warn_notes(f"CREMA-D {split} ({len(rows)} clips listed)", self.notes)
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
        audio = log_spectrogram(waveform, sample_rate, resampler=self.resampler, pad_mode=self.pad_mode)
        return {"audio": audio, "visual": self._frames(clip)}, clip.label

    def chosen_frames(self, clip: CremaDClip) -> list[Path]:
        """The ``num_frames`` frame files of ``clip`` that ``frame_choice`` picks (``random``: a new draw).

        With fewer files than frames, files repeat: the last one (``first``), the nearest centres
        (``middle``) or random ones (``random``).
        """
        count, wanted = len(clip.frames), self.num_frames
        if self.frame_choice == "first":
            return [clip.listed[min(i, count - 1)] for i in range(wanted)]
        if self.frame_choice == "middle":
            return [clip.frames[i] for i in centre_indices(count, wanted)]
        draw = torch.randperm(count)[:wanted] if wanted <= count else torch.randint(count, (wanted,))
        return [clip.frames[i] for i in sorted(draw.tolist())]

    def _frames(self, clip: CremaDClip) -> Tensor:
        # one transform call per frame: each gets its own crop and flip, as in the official code
        frames = torch.stack([self.transform(read_rgb(path)) for path in self.chosen_frames(clip)])
        return frames.permute(1, 0, 2, 3).contiguous()  # [T, 3, 224, 224] -> [3, T, 224, 224]
