"""Opening the results store: URL parsing, SQLite settings, schema version and stale runs."""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, event, inspect, select, text, update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from stepcli.store.models import SCHEMA_VERSION, Base, Meta, Run

log = logging.getLogger(__name__)

DEFAULT_DB = "results.db"
BUSY_TIMEOUT_MS = 60_000
STALE_AFTER = timedelta(minutes=10)
"""A running run on another host whose heartbeat is older than this is marked failed."""

_START_TIME_SLACK = timedelta(seconds=2)
"""Margin for the one-second resolution of the boot time that process start times count from."""
_IDS_PER_STATEMENT = 500
"""Run ids per IN list, below the 999 bound variables that SQLite before 3.32 allows."""
_SQLITE_HEADER = b"SQLite format 3\x00"
_WRITE_OPTION = "stepcli_write"
"""Execution option that marks a connection of a write transaction (see ``Store.session``)."""
_SCHEMA_LOCK_KEY = 0x5374_6570_636C_69
"""PostgreSQL advisory lock key (the ASCII bytes of "Stepcli") held while one process creates
or checks the schema."""
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


def check_store_location(db: str) -> None:
    """Raise ``StoreError`` when ``db`` is an SQLite path that cannot become a store.

    Nothing is created, so commands can check the store before slow work such as loading data
    and open it afterwards.
    """
    url = normalize_url(db)
    if make_url(url).get_backend_name() == "sqlite":
        _check_sqlite_path(url)


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
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # A write transaction takes the write lock up front with IMMEDIATE: a deferred one that
        # reads and then writes can fail with SQLITE_BUSY at once, without waiting for the busy
        # timeout, when another process wrote in between. Reads begin deferred, so in WAL mode
        # a long report or export never blocks training writes.
        if connection.get_execution_options().get(_WRITE_OPTION):
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            connection.exec_driver_sql("BEGIN")


class Store:
    """The results store: one SQLAlchemy engine and the sessions made from it."""

    def __init__(self, url: str, engine: Engine) -> None:
        self.url = url
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        writer = engine.execution_options(**{_WRITE_OPTION: True})
        self._write_sessions = sessionmaker(writer, expire_on_commit=False)

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @contextmanager
    def session(self, *, write: bool = False) -> Iterator[Session]:
        """Yield a session in one transaction that commits on success and rolls back on error.

        ``write=True`` takes SQLite's write lock when the transaction begins; use ``write``
        for anything that changes the store.
        """
        factory = self._write_sessions if write else self._sessions
        with factory() as session, session.begin():
            yield session

    def write(self, work: Callable[[Session], _T], attempts: int = 5) -> _T:
        """Run ``work`` in one transaction, retrying when the database reports a lock."""
        for attempt in range(1, attempts + 1):
            try:
                with self.session(write=True) as session:
                    return work(session)
            except OperationalError as exc:
                if "locked" not in str(exc).lower() or attempt == attempts:
                    raise
                log.warning("store locked, retrying (attempt %d of %d)", attempt, attempts)
                time.sleep(0.2 * attempt)
        raise AssertionError("unreachable")

    def dispose(self) -> None:
        self.engine.dispose()


def open_store(db: str = DEFAULT_DB, *, mark_stale: bool = True, create: bool = True) -> Store:
    """Open or create the store at ``db`` (a path or an SQLAlchemy URL) at the current schema.

    ``create=False`` creates and migrates nothing: it raises ``StoreError`` unless the store
    already has the current schema version. Sweep workers open the store this way, so only the
    driver changes the schema.
    """
    url = normalize_url(db)
    db_display = display_url(db)
    backend = make_url(url).get_backend_name()
    is_sqlite = backend == "sqlite"
    if is_sqlite:
        _check_sqlite_path(url)
    try:
        # A PostgreSQL server that accepts the connection but never responds would otherwise
        # hang the command. 10 s is far above a healthy connection time.
        connect_args = {"connect_timeout": 10} if backend == "postgresql" else {}
        engine = create_engine(url, future=True, connect_args=connect_args)
    except ImportError as exc:
        if backend == "postgresql":
            raise StoreError(
                f"cannot open the store {db_display}: the PostgreSQL driver "
                f"{getattr(exc, 'name', None) or 'psycopg'} is not installed; run "
                "pip install 'stepcli[postgres]' and use a postgresql+psycopg:// URL"
            ) from None
        raise StoreError(f"cannot open the store {db_display}: {exc}") from None
    except ArgumentError as exc:
        raise StoreError(f"cannot open the store {db_display}: {exc}") from None
    if is_sqlite:
        _configure_sqlite(engine)
    store = Store(url, engine)
    try:
        if create:
            _init_schema(store, db_display)
        else:
            _check_schema(store, db_display)
        if is_sqlite:
            # WAL is a property of the file, set once the file is known to be a stepcli store,
            # so a refused file keeps its journal mode and its bytes.
            _set_wal(engine)
        if mark_stale:
            mark_stale_runs(store)
    except DBAPIError as exc:
        engine.dispose()
        reason = str(exc.orig).splitlines()[0] if exc.orig else str(exc).splitlines()[0]
        raise StoreError(f"cannot open the store {db_display}: {reason}") from None
    except StoreError:
        engine.dispose()
        raise
    return store


def _set_wal(engine: Engine, attempts: int = 100) -> None:
    """Switch the SQLite file to WAL mode unless it already is.

    Switching needs the file to itself and SQLite reports a busy file at once, without the busy
    timeout, so concurrent first opens retry for up to about 10 s.
    """
    # The raw connection runs in autocommit mode (see _configure_sqlite), because SQLite cannot
    # change the journal mode inside a transaction.
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        for attempt in range(attempts):
            try:
                if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
                    return
                cursor.execute("PRAGMA journal_mode = WAL")
            except sqlite3.OperationalError:
                if attempt == attempts - 1:
                    raise
                time.sleep(0.1)
    finally:
        raw.close()


def display_url(db: str) -> str:
    """Return ``db`` with any password in the URL replaced by ``***``, for messages and logs."""
    if "://" not in db:
        return db
    try:
        return make_url(db).render_as_string(hide_password=True)
    except ArgumentError:
        return db


def _lock_schema(session: Session) -> None:
    # Two processes creating the schema of an empty PostgreSQL database at once would both see
    # no tables and both run CREATE TABLE, and one would fail. The transaction-scoped advisory
    # lock makes the second wait and then find the tables. SQLite's BEGIN IMMEDIATE already
    # serialises writers.
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})


def _init_schema(store: Store, db: str) -> None:
    def work(session: Session) -> None:
        _lock_schema(session)
        tables = set(inspect(session.connection()).get_table_names())
        if tables and "meta" not in tables:
            raise StoreError(
                f"cannot use the store {db}: it holds tables {sorted(tables)} but no stepcli "
                "schema version; pass another --db"
            )
        Base.metadata.create_all(session.connection())
        row = session.get(Meta, "schema_version")
        if row is None:
            if tables - {"meta"}:
                raise StoreError(
                    f"cannot use the store {db}: its meta table has no schema_version, so its "
                    "schema is unknown; pass another --db"
                )
            session.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
            session.add(Meta(key="created_at", value=utcnow().isoformat()))
            return
        version = _parse_version(row.value, db)
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"cannot use the store {db}: it has schema version {version}, newer than this "
                f"stepcli's {SCHEMA_VERSION}; upgrade stepcli or pass another --db"
            )
        if version < SCHEMA_VERSION:
            _migrate(session, version, db)
        _add_missing_columns(session, db)

    store.write(work)


def _check_schema(store: Store, db: str) -> None:
    with store.session() as session:
        tables = set(inspect(session.connection()).get_table_names())
        row = session.get(Meta, "schema_version") if "meta" in tables else None
    if row is None:
        raise StoreError(
            f"cannot use the store {db}: it has no stepcli schema; open it once from the "
            "sweep driver (any stepcli command) to create it"
        )
    if _parse_version(row.value, db) != SCHEMA_VERSION:
        raise StoreError(
            f"cannot use the store {db}: it has schema version {row.value} but this stepcli "
            f"uses {SCHEMA_VERSION}; install the same stepcli on every node"
        )


def _parse_version(value: str, db: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise StoreError(
            f"cannot use the store {db}: its schema_version {value!r} is not an integer; "
            "pass another --db"
        ) from None


def _add_missing_columns(session: Session, db: str) -> None:
    """Add the nullable columns that a store of the current version was created without.

    Columns added to a model before the schema version changes (``runs.weights_digest``, say)
    are nullable, so adding them keeps every stored row as it was. A missing column that
    cannot be NULL raises ``StoreError``.
    """
    connection = session.connection()
    inspector = inspect(connection)
    quote = connection.dialect.identifier_preparer.quote
    for table in Base.metadata.sorted_tables:
        present = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            if not column.nullable or column.primary_key:
                raise StoreError(
                    f"cannot use the store {db}: table {table.name} lacks column {column.name}; "
                    "export it with the stepcli that wrote it and start a new store"
                )
            kind = column.type.compile(dialect=connection.dialect)
            connection.execute(
                text(f"ALTER TABLE {quote(table.name)} ADD COLUMN {quote(column.name)} {kind}")
            )
            log.info("added column %s.%s to the store %s", table.name, column.name, db)


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


def _pid_reused(pid: int, last_heartbeat: datetime) -> bool:
    """Return True when ``pid`` is a zombie or a process that started after ``last_heartbeat``.

    The run's own process wrote ``last_heartbeat`` (a naive UTC time), so a process with that
    pid that started later is another program that reuses the number. Reads ``/proc`` and
    returns False where it does not exist (other systems than Linux).
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot_lines = Path("/proc/stat").read_text().splitlines()
        boot = next(int(line.split()[1]) for line in boot_lines if line.startswith("btime "))
        # The command name in field 2 may contain spaces and parentheses, so split after the last
        # ")": field 3 (the state) comes first there and field 22 (the start time) at index 19.
        fields = stat[stat.rindex(")") + 2 :].split()
        state, start_ticks = fields[0], int(fields[19])
    except (OSError, ValueError, IndexError, StopIteration):
        return False
    if state in ("Z", "X"):
        return True
    started = datetime.fromtimestamp(boot + start_ticks / os.sysconf("SC_CLK_TCK"), UTC)
    return started.replace(tzinfo=None) > last_heartbeat + _START_TIME_SLACK


def mark_stale_runs(store: Store) -> int:
    """Mark ``running`` runs whose process is gone as ``failed``; return how many.

    On this host a run is stale when its process no longer exists, is a zombie, or was replaced
    by a later process with the same pid. On another host it is stale when its heartbeat is
    older than ``STALE_AFTER``.
    """
    host = socket.gethostname()
    now = utcnow()

    def work(session: Session) -> int:
        stale = []
        for run in session.scalars(select(Run).where(Run.status == "running")):
            if run.host == host and run.pid is not None:
                last_heartbeat = run.heartbeat_at or run.created_at
                gone = not _pid_alive(run.pid) or _pid_reused(run.pid, last_heartbeat)
            else:
                gone = (run.heartbeat_at or run.created_at) < now - STALE_AFTER
            if gone:
                stale.append(run.id)
        for start in range(0, len(stale), _IDS_PER_STATEMENT):
            session.execute(
                update(Run)
                .where(Run.id.in_(stale[start : start + _IDS_PER_STATEMENT]))
                .values(status="failed", error="stale: the process stopped without a status")
            )
        return len(stale)

    count = store.write(work)
    if count:
        log.warning("marked %d stale run(s) as failed: their process is gone", count)
    return count
