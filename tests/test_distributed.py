"""The Ray executor on a local 2-CPU Ray instance, with SQLite and a real PostgreSQL server.

One Ray instance serves the whole module, because starting Ray takes seconds. The pytest
process is a Ray driver, so the executor tests check what the driver does and does not do. The
CLI tests start ``stepcli sweep`` as a second driver on the same instance.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from pg_server import PostgresUnavailable, postgres_server
from sqlalchemy import create_engine, func, inspect, select

import stepcli.data
import stepcli.executors_ray
import stepcli.options
from stepcli.config import ConfigError, TrainConfig
from stepcli.executors import (
    ExecutionContext,
    ExecutorOptions,
    LocalExecutor,
    RunSpec,
    make_executor,
)
from stepcli.executors_ray import CRASH_FILE_ENV, RayExecutor, resolve_gpus_per_run
from stepcli.store import (
    Eval,
    Meta,
    Run,
    Step,
    StoreError,
    create_run,
    open_store,
    write_rows,
)
from stepcli.store.sink import MemorySink

TOLERANCE = 1e-6
"""Largest difference allowed between a loss trained by Ray and by the local executor."""


def tiny(setup: str, seed: int, **overrides) -> TrainConfig:
    """Return a CPU config on 500 images: 4 steps per epoch at batch 128."""
    values = dict(setup=setup, seed=seed, device="cpu", epochs=1, batch_size=128, subset_size=500)
    values.update(overrides)
    return TrainConfig(**values)


SWEEP = [
    tiny("1", 0, lr=1e-3),
    tiny("1", 1, lr=3e-3),
    tiny("2", 0),
    tiny("sgd", 2, lr=0.1),
]


@pytest.fixture(scope="module")
def crash_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("crash") / "crash-at-step"


RAY_TEST_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray 2.60 advertises the machine's network address for a local instance, even with
    # _node_ip_address="127.0.0.1". This variable at 0 when Ray is imported keeps it on loopback.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


@pytest.fixture(scope="module")
def ray_address(crash_file):
    """Start one local Ray instance with 2 CPUs on loopback; return its GCS address."""
    names = [*RAY_TEST_ENV, CRASH_FILE_ENV]
    saved = {name: os.environ.get(name) for name in names}
    # CLI subprocesses and Ray workers inherit these variables.
    os.environ.update(RAY_TEST_ENV)
    os.environ[CRASH_FILE_ENV] = str(crash_file)
    try:
        import ray
        from ray._private import ray_constants
    except ImportError:
        pytest.fail("Ray is not installed: run pip install -e '.[ray]'")
    if ray_constants.ENABLE_RAY_CLUSTER:
        pytest.fail(
            "Ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set, so it would "
            "listen on the network; run the Ray tests in a fresh pytest process"
        )
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        address = ray.get_runtime_context().gcs_address
        assert address.startswith("127.0.0.1:"), f"Ray is not on loopback: {address}"
        yield address
    finally:
        ray.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def postgres():
    try:
        with postgres_server() as server:
            yield server
    except PostgresUnavailable as exc:
        pytest.fail(str(exc))


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "results.db")
    return request.getfixturevalue("postgres").create_database()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mnist_cpu):
    """Return a function: config key -> (step losses, eval rows) trained by LocalExecutor."""
    store = open_store(str(tmp_path_factory.mktemp("local") / "local.db"))
    cache: dict[str, tuple[list, list]] = {}

    def rows_of(config: TrainConfig) -> tuple[list, list]:
        key = config.resolved().key()
        if key not in cache:
            context = ExecutionContext(store=store, data_dir="", data=mnist_cpu)
            [result] = LocalExecutor().run([RunSpec(config)], context)
            cache[key] = stored_rows(store, result.run_id)
        return cache[key]

    return rows_of


def stored_rows(store, run_id: int) -> tuple[list, list]:
    with store.session() as session:
        steps = session.scalars(select(Step).where(Step.run_id == run_id).order_by(Step.step))
        evals = session.scalars(select(Eval).where(Eval.run_id == run_id).order_by(Eval.epoch))
        step_rows = [(s.step, s.epoch, s.loss) for s in steps]
        eval_rows = [(e.epoch, e.step, e.train_loss, e.test_loss, e.test_accuracy) for e in evals]
    return step_rows, eval_rows


def stored_runs(store) -> list[Run]:
    with store.session() as session:
        return list(session.scalars(select(Run).order_by(Run.id)))


def assert_same_numbers(actual: tuple[list, list], expected: tuple[list, list]) -> None:
    steps, evals = actual
    expected_steps, expected_evals = expected
    assert [row[:2] for row in steps] == [row[:2] for row in expected_steps]
    assert [row[2] for row in steps] == pytest.approx(
        [row[2] for row in expected_steps], abs=TOLERANCE, rel=0
    )
    assert [row[:2] for row in evals] == [row[:2] for row in expected_evals]
    assert [row[2:] for row in evals] == [
        pytest.approx(row[2:], abs=TOLERANCE, rel=0) for row in expected_evals
    ]


@pytest.fixture
def driver_watch(monkeypatch):
    """Record every MNIST load and CUDA initialisation attempted in this (driver) process."""
    calls: dict[str, list] = {"load_mnist": [], "cuda_init": [], "replay": []}

    def no_load(*args, **kwargs):
        calls["load_mnist"].append((args, kwargs))
        raise AssertionError("the Ray driver loaded MNIST")

    def no_cuda(*args, **kwargs):
        calls["cuda_init"].append(args)
        raise AssertionError("the Ray driver initialised CUDA")

    original_replay = MemorySink.replay

    def replay(self, store, run_id=None):
        calls["replay"].append(run_id)
        return original_replay(self, store, run_id)

    for module in (stepcli.data, stepcli.options, stepcli.executors_ray):
        monkeypatch.setattr(module, "load_mnist", no_load)
    monkeypatch.setattr(torch.cuda, "_lazy_init", no_cuda)
    monkeypatch.setattr(MemorySink, "replay", replay)
    return calls


def test_ray_sweep_matches_local(ray_address, store_url, mnist_dir, reference, driver_watch):
    store = open_store(store_url)
    specs = [RunSpec(config, {"kind": "sweep"}) for config in SWEEP]
    executor = make_executor("ray", ExecutorOptions())
    context = ExecutionContext(store=store, data_dir=str(mnist_dir))

    results = executor.run(specs, context)

    assert [r.status for r in results] == ["finished"] * 4
    runs = stored_runs(store)
    assert [run.id for run in runs] == [r.run_id for r in results]
    for run, config in zip(runs, SWEEP, strict=True):
        assert run.status == "finished"
        assert run.config_key == config.resolved().key()
        assert_same_numbers(stored_rows(store, run.id), reference(config))
        assert run.executor == "ray"
        assert run.kind == "sweep"
        assert run.gpus_per_run == 0
        assert run.device == "cpu"
        assert run.host == socket.gethostname()
        # The engine stores the pid of the process that trained: a Ray worker, not the driver.
        assert run.pid != os.getpid()
        assert run.steps_done == 4
    assert driver_watch["load_mnist"] == []
    assert driver_watch["cuda_init"] == []
    assert not torch.cuda.is_initialized()
    # With SQLite only the driver writes, replaying each worker's rows; PostgreSQL workers
    # write their rows themselves.
    replayed = sorted(driver_watch["replay"])
    assert replayed == ([r.run_id for r in results] if store.is_sqlite else [])


def test_killed_worker_retried_rows_once(ray_address, store_url, mnist_dir, reference, crash_file):
    # Flushing every 2 steps puts steps 1-2 in the store before the worker dies at step 3.
    config = tiny("1", 0, lr=1e-3, flush_every=2)
    crash_file.write_text("3\n")
    fired = crash_file.with_name(crash_file.name + ".fired")
    store = open_store(store_url)
    context = ExecutionContext(store=store, data_dir=str(mnist_dir))
    try:
        [result] = RayExecutor().run([RunSpec(config)], context)
    finally:
        crash_file.unlink(missing_ok=True)
        killed_pid = int(fired.read_text()) if fired.exists() else None
        fired.unlink(missing_ok=True)

    assert killed_pid is not None, "no worker reached step 3 and exited"
    assert result.status == "finished"
    [run] = stored_runs(store)
    assert run.status == "finished"
    assert run.pid != killed_pid
    steps, evals = stored_rows(store, run.id)
    assert [row[0] for row in steps] == [1, 2, 3, 4]
    assert [row[0] for row in evals] == [0, 1]
    assert_same_numbers((steps, evals), reference(config))


def test_cli_sweep_on_ray_matches_local(ray_address, store_url, mnist_dir, reference, cli):
    result = cli(
        "sweep",
        "adam",
        "--lrs",
        "0.001,0.003",
        "--seed-list",
        "0,1",
        "--epochs",
        "1",
        "--batch-size",
        "128",
        "--subset-size",
        "500",
        "--allow-cpu",
        "--data-dir",
        str(mnist_dir),
        "--db",
        store_url,
        "--executor",
        "ray",
        "--ray-address",
        ray_address,
        "--format",
        "json",
        timeout=300,
    )

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert "4/4 done" in result.stderr
    store = open_store(store_url)
    runs = stored_runs(store)
    assert len(runs) == 4
    reported = sorted(seed["run_id"] for row in report["rows"] for seed in row["runs"])
    assert reported == [run.id for run in runs]
    for run in runs:
        assert run.status == "finished"
        assert run.executor == "ray"
        assert run.gpus_per_run == 0
        assert run.device == "cpu"
        config = tiny("1", run.seed, lr=run.hparams["lr"])
        assert run.config_key == config.resolved().key()
        assert_same_numbers(stored_rows(store, run.id), reference(config))


WATCHED_DRIVER = """
import atexit, sys, torch, stepcli.data, stepcli.options

def no_load(*args, **kwargs):
    raise AssertionError("the Ray driver loaded MNIST")

stepcli.data.load_mnist = stepcli.options.load_mnist = no_load
atexit.register(lambda: print(f"driver cuda initialised: {torch.cuda.is_initialized()}",
                              file=sys.stderr))
from stepcli.cli import main
main(sys.argv[1:])
"""
"""``stepcli`` with MNIST loading disabled in the driver and CUDA's state printed at exit."""


def test_cli_sweep_starts_local_ray(ray_address, tmp_path, mnist_dir):
    # Without --ray-address the command starts (and stops) a Ray instance of its own.
    db = tmp_path / "results.db"
    args = [
        "sweep",
        "adam",
        "--lrs",
        "0.001",
        "--seed-list",
        "0,1",
        "--epochs",
        "1",
        "--batch-size",
        "128",
        "--subset-size",
        "500",
        "--device",
        "cpu",
        "--data-dir",
        str(mnist_dir),
        "--db",
        str(db),
        "--executor",
        "ray",
    ]
    result = subprocess.run(
        [sys.executable, "-c", WATCHED_DRIVER, *args],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, result.stderr
    assert "starting a local Ray instance" in result.stderr
    assert "2/2 done, 0 in flight" in result.stderr
    assert "driver cuda initialised: False" in result.stderr
    runs = stored_runs(open_store(str(db)))
    assert [run.status for run in runs] == ["finished", "finished"]
    assert [run.executor for run in runs] == ["ray", "ray"]


def test_unreachable_ray_address_fails_fast(tmp_path, mnist_dir, cli):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"

    result = cli(
        "sweep",
        "adam",
        "--lrs",
        "0.001",
        "--seed-list",
        "0",
        "--device",
        "cpu",
        "--data-dir",
        str(mnist_dir),
        "--db",
        str(tmp_path / "results.db"),
        "--executor",
        "ray",
        "--ray-address",
        address,
        timeout=120,
    )

    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: invalid --ray-address {address}: cannot connect")
    assert "ray start --head" in last


def test_gpus_per_run_defaults_and_bounds():
    assert resolve_gpus_per_run(None, ["cpu"]) == 0
    assert resolve_gpus_per_run(None, ["cuda"]) == 1
    assert resolve_gpus_per_run(None, ["cuda:1"]) == 1
    assert resolve_gpus_per_run(0.25, ["cuda"]) == 0.25
    assert resolve_gpus_per_run(2, ["cuda"]) == 2
    for value, device, message in [
        (1.5, "cuda", "fractions only below 1"),
        (-1, "cuda", "must be a finite number >= 0"),
        (float("nan"), "cuda", "must be a finite number >= 0"),
        (0, "cuda", "the runs train on CUDA"),
        (1, "cpu", "the runs train on the CPU"),
    ]:
        with pytest.raises(ConfigError, match=message):
            resolve_gpus_per_run(value, [device])


def test_gpu_request_on_cpu_cluster_rejected(ray_address, tmp_path, mnist_dir):
    store = open_store(str(tmp_path / "results.db"))
    context = ExecutionContext(store=store, data_dir=str(mnist_dir))
    executor = RayExecutor(gpus_per_run=0.5)

    with pytest.raises(ConfigError, match="the Ray cluster has 0 GPUs"):
        executor.run([RunSpec(replace(SWEEP[0], device="cuda"))], context)

    assert stored_runs(store) == []


def run_cli_without(module: str, *args: str) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess in which importing ``module`` fails."""
    code = (
        f"import sys; sys.modules[{module!r}] = None; "
        "from stepcli.cli import main; main(sys.argv[1:])"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120
    )


def test_missing_ray_one_line_exit_2(tmp_path, mnist_dir):
    result = run_cli_without(
        "ray",
        "sweep",
        "adam",
        "--executor",
        "ray",
        "--allow-cpu",
        "--data-dir",
        str(mnist_dir),
        "--db",
        str(tmp_path / "results.db"),
    )

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Ray is not installed" in lines[0]
    assert "pip install 'stepcli[ray]'" in lines[0]
    assert not (tmp_path / "results.db").exists()


def test_missing_psycopg_one_line_exit_1():
    url = "postgresql+psycopg://stepcli:secret-word@127.0.0.1:9/results"

    result = run_cli_without("psycopg", "runs", "--db", url)

    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "pip install 'stepcli[postgres]'" in lines[0]
    assert "secret-word" not in lines[0]


def test_postgres_schema_created_once_concurrently(postgres):
    url = postgres.create_database()
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def open_once() -> None:
        try:
            barrier.wait()
            open_store(url).dispose()
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=open_once) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    store = open_store(url, create=False)
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(Meta)) == 2
        assert session.get(Meta, "schema_version") is not None


def test_postgres_worker_open_creates_nothing(postgres):
    url = postgres.create_database()

    with pytest.raises(StoreError, match="has no stepcli schema"):
        open_store(url, create=False)

    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            assert inspect(connection).get_table_names() == []
    finally:
        engine.dispose()


def test_postgres_nonfinite_and_repeated_rows(postgres):
    store = open_store(postgres.create_database())
    run_id = create_run(
        store,
        setup="1",
        optimizer="adam",
        hparams={"lr": 1e-3},
        config_key="k",
        seed=0,
        hidden=[256],
        network_params=1,
        budget_params=1,
        device="cpu",
        torch_version=torch.__version__,
    )
    rows = [
        {"step": 1, "epoch": 1, "loss": float("nan"), "seconds": 0.1},
        {"step": 2, "epoch": 1, "loss": float("inf"), "seconds": 0.2},
        {"step": 3, "epoch": 1, "loss": float("-inf"), "seconds": 0.3},
        {"step": 4, "epoch": 1, "loss": 0.125, "seconds": 0.4},
    ]

    write_rows(store, run_id, steps=rows)
    write_rows(store, run_id, steps=rows)

    steps, _ = stored_rows(store, run_id)
    assert [row[0] for row in steps] == [1, 2, 3, 4]
    losses = [row[2] for row in steps]
    assert losses[0] != losses[0]
    assert losses[1:] == [float("inf"), float("-inf"), 0.125]


def test_interrupt_cancels_and_marks_interrupted(ray_address, tmp_path, mnist_dir):
    # The first run is short and the others take several epochs. So the others are still queued
    # or running when the first result arrives and the callback raises KeyboardInterrupt.
    specs = [RunSpec(SWEEP[0])] + [RunSpec(replace(config, epochs=4)) for config in SWEEP[1:]]
    store = open_store(str(tmp_path / "results.db"))
    context = ExecutionContext(store=store, data_dir=str(mnist_dir))
    seen = []

    def stop_after_first(spec, result) -> None:
        seen.append(result.run_id)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        RayExecutor().run(specs, context, on_result=stop_after_first)

    runs = stored_runs(store)
    assert len(seen) == 1
    statuses = {run.id: run.status for run in runs}
    assert statuses[seen[0]] == "finished"
    others = [run for run in runs if run.id != seen[0]]
    assert [run.status for run in others] == ["interrupted"] * 3
    for run in others:
        assert run.finished_at is not None
        assert stored_rows(store, run.id) == ([], [])
