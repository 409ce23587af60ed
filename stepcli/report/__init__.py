"""The report: figures and a summary table drawn from the results store.

``build_report`` reads the store through pandas and SQLAlchemy (``stepcli.report.frames``),
draws each figure on matplotlib axes (``stepcli.report.plots``, laid out in
``stepcli.report.figures``) and writes the files. The Agg backend is selected on import,
so no display is ever needed.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402

from stepcli.report import frames  # noqa: E402
from stepcli.report.figures import IMAGE_FORMATS, ReportData, save_figures  # noqa: E402
from stepcli.report.frames import (  # noqa: E402
    LOSS_FLOOR,
    SMOOTH_WINDOW,
    NoRunsError,
    SelectionError,
    Target,
)
from stepcli.report.style import group_colors, group_line_styles  # noqa: E402
from stepcli.report.summary import summary_frame, write_summary  # noqa: E402
from stepcli.store import Store  # noqa: E402

__all__ = [
    "IMAGE_FORMATS",
    "SMOOTH_WINDOW",
    "NoRunsError",
    "Report",
    "SelectionError",
    "Target",
    "build_report",
    "load_report_data",
]


@dataclass
class Report:
    """Summary table, target, written files and notes of one report."""

    summary: pd.DataFrame
    """Numeric summary, one row per group (see ``stepcli.report.summary.SUMMARY_COLUMNS``)."""
    target: Target | None
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def load_report_data(
    store: Store,
    *,
    setups: Sequence[str] | None = None,
    sweep_id: int | None = None,
    run_ids: Sequence[int] | None = None,
    target_loss: float | None = None,
    smooth_window: int = SMOOTH_WINDOW,
) -> ReportData:
    """Select the runs and build every DataFrame that the figures and the table need.

    Raises ``NoRunsError`` when the selection is empty and ``SelectionError`` for a run or
    sweep id that does not exist.
    """
    engine = store.engine
    selection = frames.select_runs(engine, setups=setups, sweep_id=sweep_id, run_ids=run_ids)
    runs = selection.runs
    run_ids_selected = runs["run_id"].tolist()

    steps = frames.load_steps(engine, run_ids_selected)
    curves = frames.curve_frame(steps, runs, smooth_window)
    means = {x: frames.mean_curves(curves, x) for x in ("seconds", "step", "grad_evals")}

    if target_loss is not None:
        target = Target(target_loss, f"target loss {target_loss:.4g} (set by --target-loss)")
    else:
        target = frames.default_target(curves, selection)
    if target is not None:
        times = frames.time_to_target(curves, runs, target.value)
        convergence = frames.convergence_summary(times, selection.groups)
    else:
        times = frames.time_to_target(curves, runs.iloc[0:0], 0.0)
        convergence = frames.convergence_summary(times, [])

    evals = frames.load_evals(engine, run_ids_selected)
    diagnostics = frames.load_diagnostics(engine, run_ids_selected, "step_size")
    if sweep_id is not None:
        sweeps = frames.select_sweeps(engine, sweep_id=sweep_id)
    else:
        sweeps = frames.select_sweeps(engine, targets=setups)
    points = frames.sweep_points(engine, sweeps)

    labels = {
        group: runs.loc[runs["group"] == group, "label"].iloc[0] for group in selection.groups
    }
    setups_of_groups = [
        runs.loc[runs["group"] == group, "setup"].iloc[0] for group in selection.groups
    ]
    return ReportData(
        selection=selection,
        curves=curves,
        means=means,
        target=target,
        times=times,
        convergence=convergence,
        accuracy_curves=frames.accuracy_curves(evals, runs),
        final_accuracy=frames.final_metric(runs, "test_accuracy", selection.groups),
        step_size_bands=frames.step_size_bands(diagnostics, runs, LOSS_FLOOR),
        learned_groups=frames.learned_groups(selection),
        sweeps=sweeps,
        sweep_points=points,
        sweep_means=frames.sweep_means(points),
        colors=group_colors(selection.groups, setups_of_groups),
        labels=labels,
        line_styles=group_line_styles(selection.groups, setups_of_groups),
        seed_counts={group: int((runs["group"] == group).sum()) for group in selection.groups},
        smooth_window=smooth_window,
    )


def build_report(
    store: Store,
    out_dir: str | Path,
    *,
    image_format: str = "png",
    setups: Sequence[str] | None = None,
    sweep_id: int | None = None,
    run_ids: Sequence[int] | None = None,
    target_loss: float | None = None,
    smooth_window: int = SMOOTH_WINDOW,
) -> Report:
    """Draw every report figure and write the summary into ``out_dir`` (created if missing).

    Writes one file per figure in ``stepcli.report.figures.FIGURES`` as ``image_format``
    (png, svg or pdf), plus ``summary.csv`` and ``summary.md``. Raises ``NoRunsError`` when
    no run matches the selection and ``SelectionError`` for an unknown run or sweep id.
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(
            f"invalid --format {image_format!r}: choose one of {', '.join(IMAGE_FORMATS)}"
        )
    if smooth_window < 1:
        raise ValueError(f"invalid --smooth {smooth_window}: must be an integer >= 1")
    data = load_report_data(
        store,
        setups=setups,
        sweep_id=sweep_id,
        run_ids=run_ids,
        target_loss=target_loss,
        smooth_window=smooth_window,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    notes = data.selection.notes()
    summary = summary_frame(data.selection, data.times, data.target)
    files = save_figures(data, out, image_format)
    files += write_summary(summary, out, data.target, notes)
    return Report(summary=summary, target=data.target, files=files, notes=notes)
