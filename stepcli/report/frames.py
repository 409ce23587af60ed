"""DataFrames for the report, read from the results store with pandas and SQLAlchemy.

Every function here returns data and draws nothing. The float columns of ``steps``, ``evals``
and ``diagnostics`` store NaN as NULL, and pandas reads NULL back as NaN.

Runs are compared by *group*: the runs of one setup with the same hyperparameters and
training settings, one run per seed. With the default selection each setup is one group.
A sweep or a ``--run`` list can hold several configurations of one setup, and then each
configuration is its own group, labelled with the settings that differ.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sqlalchemy import select
from sqlalchemy.engine import Engine

from stepcli.report.stats import mean_ci, mean_ci_columns, moving_average
from stepcli.setups import SETUPS
from stepcli.store.models import Diagnostic, Eval, Run, Step, Sweep

log = logging.getLogger(__name__)

SMOOTH_WINDOW = 10
"""Default window, in steps, of the trailing moving average applied to minibatch losses."""
TARGET_TOLERANCE = 1.1
"""Default target loss: this factor times the reference group's mean final smoothed loss."""
REFERENCE_SETUP = "1"
"""Setup whose finished runs set the default target loss (tuned Adam on the X network)."""
GRID_POINTS = 400
"""Points of the common x grid onto which each seed's curve is interpolated."""
LOSS_FLOOR = 1e-12
"""Smallest loss drawn on a log axis and averaged as a log. Losses at or below it, such as 0,
count as this value."""
SELECTED_STATUSES = ("finished", "diverged")
"""Statuses that the default and sweep selections report; other runs are counted in a note."""
GROUP_KEYS = (
    "lr",
    "alpha0",
    "meta_lr",
    "alpha_min",
    "alpha_max",
    "gamma",
    "curvature_every",
    "curvature",
    "epochs",
    "batch_size",
    "subset_size",
    "val_size",
    "hidden",
)
"""Hyperparameters and settings whose values split one setup's runs into separate groups."""
QUANTILE_COLUMNS = ("q05", "q25", "q50", "q75", "q95")
CRITERION_COLUMNS = {
    "train-loss": "final_train_loss",
    "val-loss": "final_val_loss",
    "final_train_loss": "final_train_loss",
    "train_loss": "final_train_loss",
    "final_eval_loss": "final_eval_loss",
    "eval_loss": "final_eval_loss",
    "final_val_loss": "final_val_loss",
    "val_loss": "final_val_loss",
    "final_test_loss": "final_test_loss",
    "test_loss": "final_test_loss",
}
"""``runs`` column that stores each sweep criterion's per-run value. The sweep command stores
``train-loss`` or ``val-loss`` (``stepcli.sweep.CRITERIA``); the other names are aliases."""

_RUN_COLUMNS = (
    Run.id.label("run_id"),
    Run.setup,
    Run.kind,
    Run.sweep_id,
    Run.optimizer,
    Run.hparams,
    Run.config_key,
    Run.seed,
    Run.hidden,
    Run.network_params,
    Run.step_size_params,
    Run.decay_params,
    Run.budget_params,
    Run.status,
    Run.diverged_step,
    Run.steps_done,
    Run.final_train_loss,
    Run.final_eval_loss,
    Run.final_val_loss,
    Run.final_test_loss,
    Run.test_accuracy,
    Run.train_seconds,
)


class SelectionError(ValueError):
    """A ``--run`` or ``--sweep`` value names nothing in the store."""


class NoRunsError(ValueError):
    """The selection contains no runs to report."""


@dataclass
class Selection:
    """The runs a report covers, one row each, and the runs it left out."""

    runs: pd.DataFrame
    """Columns of ``runs`` (``id`` as ``run_id``) plus ``group``, ``title`` and ``label``."""
    groups: list[str]
    """Group names in display order: setups in the order of the setups table."""
    excluded: pd.DataFrame = field(default_factory=pd.DataFrame)
    """Runs of the same kind and setups left out for their status (interrupted, failed, …)."""
    mode: str = "train"
    """``"train"`` (latest train run per setup and seed), ``"sweep"`` or ``"runs"``."""
    sweep_id: int | None = None

    @property
    def setups(self) -> list[str]:
        return list(dict.fromkeys(self.runs["setup"]))

    def notes(self) -> list[str]:
        """Return one line per fact that a reader of the figures should know."""
        lines = []
        if not self.excluded.empty:
            counts = self.excluded["status"].value_counts()
            parts = [f"{count} {status}" for status, count in counts.items()]
            ids = ", ".join(str(i) for i in self.excluded["run_id"].head(10))
            more = ", …" if len(self.excluded) > 10 else ""
            lines.append(f"left out {', '.join(parts)} run(s) (ids {ids}{more})")
        if self.mode == "runs":
            other = self.runs[~self.runs["status"].isin(SELECTED_STATUSES)]
            if not other.empty:
                listed = ", ".join(f"{r.run_id} ({r.status})" for r in other.itertuples())
                lines.append(f"runs {listed} are drawn but left out of the final metrics")
        return lines


@dataclass(frozen=True)
class Target:
    """The training loss that the convergence figure and table measure the time to."""

    value: float
    description: str


def select_runs(
    engine: Engine,
    *,
    setups: Sequence[str] | None = None,
    sweep_id: int | None = None,
    run_ids: Sequence[int] | None = None,
) -> Selection:
    """Choose the runs to report.

    By default: for each (setup, seed) the newest ``train`` run whose status is finished or
    diverged. With ``sweep_id``: the newest finished or diverged run of each configuration and
    seed of that sweep. With ``run_ids``: exactly those runs, whatever their status.
    ``setups`` filters every mode. Raises ``SelectionError`` for an unknown run or sweep id
    and ``NoRunsError`` when nothing is left.
    """
    if sweep_id is not None and run_ids:
        raise SelectionError("invalid --sweep with --run: choose one of them")
    query = select(*_RUN_COLUMNS).order_by(Run.id)
    if run_ids:
        query = query.where(Run.id.in_([int(i) for i in run_ids]))
        mode = "runs"
    elif sweep_id is not None:
        query = query.where(Run.sweep_id == sweep_id, Run.kind == "sweep")
        mode = "sweep"
    else:
        query = query.where(Run.kind == "train")
        mode = "train"
    runs = pd.read_sql(query, engine)

    if run_ids:
        missing = sorted(set(int(i) for i in run_ids) - set(runs["run_id"]))
        if missing:
            raise SelectionError(
                f"invalid --run {','.join(map(str, missing))}: no such run in the store; "
                "list the runs with 'stepcli runs'"
            )
    if setups:
        runs = runs[runs["setup"].isin(list(setups))]
    if run_ids:
        chosen = runs
        excluded = runs.iloc[0:0]
    else:
        if sweep_id is not None and runs.empty and not _sweep_exists(engine, sweep_id):
            raise SelectionError(
                f"invalid --sweep {sweep_id}: no such sweep in the store; "
                "list the runs with 'stepcli runs'"
            )
        usable = runs["status"].isin(SELECTED_STATUSES)
        keys = ["setup", "seed"] if mode == "train" else ["config_key"]
        chosen = runs[usable].sort_values("run_id").groupby(keys, sort=False).tail(1)
        excluded = runs[~usable]
    if chosen.empty:
        raise NoRunsError("no runs to report")

    chosen = _label_groups(chosen.reset_index(drop=True))
    groups = list(dict.fromkeys(chosen.sort_values(["setup_order", "group"])["group"]))
    columns = ["run_id", "setup", "seed", "status"]
    return Selection(
        runs=chosen,
        groups=groups,
        excluded=excluded[columns].reset_index(drop=True),
        mode=mode,
        sweep_id=sweep_id,
    )


_STEP_COLUMNS = ("run_id", "step", "epoch", "loss", "seconds")
_SQLITE_IDS_PER_QUERY = 500
"""Run ids per ``IN (...)`` list when reading SQLite, below its default limit of 999 host
parameters in SQLite versions before 3.32."""


def load_steps(engine: Engine, run_ids: Iterable[int]) -> pd.DataFrame:
    """Return the ``steps`` rows of ``run_ids``, ordered by run and step.

    On SQLite the rows are read through the sqlite3 driver into NumPy arrays: 1.4 s against
    4.1 s through SQLAlchemy's result rows for 1,000,000 steps (docs/benchmarks.md). Other
    databases are read through SQLAlchemy. Both paths read NULL losses and times as NaN.
    """
    ids = sorted({int(i) for i in run_ids})
    if engine.dialect.name == "sqlite":
        return _load_steps_sqlite(engine, ids)
    query = (
        select(Step.run_id, Step.step, Step.epoch, Step.loss, Step.seconds)
        .where(Step.run_id.in_(ids))
        .order_by(Step.run_id, Step.step)
    )
    return pd.read_sql(query, engine)


def _load_steps_sqlite(engine: Engine, run_ids: Sequence[int]) -> pd.DataFrame:
    rows: list[tuple] = []
    connection = engine.raw_connection()
    try:
        cursor = connection.cursor()
        for start in range(0, len(run_ids), _SQLITE_IDS_PER_QUERY):
            chunk = run_ids[start : start + _SQLITE_IDS_PER_QUERY]
            cursor.execute(
                f"SELECT {', '.join(_STEP_COLUMNS)} FROM {Step.__tablename__} "
                f"WHERE run_id IN ({', '.join('?' * len(chunk))}) ORDER BY run_id, step",
                chunk,
            )
            rows += cursor.fetchall()
        cursor.close()
    finally:
        connection.close()
    # NumPy turns the None of a NULL into NaN when it builds a float array.
    table = np.array(rows, dtype=np.float64).reshape(len(rows), len(_STEP_COLUMNS))
    return pd.DataFrame(
        {
            name: table[:, index].astype(np.int64)
            if name in ("run_id", "step", "epoch")
            else (table[:, index].copy())
            for index, name in enumerate(_STEP_COLUMNS)
        }
    )


def load_evals(engine: Engine, run_ids: Iterable[int]) -> pd.DataFrame:
    """Return the ``evals`` rows of ``run_ids``, ordered by run and epoch."""
    query = (
        select(
            Eval.run_id,
            Eval.epoch,
            Eval.step,
            Eval.seconds,
            Eval.train_loss,
            Eval.test_loss,
            Eval.test_accuracy,
        )
        .where(Eval.run_id.in_([int(i) for i in run_ids]))
        .order_by(Eval.run_id, Eval.epoch)
    )
    return pd.read_sql(query, engine)


def load_diagnostics(
    engine: Engine, run_ids: Iterable[int], quantity: str = "step_size"
) -> pd.DataFrame:
    """Return the ``diagnostics`` rows of ``run_ids`` for one quantity."""
    query = (
        select(Diagnostic.run_id, Diagnostic.epoch, Diagnostic.layer, *_quantile_columns())
        .where(Diagnostic.run_id.in_([int(i) for i in run_ids]), Diagnostic.quantity == quantity)
        .order_by(Diagnostic.run_id, Diagnostic.epoch, Diagnostic.layer)
    )
    return pd.read_sql(query, engine)


def grad_evals_per_step(
    optimizer: str, steps: np.ndarray, curvature_every: int | None = None
) -> np.ndarray:
    """Return the gradient evaluations that each 1-based step in ``steps`` costs.

    - ``adam``, ``sgd`` and ``learned-gradient``: 1.
    - ``learned-decay`` (setups 3 and 6 and their controls): 2 on the steps that refresh the
      curvature, whose 0-based index is a multiple of k = ``curvature_every`` (one extra
      backward pass with sampled labels), else 1. That is 1 + 1/k per step on average.
    - ``learned-hvp`` (setup 4): 2. One Hessian-vector product counts as one extra gradient
      evaluation.

    An unknown optimizer gets NaN, so its runs are left out of the gradient-evaluation figure.
    """
    steps = np.asarray(steps)
    if optimizer in ("adam", "sgd", "learned-gradient"):
        return np.ones(steps.shape)
    if optimizer == "learned-hvp":
        return np.full(steps.shape, 2.0)
    if optimizer == "learned-decay":
        every = int(curvature_every or 10)
        return np.where((steps - 1) % every == 0, 2.0, 1.0)
    return np.full(steps.shape, math.nan)


def cumulative_grad_evals(
    optimizer: str, steps: np.ndarray, curvature_every: int | None = None
) -> np.ndarray:
    """Return the gradient evaluations spent up to and including each 1-based step."""
    steps = np.asarray(steps, dtype=np.int64)
    result = np.full(steps.shape, math.nan)
    valid = steps >= 1
    if not valid.any():
        return result
    every_step = np.arange(1, int(steps[valid].max()) + 1)
    totals = np.cumsum(grad_evals_per_step(optimizer, every_step, curvature_every))
    result[valid] = totals[steps[valid] - 1]
    return result


def curve_frame(steps: pd.DataFrame, runs: pd.DataFrame, window: int) -> pd.DataFrame:
    """Return the steps with their group, smoothed loss and cumulative gradient evaluations.

    ``smooth_loss`` is the trailing moving average of the minibatch loss over ``window``
    steps (NaN wherever the window contains a non-finite loss). ``grad_evals`` follows
    ``grad_evals_per_step``. Steps of runs missing from ``runs`` are dropped, and the rows
    are ordered by run and step.
    """
    columns = ["run_id", "step", "epoch", "loss", "seconds"]
    known = steps["run_id"].isin(runs["run_id"])
    curves = steps.loc[known, columns]
    run_diff, step_diff = np.diff(curves[["run_id", "step"]].to_numpy(), axis=0).T
    if not ((run_diff > 0) | ((run_diff == 0) & (step_diff > 0))).all():
        curves = curves.sort_values(["run_id", "step"], kind="stable")
    curves = curves.reset_index(drop=True)
    if curves.empty:
        return _empty_frame(
            run_id="int64",
            step="int64",
            epoch="int64",
            loss="float64",
            seconds="float64",
            group="object",
            seed="int64",
            status="object",
            smooth_loss="float64",
            grad_evals="float64",
        )

    # Each run is one contiguous block of rows, so per-run columns are built block by block
    # and the run's own fields are repeated over its block instead of merged onto every row.
    run_ids = curves["run_id"].to_numpy()
    starts = np.flatnonzero(np.concatenate(([True], run_ids[1:] != run_ids[:-1])))
    ends = np.append(starts[1:], len(run_ids))
    info = runs.drop_duplicates("run_id").set_index("run_id")
    loss = curves["loss"].to_numpy(dtype=float)
    step_numbers = curves["step"].to_numpy()
    smooth = np.empty(len(curves))
    grad_evals = np.empty(len(curves))
    for start, end in zip(starts, ends, strict=True):
        run_id = run_ids[start]
        optimizer = info.at[run_id, "optimizer"]
        hparams = info.at[run_id, "hparams"] or {}
        smooth[start:end] = moving_average(loss[start:end], window)
        grad_evals[start:end] = cumulative_grad_evals(
            optimizer, step_numbers[start:end], hparams.get("curvature_every")
        )
        if optimizer not in ("adam", "sgd", "learned-gradient", "learned-hvp", "learned-decay"):
            log.warning(
                "run %s: unknown optimizer %r, so its gradient evaluations are not counted",
                run_id,
                optimizer,
            )
    lengths = ends - starts
    block_runs = info.loc[run_ids[starts]]
    for name in ("group", "seed", "status"):
        values = np.repeat(block_runs[name].to_numpy(), lengths)
        curves[name] = pd.Series(values, dtype=block_runs[name].dtype, copy=False)
    curves["smooth_loss"] = smooth
    curves["grad_evals"] = grad_evals
    return curves


def mean_curves(
    curves: pd.DataFrame, x: str, y: str = "smooth_loss", floor: float = LOSS_FLOOR
) -> pd.DataFrame:
    """Return each group's geometric mean curve of ``y`` against ``x`` with a 95% t-band.

    Each seed's curve of max(y, ``floor``) is interpolated linearly onto a common grid of
    ``GRID_POINTS`` points. The mean and its t-interval are computed on the log of those
    values and mapped back with exp, so the line is the geometric mean over seeds and the
    band is positive and symmetric on a log axis. The grid spans the x range all seeds
    cover: from the latest first point to the earliest last point with a finite ``y``.
    Seeds with no finite point are left out. When some seeds do not overlap the others (a
    run of one step, say), the seeds that end last and still overlap are kept. A grid point
    where some kept seed has no finite value (a NaN inside its smoothing window) gets a NaN
    mean, so every drawn point averages the same seeds.

    Columns: ``group``, ``x``, ``mean``, ``low``, ``high`` and ``seeds``, the number of
    seeds in the mean.
    """
    rows = []
    for group, part in curves.groupby("group", sort=False):
        seeds = []
        for _, run in part.groupby("run_id", sort=False):
            run = run[np.isfinite(run[x])].sort_values(x)
            values = run[y].to_numpy(dtype=float)
            finite = np.isfinite(values)
            if not finite.any():
                continue
            xs = run[x].to_numpy(dtype=float)
            seeds.append((xs[finite][0], xs[finite][-1], xs, np.clip(values, floor, None)))
        overlapping = _overlapping(seeds)
        if not overlapping:
            continue
        start = max(seed[0] for seed in overlapping)
        end = min(seed[1] for seed in overlapping)
        grid = np.linspace(start, end, GRID_POINTS) if end > start else np.array([start])
        matrix = np.log(np.vstack([np.interp(grid, seed[2], seed[3]) for seed in overlapping]))
        mean_log, half_width, count = mean_ci_columns(matrix)
        mean_log = np.where(count == len(overlapping), mean_log, math.nan)
        # A band wider than the float range becomes inf and is clipped to the axis when drawn.
        with np.errstate(over="ignore"):
            rows.append(
                pd.DataFrame(
                    {
                        "group": group,
                        "x": grid,
                        "mean": np.exp(mean_log),
                        "low": np.exp(mean_log - half_width),
                        "high": np.exp(mean_log + half_width),
                        "seeds": len(overlapping),
                    }
                )
            )
    if not rows:
        return _empty_frame(
            group="object",
            x="float64",
            mean="float64",
            low="float64",
            high="float64",
            seeds="int64",
        )
    return pd.concat(rows, ignore_index=True)


def default_target(
    curves: pd.DataFrame, selection: Selection, tolerance: float = TARGET_TOLERANCE
) -> Target | None:
    """Return ``tolerance`` times the mean final smoothed loss of the reference group.

    The reference is the group of setup 1 (tuned Adam) whose finished runs have the lowest
    mean final smoothed training loss. Without such runs it is the group with the lowest
    mean among all groups. None when no finished run has a finite final smoothed loss.
    """
    finals = final_smoothed_loss(curves)
    runs = selection.runs
    finished = runs[runs["status"] == "finished"][["run_id", "group", "setup", "label"]]
    finals = finished.merge(finals, on="run_id")
    finals = finals[np.isfinite(finals["final_smooth_loss"])]
    if finals.empty:
        return None
    reference = finals[finals["setup"] == REFERENCE_SETUP]
    pool = reference if not reference.empty else finals
    means = pool.groupby("group")["final_smooth_loss"].agg(["mean", "count"])
    group = means["mean"].idxmin()
    value = tolerance * float(means.loc[group, "mean"])
    count = int(means.loc[group, "count"])
    description = (
        f"target loss {value:.4g} = {tolerance:g} × mean final smoothed training loss of "
        f"{group_name(runs, group)}, over {count} finished run{'s' if count != 1 else ''}"
    )
    return Target(value, description)


def group_name(runs: pd.DataFrame, group: str) -> str:
    """Return a group's name for running text: ``setup 1 (X network, Adam)``.

    The settings that tell the configurations of one setup apart follow the title:
    ``setup 2 (X network, …; alpha0=0.1, meta_lr=0.3)``.
    """
    row = runs.loc[runs["group"] == group].iloc[0]
    setup, title = str(row["setup"]), str(row["title"])
    settings = group[len(setup) :].strip().removeprefix("(").removesuffix(")")
    details = "; ".join(part for part in (title, settings) if part)
    return f"setup {setup} ({details})" if details else f"setup {setup}"


def final_smoothed_loss(curves: pd.DataFrame) -> pd.DataFrame:
    """Return each run's smoothed training loss at its last step (``final_smooth_loss``)."""
    if curves.empty:
        return _empty_frame(run_id="int64", final_smooth_loss="float64")
    last = curves.sort_values(["run_id", "step"]).groupby("run_id").tail(1)
    return last[["run_id", "smooth_loss"]].rename(columns={"smooth_loss": "final_smooth_loss"})


def time_to_target(curves: pd.DataFrame, runs: pd.DataFrame, target: float) -> pd.DataFrame:
    """Return, per run, whether its smoothed loss reached ``target`` and at what time.

    A run reaches the target at its first step whose smoothed loss is finite and at most
    ``target``; ``seconds`` is that step's training time. NaN never counts as reaching it.
    Runs without steps are listed as not reached.
    """
    rows = []
    by_run = {run_id: part for run_id, part in curves.groupby("run_id", sort=False)}
    for run in runs.itertuples():
        part = by_run.get(run.run_id)
        step = seconds = None
        if part is not None:
            loss = part["smooth_loss"].to_numpy(dtype=float)
            times = part["seconds"].to_numpy(dtype=float)
            hit = np.isfinite(loss) & np.isfinite(times) & (loss <= target)
            if hit.any():
                index = int(np.argmax(hit))
                step, seconds = int(part["step"].iloc[index]), float(times[index])
        reached = seconds is not None
        rows.append(
            {
                "run_id": run.run_id,
                "group": run.group,
                "seed": run.seed,
                "status": run.status,
                "reached": reached,
                "step": step,
                "seconds": seconds if reached else math.nan,
            }
        )
    return pd.DataFrame(
        rows, columns=["run_id", "group", "seed", "status", "reached", "step", "seconds"]
    )


def convergence_summary(times: pd.DataFrame, groups: Sequence[str]) -> pd.DataFrame:
    """Return per group: runs, runs that reached the target, and the mean time with its CI.

    The mean and CI are over the runs that reached the target, and they are NaN unless every
    run of the group reached it, because a mean over the fast seeds alone would flatter the
    group.
    """
    rows = []
    for group in groups:
        part = times[times["group"] == group]
        reached = int(part["reached"].sum())
        stats = mean_ci(part.loc[part["reached"], "seconds"].to_numpy())
        complete = reached == len(part) and reached > 0
        rows.append(
            {
                "group": group,
                "runs": len(part),
                "reached": reached,
                "mean": stats.mean if complete else math.nan,
                "half_width": stats.half_width if complete else math.nan,
            }
        )
    return pd.DataFrame(rows, columns=["group", "runs", "reached", "mean", "half_width"])


def accuracy_curves(evals: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Return per group and epoch the mean test accuracy of finished runs with a 95% CI.

    Columns: ``group``, ``epoch``, ``mean``, ``low``, ``high``, ``seeds``. Epoch 0 is the
    evaluation before the first step.
    """
    finished = runs.loc[runs["status"] == "finished", ["run_id", "group"]]
    data = evals.merge(finished, on="run_id")
    rows = []
    for (group, epoch), part in data.groupby(["group", "epoch"], sort=False):
        stats = mean_ci(part["test_accuracy"].to_numpy())
        rows.append(
            {
                "group": group,
                "epoch": int(epoch),
                "mean": stats.mean,
                "low": stats.low,
                "high": stats.high,
                "seeds": stats.count,
            }
        )
    columns = ["group", "epoch", "mean", "low", "high", "seeds"]
    return pd.DataFrame(rows, columns=columns).sort_values(["group", "epoch"])


def final_metric(runs: pd.DataFrame, column: str, groups: Sequence[str]) -> pd.DataFrame:
    """Return per group the mean of ``column`` over finished runs with a 95% CI.

    Columns: ``group``, ``mean``, ``half_width``, ``count`` (finished runs with a value),
    ``runs`` (selected runs) and ``diverged``.
    """
    rows = []
    for group in groups:
        part = runs[runs["group"] == group]
        finished = part[part["status"] == "finished"]
        stats = mean_ci(finished[column].to_numpy(dtype=float))
        rows.append(
            {
                "group": group,
                "mean": stats.mean,
                "half_width": stats.half_width,
                "count": stats.count,
                "runs": len(part),
                "diverged": int((part["status"] == "diverged").sum()),
            }
        )
    return pd.DataFrame(rows, columns=["group", "mean", "half_width", "count", "runs", "diverged"])


def step_size_bands(diagnostics: pd.DataFrame, runs: pd.DataFrame, floor: float) -> pd.DataFrame:
    """Return per group, layer and epoch the step-size quantiles, averaged over seeds.

    The average is geometric (the mean of the logs, each quantile clipped at ``floor``),
    because step sizes spread over orders of magnitude. Columns: ``group``, ``layer``,
    ``epoch``, ``q05`` … ``q95``, ``seeds``.
    """
    data = diagnostics.merge(runs[["run_id", "group"]], on="run_id")
    columns = ["group", "layer", "epoch", *QUANTILE_COLUMNS, "seeds"]
    if data.empty:
        return pd.DataFrame(columns=columns)
    logs = data[list(QUANTILE_COLUMNS)].clip(lower=floor).apply(np.log)
    logs[["group", "layer", "epoch", "run_id"]] = data[["group", "layer", "epoch", "run_id"]]
    grouped = logs.groupby(["group", "layer", "epoch"], sort=False)
    result = grouped[list(QUANTILE_COLUMNS)].mean().apply(np.exp)
    result["seeds"] = grouped["run_id"].nunique()
    return result.reset_index()[columns].sort_values(["group", "layer", "epoch"])


def learned_groups(selection: Selection) -> list[str]:
    """Return the groups whose setup learns per-weight step sizes, in display order."""
    learned = {
        group
        for group, setup in zip(selection.runs["group"], selection.runs["setup"], strict=True)
        if setup in SETUPS and SETUPS[setup].learned
    }
    return [group for group in selection.groups if group in learned]


def select_sweeps(
    engine: Engine, *, sweep_id: int | None = None, targets: Sequence[str] | None = None
) -> pd.DataFrame:
    """Return the sweeps to draw: ``sweep_id``, else the newest sweep of each target setup.

    A finished sweep is preferred over a newer unfinished one. ``targets`` limits the setups.
    """
    query = select(
        Sweep.id.label("sweep_id"),
        Sweep.target,
        Sweep.grid,
        Sweep.criterion,
        Sweep.status,
        Sweep.best_config,
    ).order_by(Sweep.id)
    if sweep_id is not None:
        query = query.where(Sweep.id == sweep_id)
    elif targets is not None:
        query = query.where(Sweep.target.in_(list(targets)))
    sweeps = pd.read_sql(query, engine)
    if sweep_id is not None or sweeps.empty:
        return sweeps
    sweeps["finished"] = sweeps["status"] == "finished"
    newest = sweeps.sort_values(["finished", "sweep_id"]).groupby("target").tail(1)
    order = {name: i for i, name in enumerate(SETUPS)}
    newest = newest.assign(order=newest["target"].map(order).fillna(len(order)))
    return newest.sort_values(["order", "target"]).drop(columns=["finished", "order"])


def sweep_points(engine: Engine, sweeps: pd.DataFrame) -> pd.DataFrame:
    """Return one row per finished or diverged run of ``sweeps`` with its criterion value.

    ``x_name`` is the swept learning rate (``lr``) or ``alpha0``. ``line_name`` is a second
    swept hyperparameter (``meta_lr``) or empty. ``value`` is the run's criterion and
    ``best`` marks the configuration the sweep selected.
    """
    columns = [
        "sweep_id",
        "target",
        "criterion",
        "run_id",
        "seed",
        "status",
        "x_name",
        "x",
        "line_name",
        "line",
        "value",
        "best",
    ]
    if sweeps.empty:
        return pd.DataFrame(columns=columns)
    query = (
        select(*_RUN_COLUMNS)
        .where(Run.sweep_id.in_([int(i) for i in sweeps["sweep_id"]]))
        .where(Run.status.in_(SELECTED_STATUSES))
        .order_by(Run.id)
    )
    runs = pd.read_sql(query, engine)
    runs = runs.groupby(["sweep_id", "config_key"]).tail(1)
    rows = []
    for sweep in sweeps.itertuples():
        part = runs[runs["sweep_id"] == sweep.sweep_id]
        criterion = criterion_column(sweep.criterion)
        x_name, line_name = _sweep_axes(sweep.grid or {}, part["hparams"])
        best = sweep.best_config or {}
        for run in part.itertuples():
            hparams = run.hparams or {}
            rows.append(
                {
                    "sweep_id": sweep.sweep_id,
                    "target": sweep.target,
                    "criterion": criterion,
                    "run_id": run.run_id,
                    "seed": run.seed,
                    "status": run.status,
                    "x_name": x_name,
                    "x": _float_or_nan(hparams.get(x_name)),
                    "line_name": line_name or "",
                    "line": _float_or_nan(hparams.get(line_name)) if line_name else math.nan,
                    "value": _float_or_nan(getattr(run, criterion)),
                    "best": bool(best)
                    and all(_same(hparams.get(key), value) for key, value in best.items()),
                }
            )
    return pd.DataFrame(rows, columns=columns)


def sweep_means(points: pd.DataFrame) -> pd.DataFrame:
    """Return per sweep, line and x the mean criterion over finished seeds with a 95% CI.

    ``eligible`` is False when any seed of the configuration diverged. Such configurations
    are not selectable, so their mean is NaN.
    """
    columns = ["sweep_id", "line", "x", "mean", "low", "high", "seeds", "diverged", "eligible"]
    rows = []
    keys = ["sweep_id", "line", "x"]
    for (sweep_id, line, x), part in points.groupby(keys, sort=True, dropna=False):
        diverged = int((part["status"] == "diverged").sum())
        stats = mean_ci(part.loc[part["status"] == "finished", "value"].to_numpy(dtype=float))
        eligible = diverged == 0 and stats.count > 0
        rows.append(
            {
                "sweep_id": sweep_id,
                "line": line,
                "x": x,
                "mean": stats.mean if eligible else math.nan,
                "low": stats.low if eligible else math.nan,
                "high": stats.high if eligible else math.nan,
                "seeds": len(part),
                "diverged": diverged,
                "eligible": eligible,
            }
        )
    return pd.DataFrame(rows, columns=columns)


def criterion_column(criterion: str | None) -> str:
    """Return the ``runs`` column that stores ``criterion`` per run.

    Unknown names fall back to ``final_train_loss`` (the mean minibatch loss over the last
    epoch, the study's default criterion) with a warning.
    """
    if criterion in CRITERION_COLUMNS:
        return CRITERION_COLUMNS[criterion]
    log.warning(
        "unknown sweep criterion %r: drawing final_train_loss (mean minibatch loss over the "
        "last epoch) instead",
        criterion,
    )
    return "final_train_loss"


def _label_groups(runs: pd.DataFrame) -> pd.DataFrame:
    """Add ``group``, ``title``, ``label`` and ``setup_order`` columns to ``runs``."""
    order = {name: i for i, name in enumerate(SETUPS)}
    runs = runs.copy()
    runs["setup_order"] = runs["setup"].map(order).fillna(len(order)).astype(int)
    runs["title"] = runs["setup"].map(lambda name: SETUPS[name].title if name in SETUPS else "")
    groups = pd.Series("", index=runs.index, dtype=object)
    for setup, part in runs.groupby("setup", sort=False):
        texts = {
            key: part["hparams"].map(lambda h, k=key: _text((h or {}).get(k))) for key in GROUP_KEYS
        }
        varying = [key for key in GROUP_KEYS if texts[key].nunique() > 1]
        for index in part.index:
            if not varying:
                groups[index] = setup
                continue
            settings = ", ".join(f"{key}={texts[key][index]}" for key in varying)
            groups[index] = f"{setup} ({settings})"
    runs["group"] = groups
    runs["label"] = [
        f"{group}: {title}" if title else group
        for group, title in zip(runs["group"], runs["title"], strict=True)
    ]
    return runs


def _overlapping(seeds: list[tuple]) -> list[tuple]:
    """Return the seeds that end last and still share a common x range."""
    kept: list[tuple] = []
    for seed in sorted(seeds, key=lambda s: s[1], reverse=True):
        trial = [*kept, seed]
        if max(s[0] for s in trial) <= min(s[1] for s in trial):
            kept = trial
    return kept


def _sweep_axes(grid: dict, hparams: pd.Series) -> tuple[str, str | None]:
    """Return the hyperparameter on the x axis and the one drawn as separate lines."""
    swept = [
        key for key, values in grid.items() if isinstance(values, list | tuple) and len(values) > 1
    ]
    if not swept:
        swept = [
            key
            for key in ("lr", "alpha0", "meta_lr")
            if hparams.map(lambda h, k=key: _text((h or {}).get(k))).nunique() > 1
        ]
    x_name = next((key for key in ("lr", "alpha0") if key in swept), swept[0] if swept else "lr")
    others = [key for key in swept if key != x_name]
    return x_name, (others[0] if others else None)


def _empty_frame(**dtypes: str) -> pd.DataFrame:
    """Return a DataFrame without rows whose columns have the given dtypes."""
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in dtypes.items()})


def _quantile_columns() -> list:
    return [getattr(Diagnostic, name) for name in QUANTILE_COLUMNS]


def _sweep_exists(engine: Engine, sweep_id: int) -> bool:
    with engine.connect() as connection:
        return connection.execute(select(Sweep.id).where(Sweep.id == sweep_id)).first() is not None


def _text(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _float_or_nan(value: object) -> float:
    try:
        return float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def _same(left: object, right: object) -> bool:
    if isinstance(left, int | float) and isinstance(right, int | float):
        return math.isclose(float(left), float(right), rel_tol=1e-9)
    return left == right
