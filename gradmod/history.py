"""The record of a method's steps: what it measured and decided for each unit (modality or head), and a status.

Every gradmod method keeps one (`gradmod.method.Method.history`). A history has *fields*, each one value
per unit and step: a modulator's are ``evidence`` and ``coefficients`` stored, and ``ratios`` derived from
the evidence when read (`Derived`: a pure function of a stored field, here
`gradmod.functional.ratios_of`); other methods declare their own (MMPareto's ``cosine``,
``unimodal_weight``, ``scale``). One row per step — ``[stored fields (M each), usable, valid, in window]``
— is written into preallocated blocks on the values' device with a single device operation and no host
synchronisation; reading `History.records` synchronises once. By default the whole run is
kept (a million steps of two modalities take 28 MB); with ``max_size`` only the newest ``max_size`` steps are
reported, the older ones are counted in `History.dropped` with a warning the first time, and their memory is
freed a whole block at a time.

A *ring* history (capture-safe modulators) writes each row at ``step mod max_size`` of one preallocated
buffer, the step number included, so that a replayed CUDA graph keeps recording: it holds the last
``max_size`` steps, and reading reports how many were overwritten.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gradmod._internal import constants
from gradmod.functional import ratios_of

__all__ = ["Derived", "History", "MODULATOR_FIELDS", "STATUSES"]

#: What happened at a recorded step: the coefficients were applied; the evidence was degenerate (zero,
#: negative or not finite for some modality, e.g. no ``observe()``) so the step was left unmodulated; the
#: policy's output broke its contract (``validate=False`` only) so the step was left unmodulated; or the step
#: was outside the modulation window (recorded by capture-safe modulators only).
STATUSES = ("applied", "degenerate", "invalid", "outside")

_BLOCK_ROWS = 4096
_FLAGS = 3  # usable, valid, in window
#: Rows a ring history keeps when no ``max_size`` is given.
DEFAULT_RING_SIZE = 65_536

Flag = bool | Tensor


@dataclass(frozen=True)
class Derived:
    """A field computed when read: ``function`` of the stored field ``source`` (``[N, M] -> [N, M]``, float64)."""

    name: str
    source: str
    function: Callable[[Tensor], Tensor]


#: A modulator's fields: evidence and coefficients stored, the discrepancy ratios derived from the evidence.
MODULATOR_FIELDS: tuple[str | Derived, ...] = ("evidence", Derived("ratios", "evidence", ratios_of), "coefficients")


class History:
    """Compact, append-only record of steps for the units ``names`` (optionally bounded to the last ``max_size``).

    ``fields`` names what a record holds per unit, in order: a ``str`` is stored (one ``[M]`` tensor per
    `append`), a `Derived` is computed from a stored field when read. Rows are stored in ``dtype`` (float32 for
    the long per-step histories of modulators; float64 where the values must round-trip exactly, such as
    G-Blending's weights).
    """

    def __init__(
        self,
        names: Sequence[str],
        max_size: int | None = None,
        ring: bool = False,
        *,
        fields: Sequence[str | Derived] = MODULATOR_FIELDS,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if max_size is not None and (isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1):
            raise ValueError(f"history_size must be None (keep every step) or an int >= 1, got {max_size!r}")
        self.names = tuple(names)
        self.dtype = dtype
        self.fields = tuple(fields)
        self.stored = tuple(field for field in self.fields if isinstance(field, str))
        missing = [f.source for f in self.fields if isinstance(f, Derived) and f.source not in self.stored]
        if not self.stored or missing:
            raise ValueError(f"a history needs a stored field, and derived fields need stored sources (missing {missing})")
        self.ring = ring
        self.max_size = DEFAULT_RING_SIZE if ring and max_size is None else max_size
        self._blocks: list[Tensor] = []
        self._steps: list[int] = []
        self._filled = 0  # rows used in the last block
        self._freed = 0  # rows of the blocks already freed
        self._warned = False

    @property
    def width(self) -> int:
        """Columns of a row: each stored field per unit, and the three flags."""
        return len(self.stored) * len(self.names) + _FLAGS

    def __len__(self) -> int:
        """How many steps `records` reports."""
        if self.ring:
            return len(self._rows_and_steps()[1])
        return len(self._steps) - self._unreported

    @property
    def _unreported(self) -> int:
        """Rows still in memory but older than the last ``max_size``."""
        return 0 if self.max_size is None else max(0, len(self._steps) - self.max_size)

    @property
    def dropped(self) -> int:
        """How many of the oldest steps are no longer reported (or were overwritten, in a ring) to respect ``max_size``."""
        if self.ring:
            steps = self._rows_and_steps()[1]
            return steps[0] if steps else 0
        return self._freed + self._unreported

    def append(
        self, step: int | Tensor, values: Sequence[Tensor], usable: Flag = True, valid: Flag = True, in_window: Flag = True
    ) -> None:
        """Record one step: ``values`` holds one ``[M]`` tensor per stored field, in order. Flags are Python
        bools, or 0-d tensors when known on the device only; a ring history takes the step as a 0-d integer
        tensor on the values' device (no host synchronisation)."""
        if len(values) != len(self.stored):
            raise ValueError(f"a history row holds the fields {list(self.stored)}, got {len(values)} values")
        device = values[0].device
        flags = [_flag(flag, device) for flag in (usable, valid, in_window)]
        parts = [values[0].detach(), *(v.detach().to(device) for v in values[1:]), *flags]
        if self.ring:
            self._write_ring(step, device, parts)
            return
        if not self._blocks or self._filled == self._blocks[-1].shape[0] or self._blocks[-1].device != device:
            if self._blocks:  # a block is closed at its used length
                self._blocks[-1] = self._blocks[-1][: self._filled]
            self._blocks.append(torch.empty(_BLOCK_ROWS, self.width, device=device, dtype=self.dtype))
            self._filled = 0
        torch.cat(parts, out=self._blocks[-1][self._filled])
        self._filled += 1
        self._steps.append(int(step))
        if self.max_size is not None:
            self._drop_oldest()

    @property
    def newest_step(self) -> int | None:
        """The step of the newest record of a non-ring history (``None`` when empty or a ring)."""
        return self._steps[-1] if self._steps and not self.ring else None

    def drop_newest(self) -> None:
        """Remove the newest record of a non-ring history (a step that was recorded, then skipped); a block left
        empty goes, and the block before it, closed at its used length, holds the newest row again."""
        if self.ring or not self._steps:
            raise ValueError("drop_newest() removes the newest row of a non-ring history that has one")
        self._steps.pop()
        self._filled -= 1
        if self._filled == 0 and len(self._blocks) > 1:
            self._blocks.pop()
            self._filled = self._blocks[-1].shape[0]

    def amend(self, values: Sequence[Tensor], usable: Flag = True, valid: Flag = True, in_window: Flag = True) -> None:
        """Overwrite the newest record's values and flags, keeping its step (a step whose numbers changed after
        it was recorded, e.g. by one more accumulated micro-batch). Not for ring histories."""
        if self.ring or not self._steps:
            raise ValueError("amend() rewrites the newest row of a non-ring history that has one")
        device = self._blocks[-1].device
        flags = [_flag(flag, device) for flag in (usable, valid, in_window)]
        torch.cat([*(v.detach().to(device) for v in values), *flags], out=self._blocks[-1][self._filled - 1])

    def _write_ring(self, step: Tensor, device: torch.device, parts: list[Tensor]) -> None:
        if not self._blocks:
            ring = torch.full((self.max_size, self.width + 1), -1.0, device=device, dtype=self.dtype)
            self._blocks = [ring, torch.empty(self.width + 1, device=device, dtype=self.dtype)]
        ring, row = self._blocks
        torch.cat([*parts, step.reshape(1)], out=row)
        ring.index_copy_(0, (step % self.max_size).reshape(1), row.unsqueeze(0))

    def _drop_oldest(self) -> None:
        """Warn when the first step stops being reported; free the oldest block once no reported row is in it."""
        if self.dropped and not self._warned:
            self._warned = True
            warnings.warn(
                f"gradmod: the history keeps the last {self.max_size} steps (history_size); older steps are "
                "dropped from now on (history_size=None keeps the whole run)",
                RuntimeWarning,
                stacklevel=4,
            )
        while len(self._blocks) > 1 and len(self._steps) - self._blocks[0].shape[0] >= self.max_size:
            count = self._blocks.pop(0).shape[0]
            del self._steps[:count]
            self._freed += count

    def _rows_and_steps(self) -> tuple[Tensor, list[int]]:
        """Every kept row (float64, on the host, oldest first) and its step."""
        if not self._blocks:
            return torch.empty(0, self.width, dtype=torch.float64), []
        if self.ring:
            table = self._blocks[0].cpu().double()
            table = table[table[:, -1] >= 0]
            table = table[table[:, -1].argsort()]
            return table[:, :-1], [int(step) for step in table[:, -1].tolist()]
        used = [*self._blocks[:-1], self._blocks[-1][: self._filled]]
        rows = torch.cat([block.cpu() for block in used]).double()
        start = self._unreported
        return rows[start:], self._steps[start:]

    def records(self) -> list[dict[str, Any]]:
        """``[{"step", "status", <field>: {unit: float}, ...}, ...]``, oldest first (bounded by ``max_size``);
        a modulator's fields are evidence, ratios and coefficients. Reading synchronises with the device once.
        """
        rows, steps = self._rows_and_steps()
        return self._as_records(steps, rows)

    def last(self) -> dict[str, Any] | None:
        """The newest record, or ``None``."""
        if self.ring:
            records = self.records()
            return records[-1] if records else None
        if not self._steps:
            return None
        return self._as_records(self._steps[-1:], self._blocks[-1][self._filled - 1 : self._filled].cpu().double())[0]

    def _as_records(self, steps: Sequence[int], rows: Tensor) -> list[dict[str, Any]]:
        m = len(self.names)
        blocks = {name: rows[:, k * m : (k + 1) * m] for k, name in enumerate(self.stored)}
        columns = {}
        for field in self.fields:
            values = blocks[field] if isinstance(field, str) else field.function(blocks[field.source])
            columns[field if isinstance(field, str) else field.name] = values.tolist()
        flags = rows[:, len(self.stored) * m :].tolist()
        return [
            {
                "step": step,
                "status": _status(*flag),
                **{name: dict(zip(self.names, values[row])) for name, values in columns.items()},
            }
            for row, (step, flag) in enumerate(zip(steps, flags))
        ]

    def clear(self) -> None:
        self._blocks.clear()
        self._steps.clear()
        self._filled = 0
        self._freed = 0
        self._warned = False

    def state_dict(self) -> dict[str, Any]:
        rows, steps = self._rows_and_steps()
        return {"steps": steps, "rows": rows.to(self.dtype), "dropped": self.dropped}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        rows = torch.as_tensor(state["rows"], dtype=self.dtype)
        steps = [int(s) for s in state["steps"]]
        if rows.shape != (len(steps), self.width):
            raise ValueError(f"history rows have shape {tuple(rows.shape)}, expected ({len(steps)}, {self.width})")
        device = self._blocks[0].device if self.ring and self._blocks else torch.device("cpu")
        self.clear()
        if self.ring:
            for step, row in zip(steps, rows):
                self._write_ring(torch.tensor(step, device=device), device, [row.to(device)])
            return
        if steps:
            self._blocks = [rows.clone()]
            self._filled = len(steps)
            self._steps = steps
        self._freed = int(state.get("dropped", 0))
        self._warned = self._freed > 0  # announced before the checkpoint


def _flag(flag: Flag, device: torch.device) -> Tensor:
    """A flag as a one-element tensor on ``device``; a Python bool uses a cached tensor (no operation)."""
    if isinstance(flag, Tensor):
        return flag.reshape(1)
    _, zeros, ones, _ = constants(1, device, torch.float32)
    return ones if flag else zeros


def _status(usable: float, valid: float, in_window: float) -> str:
    if not in_window:
        return "outside"
    if not usable:
        return "degenerate"
    return "invalid" if not valid else "applied"
