"""Opening the results store: URL parsing, SQLite settings, schema version and stale runs."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, event, inspect, select, update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from stepcli.store.models import SCHEMA_VERSION, Base, Meta, Run

log = logging.getLogger(__name__)

DEFAULT_DB = "results.db"
BUSY_TIMEOUT_MS = 60_000
STALE_AFTER = timedelta(minutes=10)
"""A running run on another host whose heartbeat is older than this is marked failed."""

_SQLITE_HEADER = b"SQLite format 3\x00"
_T = TypeVar("_T")


class StoreError(Exception):
    """The store cannot be opened or used; the message names the store and the fix."""


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def normalize_url(db: str) -> str:
    """Turn a file path or an SQLAlchemy URL into an SQLAlchemy URL."""
    if "://" in db:
        try:
            make_url(db)
        except ArgumentError as exc:
            raise StoreError(f"invalid --db URL {db!r}: {exc}") from None
        return db
    return f"sqlite:///{Path(db).expanduser().resolve()}"


def _check_sqlite_path(url: str) -> None:
    database = make_url(url).database
    if not database or database == ":memory:":
        return
    path = Path(database)
    if path.is_dir():
        raise StoreError(
            f"invalid --db {path}: it is a folder; pass a file path such as results.db"
        )
    if not path.parent.is_dir():
        raise StoreError(
            f"invalid --db {path}: folder {path.parent} does not exist; "
            "create it or pass another path"
        )
    if path.exists():
        with path.open("rb") as handle:
            header = handle.read(len(_SQLITE_HEADER))
        if path.stat().st_size > 0 and header != _SQLITE_HEADER:
            raise StoreError(
                f"invalid --db {path}: the file is not an SQLite database; pass a new path "
                "or a stepcli results store"
            )
        if not os.access(path, os.W_OK):
            raise StoreError(f"cannot write the store {path}: the file is read-only; fix its mode")
    if not os.access(path.parent, os.W_OK):
        raise StoreError(
            f"cannot write the store {path}: folder {path.parent} is not writable; "
            "pass --db with a writable path"
        )


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # The driver's own transaction handling is off so that "begin" below decides.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # IMMEDIATE takes the write lock up front. A deferred transaction that reads and then
        # writes can fail with SQLITE_BUSY at once, without waiting for the busy timeout,
        # when another process wrote in between.
        connection.exec_driver_sql("BEGIN IMMEDIATE")


class Store:
    """The results store: one SQLAlchemy engine and the sessions made from it."""

    def __init__(self, url: str, engine: Engine) -> None:
        self.url = url
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @contextmanager
    def session(self) -> Iterator[Session]:
        """Yield a session in one transaction that commits on success and rolls back on error."""
        with self._sessions() as session, session.begin():
            yield session

    def write(self, work: Callable[[Session], _T], attempts: int = 5) -> _T:
        """Run ``work`` in one transaction, retrying when the database reports a lock."""
        for attempt in range(1, attempts + 1):
            try:
                with self.session() as session:
                    return work(session)
            except OperationalError as exc:
                if "locked" not in str(exc).lower() or attempt == attempts:
                    raise
                log.warning("store locked, retrying (attempt %d of %d)", attempt, attempts)
                time.sleep(0.2 * attempt)
        raise AssertionError("unreachable")

    def dispose(self) -> None:
        self.engine.dispose()


def open_store(db: str = DEFAULT_DB, *, mark_stale: bool = True) -> Store:
    """Open or create the store at ``db`` (a path or an SQLAlchemy URL) at the current schema."""
    url = normalize_url(db)
    is_sqlite = make_url(url).get_backend_name() == "sqlite"
    if is_sqlite:
        _check_sqlite_path(url)
    try:
        engine = create_engine(url, future=True)
    except (ArgumentError, ImportError, ModuleNotFoundError) as exc:
        raise StoreError(f"cannot open the store {db}: {exc}") from None
    if is_sqlite:
        _configure_sqlite(engine)
    store = Store(url, engine)
    try:
        _init_schema(store, db)
        if mark_stale:
            mark_stale_runs(store)
    except DBAPIError as exc:
        engine.dispose()
        reason = str(exc.orig).splitlines()[0] if exc.orig else str(exc).splitlines()[0]
        raise StoreError(f"cannot open the store {db}: {reason}") from None
    return store


def _init_schema(store: Store, db: str) -> None:
    def work(session: Session) -> None:
        tables = set(inspect(session.connection()).get_table_names())
        if tables and "meta" not in tables:
            raise StoreError(
                f"cannot use the store {db}: it holds tables {sorted(tables)} but no stepcli "
                "schema version; pass another --db"
            )
        Base.metadata.create_all(session.connection())
        row = session.get(Meta, "schema_version")
        if row is None:
            session.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
            session.add(Meta(key="created_at", value=utcnow().isoformat()))
            return
        version = int(row.value)
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"cannot use the store {db}: it has schema version {version}, newer than this "
                f"stepcli's {SCHEMA_VERSION}; upgrade stepcli or pass another --db"
            )
        if version < SCHEMA_VERSION:
            _migrate(session, version, db)

    store.write(work)


def _migrate(session: Session, version: int, db: str) -> None:
    # NOTE: schema version 1 is the first released schema, so no older store can exist yet.
    # A future version adds one step per version here and raises for versions it cannot read.
    raise StoreError(
        f"cannot use the store {db}: schema version {version} has no migration to "
        f"{SCHEMA_VERSION}; export it with the stepcli that wrote it and start a new store"
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mark_stale_runs(store: Store) -> int:
    """Mark ``running`` runs whose process is gone as ``failed``; return how many.

    On this host a run is stale when its process no longer exists. On another host it is stale
    when its heartbeat is older than ``STALE_AFTER``.
    """
    host = socket.gethostname()
    now = utcnow()

    def work(session: Session) -> int:
        stale = []
        for run in session.scalars(select(Run).where(Run.status == "running")):
            if run.host == host and run.pid is not None:
                gone = not _pid_alive(run.pid)
            else:
                gone = (run.heartbeat_at or run.created_at) < now - STALE_AFTER
            if gone:
                stale.append(run.id)
        if stale:
            session.execute(
                update(Run)
                .where(Run.id.in_(stale))
                .values(status="failed", error="stale: the process stopped without a status")
            )
        return len(stale)

    count = store.write(work)
    if count:
        log.warning("marked %d stale run(s) as failed: their process is gone", count)
    return count
