"""Report figures: lay out the panels, write titles and captions, and save each file.

Figures are ``matplotlib.figure.Figure`` objects built without pyplot, so no figure stays
registered after it is saved and no display is needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from stepcli.report import plots
from stepcli.report.frames import Selection, Target
from stepcli.report.style import CAPTION_SIZE, LineStyle, report_style

IMAGE_FORMATS = ("png", "svg", "pdf")


@dataclass
class ReportData:
    """Every DataFrame the figures draw, built once from the store."""

    selection: Selection
    curves: pd.DataFrame
    """Per step: group, run, smoothed loss, seconds, cumulative gradient evaluations."""
    means: dict[str, pd.DataFrame]
    """Mean curves over seeds, keyed by x column: ``seconds``, ``step``, ``grad_evals``."""
    target: Target | None
    times: pd.DataFrame
    convergence: pd.DataFrame
    accuracy_curves: pd.DataFrame
    final_accuracy: pd.DataFrame
    step_size_bands: pd.DataFrame
    learned_groups: list[str]
    sweeps: pd.DataFrame
    sweep_points: pd.DataFrame
    sweep_means: pd.DataFrame
    colors: dict[str, str]
    labels: dict[str, str]
    """Legend label per group, in display order."""
    line_styles: dict[str, LineStyle]
    seed_counts: dict[str, int]
    """Selected runs (seeds) per group, the n of the legends and the ``seeds`` column."""
    smooth_window: int


WALL_CLOCK_TEXT = (
    "Wall-clock times on a shared or loaded CPU are noisy, so compare setups timed on the "
    "same machine under the same load."
)


def loss_over_time_figure(data: ReportData) -> Figure:
    figure = _loss_figure(data, "seconds", "training time (s)")
    figure.suptitle("Training loss against wall-clock training time")
    _caption(
        figure,
        f"{_smoothing_text(data.smooth_window)} Training time counts only the training steps "
        "(evaluation and store writes excluded). Each seed's curve is interpolated linearly "
        "onto a common time grid, and seeds end at different times, so the mean stops where "
        f"the first seed ends. {_band_text(data, 'seconds')} {WALL_CLOCK_TEXT}",
    )
    return figure


def loss_vs_step_figure(data: ReportData) -> Figure:
    figure = _loss_figure(data, "step", "optimizer step")
    figure.suptitle("Training loss against optimizer steps")
    _caption(figure, f"{_smoothing_text(data.smooth_window)} {_band_text(data, 'step')}")
    return figure


def loss_vs_grad_evals_figure(data: ReportData) -> Figure:
    figure = _loss_figure(data, "grad_evals", "gradient evaluations (cumulative)")
    figure.suptitle("Training loss against gradient evaluations")
    _caption(
        figure,
        "Gradient evaluations per step: 1 for Adam, SGD and the gradient-signal setups; "
        "2 on every k-th step (k = curvature_every, a curvature refresh with sampled labels) "
        "and 1 otherwise for the Hessian-decay setups (3, 6), so 1 + 1/k on average; 2 for "
        "the Hessian-signal setup 4, counting one Hessian-vector product as one gradient "
        f"evaluation. {_smoothing_text(data.smooth_window)} {_band_text(data, 'grad_evals')}",
    )
    return figure


def _loss_figure(data: ReportData, x: str, xlabel: str) -> Figure:
    figure, ax = _single_panel(10, 5.5)
    plots.plot_loss_curves(
        data.curves,
        data.means[x],
        ax,
        x=x,
        xlabel=xlabel,
        colors=data.colors,
        labels=data.labels,
        line_styles=data.line_styles,
        seed_counts=data.seed_counts,
    )
    return figure


def convergence_figure(data: ReportData) -> Figure:
    figure, ax = _single_panel(10, 1.6 + 0.55 * max(len(data.labels), 2))
    plots.plot_convergence_times(
        data.times,
        data.convergence,
        data.target,
        ax,
        colors=data.colors,
        labels=data.labels,
    )
    figure.suptitle("Training time to reach the target loss")
    target_text = f"{data.target.description}. " if data.target else ""
    _caption(
        figure,
        f"{target_text}A run reaches the target at its first step whose smoothed loss is "
        f"finite and at most the target. {_smoothing_text(data.smooth_window)} "
        "A NaN loss never counts as reaching it. The mean and its 95% t-interval over seeds "
        "are drawn only when every seed reached the target; otherwise the seeds that did "
        "are dots and the rest are counted as not reached. Interval bars that reach the edge of "
        f"the axis continue beyond it. {WALL_CLOCK_TEXT}",
    )
    return figure


def sweep_figure(data: ReportData) -> Figure:
    sweeps = list(data.sweeps.itertuples())
    points = data.sweep_points
    figure, axes, legend_ax = _sweep_grid(
        len(sweeps), with_line_legends=bool((points["line_name"] != "").any())
    )
    if not sweeps:
        plots.draw_no_data(axes[0], "no data: no sweep in the store for these setups")
    for ax, sweep in zip(axes, sweeps, strict=False):
        plots.plot_sweep_sensitivity(
            points[points["sweep_id"] == sweep.sweep_id],
            data.sweep_means[data.sweep_means["sweep_id"] == sweep.sweep_id],
            ax,
            title=f"setup {sweep.target}: sweep {sweep.sweep_id} ({sweep.status})",
        )
    for ax in axes[max(len(sweeps), 1) :]:
        ax.set_visible(False)

    if points.empty:
        legend_ax.set_visible(False)
    else:
        handles, texts = plots.sweep_legend(points)
        legend_ax.legend(handles, texts, loc="center", ncol=len(texts))
    figure.suptitle("Sweep sensitivity: selection criterion against the swept hyperparameters")
    _caption(
        figure,
        "Criterion per run (by default the mean minibatch loss over the last epoch). Lines: "
        "mean over the finished seeds of each configuration with no diverged seed, with its "
        "95% t-interval (none with one seed); interval bars that reach the edge of the axis "
        "continue beyond it, because the y range fits the dots and means. Dots: single "
        "seeds; x in the strip at the top: a diverged seed; star: the configuration the "
        "sweep selected.",
    )
    return figure


def _sweep_grid(panels: int, *, with_line_legends: bool) -> tuple[Figure, list[Axes], Axes]:
    """Return a figure sized for ``panels`` sweep panels (3 per row), its panel axes in
    reading order, and an axes without axis lines for the marker legend under them."""
    columns = min(3, max(panels, 1))
    rows = max(math.ceil(panels / columns), 1)
    # A panel with a second swept hyperparameter has a legend of its values below it.
    legend_height = 0.8 if with_line_legends else 0.0
    figure = Figure(
        figsize=(max(4.6 * columns, 7.0), (3.4 + legend_height) * rows + 0.8),
        layout="constrained",
    )
    figure.get_layout_engine().set(w_pad=0.08, h_pad=0.12, wspace=0.04, hspace=0.06)

    # The marker legend gets a row of its own. A figure legend would be anchored to the
    # figure's box, which savefig's tight bounding box extends down over the caption.
    grid = figure.add_gridspec(rows + 1, columns, height_ratios=[1.0] * rows + [0.08])
    axes = [
        figure.add_subplot(grid[row, column]) for row in range(rows) for column in range(columns)
    ]
    legend_ax = figure.add_subplot(grid[rows, :])
    legend_ax.set_axis_off()
    return figure, axes, legend_ax


def step_size_figure(data: ReportData) -> Figure:
    groups = data.learned_groups
    bands = data.step_size_bands
    layers = sorted(set(bands["layer"]), key=_layer_order) if not bands.empty else []
    columns = max(len(layers), 1)
    rows = max(len(groups), 1)
    figure = Figure(figsize=(2.8 * columns + 0.8, 2.2 * rows + 0.6), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False, sharex=True)
    if not groups:
        plots.draw_no_data(axes[0][0], "no data: no learned step-size setup among the runs")
        for ax in axes[0][1:]:
            ax.set_visible(False)
    for row, group in enumerate(groups):
        for column in range(columns):
            ax = axes[row][column]
            layer = layers[column] if layers else "no diagnostics"
            part = bands[(bands["group"] == group) & (bands["layer"] == layer)]
            plots.plot_step_size_bands(part, ax, title=f"setup {group}: {layer}")
            if column == 0:
                ax.set_ylabel("step size (log scale)")
            if row == rows - 1:
                ax.set_xlabel("epoch")
    figure.suptitle("Learned step sizes per layer over epochs")
    _caption(
        figure,
        "Quantiles of the per-weight step sizes of each layer after each epoch: light band "
        "q05-q95, dark band q25-q75, line the median. Each quantile is the geometric mean "
        "over seeds.",
    )
    return figure


def accuracy_figure(data: ReportData) -> Figure:
    figure = Figure(figsize=(12, 1.8 + 0.55 * max(len(data.labels), 4)), layout="constrained")
    left, right = figure.subplots(1, 2, width_ratios=[1, 1.3])
    short = {group: f"setup {group}" for group in data.labels}
    plots.plot_accuracy_curves(
        data.accuracy_curves,
        left,
        colors=data.colors,
        labels=short,
        line_styles=data.line_styles,
    )
    if left.get_legend_handles_labels()[0]:
        left.legend(loc="lower right")
    plots.plot_final_accuracy(
        data.final_accuracy,
        data.selection.runs,
        right,
        colors=data.colors,
        labels=data.labels,
    )
    figure.suptitle("Test accuracy (10,000 MNIST test images)")
    _caption(
        figure,
        "Finished runs only; diverged runs are counted beside their setup. Bands and bars: "
        "95% t-interval over seeds (none with one seed).",
    )
    return figure


FIGURES: dict[str, Callable[[ReportData], Figure]] = {
    "all_experiments_loss_over_time": loss_over_time_figure,
    "convergence_times": convergence_figure,
    "loss_vs_step": loss_vs_step_figure,
    "loss_vs_grad_evals": loss_vs_grad_evals_figure,
    "sweep_sensitivity": sweep_figure,
    "step_size_distributions": step_size_figure,
    "test_accuracy": accuracy_figure,
}
"""File name stem of each report figure and the function that draws it."""


def save_figures(data: ReportData, out_dir: Path, image_format: str) -> list[Path]:
    """Draw every figure in ``FIGURES`` and save it as ``out_dir/<name>.<image_format>``."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(
            f"invalid image format {image_format!r}: choose one of {', '.join(IMAGE_FORMATS)}"
        )
    paths = []
    with report_style():
        for name, draw in FIGURES.items():
            figure = draw(data)
            path = out_dir / f"{name}.{image_format}"
            figure.savefig(path, format=image_format)
            paths.append(path)
    return paths


def _single_panel(width: float, height: float) -> tuple[Figure, object]:
    figure = Figure(figsize=(width, height), layout="constrained")
    return figure, figure.subplots()


def _layer_order(name: str) -> tuple:
    """Sort key of a parameter name: layers by index, each weight before its bias."""
    rank = {"weight": 0, "bias": 1}
    return tuple(
        (0, int(part), 0, "") if part.isdigit() else (1, 0, rank.get(part, 2), part)
        for part in name.split(".")
    )


def _caption(figure: Figure, text: str) -> None:
    """Write ``text`` under the figure. ``savefig.bbox = "tight"`` keeps it in the file."""
    figure.text(0.01, -0.01, text, ha="left", va="top", fontsize=CAPTION_SIZE, wrap=True)


def _smoothing_text(window: int) -> str:
    if window == 1:
        return "Minibatch loss, not smoothed."
    return f"Minibatch loss smoothed with a trailing moving average over {window} steps."


def _band_text(data: ReportData, x: str) -> str:
    text = (
        "Bold line: geometric mean over seeds (the mean of the log-loss) on the range every "
        "seed covers; band: its 95% t-interval, computed on the log-loss so it stays positive, "
        "clipped to the axis, none with one seed; thin lines: single seeds over their whole "
        "length, a dot at each seed's last point. n: seeds (runs) of the setup. Losses at or "
        f"below 0 are drawn at {plots.LOSS_FLOOR:g}."
    )
    means = data.means[x]
    partial = []
    for group in data.labels:
        count = data.seed_counts.get(group, 0)
        in_mean = means.loc[means["group"] == group, "seeds"]
        if not in_mean.empty and int(in_mean.max()) < count:
            partial.append(group)
    if partial:
        text += (
            f" Setup {', '.join(partial)}: 'mean of k' counts the seeds in the mean, because "
            "a seed with no finite loss, or with no range in common with the others, is left "
            "out of it."
        )
    return text
