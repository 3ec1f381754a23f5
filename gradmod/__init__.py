"""gradmod — imbalance-aware multimodal learning for PyTorch: the field's methods as drop-ins.

Three lines in an existing loop::

    mod = gradmod.OGMGE({"audio": model.audio_net, "visual": model.visual_net}, alpha=0.8)
    mod.attach(optimizer)
    mod.observe(logits={"audio": la, "visual": lv}, target=y)   # each step, before optimizer.step()

Every method lives in its own module of `gradmod.methods` and is listed in `METHODS`.
"""

from gradmod import appliers, filters, functional, fusion, history, kernels, measures, method, methods, policies
from gradmod.appliers import FeaturesApplier, ParamsApplier, scale_grad
from gradmod.method import Method, MethodInfo
from gradmod.methods import METHODS
from gradmod.methods.agm import AGM
from gradmod.methods.decoupling_free import DecouplingFree
from gradmod.methods.dgm import DGM
from gradmod.methods.gblending import GBlending
from gradmod.methods.lfm import LFM
from gradmod.methods.mixup import BalancedMixup, MultimodalMixup
from gradmod.methods.mla import MLA
from gradmod.methods.mmpareto import MMPareto
from gradmod.methods.ogm import OGM, OGMGE
from gradmod.methods.pdmp import PDMP, rank_modalities
from gradmod.methods.reconboost import ReconBoost
from gradmod.methods.umt import UME, UMT
from gradmod.modulator import Modulator, epoch_window
from gradmod.policies import PolicyError

__version__ = "0.3.0.dev0"

__all__ = [
    "METHODS",
    "Method",
    "MethodInfo",
    "Modulator",
    "OGM",
    "OGMGE",
    "DGM",
    "DecouplingFree",
    "PDMP",
    "AGM",
    "MMPareto",
    "MLA",
    "GBlending",
    "MultimodalMixup",
    "BalancedMixup",
    "ReconBoost",
    "UMT",
    "UME",
    "LFM",
    "ParamsApplier",
    "FeaturesApplier",
    "PolicyError",
    "scale_grad",
    "rank_modalities",
    "epoch_window",
    "appliers",
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
