"""gradmod's OGM against an independent transcription of the official OGM-GE training step.

The transcription follows the official ``train_epoch`` (Peng et al., CVPR 2022; GeWu-Lab/OGM-GE_CVPR2022,
``main.py``) step by step: decoupled logits of the concat head with ``b/2``, scores as a Python sum of
per-sample true-class softmax probabilities, the ratio of the two scores, ``1 − tanh(α·relu(ρ))`` for the
stronger modality, gradients of 4-D (conv) weights scaled while ``start <= epoch <= end``, then the optimizer
step. Without GE noise (OGM) the two trajectories must agree to float rounding over many steps.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradmod

CLASSES, STEPS_PER_EPOCH, EPOCHS, ALPHA = 4, 8, 6, 0.8


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.audio_net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.visual_net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc_out = nn.Linear(8, CLASSES)

    def forward(self, spec, image):
        a, v = self.audio_net(spec), self.visual_net(image)
        return a, v, self.fc_out(torch.cat([a, v], 1))


def data():
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS_PER_EPOCH * EPOCHS):
        y = torch.randint(0, CLASSES, (16,), generator=g)
        spec = torch.randn(16, 1, 6, 6, generator=g) + y.view(-1, 1, 1, 1) * 0.8  # audio: the clear modality
        image = torch.randn(16, 3, 6, 6, generator=g) + y.view(-1, 1, 1, 1) * 0.1
        out.append((spec, image, y))
    return out


def official_step(model, optimizer, spec, image, y, epoch, start_epoch, end_epoch):
    """One step of the official loop (OGM, no noise), transcribed."""
    softmax, relu, tanh = nn.Softmax(dim=1), nn.ReLU(inplace=True), nn.Tanh()
    optimizer.zero_grad()
    a, v, out = model(spec, image)
    weight, bias = model.fc_out.weight, model.fc_out.bias
    out_v = torch.mm(v, weight[:, 4:].t()) + bias / 2
    out_a = torch.mm(a, weight[:, :4].t()) + bias / 2
    nn.functional.cross_entropy(out, y).backward()
    score_v = sum(softmax(out_v)[i][y[i]] for i in range(out_v.size(0)))
    score_a = sum(softmax(out_a)[i][y[i]] for i in range(out_a.size(0)))
    ratio_v = score_v / score_a
    ratio_a = 1 / ratio_v
    if ratio_v > 1:
        coeff_v, coeff_a = 1 - tanh(ALPHA * relu(ratio_v)), 1
    else:
        coeff_a, coeff_v = 1 - tanh(ALPHA * relu(ratio_a)), 1
    if start_epoch <= epoch <= end_epoch:
        for name, parms in model.named_parameters():
            if "audio" in name and len(parms.grad.size()) == 4:
                parms.grad *= coeff_a
            if "visual" in name and len(parms.grad.size()) == 4:
                parms.grad *= coeff_v
    optimizer.step()
    return float(coeff_a), float(coeff_v)


def gradmod_step(model, optimizer, modulator, spec, image, y):
    optimizer.zero_grad()
    a, v, out = model(spec, image)
    decoupled = gradmod.functional.decouple_linear(model.fc_out.weight, model.fc_out.bias, {"audio": a, "visual": v})
    modulator.observe(logits=decoupled, target=y)
    nn.functional.cross_entropy(out, y).backward()
    optimizer.step()


@pytest.mark.parametrize("validate", [True, False])
def test_ogm_follows_the_official_loop(validate):
    start_epoch, end_epoch = 1, 3
    torch.manual_seed(0)
    official = Net()
    ours = Net()
    ours.load_state_dict(official.state_dict())
    make = lambda model: torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)  # noqa: E731
    opt_official, opt_ours = make(official), make(ours)
    start, stop = gradmod.epoch_window(start_epoch, end_epoch, STEPS_PER_EPOCH)
    modulator = gradmod.OGM(
        {"audio": ours.audio_net, "visual": ours.visual_net}, alpha=ALPHA, param_filter=gradmod.filters.conv_weights,
        start_step=start, stop_step=stop, validate=validate,
    )
    modulator.attach(opt_ours)
    coefficients = []
    for step, (spec, image, y) in enumerate(data()):
        coefficients.append(official_step(official, opt_official, spec, image, y, step // STEPS_PER_EPOCH, start_epoch, end_epoch))
        gradmod_step(ours, opt_ours, modulator, spec, image, y)
    for (name, p), q in zip(official.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    recorded = [(r["coefficients"]["audio"], r["coefficients"]["visual"]) for r in modulator.history]
    assert [r["step"] for r in modulator.history] == list(range(start, stop))
    for (ka, kv), (oa, ov) in zip(recorded, coefficients[start:stop]):
        assert math.isclose(ka, oa, rel_tol=1e-5) and math.isclose(kv, ov, rel_tol=1e-5)
    assert sum(ka < 1 for ka, _ in recorded) >= len(recorded) // 2  # audio dominates: the comparison is not vacuous
