"""The scaling figures: loss vs parameters and loss vs training FLOPs, per variant, with the fits.

loss_vs_parameters.png: each run's final loss at its N; the L(N) fit (solid) and, where fitted,
L(N, D) along each budget of the grid (dashed: a tokens-per-parameter ratio such as 20 N when the
budgets scale with the size, else a fixed token count).

loss_vs_flops.png: each run's final loss at its training FLOPs; where L(N, D) is fitted, its
compute-efficient frontier min_N L(N, C / (k N)), k the points' median FLOPs / (N D) (6 for the
classic C = 6 N D; F_token / N for this project's own FLOP count).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _budget_groups(n: np.ndarray, d: np.ndarray) -> tuple[str, np.ndarray]:
    """('ratio', values) when the budgets are tokens-per-parameter ratios, else ('tokens', values)."""
    ratios = np.unique([float(f"{r:.2g}") for r in d / n])  # 20 N budgets rounded up to whole steps stay 20 N
    tokens = np.unique(d)
    if len(ratios) < len(tokens):
        return "ratio", ratios
    return "tokens", tokens


def plot_fits(all_points, fits, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig_n, ax_n = plt.subplots(figsize=(7, 4.5))
    fig_c, ax_c = plt.subplots(figsize=(7, 4.5))
    for i, (points, fit) in enumerate(zip(all_points, fits)):
        color = colors[i % len(colors)]
        ax_n.scatter(points.n, points.loss, color=color, s=22, zorder=3, label=f"{points.variant} runs")
        ax_c.scatter(points.flops, points.loss, color=color, s=22, zorder=3, label=f"{points.variant} runs")
        n_grid = np.geomspace(points.n.min() / 1.5, points.n.max() * 1.5, 200)
        c = fit.law_n.coefficients
        offset = f"{c['E'].value:.3g} + " if "E" in c else ""  # no E: the two-size power law
        ax_n.plot(n_grid, fit.law_n.predict(n_grid), color=color, lw=1.5,
                  label=f"{points.variant}: L(N) = {offset}{c['A'].value:.3g} / N^{c['alpha'].value:.3g}")
        band = fit.law_n.band(n_grid)
        if band is not None:  # the bootstrap fits' pointwise 95% interval
            ax_n.fill_between(n_grid, band[0], band[1], color=color, alpha=0.12, lw=0)
        if fit.law_nd is None:
            continue
        kind, values = _budget_groups(points.n, points.d)
        for j, value in enumerate(values):
            d_grid = value * n_grid if kind == "ratio" else np.full_like(n_grid, value)
            curve = fit.law_nd.predict(n_grid, d_grid)
            ax_n.plot(n_grid, curve, color=color, lw=1, ls="--", alpha=0.7,
                      label=f"{points.variant}: L(N, D) at each budget" if j == 0 else None)
            if i == 0:  # the budget's name at the curve's end, once
                ax_n.annotate(f"D = {value:.3g} N" if kind == "ratio" else f"D = {value:.3g}", (n_grid[-1], curve[-1]),
                              fontsize=6, xytext=(2, 0), textcoords="offset points", va="center")
        k = float(np.median(points.flops / (points.n * points.d)))
        c_grid = np.geomspace(points.flops.min() / 2, points.flops.max() * 2, 120)
        n_search = np.geomspace(points.n.min() / 100, points.n.max() * 100, 600)
        frontier = [fit.law_nd.predict(n_search, budget / (k * n_search)).min() for budget in c_grid]
        ax_c.plot(c_grid, frontier, color=color, lw=1.5, label=f"{points.variant}: compute-efficient frontier of L(N, D)")
    for ax, xlabel in ((ax_n, "non-embedding parameters N"), (ax_c, "training FLOPs C")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        # losses span a narrow range: plain numbers on the log axis, not 8.1 x 10^0
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats / token)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    ax_n.set_title("loss vs parameters")
    ax_c.set_title("loss vs training compute")
    written = []
    for fig, name in ((fig_n, "loss_vs_parameters.png"), (fig_c, "loss_vs_flops.png")):
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
