"""PNG plots of training runs: accuracy curves (fused and unimodal) and modulation coefficients."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_run", "plot_comparison", "bar_chart"]


def _accuracy_axes(ax, results: Mapping[str, Any]) -> None:
    epochs = [r["epoch"] + 1 for r in results["history"]]
    ax.plot(epochs, [r["test"]["accuracy"] for r in results["history"]], color="black", label="fused")
    for index, name in enumerate(results["history"][0]["test"]["unimodal"]):
        values = [r["test"]["unimodal"][name] for r in results["history"]]
        ax.plot(epochs, values, color=f"C{index}", label=f"{name} alone")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")


def _coefficient_axes(ax, results: Mapping[str, Any], name: str) -> None:
    """The coefficients per step, or a note that ``name`` modulates no gradients."""
    records = results["coefficients_per_step"]
    if not records:
        ax.set_axis_off()
        ax.text(0.5, 0.5, f"{name}: no gradient modulation", ha="center", va="center")
        return
    steps = [r["step"] for r in records]
    for index, modality in enumerate(records[0]["coefficients"]):
        ax.plot(steps, [r["coefficients"][modality] for r in records], color=f"C{index}", lw=0.8, label=f"k {modality}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("coefficient")
    ax.set_title(f"{name}: modulation coefficients")
    ax.legend(fontsize=8)


def plot_run(results: Mapping[str, Any], path: str | Path) -> None:
    """Test accuracy per epoch (fused and each modality alone) and the coefficients per step."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    _accuracy_axes(left, results)
    left.legend(fontsize=8)
    config = results["config"]
    left.set_title(f"{config['dataset']} · {config['method']} · {config['fusion']}")
    _coefficient_axes(right, results, config["method"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_comparison(runs: Mapping[str, Mapping[str, Any]], path: str | Path) -> None:
    """One row per run: accuracy curves (fused solid, unimodal per modality) and coefficients."""
    fig, axes = plt.subplots(len(runs), 2, figsize=(11, 3.6 * len(runs)), squeeze=False)
    for (name, results), (left, right) in zip(runs.items(), axes):
        _accuracy_axes(left, results)
        left.set_title(name)
        left.legend(fontsize=8)
        _coefficient_axes(right, results, name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bar_chart(rows: Sequence[Mapping[str, Any]], path: str | Path, keys: Sequence[str], title: str) -> None:
    """Grouped bars of ``mean ± std`` for each row (``row["name"]``, ``row[key] = (mean, std)``)."""
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    width = 0.8 / len(keys)
    for index, key in enumerate(keys):
        xs = [i + (index - (len(keys) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, [r[key][0] for r in rows], width, yerr=[r[key][1] for r in rows], capsize=3, label=key)
    ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=20)
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
