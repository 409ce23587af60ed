"""Executors: run a list of run specifications and hand back their results.

The engine knows nothing of executors. A sweep builds ``RunSpec`` objects and passes them to an
executor; ``LocalExecutor`` trains them one after another in this process. Another executor
(Ray, say) only has to honour the same ``run`` contract.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from stepcli import console
from stepcli.config import TrainConfig
from stepcli.data import MNIST
from stepcli.engine import RunResult, train
from stepcli.store import Store


@dataclass(frozen=True)
class RunSpec:
    """One run to execute: its full config and the run columns the caller sets."""

    config: TrainConfig
    run_fields: dict[str, Any] = field(default_factory=dict)
    """Extra ``runs`` columns, such as ``kind``, ``sweep_id``, ``executor``."""


@dataclass
class ExecutionContext:
    """What an executor needs to reach the data and the store."""

    store: Store
    data_dir: str
    data: MNIST | None = None
    """Data already loaded on the training device, for executors that run in this process."""


ResultCallback = Callable[[RunSpec, RunResult], None]


class Executor(Protocol):
    name: str

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

    def run(
        self,
        specs: Sequence[RunSpec],
        context: ExecutionContext,
        on_result: ResultCallback | None = None,
    ) -> list[RunResult]:
        if context.data is None:
            raise ValueError("LocalExecutor needs the data loaded in ExecutionContext.data")
        results = []
        for spec in specs:
            fields = {"executor": self.name, **spec.run_fields}
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
