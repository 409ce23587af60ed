"""Batched writes of runs and their rows.

Rows are inserted with "insert, ignore on conflict" keyed by their primary key, so writing the
same batch twice (a retried task, say) stores each row once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from stepcli.store.models import Diagnostic, Eval, Run, Step
from stepcli.store.session import Store, utcnow

PAGE_ROWS = 5_000
"""Rows per INSERT statement. Each row is bound separately (executemany), so no statement
comes near SQLite's bound-variable limit; the page only bounds the memory of one call."""


def insert_ignore(session: Session, model: type, rows: Sequence[dict[str, Any]]) -> None:
    """Insert ``rows`` into ``model``'s table, skipping rows whose primary key exists."""
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        statement = sqlite.insert(model).on_conflict_do_nothing()
    elif dialect == "postgresql":
        statement = postgresql.insert(model).on_conflict_do_nothing()
    else:
        # NOTE: other databases get a plain INSERT, so a repeated batch raises instead of
        # being skipped.
        from sqlalchemy import insert

        statement = insert(model)
    for start in range(0, len(rows), PAGE_ROWS):
        session.execute(statement, list(rows[start : start + PAGE_ROWS]))


def create_run(store: Store, **fields: Any) -> int:
    """Insert a run with status ``running`` and return its id."""
    now = utcnow()

    def work(session: Session) -> int:
        run = Run(status="running", created_at=now, heartbeat_at=now, **fields)
        session.add(run)
        session.flush()
        return run.id

    return store.write(work)


def write_rows(
    store: Store,
    run_id: int,
    *,
    steps: Sequence[dict[str, Any]] = (),
    evals: Sequence[dict[str, Any]] = (),
    diagnostics: Sequence[dict[str, Any]] = (),
    run_fields: dict[str, Any] | None = None,
) -> None:
    """Write one batch of rows for ``run_id`` and refresh its heartbeat, in one transaction."""

    def work(session: Session) -> None:
        insert_ignore(session, Step, [{"run_id": run_id, **row} for row in steps])
        insert_ignore(session, Eval, [{"run_id": run_id, **row} for row in evals])
        insert_ignore(session, Diagnostic, [{"run_id": run_id, **row} for row in diagnostics])
        values = {"heartbeat_at": utcnow(), **(run_fields or {})}
        session.execute(update(Run).where(Run.id == run_id).values(**values))

    store.write(work)


def finish_run(store: Store, run_id: int, status: str, **fields: Any) -> None:
    """Set the final status and metrics of ``run_id``."""
    now = utcnow()

    def work(session: Session) -> None:
        session.execute(
            update(Run)
            .where(Run.id == run_id)
            .values(status=status, finished_at=now, heartbeat_at=now, **fields)
        )

    store.write(work)
