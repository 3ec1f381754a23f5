"""Trainer integrations: each is an optional extra, imported on its own.

* `gradmod.integrations.lightning` — `GradModCallback` for Lightning's ``Trainer``
  (``pip install 'gradmod[lightning]'``).
* `gradmod.integrations.transformers` — `GradModCallback` for the Hugging Face ``Trainer``
  (``pip install 'gradmod[transformers]'``).
* `gradmod.integrations.tensorboard` — `log_scalars` for a plain loop: what a method decided, written to a
  ``SummaryWriter`` under the tags the callbacks log.

Accelerate needs no integration module: attach the modulator to the optimizer you built; the
``AcceleratedOptimizer`` that ``accelerator.prepare`` returns steps it, and its hooks fire (see the
Accelerate page of the documentation).

``import gradmod`` imports none of these modules, so the core depends on torch and numpy only.
"""
