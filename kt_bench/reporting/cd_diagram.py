"""The critical-difference diagram of a ranking (Demšar, 2006): an axis of mean ranks, the
better half of the methods named on its left and the rest on its right, and a bar joining
each group of methods whose mean ranks differ by less than the critical difference."""

from __future__ import annotations

from pathlib import Path

from kt_bench.reporting.ranking import ALPHA, Ranking, p_text
from kt_bench.reporting.style import method_style, plt, save_figure

#: Vertical spacing (data units) of the group bars and of the method rows.
BAR_STEP = 0.22
ROW_STEP = 0.42


def _method_of(label: str) -> str:
    """The method of a table label (``kd [kd.T=4]`` -> ``kd``)."""
    return label.split(" [", 1)[0]


def cd_diagram(ranking: Ranking, folder: Path, name: str = "ranking") -> list[Path]:
    """Draw ``ranking`` as a critical-difference diagram into ``name``.png/.pdf in
    ``folder``; return the files."""
    ranks = ranking.ranks
    k = len(ranks)
    left = list(ranks.index[: (k + 1) // 2])
    right = list(ranks.index[(k + 1) // 2:])[::-1]  # worst at the top, so no lines cross
    rows = max(len(left), len(right))
    bars_bottom = -0.3 - BAR_STEP * len(ranking.groups)
    first_row = bars_bottom - 0.3
    bottom = first_row - ROW_STEP * (rows - 1) - 0.3
    top = 1.0
    fig, ax = plt.subplots(figsize=(max(7.0, 0.45 * k + 4.0), 0.9 + 0.55 * (top - bottom)))
    ax.set_xlim(1 - 0.02 * k, k + 0.02 * k)
    ax.set_ylim(bottom, top)
    ax.axis("off")
    ax.plot([1, k], [0, 0], color="black", lw=1)
    for r in range(1, k + 1):
        ax.plot([r, r], [0, 0.08], color="black", lw=1)
        ax.text(r, 0.13, str(r), ha="center", va="bottom", fontsize=8)
    for r in range(1, k):
        ax.plot([r + 0.5, r + 0.5], [0, 0.04], color="black", lw=0.6)
    cd_end = min(1 + ranking.cd, k)
    ax.plot([1, cd_end], [0.7, 0.7], color="black", lw=1.5)
    for x in (1, cd_end):
        ax.plot([x, x], [0.65, 0.75], color="black", lw=1.5)
    ax.text((1 + cd_end) / 2, 0.8, f"CD = {ranking.cd:.2f}", ha="center", va="bottom",
            fontsize=8)
    for side, names, edge, align in ((-1, left, 1 - 0.02 * k, "right"),
                                     (1, right, k + 0.02 * k, "left")):
        for i, label in enumerate(names):
            rank = float(ranks[label])
            y = first_row - ROW_STEP * i
            style = method_style(_method_of(label))
            ax.plot([rank, rank, edge], [0, y, y], color=style.colour, lw=1.2)
            ax.plot([rank], [0], marker=style.marker, color=style.colour, markersize=5)
            text = f"{label} ({rank:.2f})" if side < 0 else f"({rank:.2f}) {label}"
            ax.text(edge + side * 0.05, y, text, ha=align, va="center", fontsize=8,
                    color="black")
    for g, group in enumerate(ranking.groups):
        y = -0.3 - BAR_STEP * g
        lo, hi = float(ranks[group[0]]), float(ranks[group[-1]])
        ax.plot([lo - 0.03, hi + 0.03], [y, y], color="black", lw=3.5, solid_capstyle="butt")
    ax.set_title(f"Mean rank of top-1 over {ranking.problems} problems (1 = best); bars join "
                 f"methods not significantly different\n(Nemenyi, α = {ALPHA}; Friedman "
                 f"{p_text(ranking.friedman_p)})", fontsize=9)
    return save_figure(fig, folder, name)
