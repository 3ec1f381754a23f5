"""gradmod — imbalance-aware multimodal learning for PyTorch: the field's methods as drop-ins.

Three lines in an existing loop::

    mod = gradmod.OGMGE({"audio": model.audio_net, "visual": model.visual_net}, alpha=0.8)
    mod.attach(optimizer)
    mod.observe(logits={"audio": la, "visual": lv}, target=y)   # each step, before optimizer.step()

Every method lives in its own module of `gradmod.methods` and is listed in `METHODS`.
"""

from gradmod import appliers, diagnose, filters, functional, fusion, history, kernels, measures, method, methods, policies
from gradmod.appliers import FeaturesApplier, ParamsApplier, scale_grad
from gradmod.method import Method, MethodInfo
from gradmod.methods import METHODS
from gradmod.methods.pdmp import rank_modalities
from gradmod.modulator import Modulator, epoch_window
from gradmod.policies import PolicyError

__version__ = "0.2.0.dev0"

#: Every method's preset at the top level (gradmod.OGMGE, gradmod.MMPareto, …), from the registry: a method added to
#: the catalogue is exported with its registry line.
PRESETS: dict[str, type] = {info.preset.__name__: info.preset for info in METHODS.values()}
globals().update(PRESETS)

__all__ = [
    "METHODS",
    "Method",
    "MethodInfo",
    "Modulator",
    *PRESETS,
    "ParamsApplier",
    "FeaturesApplier",
    "PolicyError",
    "scale_grad",
    "rank_modalities",
    "epoch_window",
    "appliers",
    "diagnose",
    "filters",
    "functional",
    "fusion",
    "history",
    "kernels",
    "measures",
    "method",
    "methods",
    "policies",
]


def __getattr__(name: str):  # gradmod.agm, gradmod.mixup, ...: moved into gradmod.methods (gradmod._deprecated)
    import importlib

    from gradmod._deprecated import MOVED_MODULES

    if f"gradmod.{name}" in MOVED_MODULES:
        return importlib.import_module(f"gradmod.{name}")
    raise AttributeError(f"module 'gradmod' has no attribute {name!r}")
