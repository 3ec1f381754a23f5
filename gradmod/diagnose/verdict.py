"""The verdict: balanced or imbalanced, which modality is under-trained and by how much, in plain words.

**Which accuracy.** Each modality's held-out accuracy comes from the best measurement given: the linear
probe of its frozen encoder (``probe``, what an encoder trained alone with a linear head is compared
with), else the fused head with the other modalities removed (``masked``), else its decoupled logits.

**The threshold.** A difference between two accuracies counts when it exceeds both ``threshold`` (default
5 points, a convention: smaller differences are rarely worth a method) and three standard errors of the
difference on the ``N`` held-out samples, ``3·√(p₁(1 − p₁)/N + p₂(1 − p₂)/N)`` (a larger gap arises by
sampling noise alone less than 0.3 % of the time, normal approximation). Without ``N`` only the
threshold applies, and the verdict says so.

**Under-trained** means worse in the joint model than trained alone (the solo run, `solo_accuracy`) by
more than that margin: the imbalance balancing methods address. With a linear probe, the encoder and the
fused head are told apart: an encoder whose probe matches its solo run while the fused head, with the
other modalities removed, falls short of it by more than the margin is *under-used* — it learned what
the head does not use. Without a solo run the verdict compares
the modalities with each other: the weakest is named, and whether it is under-trained (rather than given
a harder input) is left open, in those words.

**The batch measure** (the `gradmod.diagnose.Monitor`'s score ratio ρ, mean over the last epoch) calls
dominant the modality with the largest ρ. When it is not the strongest modality on held-out data, the
methods that read that measure (OGM and OGM-GE for the softmax score, DGM for its score, the
decoupling-free method for ζ) damp the wrong modality: their coefficient ``k = 1 − tanh(α·ρ)`` for ``ρ > 1``
(`gradmod.functional.tanh_damping`), quoted at each method's default α.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from gradmod._internal import check_names
from gradmod.functional import tanh_damping
from gradmod.method import check_units

__all__ = ["DEFAULT_THRESHOLD", "NOISE_ERRORS", "READERS", "Verdict", "decide"]

#: The smallest accuracy difference the verdict counts (5 points).
DEFAULT_THRESHOLD = 0.05
#: How many standard errors of a difference the verdict requires besides the threshold.
NOISE_ERRORS = 3.0
#: The methods that damp the modality a measure calls dominant, by the measure's class name.
READERS: dict[str, tuple[str, ...]] = {
    "SoftmaxScore": ("ogm", "ogm_ge"),
    "DGMScore": ("dgm",),
    "ZetaGate": ("decoupling_free",),
}
_BASES = (("probe", "linear probe"), ("masked", "masked accuracy"), ("decoupled", "decoupled accuracy"))


def _pct(value: float) -> str:
    return f"{100 * value:.1f} %"


def _points(value: float) -> str:
    return f"{100 * value:.1f} points"


def _listing(values: Mapping[str, float], unit: str = "%") -> str:
    if unit == "%":
        return ", ".join(f"{name} {_pct(v)}" for name, v in values.items())
    return ", ".join(f"{name} {v:.{unit}f}" for name, v in values.items())


@dataclass(frozen=True)
class Verdict:
    """What the measurements say (module docstring); ``lines`` says it in words, one statement each.

    ``balanced`` is ``None`` when no held-out per-modality accuracy was measured. ``deficits`` holds
    solo − joint per modality on the ``basis`` accuracy (empty without a solo run); ``under_trained`` the
    modalities whose deficit exceeds the margin, largest first. With a linear probe as the basis,
    ``head_deficits`` holds solo − the fused head's accuracy with the other modalities removed (masked,
    else decoupled), and ``underused`` the modalities that are not under-trained but whose head deficit
    exceeds the margin: their encoder learned what the fused head does not use.
    """

    balanced: bool | None
    basis: str | None
    accuracies: dict[str, float]
    strongest: str | None
    weakest: str | None
    gap: float | None
    threshold: float
    samples: int | None
    deficits: dict[str, float] = field(default_factory=dict)
    under_trained: tuple[str, ...] = ()
    head_deficits: dict[str, float] = field(default_factory=dict)
    underused: tuple[str, ...] = ()
    batch_dominant: str | None = None
    batch_ratio: float | None = None
    agrees: bool | None = None
    lines: tuple[str, ...] = ()

    @property
    def weak(self) -> str | None:
        """The modality the verdict names: the most under-trained one, else the most under-used, else the weakest."""
        return (self.under_trained or self.underused or (self.weakest,))[0]

    @property
    def weak_deficit(self) -> float | None:
        """How far the named modality lags its solo run (``None`` without one)."""
        if self.under_trained:
            return self.deficits[self.under_trained[0]]
        if self.underused:
            return self.head_deficits[self.underused[0]]
        return None

    def to_dict(self) -> dict[str, Any]:
        """The verdict for a JSON report: its headline, flags and statements."""
        return {
            "headline": self.headline,
            "balanced": self.balanced,
            "weak": self.weak,
            "under_trained": list(self.under_trained),
            "underused": list(self.underused),
            "agrees": self.agrees,
            "lines": list(self.lines),
        }

    @property
    def headline(self) -> str:
        """The verdict in one line."""
        if self.balanced is None:
            return "no verdict: no held-out accuracy per modality was measured"
        if self.balanced:
            if self.deficits:
                return "balanced — no modality is under-trained against its solo run"
            return f"balanced — the modalities' accuracies are within {_points(self.gap)} of each other"
        if self.under_trained:
            name = self.under_trained[0]
            return f"imbalanced — {name} is under-trained by {_points(self.deficits[name])} (against its solo run)"
        if self.underused:
            name = self.underused[0]
            return (
                f"imbalanced — the fused head under-uses {name}: {_points(self.head_deficits[name])} below its solo run, "
                "though its encoder is not (linear probe)"
            )
        return f"imbalanced — {self.weakest} is {_points(self.gap)} below {self.strongest} (under-training not tested)"


def _margin(p: float, q: float, samples: int | None, threshold: float) -> tuple[float, str]:
    """The margin a difference of the accuracies ``p`` and ``q`` must exceed, and how it was set."""
    if samples is None or samples <= 0:
        return threshold, f"{_points(threshold)} (no held-out sample count: sampling noise not assessed)"
    noise = NOISE_ERRORS * math.sqrt(max(p * (1 - p) + q * (1 - q), 0.0) / samples)
    which = "threshold" if threshold >= noise else f"{NOISE_ERRORS:g} standard errors on {samples} samples"
    return max(threshold, noise), f"{_points(max(threshold, noise))} ({which})"


def _damping(measure: str | None, name: str, ratio: float) -> str:
    """What the methods that read ``measure`` would do to modality ``name`` at ratio ``ratio`` (``""``: none)."""
    from gradmod.methods import METHODS

    by_alpha: dict[float, list[str]] = {}
    for key in READERS.get(measure or "", ()):
        info = METHODS.get(key)
        if info is not None and info.strength is not None and info.strength.keyword == "alpha":
            by_alpha.setdefault(info.strength.default, []).append(info.title)
    parts = []
    for alpha, titles in by_alpha.items():
        k = float(tanh_damping(torch.tensor(ratio, dtype=torch.float64), alpha))
        parts.append(f"{' and '.join(titles)} (α = {alpha:g}) would scale {name}'s gradient by k = 1 − tanh(α·ρ) = {k:.2f}")
    return "; ".join(parts)


def decide(
    names: Sequence[str],
    *,
    probe: Mapping[str, float] | None = None,
    masked: Mapping[str, float] | None = None,
    decoupled: Mapping[str, float] | None = None,
    solo: Mapping[str, float] | None = None,
    samples: int | None = None,
    ratios: Mapping[str, float] | None = None,
    share: Mapping[str, float] | None = None,
    measure: str | None = None,
    threshold: float = DEFAULT_THRESHOLD,
) -> Verdict:
    """The verdict from the measurements (module docstring). ``ratios`` and ``share``: the monitor's mean
    score ratio and ‖g‖/‖w‖ share per modality; ``measure``: its measure's class name."""
    names = check_units(tuple(names), "names")
    given = {"probe": probe, "masked": masked, "decoupled": decoupled}
    for what, values in {**given, "solo": solo, "ratios": ratios, "share": share}.items():
        if values:
            check_names(values, names, f"decide({what}=...)")
    basis, label = next(((key, text) for key, text in _BASES if given[key]), (None, None))
    lines: list[str] = []
    batch_dominant = batch_ratio = None
    usable = {n: r for n, r in (ratios or {}).items() if math.isfinite(r)}
    if usable:
        batch_dominant = max(usable, key=usable.__getitem__)
        batch_ratio = usable[batch_dominant]
    if basis is None:
        if batch_dominant is not None:
            lines.append(
                f"The batch measure ({measure}) calls {batch_dominant} dominant: mean ρ = {batch_ratio:.2f}. With no "
                "held-out accuracy per modality, nothing says whether that is right."
            )
        return Verdict(None, None, {}, None, None, None, threshold, samples, batch_dominant=batch_dominant,
                       batch_ratio=batch_ratio, lines=tuple(lines))
    accuracies = {n: float(given[basis][n]) for n in names}
    strongest = max(names, key=accuracies.__getitem__)
    weakest = min(names, key=accuracies.__getitem__)
    gap = accuracies[strongest] - accuracies[weakest]
    count = f" on {samples} held-out samples" if samples else ""
    lines.append(f"Held-out accuracy of each modality ({label}{count}): {_listing(accuracies)}.")

    deficits: dict[str, float] = {}
    head_deficits: dict[str, float] = {}
    under: list[str] = []
    underused: list[str] = []
    if solo:
        for n in names:
            deficits[n] = float(solo[n]) - accuracies[n]
        margins = {n: _margin(float(solo[n]), accuracies[n], samples, threshold) for n in names}
        under = sorted((n for n in names if deficits[n] > margins[n][0]), key=lambda n: -deficits[n])
        for n in under:
            lines.append(
                f"Imbalanced: {n} is under-trained. Alone it reaches {_pct(solo[n])}, in the joint model "
                f"{_pct(accuracies[n])} ({label}): {_points(deficits[n])} behind, beyond the margin of {margins[n][1]}."
            )
        head_basis = next(((key, text) for key, text in _BASES[1:] if given[key]), None) if basis == "probe" else None
        if head_basis is not None:
            head = given[head_basis[0]]
            for n in names:
                head_deficits[n] = float(solo[n]) - float(head[n])
            margins = {n: _margin(float(solo[n]), float(head[n]), samples, threshold) for n in names}
            underused = sorted((n for n in names if n not in under and head_deficits[n] > margins[n][0]),
                               key=lambda n: -head_deficits[n])
            for n in underused:
                lines.append(
                    f"Imbalanced: the fused model under-uses {n}. Alone it reaches {_pct(solo[n])}, in the joint model "
                    f"with the other modalities removed {_pct(head[n])} ({head_basis[1]}): {_points(head_deficits[n])} "
                    f"behind, beyond the margin of {margins[n][1]}; a linear probe on its frozen features reaches "
                    f"{_pct(accuracies[n])}, so its encoder learned what the fused head does not use."
                )
        balanced = not under and not underused
        if balanced:
            listed = ", ".join(f"{n} {100 * d:+.1f}" for n, d in deficits.items())
            lines.append(
                f"Balanced: no modality does worse in the joint model than alone by more than the margin "
                f"(solo − joint, points: {listed})."
            )
            gap_margin = _margin(accuracies[strongest], accuracies[weakest], samples, threshold)
            if gap > gap_margin[0]:
                lines.append(
                    f"{weakest} is {_points(gap)} below {strongest}, but alone it does no better ({_pct(solo[weakest])}): "
                    "its input carries less, and there is no under-training for a balancing method to undo."
                )
    else:
        gap_margin = _margin(accuracies[strongest], accuracies[weakest], samples, threshold)
        balanced = gap <= gap_margin[0]
        if balanced:
            lines.append(
                f"Balanced: the modalities' accuracies differ by {_points(gap)}, within the margin of {gap_margin[1]}."
            )
        else:
            lines.append(
                f"Imbalanced in accuracy: {weakest} is {_points(gap)} below {strongest}, beyond the margin of "
                f"{gap_margin[1]}. Whether joint training under-trained it needs the solo run (solo_accuracy): "
                "a weaker modality may only have a harder input."
            )

    if probe and masked and not solo:
        for n in names:
            extra = float(probe[n]) - float(masked[n])
            margin = _margin(float(probe[n]), float(masked[n]), samples, threshold)
            if extra > margin[0]:
                lines.append(
                    f"{n}'s frozen features hold more than the fused head uses: a linear probe reaches {_pct(probe[n])}, "
                    f"the fused head with the other modalities removed {_pct(masked[n])}."
                )

    agrees = None
    if batch_dominant is not None:
        agrees = batch_dominant == strongest
        lines.append(f"The batch measure ({measure}) calls {batch_dominant} dominant: mean ρ = {batch_ratio:.2f} over the last epoch.")
        damping = _damping(measure, batch_dominant, batch_ratio)
        if agrees:
            text = f"It agrees with the held-out accuracies ({strongest} strongest)."
            if damping and batch_ratio > 1:
                what = "the direction the held-out measurements call for" if not balanced else (
                    "although the held-out measurements find nothing to balance"
                )
                text += f" {damping}: {what}."
            lines.append(text)
        else:
            text = (
                f"It disagrees with the held-out accuracies, where {strongest} is strongest and {batch_dominant} "
                f"reaches {_pct(accuracies[batch_dominant])}: methods that read this measure damp the modality it calls "
                f"dominant, here {batch_dominant}, slowing a modality that is not ahead on held-out data"
            )
            lines.append(text + (f" ({damping})." if damping and batch_ratio > 1 else "."))
    if share:
        lines.append(f"Share of Σ‖g‖/‖w‖ over the last epoch: {_listing(dict(share))}.")
    return Verdict(
        balanced, basis, accuracies, strongest, weakest, gap, threshold, samples, deficits, tuple(under),
        head_deficits, tuple(underused), batch_dominant, batch_ratio, agrees, tuple(lines),
    )

