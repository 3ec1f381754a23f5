"""Embed the Free Spoken Digit Dataset into the repository as one lossless FLAC stream plus an index.

Reads the 3,000 WAV files ``{digit}_{speaker}_{index}.wav`` (mono, 16-bit PCM, 8 kHz) of FSDD
(Jakobovski/free-spoken-digit-dataset, commit 26eb9aaf76e81b692f806f9140c2d2777410d7a1) with
``soundfile``, concatenates their int16 samples in the order (digit, speaker, index) and writes

* ``recordings.flac``: one mono FLAC stream, 16-bit PCM at 8 kHz, of all the samples back to back
  (libsndfile's strongest compression level);
* ``index.csv``: one row per recording, ``file,digit,speaker,index,start,length,crc32``: its file name,
  its labels, its first sample in the stream and its number of samples, and the CRC-32 (``zlib.crc32``,
  8 hex digits) of its samples as little-endian int16 bytes.

Then it decodes the FLAC again and checks that every recording's samples equal its WAV's exactly.
Usage: ``python tools/embed_fsdd.py [--recordings /work/shared/data/fsdd/recordings] [--out reference_models/data/fsdd]``.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
import zlib
from pathlib import Path

import numpy as np
import soundfile

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_RATE = 8000
FLAC_NAME = "recordings.flac"
INDEX_NAME = "index.csv"
COLUMNS = ("file", "digit", "speaker", "index", "start", "length", "crc32")
_NAME = re.compile(r"(\d)_([a-z]+)_(\d+)\.wav")


def read_recordings(folder: Path) -> list[tuple[str, int, str, int, np.ndarray]]:
    """``(file, digit, speaker, index, int16 samples)`` of every WAV of ``folder``, sorted by (digit, speaker, index)."""
    recordings = []
    for path in folder.glob("*.wav"):
        match = _NAME.fullmatch(path.name)
        if match is None:
            raise ValueError(f"{path}: not named {{digit}}_{{speaker}}_{{index}}.wav")
        info = soundfile.info(str(path))
        if (info.samplerate, info.channels, info.subtype) != (SAMPLE_RATE, 1, "PCM_16"):
            raise ValueError(f"{path}: expected mono 16-bit PCM at {SAMPLE_RATE} Hz, got {info}")
        samples, _ = soundfile.read(str(path), dtype="int16")
        recordings.append((path.name, int(match[1]), match[2], int(match[3]), samples))
    if not recordings:
        raise FileNotFoundError(f"no WAV files in {folder}")
    return sorted(recordings, key=lambda r: (r[1], r[2], r[3]))


def crc32(samples: np.ndarray) -> str:
    """CRC-32 of int16 samples as little-endian bytes, 8 hex digits."""
    return f"{zlib.crc32(samples.astype('<i2').tobytes()):08x}"


def embed(folder: Path, out: Path) -> tuple[Path, Path]:
    """Write the FLAC stream and the index of the WAVs of ``folder`` into ``out``; verify the round trip."""
    recordings = read_recordings(folder)
    out.mkdir(parents=True, exist_ok=True)
    flac_path, index_path = out / FLAC_NAME, out / INDEX_NAME
    stream = np.concatenate([samples for *_, samples in recordings])
    soundfile.write(str(flac_path), stream, SAMPLE_RATE, format="FLAC", subtype="PCM_16", compression_level=1.0)
    start = 0
    with index_path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(COLUMNS)
        for name, digit, speaker, index, samples in recordings:
            writer.writerow((name, digit, speaker, index, start, samples.size, crc32(samples)))
            start += samples.size
    decoded, rate = soundfile.read(str(flac_path), dtype="int16")
    if rate != SAMPLE_RATE or decoded.shape != stream.shape:
        raise RuntimeError(f"{flac_path}: decoded {decoded.shape} samples at {rate} Hz, wrote {stream.shape}")
    start = 0
    for name, *_, samples in recordings:
        original, _ = soundfile.read(str(folder / name), dtype="int16")
        if not np.array_equal(decoded[start : start + samples.size], original):
            raise RuntimeError(f"{flac_path}: {name} does not decode to its WAV's samples")
        start += samples.size
    return flac_path, index_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recordings", type=Path, default=Path("/work/shared/data/fsdd/recordings"))
    parser.add_argument("--out", type=Path, default=ROOT / "reference_models" / "data" / "fsdd")
    options = parser.parse_args(argv)
    flac_path, index_path = embed(options.recordings, options.out)
    for path in (flac_path, index_path):
        print(f"{path}: {path.stat().st_size:,} bytes")
    print("round trip: every recording decodes to its WAV's samples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
