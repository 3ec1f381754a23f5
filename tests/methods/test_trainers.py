"""Every method of the catalogue under the real trainers: a Lightning fit and a Hugging Face ``Trainer`` run each, the
method driven by its kind (or refused by name at the start), what it decided logged through the trainer's logger
and read back from real TensorBoard event files; and a plain loop's `gradmod.integrations.tensorboard.log_scalars`.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from cases import Net, backward_step, batches, case, run_step
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter
from transformers import Trainer, TrainingArguments

import gradmod
from gradmod.integrations import lightning as gradmod_lightning
from gradmod.integrations import transformers as gradmod_transformers
from gradmod.integrations.tensorboard import log_scalars

KEYS = [key for key, info in gradmod.METHODS.items() if info.kind != "head"]
BATCHES = 4


def trainer_step(key: str, net: Net, method, batch):
    """The loss a trainer backwards for one batch: the plain loop's step, except that a ``backward`` method reports
    its losses with ``observe`` and the trainer backwards their sum."""
    the_case = case(key)
    if the_case.step is backward_step:
        inputs, target = batch
        features = net.encode(inputs)
        fused = F.cross_entropy(net.fusion(features), target)
        unimodal = {n: F.cross_entropy(net.unimodal[n](features[n]), target) for n in net.names}
        method.observe(fused, unimodal)
        return fused + sum(unimodal.values())
    return the_case.step(net, method, batch)


def scalars_of(folder: Path) -> dict[str, list[float]]:
    """Every scalar tag of the TensorBoard event files under ``folder``, read back with tensorboard's reader."""
    files = list(folder.rglob("events.out.tfevents.*"))
    assert files, f"no event file under {folder}"
    values: dict[str, list[float]] = {}
    for file in files:
        events = EventAccumulator(str(file))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            values.setdefault(tag, []).extend(event.value for event in events.Scalars(tag))
    return values


# ------------------------------------------------------------------------------------------ Lightning
class CaseModule(L.LightningModule):
    def __init__(self, key: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.key = key
        self.net = Net()
        self.method = case(key).build(self.net)
        self.extra = getattr(self.method, "extra", None)  # a method's own parameters join the module
        self.automatic_optimization = gradmod.METHODS[key].kind != "turns"

    def training_step(self, batch, batch_idx):
        method = gradmod_lightning.method_of(self)
        if self.automatic_optimization:
            return trainer_step(self.key, self.net, method, batch)
        optimizer = self.optimizers()
        inputs, target = batch
        features = self.net.encode(inputs)
        for name in self.net.names:  # MLA: one optimizer step per modality, through Lightning's manual optimization
            optimizer.zero_grad()
            gradmod_lightning.observe(self, name, features[name])
            self.manual_backward(F.cross_entropy(self.net.shared(features[name]), target))
            optimizer.step()
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def lightning_fit(key: str, folder: Path, automatic: bool | None = None, **options) -> tuple[CaseModule, gradmod_lightning.GradModCallback]:
    module = CaseModule(key)
    if automatic is not None:
        module.automatic_optimization = automatic
    callback = gradmod_lightning.GradModCallback(module.method)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=2, callbacks=[callback], logger=L.pytorch.loggers.TensorBoardLogger(str(folder)),
        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **options,
    )
    trainer.fit(module, torch.utils.data.DataLoader(batches(BATCHES), batch_size=None))
    return module, callback


@pytest.mark.parametrize("key", KEYS)
def test_every_method_runs_under_lightning_and_logs_what_it_decided(key, tmp_path):
    module, callback = lightning_fit(key, tmp_path)
    method = callback.method
    assert method is module.method and method.history, key
    logged = scalars_of(tmp_path)
    expected = {f"gradmod/{key}/{tag}" for tag in method.scalars()}
    assert expected and expected <= set(logged), (key, sorted(expected - set(logged)))
    assert all(math.isfinite(v) for tag in expected for v in logged[tag])


def test_mmpareto_under_accumulation_takes_the_scale_of_lightnings_divided_loss(tmp_path):
    """Lightning backwards the loss / accumulate_grad_batches; the combination written at the step is the plain
    loop's with each micro-batch's losses halved (``backward``), not twice it."""
    module, callback = lightning_fit("mmpareto", tmp_path, accumulate_grad_batches=2)
    torch.manual_seed(0)
    net = Net()
    method = case("mmpareto").build(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    method.attach(optimizer)
    for _ in range(2):  # the two epochs
        data = batches(BATCHES)
        for first, second in zip(data[::2], data[1::2]):
            optimizer.zero_grad()
            backward_step(net, method, first, scale=0.5)
            backward_step(net, method, second, scale=0.5)
            optimizer.step()
    assert callback.method.step_count == method.step_count == 4
    for (name, p), q in zip(module.net.named_parameters(), net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_a_method_of_turns_under_automatic_optimization_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="MLA takes one optimizer step per modality and batch.*automatic_optimization = False"):
        lightning_fit("mla", tmp_path, automatic=True)


# ------------------------------------------------------------------------------------------ Hugging Face
class CaseModel(torch.nn.Module):
    """The tiny net behind the Trainer's interface: ``forward(**batch)`` returns the loss of the method's step."""

    def __init__(self, key: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.key = key
        self.net = Net()
        self.method = case(key).build(self.net)
        self.extra = getattr(self.method, "extra", None)

    def forward(self, audio, visual, labels):
        batch = ({"audio": audio, "visual": visual}, labels)
        if not self.training:
            return {"loss": F.cross_entropy(self.net(batch[0]), labels)}
        return {"loss": trainer_step(self.key, self.net, gradmod_transformers.method_of(self), batch)}


class Items(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.items = [(inputs, target) for inputs, target in batches(BATCHES)]

    def __len__(self) -> int:
        return BATCHES * 8

    def __getitem__(self, index: int) -> dict:
        inputs, target = self.items[index // 8]
        return {"audio": inputs["audio"][index % 8], "visual": inputs["visual"][index % 8], "labels": target[index % 8]}


def hf_train(key: str, folder: Path, install: bool = True) -> tuple[CaseModel, Trainer]:
    model = CaseModel(key)
    arguments = TrainingArguments(
        output_dir=str(folder), per_device_train_batch_size=8, num_train_epochs=2, learning_rate=0.05, save_strategy="no",
        logging_steps=1, report_to=["tensorboard"], use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=Items())
    callback = gradmod_transformers.GradModCallback(model.method)
    if install:
        callback.install(trainer)
    else:
        trainer.add_callback(callback)
    trainer.train()
    return model, trainer


@pytest.mark.parametrize("key", [k for k in KEYS if "transformers" in gradmod.METHODS[k].fit.trainers])
def test_every_method_runs_under_the_hugging_face_trainer_and_logs_to_its_reporting(key, tmp_path):
    model, trainer = hf_train(key, tmp_path)
    assert model.method.history, key
    expected = {f"gradmod/{key}/{tag}" for tag in model.method.scalars()}
    assert expected <= set().union(*trainer.state.log_history), key
    logged = scalars_of(tmp_path)  # the TensorBoard callback writes under output_dir/runs/
    assert {f"train/{tag}" for tag in expected} <= set(logged), (key, sorted(expected))


def test_the_hugging_face_trainer_refuses_a_method_of_turns_by_name(tmp_path):
    with pytest.raises(ValueError, match="MLA takes one optimizer step per modality and batch"):
        hf_train("mla", tmp_path)


@pytest.mark.parametrize("key", [k for k in KEYS if "transformers" not in gradmod.METHODS[k].fit.trainers
                                 and gradmod.METHODS[k].kind != "turns"])
def test_a_method_the_hugging_face_trainer_cannot_run_is_refused_with_its_reason(key, tmp_path):
    with pytest.raises(ValueError, match=f"does not run under the Hugging Face Trainer.*{gradmod.METHODS[key].page}"):
        hf_train(key, tmp_path)


def test_a_fusion_head_given_as_the_method_is_named_as_a_module_not_called_as_a_factory():
    head = gradmod.MMCosineFusion({"audio": 4, "visual": 4}, 3)
    for integration in (gradmod_transformers, gradmod_lightning):
        with pytest.raises(TypeError, match="got the module MMCosineFusion: a fusion head"):
            integration.GradModCallback(head)


def test_a_callback_added_after_the_reporting_integrations_says_its_scalars_miss_them(tmp_path):
    with pytest.warns(RuntimeWarning, match=r"install\(trainer\)"):
        _, trainer = hf_train("ogm_ge", tmp_path, install=False)
    assert "gradmod/ogm_ge/coefficients/audio" in trainer.state.log_history[-2]


# ------------------------------------------------------------------------------------------ a plain loop
def test_a_plain_loop_logs_the_same_tags_to_a_summary_writer(tmp_path):
    torch.manual_seed(0)
    net = Net()
    the_case = case("ogm_ge")
    method = the_case.build(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    method.attach(optimizer)
    writer = SummaryWriter(str(tmp_path))
    for batch in batches(3):
        run_step(net, method, optimizer, batch, the_case)
        written = log_scalars(writer, method)
    writer.close()
    logged = scalars_of(tmp_path)
    assert set(written) == {f"gradmod/ogm_ge/{tag}" for tag in method.scalars()} <= set(logged)
    coefficients = [r["coefficients"]["audio"] for r in method.history]
    assert logged["gradmod/ogm_ge/coefficients/audio"] == pytest.approx(coefficients, rel=1e-6)
    with pytest.raises(TypeError, match="add_scalar"):
        log_scalars(object(), method)
