"""The checks and helpers every method shares (`gradmod._internal`): what they accept, what they refuse and how
the refusal reads."""

from __future__ import annotations

import pytest
import torch

from gradmod._internal import (
    SEED_HIGH,
    checked_unimodal_logits,
    real_scalar,
    seeded_generator,
    stack_evidence,
)

NAMES = ("audio", "visual")


def logits(batch: int = 4, classes: int = 3, **override: torch.Tensor) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {**{name: torch.randn(batch, classes) for name in NAMES}, **override}


# ------------------------------------------------------------------------------ checked_unimodal_logits


def test_checked_unimodal_logits_returns_the_given_tensors_in_the_order_of_the_names():
    given = logits()
    checked = checked_unimodal_logits({"visual": given["visual"], "audio": given["audio"]}, torch.tensor([0, 1, 2, 0]), NAMES, "z")
    assert list(checked) == list(NAMES)
    assert all(checked[name] is given[name] for name in NAMES)
    assert list(checked_unimodal_logits(given, None, NAMES[::-1], "z")) == list(NAMES[::-1])


@pytest.mark.parametrize(
    ("given", "error", "message"),
    [
        ({"audio": torch.zeros(4, 3)}, ValueError, r"^z must name exactly the modalities \['audio', 'visual'\]: missing \['visual'\], unknown \[\]$"),
        ([torch.zeros(4, 3)] * 2, TypeError, r"^z must be a mapping modality name -> tensor for the modalities \['audio', 'visual'\], got list$"),
        (logits(visual=torch.zeros(4, 2)), ValueError, r"^z must be floating-point \[batch, classes\] tensors of one shape; 'visual' is torch.float32 \(4, 2\), 'audio' is \(4, 3\)$"),
        (logits(visual=torch.zeros(4, 3, 1)), ValueError, r"'visual' is torch.float32 \(4, 3, 1\), 'audio' is \(4, 3\)$"),
        (logits(visual=torch.zeros(4, 3, dtype=torch.long)), ValueError, r"'visual' is torch.int64 \(4, 3\)"),
        (logits(visual=[[0.0] * 3] * 4), ValueError, r"'visual' is list, 'audio' is \(4, 3\)$"),
        (logits(audio=[[0.0] * 3] * 4), ValueError, r"'audio' is list, 'audio' is list$"),
        (logits(0), ValueError, r"^z: the batch is empty$"),
        (logits(audio=torch.full((4, 3), float("nan"))), ValueError, r"^z of modalities \['audio'\] contain NaN or inf$"),
        (logits(audio=torch.full((4, 3), float("inf")), visual=torch.full((4, 3), -float("inf"))), ValueError,
         r"^z of modalities \['audio', 'visual'\] contain NaN or inf$"),
    ],
)
def test_checked_unimodal_logits_refuses_by_name(given, error, message):
    with pytest.raises(error, match=message):
        checked_unimodal_logits(given, None, NAMES, "z")


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (torch.tensor([0, 1, 3, 0]), r"^target holds class indices outside \[0, 3\)$"),
        (torch.tensor([0, -1, 2, 0]), r"^target holds class indices outside \[0, 3\)$"),
        (torch.tensor([0, 1, 2]), r"target must be \[batch\] class indices matching z\['audio'\] batch 4"),
        (torch.tensor([0.0, 1.0, 2.0, 0.0]), r"target must hold integer class indices, got dtype torch.float32"),
    ],
)
def test_checked_unimodal_logits_checks_the_target_against_the_logits(target, message):
    with pytest.raises(ValueError, match=message):
        checked_unimodal_logits(logits(), target, NAMES, "z")
    checked_unimodal_logits(logits(), torch.tensor([0, 1, 2, 2]), NAMES, "z")  # the largest class is in range


def test_a_nan_is_named_before_a_target_out_of_range():
    with pytest.raises(ValueError, match=r"of modalities \['visual'\] contain NaN"):
        checked_unimodal_logits(logits(visual=torch.full((4, 3), float("nan"))), torch.tensor([5, 5, 5, 5]), NAMES, "z")


# ------------------------------------------------------------------------------------- seeded_generator


def test_a_given_seed_makes_the_generator_that_torch_makes_from_it():
    for seed in (0, 1, SEED_HIGH - 1):
        assert torch.equal(torch.rand(4, generator=seeded_generator(seed)), torch.rand(4, generator=torch.Generator().manual_seed(seed)))


def test_without_a_seed_the_generator_is_drawn_from_torchs_global_rng_over_the_whole_range():
    torch.manual_seed(3)
    first = torch.rand(4, generator=seeded_generator(None))
    torch.manual_seed(3)
    drawn = int(torch.randint(0, SEED_HIGH, ()))
    assert torch.equal(first, torch.rand(4, generator=torch.Generator().manual_seed(drawn)))
    torch.manual_seed(3)
    assert torch.equal(first, torch.rand(4, generator=seeded_generator(None, across_ranks=True)))  # one process


def test_without_a_seed_only_across_ranks_asks_rank_zero(monkeypatch):
    import gradmod._internal as internal

    asked = []
    monkeypatch.setattr(internal, "rank_zero_seed", lambda seed: asked.append(seed) or 5)
    seeded_generator(None)
    assert asked == []
    torch.manual_seed(0)
    generator = seeded_generator(None, across_ranks=True)
    torch.manual_seed(0)
    assert asked == [int(torch.randint(0, SEED_HIGH, ()))]
    assert torch.equal(torch.rand(3, generator=generator), torch.rand(3, generator=torch.Generator().manual_seed(5)))
    seeded_generator(7, across_ranks=True)
    assert len(asked) == 1  # a given seed is the caller's: nothing is broadcast


@pytest.mark.parametrize("bad", [-1, True, 1.5, "3"])
def test_a_seed_must_be_a_non_negative_int_or_none(bad):
    with pytest.raises(ValueError, match=rf"^seed must be an int >= 0 or None, got {bad!r}$"):
        seeded_generator(bad)


# -------------------------------------------------------------------------------- real_scalar, evidence


@pytest.mark.parametrize(
    ("strict", "bound"),
    [(False, ">= 0"), (True, "> 0")],
)
def test_real_scalar_says_which_bound_a_value_broke(strict, bound):
    with pytest.raises(ValueError, match=rf"^alpha must be a finite number {bound}, got -1.0 \(not finite or out of range\)$"):
        real_scalar(-1.0, "alpha", strict=strict)
    with pytest.raises(ValueError, match=r"^beta must be a finite number, got nan"):
        real_scalar(float("nan"), "beta", minimum=-float("inf"))
    assert real_scalar(0, "alpha", strict=False) == 0.0


@pytest.mark.parametrize(
    ("dtype", "returned"),
    [(torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float32, torch.float32), (torch.float64, torch.float64)],
)
def test_evidence_is_stacked_in_float64_and_returned_in_its_own_dtype_at_least_float32(dtype, returned):
    stacked, out_dtype = stack_evidence({"audio": torch.tensor(1.5, dtype=dtype), "visual": torch.tensor([2.0], dtype=dtype)})
    assert stacked.dtype == torch.float64 and stacked.tolist() == [1.5, 2.0] and out_dtype == returned
    single, _ = stack_evidence({"audio": torch.tensor(3.0)})
    assert single.tolist() == [3.0]
