"""Read-side queries used by the CLI."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import select

from stepcli.store.models import Run, Sweep
from stepcli.store.session import Store


def list_runs(
    store: Store, *, setup: str | None = None, status: str | None = None
) -> list[dict[str, Any]]:
    """Return one row per run, oldest first, with its counts and final metrics."""
    query = select(Run).order_by(Run.id)
    if setup is not None:
        query = query.where(Run.setup == setup)
    if status is not None:
        query = query.where(Run.status == status)
    with store.session() as session:
        return [
            {
                "id": run.id,
                "setup": run.setup,
                "kind": run.kind,
                "sweep": run.sweep_id,
                "status": run.status,
                "seed": run.seed,
                "hparams": {k: v for k, v in run.hparams.items() if k in _HPARAM_KEYS},
                "network_params": run.network_params,
                "step_size_params": run.step_size_params,
                "decay_params": run.decay_params,
                "budget_params": run.budget_params,
                "steps": run.steps_done,
                "diverged_step": run.diverged_step,
                "final_train_loss": run.final_train_loss,
                "test_accuracy": run.test_accuracy,
                "train_seconds": run.train_seconds,
                "device": run.device,
                "error": run.error,
            }
            for run in session.scalars(query)
        ]


def latest_sweep(store: Store, target: str) -> Sweep | None:
    """Return the most recently finished sweep of ``target`` that chose a configuration."""
    query = (
        select(Sweep)
        .where(
            Sweep.target == target,
            Sweep.status == "finished",
            Sweep.best_config.is_not(None),
            Sweep.best_value.is_not(None),
        )
        .order_by(Sweep.finished_at.desc(), Sweep.id.desc())
        .limit(1)
    )
    with store.session() as session:
        return session.scalars(query).first()


def find_sweep(
    store: Store,
    target: str,
    grid: dict[str, Any],
    seeds: list[int],
    criterion: str,
    settings: dict[str, Any],
) -> Sweep | None:
    """Return the newest sweep, in any status, whose target, grid, seeds, criterion and
    settings all equal the given ones (JSON values compare after a JSON round trip)."""
    query = (
        select(Sweep)
        .where(Sweep.target == target, Sweep.criterion == criterion)
        .order_by(Sweep.id.desc())
    )
    with store.session() as session:
        for sweep in session.scalars(query):
            if sweep.grid == grid and list(sweep.seeds) == seeds and sweep.settings == settings:
                return sweep
    return None


def done_sweep_runs(
    store: Store, config_keys: Iterable[str], git_revision: str | None, *, kind: str = "sweep"
) -> dict[str, Run]:
    """Return the newest ``finished`` or ``diverged`` run of ``kind`` per config key.

    Only runs stored with ``git_revision`` count; ``None`` matches runs whose revision is
    unknown.
    """
    keys = sorted(set(config_keys))
    revision = (
        Run.git_revision.is_(None) if git_revision is None else (Run.git_revision == git_revision)
    )
    found: dict[str, Run] = {}
    with store.session() as session:
        for start in range(0, len(keys), _KEYS_PER_QUERY):
            query = (
                select(Run)
                .where(
                    Run.kind == kind,
                    Run.status.in_(("finished", "diverged")),
                    Run.config_key.in_(keys[start : start + _KEYS_PER_QUERY]),
                    revision,
                )
                .order_by(Run.id)
            )
            for run in session.scalars(query):
                found[run.config_key] = run
    return found


_KEYS_PER_QUERY = 500
"""Config keys per IN list, well below SQLite's default limit of bound variables."""


_HPARAM_KEYS = ("lr", "alpha0", "meta_lr", "gamma", "curvature_every", "curvature")
