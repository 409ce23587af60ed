"""The ``stepcli sweep`` command: tune one setup over a grid and seeds, then rank the grid."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Annotated

import torch
import typer

from stepcli import console
from stepcli.cli import _parse_hidden, app, check_subset
from stepcli.config import ConfigError, TrainConfig
from stepcli.data import data_dir_from
from stepcli.executors import AUTO_DEVICE, ExecutionContext, ExecutorOptions, make_executor
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
    SubsetSize,
    load_data,
    open_db,
    resolve_device,
)
from stepcli.store import check_store_location
from stepcli.sweep import (
    AXIS_OPTIONS,
    CRITERIA,
    DEFAULT_VAL_SIZE,
    SweepPlan,
    SweepReport,
    build_grid,
    execute_sweep,
    open_sweep,
    parse_seeds,
    parse_values,
    pending_runs,
    report_payload,
    resolve_target,
)
from stepcli.tables import format_cell, print_rows

SWEEP_FORMATS = ("table", "json")


@app.command("sweep")
def sweep_command(
    target: Annotated[
        str,
        typer.Argument(
            help="Setup to tune: adam (setup 1), setup-2 … setup-6 (or 1-6), or a control "
            "such as sgd, adam-half or 3-mu0.",
            show_default=False,
        ),
    ],
    lrs: Annotated[
        str | None,
        typer.Option(help="Learning rates to try, comma-separated; default: the setup's grid."),
    ] = None,
    alpha0s: Annotated[
        str | None,
        typer.Option(help="Initial step sizes alpha0 to try, comma-separated; default: the grid."),
    ] = None,
    meta_lrs: Annotated[
        str | None,
        typer.Option(help="Meta step sizes mu to try, comma-separated; default: the grid."),
    ] = None,
    seeds: Annotated[
        int | None,
        typer.Option(help="Number of tuning seeds, 0 … N-1 (default 2).", show_default=False),
    ] = None,
    seed_list: Annotated[
        str | None, typer.Option(help="Tuning seeds, comma-separated, in place of --seeds.")
    ] = None,
    select_by: Annotated[
        str,
        typer.Option(
            help="Selection criterion, averaged over seeds: train-loss (mean minibatch loss of "
            "the final epoch) or val-loss (loss on a split held out of the training set)."
        ),
    ] = "train-loss",
    val_size: Annotated[
        int | None,
        typer.Option(
            help=f"Images in the validation split; default: {DEFAULT_VAL_SIZE} with "
            "--select-by val-loss, else none.",
            show_default=False,
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Train every run again, even those already stored.")
    ] = False,
    executor: Annotated[
        str, typer.Option(help="Where the runs train; 'local' trains them one by one here.")
    ] = "local",
    ray_address: Annotated[
        str | None,
        typer.Option(help="Ray cluster address for a Ray executor; ignored by local."),
    ] = None,
    gpus_per_run: Annotated[
        float | None,
        typer.Option(help="GPUs reserved per run (fractions allowed); stored with each run."),
    ] = None,
    epochs: Epochs = 6,
    batch_size: BatchSize = 256,
    subset_size: SubsetSize = 12_000,
    hidden: Hidden = "256",
    alpha_min: AlphaMin = 1e-6,
    alpha_max: AlphaMax = 3.0,
    gamma: Gamma = 0.99,
    curvature_every: CurvatureEvery = 10,
    curvature: Curvature = "hessian",
    compile: Compile = False,
    allow_cpu: AllowCpu = False,
    device: Device = None,
    data_dir: DataDir = None,
    db: Db = "results.db",
    output: Annotated[
        str, typer.Option("--format", help="Output format of the result: table or json.")
    ] = "table",
) -> None:
    """Tune one setup over a grid and seeds, store every run, and select the best configuration.

    Stored runs with the same settings and code revision are skipped, so a rerun resumes.
    """
    if output not in SWEEP_FORMATS:
        raise ConfigError(f"invalid --format {output!r}: choose one of {', '.join(SWEEP_FORMATS)}")
    spec = resolve_target(target)
    options = _executor_options(ray_address, gpus_per_run)
    runner = make_executor(executor, options)
    if select_by not in CRITERIA:
        raise ConfigError(f"invalid --select-by {select_by!r}: choose one of {', '.join(CRITERIA)}")
    if val_size is None:
        val_size = DEFAULT_VAL_SIZE if select_by == "val-loss" else 0
    overrides = {
        "lr": parse_values("--lrs", lrs) if lrs is not None else None,
        "alpha0": parse_values("--alpha0s", alpha0s) if alpha0s is not None else None,
        "meta_lr": parse_values("--meta-lrs", meta_lrs) if meta_lrs is not None else None,
    }
    grid = build_grid(spec, overrides, alpha_min=alpha_min, alpha_max=alpha_max)
    base = TrainConfig(
        setup=spec.name,
        epochs=epochs,
        batch_size=batch_size,
        subset_size=subset_size,
        val_size=val_size,
        hidden=_parse_hidden(hidden),
        alpha_min=alpha_min,
        alpha_max=alpha_max,
        gamma=gamma,
        curvature_every=curvature_every,
        curvature=curvature,
        compile=compile,
    )
    plan = SweepPlan(spec.name, grid, parse_seeds(seeds, seed_list), select_by, base)
    plan.validate()

    data = None
    if runner.in_process:
        torch_device = resolve_device(device, allow_cpu)
        check_store_location(db)
        data = load_data(data_dir, torch_device)
        store = open_db(db)
        base = replace(check_subset(base, data), device=str(torch_device))
    else:
        # The runs train elsewhere: the data folder and the device are resolved there.
        # NOTE: a --subset-size that the data cannot supply therefore fails in each run.
        base = replace(base, device=_remote_device(device, allow_cpu))
        store = open_db(db)
    plan = replace(plan, base=base)

    sweep = open_sweep(store, plan)
    pending = pending_runs(store, plan, sweep.id, force=force)
    done = "0 skipped (--force)" if force else f"{pending.done} already done"
    console.info(f"sweep {sweep.id}: {pending.total} runs, {done}, {len(pending.specs)} to run")

    # An absolute path, because Ray workers, for one, start in another working folder.
    folder = data_dir_from(data_dir).expanduser().absolute()
    context = ExecutionContext(store=store, data_dir=str(folder), data=data)
    finished = 0

    def on_result(run_spec, result) -> None:
        nonlocal finished
        finished += 1
        console.info(
            f"sweep {sweep.id}: {finished} of {len(pending.specs)} runs done "
            f"(run {result.run_id} {result.status})"
        )

    try:
        report = execute_sweep(store, plan, sweep.id, pending, runner, context, on_result)
    except KeyboardInterrupt:
        console.error(
            f"sweep {sweep.id} interrupted: its finished runs are stored; "
            "run the same command again to resume"
        )
        raise

    _print_report(report, output)
    for warning in report.warnings:
        console.stderr.print(f"warning: {warning}", markup=False, highlight=False)
    if report.best is None:
        console.error(_no_best_message(report))
        raise typer.Exit(1)
    console.info(
        f"sweep {report.sweep_id}: selected {_format_point(report.best.point)} "
        f"({report.criterion} {report.best.mean:.4g}); "
        f"'stepcli train --setup {report.target}' uses it"
    )


def _executor_options(ray_address: str | None, gpus_per_run: float | None) -> ExecutorOptions:
    if ray_address is not None and (
        not ray_address.strip() or any(c.isspace() for c in ray_address)
    ):
        raise ConfigError(
            f"invalid --ray-address {ray_address!r}: give auto, HOST:PORT or ray://HOST:PORT"
        )
    if gpus_per_run is not None and not (math.isfinite(gpus_per_run) and gpus_per_run > 0):
        raise ConfigError(f"invalid --gpus-per-run {gpus_per_run}: must be a finite number > 0")
    return ExecutorOptions(ray_address=ray_address, gpus_per_run=gpus_per_run)


def _remote_device(device: str | None, allow_cpu: bool = False) -> str:
    """Return the device that remote runs request.

    That is ``--device`` when given, else ``cuda``, or ``auto`` (the executor chooses) with
    ``--allow-cpu``.
    """
    if device is None:
        return AUTO_DEVICE if allow_cpu else "cuda"
    try:
        torch.device(device)
    except RuntimeError:
        raise ConfigError(f"invalid --device {device!r}: use cuda, cuda:N or cpu") from None
    return device


def _no_best_message(report: SweepReport) -> str:
    options = " and ".join(AXIS_OPTIONS[axis] for axis in report.grid)
    if report.diverged == report.runs:
        reason = f"every run diverged ({report.diverged} of {report.runs})"
    else:
        reason = (
            f"no configuration finished on every seed ({report.diverged} of {report.runs} runs "
            f"diverged, {report.missing} failed or missing)"
        )
    return (
        f"sweep {report.sweep_id} of setup {report.target} selected no configuration: {reason}; "
        f"try smaller values of {options}"
    )


def _format_point(point: dict[str, float]) -> str:
    return ", ".join(f"{axis}={value:g}" for axis, value in point.items())


def _print_report(report: SweepReport, output: str) -> None:
    if output == "json":
        console.stdout.file.write(json.dumps(report_payload(report), indent=2) + "\n")
        console.stdout.file.flush()
        return
    seeds = len(report.seeds)
    rows = []
    for row in report.rows:
        value = "-" if row.mean is None else f"{row.mean:.4f} ± {row.std:.4f}"
        rows.append(
            {
                "rank": row.rank,
                **{axis: format_cell(float(v)) for axis, v in row.point.items()},
                f"{report.criterion} (mean ± std)": value,
                "diverged": f"{row.diverged}/{seeds}",
                "run ids": ",".join(str(s.run_id) if s.run_id else "-" for s in row.seeds),
                "best": "best" if row.best else "",
            }
        )
    title = (
        f"sweep {report.sweep_id}: setup {report.target}, {len(report.rows)} configurations "
        f"x {seeds} seed{'s' if seeds != 1 else ''}, selected by {report.criterion}"
    )
    print_rows(rows, "table", title=title)
