"""Make the committed CREMA-D audio reference: a 16 kHz wav and its librosa features.

Not run by the tests (librosa is no dependency of gradmod or of its tests). Run it once, in a
throwaway environment outside the repository, from the repository root::

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install librosa soundfile soxr resampy numpy
    /tmp/refvenv/bin/python tests/reference_models/data/make_cremad_reference.py

It writes, next to itself:

* ``cremad_16k.wav`` — 1.55 s of a synthetic speech-like signal in the format of the CREMA-D
  AudioWAV release (16 kHz, mono, 16-bit PCM): a gliding harmonic voice up to 7.9 kHz, a noise
  burst, a tone just under the 8 kHz Nyquist frequency and a loud square-wave burst whose
  resampling overshoots ±1 (so the clipping step matters). 24,800 samples: resampled to 22,050 Hz
  that is 34,177.5, so librosa's length rule (round up, zero-pad) matters too.
* ``cremad_reference.npz`` — the official OGM-GE audio feature of that wav computed with librosa:
  ``librosa.load(wav, sr=22050)`` (librosa >= 0.10: soxr ``soxr_hq``) → ``np.tile(x, 3)[:66150]``
  → clip to [−1, 1] → ``librosa.stft(n_fft=512, hop_length=353)`` (librosa >= 0.9: zero padding)
  → ``np.log(np.abs(S) + 1e-7)``:

  - ``soxr_hq_constant`` float32 [257, 188]: all frames, librosa's current defaults;
  - ``kaiser_best_reflect`` float32 [257, 16]: frames ``kaiser_best_reflect_frames`` (the first
    and last eight) with ``res_type="kaiser_best"`` (resampy) and ``pad_mode="reflect"``, the
    defaults of librosa before 0.9;
  - ``versions``: the library versions used.

The committed files were made with librosa 0.11.0, soxr 1.1.0, resampy 0.4.3, numpy 2.4.6 and
soundfile 0.14.0.
"""

from __future__ import annotations

from pathlib import Path

import librosa
import numpy as np
import resampy
import soundfile
import soxr

HERE = Path(__file__).resolve().parent
WAV_RATE = 16_000
NUM_SAMPLES = 24_800
TARGET_RATE = 22_050
CLIP_SAMPLES = 3 * TARGET_RATE
EDGE_FRAMES = np.r_[0:8, 180:188]


def speech_like(seed: int = 2024) -> np.ndarray:
    """The deterministic test signal, float64 in [−1, 1]."""
    rng = np.random.default_rng(seed)
    time = np.arange(NUM_SAMPLES) / WAV_RATE
    pitch = 110.0 + 70.0 * time / time[-1]
    phase = 2 * np.pi * np.cumsum(pitch) / WAV_RATE
    harmonics = range(1, int(7_900 // pitch.max()) + 1)
    voice = sum(np.sin(k * phase) / k for k in harmonics)
    voice *= 0.25 * np.hanning(NUM_SAMPLES) ** 0.5
    noise = 0.2 * rng.standard_normal(NUM_SAMPLES) * ((time > 0.6) & (time < 0.8))
    whistle = 0.05 * np.sin(2 * np.pi * 7_600 * time)
    square = 0.97 * np.sign(np.sin(2 * np.pi * 300 * time)) * ((time > 1.2) & (time < 1.3))
    signal = voice + noise + whistle
    signal[square != 0] = square[square != 0]
    return np.clip(signal, -1.0, 1.0)


def feature(samples: np.ndarray, pad_mode: str) -> np.ndarray:
    tiled = np.tile(samples, 3)[:CLIP_SAMPLES]
    tiled = np.clip(tiled, -1.0, 1.0)
    spectrum = librosa.stft(tiled, n_fft=512, hop_length=353, pad_mode=pad_mode)
    return np.log(np.abs(spectrum) + 1e-7).astype(np.float32)


def main() -> None:
    wav = HERE / "cremad_16k.wav"
    soundfile.write(str(wav), speech_like(), WAV_RATE, subtype="PCM_16")
    current, _ = librosa.load(wav, sr=TARGET_RATE)
    legacy, _ = librosa.load(wav, sr=TARGET_RATE, res_type="kaiser_best")
    versions = (
        f"librosa {librosa.__version__}, soxr {soxr.__version__}, resampy {resampy.__version__}, "
        f"numpy {np.__version__}, soundfile {soundfile.__version__}"
    )
    np.savez(
        HERE / "cremad_reference.npz",
        soxr_hq_constant=feature(current, "constant"),
        kaiser_best_reflect=feature(legacy, "reflect")[:, EDGE_FRAMES],
        kaiser_best_reflect_frames=EDGE_FRAMES,
        versions=np.array(versions),
    )
    print(f"wrote {wav.name} and cremad_reference.npz with {versions}")


if __name__ == "__main__":
    main()
