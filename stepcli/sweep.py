"""Tuning sweeps: a grid of hyperparameters times a list of seeds, stored and ranked.

A sweep trains every grid point with every seed through an executor, stores each run with
``kind="sweep"`` and its ``sweep_id``, and selects the configuration with the lowest mean
criterion over seeds among those whose seeds all finished. ``stepcli train`` then reads the
selected configuration back through ``stepcli.store.queries.latest_sweep``.

Runs already ``finished`` or ``diverged`` with the same config key and code revision are not
trained again, so an interrupted sweep resumes where it stopped. docs/sweeps.md describes the
protocol.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import null, update
from sqlalchemy.orm import Session

from stepcli.config import ConfigError, TrainConfig
from stepcli.engine import RunResult
from stepcli.executors import ExecutionContext, Executor, RunSpec
from stepcli.provenance import git_revision
from stepcli.setups import SETUPS, Setup, get_setup
from stepcli.store import Run, Store, Sweep, utcnow
from stepcli.store.queries import done_sweep_runs, find_sweep

log = logging.getLogger(__name__)

CRITERIA = {"train-loss": "final_train_loss", "val-loss": "final_val_loss"}
"""Selection criterion name -> the ``runs`` column averaged over seeds (lower is better)."""

DEFAULT_VAL_SIZE = 5_000
MAX_SEEDS = 1_000
"""Upper bound of a seed count: far above any study, far below a list that fills memory."""
"""Validation split held out of the training set when ``val-loss`` selects and no size is set."""

AXIS_OPTIONS = {"lr": "--lrs", "alpha0": "--alpha0s", "meta_lr": "--meta-lrs"}
"""Grid axis -> the sweep option that sets its values."""

TARGET_ALIASES = {"adam": "1"}

DONE_STATUSES = ("finished", "diverged")
"""Run statuses that a repeated sweep does not train again."""


def resolve_target(name: str) -> Setup:
    """Return the setup that ``sweep NAME`` tunes: ``adam``, ``setup-N``, ``N`` or a control."""
    key = name.strip().lower()
    try:
        return get_setup(TARGET_ALIASES.get(key, key))
    except KeyError:
        controls = ", ".join(setup for setup in SETUPS if not setup.isdigit())
        raise ConfigError(
            f"invalid setup {name!r}: choose adam, setup-1 … setup-6 (or 1-6), or one of {controls}"
        ) from None


def parse_values(option: str, text: str) -> tuple[float, ...]:
    """Parse a comma-separated list of numbers given to ``option``; sorted, duplicates dropped."""
    parts = [part.strip() for part in text.split(",")]
    if not any(parts):
        raise ConfigError(
            f"invalid {option} {text!r}: give comma-separated numbers such as 1e-3,3e-3"
        )
    values = []
    for part in parts:
        if not part:
            continue
        try:
            values.append(float(part))
        except ValueError:
            raise ConfigError(
                f"invalid {option} value {part!r}: give comma-separated numbers such as 1e-3,3e-3"
            ) from None
    return tuple(sorted(set(values)))


def build_grid(
    spec: Setup,
    overrides: dict[str, tuple[float, ...] | None],
    *,
    alpha_min: float,
    alpha_max: float,
) -> dict[str, tuple[float, ...]]:
    """Return the grid of ``spec``, with each axis in ``overrides`` replaced by its values.

    Raises ``ConfigError`` for an axis that the setup does not tune and for a value outside the
    axis's range.
    """
    grid = {axis: tuple(values) for axis, values in spec.grid.items()}
    for axis, values in overrides.items():
        if values is None:
            continue
        option = AXIS_OPTIONS[axis]
        if axis in spec.fixed:
            raise ConfigError(
                f"invalid {option}: setup {spec.name} pins {axis} = {spec.fixed[axis]:g}; "
                f"tune {_axis_options(spec)} instead"
            )
        if axis not in grid:
            raise ConfigError(
                f"invalid {option}: setup {spec.name} ({spec.title}) does not tune {axis}; "
                f"use {_axis_options(spec)}"
            )
        for value in values:
            _check_axis_value(axis, value, alpha_min, alpha_max)
        grid[axis] = values
    return grid


def _axis_options(spec: Setup) -> str:
    return " and ".join(AXIS_OPTIONS[axis] for axis in spec.grid)


def _check_axis_value(axis: str, value: float, alpha_min: float, alpha_max: float) -> None:
    option = AXIS_OPTIONS[axis]
    if not math.isfinite(value):
        raise ConfigError(f"invalid {option} value {value:g}: must be a finite number")
    if axis == "meta_lr":
        if value < 0:
            raise ConfigError(f"invalid {option} value {value:g}: must be >= 0")
        return
    if value <= 0:
        raise ConfigError(f"invalid {option} value {value:g}: must be > 0")
    if axis == "alpha0" and not alpha_min <= value <= alpha_max:
        raise ConfigError(
            f"invalid {option} value {value:g}: must lie within [--alpha-min, --alpha-max] = "
            f"[{alpha_min:g}, {alpha_max:g}]"
        )


def parse_seeds(count: int | None, listed: str | None, option: str = "--seeds") -> tuple[int, ...]:
    """Return the tuning seeds: ``0 … count-1`` (2 by default) or the ``--seed-list`` values.

    ``option`` names the count option in error messages.
    """
    if count is not None and listed is not None:
        raise ConfigError(f"invalid {option} with --seed-list: pass only one of them")
    if listed is None:
        count = 2 if count is None else count
        check_seed_count(option, count)
        return tuple(range(count))
    seeds = []
    for part in listed.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            seed = int(part)
        except ValueError:
            raise ConfigError(
                f"invalid --seed-list value {part!r}: give comma-separated integers such as 0,1"
            ) from None
        if seed < 0:
            raise ConfigError(f"invalid --seed-list value {seed}: must be >= 0")
        if seed in seeds:
            raise ConfigError(f"invalid --seed-list: seed {seed} appears twice")
        seeds.append(seed)
    if not seeds:
        raise ConfigError(f"invalid --seed-list {listed!r}: give comma-separated integers")
    return tuple(seeds)


def check_seed_count(option: str, count: int) -> None:
    """Raise ``ConfigError`` unless ``count`` is between 1 and ``MAX_SEEDS``."""
    if not 1 <= count <= MAX_SEEDS:
        raise ConfigError(f"invalid {option} {count}: must be an integer from 1 to {MAX_SEEDS}")


def grid_points(grid: dict[str, Sequence[float]]) -> list[dict[str, float]]:
    """Return every combination of the grid's axis values, the first axis varying slowest."""
    axes = list(grid)
    return [dict(zip(axes, values, strict=True)) for values in itertools.product(*grid.values())]


@dataclass(frozen=True)
class SweepPlan:
    """The runs of one sweep: a target setup, a grid, seeds, a criterion and shared settings."""

    target: str
    grid: dict[str, tuple[float, ...]]
    seeds: tuple[int, ...]
    criterion: str
    base: TrainConfig
    """Settings shared by every run; its setup, seed and tuned hyperparameters are replaced."""

    def points(self) -> list[dict[str, float]]:
        return grid_points(self.grid)

    def config(self, point: dict[str, float], seed: int) -> TrainConfig:
        """Return the resolved config of one grid point and seed, as the engine stores it."""
        return replace(self.base, setup=self.target, seed=seed, **point).resolved()

    def configs(self) -> list[tuple[dict[str, float], TrainConfig]]:
        return [(point, self.config(point, seed)) for point in self.points() for seed in self.seeds]

    def settings(self) -> dict[str, Any]:
        """Return the stored settings shared by every run: the run record without the axes."""
        record = self.config(self.points()[0], self.seeds[0]).record()
        record.pop("extra", None)
        for axis in self.grid:
            record.pop(axis, None)
        return record

    def validate(self) -> None:
        """Raise ``ConfigError`` for the first grid point whose config is invalid."""
        if self.criterion not in CRITERIA:
            raise ConfigError(
                f"invalid --select-by {self.criterion!r}: choose one of {', '.join(CRITERIA)}"
            )
        if self.criterion == "val-loss" and self.base.val_size < 1:
            raise ConfigError(
                f"invalid --val-size {self.base.val_size}: --select-by val-loss needs a "
                "validation split of at least 1 image"
            )
        for _, config in self.configs():
            config.validate()


def _as_json(value: Any) -> Any:
    # Tuples become lists, as they do in the JSON columns, so stored and planned values compare.
    return json.loads(json.dumps(value))


def open_sweep(store: Store, plan: SweepPlan) -> Sweep:
    """Return the newest stored sweep with the plan's target, grid, seeds, criterion and settings.

    A sweep in any status matches, so an interrupted sweep resumes in the same row. Without a
    match a new row is created with status ``running``.
    """
    grid = _as_json(plan.grid)
    seeds = list(plan.seeds)
    settings = _as_json(plan.settings())
    found = find_sweep(store, plan.target, grid, seeds, plan.criterion, settings)
    if found is not None:
        return found

    def work(session: Session) -> Sweep:
        sweep = Sweep(
            target=plan.target,
            grid=grid,
            seeds=seeds,
            criterion=plan.criterion,
            settings=settings,
            status="running",
            git_revision=git_revision(),
            created_at=utcnow(),
        )
        session.add(sweep)
        session.flush()
        return sweep

    return store.write(work)


@dataclass(frozen=True)
class PendingRuns:
    """The runs of a sweep split into those to train and those already stored."""

    specs: list[RunSpec]
    done: int
    total: int
    forced: bool


def pending_runs(
    store: Store,
    plan: SweepPlan,
    sweep_id: int,
    *,
    force: bool = False,
    run_fields: dict[str, Any] | None = None,
) -> PendingRuns:
    """Return the run specs still to train and the count of runs stored as done.

    A run counts as done when a sweep run with the same config key and code revision is stored
    as ``finished`` or ``diverged``. ``force`` trains every run again.
    """
    configs = [config for _, config in plan.configs()]
    done = {} if force else done_sweep_runs(store, [c.key() for c in configs], git_revision())
    fields = {"kind": "sweep", "sweep_id": sweep_id, **(run_fields or {})}
    specs = [RunSpec(config, dict(fields)) for config in configs if config.key() not in done]
    return PendingRuns(specs, len(configs) - len(specs), len(configs), force)


@dataclass
class SeedResult:
    """The stored run of one grid point and seed, or its absence."""

    seed: int
    run_id: int | None
    status: str
    value: float | None


@dataclass
class PointResult:
    """One grid point: its per-seed results, their summary and its place in the ranking."""

    point: dict[str, float]
    seeds: list[SeedResult]
    rank: int = 0
    best: bool = False

    @property
    def diverged(self) -> int:
        return sum(seed.status == "diverged" for seed in self.seeds)

    @property
    def missing(self) -> int:
        """Seeds without a finished or diverged run (failed, interrupted or never run)."""
        return sum(seed.status not in DONE_STATUSES for seed in self.seeds)

    @property
    def eligible(self) -> bool:
        """True when every seed finished with a finite criterion value."""
        return all(
            seed.status == "finished" and seed.value is not None and math.isfinite(seed.value)
            for seed in self.seeds
        )

    @property
    def mean(self) -> float | None:
        if not self.eligible:
            return None
        return statistics.fmean(seed.value for seed in self.seeds)

    @property
    def std(self) -> float | None:
        """Sample standard deviation over seeds (0 for a single seed)."""
        if not self.eligible:
            return None
        values = [seed.value for seed in self.seeds]
        return statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass
class SweepReport:
    """The ranked results of a sweep and the selected configuration, if any."""

    sweep_id: int
    target: str
    criterion: str
    grid: dict[str, tuple[float, ...]]
    seeds: tuple[int, ...]
    rows: list[PointResult]
    """Grid points, best first; points with a diverged or missing seed come last."""
    warnings: list[str] = field(default_factory=list)

    @property
    def best(self) -> PointResult | None:
        return next((row for row in self.rows if row.best), None)

    @property
    def runs(self) -> int:
        return sum(len(row.seeds) for row in self.rows)

    @property
    def diverged(self) -> int:
        return sum(row.diverged for row in self.rows)

    @property
    def missing(self) -> int:
        return sum(row.missing for row in self.rows)


def rank_points(rows: list[PointResult]) -> list[PointResult]:
    """Sort eligible points by mean criterion, then the rest in grid order; mark the best.

    A point with any diverged, failed or missing seed is never selected. Equal means keep grid
    order, so the first such point wins.
    """
    eligible = sorted((row for row in rows if row.eligible), key=lambda row: row.mean)
    ranked = eligible + [row for row in rows if not row.eligible]
    for rank, row in enumerate(ranked, start=1):
        row.rank = rank
        row.best = rank == 1 and row.eligible
    return ranked


def edge_warnings(grid: dict[str, Sequence[float]], best: dict[str, float]) -> list[str]:
    """Return one warning per axis on which the selected value is the grid's smallest or largest.

    Axes with a single value have no direction to extend and get no warning.
    """
    warnings = []
    for axis, values in grid.items():
        if len(values) < 2:
            continue
        option = AXIS_OPTIONS.get(axis, axis)
        value = best[axis]
        if value == max(values):
            warnings.append(
                f"best {axis} {value:g} is the largest value on the grid; extend {option} upward"
            )
        elif value == min(values):
            warnings.append(
                f"best {axis} {value:g} is the smallest value on the grid; extend {option} downward"
            )
    return warnings


def summarize(store: Store, plan: SweepPlan, sweep_id: int) -> SweepReport:
    """Rank the plan's grid points from the runs stored for the current code revision."""
    column = CRITERIA[plan.criterion]
    configs = plan.configs()
    stored = done_sweep_runs(store, [config.key() for _, config in configs], git_revision())
    rows: dict[str, PointResult] = {}
    for point, config in configs:
        run = stored.get(config.key())
        name = json.dumps(point, sort_keys=True)
        row = rows.setdefault(name, PointResult(point, []))
        row.seeds.append(_seed_result(config.seed, run, column))
    ranked = rank_points(list(rows.values()))
    report = SweepReport(sweep_id, plan.target, plan.criterion, plan.grid, plan.seeds, ranked)
    if report.best is not None:
        report.warnings = edge_warnings(plan.grid, report.best.point)
    return report


def _seed_result(seed: int, run: Run | None, column: str) -> SeedResult:
    if run is None:
        return SeedResult(seed, None, "missing", None)
    value = getattr(run, column) if run.status == "finished" else None
    return SeedResult(seed, run.id, run.status, value)


def execute_sweep(
    store: Store,
    plan: SweepPlan,
    sweep_id: int,
    pending: PendingRuns,
    executor: Executor,
    context: ExecutionContext,
    on_result: Callable[[RunSpec, RunResult], None] | None = None,
) -> SweepReport:
    """Train the pending runs, then rank every grid point and store the selection.

    On ``KeyboardInterrupt`` the sweep is stored as ``interrupted`` and on any other exception
    as ``failed``. Both re-raise, and the same sweep run again resumes.
    """
    started = time.monotonic()
    _update_sweep(store, sweep_id, status="running", finished_at=None, git_revision=git_revision())
    try:
        executor.run(pending.specs, context, on_result)
    except KeyboardInterrupt:
        _add_seconds(store, sweep_id, time.monotonic() - started, status="interrupted")
        raise
    except BaseException:
        _add_seconds(store, sweep_id, time.monotonic() - started, status="failed")
        raise
    report = summarize(store, plan, sweep_id)
    best = report.best
    _add_seconds(
        store,
        sweep_id,
        time.monotonic() - started,
        status="finished",
        finished_at=utcnow(),
        # SQL NULL, not JSON null, so that queries filtering on a missing best skip the row.
        best_config=dict(best.point) if best is not None else null(),
        best_value=best.mean if best is not None else None,
    )
    log.debug("sweep %d finished: best %s", sweep_id, best.point if best else None)
    return report


def _update_sweep(store: Store, sweep_id: int, **values: Any) -> None:
    def work(session: Session) -> None:
        session.execute(update(Sweep).where(Sweep.id == sweep_id).values(**values))

    store.write(work)


def _add_seconds(store: Store, sweep_id: int, seconds: float, **values: Any) -> None:
    """Add ``seconds`` to the sweep's wall-clock total and set ``values``, in one transaction."""

    def work(session: Session) -> None:
        sweep = session.get(Sweep, sweep_id)
        total = (sweep.seconds or 0.0) + seconds
        session.execute(update(Sweep).where(Sweep.id == sweep_id).values(seconds=total, **values))

    store.write(work)


def report_payload(report: SweepReport) -> dict[str, Any]:
    """Return the JSON document of ``stepcli sweep --format json`` (see docs/sweeps.md)."""
    best = report.best
    return {
        "sweep_id": report.sweep_id,
        "target": report.target,
        "criterion": report.criterion,
        "grid": {axis: list(values) for axis, values in report.grid.items()},
        "seeds": list(report.seeds),
        "best": (
            {"config": dict(best.point), "value": best.mean, "std": best.std}
            if best is not None
            else None
        ),
        "rows": [
            {
                "rank": row.rank,
                "config": dict(row.point),
                "mean": row.mean,
                "std": row.std,
                "diverged": row.diverged,
                "missing": row.missing,
                "best": row.best,
                "runs": [
                    {
                        "seed": seed.seed,
                        "run_id": seed.run_id,
                        "status": seed.status,
                        "value": seed.value,
                    }
                    for seed in row.seeds
                ],
            }
            for row in report.rows
        ],
        "warnings": list(report.warnings),
    }
