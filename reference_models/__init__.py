"""Reference models, real-format data loaders and the training CLI that show gradmod's methods at work.

Depends on gradmod, never the reverse. ``python -m reference_models.train --help`` for the CLI,
``python -m reference_models.check --help`` to scan a copy of CREMA-D, AVE or LLP before training,
``python -m reference_models.demo`` for the main job (AV-digits, baseline vs OGM-GE).
"""
