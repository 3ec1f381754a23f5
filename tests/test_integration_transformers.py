"""`gradmod.integrations.transformers` under a real ``transformers.Trainer.train`` on CPU.

Each run is compared with the plain loop that does what the Trainer does (sequential batches, the loss
divided by ``gradient_accumulation_steps``, gradient clipping, then the step; autocast around the forward
with ``bf16=True``): same parameters, same modulator history.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainingArguments, default_data_collator

import gradmod
from gradmod.fusion import ConcatFusion
from gradmod.integrations.transformers import GradModCallback, observe

SAMPLES, BATCH, EPOCHS = 48, 4, 2


class TwoTower(nn.Module):
    """Audio and visual towers, a concat head; the forward reports its evidence through ``report``
    (the integration's `observe`; the plain loop passes its modulator's)."""

    def __init__(self, report=observe) -> None:
        super().__init__()
        self.report = report
        torch.manual_seed(0)
        self.towers = nn.ModuleDict({"audio": nn.Linear(6, 8), "visual": nn.Linear(6, 8)})
        self.head = ConcatFusion({"audio": 8, "visual": 8}, num_classes=3)

    def forward(self, audio, visual, labels=None):
        features = {"audio": self.towers["audio"](audio).relu(), "visual": self.towers["visual"](visual).relu()}
        logits = self.head(features)
        if labels is None:
            return {"logits": logits}
        self.report(self, logits=self.head.unimodal_logits(features), target=labels)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class Samples(torch.utils.data.Dataset):
    """Audio carries the label clearly, visual faintly."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.labels = torch.randint(0, 3, (SAMPLES,), generator=g)
        onehot = nn.functional.one_hot(self.labels, 6).float()
        self.audio = 2.0 * onehot + torch.randn(SAMPLES, 6, generator=g)
        self.visual = 0.3 * onehot + torch.randn(SAMPLES, 6, generator=g)

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> dict:
        return {"audio": self.audio[i], "visual": self.visual[i], "labels": self.labels[i]}


def ogm_ge(model: TwoTower) -> gradmod.Modulator:
    return gradmod.OGMGE(dict(model.towers), alpha=0.8, seed=5)


def sgd(model: nn.Module) -> tuple:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def arguments(out, accumulate=1, bf16=False, clip=0.05, **options) -> TrainingArguments:
    options = {"save_strategy": "no", **options}
    return TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=BATCH, gradient_accumulation_steps=accumulate,
        num_train_epochs=EPOCHS, max_grad_norm=clip, bf16=bf16, use_cpu=True, seed=0,
        train_sampling_strategy="sequential", report_to=[], logging_strategy="no", disable_tqdm=True, **options,
    )  # fmt: skip


def train(out, callback, model=None, resume=None, eval_dataset=None, **options) -> tuple:
    model = TwoTower() if model is None else model
    trainer = Trainer(
        model=model, args=arguments(out, **options), train_dataset=Samples(), eval_dataset=eval_dataset,
        optimizers=sgd(model), callbacks=[callback],
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model


def plain_run(accumulate=1, bf16=False, clip=0.05, clip_first=True):
    """The Trainer's loop written by hand; returns (model, modulator)."""
    model = TwoTower(report=lambda module, **evidence: mod.observe(**evidence))
    optimizer, _ = sgd(model)
    mod = ogm_ge(model)
    if clip_first:
        mod.attach(optimizer)
    loader = torch.utils.data.DataLoader(Samples(), batch_size=BATCH, collate_fn=default_data_collator)
    for _ in range(EPOCHS):
        for index, batch in enumerate(loader):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(**batch)["loss"]
            (loss / accumulate).backward()
            if (index + 1) % accumulate:
                continue
            if not clip_first:
                mod.step()
            nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            optimizer.zero_grad()
    return model, mod


def assert_same_run(model, mod, reference_model, reference):
    assert mod.step_count == reference.step_count
    for got, want in zip(mod.history, reference.history, strict=True):
        assert got["step"] == want["step"]
        for key in ("evidence", "coefficients"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), (got["step"], key)
    torch.testing.assert_close(dict(model.named_parameters()), dict(reference_model.named_parameters()))


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_train_follows_the_plain_loop(tmp_path, accumulate, bf16):
    """One modulated step per optimizer step, with the evidence of all its micro-batches; evaluation
    (every 5 steps here) adds no evidence."""
    callback = GradModCallback(ogm_ge)
    trainer, model = train(
        tmp_path, callback, accumulate=accumulate, bf16=bf16, eval_dataset=Samples(), eval_strategy="steps", eval_steps=5
    )
    steps = EPOCHS * SAMPLES // (BATCH * accumulate)
    assert trainer.state.global_step == steps and callback.method.step_count == steps
    assert all(record["status"] == "applied" for record in callback.method.history)
    assert_same_run(model, callback.method, *plain_run(accumulate, bf16))


def test_modulation_comes_after_the_trainers_gradient_clipping(tmp_path):
    callback = GradModCallback(ogm_ge)
    _, model = train(tmp_path, callback, accumulate=2)
    assert_same_run(model, callback.method, *plain_run(2, clip_first=True))
    modulated_first, _ = plain_run(2, clip_first=False)
    differs = any(not torch.allclose(a, b) for a, b in zip(model.parameters(), modulated_first.parameters()))
    assert differs, "the clip was not active, so the test cannot tell the orders apart"


@pytest.mark.parametrize("given", ["factory", "modulator"])
def test_resuming_from_a_checkpoint_gives_the_uninterrupted_run(tmp_path, given):
    whole_callback = GradModCallback(ogm_ge)
    _, whole = train(tmp_path, whole_callback, accumulate=2, save_strategy="steps", save_steps=4)
    checkpoint = tmp_path / "checkpoint-4"  # mid-way through the first epoch (6 steps per epoch)
    assert (checkpoint / GradModCallback.STATE_FILE).is_file()

    model = TwoTower()
    callback = GradModCallback(ogm_ge if given == "factory" else ogm_ge(model))
    train(tmp_path, callback, model=model, resume=str(checkpoint), accumulate=2)
    assert_same_run(model, callback.method, whole, whole_callback.method)


class Wrapper(nn.Module):
    """The Trainer's model; the evidence comes from the forward of a submodule."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = TwoTower()

    def forward(self, audio, visual, labels=None):
        return self.inner(audio, visual, labels)


def test_a_submodule_of_the_trainers_model_reports_the_evidence(tmp_path):
    callback = GradModCallback(lambda model: ogm_ge(model.inner))
    trainer, model = train(tmp_path, callback, model=Wrapper())
    assert callback.method.step_count == trainer.state.global_step == EPOCHS * SAMPLES // BATCH


# ------------------------------------------------------------------ misuse is a clear error
def test_observe_in_training_mode_outside_trainer_train_is_an_error():
    model = TwoTower()
    batch = default_data_collator([Samples()[i] for i in range(BATCH)])
    model.eval()
    model(**batch)  # evaluation mode: nothing to report
    model.train()
    with pytest.raises(RuntimeError, match="no GradModCallback is training this model"):
        model(**batch)


def test_resuming_from_a_checkpoint_without_gradmod_state_is_an_error(tmp_path):
    train(tmp_path, GradModCallback(ogm_ge), save_strategy="steps", save_steps=4)
    (tmp_path / "checkpoint-4" / GradModCallback.STATE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="training resumes at step 4"):
        train(tmp_path, GradModCallback(ogm_ge), resume=str(tmp_path / "checkpoint-4"))


def test_an_attached_modulator_or_a_factory_returning_something_else_is_refused(tmp_path):
    model = TwoTower()
    mod = ogm_ge(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    mod.attach(optimizer)
    with pytest.raises(ValueError, match="do not call attach"):
        train(tmp_path, GradModCallback(mod), model=model)
    with pytest.raises(TypeError, match="returned a dict"):
        train(tmp_path, GradModCallback(lambda model: {}))
    with pytest.raises(RuntimeError, match="no training has started"):
        GradModCallback(ogm_ge).method


def test_a_train_that_raised_leaves_no_attachment_behind(tmp_path):
    """on_train_end never runs after an exception: the next train() releases the old modulator first."""
    built = []
    callback = GradModCallback(lambda model: built.append(ogm_ge(model)) or built[-1])

    def fails_at_the_third_batch(module, **evidence):
        if module.calls == 2:
            raise KeyError("data problem")
        module.calls += 1
        observe(module, **evidence)

    model = TwoTower(report=fails_at_the_third_batch)
    model.calls = 0
    trainer = Trainer(model=model, args=arguments(tmp_path), train_dataset=Samples(), optimizers=sgd(model),
                      callbacks=[callback])  # fmt: skip
    with pytest.raises(KeyError, match="data problem"):
        trainer.train()
    model.report = observe
    trainer.train()
    assert len(built) == 2 and built[0].attached_to is None
    assert built[1].step_count == EPOCHS * SAMPLES // BATCH
