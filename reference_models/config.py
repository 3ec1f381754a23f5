"""What defines a training run: `TrainConfig`, the datasets' defaults, and each method's options from the registry.

`reference_models.train` (the CLI) builds a `TrainConfig`; `reference_models.loops` reads it. The methods'
hyper-parameters are not fields here: each method declares them in its `gradmod.METHODS` entry — its main
strength (``MethodInfo.strength``: ``--strength`` or its keyword, e.g. ``--alpha``) and its options
(``MethodInfo.options``: ``--<method>-<option>``, e.g. ``--mmpareto-rule``) — and `method_options` resolves
them for a run: the value given, else the registry's default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import gradmod
from gradmod.method import MethodInfo

__all__ = [
    "CLI_METHODS",
    "DATASETS",
    "DATASET_DEFAULTS",
    "METHODS",
    "OPTIMIZERS",
    "TrainConfig",
    "default_fusion",
    "method_options",
    "strength_keywords",
]

DATASETS = ("avdigits", "avmnist", "cremad", "ave", "llp")
#: The CLI's own methods: no method, and the control that adds one unimodal head per modality and sums the
#: losses (``L_fused + Σ_m L_m``) — what the methods that train unimodal heads add beyond it is theirs.
CLI_METHODS = {
    "baseline": "joint training on the fused loss (--solo NAME: one modality alone)",
    "unimodal_losses": "the control: one linear head per modality, trained on L_fused + Σ_m L_m, no method",
}
#: Every ``--method``: the CLI's own, then every method of `gradmod.METHODS` by its key.
METHODS = (*CLI_METHODS, *gradmod.METHODS)
OPTIMIZERS = ("sgd", "adam")

#: Per-dataset training defaults: OGM-GE's CREMA-D protocol (SGD 1e-3, momentum 0.9, wd 1e-4, StepLR(70, 0.1),
#: batch 64); Fu, Gao & Xu's Adam 5e-4, ×0.25 every 6 epochs, for LLP; what trains AV-digits and AV-MNIST
#: stably in a few CPU minutes (docs/benchmarks/accuracy.md gives the checks).
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "avdigits": {"optimizer": "sgd", "lr": 0.01, "batch_size": 64, "epochs": 6, "lr_step": None, "lr_gamma": 0.1},
    "avmnist": {"optimizer": "sgd", "lr": 0.01, "batch_size": 64, "epochs": 9, "lr_step": 6, "lr_gamma": 0.1},
    "cremad": {"optimizer": "sgd", "lr": 1e-3, "batch_size": 64, "epochs": 100, "lr_step": 70, "lr_gamma": 0.1},
    "ave": {"optimizer": "adam", "lr": 1e-3, "batch_size": 64, "epochs": 30, "lr_step": 15, "lr_gamma": 0.1},
    "llp": {"optimizer": "adam", "lr": 5e-4, "batch_size": 128, "epochs": 25, "lr_step": 6, "lr_gamma": 0.25},
}


@dataclass
class TrainConfig:
    """Everything that defines a run; ``None`` fields take the dataset's `DATASET_DEFAULTS`.

    ``strength`` is the method's main hyper-parameter (``gradmod.METHODS[method].strength``; ``None``: its
    default); ``options`` the method's other options by keyword (those not given: their defaults);
    ``dataset_options`` go to the generated or embedded dataset (AV-digits' generator, AV-MNIST's knobs).
    ``fusion`` ``None``: the head the method needs (`default_fusion`).
    """

    dataset: str = "avdigits"
    method: str = "baseline"
    fusion: str | None = None
    data_root: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_step: int | None = None
    lr_gamma: float | None = None
    seed: int = 0
    strength: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    apply: str = "params"
    backend: str = "auto"
    param_filter: str = "all"
    noise: str | None = "default"
    modulation_start: int = 0
    modulation_end: int | None = None
    solo: str | None = None
    val_size: int | None = None
    max_items: int | None = None
    dataset_options: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    workers: int = 0
    out: str | None = None
    resume: bool = False
    progress: bool = True

    @property
    def info(self) -> MethodInfo | None:
        """The method's registry entry (``None`` for the CLI's own methods)."""
        return gradmod.METHODS.get(self.method)

    def resolved(self) -> TrainConfig:
        """A copy with the dataset defaults filled in and every choice validated."""
        from reference_models.models.common import FUSION_KINDS

        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; expected one of {DATASETS}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {METHODS}")
        filled = {k: v for k, v in DATASET_DEFAULTS[self.dataset].items() if getattr(self, k) is None}
        if self.fusion is None:
            filled["fusion"] = default_fusion(self.method)
        elif self.fusion not in FUSION_KINDS:
            raise ValueError(f"unknown fusion {self.fusion!r}; expected one of {FUSION_KINDS}")
        config = dataclasses.replace(self, **filled)
        if config.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {config.optimizer!r}")
        if config.epochs < 1 or config.batch_size < 1:
            raise ValueError("epochs and batch size must be >= 1")
        if config.resume and config.out is None:
            raise ValueError("--resume needs --out (the folder holding checkpoint.pt)")
        if config.solo is not None and config.method != "baseline":
            raise ValueError(f"--solo trains one modality alone without any method: use --method baseline, not {config.method}")
        if config.val_size is not None and config.val_size < 1:
            raise ValueError(f"--val-size must be >= 1, got {config.val_size}")
        method_options(config)  # refuses options the method does not have
        return config


#: The fusion head each kind of head a method needs (`gradmod.method.Fit.head`) runs on; the others run on concat.
HEAD_FUSION = {"gate": "gated", "shared": "shared"}


def default_fusion(method: str) -> str:
    """The fusion head ``method`` trains on when ``--fusion`` is not given: what its registry entry's head needs
    (`HEAD_FUSION`: a ζ-gated head for the gate, the shared head for MLA), the method itself for a head (MMCosine),
    else the decouplable concat head."""
    info = gradmod.METHODS.get(method)
    if info is None:
        return "concat"
    if info.kind == "head":
        return method
    return HEAD_FUSION.get(info.fit.head, "concat")


def method_options(config: TrainConfig) -> dict[str, Any]:
    """The method's strength and options for this run, by preset keyword: given values, else the registry's
    defaults. Raises ``ValueError`` naming an option or a strength the method does not have."""
    info = config.info
    if info is None:
        if config.strength is not None or config.options:
            given = ["--strength"] * (config.strength is not None) + [f"option {k!r}" for k in config.options]
            raise ValueError(f"{config.method} has no strength or options: {', '.join(given)} do not apply to it")
        return {}
    known = {option.keyword: option for option in info.options}
    unknown = sorted(set(config.options) - set(known))
    if unknown:
        flags = [f"--{info.key}-{k.replace('_', '-')}" for k in unknown]
        raise ValueError(f"{info.key} has no options {', '.join(flags)}; its options: {sorted(known) or 'none'}")
    values: dict[str, Any] = {}
    if info.strength is not None:
        values[info.strength.keyword] = info.strength.default if config.strength is None else config.strength
    elif config.strength is not None:
        raise ValueError(f"{info.key} has no strength to set ({info.title} has no main hyper-parameter)")
    for keyword, option in known.items():
        value = config.options[keyword] if keyword in config.options else option.default
        if option.choices is not None and value not in option.choices:
            raise ValueError(f"--{info.key}-{keyword.replace('_', '-')} must be one of {option.choices}, got {value!r}")
        values[keyword] = value
    return values


def strength_keywords() -> dict[str, tuple[str, ...]]:
    """Each strength keyword of the registry (``alpha``, ``sharpness``, …) → the methods whose strength it is."""
    keywords: dict[str, list[str]] = {}
    for key, info in gradmod.METHODS.items():
        if info.strength is not None:
            keywords.setdefault(info.strength.keyword, []).append(key)
    return {keyword: tuple(keys) for keyword, keys in keywords.items()}


def preset_keywords(options: Mapping[str, Any], info: MethodInfo) -> dict[str, Any]:
    """The resolved options that are keywords of the preset (those marked ``loop`` belong to the loop)."""
    loop_only = {option.keyword for option in info.options if option.loop}
    return {keyword: value for keyword, value in options.items() if keyword not in loop_only}
