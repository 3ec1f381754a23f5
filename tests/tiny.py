"""A tiny two- or three-encoder model and a training loop shared by the integration tests."""

from __future__ import annotations

import torch
from torch import nn

from gradmod import functional as F


class TinyModel(nn.Module):
    """Per-modality MLP encoders, a concat head (decouplable) and a ζ gate (for the decoupling-free method)."""

    def __init__(self, names=("audio", "visual"), in_dim: int = 6, dim: int = 8, classes: int = 4):
        super().__init__()
        self.names = tuple(names)
        self.encoders = nn.ModuleDict({n: nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(), nn.Linear(dim, dim)) for n in names})
        self.head = nn.Linear(dim * len(names), classes)
        self.gate = nn.Linear(dim * len(names), dim * len(names))

    def forward(self, inputs: dict[str, torch.Tensor]):
        features = {n: self.encoders[n](inputs[n]) for n in self.names}
        cat = torch.cat([features[n] for n in self.names], 1)
        logits = self.head(cat)
        decoupled = F.decouple_linear(self.head.weight, self.head.bias, features)
        gates = torch.softmax(self.gate(cat).unflatten(1, (len(self.names), -1)), 1)
        zeta = gates[:, 0] if len(self.names) == 2 else dict(zip(self.names, gates.unbind(1)))
        return logits, decoupled, features, zeta


def batches(steps: int, batch: int = 16, names=("audio", "visual"), in_dim: int = 6, classes: int = 4, seed: int = 0):
    """Deterministic batches in which the first modality carries the label more clearly (an imbalance)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        y = torch.randint(0, classes, (batch,), generator=g)
        inputs = {}
        for i, n in enumerate(names):
            signal = nn.functional.one_hot(y, in_dim).float() * (3.0 if i == 0 else 0.5)
            inputs[n] = signal + torch.randn(batch, in_dim, generator=g)
        out.append((inputs, y))
    return out


def observe_inputs(method: str, decoupled, zeta, y, classes: int = 4):
    """The observe() keyword arguments each preset reads."""
    if method == "DecouplingFree":
        return {"zeta": zeta}
    if method == "DGM":
        return {"scores": {n: torch.softmax(z, 1) for n, z in decoupled.items()}, "target": y}
    return {"logits": decoupled, "target": y}
