"""gradmod — imbalance-aware gradient modulation for multimodal PyTorch training.

Three lines in an existing loop::

    mod = gradmod.OGMGE({"audio": model.audio_net, "visual": model.visual_net}, alpha=0.8)
    mod.attach(optimizer)
    mod.observe(logits={"audio": la, "visual": lv}, target=y)   # each step, before optimizer.step()
"""

from gradmod import appliers, filters, functional, fusion, gblending, history, kernels, measures, mixup, mla, policies
from gradmod import agm, mmpareto
from gradmod.agm import AGM
from gradmod.appliers import FeaturesApplier, ParamsApplier, scale_grad
from gradmod.functional import rank_modalities
from gradmod.gblending import GBlending
from gradmod.methods import DGM, METHODS, OGM, OGMGE, PDMP, DecouplingFree
from gradmod.mla import MLA
from gradmod.mmpareto import MMPareto
from gradmod.modulator import Modulator, epoch_window
from gradmod.policies import PolicyError

__version__ = "0.2.0.dev0"

__all__ = [
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
    "METHODS",
    "ParamsApplier",
    "FeaturesApplier",
    "PolicyError",
    "scale_grad",
    "rank_modalities",
    "epoch_window",
    "agm",
    "appliers",
    "filters",
    "functional",
    "fusion",
    "gblending",
    "history",
    "kernels",
    "mixup",
    "mla",
    "measures",
    "mmpareto",
    "policies",
]
