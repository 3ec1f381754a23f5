"""The record of a modulator's steps: evidence, ratios, coefficients and status of every step it considered.

One row per step — ``[evidence (M), coefficients (M), status]`` — written into preallocated blocks on the
evidence's device with a single device operation and no host synchronisation; reading `History.records`
synchronises once. Ratios are not stored: they are a pure function of the evidence
(`gradmod.functional.ratios_of`), computed when read. By default the whole run is kept (a million steps
of two modalities take 20 MB); with ``max_size`` the oldest rows are dropped, counted in
`History.dropped`, with a warning the first time.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from gradmod.functional import ratios_of

__all__ = ["History", "STATUSES"]

#: What happened at a recorded step: the coefficients were applied; the evidence was degenerate (zero,
#: negative or not finite for some modality) so the step was left unmodulated; or (``validate=False``
#: only) the policy's output was not finite or outside its range, so the step was left unmodulated.
STATUSES = ("applied", "degenerate", "invalid")
APPLIED, DEGENERATE, INVALID = range(3)

_BLOCK_ROWS = 4096


class History:
    """Compact, append-only record of steps for ``names`` (optionally bounded to the last ``max_size``)."""

    def __init__(self, names: Sequence[str], max_size: int | None = None) -> None:
        if max_size is not None and (isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1):
            raise ValueError(f"history_size must be None (keep every step) or an int >= 1, got {max_size!r}")
        self.names = tuple(names)
        self.max_size = max_size
        self._blocks: list[Tensor] = []
        self._steps: list[int] = []
        self._filled = 0  # rows used in the last block
        self._dropped = 0

    @property
    def width(self) -> int:
        return 2 * len(self.names) + 1

    def __len__(self) -> int:
        return len(self._steps)

    @property
    def dropped(self) -> int:
        """How many of the oldest rows were dropped to respect ``max_size``."""
        return self._dropped

    def append(self, step: int, evidence: Tensor, coefficients: Tensor, status: int | Tensor) -> None:
        """Record one step; ``status`` is an index into `STATUSES` (a 0-d tensor when known on the device only)."""
        device = evidence.device
        if not self._blocks or self._filled == self._blocks[-1].shape[0] or self._blocks[-1].device != device:
            if self._blocks:  # a block is closed at its used length
                self._blocks[-1] = self._blocks[-1][: self._filled]
            self._blocks.append(torch.empty(_BLOCK_ROWS, self.width, device=device))
            self._filled = 0
        status = torch.as_tensor(status, dtype=torch.float32, device=device).reshape(1)
        parts = (evidence.detach().float(), coefficients.detach().float().to(device), status)
        torch.cat(parts, out=self._blocks[-1][self._filled])
        self._filled += 1
        self._steps.append(int(step))
        self._drop_oldest()

    def _drop_oldest(self) -> None:
        if self.max_size is None:
            return
        while len(self._blocks) > 1 and len(self._steps) - self._blocks[0].shape[0] >= self.max_size:
            if self._dropped == 0:
                warnings.warn(
                    f"gradmod: the history keeps the last {self.max_size} steps (history_size); older steps are "
                    "dropped from now on (history_size=None keeps the whole run)",
                    RuntimeWarning,
                    stacklevel=4,
                )
            count = self._blocks.pop(0).shape[0]
            del self._steps[:count]
            self._dropped += count

    def _rows(self) -> Tensor:
        if not self._blocks:
            return torch.empty(0, self.width, dtype=torch.float64)
        used = [*self._blocks[:-1], self._blocks[-1][: self._filled]]
        return torch.cat([block.cpu() for block in used]).double()

    def records(self) -> list[dict[str, Any]]:
        """``[{"step", "status", "evidence", "ratios", "coefficients"}, ...]``, oldest first (bounded by ``max_size``).

        Evidence, ratios and coefficients are ``{modality: float}``. Reading synchronises with the device once.
        """
        rows = self._rows()
        start = 0 if self.max_size is None else max(0, len(self._steps) - self.max_size)
        return self._as_records(self._steps[start:], rows[start:])

    def last(self) -> dict[str, Any] | None:
        """The newest record, or ``None``."""
        if not self._steps:
            return None
        return self._as_records(self._steps[-1:], self._blocks[-1][self._filled - 1 : self._filled].cpu().double())[0]

    def _as_records(self, steps: Sequence[int], rows: Tensor) -> list[dict[str, Any]]:
        m = len(self.names)
        evidence, coefficients, status = rows[:, :m], rows[:, m : 2 * m], rows[:, 2 * m]
        ratios = ratios_of(evidence)
        return [
            {
                "step": step,
                "status": STATUSES[int(code)],
                "evidence": dict(zip(self.names, e)),
                "ratios": dict(zip(self.names, r)),
                "coefficients": dict(zip(self.names, c)),
            }
            for step, code, e, r, c in zip(steps, status.tolist(), evidence.tolist(), ratios.tolist(), coefficients.tolist())
        ]

    def clear(self) -> None:
        self._blocks.clear()
        self._steps.clear()
        self._filled = 0
        self._dropped = 0

    def state_dict(self) -> dict[str, Any]:
        return {"steps": list(self._steps), "rows": self._rows().float(), "dropped": self._dropped}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        rows = torch.as_tensor(state["rows"], dtype=torch.float32)
        steps = [int(s) for s in state["steps"]]
        if rows.shape != (len(steps), self.width):
            raise ValueError(f"history rows have shape {tuple(rows.shape)}, expected ({len(steps)}, {self.width})")
        self.clear()
        if steps:
            self._blocks = [rows.clone()]
            self._filled = len(steps)
            self._steps = steps
        self._dropped = int(state.get("dropped", 0))
