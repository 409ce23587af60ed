import math
import sqlite3

import pytest
from sqlalchemy import select

from stepcli.store import (
    SCHEMA_VERSION,
    Eval,
    Meta,
    Run,
    Step,
    StoreError,
    create_run,
    finish_run,
    open_store,
    write_rows,
)

RUN_FIELDS = dict(
    setup="1",
    optimizer="adam",
    hparams={"lr": 1e-3},
    config_key="key",
    seed=0,
    hidden=[256],
    network_params=203_530,
    budget_params=203_530,
    device="cpu",
    torch_version="test",
    cuda_version=None,
    git_revision=None,
    host="test-host",
    pid=None,
)


def test_round_trip_with_nan_and_inf(tmp_path):
    store = open_store(str(tmp_path / "r.db"))
    run_id = create_run(store, **RUN_FIELDS)
    losses = [2.3, math.nan, math.inf, -math.inf, 0.0]
    write_rows(
        store,
        run_id,
        steps=[
            {"step": i + 1, "epoch": 1, "loss": v, "seconds": 0.5 * i} for i, v in enumerate(losses)
        ],
        evals=[
            {
                "epoch": 1,
                "step": 5,
                "seconds": 2.0,
                "train_loss": math.nan,
                "val_loss": None,
                "test_loss": math.inf,
                "test_accuracy": 0.1,
            }
        ],
    )
    finish_run(store, run_id, "diverged", diverged_step=2, final_train_loss=None)
    store.dispose()

    reopened = open_store(str(tmp_path / "r.db"))
    with reopened.session() as session:
        stored = [row.loss for row in session.scalars(select(Step).order_by(Step.step))]
        evaluation = session.get(Eval, (run_id, 1))
        run = session.get(Run, run_id)
    assert stored[0] == 2.3
    assert math.isnan(stored[1])
    assert stored[2] == math.inf
    assert stored[3] == -math.inf
    assert stored[4] == 0.0
    assert math.isnan(evaluation.train_loss)
    assert evaluation.test_loss == math.inf
    assert run.status == "diverged"
    assert run.diverged_step == 2


def test_rows_written_twice_stored_once(tmp_path):
    store = open_store(str(tmp_path / "r.db"))
    run_id = create_run(store, **RUN_FIELDS)
    rows = [{"step": i, "epoch": 1, "loss": 1.0, "seconds": 0.0} for i in range(1, 11)]
    write_rows(store, run_id, steps=rows)
    write_rows(store, run_id, steps=rows)
    with store.session() as session:
        assert len(session.scalars(select(Step)).all()) == 10


def test_bulk_write_beyond_bound_variable_limit(tmp_path):
    # 40,000 rows of 5 values is 200,000 bound values, far above SQLite's per-statement limit.
    store = open_store(str(tmp_path / "r.db"))
    run_id = create_run(store, **RUN_FIELDS)
    rows = [{"step": i, "epoch": 1, "loss": 1.0 / i, "seconds": i * 1e-3} for i in range(1, 40_001)]
    write_rows(store, run_id, steps=rows)
    with store.session() as session:
        assert session.query(Step).count() == 40_000


def test_sqlite_settings_and_schema_version(tmp_path):
    path = tmp_path / "r.db"
    open_store(str(path)).dispose()
    connection = sqlite3.connect(path)
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    version = connection.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[
        0
    ]
    assert int(version) == SCHEMA_VERSION
    connection.close()


def test_sqlalchemy_url_accepted(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'u.db'}")
    assert (tmp_path / "u.db").exists()
    store.dispose()


def test_not_a_database_rejected(tmp_path):
    path = tmp_path / "notes.db"
    path.write_text("these are my notes\n" * 100)
    with pytest.raises(StoreError, match="not an SQLite database"):
        open_store(str(path))
    assert path.read_text() == "these are my notes\n" * 100


def test_missing_folder_rejected(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        open_store(str(tmp_path / "nowhere" / "r.db"))


def test_newer_schema_refused_untouched(tmp_path):
    path = tmp_path / "r.db"
    open_store(str(path)).dispose()
    connection = sqlite3.connect(path)
    connection.execute(
        "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),)
    )
    connection.commit()
    connection.close()
    before = path.read_bytes()
    with pytest.raises(StoreError, match="newer"):
        open_store(str(path))
    assert path.read_bytes() == before


def test_foreign_database_refused(tmp_path):
    path = tmp_path / "other.db"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE customers (id INTEGER)")
    connection.commit()
    connection.close()
    with pytest.raises(StoreError, match="no stepcli schema version"):
        open_store(str(path))
    connection = sqlite3.connect(path)
    tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    assert tables == {"customers"}


def test_stale_run_of_dead_process_marked_failed(tmp_path):
    import socket
    import subprocess

    process = subprocess.Popen(["true"])
    process.wait()
    dead_pid = process.pid
    store = open_store(str(tmp_path / "r.db"))
    run_id = create_run(store, **{**RUN_FIELDS, "host": socket.gethostname(), "pid": dead_pid})
    store.dispose()
    store = open_store(str(tmp_path / "r.db"))
    with store.session() as session:
        run = session.get(Run, run_id)
        assert run.status == "failed"
        assert "stale" in run.error
        assert session.get(Meta, "schema_version") is not None
