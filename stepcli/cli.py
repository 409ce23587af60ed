"""The ``stepcli`` command line: thin commands over the engine, the store and the report."""

from __future__ import annotations

import logging
import signal
import sys
from dataclasses import replace
from typing import Annotated, Any

import torch
import typer

try:  # Typer 0.2x ships its own copy of Click; older releases use Click itself.
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - depends on the installed Typer
    from click.exceptions import UsageError

from stepcli import __version__, console
from stepcli.config import ConfigError, TrainConfig
from stepcli.data import DataError, balanced_subset
from stepcli.options import (
    AllowCpu,
    AlphaMax,
    AlphaMin,
    BatchSize,
    Compile,
    Curvature,
    CurvatureEvery,
    DataDir,
    Db,
    Device,
    Epochs,
    Gamma,
    Hidden,
    OutputFormat,
    Quiet,
    SubsetSize,
    Verbose,
    check_format,
    load_data,
    open_db,
    open_existing_db,
    parse_setups,
    print_budget_table,
    resolve_device,
)
from stepcli.runner import run_configs, train_configs
from stepcli.store import RUN_STATUSES, StoreError, check_store_location
from stepcli.store.queries import list_runs
from stepcli.tables import print_rows

log = logging.getLogger(__name__)

app = typer.Typer(
    name="stepcli",
    help="Learned per-weight step sizes against a tuned Adam on MNIST.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        console.stdout.print(f"stepcli {__version__}", markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    if verbose and quiet:
        raise ConfigError("invalid options -v and -q together: choose one")
    level = console.Verbosity.VERBOSE if verbose else console.Verbosity.NORMAL
    console.configure_logging(console.Verbosity.QUIET if quiet else level)


@app.command()
def train(
    setup: Annotated[
        str,
        typer.Option(
            help="Setup to train: 1-6, 'all' for 1-6, or a control name (see docs/cli.md)."
        ),
    ] = "1",
    lr: Annotated[
        float | None, typer.Option(help="Learning rate of the Adam and SGD setups.")
    ] = None,
    alpha0: Annotated[
        float | None, typer.Option(help="Initial per-weight step size of the learned setups.")
    ] = None,
    meta_lr: Annotated[
        float | None, typer.Option(help="Meta step size mu: change of each log step size per step.")
    ] = None,
    alpha_min: AlphaMin = 1e-6,
    alpha_max: AlphaMax = 3.0,
    gamma: Gamma = 0.99,
    curvature_every: CurvatureEvery = 10,
    curvature: Curvature = "hessian",
    epochs: Epochs = 6,
    batch_size: BatchSize = 256,
    subset_size: SubsetSize = 12_000,
    seed: Annotated[
        int, typer.Option(help="Seed of weights, subset, batch order and sampling.")
    ] = 0,
    hidden: Hidden = "256",
    compile: Compile = False,
    allow_cpu: AllowCpu = False,
    device: Device = None,
    data_dir: DataDir = None,
    db: Db = "results.db",
    output: OutputFormat = "table",
) -> None:
    """Train one setup (or all six) and store every step in the results store."""
    check_format(output)
    names = parse_setups(setup)
    base = TrainConfig(
        setup=names[0],
        seed=seed,
        epochs=epochs,
        batch_size=batch_size,
        subset_size=subset_size,
        hidden=_parse_hidden(hidden),
        lr=lr,
        alpha0=alpha0,
        meta_lr=meta_lr,
        alpha_min=alpha_min,
        alpha_max=alpha_max,
        gamma=gamma,
        curvature_every=curvature_every,
        curvature=curvature,
        compile=compile,
    )
    base.validate()
    torch_device = resolve_device(device, allow_cpu)
    check_store_location(db)
    data = load_data(data_dir, torch_device)
    store = open_db(db)
    base = check_subset(base, data)
    print_budget_table(names, base.hidden)

    base = replace(base, device=str(torch_device))
    configs = train_configs(store, names, base)
    results = run_configs(store, data, configs)
    _print_results(results, output)


@app.command()
def runs(
    db: Db = "results.db",
    output: OutputFormat = "table",
    setup: Annotated[str | None, typer.Option(help="Only runs of this setup.")] = None,
    status: Annotated[str | None, typer.Option(help="Only runs with this status.")] = None,
) -> None:
    """List the stored runs, one row each."""
    check_format(output)
    if setup is not None:
        names = parse_setups(setup)
        if len(names) != 1:
            raise ConfigError(f"invalid --setup {setup!r}: give one setup, such as 1 or sgd")
        setup = names[0]
    if status is not None and status not in RUN_STATUSES:
        raise ConfigError(f"invalid --status {status!r}: choose one of {', '.join(RUN_STATUSES)}")
    store = open_existing_db(db)
    rows = list_runs(store, setup=setup, status=status)
    print_rows(rows, output, title="runs")


def _parse_hidden(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(
            f"invalid --hidden {text!r}: give comma-separated integers such as 256 or 512,256"
        ) from None
    if not widths:
        raise ConfigError(f"invalid --hidden {text!r}: give at least one width")
    return widths


def check_subset(config: TrainConfig, data: Any) -> TrainConfig:
    """Return ``config`` with the whole training set as ``subset_size=None`` when asked for.

    Raise ``ConfigError`` when the subset and validation split cannot be drawn.
    """
    available = data.train_labels.shape[0]
    size = config.subset_size
    if size is None or (size == available and not config.val_size):
        return replace(config, subset_size=None)
    if size + config.val_size > available:
        raise ConfigError(
            f"invalid --subset-size {size}: the training set has {available} images"
            + (f" and --val-size takes {config.val_size}" if config.val_size else "")
            + f"; pass a smaller value, or {available} for the whole training set"
        )
    try:
        balanced_subset(data.train_labels.cpu(), size, config.seed)
    except ValueError as exc:
        raise ConfigError(
            f"invalid --subset-size {size}: {exc}, or {available} for the whole training set"
        ) from None
    return config


def _print_results(results: list[Any], output: str) -> None:
    rows = [
        {
            "run": r.run_id,
            "setup": r.setup,
            "seed": r.seed,
            "status": r.status,
            "steps": r.steps,
            "final_train_loss": r.final_train_loss,
            "test_accuracy": r.test_accuracy,
            "train_seconds": r.train_seconds,
            **({"diverged_step": r.diverged_step} if r.diverged_step is not None else {}),
        }
        for r in results
    ]
    print_rows(rows, output, title="summary")


_INTERRUPTED = "interrupted: a run in progress, if any, is stored as 'interrupted' with its rows"


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _install_signal_handlers() -> None:
    """Make SIGTERM, and SIGHUP unless it is ignored (nohup), stop a run as Ctrl-C does."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) == signal.SIG_DFL:
        signal.signal(signal.SIGHUP, _on_sigterm)


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError | torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def _first_line(exc: BaseException, limit: int = 300) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _exit_interrupted() -> None:
    console.error(_INTERRUPTED)
    sys.exit(130)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; turn known errors into one-line messages and exit codes."""
    _install_signal_handlers()
    try:
        code = app(args=argv, standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        console.error("interrupted")
        sys.exit(130)
    except UsageError as exc:
        hint = f"; see '{exc.ctx.command_path} --help'" if exc.ctx is not None else ""
        console.error(f"{exc.format_message()}{hint}")
        sys.exit(2)
    except ConfigError as exc:
        console.error(str(exc))
        sys.exit(2)
    except (DataError, StoreError) as exc:
        console.error(str(exc))
        sys.exit(1)
    except KeyboardInterrupt:
        _exit_interrupted()
    except BrokenPipeError:
        sys.exit(1)
    except Exception as exc:
        # The last resort: a one-line message instead of a traceback. A run in progress is
        # already stored as failed with this error. -v prints the traceback.
        log.debug("traceback of the error below", exc_info=exc)
        if _is_out_of_memory(exc):
            console.error(
                f"out of memory: {_first_line(exc)}; use a smaller --hidden or --batch-size"
            )
        else:
            console.error(
                f"unexpected {type(exc).__name__}: {_first_line(exc)}; "
                "rerun with -v to print the traceback"
            )
        sys.exit(1)
    # Typer 0.29 returns the code of a typer.Exit, and 130 after Ctrl-C, instead of raising.
    if code == 130:
        _exit_interrupted()
    if isinstance(code, int) and code != 0:
        sys.exit(code)


import stepcli.cli_experiment  # noqa: E402,F401
import stepcli.cli_report  # noqa: E402,F401
import stepcli.cli_sweep  # noqa: E402,F401  registers "sweep"

if __name__ == "__main__":
    main()
