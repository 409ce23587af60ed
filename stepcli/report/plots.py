"""Functions that draw one panel of a report figure onto a given matplotlib ``Axes``.

Each function takes the DataFrames built in ``stepcli.report.frames`` and an ``ax``, draws,
and computes no statistics itself. A panel without data shows a centred "no data" text.
Loss axes are logarithmic, and losses at or below 0 are drawn at ``LOSS_FLOOR``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.lines import Line2D
from matplotlib.transforms import blended_transform_factory, offset_copy

from stepcli.report.frames import LOSS_FLOOR, Target
from stepcli.report.style import BAND_ALPHA, MEAN_LINEWIDTH, SEED_ALPHA, LineStyle

MAX_CURVE_POINTS = 2000
"""Maximum points drawn per seed curve. ``thin_indices`` picks them so the line looks the same."""

MAX_EPOCH_TICKS = 10
"""Maximum epochs labelled on a step-size panel. Longer runs get integer ticks at round steps."""

NO_DATA_COLOR = "0.45"
NOT_REACHED_COLOR = "#b22222"
SWEEP_SEED_ALPHA = 0.35
"""Opacity of the single-seed dots of the sweep panels."""
SWEEP_LEGEND_OFFSET = 30
"""Distance in points from the bottom of a sweep panel down to its legend: one line of tick
labels and the x label at the sizes of ``style.RC_PARAMS``."""


def draw_no_data(ax: Axes, reason: str = "no data") -> None:
    """Write ``reason`` in the centre of ``ax`` and hide its spines, ticks and grid.

    The title stays, so a panel in a grid still names what it would show.
    """
    ax.text(
        0.5,
        0.5,
        reason,
        ha="center",
        va="center",
        wrap=True,
        transform=ax.transAxes,
        color=NO_DATA_COLOR,
        fontsize=10,
    )
    ax.set_axis_off()


def plot_loss_curves(
    curves: pd.DataFrame,
    means: pd.DataFrame,
    ax: Axes,
    *,
    x: str,
    xlabel: str,
    colors: Mapping[str, str],
    labels: Mapping[str, str],
    line_styles: Mapping[str, LineStyle] | None = None,
    seed_counts: Mapping[str, int] | None = None,
) -> None:
    """Draw each group's mean smoothed loss against ``x`` with its 95% band and its seeds.

    Thin lines are single seeds over their whole length, each with a dot at its last point.
    An ``x`` marks the last finite point of a diverged run instead, at the top edge when
    that point lies above the axis. The bold line is the geometric mean over the seeds that
    cover a common x range (``frames.mean_curves``). The legend's n is ``seed_counts[group]``
    (by default the runs of the group in ``curves``), followed by "mean of k" when the mean
    covers fewer seeds. The y range fits the means and the runs that did not diverge, never
    the bands, so one exploding run or a wide band cannot flatten the rest, and the bands
    are clipped to that range.
    """
    line_styles = line_styles or {}
    kept_values: list[np.ndarray] = []
    diverged_values: list[np.ndarray] = []
    markers: list[tuple[float, float, str]] = []
    ends: list[tuple[float, float, str]] = []
    bands: list[tuple[np.ndarray, np.ndarray, np.ndarray, str]] = []
    empty_groups: list[str] = []
    drawn_mean = False
    # One pass over the rows, which can number millions, instead of one comparison per group.
    by_group = dict(tuple(curves.groupby("group", sort=False)))
    for group, label in labels.items():
        color = colors[group]
        seeds = by_group.get(group, curves.iloc[0:0])
        finite_seeds = 0
        for _, run in seeds.groupby("run_id", sort=False):
            xs = run[x].to_numpy(dtype=float)
            ys = run["smooth_loss"].to_numpy(dtype=float)
            finite = np.isfinite(xs) & np.isfinite(ys)
            if not finite.any():
                continue
            finite_seeds += 1
            ys_drawn = np.clip(ys, LOSS_FLOOR, None)
            diverged = run["status"].iloc[0] == "diverged"
            (diverged_values if diverged else kept_values).append(ys_drawn[finite])
            keep = thin_indices(np.where(finite, ys_drawn, math.nan))
            ax.plot(xs[keep], ys_drawn[keep], color=color, alpha=SEED_ALPHA, linewidth=0.8)
            last = np.flatnonzero(finite)[-1]
            (markers if diverged else ends).append((xs[last], ys_drawn[last], color))
        if not finite_seeds:
            empty_groups.append(label)

        mean = means[means["group"] == group]
        if not np.isfinite(mean["mean"]).any():
            continue
        count = seed_counts[group] if seed_counts else int(seeds["run_id"].nunique())
        in_mean = int(mean["seeds"].max())
        n_text = f"n={count}" if in_mean >= count else f"n={count}, mean of {in_mean}"
        mean_values = np.clip(mean["mean"].to_numpy(dtype=float), LOSS_FLOOR, None)
        if not (seeds["status"] == "diverged").any():
            kept_values.append(mean_values[np.isfinite(mean_values)])
        xs = mean["x"].to_numpy(dtype=float)
        ax.plot(
            xs,
            mean_values,
            color=color,
            linestyle=line_styles.get(group, "-"),
            linewidth=MEAN_LINEWIDTH,
            marker="o" if len(mean) == 1 else None,
            label=f"{label} ({n_text})",
        )
        drawn_mean = True
        low = mean["low"].to_numpy(dtype=float)
        if np.isfinite(low).any():
            bands.append((xs, low, mean["high"].to_numpy(dtype=float), color))
    if not kept_values and not diverged_values:
        draw_no_data(ax, "no data: no run has a finite training loss")
        return

    # The limits come from the lines, so the bands and markers are drawn after them.
    ax.set_yscale("log")
    _set_log_limits(ax, np.concatenate(kept_values or diverged_values))
    bottom, top = ax.get_ylim()
    for xs, low, high, color in bands:
        ax.fill_between(
            xs,
            np.clip(low, bottom, top),
            np.clip(high, bottom, top),
            color=color,
            alpha=BAND_ALPHA,
            linewidth=0,
        )
    for x_value, y_value, color in ends:
        ax.plot(x_value, y_value, "o", color=color, alpha=0.7, markersize=3)
    for x_value, y_value, color in markers:
        (marker,) = ax.plot(
            x_value, min(y_value, top), "x", color=color, ms=8, mew=2, clip_on=False
        )
        marker.set_in_layout(False)
    format_log_axis(ax.yaxis)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("training loss (smoothed, log scale)")
    _add_loss_legend(ax, drawn_mean=drawn_mean, diverged=bool(markers), empty_groups=empty_groups)


def thin_indices(values: np.ndarray, max_points: int = MAX_CURVE_POINTS) -> np.ndarray:
    """Return the sorted indices of ``values`` to draw so that a line looks the same.

    A curve of more than ``max_points`` points is cut into ``max_points // 3`` runs of
    consecutive points, and each run keeps its smallest and largest value and its first
    non-finite point, so peaks and the gaps of NaN stay visible. The first and last points
    are always kept. Shorter curves keep every point.
    """
    count = len(values)
    if count <= max_points:
        return np.arange(count)
    buckets = max(max_points // 3, 1)
    size = math.ceil(count / buckets)
    padded = np.full(buckets * size, np.nan)
    padded[:count] = values
    finite = np.isfinite(padded)
    rows = np.arange(buckets) * size
    low = np.where(finite, padded, np.inf).reshape(buckets, size).argmin(axis=1) + rows
    high = np.where(finite, padded, -np.inf).reshape(buckets, size).argmax(axis=1) + rows
    gaps = (~finite[:count]).nonzero()[0]
    gap_starts = gaps[np.concatenate(([True], gaps[1:] // size != gaps[:-1] // size))[: gaps.size]]
    keep = np.unique(np.concatenate(([0, count - 1], low, high, gap_starts)))
    return keep[keep < count]


def _add_loss_legend(
    ax: Axes, *, drawn_mean: bool, diverged: bool, empty_groups: Sequence[str]
) -> None:
    """Put the legend of a loss panel to the right of it: the mean lines, then the marker key
    and one entry per group that has no finite loss."""
    handles, texts = ax.get_legend_handles_labels()
    if drawn_mean:
        handles.append(
            Line2D([], [], color="0.3", alpha=SEED_ALPHA + 0.2, lw=0.8, marker="o", ms=3)
        )
        texts.append("single seed, dot at its last point")
    else:
        handles.append(Line2D([], [], color="0.3", alpha=SEED_ALPHA))
        texts.append("single seeds (no common range for a mean)")
    if diverged:
        handles.append(Line2D([], [], color="0.3", marker="x", linestyle="", mew=2))
        texts.append("run diverged (last finite point)")
    for label in empty_groups:
        handles.append(Line2D([], [], color=NO_DATA_COLOR, linestyle=":"))
        texts.append(f"{label}: no finite loss, not drawn")
    ax.legend(handles, texts, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def plain_number(value: float) -> str:
    """Return ``value`` in ``%g`` form with a short exponent: 0.5, 20, 1e-05 as 1e-5."""
    text = f"{value:g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}e{int(exponent)}"
    return text


def format_log_axis(axis: object) -> None:
    """Label a log axis with plain numbers (0.5, 2, 1e-5), and minor ticks on short ranges.

    Matplotlib labels the minor ticks of an axis spanning less than about a decade in the
    ``2 × 10^0`` form; plain numbers read faster.
    """
    low, high = axis.get_view_interval()
    plain = ticker.FuncFormatter(lambda value, _: plain_number(value))
    axis.set_major_formatter(plain)
    if low > 0 and high / low < 30:
        # Less than about half a decade shows too few of 2, 3 and 5 to read values off.
        subs = (1.5, 2.0, 3.0, 4.0, 5.0, 7.0) if high / low < 4 else (2.0, 3.0, 5.0)
        axis.set_minor_locator(ticker.LogLocator(subs=subs))
        axis.set_minor_formatter(plain)
    else:
        axis.set_minor_formatter(ticker.NullFormatter())


def plot_convergence_times(
    times: pd.DataFrame,
    convergence: pd.DataFrame,
    target: Target | None,
    ax: Axes,
    *,
    colors: Mapping[str, str],
    labels: Mapping[str, str],
) -> None:
    """Draw each group's time to the target loss: mean with 95% CI and one dot per seed.

    A group where some seed never reached the target shows "not reached (k of n)" beside the
    seeds that did, so it is never left out.
    """
    if target is None:
        draw_no_data(
            ax,
            "no data: no target loss, because no finished run has a finite final loss.\n"
            "Pass --target-loss to set one.",
        )
        return
    if convergence.empty:
        draw_no_data(ax)
        return
    groups = list(labels)
    positions = {group: len(groups) - 1 - i for i, group in enumerate(groups)}
    reached_seconds = times.loc[times["reached"], "seconds"]
    right = float(reached_seconds.max()) if not reached_seconds.empty else 1.0
    for row in convergence.itertuples():
        y = positions[row.group]
        color = colors[row.group]
        seeds = times[(times["group"] == row.group) & times["reached"]]
        ax.plot(seeds["seconds"], np.full(len(seeds), y), "o", color=color, alpha=0.45, ms=4)
        if math.isfinite(row.mean):
            error = row.half_width if math.isfinite(row.half_width) else 0.0
            ax.errorbar(
                row.mean, y, xerr=error, fmt="D", color=color, markersize=7, capsize=4, lw=1.6
            )
        missing = row.runs - row.reached
        if missing:
            start = float(seeds["seconds"].max()) if not seeds.empty else 0.0
            ax.text(
                start + 0.02 * right,
                y,
                f"  not reached ({missing} of {row.runs})",
                va="center",
                ha="left",
                color=NOT_REACHED_COLOR,
                fontsize=9,
            )
    ax.set_yticks(list(positions.values()), [labels[group] for group in positions])
    ax.set_ylim(-0.7, len(groups) - 0.3)
    ax.set_xlim(0, right * 1.45)
    ax.set_xlabel("training time to reach the target loss (s)")
    ax.grid(axis="y", visible=False)
    ax.set_title(f"target training loss {target.value:.4g} (smoothed minibatch loss)")
    ax.legend(
        [
            Line2D([], [], color="0.3", marker="D", linestyle="-"),
            Line2D([], [], color="0.3", marker="o", linestyle="", alpha=0.45),
        ],
        ["mean ± 95% CI (all seeds reached)", "single seed"],
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
    )


def plot_sweep_sensitivity(
    points: pd.DataFrame, means: pd.DataFrame, ax: Axes, *, title: str
) -> None:
    """Draw the sweep criterion against the swept hyperparameter, one line per second one.

    Dots are finished seeds, lines join the mean of configurations with no diverged seed,
    with 95% CI bars, and an ``x`` in a strip at the top of the axis marks each diverged
    seed. A star marks the configuration the sweep selected. The y range fits the dots and
    the means, not the bars, and leaves the top strip free. The values of the second
    hyperparameter get a legend below the panel. The markers are explained once per figure
    by ``sweep_legend``.
    """
    ax.set_title(title)
    if points.empty:
        draw_no_data(ax, "no data: the sweep has no finished runs")
        return

    line_name = points["line_name"].iloc[0]
    lines = sorted(points["line"].dropna().unique()) or [math.nan]
    finished = points[(points["status"] == "finished") & np.isfinite(points["value"])]
    drawn_values = [finished["value"].to_numpy(dtype=float)]
    for index, (color, line) in enumerate(zip(_line_colors(len(lines)), lines, strict=True)):
        label = f"{line:g}" if line_name else "mean over seeds"
        drawn_values.append(_draw_sweep_line(ax, points, means, line, index, color, label))
    best = finished[finished["best"]]
    if not best.empty:
        best_mean = float(best["value"].mean())
        ax.plot(best["x"].iloc[0], best_mean, "*", color="black", ms=14, mfc="none", mew=1.2)

    positive = points.loc[np.isfinite(points["x"]) & (points["x"] > 0), "x"]
    if not positive.empty:
        format_log_x(ax, positive.to_numpy(dtype=float))
    values = np.concatenate(drawn_values)
    values = values[np.isfinite(values)]
    if values.size:
        diverged = bool((points["status"] == "diverged").any())
        _set_sweep_limits(ax, values, strip=0.05 * len(lines) + 0.04 if diverged else 0.0)
    else:
        ax.set_yticks([])
        ax.text(
            0.5,
            0.5,
            "every run diverged",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color=NOT_REACHED_COLOR,
        )
    x_name = points["x_name"].iloc[0]
    ax.set_xlabel(x_name + (" (log scale)" if not positive.empty else ""))
    ax.set_ylabel(f"{points['criterion'].iloc[0]} (sweep criterion)")
    if line_name and ax.get_legend_handles_labels()[0]:
        _add_line_legend(ax, line_name)


def _draw_sweep_line(
    ax: Axes,
    points: pd.DataFrame,
    means: pd.DataFrame,
    line: float,
    index: int,
    color: object,
    label: str,
) -> np.ndarray:
    """Draw one line of a sweep panel: seed dots, eligible means with CI bars and the
    diverged markers at height ``index`` of the top strip. Return the means drawn."""
    in_line = _same_line(points, line)
    seeds = points[in_line & (points["status"] == "finished") & np.isfinite(points["value"])]
    ax.plot(seeds["x"], seeds["value"], "o", color=color, alpha=SWEEP_SEED_ALPHA, ms=4)

    line_means = means[_same_line(means, line)]
    eligible = line_means[line_means["eligible"]]
    if not eligible.empty:
        error = np.vstack([eligible["mean"] - eligible["low"], eligible["high"] - eligible["mean"]])
        ax.errorbar(
            eligible["x"],
            eligible["mean"],
            yerr=np.nan_to_num(error),
            fmt="-o",
            color=color,
            capsize=3,
            ms=5,
            label=label,
        )

    # Each line's diverged markers get their own height in the top strip, so equal x values
    # stay visible. They stay out of the layout, which would otherwise make room for them.
    diverged = points[in_line & (points["status"] == "diverged")]
    if not diverged.empty:
        (marks,) = ax.plot(
            diverged["x"],
            np.full(len(diverged), 1 - 0.04 - 0.05 * index),
            "x",
            color=color,
            ms=7,
            mew=2,
            transform=blended_transform_factory(ax.transData, ax.transAxes),
            clip_on=False,
        )
        marks.set_in_layout(False)
    return eligible["mean"].to_numpy(dtype=float)


def _add_line_legend(ax: Axes, line_name: str) -> None:
    """Put the legend of the line values below the panel, under its x label."""
    handles, texts = ax.get_legend_handles_labels()
    ax.legend(
        handles,
        texts,
        title=f"mean over seeds, {line_name} =",
        ncol=min(len(texts), 4),
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        bbox_transform=offset_copy(
            ax.transAxes, fig=ax.figure, y=-SWEEP_LEGEND_OFFSET, units="points"
        ),
        handlelength=1.5,
        columnspacing=1.2,
    )


def sweep_legend(points: pd.DataFrame) -> tuple[list[Line2D], list[str]]:
    """Return the handles and texts that explain the markers of the sweep panels.

    The diverged and selected entries appear only when ``points`` contains such runs.
    """
    handles = [
        Line2D([], [], color="0.3", marker="o", ms=5),
        Line2D([], [], color="0.3", marker="o", linestyle="", alpha=SWEEP_SEED_ALPHA, ms=4),
    ]
    texts = ["mean over seeds ± 95% t-interval", "single seed"]
    if (points["status"] == "diverged").any():
        handles.append(Line2D([], [], color="0.3", marker="x", linestyle="", mew=2, ms=7))
        texts.append("diverged seed (top strip)")
    if points["best"].astype(bool).any():
        handles.append(Line2D([], [], color="black", marker="*", mfc="none", linestyle="", ms=10))
        texts.append("selected configuration")
    return handles, texts


def format_log_x(ax: Axes, values: np.ndarray) -> None:
    """Put a log x axis under ``values`` (all > 0), labelled with plain numbers.

    A short grid (at most 6 values, or less than a decade wide) is labelled at its own
    values, thinned to at most 6 labels. A longer one is labelled at the decades. Minor
    ticks never get labels, because matplotlib writes them as ``3×10^-1`` and they crowd.
    """
    ax.set_xscale("log")
    distinct = np.unique(values)
    if distinct.size <= 6 or distinct.max() < 10 * distinct.min():
        stride = math.ceil(distinct.size / 6)
        ax.xaxis.set_major_locator(ticker.FixedLocator(distinct[::stride]))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: plain_number(value)))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())


def _set_sweep_limits(ax: Axes, values: np.ndarray, strip: float) -> None:
    """Fit the y axis to ``values`` with a margin, leaving the top ``strip`` (an axes
    fraction) free for the diverged markers. The axis is logarithmic when every value is
    positive."""
    log = bool((values > 0).all())
    scaled = np.log(values) if log else values
    low, high = float(scaled.min()), float(scaled.max())
    span = high - low
    if span == 0:
        span = 0.7 if log else max(abs(low), 1.0)
        low, high = low - span / 2, high + span / 2
    margin = 0.06
    total = span / (1 - 2 * margin - strip)
    limits = (low - margin * total, high + (margin + strip) * total)
    if log:
        ax.set_yscale("log")
        ax.set_ylim(math.exp(limits[0]), math.exp(limits[1]))
        format_log_axis(ax.yaxis)
    else:
        ax.set_ylim(*limits)


def plot_step_size_bands(bands: pd.DataFrame, ax: Axes, *, title: str) -> None:
    """Draw step-size quantiles over epochs: q05-q95 and q25-q75 bands and the median."""
    ax.set_title(title, fontsize=9)
    if bands.empty:
        draw_no_data(ax)
        return
    color = "#1f77b4"
    epochs = bands["epoch"].to_numpy(dtype=float)
    quantiles = {
        name: np.clip(bands[name].to_numpy(dtype=float), LOSS_FLOOR, None)
        for name in ("q05", "q25", "q50", "q75", "q95")
    }
    if len(epochs) == 1:
        ax.vlines(epochs, quantiles["q05"], quantiles["q95"], color=color, alpha=0.35, lw=6)
        ax.vlines(epochs, quantiles["q25"], quantiles["q75"], color=color, alpha=0.7, lw=6)
        ax.plot(epochs, quantiles["q50"], "o", color="black", ms=5)
    else:
        ax.fill_between(epochs, quantiles["q05"], quantiles["q95"], color=color, alpha=0.18, lw=0)
        ax.fill_between(epochs, quantiles["q25"], quantiles["q75"], color=color, alpha=0.4, lw=0)
        ax.plot(epochs, quantiles["q50"], "-o", color="black", ms=3, lw=1.2)
    ax.set_yscale("log")
    format_log_axis(ax.yaxis)
    if np.unique(epochs).size <= MAX_EPOCH_TICKS:
        ax.set_xticks(epochs)
    else:
        # One label per epoch would overlap, and thousands of ticks take seconds to draw.
        ax.xaxis.set_major_locator(ticker.MaxNLocator(nbins=MAX_EPOCH_TICKS, integer=True))
    ax.set_xlim(epochs.min() - 0.5, epochs.max() + 0.5)


def plot_accuracy_curves(
    curves: pd.DataFrame,
    ax: Axes,
    *,
    colors: Mapping[str, str],
    labels: Mapping[str, str],
    line_styles: Mapping[str, LineStyle] | None = None,
) -> None:
    """Draw each group's mean test accuracy per epoch with its 95% band."""
    if curves.empty or not np.isfinite(curves["mean"]).any():
        draw_no_data(ax, "no data: no finished run with evaluations")
        return

    line_styles = line_styles or {}
    for group, label in labels.items():
        part = curves[curves["group"] == group].sort_values("epoch")
        if part.empty:
            continue
        color = colors[group]
        ax.plot(
            part["epoch"],
            100 * part["mean"],
            color=color,
            linestyle=line_styles.get(group, "-"),
            marker="o",
            ms=3,
            label=label,
        )
        if np.isfinite(part["low"]).any():
            ax.fill_between(
                part["epoch"],
                np.clip(100 * part["low"], 0, 100),
                np.clip(100 * part["high"], 0, 100),
                color=color,
                alpha=BAND_ALPHA,
                lw=0,
            )

    # The y range fits the means, because with two seeds a 95% t-band spans ±9 standard
    # deviations.
    means = 100 * curves["mean"][np.isfinite(curves["mean"])]
    span = max(float(means.max() - means.min()), 1.0)
    ax.set_ylim(max(float(means.min()) - 0.1 * span, 0), min(float(means.max()) + 0.1 * span, 100))
    epochs = sorted(curves["epoch"].unique())
    ax.set_xticks(epochs)
    ax.set_xlabel("epoch (0: before the first step)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("per epoch, finished runs")


def plot_final_accuracy(
    final: pd.DataFrame,
    runs: pd.DataFrame,
    ax: Axes,
    *,
    colors: Mapping[str, str],
    labels: Mapping[str, str],
) -> None:
    """Draw each group's final test accuracy: mean ± 95% CI over finished runs, seed dots."""
    groups = list(labels)
    if final.empty or not np.isfinite(final["mean"]).any():
        draw_no_data(ax, "no data: no finished run with a test accuracy")
        return

    positions = {group: len(groups) - 1 - i for i, group in enumerate(groups)}
    finished = runs[runs["status"] == "finished"]
    finite = finished["test_accuracy"].dropna()
    right = 100 * float(finite.max()) if not finite.empty else 100.0
    for row in final.itertuples():
        y = positions[row.group]
        color = colors[row.group]
        seeds = finished[finished["group"] == row.group]["test_accuracy"].dropna()
        ax.plot(100 * seeds, np.full(len(seeds), y), "o", color=color, alpha=0.45, ms=4)
        if math.isfinite(row.mean):
            error = 100 * row.half_width if math.isfinite(row.half_width) else 0.0
            ax.errorbar(100 * row.mean, y, xerr=error, fmt="D", color=color, capsize=4, ms=7)
        note = _final_note(row)
        if note:
            ax.text(
                1.0,
                y,
                note,
                transform=blended_transform_factory(ax.transAxes, ax.transData),
                ha="right",
                va="center",
                fontsize=8,
                color=NOT_REACHED_COLOR,
            )

    ax.set_yticks(list(positions.values()), [labels[group] for group in positions])
    ax.set_ylim(-0.7, len(groups) - 0.3)
    lowest = 100 * float(finite.min()) if not finite.empty else 0.0
    span = max(right - lowest, 1.0)
    ax.set_xlim(lowest - 0.4 * span, min(right + 0.6 * span, 100.5))
    ax.set_xlabel("final test accuracy (%)")
    ax.grid(axis="y", visible=False)
    ax.set_title("final, mean ± 95% CI over finished runs")


def _final_note(row: object) -> str:
    parts = []
    if row.diverged:
        parts.append(f"{row.diverged} of {row.runs} diverged")
    if not math.isfinite(row.mean):
        parts.append("no finished run")
    return ", ".join(parts)


def _set_log_limits(ax: Axes, values: np.ndarray) -> None:
    """Fit the y axis to the drawn curves, so a wide CI band cannot squash them."""
    finite = values[np.isfinite(values) & (values > 0)]
    if finite.size == 0:
        return
    low, high = float(finite.min()), float(finite.max())
    if low == high:
        low, high = low / 2, high * 2
    ax.set_ylim(low / 1.3, high * 1.3)


def _line_colors(count: int) -> Sequence[str]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    if count == 1:
        return ["#1f77b4"]
    return [cmap(0.85 * i / (count - 1)) for i in range(count)]


def _same_line(frame: pd.DataFrame, line: float) -> pd.Series:
    if isinstance(line, float) and math.isnan(line):
        return frame["line"].isna()
    values = frame["line"].astype(float)
    return pd.Series(np.isclose(values, line, rtol=1e-9) & values.notna(), index=frame.index)
