"""The summary table: one row per group with budgets, final metrics and time to target."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pandas as pd

from stepcli.report.frames import Selection, Target, convergence_summary, final_metric

SUMMARY_COLUMNS = (
    "setup",
    "title",
    "network_params",
    "step_size_params",
    "decay_params",
    "budget_params",
    "final_train_loss_mean",
    "final_train_loss_ci",
    "test_accuracy_mean",
    "test_accuracy_ci",
    "time_to_target_mean",
    "time_to_target_ci",
    "target_reached",
    "ms_per_step",
    "seeds",
    "finished",
    "diverged",
)
"""Columns of the numeric summary (CSV and JSON). ``_ci`` columns are 95% half-widths."""


def summary_frame(
    selection: Selection, times: pd.DataFrame | None, target: Target | None
) -> pd.DataFrame:
    """Return the numeric summary, one row per group in display order.

    Final training loss (``runs.final_train_loss``, the mean minibatch loss over the last
    epoch) and test accuracy are means over finished runs with 95% t-intervals over seeds.
    The time to target is the mean over runs when every run reached the target, else NaN
    with ``target_reached`` < ``seeds``. ``ms_per_step`` is each run's training seconds
    divided by its steps, averaged over all selected runs with at least one step.
    """
    runs = selection.runs
    groups = selection.groups
    loss = final_metric(runs, "final_train_loss", groups).set_index("group")
    accuracy = final_metric(runs, "test_accuracy", groups).set_index("group")
    if times is not None and target is not None:
        convergence = convergence_summary(times, groups).set_index("group")
    else:
        convergence = None

    rows = []
    for group in groups:
        part = runs[runs["group"] == group]
        first = part.iloc[0]
        timed = part[(part["steps_done"] > 0) & part["train_seconds"].notna()]
        ms_per_step = (1000 * timed["train_seconds"] / timed["steps_done"]).mean()
        row = {
            "setup": group,
            "title": first["title"],
            "network_params": int(first["network_params"]),
            "step_size_params": int(first["step_size_params"]),
            "decay_params": int(first["decay_params"]),
            "budget_params": int(first["budget_params"]),
            "final_train_loss_mean": loss.loc[group, "mean"],
            "final_train_loss_ci": loss.loc[group, "half_width"],
            "test_accuracy_mean": accuracy.loc[group, "mean"],
            "test_accuracy_ci": accuracy.loc[group, "half_width"],
            "time_to_target_mean": math.nan,
            "time_to_target_ci": math.nan,
            "target_reached": None,
            "ms_per_step": float(ms_per_step) if not timed.empty else math.nan,
            "seeds": len(part),
            "finished": int((part["status"] == "finished").sum()),
            "diverged": int((part["status"] == "diverged").sum()),
        }
        if convergence is not None:
            row["time_to_target_mean"] = convergence.loc[group, "mean"]
            row["time_to_target_ci"] = convergence.loc[group, "half_width"]
            row["target_reached"] = int(convergence.loc[group, "reached"])
        rows.append(row)
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


def display_rows(summary: pd.DataFrame) -> list[dict[str, str]]:
    """Return the summary as text cells: ``mean ± CI`` pairs and ``not reached (k of n)``."""
    rows = []
    for row in summary.itertuples(index=False):
        rows.append(
            {
                "setup": row.setup,
                "network": f"{row.network_params:,}",
                "step sizes": f"{row.step_size_params:,}",
                "decays": f"{row.decay_params:,}",
                "total": f"{row.budget_params:,}",
                "final train loss": _mean_ci(
                    row.final_train_loss_mean, row.final_train_loss_ci, ".4g"
                ),
                "test accuracy (%)": _mean_ci(
                    100 * row.test_accuracy_mean, 100 * row.test_accuracy_ci, ".2f"
                ),
                "time to target (s)": _time_to_target(row),
                "ms/step": _number(row.ms_per_step, ".3g"),
                "seeds": str(row.seeds),
                "diverged": str(row.diverged),
            }
        )
    return rows


def numeric_rows(summary: pd.DataFrame) -> list[dict[str, object]]:
    """Return the numeric summary as dicts with None in place of NaN (for JSON and CSV)."""
    records = summary.astype(object).where(summary.notna(), None).to_dict("records")
    return [{key: _plain(value) for key, value in record.items()} for record in records]


def markdown_table(rows: list[dict[str, str]]) -> str:
    """Return ``rows`` as a GitHub-flavoured Markdown table."""
    if not rows:
        return ""
    columns = list(rows[0])
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in rows:
        cells = [str(row[column]).replace("|", "\\|") for column in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary_markdown(summary: pd.DataFrame, target: Target | None, notes: list[str]) -> str:
    """Return the summary as a Markdown document with the target and the notes."""
    buffer = io.StringIO()
    buffer.write("# Summary\n\n")
    buffer.write(markdown_table(display_rows(summary)))
    buffer.write("\n")
    buffer.write(
        "Final train loss: mean minibatch loss over the last epoch. Means are over finished "
        "runs, ± the half-width of the 95% t-interval over seeds. Parameters: network, "
        "learned step sizes, learned decays and their total (the counted budget). ms/step: "
        "wall-clock training time per step, averaged over runs. Timings on a shared or "
        "loaded CPU are noisy, so compare setups timed on the same machine under the same "
        "load.\n"
    )
    if target is not None:
        rule = "first step whose smoothed loss is at most the"
        buffer.write(f"\nTime to target: {rule} {_lower(target.description)}.\n")
    for note in notes:
        buffer.write(f"\nNote: {note}.\n")
    return buffer.getvalue()


def write_summary(
    summary: pd.DataFrame, out_dir: Path, target: Target | None, notes: list[str]
) -> list[Path]:
    """Write ``summary.csv`` (numeric) and ``summary.md`` into ``out_dir`` and return both."""
    csv_path = out_dir / "summary.csv"
    markdown_path = out_dir / "summary.md"
    summary.to_csv(csv_path, index=False)
    markdown_path.write_text(summary_markdown(summary, target, notes), encoding="utf-8")
    return [csv_path, markdown_path]


def _mean_ci(mean: float, half_width: float, spec: str) -> str:
    if not math.isfinite(mean):
        return "-"
    if not math.isfinite(half_width):
        return _number(mean, spec)
    return f"{_number(mean, spec)} ± {_number(half_width, '.2g')}"


def _time_to_target(row: object) -> str:
    if row.target_reached is None or pd.isna(row.target_reached):
        return "-"
    reached = int(row.target_reached)
    if reached < row.seeds:
        return f"not reached ({row.seeds - reached} of {row.seeds})"
    return _mean_ci(row.time_to_target_mean, row.time_to_target_ci, ".3g")


def _number(value: float, spec: str) -> str:
    if not math.isfinite(value):
        return "-"
    # Two significant digits of a large half-width would switch to exponent notation.
    if spec == ".2g" and abs(value) >= 100:
        return f"{value:.0f}"
    return format(value, spec)


def _lower(text: str) -> str:
    return text[:1].lower() + text[1:]


def _plain(value: object) -> object:
    """Turn numpy scalars into Python numbers so that JSON can encode them."""
    if hasattr(value, "item"):
        return value.item()
    return value
