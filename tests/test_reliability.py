"""Reliability under faults and bad input, against real processes, signals and SQLite files.

Sections: concurrent writers, signals and stale runs, divergence, bad data folders, bad stores,
bad options, determinism and resources. docs/reliability.md lists every case and what stepcli
does.

The CLI runs in subprocesses with one intra-op thread each (``OMP_NUM_THREADS=1``), because
several processes at once on a machine with few cores otherwise spend most of their time in
spinning OpenMP threads. The option table runs through ``stepcli.cli.main``, the entry point of
the ``stepcli`` script, in this process, which saves the 3 s interpreter start of each case. A
sample of the same cases also runs in subprocesses.
"""

from __future__ import annotations

import ctypes
import functools
import gzip
import hashlib
import http.server
import json
import logging
import math
import multiprocessing
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from stepcli.data import MNIST_FILES
from stepcli.store import SCHEMA_VERSION, Run, create_run, open_store, utcnow, write_rows

TINY = ("--allow-cpu", "--subset-size", "300", "--epochs", "1", "--batch-size", "64")
TINY_STEPS = 5
"""Steps of a TINY run: ceil(300 / 64)."""
LONG = ("--allow-cpu", "--subset-size", "600", "--epochs", "1000", "--batch-size", "64")
"""A run of 10,000 steps that flushes its rows every 10 steps (each epoch end)."""
WAIT_S = 300
"""Upper limit on any one wait for a subprocess. A healthy run needs far less."""
POLL_S = 0.05
SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
MAX_INT = 2**63 - 1


# Helpers


def start_cli(*args: object, env: dict | None = None, preexec_fn=None) -> subprocess.Popen:
    """Start ``python -m stepcli ARGS`` with stdout and stderr captured."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **SINGLE_THREAD, **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "stepcli", *map(str, args)],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=preexec_fn,
    )


def finish(process: subprocess.Popen, timeout: float = WAIT_S) -> subprocess.CompletedProcess:
    """Wait for ``process`` and return its exit code and output, killing it after ``timeout``."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_all(commands: list[list[object]], **kwargs) -> list[subprocess.CompletedProcess]:
    """Start every command at once, then wait for each."""
    processes = [start_cli(*command, **kwargs) for command in commands]
    return [finish(process) for process in processes]


def query(db: Path, sql: str, *params: object) -> list[tuple]:
    with closing(sqlite3.connect(db, timeout=60)) as connection:
        return connection.execute(sql, params).fetchall()


def query_or_empty(db: Path, sql: str, *params: object) -> list[tuple]:
    """Run ``sql``, or return no rows while the store or its tables do not exist yet."""
    if not db.exists():
        return []
    try:
        return query(db, sql, *params)
    except sqlite3.OperationalError:
        return []


def wait_until(condition, process: subprocess.Popen | None = None, description: str = "") -> None:
    """Poll ``condition`` until it holds, and fail when ``process`` exits first or time runs out."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if process is not None and process.poll() is not None:
            pytest.fail(
                f"process exited with {process.returncode} before {description}: {finish(process)}"
            )
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {description}")
        time.sleep(POLL_S)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_one_line_error(done: subprocess.CompletedProcess, code: int, fragment: str) -> None:
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr
    errors = error_lines(done.stderr)
    assert len(errors) == 1, done.stderr
    assert fragment in errors[0]


def without_permission_override():
    """Return a ``preexec_fn`` that makes root subject to file permissions, or None.

    Root bypasses read and write permissions through CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH.
    Dropping both from the bounding set before ``exec`` removes them from the new program, so
    the kernel checks the mode bits as for any other user. Another user needs no change.
    """
    if os.geteuid() != 0:
        return None
    cap_setpcap = 8
    status_lines = Path("/proc/self/status").read_text().splitlines()
    effective_line = next(line for line in status_lines if line.startswith("CapEff:"))
    effective = int(effective_line.split()[1], 16)
    if not effective & (1 << cap_setpcap):
        pytest.skip("root without CAP_SETPCAP cannot drop its permission override")
    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop = 24
    cap_dac_override, cap_dac_read_search = 1, 2

    def drop() -> None:
        for capability in (cap_dac_override, cap_dac_read_search):
            if libc.prctl(pr_capbset_drop, capability, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")

    return drop


def closed_port() -> int:
    """Return a loopback port with nothing listening on it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def link_mnist_files(mnist_dir: Path, folder: Path) -> Path:
    """Symlink the four MNIST files into ``folder`` (created) and return it."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in MNIST_FILES:
        (folder / name).symlink_to(mnist_dir / "MNIST" / "raw" / name)
    return folder


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
)


# Concurrent writers


def test_concurrent_writers_store_every_row(tmp_path, mnist_dir):
    db = tmp_path / "shared.db"
    seeds = range(8)
    commands = [
        ["-q", "train", "--setup", "1", *TINY, "--seed", seed, "--data-dir", mnist_dir, "--db", db]
        for seed in seeds
    ]
    results = run_all(commands)

    for seed, done in zip(seeds, results, strict=True):
        assert done.returncode == 0, f"seed {seed}: {done.stderr}"
        assert "locked" not in done.stderr.lower(), f"seed {seed}: {done.stderr}"
        assert "Traceback" not in done.stderr
    runs = query(db, "SELECT seed, status, steps_done FROM runs ORDER BY seed")
    assert runs == [(seed, "finished", TINY_STEPS) for seed in seeds]
    assert query(db, "SELECT count(*) FROM steps") == [(8 * TINY_STEPS,)]
    assert query(db, "SELECT count(*) FROM evals") == [(8 * 2,)]
    per_run = query(db, "SELECT count(*), min(step), max(step) FROM steps GROUP BY run_id")
    assert per_run == [(TINY_STEPS, 1, TINY_STEPS)] * 8
    assert len(query(db, "SELECT DISTINCT weights_digest FROM runs")) == 8


def _open_at_barrier(path: str, barrier) -> None:
    barrier.wait()
    try:
        open_store(path).dispose()
    except Exception as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        os._exit(1)


def test_schema_creation_race(tmp_path):
    # The train processes above import for seconds before they open the store, so they seldom
    # create the schema at the same moment. Here 8 processes wait at a barrier, then open one
    # new file at once.
    context = multiprocessing.get_context("fork")
    for trial in range(3):
        path = str(tmp_path / f"race{trial}.db")
        barrier = context.Barrier(8)
        workers = [context.Process(target=_open_at_barrier, args=(path, barrier)) for _ in range(8)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(WAIT_S)
        assert [worker.exitcode for worker in workers] == [0] * 8, f"trial {trial}"
        version = query(Path(path), "SELECT value FROM meta WHERE key = 'schema_version'")
        assert version == [(str(SCHEMA_VERSION),)]


# Signals and stale runs


SIGNALS = {
    "SIGINT": signal.SIGINT,
    "SIGTERM": signal.SIGTERM,
    "SIGHUP": signal.SIGHUP,
    "SIGKILL": signal.SIGKILL,
}


@dataclass
class Signalled:
    """Outcome of one long run stopped by a signal."""

    run_id: int
    steps_before: int
    done: subprocess.CompletedProcess


@dataclass
class SignalStudy:
    db: Path
    runs: dict[str, Signalled]
    killed_status_before_reopen: str


def _restore_default_sighup() -> None:
    # A test runner started under nohup ignores SIGHUP, and children inherit that.
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


@pytest.fixture(scope="module")
def signal_study(tmp_path_factory, mnist_dir) -> SignalStudy:
    """Start one long run per signal on one store, signal each once every run stored steps.

    All four signals go out after every process has opened the store, so no later
    ``open_store`` marks the killed run stale before the tests look at it.
    """
    db = tmp_path_factory.mktemp("signals") / "signals.db"
    processes = {
        name: start_cli(
            "-q",
            "train",
            "--setup",
            "1",
            *LONG,
            "--seed",
            index,
            "--data-dir",
            mnist_dir,
            "--db",
            db,
            preexec_fn=_restore_default_sighup,
        )
        for index, name in enumerate(SIGNALS)
    }
    try:

        def steps_by_pid() -> dict[int, tuple[int, int]]:
            rows = query_or_empty(db, "SELECT pid, id, steps_done FROM runs")
            return {pid: (run_id, steps) for pid, run_id, steps in rows}

        for name, process in processes.items():
            wait_until(
                lambda process=process: steps_by_pid().get(process.pid, (0, 0))[1] > 0,
                process,
                f"the {name} run stored steps",
            )
        before = steps_by_pid()
        for name, process in processes.items():
            process.send_signal(SIGNALS[name])
        outcomes = {name: finish(process) for name, process in processes.items()}
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()

    killed_id = before[processes["SIGKILL"].pid][0]
    killed_status = query(db, "SELECT status FROM runs WHERE id = ?", killed_id)[0][0]
    runs = {name: Signalled(*before[processes[name].pid], outcomes[name]) for name in processes}
    return SignalStudy(db, runs, killed_status)


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_signal_stores_run_interrupted(signal_study, name):
    run = signal_study.runs[name]
    assert run.done.returncode == 130, run.done.stderr
    assert "Traceback" not in run.done.stderr
    assert error_lines(run.done.stderr) == [
        "error: interrupted: a run in progress, if any, is stored as 'interrupted' with its rows"
    ]

    db = signal_study.db
    status, steps_done, finished_at = query(
        db, "SELECT status, steps_done, finished_at FROM runs WHERE id = ?", run.run_id
    )[0]
    assert status == "interrupted"
    assert finished_at is not None
    count, first, last = query(
        db, "SELECT count(*), min(step), max(step) FROM steps WHERE run_id = ?", run.run_id
    )[0]
    assert steps_done >= run.steps_before > 0
    assert (count, first, last) == (steps_done, 1, steps_done)
    assert query(db, "SELECT count(*) FROM evals WHERE run_id = ? AND epoch = 0", run.run_id) == [
        (1,)
    ]


def test_sigkill_run_marked_stale(signal_study, cli):
    killed = signal_study.runs["SIGKILL"]
    assert killed.done.returncode == -signal.SIGKILL
    # Nothing ran in the killed process after the signal, so its run was left running.
    assert signal_study.killed_status_before_reopen == "running"

    listed = cli("runs", "--db", str(signal_study.db), "--format", "json")
    assert listed.returncode == 0, listed.stderr
    assert "marked 1 stale run(s) as failed" in listed.stderr
    by_id = {run["id"]: run for run in json.loads(listed.stdout)}
    stale = by_id[killed.run_id]
    assert stale["status"] == "failed"
    assert stale["error"].startswith("stale:")
    assert stale["steps"] >= killed.steps_before
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        interrupted = by_id[signal_study.runs[name].run_id]
        assert interrupted["status"] == "interrupted", name
        assert interrupted["error"] is None, name
    stored = query(signal_study.db, "SELECT count(*) FROM steps WHERE run_id = ?", killed.run_id)
    assert stored == [(stale["steps"],)]


def _stale_store(tmp_path) -> tuple:
    store = open_store(str(tmp_path / "stale.db"))
    return store, socket.gethostname()


def _set_times(store, run_id: int, when) -> None:
    from sqlalchemy import update

    store.write(
        lambda session: session.execute(
            update(Run).where(Run.id == run_id).values(created_at=when, heartbeat_at=when)
        )
    )


def _status(store, run_id: int) -> str:
    with store.session() as session:
        return session.get(Run, run_id).status


def test_reused_pid_marks_run_stale(tmp_path):
    store, host = _stale_store(tmp_path)
    # A live process that started after the run's last heartbeat reuses the run's pid.
    newcomer = subprocess.Popen(["cat"], stdin=subprocess.PIPE)
    try:
        reused = create_run(store, **RUN_FIELDS, host=host, pid=newcomer.pid)
        _set_times(store, reused, utcnow() - timedelta(hours=1))
        # The same process with a heartbeat written after it started still owns its run.
        owned = create_run(store, **RUN_FIELDS, host=host, pid=newcomer.pid)
        store.dispose()
        store = open_store(str(tmp_path / "stale.db"))
        assert _status(store, reused) == "failed"
        assert _status(store, owned) == "running"
    finally:
        newcomer.stdin.close()
        newcomer.wait()


def test_zombie_pid_marks_run_stale(tmp_path):
    store, host = _stale_store(tmp_path)
    exited = subprocess.Popen(["true"])
    state_file = Path(f"/proc/{exited.pid}/stat")
    if not state_file.exists():
        pytest.skip("needs /proc to see zombie processes")
    try:
        # Not reaped yet, so the exited process stays a zombie that os.kill(pid, 0) still finds.
        wait_until(lambda: state_file.read_text().rsplit(")", 1)[1].split()[0] == "Z")
        run_id = create_run(store, **RUN_FIELDS, host=host, pid=exited.pid)
        store.dispose()
        store = open_store(str(tmp_path / "stale.db"))
        assert _status(store, run_id) == "failed"
    finally:
        exited.wait()


# Divergence


def test_sweep_sigterm_interrupts_run_and_resumes(tmp_path, mnist_dir):
    from stepcli.report import load_report_data
    from stepcli.report.summary import summary_frame

    db = tmp_path / "sweep.db"
    args = [
        "sweep",
        "sgd",
        "--lrs",
        "0.1,1e4",
        "--seeds",
        "1",
        "--allow-cpu",
        "--subset-size",
        "600",
        "--batch-size",
        "64",
        "--epochs",
        "10",
        "--data-dir",
        mnist_dir,
        "--db",
        db,
        "--format",
        "json",
    ]
    process = start_cli(*args)
    running_steps = (
        "SELECT count(*) FROM steps JOIN runs ON runs.id = steps.run_id "
        "WHERE runs.status = 'running'"
    )
    try:
        wait_until(
            lambda: query_or_empty(db, running_steps) not in ([], [(0,)]),
            process,
            "the first sweep run stored steps",
        )
        process.send_signal(signal.SIGTERM)
        stopped = finish(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert stopped.returncode == 130, stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert "run the same command again to resume" in stopped.stderr
    assert query(db, "SELECT status FROM sweeps") == [("interrupted",)]
    interrupted = query(
        db,
        "SELECT id, steps_done, (SELECT count(*) FROM steps WHERE run_id = runs.id) FROM runs "
        "WHERE status = 'interrupted'",
    )
    assert len(interrupted) == 1
    interrupted_id, steps_done, stored = interrupted[0]
    assert steps_done == stored > 0
    assert query(db, "SELECT count(*) FROM runs WHERE status = 'running'") == [(0,)]

    resumed = finish(start_cli(*args))
    assert resumed.returncode == 0, resumed.stderr
    assert "sweep 1: 2 runs, 0 already done, 2 to run" in resumed.stderr
    payload = json.loads(resumed.stdout)
    assert payload["best"]["config"] == {"lr": 0.1}
    rows = {row["config"]["lr"]: row for row in payload["rows"]}
    assert rows[1e4]["diverged"] == 1
    assert rows[1e4]["mean"] is None
    assert not rows[1e4]["best"]
    assert rows[1e4]["runs"][0]["status"] == "diverged"

    assert query(db, "SELECT status FROM sweeps") == [("finished",)]
    # The interrupted run stays beside the new run of its configuration.
    assert query(db, "SELECT status, count(*) FROM runs GROUP BY status ORDER BY status") == [
        ("diverged", 1),
        ("finished", 1),
        ("interrupted", 1),
    ]
    diverged_id, diverged_step, steps = query(
        db,
        "SELECT id, diverged_step, steps_done FROM runs WHERE status = 'diverged' AND sweep_id = 1",
    )[0]
    assert diverged_step is not None
    assert diverged_step == steps
    assert query(db, "SELECT max(step) FROM steps WHERE run_id = ?", diverged_id) == [
        (diverged_step,)
    ]

    # The report of the sweep draws the diverged run, counts it, and leaves the interrupted
    # one out with a note.
    store = open_store(str(db))
    data = load_report_data(store, sweep_id=1)
    selected = dict(zip(data.selection.runs["run_id"], data.selection.runs["status"], strict=True))
    assert selected[diverged_id] == "diverged"
    assert interrupted_id not in selected
    assert any("1 interrupted" in note for note in data.selection.notes())
    summary = summary_frame(data.selection, data.times, data.target)
    assert summary["diverged"].sum() == 1
    assert summary["finished"].sum() == 1
    store.dispose()


def test_diverged_runs_store_step(tmp_path, mnist_dir):
    from stepcli.report import load_report_data
    from stepcli.report.summary import summary_frame

    db = tmp_path / "diverged.db"
    common = ["-q", "train", "--setup", "sgd", *TINY, "--data-dir", mnist_dir, "--db", db]
    common += ["--format", "json"]
    # lr 1e4 explodes within a few steps; lr 1 ends above its starting loss without ever
    # crossing the minibatch limit of 1e3.
    exploding, rising = run_all(
        [[*common, "--lr", "1e4", "--seed", "1"], [*common, "--lr", "1", "--seed", "0"]]
    )

    for done in (exploding, rising):
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)[0]["status"] == "diverged"
    early = json.loads(exploding.stdout)[0]
    run_id, status, step, steps_done, final_loss = query(
        db,
        "SELECT id, status, diverged_step, steps_done, final_train_loss FROM runs WHERE id = ?",
        early["run"],
    )[0]
    assert status == "diverged"
    assert step == early["diverged_step"] == steps_done
    assert step < TINY_STEPS
    assert final_loss is None
    losses = query(db, "SELECT step, loss FROM steps WHERE run_id = ? ORDER BY step", run_id)
    assert [row[0] for row in losses] == list(range(1, step + 1))
    last = losses[-1][1]
    assert last is None or not math.isfinite(last) or last > 1e3
    assert query(db, "SELECT epoch FROM evals WHERE run_id = ?", run_id) == [(0,)]

    late = json.loads(rising.stdout)[0]
    step, steps_done = query(
        db, "SELECT diverged_step, steps_done FROM runs WHERE id = ?", late["run"]
    )[0]
    assert step == steps_done == TINY_STEPS
    initial, final = query(
        db, "SELECT train_loss FROM evals WHERE run_id = ? ORDER BY epoch", late["run"]
    )
    assert final[0] > initial[0]
    late_losses = query(db, "SELECT loss FROM steps WHERE run_id = ?", late["run"])
    assert all(loss is not None and loss <= 1e3 for (loss,) in late_losses)

    # The default report draws and counts both runs and keeps them out of the final loss.
    store = open_store(str(db))
    data = load_report_data(store)
    assert sorted(data.selection.runs["status"]) == ["diverged", "diverged"]
    summary = summary_frame(data.selection, data.times, data.target)
    assert summary["diverged"].sum() == 2
    assert summary["finished"].sum() == 0
    assert summary["final_train_loss_mean"].isna().all()
    store.dispose()


# Bad data folders


def test_data_layouts_resolved(run_main, tmp_path, mnist_dir):
    from stepcli.data import resolve_data_dir

    root = tmp_path / "root"
    raw = link_mnist_files(mnist_dir, root / "MNIST" / "raw")
    flat = link_mnist_files(mnist_dir, tmp_path / "flat")
    layouts = {"MNIST/": root / "MNIST", "MNIST/raw/": raw, "four files": flat}
    for name, folder in layouts.items():
        assert resolve_data_dir(folder) == (flat if folder == flat else raw), name

    for index, (name, folder) in enumerate(layouts.items()):
        code, _, stderr = run_main(
            *("-q", "train", "--setup", "1", "--allow-cpu", "--subset-size", "100"),
            *("--epochs", "1", "--batch-size", "100", "--data-dir", folder),
            *("--db", tmp_path / f"layout{index}.db"),
        )
        assert code == 0, f"{name}: {stderr}"


def _offline_env() -> dict[str, str]:
    # Every download goes through a proxy on a loopback port where nothing listens, so the
    # attempt fails at once whether or not this machine has a network.
    proxy = f"http://127.0.0.1:{closed_port()}"
    names = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")
    return {**{name: proxy for name in names}, "no_proxy": "", "NO_PROXY": ""}


def test_empty_data_folder_leaves_nothing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    db = tmp_path / "r.db"
    done = finish(start_cli("train", *TINY, "--data-dir", empty, "--db", db, env=_offline_env()))
    assert_one_line_error(done, 1, f"MNIST files not found in {empty}")
    error = error_lines(done.stderr)[0]
    assert "expected train-images-idx3-ubyte, train-labels-idx1-ubyte" in error
    assert f"download into {empty / 'MNIST' / 'raw'} failed" in error
    assert list(empty.iterdir()) == []


def _idx_images(count: int) -> bytes:
    header = np.array([0x00000803, count, 28, 28], dtype=">u4").tobytes()
    return header + np.arange(count * 784, dtype=np.uint32).astype(np.uint8).tobytes()


def _idx_labels(count: int) -> bytes:
    header = np.array([0x00000801, count], dtype=">u4").tobytes()
    return header + (np.arange(count) % 10).astype(np.uint8).tobytes()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def test_failed_download_leaves_no_partial_set(tmp_path, monkeypatch):
    import torchvision

    from stepcli.data import DataError, load_mnist

    # Small but valid IDX files, served gzipped by a loopback HTTP server in place of the
    # MNIST mirrors, with their own checksums in place of the official ones.
    contents = {
        "train-images-idx3-ubyte": _idx_images(30),
        "train-labels-idx1-ubyte": _idx_labels(30),
        "t10k-images-idx3-ubyte": _idx_images(10),
        "t10k-labels-idx1-ubyte": _idx_labels(10),
    }
    served = tmp_path / "served"
    served.mkdir()
    archives = {name: gzip.compress(data, mtime=0) for name, data in contents.items()}
    resources = [(f"{name}.gz", hashlib.md5(data).hexdigest()) for name, data in archives.items()]
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setattr(
        torchvision.datasets.MNIST, "mirrors", [f"http://127.0.0.1:{server.server_port}/"]
    )
    monkeypatch.setattr(torchvision.datasets.MNIST, "resources", resources)
    target = tmp_path / "data"
    try:
        # Only the training files are served: the download fails after two of four files.
        for name in list(archives)[:2]:
            (served / f"{name}.gz").write_bytes(archives[name])
        with pytest.raises(DataError, match="download into .* failed"):
            load_mnist(target, download=True)
        left = sorted(path.name for path in target.rglob("*") if path.is_file())
        assert left == []

        for name in list(archives)[2:]:
            (served / f"{name}.gz").write_bytes(archives[name])
        data = load_mnist(target, download=True)
    finally:
        server.shutdown()
        server.server_close()
    assert tuple(data.train_images.shape) == (30, 784)
    assert tuple(data.test_labels.shape) == (10,)
    assert sorted(path.name for path in (target / "MNIST" / "raw").iterdir()) == sorted(contents)
    assert [path.name for path in target.iterdir()] == ["MNIST"]


@pytest.fixture
def restore_modes(tmp_path):
    """Give every file under ``tmp_path`` back its owner's access after the test."""
    yield tmp_path
    for path in [tmp_path, *tmp_path.rglob("*")]:
        # chmod follows symlinks, and the links point at the shared MNIST files.
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)


def test_permission_errors_one_line(restore_modes, mnist_dir):
    base = restore_modes
    drop = without_permission_override()
    locked = link_mnist_files(mnist_dir, base / "locked")
    locked.chmod(0o000)
    writable = base / "writable"
    writable.mkdir()
    read_only_folder = base / "read-only"
    read_only_folder.mkdir()
    read_only_folder.chmod(0o555)
    read_only_store = base / "read-only.db"
    open_store(str(read_only_store)).dispose()
    read_only_store.chmod(0o444)
    store_bytes = read_only_store.read_bytes()

    cases = {
        "unreadable data folder": (
            ["train", *TINY, "--data-dir", locked, "--db", writable / "r.db"],
            f"cannot read MNIST data folder {locked}: permission denied",
        ),
        "unwritable store folder": (
            ["train", *TINY, "--data-dir", mnist_dir, "--db", read_only_folder / "r.db"],
            f"folder {read_only_folder} is not writable",
        ),
        "read-only store file": (
            ["train", *TINY, "--data-dir", mnist_dir, "--db", read_only_store],
            f"cannot write the store {read_only_store}: the file is read-only",
        ),
    }
    results = run_all([command for command, _ in cases.values()], preexec_fn=drop)
    for (name, (_, fragment)), done in zip(cases.items(), results, strict=True):
        assert done.returncode == 1, f"{name}: {done.stderr}"
        assert "Traceback" not in done.stderr, name
        errors = error_lines(done.stderr)
        assert len(errors) == 1, f"{name}: {done.stderr}"
        assert fragment in errors[0], name
    assert list(read_only_folder.iterdir()) == []
    assert read_only_store.read_bytes() == store_bytes


# Bad stores


def _store_with_a_run(path: Path) -> Path:
    store = open_store(str(path))
    run_id = create_run(store, **RUN_FIELDS, host="elsewhere", pid=None)
    write_rows(store, run_id, steps=[{"step": 1, "epoch": 1, "loss": 2.3, "seconds": 0.1}])
    store.dispose()
    return path


def _edit(path: Path, *statements: str) -> Path:
    with closing(sqlite3.connect(path)) as connection:
        for statement in statements:
            connection.execute(statement)
        connection.commit()
    return path


def test_bad_stores_refused_untouched(run_main, tmp_path, mnist_dir):
    good = _store_with_a_run(tmp_path / "good.db")
    stores = tmp_path / "stores"
    stores.mkdir()

    def copy(name: str) -> Path:
        return Path(shutil.copy(good, stores / name))

    notes = stores / "notes.db"
    notes.write_text("my notes, not a database\n" * 40)
    corrupt = stores / "corrupt.db"
    corrupt.write_bytes(good.read_bytes()[:100] + b"\xff" * 8000)
    older = _edit(copy("v0.db"), "UPDATE meta SET value = '0' WHERE key = 'schema_version'")
    newer = _edit(
        copy("v2.db"),
        f"UPDATE meta SET value = '{SCHEMA_VERSION + 1}' WHERE key = 'schema_version'",
    )
    no_meta = _edit(copy("no-meta.db"), "DROP TABLE meta")
    no_version = _edit(copy("no-version.db"), "DELETE FROM meta")
    text_version = _edit(
        copy("text-version.db"), "UPDATE meta SET value = 'one' WHERE key = 'schema_version'"
    )
    missing_folder = tmp_path / "missing" / "r.db"

    cases = {
        "text file": (["runs", "--db", notes], "the file is not an SQLite database"),
        "text file, train": (
            ["train", *TINY, "--data-dir", mnist_dir, "--db", notes],
            "the file is not an SQLite database",
        ),
        "corrupt file": (["runs", "--db", corrupt], f"cannot open the store {corrupt}"),
        "folder": (["runs", "--db", stores], "it is a folder"),
        "file that does not exist": (
            ["runs", "--db", stores / "typo.db"],
            f"store {stores / 'typo.db'} not found",
        ),
        "missing folder": (
            ["train", *TINY, "--data-dir", mnist_dir, "--db", missing_folder],
            f"folder {missing_folder.parent} does not exist",
        ),
        "older schema": (
            ["runs", "--db", older],
            "schema version 0 has no migration to 1; export it with the stepcli that wrote it",
        ),
        "newer schema": (["runs", "--db", newer], "newer than this stepcli's 1; upgrade stepcli"),
        "no meta table": (["runs", "--db", no_meta], "but no stepcli schema version"),
        "no version row": (["runs", "--db", no_version], "its meta table has no schema_version"),
        "version not a number": (["runs", "--db", text_version], "'one' is not an integer"),
    }
    before = {path.name: path.read_bytes() for path in stores.iterdir()}
    for name, (command, fragment) in cases.items():
        code, _, stderr = run_main(*command)
        assert code == 1, f"{name}: {stderr}"
        errors = error_lines(stderr)
        assert len(errors) == 1, f"{name}: {stderr}"
        assert fragment in errors[0], name
    # Two cases again in real processes: exit codes, and the files once the process has ended.
    in_processes = ["text file, train", "older schema"]
    results = run_all([cases[name][0] for name in in_processes])
    for name, done in zip(in_processes, results, strict=True):
        assert_one_line_error(done, 1, cases[name][1])
    after = {path.name: path.read_bytes() for path in stores.iterdir()}
    assert after.keys() == before.keys()
    for name, data in before.items():
        assert after[name] == data, name
    assert not missing_folder.parent.exists()


@pytest.mark.skipif(
    sqlite3.sqlite_version_info < (3, 35), reason="ALTER TABLE DROP COLUMN needs SQLite 3.35"
)
def test_missing_nullable_column_added(tmp_path):
    # A store made before runs.weights_digest existed, at the same schema version.
    path = _edit(
        _store_with_a_run(tmp_path / "old.db"), "ALTER TABLE runs DROP COLUMN weights_digest"
    )
    store = open_store(str(path))
    store.dispose()
    columns = [row[1] for row in query(path, "PRAGMA table_info(runs)")]
    assert "weights_digest" in columns
    assert query(path, "SELECT count(*), max(weights_digest) FROM runs") == [(1, None)]
    assert query(path, "SELECT count(*) FROM steps") == [(1,)]


def test_bulk_writes_under_low_variable_limit(tmp_path):
    from sqlalchemy import event
    from sqlalchemy.exc import OperationalError

    from stepcli.store import mark_stale_runs

    # SQLite before 3.32 allows 999 bound variables per statement. This build allows more, so
    # the limit is lowered on every new connection.
    store = open_store(str(tmp_path / "limit.db"))

    @event.listens_for(store.engine, "connect")
    def _lower_limit(dbapi_connection, _record) -> None:
        dbapi_connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)

    store.engine.dispose()
    with (
        pytest.raises(OperationalError, match="too many SQL variables"),
        store.engine.connect() as connection,
    ):
        connection.exec_driver_sql(f"SELECT {', '.join('?' * 1000)}", tuple(range(1000)))

    run_id = create_run(store, **RUN_FIELDS, host="elsewhere", pid=None)
    steps = [
        {"step": i, "epoch": 1, "loss": 1.0 / i, "seconds": i * 1e-3} for i in range(1, 120_001)
    ]
    write_rows(store, run_id, steps=steps)
    with store.session() as session:
        assert session.query(Run).count() == 1
    assert query(tmp_path / "limit.db", "SELECT count(*) FROM steps") == [(120_000,)]

    # 1,500 runs whose process is gone are marked stale in one call.
    stopped = subprocess.Popen(["true"])
    stopped.wait()
    host = socket.gethostname()

    def add_runs(session) -> None:
        now = utcnow()
        session.add_all(
            Run(**RUN_FIELDS, host=host, pid=stopped.pid, created_at=now, status="running")
            for _ in range(1_500)
        )

    store.write(add_runs)
    assert mark_stale_runs(store) == 1_500
    store.dispose()


# Bad options


@pytest.fixture
def run_main(capsys):
    """Return a function that runs ``stepcli.cli.main(ARGS)`` here: (exit code, stdout, stderr)."""
    import torch

    from stepcli import console
    from stepcli.cli import main

    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGHUP)}
    verbosity = console.state["verbosity"]

    def invoke(*args: object) -> tuple[int, str, str]:
        try:
            main([str(arg) for arg in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    # One intra-op thread, as in the subprocesses, so that training here does not spin
    # threads against the other processes on the machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield invoke
    torch.set_num_threads(threads)
    for number, handler in handlers.items():
        signal.signal(number, handler)
    console.state["verbosity"] = verbosity
    logger = logging.getLogger("stepcli")
    logger.handlers.clear()
    logger.setLevel(logging.NOTSET)
    logger.propagate = True


TOO_BIG = str(MAX_INT + 1)
LEARNED = ("--setup", "2")
BAD_OPTIONS = [
    # train: every numeric option, NaN and infinities included.
    (["train", "--lr", "nan"], "invalid --lr nan: must be a finite number > 0"),
    (["train", "--lr", "inf"], "invalid --lr inf"),
    (["train", "--lr", "-inf"], "invalid --lr -inf"),
    (["train", "--lr", "0"], "invalid --lr 0.0"),
    (["train", "--lr", "-1"], "invalid --lr -1"),
    (["train", *LEARNED, "--alpha0", "nan"], "invalid --alpha0 nan"),
    (["train", *LEARNED, "--alpha0", "inf"], "invalid --alpha0 inf"),
    (["train", *LEARNED, "--alpha0", "0"], "invalid --alpha0 0.0"),
    (["train", *LEARNED, "--alpha0", "5"], "must lie within [--alpha-min, --alpha-max]"),
    (["train", *LEARNED, "--meta-lr", "nan"], "invalid --meta-lr nan"),
    (["train", *LEARNED, "--meta-lr", "inf"], "invalid --meta-lr inf"),
    (["train", *LEARNED, "--meta-lr", "-0.1"], "invalid --meta-lr -0.1"),
    (["train", "--gamma", "nan"], "invalid --gamma nan: must be in [0, 1]"),
    (["train", "--gamma", "-0.1"], "invalid --gamma -0.1"),
    (["train", "--gamma", "1.5"], "invalid --gamma 1.5"),
    (["train", "--alpha-min", "0"], "invalid --alpha-min 0.0"),
    (["train", "--alpha-min", "nan"], "invalid --alpha-min nan"),
    (["train", "--alpha-max", "inf"], "invalid --alpha-max inf"),
    (["train", "--alpha-min", "1", "--alpha-max", "0.5"], "must be below --alpha-max 0.5"),
    (["train", "--curvature-every", "0"], "invalid --curvature-every 0"),
    (["train", "--curvature-every", TOO_BIG], f"must be an integer <= {MAX_INT}"),
    (["train", "--epochs", "0"], "invalid --epochs 0"),
    (["train", "--epochs", "-1"], "invalid --epochs -1"),
    (["train", "--epochs", TOO_BIG], f"invalid --epochs {TOO_BIG}"),
    (["train", "--epochs", "1.5"], "Invalid value for '--epochs'"),
    (["train", "--batch-size", "0"], "invalid --batch-size 0"),
    (["train", "--batch-size", TOO_BIG], f"invalid --batch-size {TOO_BIG}"),
    (["train", "--subset-size", "0"], "invalid --subset-size 0"),
    (["train", "--subset-size", "-3"], "invalid --subset-size -3"),
    (["train", "--subset-size", "nan"], "Invalid value for '--subset-size'"),
    (["train", "--seed", "-1"], "invalid --seed -1"),
    (["train", "--seed", TOO_BIG], f"invalid --seed {TOO_BIG}"),
    (["train", "--hidden", "0"], "invalid --hidden 0"),
    (["train", "--hidden", "256,-5"], "invalid --hidden -5"),
    (["train", "--hidden", "abc"], "invalid --hidden 'abc'"),
    (["train", "--hidden", ","], "give at least one width"),
    (["train", "--hidden", TOO_BIG], f"invalid --hidden {TOO_BIG}"),
    # train: names and conflicts.
    (["train", "--setup", "7"], "invalid --setup '7'"),
    (["train", "--setup", ""], "invalid --setup ''"),
    (["train", "--curvature", "fisher"], "invalid --curvature 'fisher'"),
    (["train", "--format", "xml"], "invalid --format 'xml'"),
    (["train", "--device", "tpu"], "invalid --device 'tpu'"),
    (["-v", "-q", "train"], "invalid options -v and -q together"),
    # runs
    (["runs", "--format", "xml"], "invalid --format 'xml'"),
    (["runs", "--status", "done"], "invalid --status 'done'"),
    (["runs", "--setup", "9"], "invalid --setup '9'"),
    (["runs", "--setup", "all"], "invalid --setup 'all': give one setup"),
    (["-v", "-q", "runs"], "invalid options -v and -q together"),
    # sweep: grid values, seeds and settings.
    (["sweep", "setup-9"], "invalid setup 'setup-9'"),
    (["sweep", "adam", "--lrs="], "invalid --lrs '': give comma-separated numbers"),
    (["sweep", "adam", "--lrs", ","], "invalid --lrs ','"),
    (["sweep", "adam", "--lrs", "1e-3,nan"], "invalid --lrs value nan"),
    (["sweep", "adam", "--lrs", "inf"], "invalid --lrs value inf"),
    (["sweep", "adam", "--lrs", "-1"], "invalid --lrs value -1"),
    (["sweep", "adam", "--lrs", "fast"], "invalid --lrs value 'fast'"),
    (["sweep", "setup-2", "--alpha0s", "nan"], "invalid --alpha0s value nan"),
    (["sweep", "setup-2", "--alpha0s", "5"], "invalid --alpha0s value 5"),
    (["sweep", "setup-2", "--meta-lrs", "-1"], "invalid --meta-lrs value -1"),
    (["sweep", "setup-2", "--meta-lrs", "inf"], "invalid --meta-lrs value inf"),
    (["sweep", "adam", "--alpha0s", "0.1"], "invalid --alpha0s: setup 1"),
    (["sweep", "adam", "--seeds", "0"], "invalid --seeds 0"),
    (["sweep", "adam", "--seed-list", "-1"], "invalid --seed-list value -1"),
    (["sweep", "adam", "--seed-list", "x"], "invalid --seed-list value 'x'"),
    (["sweep", "adam", "--seed-list", TOO_BIG], f"invalid --seed {TOO_BIG}"),
    (["sweep", "adam", "--seeds", "2", "--seed-list", "1"], "pass only one of them"),
    (["sweep", "setup-2", "--alpha-min", "1", "--alpha-max", "0.5"], "must be below --alpha-max"),
    (["sweep", "adam", "--epochs", "0"], "invalid --epochs 0"),
    (["sweep", "adam", "--batch-size", "0"], "invalid --batch-size 0"),
    (["sweep", "adam", "--hidden", "0"], "invalid --hidden 0"),
    (["sweep", "setup-2", "--gamma", "nan"], "invalid --gamma nan"),
    (["sweep", "setup-3", "--curvature-every", "0"], "invalid --curvature-every 0"),
    (["sweep", "adam", "--val-size", "-1"], "invalid --val-size -1"),
    (["sweep", "adam", "--select-by", "accuracy"], "invalid --select-by 'accuracy'"),
    (["sweep", "adam", "--gpus-per-run", "nan"], "invalid --gpus-per-run nan"),
    (["sweep", "adam", "--executor", "slurm"], "invalid --executor 'slurm'"),
    (["sweep", "adam", "--format", "csv"], "invalid --format 'csv'"),
    # experiment
    (["experiment", "--epochs", "0"], "invalid --epochs 0"),
    (["experiment", "--epochs", TOO_BIG], f"invalid --epochs {TOO_BIG}"),
    (["experiment", "--batch-size", "0"], "invalid --batch-size 0"),
    (["experiment", "--subset-size", "0"], "invalid --subset-size 0"),
    (["experiment", "--seeds", "0"], "invalid --seeds 0"),
    (["experiment", "--hidden", "0"], "invalid --hidden 0"),
    (["experiment", "--setup", "9"], "invalid --setup '9'"),
    (["experiment", "--select-by", "accuracy"], "invalid --select-by 'accuracy'"),
    (["experiment", "--format", "gif"], "invalid --format 'gif'"),
    (["experiment", "--table-format", "html"], "invalid --table-format 'html'"),
    (["experiment", "--gpus-per-run", "nan"], "invalid --gpus-per-run nan"),
    (["experiment", "--executor", "slurm"], "invalid --executor 'slurm'"),
    (["-v", "-q", "experiment"], "invalid options -v and -q together"),
    # report and export
    (["report", "--smooth", "0"], "invalid --smooth 0"),
    (["report", "--target-loss", "nan"], "invalid --target-loss nan"),
    (["report", "--target-loss", "inf"], "invalid --target-loss inf"),
    (["report", "--target-loss", "-1"], "invalid --target-loss -1"),
    (["report", "--format", "gif"], "invalid --format 'gif'"),
    (["report", "--table-format", "html"], "invalid --table-format 'html'"),
    (["report", "--run", "abc"], "invalid --run 'abc'"),
    (["report", "--setup", "9"], "invalid --setup '9'"),
    (["report", "--sweep", "1", "--run", "1"], "invalid --sweep with --run"),
    (["export", "--table", "users"], "invalid --table 'users'"),
    (["export", "--table", "runs", "--chunk-rows", "0"], "invalid --chunk-rows 0"),
    (["export", "--table", "runs", "--format", "xml"], "invalid --format 'xml'"),
]


def _full_args(args: list[str], tmp_path: Path) -> list[str]:
    # The store path lies in a folder that does not exist, so an option that escaped its check
    # ends in a store error (exit 1) before any data is loaded or any file written.
    missing_store = str(tmp_path / "missing" / "r.db")
    command = next(arg for arg in args if not arg.startswith("-"))
    extra = ["--db", missing_store]
    if command in ("train", "sweep", "experiment"):
        extra += ["--allow-cpu", "--data-dir", str(tmp_path / "no-data")]
    return [*args, *extra]


def _option_id(value: object) -> str | None:
    return " ".join(value) if isinstance(value, list) else None


@pytest.mark.parametrize(("args", "fragment"), BAD_OPTIONS, ids=_option_id)
def test_bad_option_one_line_exit_2(run_main, tmp_path, args, fragment):
    code, stdout, stderr = run_main(*_full_args(args, tmp_path))
    assert code == 2, stderr
    errors = error_lines(stderr)
    assert len(errors) == 1, stderr
    assert fragment in errors[0]
    assert stdout == ""
    assert not (tmp_path / "missing").exists()


HUGE_COUNT = str(10**15)
"""A seed count whose list of 8-byte pointers exceeds any 64-bit address space, so that the
allocation fails at once whatever the overcommit policy."""
SEED_COUNTS = [
    pytest.param(
        ["sweep", "adam", "--seeds", HUGE_COUNT],
        f"invalid --seeds {HUGE_COUNT}",
    ),
    pytest.param(
        ["experiment", "--seeds", HUGE_COUNT],
        f"invalid --seeds {HUGE_COUNT}",
    ),
    pytest.param(
        ["experiment", "--tuning-seeds", HUGE_COUNT],
        f"invalid --tuning-seeds {HUGE_COUNT}",
    ),
    pytest.param(
        ["experiment", "--tuning-seeds", "0"],
        "invalid --tuning-seeds 0",
    ),
]


@pytest.mark.parametrize(("args", "fragment"), SEED_COUNTS, ids=_option_id)
def test_seed_count_bounds_exit_2(run_main, tmp_path, args, fragment):
    code, _, stderr = run_main(*_full_args(args, tmp_path))
    assert code == 2, stderr
    assert fragment in stderr


def test_bad_options_in_subprocess(tmp_path):
    cases = [
        (["train", "--lr", "nan"], "invalid --lr nan"),
        (["-v", "-q", "train"], "invalid options -v and -q together"),
        (["sweep", "adam", "--lrs="], "invalid --lrs ''"),
        (["runs", "--status", "done"], "invalid --status 'done'"),
    ]
    results = run_all([_full_args(args, tmp_path) for args, _ in cases])
    for (args, fragment), done in zip(cases, results, strict=True):
        assert_one_line_error(done, 2, fragment)
        assert done.stdout == "", args


def test_out_of_memory_one_line(run_main, tmp_path, mnist_dir):
    # 784 x 1e11 float32 weights cannot be allocated on any machine.
    code, _, stderr = run_main(
        "train",
        *TINY,
        "--hidden",
        "100000000000",
        "--data-dir",
        mnist_dir,
        "--db",
        tmp_path / "r.db",
    )
    assert code == 1
    errors = error_lines(stderr)
    assert len(errors) == 1, stderr
    assert errors[0].startswith("error: out of memory: ")
    assert "--hidden" in errors[0]


# Determinism and resources


def test_same_command_twice_bit_identical(tmp_path, mnist_dir):
    db = tmp_path / "twice.db"
    command = ["-q", "train", "--setup", "1,3,4", *TINY, "--seed", "3"]
    command += ["--data-dir", mnist_dir, "--db", db]
    for done in run_all([command, command]):
        assert done.returncode == 0, done.stderr

    runs = query(db, "SELECT id, setup, pid, weights_digest FROM runs ORDER BY setup, id")
    assert len(runs) == 6
    for setup in ("1", "3", "4"):
        first, second = [run for run in runs if run[1] == setup]
        assert first[2] != second[2], "both runs came from one process"
        assert first[3] is not None
        assert first[3] == second[3], f"setup {setup}: final weights differ"
        losses = [
            query(db, "SELECT step, loss FROM steps WHERE run_id = ? ORDER BY step", run[0])
            for run in (first, second)
        ]
        assert len(losses[0]) == TINY_STEPS
        assert losses[0] == losses[1], f"setup {setup}: losses differ"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_memory_flat_over_long_run(tmp_path, mnist_cpu):
    import torch

    from stepcli.config import TrainConfig
    from stepcli.engine import NullProgress, train

    class RssSamples(NullProgress):
        def __init__(self) -> None:
            self.samples: dict[int, int] = {}

        def advance(self, step: int) -> None:
            if step % 100 == 0:
                self.samples[step] = _rss_bytes()

    # Setup 4 (a Hessian-vector product per step), 1,500 steps of 16 images: 15 epochs of 100.
    config = TrainConfig(setup="4", subset_size=1600, batch_size=16, epochs=15, device="cpu")
    probe = RssSamples()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    store = open_store(str(tmp_path / "memory.db"))
    try:
        result = train(config, store, mnist_cpu, progress=probe)
    finally:
        torch.set_num_threads(threads)
        store.dispose()
    assert result.steps == 1500
    # Steps 1-300 are the warm-up: allocator pools and the first store writes.
    growth = probe.samples[1500] - probe.samples[300]
    assert growth < 16 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB after step 300"


def test_rows_written_in_bounded_batches(run_main, tmp_path, mnist_dir, monkeypatch):
    import stepcli.store.sink as sink_module

    batches: list[int] = []
    write_rows_unspied = sink_module.write_rows

    def spy(store, run_id, *, steps=(), **rows):
        if steps:
            batches.append(len(steps))
        return write_rows_unspied(store, run_id, steps=steps, **rows)

    monkeypatch.setattr(sink_module, "write_rows", spy)
    db = tmp_path / "batches.db"
    # 3,000 images in batches of 8: 375 steps per epoch, so each epoch has a full window of 200
    # steps and a remainder of 175 written at the epoch end.
    code, _, stderr = run_main(
        "-q",
        "train",
        "--setup",
        "1",
        "--allow-cpu",
        "--subset-size",
        "3000",
        "--batch-size",
        "8",
        "--epochs",
        "2",
        "--data-dir",
        mnist_dir,
        "--db",
        db,
    )
    assert code == 0, stderr
    assert batches == [200, 175, 200, 175]
    assert query(db, "SELECT count(*), max(step) FROM steps") == [(750, 750)]
