"""A plain loop's logger: `log_scalars` writes what a method decided to a TensorBoard ``SummaryWriter``.

```
writer = torch.utils.tensorboard.SummaryWriter("runs/ogm_ge")
for step, batch in enumerate(loader):
    ...
    optimizer.step()
    gradmod.integrations.tensorboard.log_scalars(writer, mod, step)
```

The tags are the ones the Lightning and Hugging Face callbacks log: ``gradmod/<method>/<field>/<unit>`` (a
modulator's ``evidence``, ``ratios`` and ``coefficients`` per modality, G-Blending's ``weights`` per head, …) and
``gradmod/<method>/active`` (1 on a step that applied the method). Any object with ``add_scalar(tag, value,
step)`` works as the writer; ``torch.utils.tensorboard`` needs the ``tensorboard`` package.
"""

from __future__ import annotations

from typing import Any

from gradmod.methods import key_of

__all__ = ["log_scalars", "tags"]


def tags(method: Any, prefix: str = "gradmod") -> dict[str, float]:
    """``method.scalars()`` under ``<prefix>/<method key>/``: what the trainer callbacks log."""
    return {f"{prefix}/{key_of(method)}/{key}": value for key, value in method.scalars().items()}


def log_scalars(writer: Any, method: Any, step: int | None = None, *, prefix: str = "gradmod") -> dict[str, float]:
    """Write the method's last record to ``writer`` (``add_scalar`` per value) at ``step`` (default: the record's own
    step); returns what was written (nothing before the method's first recorded step)."""
    if not callable(getattr(writer, "add_scalar", None)):
        raise TypeError(f"writer must have add_scalar(tag, value, step) (a SummaryWriter), got {type(writer).__name__}")
    values = tags(method, prefix)
    if values:
        at = method.last["step"] if step is None else step
        for tag, value in values.items():
            writer.add_scalar(tag, value, at)
    return values
