"""How figures look: one fixed style (colour, marker, line) per method in every figure of
every report, legends beside the axes, whole-number epoch ticks, and atomic saving."""

from __future__ import annotations

import hashlib
import io
import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from kt_bench.core import atomic  # noqa: E402

#: Paul Tol's "muted" scheme: nine colours told apart under the common colour-vision
#: deficiencies (https://personal.sron.nl/~pault/).
PALETTE = ("#332288", "#CC6677", "#117733", "#882255", "#44AA99", "#999933", "#AA4499",
           "#88CCEE", "#DDCC77")  # the two pale ones last, for the least used methods
#: Colours for other methods (plugins, combinations), none of them in :data:`PALETTE`: the
#: orange, vermillion and blue of Okabe & Ito's colour-blind-safe scheme.
OTHER_COLOURS = ("#E69F00", "#D55E00", "#0072B2")
#: One marker and one line style per lap of the palette.
MARKERS = ("o", "s", "^", "D", "v", "P")
LINES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1)), (0, (1, 3)))
#: The built-in methods in a fixed order: the first nine take the palette with circles and
#: solid lines, the next nine with squares and dashes, and so on. Never reorder: a method's
#: colour is part of how readers find it across reports.
KNOWN_METHODS = ("kd", "fitnet", "at", "nst_poly", "nst_gauss", "nst_linear", "dkd", "crd",
                 "ab", "sp", "cc", "vid", "rkd", "pkt", "ft", "fsp", "reviewkd", "ofd", "dist",
                 "kd_ls", "ofa")
#: The baseline is black in every figure.
BASELINE_STYLE_COLOUR = "#000000"
#: Laps used by the built-ins; other names (plugins, combinations) take the markers after.
_KNOWN_LAPS = -(-len(KNOWN_METHODS) // len(PALETTE))


@dataclass(frozen=True)
class MethodStyle:
    """How one method is drawn."""

    colour: str
    marker: str
    line: str | tuple


def method_style(method: str) -> MethodStyle:
    """The fixed style of ``method``: ``student`` black; a built-in method by its place in
    :data:`KNOWN_METHODS`; any other name (a plugin, a combination such as ``kd+nst_poly``) by
    a SHA-256 of its name onto :data:`OTHER_COLOURS` and markers and lines no built-in uses,
    the same in every run."""
    if method == "student":
        return MethodStyle(BASELINE_STYLE_COLOUR, "o", "-")
    if method in KNOWN_METHODS:
        lap, colour = divmod(KNOWN_METHODS.index(method), len(PALETTE))
        return MethodStyle(PALETTE[colour], MARKERS[lap], LINES[lap])
    digest = int.from_bytes(hashlib.sha256(method.encode()).digest()[:8], "big")
    lap, colour = divmod(digest % ((len(MARKERS) - _KNOWN_LAPS) * len(OTHER_COLOURS)),
                         len(OTHER_COLOURS))
    return MethodStyle(OTHER_COLOURS[colour], MARKERS[_KNOWN_LAPS + lap],
                       LINES[_KNOWN_LAPS + lap])


def wrapped(title: str, width: int = 64) -> str:
    """``title`` broken into lines of at most ``width`` characters (long dataset names would
    run past their panel)."""
    return "\n".join(textwrap.wrap(title, width, break_long_words=True)) or title


def integer_ticks(ax) -> None:
    """Whole numbers only on the x axis (epochs)."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def legend_beside(fig, handles, labels, title: str | None = None, anchor_y: float = 1.0):
    """One legend for the whole figure, right of every panel, so it never covers data."""
    if not handles:
        return None
    ncol = 1 if len(handles) <= 24 else 2
    return fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, anchor_y),
                      fontsize=8, title=title, title_fontsize=8, frameon=False, ncol=ncol)


def save_figure(fig, folder: Path, name: str) -> list[Path]:
    """Write ``fig`` as ``name.png`` and ``name.pdf`` in ``folder`` (each file atomically,
    legends outside the axes included) and close it; return both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.png", folder / f"{name}.pdf"]
    try:
        # the tight box once for both files (each costs a full layout of the figure)
        fig.draw_without_rendering()  # runs the layout engine, as bbox_inches="tight" would
        box = fig.get_tightbbox(fig.canvas.get_renderer()).padded(0.1)
        for path, dpi in zip(paths, (130, None), strict=True):
            buffer = io.BytesIO()
            fig.savefig(buffer, format=path.suffix[1:], dpi=dpi, bbox_inches=box)
            atomic.write_bytes(path, buffer.getvalue())
    finally:
        plt.close(fig)
    return paths
