"""The ``experiment`` command: the whole study, from tuning to figures, in one command."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from stepcli import console
from stepcli.cli import _parse_hidden, app, check_subset
from stepcli.cli_report import check_report_formats, render_report
from stepcli.cli_sweep import _executor_options, _remote_device
from stepcli.config import ConfigError, TrainConfig
from stepcli.data import data_dir_from
from stepcli.executors import ExecutionContext, make_executor
from stepcli.experiment import (
    ExperimentPlan,
    fresh_seeds,
    parse_setup_list,
    run_experiment,
)
from stepcli.options import (
    AllowCpu,
    BatchSize,
    Compile,
    DataDir,
    Db,
    Device,
    Hidden,
    load_data,
    open_db,
    parse_setups,
    resolve_device,
)
from stepcli.store import check_store_location
from stepcli.sweep import CRITERIA, DEFAULT_VAL_SIZE, check_seed_count, parse_seeds

QUICK = {"epochs": 2, "subset_size": 2000}
"""Settings of ``--quick``: 8 steps per epoch, so the whole study takes minutes on a CPU."""
MNIST_TRAIN_IMAGES = 60_000


@app.command()
def experiment(
    epochs: Annotated[
        int | None,
        typer.Option(help="Passes over the training subset (default 6, or 2 with --quick)."),
    ] = None,
    batch_size: BatchSize = 256,
    subset_size: Annotated[
        int | None,
        typer.Option(
            help="Class-balanced training subset size (default 12000, or 2000 with --quick)."
        ),
    ] = None,
    seeds: Annotated[
        int, typer.Option(help="Fresh seeds per setup for the final runs (1000, 1001, …).")
    ] = 3,
    tuning_seeds: Annotated[
        int, typer.Option(help="Tuning seeds per sweep configuration (0 … N-1).")
    ] = 2,
    quick: Annotated[
        bool,
        typer.Option(
            "--quick",
            help="A minutes-long version: 2 epochs on 2000 images unless --epochs or "
            "--subset-size say otherwise.",
        ),
    ] = False,
    setup: Annotated[
        str, typer.Option(help="Setups to include: all (1-6) or a comma-separated list.")
    ] = "all",
    controls: Annotated[
        bool,
        typer.Option(
            "--controls",
            help="Also tune and train the controls: sgd, adam-half, adam-third, 6-nodecay "
            "and every learned setup with meta_lr = 0.",
        ),
    ] = False,
    select_by: Annotated[
        str, typer.Option(help="Sweep selection criterion: train-loss or val-loss.")
    ] = "train-loss",
    hidden: Hidden = "256",
    compile: Compile = False,
    executor: Annotated[
        str, typer.Option(help="Where runs train: local (this process) or ray.")
    ] = "local",
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster address for --executor ray.")
    ] = None,
    gpus_per_run: Annotated[
        float | None, typer.Option(help="GPUs reserved per run by --executor ray.")
    ] = None,
    allow_cpu: AllowCpu = False,
    device: Device = None,
    data_dir: DataDir = None,
    db: Db = "results.db",
    out: Annotated[str, typer.Option(help="Folder for the figures and summary files.")] = (
        "outputs"
    ),
    image_format: Annotated[
        str, typer.Option("--format", help="Image format of the figures: png, svg or pdf.")
    ] = "png",
    table_format: Annotated[
        str, typer.Option(help="Form of the summary table: table, csv, markdown or json.")
    ] = "table",
) -> None:
    """Reproduce the study: tune every setup, train fresh seeds, then draw the report.

    Each setup is tuned with its default sweep over the same tuning seeds, and its selected
    configuration trains on fresh seeds. A rerun reuses every stored run, so an interrupted
    experiment resumes where it stopped.
    """
    started = time.monotonic()
    check_report_formats(image_format, table_format)
    if Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"invalid --out {out}: it is a file; pass a folder for the report")
    if select_by not in CRITERIA:
        raise ConfigError(f"invalid --select-by {select_by!r}: choose one of {', '.join(CRITERIA)}")
    check_seed_count("--seeds", seeds)
    names = parse_setup_list(parse_setups(setup), controls)
    runner = make_executor(executor, _executor_options(ray_address, gpus_per_run))
    defaults = QUICK if quick else {"epochs": 6, "subset_size": 12_000}
    base = TrainConfig(
        setup=names[0],
        epochs=epochs if epochs is not None else defaults["epochs"],
        batch_size=batch_size,
        subset_size=subset_size if subset_size is not None else defaults["subset_size"],
        val_size=DEFAULT_VAL_SIZE if select_by == "val-loss" else 0,
        hidden=_parse_hidden(hidden),
        compile=compile,
    )
    base.validate()
    plan = ExperimentPlan(
        setups=names,
        base=base,
        tuning_seeds=parse_seeds(tuning_seeds, None, option="--tuning-seeds"),
        seeds=fresh_seeds(seeds),
        criterion=select_by,
    )

    data = None
    train_size = MNIST_TRAIN_IMAGES
    if runner.in_process:
        torch_device = resolve_device(device, allow_cpu)
        check_store_location(db)
        data = load_data(data_dir, torch_device)
        store = open_db(db)
        train_size = data.train_labels.shape[0]
        base = replace(check_subset(base, data), device=str(torch_device))
    else:
        base = replace(base, device=_remote_device(device, allow_cpu))
        store = open_db(db)
    plan = replace(plan, base=base)
    folder = data_dir_from(data_dir).expanduser().absolute()
    context = ExecutionContext(store=store, data_dir=str(folder), data=data)

    console.info(
        f"experiment: setups {', '.join(names)}; {len(plan.tuning_seeds)} tuning seeds, "
        f"{len(plan.seeds)} fresh seeds; {base.epochs} epochs, batch {base.batch_size}, "
        f"subset {base.subset_size or train_size}"
    )
    try:
        result = run_experiment(store, plan, runner, context, train_size, announce=console.info)
    except KeyboardInterrupt:
        console.error("experiment interrupted: finished runs are stored; rerun the same command")
        raise

    if not result.run_ids:
        console.error(
            f"experiment trained no final run: every sweep of {', '.join(result.untuned)} "
            "selected nothing; try smaller grid values with stepcli sweep"
        )
        raise typer.Exit(1)
    render_report(
        store,
        out,
        image_format=image_format,
        table_format=table_format,
        run_ids=result.run_ids,
        empty_message="the experiment stored no runs to report",
    )
    minutes = (time.monotonic() - started) / 60
    console.info(
        f"experiment finished in {minutes:.1f} min: {len(result.run_ids)} final runs "
        f"({result.reused} reused), report in {out}"
    )
    if result.untuned:
        console.error(f"setups without a selected configuration: {', '.join(result.untuned)}")
        raise typer.Exit(1)
