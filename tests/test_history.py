"""The compact history: every step kept by default, ratios derived from evidence, exact round trips."""

from __future__ import annotations

import warnings

import pytest
import torch

from gradmod.functional import discrepancy_ratios
from gradmod.history import Derived, History


def appended(step: int) -> list[float]:
    """The evidence `fill` appends at ``step``."""
    return [1.0 + step, 2.0 + (step % 7)]


def fill(history: History, count: int, start: int = 0) -> list[tuple[list[float], list[float]]]:
    rows = []
    for step in range(start, start + count):
        evidence = appended(step)
        coefficients = [0.5, 1.0]
        when = torch.tensor(step) if history.ring else step
        history.append(when, (torch.tensor(evidence), torch.tensor(coefficients)), bool(step % 3), step % 5 != 1, step % 11 != 4)
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
    assert history.dropped == 4096 + 10 and len(history) == 10
    assert len(history._blocks) == 1  # the first block's memory is freed
    assert [r["step"] for r in history.records()] == list(range(4096 + 10, 4096 + 20))
    with pytest.raises(ValueError, match="history_size"):
        History(("a", "b"), max_size=0)


def test_a_ring_keeps_the_last_steps_and_counts_the_overwritten():
    history = History(("audio", "visual"), max_size=16, ring=True)
    fill(history, 40)
    assert [r["step"] for r in history.records()] == list(range(24, 40))
    assert history.dropped == 24 and len(history) == 16


@pytest.mark.parametrize("size", [1, 3])
def test_the_smallest_bounds_keep_that_many_steps(size):
    history = History(("audio", "visual"), max_size=size)
    fill(history, 2)
    assert [r["step"] for r in history.records()] == list(range(max(0, 2 - size), 2))


@pytest.mark.parametrize("bad", [0, -3, True, 2.5, "10"])
def test_a_bound_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match=rf"^history_size must be None \(keep every step\) or an int >= 1, got {bad!r}$"):
        History(("a", "b"), max_size=bad)


def test_a_bound_warns_when_the_first_step_goes_and_frees_a_block_when_the_rows_after_it_fill_the_bound():
    history = History(("audio", "visual"), max_size=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fill(history, 10)
    assert history.dropped == 0 and len(history) == 10
    with pytest.warns(RuntimeWarning) as caught:
        fill(history, 1, start=10)
    assert [str(w.message) for w in caught] == [
        "gradmod: the history keeps the last 10 steps (history_size); older steps are dropped from now on "
        "(history_size=None keeps the whole run)"
    ]
    assert history.dropped == 1 and len(history) == 10 and history.records()[0]["step"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        fill(history, 4096 + 9 - 11, start=11)
    assert history.dropped == 4096 - 1 and len(history._blocks) == 2
    fill(history, 1, start=4096 + 9)
    assert history.dropped == 4096 and len(history._blocks) == 1  # freed exactly now
    fill(history, 4096, start=4096 + 10)
    assert history.dropped == 2 * 4096 and len(history) == 10  # counted over every drop
    records = history.records()
    assert [r["step"] for r in records] == list(range(2 * 4096, 2 * 4096 + 10))
    assert [list(r["evidence"].values()) for r in records] == [appended(s) for s in range(2 * 4096, 2 * 4096 + 10)]


def test_a_bounded_history_round_trips_its_drop_count_and_keeps_dropping_after_loading():
    history = History(("audio", "visual"), max_size=3)
    with pytest.warns(RuntimeWarning):
        fill(history, 4096 + 5)
    state = history.state_dict()
    assert state["dropped"] == 4096 + 2 and len(state["steps"]) == 3
    restored = History(("audio", "visual"), max_size=3)
    restored.load_state_dict(state)
    assert restored.dropped == 4096 + 2 and restored.records() == history.records()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # dropping was announced before the checkpoint
        fill(restored, 3, start=4096 + 5)
    assert restored.dropped == 4096 + 5 and len(restored) == 3
    assert len(restored._blocks) == 1  # the loaded block (3 rows) is freed once 3 newer rows follow it
    assert [r["step"] for r in restored.records()] == [4096 + 5, 4096 + 6, 4096 + 7]
    older = {key: value for key, value in state.items() if key != "dropped"}  # a state without the count
    restored.load_state_dict(older)
    assert restored.dropped == 0
    restored.clear()
    assert restored.dropped == 0 and restored.records() == [] and restored.last() is None


@pytest.mark.parametrize("dropped", [0, 1])
def test_a_bounded_history_warns_again_after_clear_or_loading_a_state_that_dropped_nothing(dropped):
    history = History(("audio", "visual"), max_size=2)
    with pytest.warns(RuntimeWarning, match="keeps the last 2 steps"):
        fill(history, 3)
    history.clear()
    with pytest.warns(RuntimeWarning, match="keeps the last 2 steps"):
        fill(history, 3)
    restored = History(("audio", "visual"), max_size=2)
    restored.load_state_dict({**History(("audio", "visual")).state_dict(), "dropped": dropped})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fill(restored, 3)
    assert len(caught) == (1 if dropped == 0 else 0) and restored.dropped == dropped + 1


def test_a_ring_keeps_negative_evidence_and_warns_about_nothing():
    history = History(("audio", "visual"), ring=True, max_size=4)
    assert history.last() is None and history.records() == [] and len(history) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(6):
            history.append(torch.tensor(step), (torch.tensor([-1.0 - step, -0.5]), torch.tensor([1.0, 1.0])), False, True, True)
    records = history.records()
    assert [r["step"] for r in records] == [2, 3, 4, 5] and history.dropped == 2
    assert [r["evidence"]["audio"] for r in records] == [-3.0, -4.0, -5.0, -6.0]
    assert all(r["status"] == "degenerate" for r in records)


def test_the_length_of_a_bounded_history_is_its_number_of_records():
    history = History(("audio", "visual"), max_size=10)
    with pytest.warns(RuntimeWarning):
        fill(history, 4096 + 20)
    assert len(history) == len(history.records()) == 10


# ------------------------------------------------------------------ fields, dtypes, amend and drop_newest

WEIGHTS = ("weight",)  # one stored field, as G-Blending's history has


def test_a_history_needs_a_stored_field_and_derived_fields_need_a_stored_source():
    with pytest.raises(ValueError, match=r"derived fields need stored sources \(missing \['cosine'\]\)"):
        History(("a", "b"), fields=("weight", Derived("angle", "cosine", torch.acos)))
    with pytest.raises(ValueError, match=r"needs a stored field.*\(missing \[\]\)"):
        History(("a", "b"), fields=())
    with pytest.raises(ValueError, match=r"^a history row holds the fields \['evidence', 'coefficients'\], got 1 values$"):
        History(("a", "b")).append(0, (torch.ones(2),))


def test_a_row_of_one_stored_field_without_flags_is_an_applied_step():
    history = History(("fused", "audio"), fields=WEIGHTS, dtype=torch.float64)
    history.append(7, (torch.tensor([0.25, 0.75], dtype=torch.float64),))
    assert history.records() == [{"step": 7, "status": "applied", "weight": {"fused": 0.25, "audio": 0.75}}]


@pytest.mark.parametrize("ring", [False, True])
def test_a_float64_history_keeps_float64_values_exactly_through_its_state(ring):
    value = 1.0 + 2.0**-40  # not a float32
    history = History(("a", "b"), ring=ring, fields=WEIGHTS, dtype=torch.float64)
    history.append(torch.tensor(0) if ring else 0, (torch.tensor([value, -value], dtype=torch.float64),))
    assert history.last()["weight"] == {"a": value, "b": -value}
    state = history.state_dict()
    assert state["rows"].dtype == torch.float64
    restored = History(("a", "b"), ring=ring, fields=WEIGHTS, dtype=torch.float64)
    restored.load_state_dict(state)
    assert restored.records() == history.records()
    assert History(("a", "b")).state_dict()["rows"].dtype == torch.float32  # a modulator's rows: float32


def test_loading_float64_rows_into_a_float32_history_rounds_them_as_appending_would():
    value = 1.0 + 2.0**-40
    wide = History(("a", "b"), fields=WEIGHTS, dtype=torch.float64)
    wide.append(0, (torch.tensor([value, 2.0], dtype=torch.float64),))
    narrow = History(("a", "b"), fields=WEIGHTS)
    narrow.load_state_dict(wide.state_dict())
    assert narrow.state_dict()["rows"].dtype == torch.float32
    assert narrow.last()["weight"] == {"a": 1.0, "b": 2.0}


def test_amend_rewrites_the_newest_values_and_flags_and_keeps_its_step():
    history = History(("audio", "visual"))
    fill(history, 3)
    history.amend((torch.tensor([9.0, 3.0]), torch.tensor([0.25, 1.0])), usable=False)
    records = history.records()
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[-1]["evidence"] == {"audio": 9.0, "visual": 3.0}
    assert records[-1]["coefficients"] == {"audio": 0.25, "visual": 1.0}
    assert records[-1]["ratios"]["audio"] == pytest.approx(3.0)
    assert records[-1]["status"] == "degenerate"
    history.amend((torch.tensor([9.0, 3.0]), torch.tensor([0.25, 1.0])))  # flags default to an applied step
    assert history.last()["status"] == "applied"
    history.amend((torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0])), valid=torch.tensor(0.0))
    assert history.last()["status"] == "invalid"
    history.amend((torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0])), in_window=False)
    assert history.last()["status"] == "outside"
    assert history.records()[:2] == records[:2]  # older rows untouched


def test_amend_and_drop_newest_refuse_a_ring_and_an_empty_history():
    ring = History(("a", "b"), ring=True)
    fill(ring, 2)
    for history in (ring, History(("a", "b"))):
        with pytest.raises(ValueError, match=r"^amend\(\) rewrites the newest row of a non-ring history that has one$"):
            history.amend((torch.ones(2), torch.ones(2)))
        with pytest.raises(ValueError, match=r"^drop_newest\(\) removes the newest row of a non-ring history that has one$"):
            history.drop_newest()
    assert ring.newest_step is None and History(("a", "b")).newest_step is None


def test_drop_newest_removes_only_the_newest_row_and_the_next_append_takes_its_place():
    history = History(("audio", "visual"))
    fill(history, 4)
    before = history.records()
    history.drop_newest()
    assert history.records() == before[:3] and len(history) == 3 and history.newest_step == 2
    assert history.last() == before[2]
    history.append(3, (torch.tensor([5.0, 6.0]), torch.tensor([1.0, 1.0])))
    assert history.records()[:3] == before[:3] and history.last()["evidence"] == {"audio": 5.0, "visual": 6.0}
    for _ in range(4):
        history.drop_newest()
    assert history.records() == [] and history.last() is None
    with pytest.raises(ValueError, match="drop_newest"):
        history.drop_newest()


def test_drop_newest_across_a_block_boundary_reopens_the_block_before():
    history = History(("audio", "visual"))
    rows = fill(history, 4096 + 1)  # the first block is full and closed; the newest row opens the second
    history.drop_newest()
    history.drop_newest()  # the newest row now lies in the closed block
    assert len(history) == 4095 and history.newest_step == 4094 and len(history._blocks) == 1
    assert history.last()["step"] == 4094 and history.last()["evidence"] == dict(zip(("audio", "visual"), rows[4094][0]))
    history.amend((torch.tensor([7.0, 8.0]), torch.tensor([1.0, 1.0])))
    assert history.records()[-1]["evidence"] == {"audio": 7.0, "visual": 8.0}
    assert history.records()[-2]["evidence"] == dict(zip(("audio", "visual"), rows[4093][0]))
    fill(history, 3, start=4095)
    records = history.records()
    assert [r["step"] for r in records] == list(range(4098))
    assert [list(r["evidence"].values()) for r in records[4095:]] == [appended(s) for s in range(4095, 4098)]
