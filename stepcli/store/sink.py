"""Sinks for a run's rows: straight to a store, or into memory for a driver.

The engine calls ``create_run`` once, ``write_rows`` at every flush and ``finish_run`` once.
``StoreSink`` writes each call in one transaction. ``MemorySink`` keeps the calls so that a
process without write access (a Ray worker beside an SQLite store) can hand them back, and
``replay`` writes them later in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stepcli.store.session import Store, utcnow
from stepcli.store.writes import create_run, finish_run, write_rows


class StoreSink:
    """Writes every call to ``store``; ``run_id`` set in advance reuses a created run."""

    def __init__(self, store: Store, run_id: int | None = None) -> None:
        self.store = store
        self.run_id = run_id

    def create_run(self, **fields: Any) -> int:
        if self.run_id is None:
            self.run_id = create_run(self.store, **fields)
        else:
            # A run row made by a sweep driver: fill in the fields that only the worker has.
            # The heartbeat comes from this process, which stale detection compares with the
            # start of its pid.
            finish_fields = {
                **fields,
                "status": "running",
                "finished_at": None,
                "heartbeat_at": utcnow(),
            }
            _update_run(self.store, self.run_id, finish_fields)
        return self.run_id

    def write_rows(self, run_id: int, **rows: Any) -> None:
        write_rows(self.store, run_id, **rows)

    def finish_run(self, run_id: int, status: str, **fields: Any) -> None:
        finish_run(self.store, run_id, status, **fields)


@dataclass
class MemorySink:
    """Keeps a run's writes in memory; ``replay`` sends them to a store later."""

    run_id: int = 0
    run_fields: dict[str, Any] = field(default_factory=dict)
    batches: list[dict[str, Any]] = field(default_factory=list)
    final: tuple[str, dict[str, Any]] | None = None

    def create_run(self, **fields: Any) -> int:
        self.run_fields = fields
        return self.run_id

    def write_rows(self, run_id: int, **rows: Any) -> None:
        self.batches.append(rows)

    def finish_run(self, run_id: int, status: str, **fields: Any) -> None:
        self.final = (status, fields)

    def replay(self, store: Store, run_id: int | None = None) -> int:
        """Write everything kept here to ``store``; return the run id used there."""
        sink = StoreSink(store, run_id)
        target = sink.create_run(**self.run_fields)
        for batch in self.batches:
            sink.write_rows(target, **batch)
        if self.final is not None:
            sink.finish_run(target, self.final[0], **self.final[1])
        return target


def _update_run(store: Store, run_id: int, values: dict[str, Any]) -> None:
    from sqlalchemy import update

    from stepcli.store.models import Run

    def work(session: Any) -> None:
        session.execute(update(Run).where(Run.id == run_id).values(**values))

    store.write(work)
