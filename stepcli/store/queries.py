"""Read-side queries used by the CLI."""

from __future__ import annotations

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
    """Return the newest finished sweep of ``target`` that chose a configuration."""
    query = (
        select(Sweep)
        .where(Sweep.target == target, Sweep.status == "finished", Sweep.best_config.is_not(None))
        .order_by(Sweep.id.desc())
        .limit(1)
    )
    with store.session() as session:
        return session.scalars(query).first()


_HPARAM_KEYS = ("lr", "alpha0", "meta_lr", "gamma", "curvature_every", "curvature")
