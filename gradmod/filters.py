"""Parameter filters for ``param_filter=``: ``(name, parameter) -> bool``."""

from __future__ import annotations

from torch import nn

__all__ = ["conv_weights", "weights", "all_parameters"]


def conv_weights(name: str, parameter: nn.Parameter) -> bool:
    """4-D weights only (2-D convolution kernels): the official OGM-GE code's choice (``len(grad.size()) == 4``)."""
    return parameter.dim() == 4


def weights(name: str, parameter: nn.Parameter) -> bool:
    """Every parameter with more than one dimension — conv and linear weights, no biases or norms (BalanceBenchmark's choice).

    The natural choice for transformer or MLP encoders, which have no 4-D weights.
    """
    return parameter.dim() > 1


def all_parameters(name: str, parameter: nn.Parameter) -> bool:
    """Every parameter (the default when no filter is given)."""
    return True
