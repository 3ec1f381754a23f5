"""What the trainer integrations share (not public API): the optional import and the modulator source."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

from torch import nn

from gradmod.modulator import Modulator

#: Builds the modulator from the model when training starts (after the trainer moved the model).
ModulatorFactory = Callable[[nn.Module], Modulator]


def require(module: str, *, extra: str, integration: str) -> ModuleType:
    """Import ``module`` or raise an ``ImportError`` that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"gradmod.integrations.{integration} needs the {module.split('.')[0]!r} package: "
            f"pip install 'gradmod[{extra}]'"
        ) from error


class ModulatorSource:
    """A modulator given as it is, or a factory called with the model each time training starts."""

    def __init__(self, modulator: Modulator | ModulatorFactory) -> None:
        if isinstance(modulator, Modulator):
            self._given: Modulator | None = modulator
            self._factory: ModulatorFactory | None = None
        elif callable(modulator):
            self._given, self._factory = None, modulator
        else:
            raise TypeError(
                "expected a gradmod.Modulator or a factory model -> Modulator, "
                f"got {type(modulator).__name__}"
            )

    def build(self, model: nn.Module) -> Modulator:
        """The given modulator, or a new one from the factory."""
        if self._factory is None:
            return self._given
        built = self._factory(model)
        if not isinstance(built, Modulator):
            raise TypeError(f"the modulator factory returned a {type(built).__name__}, not a gradmod.Modulator")
        return built
