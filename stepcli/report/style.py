"""Figure style of the report: every rcParams setting and the group colours and line styles."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import matplotlib

from stepcli.setups import SETUPS

RC_PARAMS = {
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.15,
    "font.size": 10,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "axes.labelsize": 10,
    "axes.grid": True,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "lines.linewidth": 1.6,
    "figure.titlesize": 12,
    "figure.titleweight": "bold",
    # Text stays text in SVG and PDF, and SVG ids do not change between renders.
    "svg.fonttype": "none",
    "svg.hashsalt": "stepcli",
    "pdf.fonttype": 42,
}

CAPTION_SIZE = 8
"""Font size of the caption line under each figure."""
SEED_ALPHA = 0.25
"""Opacity of single-seed curves drawn under the mean."""
BAND_ALPHA = 0.15
"""Opacity of confidence bands."""
MEAN_LINEWIDTH = 2.0
"""Width of the bold mean lines, wide enough for a dotted style to stay visible."""
LineStyle = str | tuple[float, tuple[float, ...]]
"""A matplotlib line style: a name such as ``"--"`` or an (offset, dash pattern) pair."""
LINE_STYLES: tuple[LineStyle, ...] = (
    "-",
    "--",
    ":",
    "-.",
    (0, (6, 1.5, 1, 1.5, 1, 1.5)),
    (0, (10, 3)),
)
"""Line styles that groups take in turn: solid, dashed, dotted, dash-dot, dash-dot-dot and
long dashes. Two groups whose lines coincide both stay visible, because the gaps of the line
drawn on top show the one below."""

_PALETTE = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#1b9e77",
    "#d95f02",
    "#7570b3",
    "#e7298a",
    "#66a61e",
    "#e6ab02",
    "#a6761d",
    "#666666",
)


@contextmanager
def report_style() -> Iterator[None]:
    """Apply ``RC_PARAMS`` inside the block and restore the previous settings after it."""
    with matplotlib.rc_context(RC_PARAMS):
        yield


def group_colors(groups: Sequence[str], setups: Sequence[str]) -> dict[str, str]:
    """Return a colour per group.

    When each setup is one group, a setup keeps the same colour in every report (its place in
    the setups table picks it). Otherwise groups take the palette in display order.
    """
    return {
        group: _PALETTE[index % len(_PALETTE)]
        for group, index in _style_indices(groups, setups).items()
    }


def group_line_styles(groups: Sequence[str], setups: Sequence[str]) -> dict[str, LineStyle]:
    """Return a line style per group, picked like the colour: setups 1-6 each get their own
    entry of ``LINE_STYLES``, and the cycle repeats from the seventh setup."""
    return {
        group: LINE_STYLES[index % len(LINE_STYLES)]
        for group, index in _style_indices(groups, setups).items()
    }


def _style_indices(groups: Sequence[str], setups: Sequence[str]) -> dict[str, int]:
    """Return each group's place in the setups table when each setup is one group, else its
    place in display order."""
    if len(set(setups)) == len(groups):
        order = {name: i for i, name in enumerate(SETUPS)}
        return {
            group: order.get(setup, i)
            for i, (group, setup) in enumerate(zip(groups, setups, strict=True))
        }
    return {group: i for i, group in enumerate(groups)}
