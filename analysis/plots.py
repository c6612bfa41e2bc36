"""The diagnostics' figures (matplotlib, Agg): skew bars, CKA heatmaps, singular-value curves,
router heatmaps. Each takes one or several labelled results (`--compare` overlays variants the
way the paper's Figures 1-3 and 5 do) and returns a Figure; `save` writes it.

Training uses `router_heatmap_figure` for router.png too (pretrain/metrics.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

Labelled = Sequence[tuple[str, dict]]
"""[(label, result), ...], one per checkpoint (or training step)."""


def save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def router_heatmap_figure(entries: Labelled):
    """Mean router weight per (router step, slot): a write and a read panel per entry.

    `entries` hold router summaries (mesh_model/router_stats.py RouterStatistics.summary()). A
    collapsed router is one bright cell per row; an unused slot a dark column.
    """
    rows = len(entries)
    steps = len(entries[0][1]["steps"])
    fig, axes = plt.subplots(rows, 2, figsize=(10, (0.9 + 0.45 * steps) * rows + 0.4), squeeze=False,
                             layout="constrained")
    image = None
    for row, (label, summary) in enumerate(entries):
        for col, kind in enumerate(("write", "read")):
            ax = axes[row][col]
            weights = np.asarray(summary[kind]["mean_weight"], dtype=float)
            seen = np.asarray(summary["tokens"]) > 0
            weights[~seen] = np.nan  # router steps that saw no tokens
            image = ax.imshow(weights, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
            for (i, j), w in np.ndenumerate(weights):
                if np.isfinite(w):
                    ax.text(j, i, f"{w:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if w > 0.6 else "white")
            ax.set_yticks(range(len(summary["steps"])))
            ax.set_yticklabels(summary["steps"] if col == 0 else [], fontsize=8)
            # The effective number of slots of each row, on the panel's right edge.
            right = ax.twinx()
            right.set_ylim(ax.get_ylim())
            right.set_yticks(range(len(summary["steps"])))
            right.set_yticklabels([f"{e:.2f} eff." for e in summary[kind]["effective_slots"]], fontsize=7)
            ax.set_xticks(range(summary["num_slots"]))
            ax.set_xlabel("buffer slot")
            ax.set_title(f"{label}: {kind} router", fontsize=9)
    fig.colorbar(image, ax=axes.ravel().tolist(), label="mean weight", shrink=0.8)
    return fig


def skew_figure(entries: Labelled):
    """Computation skew per block (left) and per layer (right), mean +- std over samples, bars
    grouped by variant."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1, 2]})
    for ax, level in zip(axes, ("blocks", "layers")):
        names: list[str] = []
        for _, result in entries:  # the union of names, in first-seen order
            names += [n for n in result["skew"][level] if n not in names]
        width = 0.8 / len(entries)
        x = np.arange(len(names))
        for i, (label, result) in enumerate(entries):
            values = result["skew"][level]
            mean = [values[n]["mean"] if n in values else np.nan for n in names]
            std = [values[n]["std"] if n in values else 0.0 for n in names]
            ax.bar(x + (i - (len(entries) - 1) / 2) * width, mean, width, yerr=std, capsize=2, label=label)
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=60 if level == "layers" else 20, ha="right", fontsize=7)
        ax.set_ylabel("2||f(h)-h|| / (||f(h)|| + ||h||)")
        ax.set_title(f"computation skew per {level[:-1]}")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def cka_figure(entries: Labelled):
    """Pairwise CKA between the states, one row per variant, linear and RBF kernel side by side."""
    fig, axes = plt.subplots(len(entries), 2, figsize=(10, 4.2 * len(entries)), squeeze=False)
    image = None
    for row, (label, result) in enumerate(entries):
        names = result["states"]
        for col, kernel in enumerate(("linear", "rbf")):
            ax = axes[row][col]
            matrix = np.asarray(result["cka"][kernel], dtype=float)
            image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="magma")
            for (i, j), v in np.ndenumerate(matrix):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if v > 0.6 else "white")
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
            ax.set_yticks(range(len(names)))
            ax.set_yticklabels(names, fontsize=8)
            ax.set_title(f"{label}: {kernel} CKA", fontsize=9)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="CKA")
    return fig


def spectrum_figure(entries: Labelled):
    """sigma_i / sigma_0 of each state's seq x dim matrix (mean over samples), log axis; one panel
    per state, one line per variant."""
    states: list[str] = []
    for _, result in entries:
        states += [n for n in result["states"] if n not in states]
    cols = min(4, len(states))
    rows = -(-len(states) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.9 * rows), squeeze=False)
    for k, name in enumerate(states):
        ax = axes[k // cols][k % cols]
        for label, result in entries:
            curve = result["spectrum"].get(name)
            if curve is not None:
                values = np.asarray(curve["mean"], dtype=float)
                ax.plot(np.arange(len(values)), np.clip(values, 1e-12, None), label=label, lw=1.2)
        ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("i")
        ax.grid(alpha=0.3)
    for k in range(len(states), rows * cols):
        axes[k // cols][k % cols].axis("off")
    for row in axes:
        row[0].set_ylabel("sigma_i / sigma_0")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig
