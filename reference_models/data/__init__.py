"""Datasets: the embedded AV-digits default and loaders for the real on-disk CREMA-D, AVE and LLP formats.

Every dataset yields ``(inputs: dict[str, Tensor], target)`` with modalities ``("audio", "visual")``.
"""
