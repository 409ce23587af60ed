"""The whole study in one call: tune every setup, train fresh seeds, return their runs.

Each setup is tuned with the same sweep as ``stepcli sweep`` (its default grid, the same tuning
seeds, one selection rule), then its selected configuration trains on seeds that no sweep used.
Every step is resumable: stored sweep runs and stored fresh runs with the same configuration
and code revision are reused instead of trained again.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from stepcli.config import TrainConfig
from stepcli.executors import ExecutionContext, Executor, RunSpec
from stepcli.provenance import git_revision
from stepcli.setups import MAIN_SETUPS, SETUPS, get_setup
from stepcli.store import Store
from stepcli.store.queries import done_sweep_runs
from stepcli.sweep import SweepPlan, SweepReport, execute_sweep, open_sweep, pending_runs

log = logging.getLogger(__name__)

CONTROL_SETUPS: tuple[str, ...] = tuple(name for name in SETUPS if name not in MAIN_SETUPS)
FRESH_SEED_START = 1000
"""Fresh seeds start here, far from the tuning seeds 0, 1, … so no seed is reused."""
REFERENCE_STEPS = 282
"""Steps of the original study (12,000 images, batch 256, 6 epochs), for which the default
meta step size grid was chosen."""


@dataclass(frozen=True)
class ExperimentPlan:
    """Plan of an experiment: the setups to tune and train, their seeds and shared settings."""

    setups: tuple[str, ...]
    base: TrainConfig
    """Settings shared by every run (epochs, batch size, subset, device …)."""
    tuning_seeds: tuple[int, ...]
    seeds: tuple[int, ...]
    """Fresh seeds of the final runs; none of them is a tuning seed."""
    criterion: str = "train-loss"

    def validate(self) -> None:
        overlap = set(self.tuning_seeds) & set(self.seeds)
        if overlap:
            raise ValueError(f"fresh seeds {sorted(overlap)} are also tuning seeds")


@dataclass
class ExperimentResult:
    """The sweep of each setup, its selected configuration and the fresh runs."""

    sweeps: dict[str, SweepReport] = field(default_factory=dict)
    chosen: dict[str, dict[str, float]] = field(default_factory=dict)
    run_ids: list[int] = field(default_factory=list)
    reused: int = 0
    untuned: list[str] = field(default_factory=list)
    """Setups whose sweep selected nothing (every configuration had a diverged seed)."""


def steps_per_run(base: TrainConfig, train_size: int) -> int:
    """Return the optimizer steps of one run: batches per epoch times epochs."""
    size = base.subset_size or train_size
    return math.ceil(size / base.batch_size) * base.epochs


def default_grid(name: str, steps: int) -> dict[str, tuple[float, ...]]:
    """Return the setup's tuning grid, with the meta step sizes scaled for long runs.

    The sign rule moves every log step size by exactly mu per step, so a run of T steps needs
    mu about proportional to 1/T. Runs longer than the original study's 282 steps get
    ``mu * 282 / T``. Shorter runs keep the grid, because larger mu values sit near the cliff
    where most runs diverge.
    """
    grid = dict(get_setup(name).grid)
    if "meta_lr" in grid and steps > REFERENCE_STEPS:
        scale = REFERENCE_STEPS / steps
        grid["meta_lr"] = tuple(float(f"{mu * scale:.3g}") for mu in grid["meta_lr"])
    return grid


def run_experiment(
    store: Store,
    plan: ExperimentPlan,
    executor: Executor,
    context: ExecutionContext,
    train_size: int,
    *,
    announce: Callable[[str], None] = log.info,
) -> ExperimentResult:
    """Tune every setup of ``plan``, then train its choice on the fresh seeds."""
    plan.validate()
    result = ExperimentResult()
    steps = steps_per_run(plan.base, train_size)

    for name in plan.setups:
        grid = default_grid(name, steps)
        sweep_plan = SweepPlan(name, grid, tuple(plan.tuning_seeds), plan.criterion, plan.base)
        sweep_plan.validate()
        sweep = open_sweep(store, sweep_plan)
        pending = pending_runs(store, sweep_plan, sweep.id)
        announce(
            f"setup {name}: sweep {sweep.id}, {pending.total} runs, {pending.done} already done"
        )
        report = execute_sweep(store, sweep_plan, sweep.id, pending, executor, context)
        result.sweeps[name] = report
        if report.best is None:
            result.untuned.append(name)
            announce(f"setup {name}: every configuration diverged on some seed; not trained")
            continue
        result.chosen[name] = dict(report.best.point)
        point = ", ".join(f"{axis}={value:g}" for axis, value in report.best.point.items())
        announce(f"setup {name}: selected {point} ({plan.criterion} {report.best.mean:.4g})")
        for warning in report.warnings:
            # The grid options belong to stepcli sweep, which tunes one setup further.
            announce(f"setup {name}: warning: {warning} in 'stepcli sweep {name}'")

    configs = [
        replace(plan.base, setup=name, seed=seed, **point).resolved()
        for name, point in result.chosen.items()
        for seed in plan.seeds
    ]
    done = done_sweep_runs(store, [c.key() for c in configs], git_revision(), kind="train")
    specs = [RunSpec(c, {"kind": "train"}) for c in configs if c.key() not in done]
    result.reused = len(configs) - len(specs)
    announce(
        f"final runs: {len(configs)} ({len(result.chosen)} setups x {len(plan.seeds)} fresh "
        f"seeds), {result.reused} already done"
    )
    trained = executor.run(specs, context)
    by_key = {spec.config.key(): run.run_id for spec, run in zip(specs, trained, strict=True)}
    by_key.update({key: run.id for key, run in done.items()})
    result.run_ids = [by_key[c.key()] for c in configs]
    return result


def fresh_seeds(count: int) -> tuple[int, ...]:
    return tuple(range(FRESH_SEED_START, FRESH_SEED_START + count))


def parse_setup_list(names: Sequence[str], controls: bool) -> tuple[str, ...]:
    chosen = list(names)
    if controls:
        chosen += [name for name in CONTROL_SETUPS if name not in chosen]
    return tuple(chosen)
