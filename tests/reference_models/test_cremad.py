"""CREMA-D loader on fixtures written in the official OGM-GE layout."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference_models.data.cremad import (
    CREMAD_CLASSES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    N_FFT,
    SAMPLE_RATE,
    CremaD,
    centre_indices,
    log_spectrogram,
)
from tests.reference_models.fixtures import (
    CREMAD_WAV_RATE,
    tone,
    write_cremad,
    write_cremad_split,
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
    with pytest.warns(UserWarning, match="skipped 3 of 4 clips") as record:
        dataset = CremaD(root, "train")
    assert len(record) == 1
    assert dataset.skipped == [TRAIN[0][0], TRAIN[2][0], TRAIN[3][0]]
    assert [clip.name for clip in dataset.clips] == [TRAIN[1][0]]


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
    feature = log_spectrogram(loud, SAMPLE_RATE)[0]
    assert torch.allclose(feature[0], torch.full((188,), math.log(N_FFT / 2)), atol=1e-4)
    assert feature[2:].max() < math.log(1e-3)


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
