"""Moved to `gradmod.methods.agm`; this path keeps working for one release, with a ``DeprecationWarning``."""

from gradmod._deprecated import moved_module

moved_module(__name__)
