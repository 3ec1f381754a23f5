"""gradmod — imbalance-aware gradient modulation for multimodal PyTorch training.

Three lines in an existing loop::

    mod = gradmod.OGMGE({"audio": model.audio_net, "visual": model.visual_net}, alpha=0.8)
    mod.attach(optimizer)
    mod.observe(logits={"audio": la, "visual": lv}, target=y)   # each step, before optimizer.step()
"""

from gradmod import filters, functional, fusion, kernels, measures, mixup, policies
from gradmod.functional import rank_modalities
from gradmod.methods import DGM, OGM, OGMGE, PDMP, DecouplingFree
from gradmod.modulator import Modulator, epoch_window

__version__ = "0.1.0"

__all__ = [
    "Modulator",
    "OGM",
    "OGMGE",
    "DGM",
    "DecouplingFree",
    "PDMP",
    "rank_modalities",
    "epoch_window",
    "filters",
    "functional",
    "fusion",
    "kernels",
    "mixup",
    "measures",
    "policies",
]
