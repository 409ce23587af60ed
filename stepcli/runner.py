"""Choosing each run's hyperparameters and running a list of runs in this process."""

from __future__ import annotations

import logging
from dataclasses import replace

from stepcli import console
from stepcli.config import TrainConfig
from stepcli.data import MNIST
from stepcli.engine import RunResult
from stepcli.executors import ExecutionContext, LocalExecutor, RunSpec
from stepcli.setups import get_setup
from stepcli.store import Store
from stepcli.store.queries import latest_sweep

log = logging.getLogger(__name__)

TUNED_KEYS = ("lr", "alpha0", "meta_lr")


def train_configs(store: Store, names: list[str], base: TrainConfig) -> list[TrainConfig]:
    """Return one config per setup in ``names``.

    A hyperparameter set on ``base`` (an explicit flag) wins. Otherwise the best configuration
    of the latest finished sweep of that setup is used, else the setup's documented default.
    Each choice is printed on stderr.
    """
    configs = []
    for name in names:
        spec = get_setup(name)
        tuned = [key for key in TUNED_KEYS if key in spec.defaults]
        explicit = {key: getattr(base, key) for key in tuned if getattr(base, key) is not None}
        values = dict(explicit)
        missing = [key for key in tuned if key not in explicit]
        sweep = latest_sweep(store, spec.name) if missing else None
        if sweep is not None:
            chosen = {key: sweep.best_config[key] for key in missing if key in sweep.best_config}
            values.update(chosen)
            console.info(f"setup {name}: {_fmt(chosen)} from sweep {sweep.id} ({sweep.criterion})")
        elif missing:
            chosen = {key: spec.defaults[key] for key in missing}
            values.update(chosen)
            console.info(
                f"setup {name}: no finished sweep in the store, using defaults {_fmt(chosen)}"
            )
        if explicit:
            console.info(f"setup {name}: {_fmt(explicit)} from the command line")
        configs.append(replace(base, setup=name, **values))
    return configs


def run_configs(store: Store, data: MNIST, configs: list[TrainConfig]) -> list[RunResult]:
    """Train each config in turn in this process, with a progress bar."""
    context = ExecutionContext(store=store, data_dir="", data=data)
    return LocalExecutor().run([RunSpec(config) for config in configs], context)


def _fmt(values: dict) -> str:
    return ", ".join(
        f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
        for key, value in values.items()
    )
