"""What a loader tolerated in a user's copy of a dataset: each oddity counted, located and reported.

Real releases hold rows the official code gets past without a word (a missing clip, an event whose
offset precedes its onset, a label row that is not one-hot). The loaders do what the official code
does with them, record one `DataNote` each and report them in one warning per kind;
``python -m reference_models.check`` lists them all. Anything that would stop training or make the
numbers wrong is an error instead, naming the file (and line).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["DataNote", "count_by_kind", "warn_notes"]

#: How many places a warning names per kind.
SHOWN = 3


@dataclass(frozen=True)
class DataNote:
    """One tolerated oddity.

    Attributes:
        kind: what was found and what was done about it, one sentence shared by all notes of the kind.
        where: the file and line (``path:12``) or the file and item (``path: video 17, segment 4``).
        detail: the offending row or values.
    """

    kind: str
    where: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.where}: {self.detail}" if self.detail else self.where


def count_by_kind(notes: Sequence[DataNote]) -> dict[str, int]:
    """Number of notes of each kind, in order of first appearance."""
    return dict(Counter(note.kind for note in notes))


def warn_notes(subject: str, notes: Sequence[DataNote], stacklevel: int = 3) -> None:
    """One ``UserWarning`` per kind: ``"<subject>: <count> <kind> (first: <places>)"``."""
    for kind, count in count_by_kind(notes).items():
        places = "; ".join([str(note) for note in notes if note.kind == kind][:SHOWN])
        warnings.warn(f"{subject}: {count} {kind} (first: {places})", stacklevel=stacklevel)
