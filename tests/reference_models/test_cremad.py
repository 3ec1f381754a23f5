"""CREMA-D loader on fixtures written in the official OGM-GE layout."""

from __future__ import annotations

import math
import os
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from reference_models.data import cremad
from reference_models.data.cremad import (
    CREMAD_CLASSES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    N_FFT,
    SAMPLE_RATE,
    CremaD,
    centre_indices,
    log_spectrogram,
    read_wav_mono,
    resample,
)
from tests.reference_models.fixtures import (
    CREMAD_REFERENCE,
    CREMAD_REFERENCE_WAV,
    CREMAD_WAV_RATE,
    tone,
    write_cremad,
    write_cremad_split,
    write_frames,
    write_grey_jpeg,
    write_wav,
)

TRAIN = [
    ("1001_DFA_ANG_XX", "ANG"),
    ("1001_IEO_HAP_HI", "HAP"),
    ("1002_TIE_NEU_XX", "NEU"),
    ("1003_MTI_DIS_XX", "DIS"),
]
TEST = [("1004_IWL_SAD_XX", "SAD"), ("1005_ITS_FEA_XX", "FEA")]


@pytest.fixture
def cremad_root(tmp_path: Path) -> Path:
    return write_cremad(tmp_path / "CREMA-D", {"train": TRAIN, "test": TEST})


def _normalised_grey(level: float) -> torch.Tensor:
    return (level / 255.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)


def test_item_shapes_dtypes_and_labels(cremad_root: Path) -> None:
    dataset = CremaD(cremad_root, "train")
    assert len(dataset) == len(TRAIN)
    assert dataset.modalities == ("audio", "visual")
    assert dataset.num_classes == 6 and dataset.class_names == ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
    assert dataset.labels == [5, 1, 0, 4]
    inputs, label = dataset[0]
    assert set(inputs) == {"audio", "visual"}
    assert inputs["audio"].shape == (1, 257, 188) and inputs["audio"].dtype == torch.float32
    assert inputs["visual"].shape == (3, 1, 224, 224) and inputs["visual"].dtype == torch.float32
    assert isinstance(label, int) and CREMAD_CLASSES[label] == "ANG"


def test_test_split_and_byte_order_mark(cremad_root: Path) -> None:
    write_cremad_split(cremad_root / "test.csv", TEST, byte_order_mark=True)
    dataset = CremaD(cremad_root, "test")
    assert [clip.name for clip in dataset.clips] == [name for name, _ in TEST]
    assert dataset.labels == [2, 3]


def test_test_transform_is_deterministic_resize_and_normalise(cremad_root: Path) -> None:
    dataset = CremaD(cremad_root, "test", num_frames=3)
    visual = dataset[0][0]["visual"]
    assert visual.shape == (3, 3, 224, 224)
    assert torch.equal(visual, dataset[0][0]["visual"])
    for t, level in enumerate((10, 30, 50)):  # the fixture's flat frames, in sorted order
        means = visual[:, t].mean(dim=(1, 2))
        assert torch.allclose(means, _normalised_grey(level), atol=0.05)


def test_single_frame_is_the_middle_file(cremad_root: Path) -> None:
    visual = CremaD(cremad_root, "test", num_frames=1)[1][0]["visual"]
    assert torch.allclose(visual[:, 0].mean(dim=(1, 2)), _normalised_grey(30), atol=0.05)


def test_frames_are_sorted_naturally(tmp_path: Path) -> None:
    root = write_cremad(tmp_path, {"test": TEST[:1]}, frames_per_clip=0)
    folder = root / "Image-01-FPS" / TEST[0][0]
    for name, level in (("frame_10.jpg", 200), ("frame_2.jpg", 100), ("frame_1.jpg", 0)):
        write_grey_jpeg(folder / name, level)
    dataset = CremaD(root, "test", num_frames=3)
    assert [p.name for p in dataset.clips[0].frames] == ["frame_1.jpg", "frame_2.jpg", "frame_10.jpg"]
    visual = dataset[0][0]["visual"]
    for t, level in enumerate((0, 100, 200)):
        assert torch.allclose(visual[:, t].mean(dim=(1, 2)), _normalised_grey(level), atol=0.05)


def test_train_augmentation_shape_and_switch(cremad_root: Path) -> None:
    augmented = CremaD(cremad_root, "train", num_frames=2)
    assert augmented[0][0]["visual"].shape == (3, 2, 224, 224)
    plain = CremaD(cremad_root, "train", num_frames=2, train_transforms=False)
    assert torch.equal(plain[0][0]["visual"], plain[0][0]["visual"])


def test_fps_selects_the_frame_folder(tmp_path: Path) -> None:
    root = write_cremad(tmp_path, {"test": TEST}, fps=3)
    assert len(CremaD(root, "test", fps=3)) == 2
    with pytest.raises(FileNotFoundError, match="Image-01-FPS"):
        CremaD(root, "test", fps=1)


def test_missing_clips_are_skipped_counted_and_reported(tmp_path: Path) -> None:
    root = write_cremad(
        tmp_path, {"train": TRAIN}, without_wav=[TRAIN[0][0]], without_frames=[TRAIN[2][0]]
    )
    (root / "Image-01-FPS" / TRAIN[3][0]).mkdir(exist_ok=True)
    for jpg in (root / "Image-01-FPS" / TRAIN[3][0]).iterdir():
        jpg.unlink()  # an empty frame folder counts as missing
    with pytest.warns(UserWarning, match=r"\(4 clips listed\): 3 clips skipped") as record:
        dataset = CremaD(root, "train")
    assert len(record) == 1
    assert f"train.csv:1: {TRAIN[0][0]}: no wav" in str(record[0].message)
    assert dataset.skipped == [TRAIN[0][0], TRAIN[2][0], TRAIN[3][0]]
    assert [note.where for note in dataset.notes] == [f"{root / 'train.csv'}:{line}" for line in (1, 3, 4)]
    assert [note.detail.split(": ")[1] for note in dataset.notes] == ["no wav", "no jpg frames", "no jpg frames"]
    assert [clip.name for clip in dataset.clips] == [TRAIN[1][0]]


def test_split_file_oddities_are_tolerated_and_reported(tmp_path: Path) -> None:
    root = write_cremad(tmp_path, {"train": TRAIN[:2]})
    (root / "train.csv").write_text(f"{TRAIN[0][0]},ANG,extra\n\n{TRAIN[1][0]},HAP\n")
    with pytest.warns(UserWarning) as record:
        dataset = CremaD(root, "train")
    assert dataset.labels == [5, 1]
    assert [note.where for note in dataset.notes] == [f"{root / 'train.csv'}:1", f"{root / 'train.csv'}:2"]
    messages = " ".join(str(warning.message) for warning in record)
    assert "1 rows with more than two columns" in messages and "1 empty rows skipped" in messages
    (root / "train.csv").write_text(f"{TRAIN[0][0]}\n")
    with pytest.raises(ValueError, match=r"train.csv:1: expected 'clip,LABEL'"):
        CremaD(root, "train")


def test_complete_split_warns_nothing(cremad_root: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dataset = CremaD(cremad_root, "train")
    assert dataset.skipped == []


def test_max_items_caps_the_dataset(cremad_root: Path) -> None:
    assert len(CremaD(cremad_root, "train", max_items=2)) == 2
    with pytest.raises(ValueError, match="max_items"):
        CremaD(cremad_root, "train", max_items=0)


def test_overridden_roots(tmp_path: Path) -> None:
    data = write_cremad(tmp_path / "data", {"test": TEST})
    splits = tmp_path / "splits"
    write_cremad_split(splits / "test.csv", TEST)
    (data / "test.csv").unlink()
    (data / "AudioWAV").rename(tmp_path / "wav")
    dataset = CremaD(
        tmp_path / "elsewhere", "test", audio_root=tmp_path / "wav", visual_root=data, splits_root=splits
    )
    assert len(dataset) == 2


def test_layout_errors_name_the_missing_path(cremad_root: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="train.csv"):
        CremaD(cremad_root, "train", splits_root=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="AudioWAV"):
        CremaD(tmp_path / "empty", "train")
    with pytest.raises(ValueError, match="split"):
        CremaD(cremad_root, "val")
    write_cremad_split(cremad_root / "train.csv", [("1001_DFA_XXX_XX", "XXX")])
    with pytest.raises(ValueError, match="unknown label 'XXX'"):
        CremaD(cremad_root, "train")
    write_cremad_split(cremad_root / "train.csv", [("9999_NOT_THERE", "NEU")])
    with pytest.raises(FileNotFoundError, match="none of the 1 clips"):
        CremaD(cremad_root, "train")


def test_pure_tone_lands_in_its_stft_bin_after_resampling(tmp_path: Path) -> None:
    bin_index = 40
    frequency = bin_index * SAMPLE_RATE / N_FFT
    root = write_cremad(tmp_path, {"test": TEST[:1]})
    write_wav(root / "AudioWAV" / f"{TEST[0][0]}.wav", tone(frequency, 2.0, CREMAD_WAV_RATE), CREMAD_WAV_RATE)
    audio = CremaD(root, "test")[0][0]["audio"]
    assert audio.shape == (1, 257, 188)
    assert int(audio[0].mean(dim=1).argmax()) == bin_index


def test_log_spectrogram_clips_and_uses_unnormalised_hann_stft() -> None:
    loud = torch.full((SAMPLE_RATE,), 3.0)  # clipped to 1.0: only the DC bin holds energy
    reflected = log_spectrogram(loud, SAMPLE_RATE, pad_mode="reflect")[0]
    assert torch.allclose(reflected[0], torch.full((188,), math.log(N_FFT / 2)), atol=1e-4)
    assert reflected[2:].max() < math.log(1e-3)
    zero_padded = log_spectrogram(loud, SAMPLE_RATE)[0]  # the default: the edge frames see the zeros
    assert torch.equal(zero_padded[:, 1:-1], reflected[:, 1:-1])
    assert zero_padded[0, 0] < reflected[0, 0] and zero_padded[2:, 0].max() > math.log(1e-3)


@pytest.mark.parametrize("seconds", [0.25, 1.0, 4.5])
def test_log_spectrogram_has_the_official_shape_for_any_length(seconds: float) -> None:
    samples = torch.from_numpy(tone(440.0, seconds, CREMAD_WAV_RATE))
    assert log_spectrogram(samples, CREMAD_WAV_RATE).shape == (1, 257, 188)


def test_log_spectrogram_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="1-D"):
        log_spectrogram(torch.zeros(2, 100), SAMPLE_RATE)
    with pytest.raises(ValueError, match="non-finite"):
        log_spectrogram(torch.tensor([0.0, float("nan")]), SAMPLE_RATE)
    with pytest.raises(ValueError, match="empty"):
        log_spectrogram(torch.zeros(0), SAMPLE_RATE)


def test_stereo_wav_is_mixed_to_mono(tmp_path: Path) -> None:
    root = write_cremad(tmp_path, {"test": TEST[:1]})
    left = tone(1000.0, 1.0, SAMPLE_RATE)
    write_wav(root / "AudioWAV" / f"{TEST[0][0]}.wav", np.stack([left, -left], axis=1), SAMPLE_RATE)
    audio = CremaD(root, "test")[0][0]["audio"]
    assert audio.max() < math.log(0.05)  # the channels cancel (up to 16-bit rounding)


@settings(max_examples=60, deadline=None)
@given(num_files=st.integers(1, 200), num_frames=st.integers(1, 20))
def test_centre_indices_are_in_range_ordered_and_distinct_when_possible(num_files: int, num_frames: int) -> None:
    indices = centre_indices(num_files, num_frames)
    assert len(indices) == num_frames
    assert all(0 <= i < num_files for i in indices)
    assert indices == sorted(indices)
    if num_frames <= num_files:
        assert len(set(indices)) == num_frames


# ------------------------------------------------------------------ audio against the librosa reference
#: Float32 rounding of values around −10 is 1e-6; the torchaudio resampler misses by several nats.
FLOAT_NOISE = 1e-5


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(CREMAD_REFERENCE) as arrays:
        return dict(arrays)


def test_the_reference_wav_has_the_release_format() -> None:
    info = soundfile.info(str(CREMAD_REFERENCE_WAV))
    assert (info.samplerate, info.channels, info.subtype) == (CREMAD_WAV_RATE, 1, "PCM_16")


def test_default_feature_matches_librosa_with_soxr(tmp_path: Path, reference: dict[str, np.ndarray]) -> None:
    root = write_cremad(tmp_path, {"test": TEST[:1]})
    shutil.copy(CREMAD_REFERENCE_WAV, root / "AudioWAV" / f"{TEST[0][0]}.wav")
    audio = CremaD(root, "test")[0][0]["audio"]
    assert audio.shape == (1, 257, 188) and audio.dtype == torch.float32
    np.testing.assert_allclose(audio[0].numpy(), reference["soxr_hq_constant"], rtol=0, atol=FLOAT_NOISE)


def test_kaiser_best_with_reflect_padding_matches_librosa_before_0_9(reference: dict[str, np.ndarray]) -> None:
    waveform, rate = read_wav_mono(CREMAD_REFERENCE_WAV)
    feature = log_spectrogram(waveform, rate, resampler="kaiser_best", pad_mode="reflect")[0]
    frames = reference["kaiser_best_reflect_frames"]
    np.testing.assert_allclose(feature[:, frames].numpy(), reference["kaiser_best_reflect"], rtol=0, atol=FLOAT_NOISE)


def test_the_torchaudio_resampler_is_far_from_librosa(reference: dict[str, np.ndarray]) -> None:
    waveform, rate = read_wav_mono(CREMAD_REFERENCE_WAV)
    feature = log_spectrogram(waveform, rate, resampler="torchaudio")[0].numpy()
    gap = np.abs(feature - reference["soxr_hq_constant"])
    first_row_above_8khz = int(8_000 / SAMPLE_RATE * N_FFT) + 1
    assert np.median(gap[:first_row_above_8khz]) < 0.01 and np.median(gap[first_row_above_8khz:]) > 1.0


def test_resample_follows_librosa_length_rule() -> None:
    samples = tone(440.0, 2.0, CREMAD_WAV_RATE)[:24_801]
    for resampler in cremad.RESAMPLERS:
        assert resample(samples, CREMAD_WAV_RATE, resampler=resampler).shape == (34_179,)  # ceil(24,801 · 1.378125)
    assert resample(samples, SAMPLE_RATE) is samples
    with pytest.raises(ValueError, match="resampler"):
        resample(samples, CREMAD_WAV_RATE, resampler="sinc_best")
    with pytest.raises(ValueError, match="pad_mode"):
        log_spectrogram(torch.from_numpy(samples), CREMAD_WAV_RATE, pad_mode="edge")


def test_kaiser_best_without_resampy_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "resampy", None)
    with pytest.raises(ImportError, match="pip install resampy"):
        resample(tone(440.0, 0.1, CREMAD_WAV_RATE), CREMAD_WAV_RATE, resampler="kaiser_best")


def test_loader_options_reach_the_feature(cremad_root: Path) -> None:
    default = CremaD(cremad_root, "test")[0][0]["audio"]
    legacy = CremaD(cremad_root, "test", resampler="kaiser_best", pad_mode="reflect")[0][0]["audio"]
    assert not torch.equal(default, legacy)
    with pytest.raises(ValueError, match="frame_choice"):
        CremaD(cremad_root, "test", frame_choice="last")


# ------------------------------------------------------------------ frames
def _grey_levels(visual: torch.Tensor) -> list[int]:
    """The grey level (0..255) of each flat test-split frame of ``visual`` [3, T, 224, 224]."""
    means = visual.mean(dim=(2, 3)).T * torch.tensor(IMAGENET_STD) + torch.tensor(IMAGENET_MEAN)
    return [round(float(level)) for level in means.mean(dim=1) * 255]


def test_first_frames_are_read_in_directory_order(cremad_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    listdir = os.listdir
    monkeypatch.setattr(cremad.os, "listdir", lambda folder: sorted(listdir(folder), reverse=True))
    dataset = CremaD(cremad_root, "test", num_frames=2, frame_choice="first")
    assert _grey_levels(dataset[0][0]["visual"]) == [50, 30]  # files 00060.jpg, 00030.jpg: the listed order
    assert [p.name for p in dataset.clips[0].frames] == ["00000.jpg", "00030.jpg", "00060.jpg"]
    short = CremaD(cremad_root, "test", num_frames=5, frame_choice="first")
    assert _grey_levels(short[0][0]["visual"]) == [50, 30, 10, 10, 10]


def test_random_frames_are_distinct_in_time_order_and_redrawn(tmp_path: Path) -> None:
    root = write_cremad(tmp_path, {"test": TEST[:1]}, frames_per_clip=8)
    dataset = CremaD(root, "test", num_frames=3, frame_choice="random")
    torch.manual_seed(0)
    draws = [tuple(_grey_levels(dataset[0][0]["visual"])) for _ in range(20)]
    assert all(len(set(draw)) == 3 and list(draw) == sorted(draw) for draw in draws)
    assert len(set(draws)) > 5
    assert all(level in range(10, 160, 20) for draw in draws for level in draw)


def test_each_frame_gets_its_own_crop_and_flip(tmp_path: Path) -> None:
    root = write_cremad(tmp_path, {"train": TRAIN[:1]}, frames_per_clip=0)
    folder = root / "Image-01-FPS" / TRAIN[0][0]
    ramp = np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (48, 1, 3))
    for name in ("00000.jpg", "00030.jpg"):
        Image.fromarray(ramp).save(folder / name, quality=100)
    write_frames(folder, 0)
    torch.manual_seed(0)
    visual = CremaD(root, "train", num_frames=2, frame_choice="first")[0][0]["visual"]
    assert visual.shape == (3, 2, 224, 224)
    assert not torch.allclose(visual[:, 0], visual[:, 1], atol=0.1)


def test_frames_of_different_sizes_are_accepted(tmp_path: Path) -> None:
    root = write_cremad(tmp_path, {"test": TEST[:1]}, frames_per_clip=0)
    folder = root / "Image-01-FPS" / TEST[0][0]
    write_grey_jpeg(folder / "00000.jpg", 10, height=8, width=8)
    write_grey_jpeg(folder / "00030.jpg", 30, height=12, width=20)
    visual = CremaD(root, "test", num_frames=2)[0][0]["visual"]
    assert visual.shape == (3, 2, 224, 224) and _grey_levels(visual) == [10, 30]
