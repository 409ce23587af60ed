"""Ray executor: one Ray task per run, on a local Ray instance or a Ray cluster.

The driver (the process that runs ``stepcli sweep``) creates every run row before it submits a
task, so run ids are known up front, and it never loads MNIST or touches CUDA. Each task loads
the data on its own node, resolves its device there and trains one run:

- With an SQLite store only the driver writes. The task trains into a ``MemorySink`` and
  returns it, and the driver replays the rows into the store under the pre-created run id.
- With any other store (PostgreSQL) the task writes its rows straight into the store through a
  ``StoreSink`` on the pre-created run. The task opens the store with ``create=False``, so only
  the driver creates or migrates the schema.

A task whose worker process or node dies is retried up to ``MAX_RETRIES`` times. A retried task
trains its run again from step 1. It first deletes the rows an earlier attempt wrote, so all
rows of a run come from one attempt. Inserts skip rows that already exist, so a repeated batch
is stored once. A Python exception inside a run is not retried: the run is stored as ``failed``
with the error. docs/distributed.md describes running a sweep on a Ray cluster.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy import delete, update
from sqlalchemy.orm import Session

from stepcli import console
from stepcli.config import ConfigError, TrainConfig
from stepcli.data import MNIST, data_dir_from, load_mnist
from stepcli.engine import NullProgress, RunResult, describe_budget, train
from stepcli.executors import (
    AUTO_DEVICE,
    ExecutionContext,
    ExecutorOptions,
    ResultCallback,
    RunSpec,
)
from stepcli.provenance import git_revision, host_name, versions
from stepcli.store import Diagnostic, Eval, Run, Step, Store, create_run, open_store, utcnow
from stepcli.store.session import display_url
from stepcli.store.sink import MemorySink, StoreSink

log = logging.getLogger(__name__)

MAX_RETRIES = 2
"""Times Ray runs a task again after its worker process or node died (not after an exception)."""

CPUS_PER_RUN = 1
"""CPUs Ray reserves for each run; Ray also sets OMP_NUM_THREADS to this in the worker."""

HEARTBEAT_EVERY_S = 60.0
"""Seconds between the driver's heartbeat updates of runs that are still queued or running."""

CONNECT_TIMEOUT_S = 10.0
"""Seconds to wait for a TCP connection to a ``HOST:PORT`` Ray address before giving up."""

CRASH_FILE_ENV = "STEPCLI_RAY_CRASH_FILE"
"""Fault injection for testing retries. When this variable names a file that contains a step
number, the first worker to reach that step renames the file to ``NAME.fired`` and exits at
once with status 1, as a killed worker would. Ray workers read it from their environment."""

INSTALL_HINT = "pip install 'stepcli[ray]'"


def import_ray() -> Any:
    """Return the ``ray`` module; raise ``ConfigError`` with the install command when missing."""
    try:
        import ray
    except ImportError:
        raise ConfigError(
            f"invalid --executor ray: Ray is not installed; run {INSTALL_HINT}"
        ) from None
    return ray


def make_ray_executor(options: ExecutorOptions) -> RayExecutor:
    """Build the executor for ``--executor ray`` from the sweep's executor options."""
    return RayExecutor(address=options.ray_address, gpus_per_run=options.gpus_per_run)


def resolve_gpus_per_run(requested: float | None, devices: Sequence[str]) -> float:
    """Return the GPUs to reserve per run: ``requested``, else 1 for CUDA runs and 0 for CPU.

    Raises ``ConfigError`` for a value Ray cannot schedule or one that contradicts the device.
    """
    uses_cuda = any(device.split(":")[0] == "cuda" for device in devices)
    if requested is None:
        return 1.0 if uses_cuda else 0.0
    if not (math.isfinite(requested) and requested >= 0):
        raise ConfigError(f"invalid --gpus-per-run {requested:g}: must be a finite number >= 0")
    if requested > 1 and not float(requested).is_integer():
        raise ConfigError(
            f"invalid --gpus-per-run {requested:g}: Ray accepts fractions only below 1; "
            "pass a fraction such as 0.25 or a whole number"
        )
    if uses_cuda and requested == 0:
        raise ConfigError(
            "invalid --gpus-per-run 0: the runs train on CUDA; pass a value > 0 or --device cpu"
        )
    if not uses_cuda and requested > 0:
        raise ConfigError(
            f"invalid --gpus-per-run {requested:g}: the runs train on the CPU; "
            "leave it unset or pass --device cuda"
        )
    return float(requested)


@dataclass(frozen=True)
class TaskPayload:
    """Everything a worker needs for one run; sent to the worker with the task."""

    run_id: int
    config: TrainConfig
    run_fields: dict[str, Any]
    data_dir: str
    store_url: str | None
    """The store the worker writes to; ``None`` trains into a ``MemorySink`` for the driver."""


@dataclass
class TaskOutcome:
    """The return value of a task: the result, the rows for the driver, or the error."""

    run_id: int
    host: str
    result: RunResult | None = None
    sink: MemorySink | None = None
    """The run's rows when the driver writes the store, else ``None``."""
    error: str | None = None


class RayExecutor:
    """Runs each spec as one Ray task; see the module documentation for the store contract."""

    name = "ray"
    in_process = False

    def __init__(
        self,
        address: str | None = None,
        gpus_per_run: float | None = None,
        max_retries: int = MAX_RETRIES,
    ) -> None:
        self.ray = import_ray()
        self.address = address
        self.gpus_per_run = gpus_per_run
        self.max_retries = max_retries

    def run(
        self,
        specs: Sequence[RunSpec],
        context: ExecutionContext,
        on_result: ResultCallback | None = None,
    ) -> list[RunResult]:
        """Run every spec as a Ray task; return the results in the order of ``specs``.

        A run whose task failed is returned with status ``failed`` and its error in ``extra``.
        ``KeyboardInterrupt`` cancels the outstanding tasks, stores their runs as
        ``interrupted`` and propagates.
        """
        if not specs:
            return []
        started_ray = self._connect()
        try:
            specs = self._resolve_auto_devices(specs)
            gpus = resolve_gpus_per_run(self.gpus_per_run, [spec.config.device for spec in specs])
            self._check_cluster(gpus)
            return self._run_tasks(specs, context, gpus, on_result)
        finally:
            if started_ray:
                self.ray.shutdown()

    def _connect(self) -> bool:
        """Connect to the cluster unless this process already is; return True if it connected."""
        if self.ray.is_initialized():
            return False
        address = self.address or os.environ.get("RAY_ADDRESS")
        if address:
            console.info(f"ray: connecting to the Ray cluster at {address}")
        else:
            console.info("ray: starting a local Ray instance (pass --ray-address for a cluster)")
        if address:
            _check_reachable(address)
        try:
            self.ray.init(address=self.address, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if not address:
                raise ConfigError(f"cannot start a local Ray instance: {reason}") from None
            raise ConfigError(
                f"invalid --ray-address {address}: cannot connect to Ray ({reason}); "
                "start the head node with 'ray start --head' or pass its address"
            ) from None
        return True

    def _resolve_auto_devices(self, specs: Sequence[RunSpec]) -> list[RunSpec]:
        """Turn the device ``auto`` (``--allow-cpu`` without ``--device``) into cuda or cpu.

        Runs train on CUDA when the cluster has GPUs now, else on the CPU.
        """
        if not any(spec.config.device == AUTO_DEVICE for spec in specs):
            return list(specs)
        device = "cuda" if self.ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
        console.info(f"ray: runs train on {device} (--allow-cpu without --device)")
        return [
            replace(spec, config=replace(spec.config, device=device))
            if spec.config.device == AUTO_DEVICE
            else spec
            for spec in specs
        ]

    def _check_cluster(self, gpus: float) -> None:
        available = self.ray.cluster_resources().get("GPU", 0)
        # NOTE: an autoscaling cluster may add GPU nodes later, but this check counts only the
        # nodes that are up now.
        if gpus > 0 and available < gpus:
            raise ConfigError(
                f"invalid --gpus-per-run {gpus:g}: the Ray cluster has {available:g} GPUs; "
                "add GPU nodes or train on the CPU with --device cpu"
            )

    def _run_tasks(
        self,
        specs: Sequence[RunSpec],
        context: ExecutionContext,
        gpus: float,
        on_result: ResultCallback | None,
    ) -> list[RunResult]:
        store = context.store
        data_dir = str(data_dir_from(context.data_dir or None).absolute())
        store_url = None if store.is_sqlite else store.url
        writer = "the driver" if store_url is None else "the workers"
        console.info(
            f"ray: {len(specs)} runs, {gpus:g} GPUs and {CPUS_PER_RUN} CPU per run, "
            f"store {display_url(store.url)} written by {writer}, data from {data_dir}"
        )
        remote = self.ray.remote(run_task).options(
            num_cpus=CPUS_PER_RUN, num_gpus=gpus, max_retries=self.max_retries
        )
        pending: dict[Any, int] = {}
        """Outstanding task -> index of its spec."""
        run_ids: list[int] = []
        results: list[RunResult | None] = [None] * len(specs)
        progress = SweepProgress(len(specs))

        try:
            for index, spec in enumerate(specs):
                fields = {"executor": self.name, "gpus_per_run": gpus, **spec.run_fields}
                run_id = create_run(store, **placeholder_fields(spec.config, fields))
                run_ids.append(run_id)
                payload = TaskPayload(run_id, spec.config, fields, data_dir, store_url)
                pending[remote.remote(payload)] = index
            progress.start(len(pending))

            last_heartbeat = time.monotonic()
            while pending:
                ready, _ = self.ray.wait(list(pending), num_returns=1, timeout=HEARTBEAT_EVERY_S)
                if time.monotonic() - last_heartbeat >= HEARTBEAT_EVERY_S:
                    _touch_runs(store, [run_ids[i] for i in pending.values()])
                    last_heartbeat = time.monotonic()
                for ref in ready:
                    index = pending.pop(ref)
                    result, host = self._collect(ref, specs[index], run_ids[index], store)
                    results[index] = result
                    progress.advance(result, host, len(pending))
                    if on_result is not None:
                        on_result(specs[index], result)
        except BaseException as exc:
            progress.stop()
            outstanding = [run_ids[i] for i in pending.values()]
            if isinstance(exc, KeyboardInterrupt):
                self._cancel(pending, outstanding, store, "interrupted", None)
            else:
                error = f"the sweep driver stopped: {type(exc).__name__}: {exc}"
                self._cancel(pending, outstanding, store, "failed", error)
            raise
        finally:
            progress.stop()
        return [result for result in results if result is not None]

    def _collect(
        self, ref: Any, spec: RunSpec, run_id: int, store: Store
    ) -> tuple[RunResult, str | None]:
        """Fetch one task's outcome, write what the driver must write and return the result."""
        try:
            outcome: TaskOutcome = self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            error = f"Ray task failed after up to {self.max_retries} retries: {reason}"
            log.error("run %d: %s", run_id, error)
            _mark_running(store, [run_id], "failed", error)
            return _failed_result(spec.config, run_id, error), None
        if outcome.sink is not None:
            outcome.sink.replay(store, run_id)
        if outcome.result is not None:
            return outcome.result, outcome.host
        log.error("run %d failed on %s: %s", run_id, outcome.host, outcome.error)
        # A run that failed before the engine stored a status (missing data on the node, say)
        # is still "running" in the store.
        _mark_running(store, [run_id], "failed", outcome.error)
        return _failed_result(spec.config, run_id, outcome.error), outcome.host

    def _cancel(
        self,
        pending: dict[Any, int],
        run_ids: list[int],
        store: Store,
        status: str,
        error: str | None,
    ) -> None:
        # ray.cancel raises KeyboardInterrupt in a running task, so a worker that writes the
        # store stores its run as interrupted with its rows. Queued tasks never start.
        for ref in pending:
            self.ray.cancel(ref)
        count = _mark_running(store, run_ids, status, error)
        console.info(f"ray: cancelled {len(pending)} tasks, {count} runs stored as {status}")


def _check_reachable(address: str) -> None:
    """Raise ``ConfigError`` when nothing accepts TCP connections at a ``HOST:PORT`` address.

    Ray 2.60 itself kept retrying an unreachable address for over 3 minutes in a trial. ``auto``
    and ``ray://`` addresses are left to Ray.
    """
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
        raise ConfigError(
            f"invalid --ray-address {address}: cannot connect ({reason}); start the head node "
            "with 'ray start --head' there, or pass the address it printed"
        ) from None


def placeholder_fields(config: TrainConfig, fields: dict[str, Any]) -> dict[str, Any]:
    """Return the columns of a run row created by the driver before its task starts.

    When the engine starts the run, the worker overwrites the columns that depend on where and
    how it trains (device, host, pid, kernel, budget). Nothing here builds a model or touches
    CUDA.
    """
    config = config.resolved()
    spec = config.spec
    hidden, budget = describe_budget(spec, config.hidden)
    return {
        "setup": spec.name,
        "optimizer": spec.optimizer if not spec.learned else f"learned-{spec.trace}",
        "hparams": config.record(),
        "config_key": config.key(),
        "seed": config.seed,
        "hidden": list(hidden),
        "network_params": budget.network,
        "step_size_params": budget.step_sizes,
        "decay_params": budget.decays,
        "budget_params": budget.total,
        "auxiliary_state": budget.auxiliary,
        "device": config.device,
        "git_revision": git_revision(),
        "host": host_name(),
        "pid": os.getpid(),
        **versions(),
        **fields,
    }


def _failed_result(config: TrainConfig, run_id: int, error: str | None) -> RunResult:
    config = config.resolved()
    return RunResult(
        run_id,
        config.spec.name,
        config.seed,
        "failed",
        0,
        config.optimizer_hparams(),
        extra={"error": error},
    )


def _mark_running(store: Store, run_ids: list[int], status: str, error: str | None) -> int:
    """Set ``status`` on those of ``run_ids`` still ``running``; return how many changed."""
    if not run_ids:
        return 0
    now = utcnow()

    def work(session: Session) -> int:
        values: dict[str, Any] = {"status": status, "finished_at": now, "heartbeat_at": now}
        if error is not None:
            values["error"] = error
        changed = session.execute(
            update(Run).where(Run.id.in_(run_ids), Run.status == "running").values(**values)
        )
        return changed.rowcount

    return store.write(work)


def _touch_runs(store: Store, run_ids: list[int]) -> None:
    # Keeps queued runs from looking stale to other stepcli processes while the driver lives.
    now = utcnow()

    def work(session: Session) -> None:
        session.execute(
            update(Run).where(Run.id.in_(run_ids), Run.status == "running").values(heartbeat_at=now)
        )

    store.write(work)


class SweepProgress:
    """Runs done and in flight: a Rich bar on a terminal stderr, one line per run otherwise.

    "In flight" counts submitted tasks that have not returned, running or queued in Ray.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.enabled = console.state["verbosity"] > console.Verbosity.QUIET
        self._bar: Any = None
        self._task: Any = None

    def start(self, in_flight: int) -> None:
        if not self.enabled:
            return
        if console.stderr.is_terminal:
            self._bar = Progress(
                TextColumn("runs"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[in_flight]} in flight"),
                TimeElapsedColumn(),
                console=console.stderr,
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task("runs", total=self.total, in_flight=in_flight)
        else:
            console.info(f"ray: {self.total} runs submitted, {in_flight} in flight")

    def advance(self, result: RunResult, host: str | None, in_flight: int) -> None:
        self.done += 1
        if not self.enabled:
            return
        where = f" on {host}" if host else ""
        line = (
            f"ray: run {result.run_id} (setup {result.setup} seed {result.seed}) "
            f"{result.status}{where}; {self.done}/{self.total} done, {in_flight} in flight"
        )
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, in_flight=in_flight)
            self._bar.console.print(line, markup=False, highlight=False)
        else:
            console.info(line)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


# Worker side: everything below runs inside a Ray task.

_worker_data: dict[tuple[str, str], MNIST] = {}
_worker_stores: dict[str, Store] = {}


def run_task(payload: TaskPayload) -> TaskOutcome:
    """Train one run in a Ray worker and return its outcome; the body of every task."""
    host = host_name()
    sink: MemorySink | StoreSink | None = None
    try:
        device = worker_device(payload.config.device)
        config = replace(payload.config, device=device)
        if payload.store_url is None:
            sink = MemorySink(run_id=payload.run_id)
        else:
            sink = AttemptSink(_worker_store(payload.store_url), payload.run_id)
        data = _worker_data_on(payload.data_dir, device)
        result = train(config, sink, data, progress=WorkerProgress(), run_fields=payload.run_fields)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        log.error("run %d failed on %s: %s", payload.run_id, host, error)
        memory = sink if isinstance(sink, MemorySink) else None
        return TaskOutcome(payload.run_id, host, sink=memory, error=error)
    memory = sink if isinstance(sink, MemorySink) else None
    return TaskOutcome(payload.run_id, host, result=result, sink=memory)


def worker_device(requested: str) -> str:
    """Return the device this worker trains on for a run that requested ``requested``.

    Ray sets ``CUDA_VISIBLE_DEVICES`` to the GPUs it assigned to the task, so a CUDA run uses
    ``cuda`` (the first visible GPU) whatever index the driver named.
    """
    if requested.split(":")[0] != "cuda":
        return requested
    import torch

    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        raise RuntimeError(
            f"the run requests CUDA but this Ray worker on {host_name()} has no visible GPU "
            f"(CUDA_VISIBLE_DEVICES={visible}); pass --gpus-per-run > 0 or --device cpu"
        )
    return "cuda"


def _worker_data_on(data_dir: str, device: str) -> MNIST:
    # A Ray worker process runs many tasks one after another, so it loads MNIST once per device.
    key = (data_dir, device)
    if key not in _worker_data:
        _worker_data[key] = load_mnist(Path(data_dir), download=False, device=device)
    return _worker_data[key]


def _worker_store(url: str) -> Store:
    if url not in _worker_stores:
        _worker_stores[url] = open_store(url, create=False, mark_stale=False)
    return _worker_stores[url]


class AttemptSink(StoreSink):
    """A ``StoreSink`` on a pre-created run that first deletes rows of an earlier attempt."""

    def create_run(self, **fields: Any) -> int:
        run_id = self.run_id

        def work(session: Session) -> None:
            for model in (Step, Eval, Diagnostic):
                session.execute(delete(model).where(model.run_id == run_id))

        self.store.write(work)
        return super().create_run(**fields)


class WorkerProgress(NullProgress):
    """Reports nothing, but exits the worker at the step named in the ``CRASH_FILE_ENV`` file."""

    def __init__(self) -> None:
        path = os.environ.get(CRASH_FILE_ENV)
        self.crash_file = Path(path) if path else None

    def advance(self, step: int) -> None:
        if self.crash_file is not None:
            _crash_if_due(self.crash_file, step)


def _crash_if_due(path: Path, step: int) -> None:
    try:
        due = int(path.read_text().strip())
    except (OSError, ValueError):
        return
    if step != due:
        return
    fired = path.with_name(path.name + ".fired")
    try:
        # The rename is atomic, so exactly one worker claims the crash.
        os.rename(path, fired)
    except OSError:
        return
    fired.write_text(f"{os.getpid()}\n")
    sys.stderr.write(f"stepcli: exiting worker {os.getpid()} at step {step} ({CRASH_FILE_ENV})\n")
    sys.stderr.flush()
    os._exit(1)
