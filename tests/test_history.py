"""The compact history: every step kept by default, ratios derived from evidence, exact round trips."""

from __future__ import annotations

import pytest
import torch

from gradmod.functional import discrepancy_ratios
from gradmod.history import History


def fill(history: History, count: int, start: int = 0) -> list[tuple[list[float], list[float]]]:
    rows = []
    for step in range(start, start + count):
        evidence = [1.0 + step, 2.0 + (step % 7)]
        coefficients = [0.5, 1.0]
        when = torch.tensor(step) if history.ring else step
        history.append(when, torch.tensor(evidence), torch.tensor(coefficients), bool(step % 3), step % 5 != 1, step % 11 != 4)
        rows.append((evidence, coefficients))
    return rows


def expected_status(step: int) -> str:
    if step % 11 == 4:
        return "outside"
    if step % 3 == 0:
        return "degenerate"
    return "invalid" if step % 5 == 1 else "applied"


@pytest.mark.parametrize("ring", [False, True])
def test_records_hold_what_was_appended(ring):
    history = History(("audio", "visual"), ring=ring, max_size=8192 if ring else None)
    rows = fill(history, 5000)
    records = history.records()
    assert len(records) == 5000 == len(history)
    for step in (0, 1, 4, 15, 4095, 4096, 4999):
        record = records[step]
        assert record["step"] == step and record["status"] == expected_status(step)
        assert list(record["evidence"].values()) == rows[step][0]
        assert list(record["coefficients"].values()) == rows[step][1]
        expected = discrepancy_ratios({"audio": torch.tensor(rows[step][0][0], dtype=torch.float64),
                                       "visual": torch.tensor(rows[step][0][1], dtype=torch.float64)})
        assert record["ratios"]["audio"] == pytest.approx(expected["audio"].item(), rel=1e-12)
    assert history.last() == records[-1]


@pytest.mark.parametrize("ring", [False, True])
def test_state_dict_round_trip_and_appending_after_loading(ring):
    history = History(("audio", "visual"), ring=ring)
    fill(history, 10)
    restored = History(("audio", "visual"), ring=ring)
    restored.load_state_dict(history.state_dict())
    assert restored.records() == history.records()
    fill(restored, 3, start=10)
    fill(history, 3, start=10)
    assert restored.records() == history.records()
    with pytest.raises(ValueError, match="shape"):
        History(("a", "b", "c")).load_state_dict(history.state_dict())


def test_a_bound_drops_whole_old_blocks_and_counts_them():
    history = History(("audio", "visual"), max_size=10)
    with pytest.warns(RuntimeWarning, match="keeps the last 10 steps"):
        fill(history, 4096 + 20)
    assert history.dropped == 4096
    assert [r["step"] for r in history.records()] == list(range(4096 + 10, 4096 + 20))
    with pytest.raises(ValueError, match="history_size"):
        History(("a", "b"), max_size=0)


def test_a_ring_keeps_the_last_steps_and_counts_the_overwritten():
    history = History(("audio", "visual"), max_size=16, ring=True)
    fill(history, 40)
    assert [r["step"] for r in history.records()] == list(range(24, 40))
    assert history.dropped == 24 and len(history) == 16
