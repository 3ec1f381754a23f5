"""Is my model imbalanced, which modality is under-trained, and which method fits my loop?

* `Monitor` — a passive monitor for any loop, attached like a modulator: per step each modality's score
  ratio and each encoder's ``‖g‖/‖w‖`` and its share, per epoch their means; it changes nothing.
* Per-modality evaluation on held-out data (`gradmod.diagnose.evaluation`): `masked_accuracy`,
  `decoupled_accuracy`, `coalition_accuracy`, `shapley_accuracy`, `conditional_utilization`,
  `linear_probe`, `solo_accuracy`.
* `Diagnosis` (from `diagnose`): the measurements, a verdict in plain words (`Verdict`), ``summary()``,
  ``figure()``, JSON.
* `fit_table` of a `Loop`: every method of `gradmod.METHODS` — fits, needs, cannot — with the reason;
  `scaling_effect`: what SGD and Adam-type optimizers do to a gradient scale, measured.
* `similar_benchmarks`: what the benchmarks measured on data with a similar profile (``benchmarks.json``).
* `trial`: the applicable methods and the baseline on your own loop, over seeds.

The guide is the docs page "Is my model imbalanced?".
"""

from gradmod.diagnose.benchmarks import (
    load_benchmarks,
    similar_benchmarks,
    validate_benchmarks,
)
from gradmod.diagnose.evaluation import (
    coalition_accuracy,
    conditional_utilization,
    decoupled_accuracy,
    linear_probe,
    masked_accuracy,
    shapley_accuracy,
    shapley_of,
    solo_accuracy,
    zero_absent,
)
from gradmod.diagnose.fit import FitRow, FitTable, Loop, fit_table
from gradmod.diagnose.monitor import Monitor
from gradmod.diagnose.report import Diagnosis, diagnose
from gradmod.diagnose.scaling import ScalingEffect, scaling_effect
from gradmod.diagnose.trial import Trial, TrialRow, trial
from gradmod.diagnose.verdict import Verdict, decide

__all__ = [
    "Diagnosis",
    "FitRow",
    "FitTable",
    "Loop",
    "Monitor",
    "ScalingEffect",
    "Trial",
    "TrialRow",
    "Verdict",
    "coalition_accuracy",
    "conditional_utilization",
    "decide",
    "decoupled_accuracy",
    "diagnose",
    "fit_table",
    "linear_probe",
    "load_benchmarks",
    "masked_accuracy",
    "scaling_effect",
    "shapley_accuracy",
    "shapley_of",
    "similar_benchmarks",
    "solo_accuracy",
    "trial",
    "validate_benchmarks",
    "zero_absent",
]
