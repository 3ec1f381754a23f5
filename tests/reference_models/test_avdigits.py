"""AV-digits: shapes, determinism, knobs, label balance, generation speed."""

from __future__ import annotations

import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference_models.data.avdigits import (
    DTMF_TONES,
    SAMPLE_RATE,
    AVDigits,
    glyph_bitmaps,
    make_avdigits,
    render_digits,
    synthesize_tones,
)


@pytest.fixture(scope="module")
def small() -> tuple[AVDigits, AVDigits]:
    return make_avdigits(200, 100, seed=0)


def test_shapes_dtypes_and_sample_interface(small: tuple[AVDigits, AVDigits]) -> None:
    train, test = small
    assert (len(train), len(test)) == (200, 100)
    assert train.audio.shape == (200, 1, 40, 32) and train.audio.dtype == torch.float32
    assert train.visual.shape == (200, 1, 28, 28) and train.visual.dtype == torch.float32
    assert train.targets.dtype == torch.int64
    inputs, target = train[3]
    assert set(inputs) == {"audio", "visual"} and isinstance(target, int) and 0 <= target < 10
    assert torch.equal(inputs["visual"], train.visual[3])
    assert train.num_classes == 10 and train.modalities == ("audio", "visual") and len(train.class_names) == 10
    for split in small:
        assert torch.isfinite(split.audio).all() and torch.isfinite(split.visual).all()


def test_audio_standardised_with_train_statistics(small: tuple[AVDigits, AVDigits]) -> None:
    train, test = small
    assert abs(train.audio.mean().item()) < 1e-4 and abs(train.audio.std().item() - 1) < 1e-4
    assert abs(test.audio.mean().item()) < 0.2  # same generator law, train's constants


def test_same_seed_same_tensors_other_seed_different() -> None:
    first = make_avdigits(60, 20, seed=3)
    again = make_avdigits(60, 20, seed=3)
    other = make_avdigits(60, 20, seed=4)
    for a, b, c in zip(first, again, other):
        for name in ("audio", "visual", "targets"):
            assert torch.equal(getattr(a, name), getattr(b, name))
        assert not torch.equal(a.visual, c.visual) and not torch.equal(a.audio, c.audio)
    assert not torch.equal(first[0].visual[:20], first[1].visual)


def test_test_split_does_not_depend_on_train_size() -> None:
    _, test_small = make_avdigits(30, 20, seed=1)
    _, test_large = make_avdigits(90, 20, seed=1)
    assert torch.equal(test_small.visual, test_large.visual) and torch.equal(test_small.targets, test_large.targets)


@given(size=st.integers(1, 120))
@settings(max_examples=8, deadline=None)
def test_labels_balanced(size: int) -> None:
    train, _ = make_avdigits(size, 1, seed=0, audio_uninformative=0.0)
    counts = torch.bincount(train.targets, minlength=10)
    assert counts.max() - counts.min() <= 1


@pytest.mark.parametrize("fraction", [0.0, 0.25, 1.0])
def test_uninformative_fraction_is_exact_and_blank_in_noise_mode(fraction: float) -> None:
    train, _ = make_avdigits(
        80, 10, seed=2, visual_noise=0.0, visual_uninformative=fraction, audio_uninformative=fraction
    )
    for name in ("audio", "visual"):
        assert train.informative[name].dtype == torch.bool
        assert (~train.informative[name]).sum().item() == round(fraction * 80)
    ink = train.visual.flatten(1).abs().sum(1)
    assert (ink[~train.informative["visual"]] == 0).all()  # noise only, and visual noise is 0
    assert (ink[train.informative["visual"]] > 0).all()


def test_other_digit_mode_draws_a_different_digit() -> None:
    train, _ = make_avdigits(
        60, 10, seed=5, visual_noise=0.0, visual_uninformative=0.5, uninformative="other",
        max_rotation_deg=0.0, max_shift=0.0,
    )
    flipped = ~train.informative["visual"]
    assert (train.visual[flipped].flatten(1).abs().sum(1) > 0).all()  # a glyph is drawn ...
    # ... and it matches another digit's glyph better than its own label's (nearest template)
    templates = render_digits(torch.arange(10), torch.Generator().manual_seed(0), 0.0, 0.0, 0.0)
    templates = templates.flatten(1) / templates.flatten(1).norm(dim=1, keepdim=True)
    images = train.visual.flatten(1)
    nearest = (images / images.norm(dim=1, keepdim=True) @ templates.T).argmax(1)
    agrees = nearest == train.targets
    assert agrees[train.informative["visual"]].float().mean() > 0.9
    assert agrees[flipped].float().mean() < 0.1


@given(digit=st.integers(0, 9), seed=st.integers(0, 1000))
@settings(max_examples=10, deadline=None)
def test_tones_peak_at_the_digits_keypad_frequencies(digit: int, seed: int) -> None:
    wave = synthesize_tones(torch.tensor([digit]), torch.Generator().manual_seed(seed), snr_db=40.0)[0]
    spectrum = torch.fft.rfft(wave).abs()
    freqs = torch.fft.rfftfreq(wave.shape[0], 1 / SAMPLE_RATE)
    low_band, high_band = freqs < 1100, freqs >= 1100
    low = freqs[low_band][spectrum[low_band].argmax()].item()
    high = freqs[high_band][spectrum[high_band].argmax()].item()
    expected_low, expected_high = DTMF_TONES[digit]
    assert abs(low - expected_low) <= 0.02 * expected_low + 4
    assert abs(high - expected_high) <= 0.02 * expected_high + 4


def test_dtmf_pairs_are_distinct() -> None:
    assert len(set(DTMF_TONES)) == 10


@pytest.mark.parametrize("snr_db", [-10.0, 0.0, 10.0])
def test_audio_snr_sets_the_noise_level(snr_db: float) -> None:
    blank = torch.full((64,), -1)
    noise = synthesize_tones(blank, torch.Generator().manual_seed(0), snr_db)
    expected = 1 / (10 ** (snr_db / 20))  # noise of an amplitude-1 tone pair (mean power 1)
    assert noise.std().item() == pytest.approx(expected, rel=0.02)


def test_lower_snr_lowers_tone_contrast_in_the_spectrogram() -> None:
    def tone_contrast(snr_db: float) -> float:
        train, _ = make_avdigits(100, 1, seed=0, audio_snr_db=snr_db, audio_uninformative=0.0)
        spec = train.audio.flatten(1)
        return (spec.max(1).values - spec.median(1).values).mean().item()

    assert tone_contrast(10.0) > tone_contrast(-10.0)


@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_visual_noise_sets_pixel_noise(noise: float) -> None:
    blank = render_digits(torch.full((32,), -1), torch.Generator().manual_seed(0), noise)
    assert blank.std().item() == pytest.approx(noise, abs=0.02)


def test_rendered_glyphs_are_bounded_and_distinct() -> None:
    images = render_digits(torch.arange(10), torch.Generator().manual_seed(1), 0.0)
    assert images.min() >= 0 and images.max() <= 1
    flat = images.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(10) * 1e9).min() > 0.5
    assert glyph_bitmaps().shape == (10, 1, 7, 5)


def test_generation_takes_seconds() -> None:
    start = time.perf_counter()
    make_avdigits(1000, 200, seed=0)
    assert time.perf_counter() - start < 10.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"audio_uninformative": 1.5}, "audio_uninformative"),
        ({"visual_uninformative": -0.1}, "visual_uninformative"),
        ({"uninformative": "silence"}, "uninformative"),
        ({"visual_noise": -1.0}, "visual_noise"),
        ({"audio_snr_db": float("nan")}, "audio_snr_db"),
        ({"num_train": 0}, "num_train"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_knobs_raise(kwargs: dict, message: str) -> None:
    arguments = {"num_train": 10, "num_test": 10, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=message):
        make_avdigits(**arguments)
