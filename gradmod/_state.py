"""Versioned ``state_dict``s: one rule for every gradmod method (not public API).

Every method saves ``{"version": N, "names": [...], ...}``. Loading goes through `migrated`: a state of an
older version is brought forward one version at a time by the method's migrations, a newer one is refused
by name (a newer gradmod wrote it), and one for other modalities is refused before anything is restored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["Migration", "migrated"]

#: Turns the state of version ``v`` into the state of version ``v + 1``.
Migration = Callable[[dict[str, Any]], dict[str, Any]]


def migrated(
    state: Mapping[str, Any],
    *,
    owner: str,
    current: int,
    names: Sequence[str],
    migrations: Mapping[int, Migration] | None = None,
    first: int = 1,
) -> dict[str, Any]:
    """``state`` brought to version ``current`` and checked to be for the modalities ``names``.

    ``migrations[v]`` turns version ``v`` into ``v + 1``; a state without a ``"version"`` key is version
    ``first`` (the format before versions were written). Raises ``ValueError`` naming ``owner`` for a newer
    version, a version no migration reaches, or other modality names.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"{owner}.load_state_dict() needs a mapping (a state_dict), got {type(state).__name__}")
    version = state.get("version", first)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"{owner} state_dict has version {version!r}, not an int")
    if version > current:
        raise ValueError(
            f"{owner} state_dict version {version} is newer than this gradmod understands ({current}): it was "
            "saved by a newer gradmod"
        )
    result = dict(state)
    steps = migrations or {}
    while version < current:
        if version not in steps:
            raise ValueError(f"{owner} state_dict version {version} cannot be read by this gradmod (it reads {current})")
        result = dict(steps[version](result))
        version += 1
    result["version"] = current
    saved = list(result.get("names", names))
    if saved != list(names):
        raise ValueError(f"{owner} state_dict is for modalities {saved}, this {owner} has {list(names)}")
    return result
