"""Executors: run a list of run specifications and hand back their results.

The engine does not depend on executors. A sweep builds ``RunSpec`` objects and passes them to an
executor; ``LocalExecutor`` trains them one after another in this process. Another executor
(Ray, say) only has to honour the same ``run`` contract and add a factory to ``EXECUTORS`` with
``register_executor``; ``stepcli sweep --executor NAME`` then builds it through ``make_executor``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from stepcli import console
from stepcli.config import ConfigError, TrainConfig
from stepcli.data import MNIST
from stepcli.engine import RunResult, train
from stepcli.store import Store

AUTO_DEVICE = "auto"
"""Device of a run that trains elsewhere under ``--allow-cpu`` without ``--device``: the executor
picks CUDA where the workers have GPUs and the CPU otherwise."""


@dataclass(frozen=True)
class RunSpec:
    """One run to execute: its full config and the run columns the caller sets."""

    config: TrainConfig
    run_fields: dict[str, Any] = field(default_factory=dict)
    """Extra ``runs`` columns, such as ``kind``, ``sweep_id``, ``executor``."""


@dataclass
class ExecutionContext:
    """Data and store access that an executor needs."""

    store: Store
    data_dir: str
    data: MNIST | None = None
    """Data already loaded on the training device, for executors that run in this process."""


ResultCallback = Callable[[RunSpec, RunResult], None]


class Executor(Protocol):
    name: str
    in_process: bool
    """True when runs train in this process on ``ExecutionContext.data``, which must be loaded
    on the training device; False when the executor loads the data where the runs train."""

    def run(
        self,
        specs: Sequence[RunSpec],
        context: ExecutionContext,
        on_result: ResultCallback | None = None,
    ) -> list[RunResult]:
        """Run every spec; return the results in the order of ``specs``.

        ``KeyboardInterrupt`` stops the remaining runs; the run in progress is stored as
        ``interrupted`` and the exception propagates.
        """
        ...


class LocalExecutor:
    """Trains each spec in turn in this process, on ``context.data``."""

    name = "local"
    in_process = True

    def __init__(self, gpus_per_run: float | None = None) -> None:
        self.gpus_per_run = gpus_per_run
        """Stored in each run's ``gpus_per_run`` column when set; the runs still go one by one."""

    def run(
        self,
        specs: Sequence[RunSpec],
        context: ExecutionContext,
        on_result: ResultCallback | None = None,
    ) -> list[RunResult]:
        if context.data is None:
            raise ValueError("LocalExecutor needs the data loaded in ExecutionContext.data")
        executor_fields: dict[str, Any] = {"executor": self.name}
        if self.gpus_per_run is not None:
            executor_fields["gpus_per_run"] = self.gpus_per_run
        results = []
        for spec in specs:
            fields = {**executor_fields, **spec.run_fields}
            result = train(
                spec.config,
                context.store,
                context.data,
                progress=console.RichProgress(),
                run_fields=fields,
            )
            results.append(result)
            if on_result is not None:
                on_result(spec, result)
        return results


@dataclass(frozen=True)
class ExecutorOptions:
    """Executor-specific command-line options; each executor reads the ones it understands."""

    ray_address: str | None = None
    """Address of a Ray cluster (``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``)."""
    gpus_per_run: float | None = None
    """GPUs reserved for each run; fractions share a GPU between runs."""


ExecutorFactory = Callable[[ExecutorOptions], Executor]


def _make_local(options: ExecutorOptions) -> Executor:
    # Local runs go one at a time in this process, so a Ray address has nothing to configure.
    return LocalExecutor(gpus_per_run=options.gpus_per_run)


def _make_ray(options: ExecutorOptions) -> Executor:
    # Imported on use, so that only --executor ray loads the Ray executor module.
    from stepcli.executors_ray import make_ray_executor

    return make_ray_executor(options)


EXECUTORS: dict[str, ExecutorFactory] = {"local": _make_local, "ray": _make_ray}
"""Executor name (the value of ``--executor``) -> the factory that builds it."""


def register_executor(name: str, factory: ExecutorFactory) -> None:
    """Make ``factory`` available as ``--executor NAME``; a second registration replaces it."""
    EXECUTORS[name] = factory


def make_executor(name: str, options: ExecutorOptions | None = None) -> Executor:
    """Build the executor called ``name``; raise ``ConfigError`` naming the known ones otherwise."""
    factory = EXECUTORS.get(name)
    if factory is None:
        raise ConfigError(f"invalid --executor {name!r}: choose one of {', '.join(EXECUTORS)}")
    return factory(options or ExecutorOptions())
