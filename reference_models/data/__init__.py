"""Datasets: the embedded AV-digits default and loaders for the real on-disk CREMA-D, AVE and LLP formats.

Every dataset yields ``(inputs: dict[str, Tensor], target)`` with modalities ``("audio", "visual")``.
The real-format loaders record what they tolerated in the user's files in ``dataset.notes``
(`reference_models.data.notes`).
"""
