"""`gradmod.integrations.lightning` under a real ``lightning.Trainer.fit`` on CPU.

Each run is compared with the plain loop that does what Lightning does (``zero_grad`` at the first batch of
an accumulation window, the loss divided by ``accumulate_grad_batches``, autocast around the step, the
scaler's unscale before the step): same parameters, same modulator history.
"""

from __future__ import annotations

import math
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from tiny import TinyModel, batches
from torch import nn

import gradmod
from gradmod.integrations.lightning import GradModCallback, observe

BATCHES = 6  # per epoch
EPOCHS = 2
LR = 0.1


def data() -> list:
    return batches(BATCHES, seed=3)


def loader(items) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(items, batch_size=None)  # items are whole batches, in order


class Module(L.LightningModule):
    """TinyModel trained with cross-entropy; ``inf_at``: (epoch, batch) whose loss is made infinite."""

    def __init__(self, inf_at: tuple = (), fused: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = TinyModel()
        self.inf_at = set(inf_at)
        self.fused = fused

    def training_step(self, batch, batch_idx):
        inputs, y = batch
        logits, decoupled, _, _ = self.model(inputs)
        observe(self, logits=decoupled, target=y)
        loss = nn.functional.cross_entropy(logits, y)
        return loss * math.inf if (self.current_epoch, batch_idx) in self.inf_at else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9, fused=self.fused)


def ogm_ge(module: Module) -> gradmod.Modulator:
    return gradmod.OGMGE(dict(module.model.encoders), alpha=0.8, seed=7)


def trainer(precision: str = "32-true", **options) -> L.Trainer:
    quiet = dict(logger=False, enable_progress_bar=False, enable_model_summary=False)
    if precision == "16-mixed":  # Lightning turns 16-mixed into bf16-mixed on CPU unless given the plugin
        options["plugins"] = [MixedPrecision("16-mixed", "cpu")]
    else:
        options["precision"] = precision
    options.setdefault("enable_checkpointing", False)
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=EPOCHS, **quiet, **options)


def fit(module: L.LightningModule, callback: GradModCallback, ckpt_path=None, **options) -> L.Trainer:
    run = trainer(callbacks=[callback, *options.pop("callbacks", [])], **options)
    run.fit(module, loader(data()), ckpt_path=ckpt_path)
    return run


def plain_run(precision="32-true", accumulate=1, clip=None, clip_first=False, inf_at=(), fused=False):
    """The same training as ``fit`` in a hand-written loop; returns (model, modulator)."""
    module = Module(inf_at, fused)
    model = module.model
    optimizer = module.configure_optimizers()
    mod = ogm_ge(module)
    scaler = torch.amp.GradScaler("cpu") if precision == "16-mixed" else None
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    if clip is None:
        mod.attach(optimizer)  # the pre-hook modulates: after the scaler's unscale, as the callback does
    for epoch in range(EPOCHS):
        for index, (inputs, y) in enumerate(data()):
            if index % accumulate == 0:
                optimizer.zero_grad()
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                logits, decoupled, _, _ = model(inputs)
                mod.observe(logits=decoupled, target=y)
                loss = nn.functional.cross_entropy(logits, y)
                loss = loss * math.inf if (epoch, index) in inf_at else loss
            loss = loss / accumulate
            (scaler.scale(loss) if scaler else loss).backward()
            if (index + 1) % accumulate:
                continue
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            elif clip is None:
                optimizer.step()
            else:
                if clip_first:
                    nn.utils.clip_grad_norm_(model.parameters(), clip)
                mod.step()
                if not clip_first:
                    nn.utils.clip_grad_norm_(model.parameters(), clip)
                optimizer.step()
    return model, mod


def assert_same_run(module: Module, mod: gradmod.Modulator, model: nn.Module, reference: gradmod.Modulator):
    assert mod.step_count == reference.step_count
    assert [r["step"] for r in mod.history] == [r["step"] for r in reference.history]
    for got, want in zip(mod.history, reference.history):
        for key in ("evidence", "coefficients"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), (got["step"], key)
    for (name, got), (_, want) in zip(module.model.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(got, want, msg=f"parameter {name}")


# ------------------------------------------------------------------ the trajectory of a plain loop
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_fit_follows_the_plain_loop(precision, accumulate):
    """Every optimizer step is modulated once, with the evidence of all its batches, at every precision."""
    module = Module()
    callback = GradModCallback(ogm_ge)
    run = fit(module, callback, precision=precision, accumulate_grad_batches=accumulate)
    steps = EPOCHS * BATCHES // accumulate
    assert run.global_step == steps and callback.method.step_count == steps
    assert all(record["status"] == "applied" for record in callback.method.history)
    assert_same_run(module, callback.method, *plain_run(precision, accumulate))


@pytest.mark.parametrize("fused", [False, True], ids=["unscaled-by-lightning", "fused-unscales-in-step"])
def test_a_step_the_scaler_skips_is_not_modulated_and_drops_its_evidence(fused):
    """16-mixed: an infinite loss makes the scaler skip a step; the next step sees only its own batches.
    A fused optimizer unscales inside its step, so Lightning leaves the gradients scaled for the callback."""
    inf_at = ((0, 3),)  # the second batch of the second accumulation window
    module = Module(inf_at, fused)
    callback = GradModCallback(ogm_ge)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "step without observe()" after the skip
        fit(module, callback, precision="16-mixed", accumulate_grad_batches=2)
    mod = callback.method
    assert mod.step_count == EPOCHS * BATCHES // 2 - 1
    assert_same_run(module, mod, *plain_run("16-mixed", 2, inf_at=inf_at, fused=fused))


def test_modulation_comes_before_lightnings_gradient_clipping():
    module = Module()
    callback = GradModCallback(ogm_ge)
    fit(module, callback, accumulate_grad_batches=2, gradient_clip_val=0.05)
    assert_same_run(module, callback.method, *plain_run(accumulate=2, clip=0.05))
    clipped_first, _ = plain_run(accumulate=2, clip=0.05, clip_first=True)
    differs = any(not torch.allclose(a, b) for a, b in zip(module.model.parameters(), clipped_first.parameters()))
    assert differs, "the clip was not active, so the test cannot tell the orders apart"


# ------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("given", ["factory", "modulator"])
def test_resuming_from_a_checkpoint_gives_the_uninterrupted_run(tmp_path, given):
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    whole = Module()
    whole_callback = GradModCallback(ogm_ge)
    fit(whole, whole_callback, accumulate_grad_batches=2, callbacks=[checkpoints], enable_checkpointing=True)
    first_epoch = sorted(tmp_path.glob("epoch=0-*.ckpt"))
    assert len(first_epoch) == 1

    resumed = Module()
    callback = GradModCallback(ogm_ge if given == "factory" else ogm_ge(resumed))
    fit(resumed, callback, accumulate_grad_batches=2, ckpt_path=str(first_epoch[0]))
    assert callback.method.step_count == whole_callback.method.step_count == EPOCHS * BATCHES // 2
    assert_same_run(resumed, callback.method, whole.model, whole_callback.method)


# ------------------------------------------------------------------ several optimizers (manual optimization)
class TwoModels(L.LightningModule):
    """Two multimodal models, each with its optimizer and its modulator."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.nets = nn.ModuleList([TinyModel(), TinyModel()])

    def training_step(self, batch, batch_idx):
        inputs, y = batch
        for index, (net, optimizer) in enumerate(zip(self.nets, self.optimizers())):
            logits, decoupled, _, _ = net(inputs)
            observe(self, optimizer_index=index, logits=decoupled, target=y)
            optimizer.zero_grad()
            self.manual_backward(nn.functional.cross_entropy(logits, y))
            optimizer.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(net.parameters(), lr=LR) for net in self.nets]


def two_modulators() -> list:
    return [
        lambda m: gradmod.OGMGE(dict(m.nets[0].encoders), alpha=0.8, seed=1),
        lambda m: gradmod.OGM(dict(m.nets[1].encoders), alpha=0.3, seed=2),
    ]


def test_several_optimizers_each_step_their_own_modulator(tmp_path):
    module = TwoModels()
    factories = two_modulators()
    # listed in the reverse order: the index, not the position, binds a callback to its optimizer
    callbacks = [GradModCallback(factories[1], optimizer_index=1), GradModCallback(factories[0], optimizer_index=0)]
    run = fit(module, callbacks[0], callbacks=[callbacks[1]])

    reference = TwoModels()
    optimizers = reference.configure_optimizers()
    mods = [factory(reference) for factory in factories]
    for mod, optimizer in zip(mods, optimizers):
        mod.attach(optimizer)
    for _ in range(EPOCHS):
        for inputs, y in data():
            for net, mod, optimizer in zip(reference.nets, mods, optimizers):
                logits, decoupled, _, _ = net(inputs)
                mod.observe(logits=decoupled, target=y)
                optimizer.zero_grad()
                nn.functional.cross_entropy(logits, y).backward()
                optimizer.step()
    for index in (0, 1):
        mod = callbacks[1 - index].method
        assert mod.step_count == EPOCHS * BATCHES
        for got, want in zip(mod.history, mods[index].history):
            assert got["coefficients"] == pytest.approx(want["coefficients"], rel=1e-5)
    torch.testing.assert_close(dict(module.named_parameters()), dict(reference.named_parameters()))

    run.save_checkpoint(tmp_path / "two.ckpt")
    saved = torch.load(tmp_path / "two.ckpt", weights_only=True)["callbacks"]
    states = {key: value["method"]["step"] for key, value in saved.items() if key.startswith("GradModCallback")}
    assert sorted(states) == sorted(callback.state_key for callback in callbacks)
    assert set(states.values()) == {EPOCHS * BATCHES}


# ------------------------------------------------------------------ misuse is a clear error
class ObservesInValidation(Module):
    def validation_step(self, batch, batch_idx):
        inputs, y = batch
        observe(self, logits=self.model(inputs)[1], target=y)


def test_observe_outside_training_step_is_an_error():
    run = trainer(callbacks=[GradModCallback(ogm_ge)], num_sanity_val_steps=1, limit_val_batches=1)
    with pytest.raises(RuntimeError, match="training_step only"):
        run.fit(ObservesInValidation(), loader(data()), loader(data()))


class ObservesWithoutIndex(TwoModels):
    def training_step(self, batch, batch_idx):
        inputs, y = batch
        observe(self, logits=self.nets[0](inputs)[1], target=y)


def test_observe_without_or_with_ambiguous_callbacks_is_an_error():
    with pytest.raises(RuntimeError, match="no GradModCallback"):
        trainer().fit(Module(), loader(data()))
    callbacks = [GradModCallback(factory, optimizer_index=i) for i, factory in enumerate(two_modulators())]
    with pytest.raises(ValueError, match=r"optimizers \[0, 1\]: pass optimizer_index"):
        trainer(callbacks=callbacks).fit(ObservesWithoutIndex(), loader(data()))


@pytest.mark.parametrize(
    ("callbacks", "error", "match"),
    [
        # Lightning refuses two callbacks with one state key: one modulator per optimizer
        (lambda: [GradModCallback(ogm_ge), GradModCallback(ogm_ge)], RuntimeError, "state_key` must be unique"),
        (lambda: [GradModCallback(ogm_ge, optimizer_index=1)], ValueError, r"returned 1 optimizer\(s\)"),
        (lambda: [GradModCallback(lambda m: "not a modulator")], TypeError, "returned a str"),
        (lambda: [GradModCallback(lambda m: gradmod.OGM({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)}, alpha=1))],
         ValueError, "holds none of the modulated parameters"),
    ],
    ids=["same-optimizer-twice", "no-such-optimizer", "factory-returns-other", "foreign-parameters"],
)
def test_a_misconfigured_callback_fails_when_the_fit_starts(callbacks, error, match):
    with pytest.raises(error, match=match):
        trainer(callbacks=callbacks()).fit(Module(), loader(data()))


def test_an_attached_modulator_is_refused():
    module = Module()
    mod = ogm_ge(module)
    optimizer = module.configure_optimizers()
    mod.attach(optimizer)
    with pytest.raises(ValueError, match="steps it itself"):
        trainer(callbacks=[GradModCallback(mod)]).fit(module, loader(data()))


@pytest.mark.parametrize("bad", [-1, 1.0, True, None])
def test_optimizer_index_is_a_non_negative_int(bad):
    with pytest.raises(ValueError, match="optimizer_index"):
        GradModCallback(ogm_ge, optimizer_index=bad)


def test_the_factory_modulator_exists_once_a_fit_started():
    callback = GradModCallback(ogm_ge)
    with pytest.raises(RuntimeError, match="no fit has started"):
        callback.method
    assert callback.state_dict() == {}
