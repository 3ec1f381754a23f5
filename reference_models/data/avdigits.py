"""AV-digits: a generated audio-visual digits dataset, gradmod's embedded default (no download, fully seeded).

Each sample shows one digit (10 classes) in two modalities:

* **visual** ``[1, 28, 28]``: the digit's 5×7 glyph rendered with a random rotation, scale, shift,
  stroke thickness and contrast, in additive Gaussian noise of std ``visual_noise``;
* **audio** ``[1, 40, 32]``: a DTMF pair of tones for the digit (telephone keypad row/column
  frequencies) with random onset, duration, amplitude and pitch, in white noise at ``audio_snr_db``,
  as a standardised log-mel spectrogram (``torchaudio.transforms.MelSpectrogram``).

A fraction of the samples of each modality can be made uninformative (``audio_uninformative``,
``visual_uninformative``): their signal is pure noise (``uninformative="noise"``) or shows a random
*other* digit (``uninformative="other"``). The per-sample flags are kept in ``dataset.informative``.

The defaults reproduce the imbalance the papers study: the tones (5 dB SNR) are learnt within one
epoch, the noisy, rotated glyphs over several, so in joint training the audio branch dominates and the
visual branch stays under-trained. Measured with `reference_models.models.AVDigitsModel`
(concat head, SGD lr 0.01, momentum 0.9, batch 64, 6 epochs, seed 0, 6000/2000 samples; test accuracy,
unimodal = fused head with the other modality's features zeroed): joint training 89.5 % fused,
81.7 % audio-only, 54.7 % visual-only, while the same visual encoder trained alone reaches 86.8 % (audio
alone 81.9 %, its ceiling being 80 % informative + chance on the rest); with OGM-GE (α = 0.8) 93.6 %
fused and 68.7 % visual-only. Since 20 % of the audio is noise, the fused accuracy rewards a well
trained visual branch. Train and test sets are drawn from independent generators seeded by ``seed``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "AVDigits",
    "make_avdigits",
    "glyph_bitmaps",
    "render_digits",
    "synthesize_tones",
    "log_mel",
    "UNINFORMATIVE_KINDS",
    "SAMPLE_RATE",
    "DTMF_TONES",
]

#: How an uninformative sample's signal is replaced: by noise only, or by a random other digit's signal.
UNINFORMATIVE_KINDS = ("noise", "other")

#: Audio sample rate (Hz) and clip length (samples: 0.5 s).
SAMPLE_RATE = 8000
_NUM_SAMPLES = 4000
_NUM_MELS = 40
_NUM_FRAMES = 32
_IMAGE_SIZE = 28

_ROWS_HZ = (697.0, 770.0, 852.0, 941.0)
_COLS_HZ = (1209.0, 1336.0, 1477.0)
#: (low, high) tone pair of each digit, as on a telephone keypad (1-2-3 / 4-5-6 / 7-8-9 / * 0 #).
DTMF_TONES: tuple[tuple[float, float], ...] = tuple(
    (_ROWS_HZ[3], _COLS_HZ[1]) if d == 0 else (_ROWS_HZ[(d - 1) // 3], _COLS_HZ[(d - 1) % 3]) for d in range(10)
)

_GLYPHS = (
    (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
)

_CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_BLANK = -1  # content code of an uninformative "noise" sample: no digit drawn / played


def glyph_bitmaps() -> Tensor:
    """The ten 5×7 digit glyphs as a ``[10, 1, 7, 5]`` float tensor of 0/1."""
    rows = [[[float(c == "#") for c in line] for line in glyph] for glyph in _GLYPHS]
    return torch.tensor(rows).unsqueeze(1)


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def render_digits(
    content: Tensor,
    gen: torch.Generator,
    noise_std: float,
    max_rotation_deg: float = 25.0,
    max_shift: float = 0.25,
) -> Tensor:
    """Render digit glyphs into ``[N, 1, 28, 28]`` images (content ``-1``: noise only).

    The glyph (height 14–20 px) is placed by an affine warp: rotation ``U(±max_rotation_deg)``,
    shift ``U(±max_shift)`` of the half-width, bilinear sampling; the stroke is thickened by a random
    share ``t ~ U(0, 1)`` of its 3×3 dilation, ``x ← max(x, t·dilate(x))``; contrast ``U(0.5, 1)``;
    then Gaussian noise of std ``noise_std``.
    """
    n = content.shape[0]
    drawn = content.clamp_min(0)
    glyphs = glyph_bitmaps()[drawn]
    half_height = _uniform(n, 14.0, 20.0, gen) / _IMAGE_SIZE
    half_width = half_height * 5.0 / 7.0
    angle = _uniform(n, -1.0, 1.0, gen) * math.radians(max_rotation_deg)
    shift = _uniform(2 * n, -max_shift, max_shift, gen).view(n, 2)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # source = diag(1/w, 1/h) · R(angle) · (output − shift), in grid_sample's normalised coordinates
    linear = torch.stack(
        [torch.stack([cos / half_width, sin / half_width], 1), torch.stack([-sin / half_height, cos / half_height], 1)],
        1,
    )
    offset = -(linear @ shift.unsqueeze(2))
    grid = F.affine_grid(torch.cat([linear, offset], 2), [n, 1, _IMAGE_SIZE, _IMAGE_SIZE], align_corners=False)
    images = F.grid_sample(glyphs, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    thickness = torch.rand(n, 1, 1, 1, generator=gen)
    images = torch.maximum(images, thickness * F.max_pool2d(images, 3, stride=1, padding=1))
    images = images * _uniform(n, 0.5, 1.0, gen).view(n, 1, 1, 1)
    images = images * (content >= 0).float().view(n, 1, 1, 1)
    return images + noise_std * torch.randn(images.shape, generator=gen)


def synthesize_tones(content: Tensor, gen: torch.Generator, snr_db: float, pitch_jitter: float = 0.02) -> Tensor:
    """DTMF waveforms ``[N, 4000]`` at 8 kHz in white noise (content ``-1``: noise only).

    Each tone pair (keypad frequencies × ``(1 + U(±pitch_jitter))``) starts at ``U(0, 0.25)`` s, lasts
    ``U(0.15, 0.3)`` s with 5 ms linear fades, amplitude ``U(0.3, 1)``. The noise std is set so that the
    tone's mean power over its active span over the noise power equals ``10^(snr_db/10)``; a
    noise-only sample gets the noise of an amplitude-1 tone.
    """
    n = content.shape[0]
    tones = torch.tensor(DTMF_TONES)[content.clamp_min(0)]
    freqs = tones * (1.0 + _uniform(2 * n, -pitch_jitter, pitch_jitter, gen).view(n, 2))
    onset = _uniform(n, 0.0, 0.25, gen) * SAMPLE_RATE
    length = _uniform(n, 0.15, 0.3, gen) * SAMPLE_RATE
    amplitude = _uniform(n, 0.3, 1.0, gen)
    phase = 2 * math.pi * torch.rand(n, 2, generator=gen)
    t = torch.arange(_NUM_SAMPLES, dtype=torch.float32)
    fade = 0.005 * SAMPLE_RATE
    since_onset = t - onset.unsqueeze(1)
    envelope = (torch.minimum(since_onset, length.unsqueeze(1) - since_onset) / fade).clamp(0.0, 1.0)
    carrier = torch.sin(2 * math.pi * freqs.unsqueeze(2) * t / SAMPLE_RATE + phase.unsqueeze(2)).sum(1)
    signal = amplitude.unsqueeze(1) * envelope * carrier
    # a pair of unit sines has mean power 1; the noise is referenced to the tone's own amplitude
    noise_std = torch.where(content >= 0, amplitude, torch.ones_like(amplitude)) / math.sqrt(10 ** (snr_db / 10))
    signal = signal * (content >= 0).float().unsqueeze(1)
    return signal + noise_std.unsqueeze(1) * torch.randn(signal.shape, generator=gen)


def log_mel(waveforms: Tensor) -> Tensor:
    """``log(mel + 1e-6)`` spectrograms ``[N, 1, 40, 32]`` (n_fft 256, hop 125, 40 mels, 100 Hz–4 kHz)."""
    transform = torchaudio.transforms.MelSpectrogram(
        sample_rate=SAMPLE_RATE, n_fft=256, hop_length=125, n_mels=_NUM_MELS, f_min=100.0, f_max=4000.0
    )
    mel = transform(waveforms)[..., :_NUM_FRAMES]
    return torch.log(mel + 1e-6).unsqueeze(1)


class AVDigits(Dataset):
    """In-memory AV-digits split: ``ds[i] -> ({"audio": [1,40,32], "visual": [1,28,28]}, int digit)``.

    Attributes: ``audio``, ``visual`` (float tensors), ``targets`` (int64 ``[N]``), ``informative``
    (name → bool ``[N]``: whether the modality shows the sample's own digit), ``num_classes``,
    ``modalities``, ``class_names``.
    """

    num_classes = 10
    modalities = ("audio", "visual")
    class_names = _CLASS_NAMES

    def __init__(self, audio: Tensor, visual: Tensor, targets: Tensor, informative: dict[str, Tensor]) -> None:
        n = targets.shape[0]
        if audio.shape[0] != n or visual.shape[0] != n:
            raise ValueError(f"audio ({audio.shape[0]}), visual ({visual.shape[0]}) and targets ({n}) differ in length")
        self.audio = audio
        self.visual = visual
        self.targets = targets
        self.informative = informative

    def __len__(self) -> int:
        return self.targets.shape[0]

    def __getitem__(self, index: int) -> tuple[dict[str, Tensor], int]:
        return {"audio": self.audio[index], "visual": self.visual[index]}, int(self.targets[index])


def _content_codes(targets: Tensor, fraction: float, kind: str, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """What one modality shows per sample: its own digit, or (for ``round(fraction·N)`` random samples)
    ``-1`` (noise) / a random other digit. Returns ``(content, informative)``."""
    n = targets.shape[0]
    uninformative = torch.zeros(n, dtype=torch.bool)
    uninformative[torch.randperm(n, generator=gen)[: round(fraction * n)]] = True
    if kind == "noise":
        replacement = torch.full_like(targets, _BLANK)
    else:
        replacement = (targets + torch.randint(1, 10, (n,), generator=gen)) % 10
    return torch.where(uninformative, replacement, targets), ~uninformative


def _check_knobs(
    num_train: int, num_test: int, seed: int, audio_uninformative: float, visual_uninformative: float,
    uninformative: str, visual_noise: float, audio_snr_db: float,
) -> None:
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if num_train < 1 or num_test < 1:
        raise ValueError(f"num_train and num_test must be >= 1, got {num_train} and {num_test}")
    for name, value in (("audio_uninformative", audio_uninformative), ("visual_uninformative", visual_uninformative)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be a fraction in [0, 1], got {value}")
    if uninformative not in UNINFORMATIVE_KINDS:
        raise ValueError(f"uninformative must be one of {UNINFORMATIVE_KINDS}, got {uninformative!r}")
    if not (visual_noise >= 0.0 and math.isfinite(visual_noise)):
        raise ValueError(f"visual_noise must be a finite std >= 0, got {visual_noise}")
    if not math.isfinite(audio_snr_db):
        raise ValueError(f"audio_snr_db must be finite, got {audio_snr_db}")


def make_avdigits(
    num_train: int = 6000,
    num_test: int = 2000,
    seed: int = 0,
    *,
    audio_snr_db: float = 5.0,
    visual_noise: float = 0.4,
    audio_uninformative: float = 0.2,
    visual_uninformative: float = 0.0,
    uninformative: str = "noise",
    max_rotation_deg: float = 25.0,
    max_shift: float = 0.25,
    pitch_jitter: float = 0.02,
) -> tuple[AVDigits, AVDigits]:
    """Generate the AV-digits train and test splits (seconds, in memory, deterministic in ``seed``).

    Difficulty knobs: ``audio_snr_db`` (tone-to-noise ratio), ``visual_noise`` (pixel noise std; glyph
    ink is at most 1), ``max_rotation_deg`` / ``max_shift`` (glyph pose), ``pitch_jitter`` (relative tone
    detuning); ``audio_uninformative`` / ``visual_uninformative``: exact fraction of each split whose
    modality carries no information about the label, replaced as ``uninformative`` says.
    Labels are balanced (``i mod 10``, shuffled). Audio spectrograms are standardised with the train
    split's scalar mean and std (applied to both splits).
    """
    _check_knobs(
        num_train, num_test, seed, audio_uninformative, visual_uninformative, uninformative, visual_noise, audio_snr_db
    )
    splits = []
    for split_index, size in enumerate((num_train, num_test)):
        gen = torch.Generator().manual_seed(2 * seed + split_index)
        targets = (torch.arange(size) % 10)[torch.randperm(size, generator=gen)]
        audio_content, audio_ok = _content_codes(targets, audio_uninformative, uninformative, gen)
        visual_content, visual_ok = _content_codes(targets, visual_uninformative, uninformative, gen)
        audio = log_mel(synthesize_tones(audio_content, gen, audio_snr_db, pitch_jitter))
        visual = render_digits(visual_content, gen, visual_noise, max_rotation_deg, max_shift)
        splits.append((audio, visual, targets, {"audio": audio_ok, "visual": visual_ok}))
    mean, std = splits[0][0].mean(), splits[0][0].std().clamp_min(1e-6)
    train, test = (AVDigits((a - mean) / std, v, t, ok) for a, v, t, ok in splits)
    return train, test
