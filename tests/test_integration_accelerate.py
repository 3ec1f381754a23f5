"""A plain loop under ``accelerate``: the modulator attached to the optimizer you built keeps working after
``accelerator.prepare`` wraps it, with gradient accumulation and bf16 autocast.

The ``AcceleratedOptimizer`` that ``prepare`` returns forwards ``step()`` to the wrapped optimizer only at the
end of an accumulation window, so the modulator's step pre-hook must fire exactly then: the run must equal
the same loop written without Accelerate.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from tiny import TinyModel, batches
from torch import nn

import gradmod

MICRO_BATCHES, SIZE, ACCUMULATE = 8, 8, 2


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate keeps one process-wide state; each test configures its own (as Accelerate's tests do)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def loader() -> torch.utils.data.DataLoader:
    items = batches(MICRO_BATCHES, batch=SIZE, seed=2)
    audio = torch.cat([inputs["audio"] for inputs, _ in items])
    visual = torch.cat([inputs["visual"] for inputs, _ in items])
    labels = torch.cat([y for _, y in items])
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(audio, visual, labels), batch_size=SIZE)


def setup():
    torch.manual_seed(0)
    model = TinyModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mod = gradmod.OGMGE(dict(model.encoders), alpha=0.8, seed=3)
    mod.attach(optimizer)
    return model, optimizer, mod


def step_loss(model, mod, audio, visual, y):
    logits, decoupled, _, _ = model({"audio": audio, "visual": visual})
    mod.observe(logits=decoupled, target=y)
    return nn.functional.cross_entropy(logits, y)


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_the_hooks_of_the_wrapped_optimizer_fire_once_per_accumulation_window(mixed_precision):
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATE, mixed_precision=mixed_precision)
    model, optimizer, mod = setup()
    prepared_model, prepared_optimizer, prepared_loader = accelerator.prepare(model, optimizer, loader())
    assert prepared_optimizer is not optimizer and prepared_optimizer.optimizer is optimizer
    fired = []
    for audio, visual, y in prepared_loader:
        with accelerator.accumulate(prepared_model):
            before = mod.step_count
            accelerator.backward(step_loss(prepared_model, mod, audio, visual, y))
            prepared_optimizer.step()
            prepared_optimizer.zero_grad()
            fired.append(mod.step_count - before)
    assert fired == [0, 1] * (MICRO_BATCHES // ACCUMULATE)  # at the end of each window, once

    reference_model, reference_optimizer, reference = setup()
    for index, (audio, visual, y) in enumerate(loader()):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed_precision == "bf16"):
            loss = step_loss(reference_model, reference, audio, visual, y)
        (loss / ACCUMULATE).backward()
        if (index + 1) % ACCUMULATE == 0:
            reference_optimizer.step()
            reference_optimizer.zero_grad()
    assert [r["step"] for r in mod.history] == [r["step"] for r in reference.history] == [0, 1, 2, 3]
    for got, want in zip(mod.history, reference.history):
        assert got["coefficients"] == pytest.approx(want["coefficients"], rel=1e-5)
        assert got["evidence"] == pytest.approx(want["evidence"], rel=1e-5)
    torch.testing.assert_close(dict(model.named_parameters()), dict(reference_model.named_parameters()))
