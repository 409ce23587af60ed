"""The results store: runs, per-step losses, evaluations, diagnostics and sweeps."""

from stepcli.store.models import (
    RUN_STATUSES,
    SCHEMA_VERSION,
    Diagnostic,
    Eval,
    Meta,
    Run,
    Step,
    Sweep,
)
from stepcli.store.session import (
    DEFAULT_DB,
    Store,
    StoreError,
    check_store_location,
    mark_stale_runs,
    normalize_url,
    open_store,
    utcnow,
)
from stepcli.store.writes import create_run, finish_run, insert_ignore, write_rows

__all__ = [
    "DEFAULT_DB",
    "RUN_STATUSES",
    "SCHEMA_VERSION",
    "Diagnostic",
    "Eval",
    "Meta",
    "Run",
    "Step",
    "Store",
    "StoreError",
    "Sweep",
    "check_store_location",
    "create_run",
    "finish_run",
    "insert_ignore",
    "mark_stale_runs",
    "normalize_url",
    "open_store",
    "utcnow",
    "write_rows",
]
