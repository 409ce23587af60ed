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
from matplotlib.transforms import blended_transform_factory

from stepcli.report.frames import Target
from stepcli.report.style import BAND_ALPHA, SEED_ALPHA

LOSS_FLOOR = 1e-12
"""Smallest loss drawn on a log axis. Losses at or below it, such as 0, are drawn at it."""
NO_DATA_COLOR = "0.45"
NOT_REACHED_COLOR = "#b22222"


def draw_no_data(ax: Axes, reason: str = "no data") -> None:
    """Write ``reason`` in the centre of ``ax`` and hide its ticks."""
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
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


def plot_loss_curves(
    curves: pd.DataFrame,
    means: pd.DataFrame,
    ax: Axes,
    *,
    x: str,
    xlabel: str,
    colors: Mapping[str, str],
    labels: Mapping[str, str],
) -> None:
    """Draw each group's mean smoothed loss against ``x`` with its 95% band and its seeds.

    Thin lines are single seeds over their whole length. The bold line is the mean over
    seeds on the x range that all of them cover. An ``x`` marks the last finite point of a
    diverged run, at the top edge when that point lies above the axis. The y range fits the
    means and the runs that did not diverge, so one exploding run cannot flatten the rest.
    """
    drawn = False
    kept_values: list[np.ndarray] = []
    diverged_values: list[np.ndarray] = []
    markers: list[tuple[float, float, str]] = []
    empty_groups: list[str] = []
    for group, label in labels.items():
        color = colors[group]
        seeds = curves[curves["group"] == group]
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
            ax.plot(xs, ys_drawn, color=color, alpha=SEED_ALPHA, linewidth=0.8)
            if finite.sum() == 1:
                ax.plot(xs[finite], ys_drawn[finite], "o", color=color, alpha=0.6, markersize=4)
            if diverged:
                last = np.flatnonzero(finite)[-1]
                markers.append((xs[last], ys_drawn[last], color))
        if not finite_seeds:
            empty_groups.append(label)
        mean = means[means["group"] == group]
        finite_mean = mean[np.isfinite(mean["mean"])]
        if finite_mean.empty:
            continue
        count = int(mean["seeds"].max())
        mean_values = np.clip(mean["mean"].to_numpy(dtype=float), LOSS_FLOOR, None)
        if not (seeds["status"] == "diverged").any():
            kept_values.append(mean_values[np.isfinite(mean_values)])
        style = "-o" if len(mean) == 1 else "-"
        ax.plot(mean["x"], mean_values, style, color=color, label=f"{label} (n={count})")
        low = np.clip(mean["low"].to_numpy(dtype=float), LOSS_FLOOR, None)
        high = np.clip(mean["high"].to_numpy(dtype=float), LOSS_FLOOR, None)
        if np.isfinite(low).any():
            ax.fill_between(mean["x"], low, high, color=color, alpha=BAND_ALPHA, linewidth=0)
        drawn = True
    if not kept_values and not diverged_values:
        draw_no_data(ax, "no data: no run has a finite training loss")
        return
    ax.set_yscale("log")
    _set_log_limits(ax, np.concatenate(kept_values or diverged_values))
    top = ax.get_ylim()[1]
    for x_value, y_value, color in markers:
        ax.plot(x_value, min(y_value, top), "x", color=color, ms=8, mew=2, clip_on=False)
    format_log_axis(ax.yaxis)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("training loss (smoothed, log scale)")
    handles, texts = ax.get_legend_handles_labels()
    if markers:
        handles.append(Line2D([], [], color="0.3", marker="x", linestyle="", mew=2))
        texts.append("run diverged (last finite point)")
    if not drawn:
        handles.append(Line2D([], [], color="0.3", alpha=SEED_ALPHA))
        texts.append("single seeds (no common range for a mean)")
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
        axis.set_minor_locator(ticker.LogLocator(subs=(2.0, 3.0, 5.0)))
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
    with 95% CI bars, and an ``x`` at the top of the axis marks each diverged seed. A star
    marks the configuration the sweep selected.
    """
    ax.set_title(title)
    if points.empty:
        draw_no_data(ax, "no data: the sweep has no finished runs")
        return
    x_name = points["x_name"].iloc[0]
    line_name = points["line_name"].iloc[0]
    lines = sorted(points["line"].dropna().unique()) or [math.nan]
    palette = _line_colors(len(lines))
    top = blended_transform_factory(ax.transData, ax.transAxes)
    finished = points[(points["status"] == "finished") & np.isfinite(points["value"])]
    for index, (color, line) in enumerate(zip(palette, lines, strict=True)):
        in_line = _same_line(points, line)
        seeds = finished[_same_line(finished, line)]
        line_means = means[_same_line(means, line)]
        label = f"{line_name}={line:g}" if line_name else "mean over seeds"
        ax.plot(seeds["x"], seeds["value"], "o", color=color, alpha=0.35, ms=4)
        eligible = line_means[line_means["eligible"]]
        if not eligible.empty:
            error = np.vstack(
                [eligible["mean"] - eligible["low"], eligible["high"] - eligible["mean"]]
            )
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
        # Each line's diverged markers get their own height, so equal x values stay visible.
        diverged = points[in_line & (points["status"] == "diverged")]
        ax.plot(
            diverged["x"],
            np.full(len(diverged), 0.97 - 0.05 * index),
            "x",
            color=color,
            ms=8,
            mew=2,
            transform=top,
            clip_on=False,
        )
    best = finished[finished["best"]]
    if not best.empty:
        best_mean = float(best["value"].mean())
        ax.plot(best["x"].iloc[0], best_mean, "*", color="black", ms=14, mfc="none", mew=1.2)
    positive = points.loc[np.isfinite(points["x"]) & (points["x"] > 0), "x"]
    if not positive.empty:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: plain_number(value)))
    finite = finished["value"]
    if not finite.empty and (finite > 0).all():
        ax.set_yscale("log")
        format_log_axis(ax.yaxis)
    if finite.empty:
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
    ax.set_xlabel(x_name + (" (log scale)" if not positive.empty else ""))
    ax.set_ylabel(f"{points['criterion'].iloc[0]} (sweep criterion)")
    handles, texts = ax.get_legend_handles_labels()
    handles += [
        Line2D([], [], color="0.3", marker="o", linestyle="", alpha=0.35),
        Line2D([], [], color="0.3", marker="x", linestyle="", mew=2),
    ]
    texts += ["single seed", "diverged seed"]
    if not best.empty:
        handles.append(Line2D([], [], color="black", marker="*", mfc="none", linestyle="", ms=10))
        texts.append("selected configuration")
    ax.legend(handles, texts, loc="best")


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
    ax.set_xticks(epochs)
    ax.set_xlim(epochs.min() - 0.5, epochs.max() + 0.5)


def plot_accuracy_curves(
    curves: pd.DataFrame,
    ax: Axes,
    *,
    colors: Mapping[str, str],
    labels: Mapping[str, str],
) -> None:
    """Draw each group's mean test accuracy per epoch with its 95% band."""
    if curves.empty or not np.isfinite(curves["mean"]).any():
        draw_no_data(ax, "no data: no finished run with evaluations")
        return
    for group, label in labels.items():
        part = curves[curves["group"] == group].sort_values("epoch")
        if part.empty:
            continue
        color = colors[group]
        ax.plot(part["epoch"], 100 * part["mean"], "-o", color=color, ms=3, label=label)
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
