"""The loss-curve PNG of `qengine finetune` and `qengine demo`, drawn with matplotlib (an optional
dependency, in the hf extra) on its Agg canvas: no display, no pyplot, no global backend change."""

from __future__ import annotations

import math
import os
from typing import Sequence

from ._io import atomic_write

__all__ = ["MATPLOTLIB_MISSING", "line_figure", "save_line_plot"]

MATPLOTLIB_MISSING = "matplotlib is not installed"

# The share of the data's range left empty above and below it, so the lowest point never sits
# on the frame (a curve ending on the bottom edge reads as "the loss reached 0").
Y_MARGIN = 0.12


def _figure_class():
    """matplotlib's Figure with an Agg canvas; ImportError naming the extra when absent."""
    try:
        import matplotlib  # noqa: F401 - first, so a blocked parent package fails even if submodules are cached
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(f"{MATPLOTLIB_MISSING} (pip install matplotlib, or the hf extra)") from None
    return Figure, FigureCanvasAgg


def line_figure(ys: Sequence[float], title: str = "training loss", xlabel: str = "step", ylabel: str = "loss"):
    """A matplotlib Figure of ys against steps 1..len(ys): labelled axes with ticks, a title,
    a y range with a margin of Y_MARGIN on both sides, the minimum and maximum marked, their
    values (and steps) in the legend."""
    ys = [float(y) for y in ys]
    if not ys:
        raise ValueError("nothing to plot")
    Figure, FigureCanvasAgg = _figure_class()
    fig = Figure(figsize=(6.4, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = list(range(1, len(ys) + 1))
    ax.plot(steps, ys, color="tab:blue", linewidth=1.5, marker="o" if len(ys) == 1 else None)
    finite = [y for y in ys if math.isfinite(y)]  # a diverged run's nan/inf steps are gaps in the line
    if finite:
        lo, hi = min(finite), max(finite)
        span = (hi - lo) or max(abs(hi), 1.0) * 0.1  # a flat curve still gets a visible band
        ax.set_ylim(lo - Y_MARGIN * span, hi + Y_MARGIN * span)
    if len(ys) < 3:  # one or two points: room around them
        ax.set_xlim(0.5, len(ys) + 0.5)
        ax.set_xticks(steps)
    else:
        ax.set_xlim(1, len(ys))
        ax.xaxis.get_major_locator().set_params(integer=True)  # steps are whole numbers
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, color="0.9")
    if finite:
        i_lo, i_hi = ys.index(lo), ys.index(hi)
        marks = [(i_hi, "max", "tab:red"), (i_lo, "min", "tab:green")]
        if i_lo == i_hi:  # a flat curve: one mark
            marks = [(i_lo, "loss", "tab:green")]
        for i, label, color in marks:  # marked on the curve, their values in a legend placed off the data
            ax.plot([steps[i]], [ys[i]], "o", color=color, markersize=5, label=f"{label} {ys[i]:.4g} (step {steps[i]})")
        ax.legend(loc="best", fontsize=9, frameon=True)
    return fig


def save_line_plot(path: str | os.PathLike, ys: Sequence[float], title: str = "training loss",
                   xlabel: str = "step", ylabel: str = "loss") -> None:
    """Writes line_figure(ys, ...) as a PNG to `path` (atomically). ImportError without matplotlib."""
    fig = line_figure(ys, title, xlabel, ylabel)
    with atomic_write(path) as f:
        fig.savefig(f, format="png")
