"""The ``report`` and ``export`` commands: figures, a summary table and raw tables from the store.

Importing this module registers both commands on ``stepcli.cli.app``. The report package
(pandas, matplotlib) is imported inside the commands so that other commands start fast.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from sqlalchemy.engine import make_url

from stepcli import console
from stepcli.cli import app
from stepcli.config import ConfigError
from stepcli.options import Db, open_db, parse_setups
from stepcli.store import Store, normalize_url
from stepcli.tables import print_rows

TABLE_FORMATS = ("table", "csv", "markdown", "json")


@app.command()
def report(
    db: Db = "results.db",
    out: Annotated[
        str,
        typer.Option(
            help="Folder for the figures, summary.csv and summary.md (created if missing)."
        ),
    ] = "outputs",
    image_format: Annotated[
        str, typer.Option("--format", help="Image format of the figures: png, svg or pdf.")
    ] = "png",
    table_format: Annotated[
        str,
        typer.Option(help="Form of the summary table on stdout: table, csv, markdown or json."),
    ] = "table",
    setup: Annotated[
        str | None,
        typer.Option(help="Only these setups, comma-separated: 1-6, all, or control names."),
    ] = None,
    sweep: Annotated[
        int | None,
        typer.Option(help="Report the runs of this sweep id instead of the latest train runs."),
    ] = None,
    run: Annotated[
        str | None,
        typer.Option(help="Report exactly these run ids, comma-separated, whatever their status."),
    ] = None,
    target_loss: Annotated[
        float | None,
        typer.Option(
            help="Training loss for the time-to-target figure and column; default: 1.1 x the "
            "mean final smoothed loss of setup 1's finished runs."
        ),
    ] = None,
    smooth: Annotated[
        int,
        typer.Option(
            help="Window of the trailing moving average of the minibatch loss, in steps "
            "(1: no smoothing)."
        ),
    ] = 10,
) -> None:
    """Draw the comparison figures and print the summary table, from the store only."""
    check_report_formats(image_format, table_format)
    if target_loss is not None and not (math.isfinite(target_loss) and target_loss > 0):
        raise ConfigError(f"invalid --target-loss {target_loss}: must be a finite number > 0")
    if smooth < 1:
        raise ConfigError(f"invalid --smooth {smooth}: must be an integer >= 1")
    if sweep is not None and run is not None:
        raise ConfigError("invalid --sweep with --run: pass only one of them")
    setups = parse_setups(setup) if setup is not None else None
    run_ids = _parse_run_ids(run) if run is not None else None

    store = _open_existing(db)
    try:
        render_report(
            store,
            out,
            image_format=image_format,
            table_format=table_format,
            setups=setups,
            sweep_id=sweep,
            run_ids=run_ids,
            target_loss=target_loss,
            smooth_window=smooth,
            empty_message=f"no runs to report in {db}{_filter_text(setup, sweep, run)}",
        )
    finally:
        store.dispose()


def check_report_formats(image_format: str, table_format: str) -> None:
    """Raise ``ConfigError`` for an unknown image or table format."""
    from stepcli.report import IMAGE_FORMATS

    if image_format not in IMAGE_FORMATS:
        raise ConfigError(
            f"invalid --format {image_format!r}: choose one of {', '.join(IMAGE_FORMATS)}"
        )
    if table_format not in TABLE_FORMATS:
        raise ConfigError(
            f"invalid --table-format {table_format!r}: choose one of {', '.join(TABLE_FORMATS)}"
        )


def render_report(
    store: Store,
    out: str,
    *,
    image_format: str,
    table_format: str,
    empty_message: str,
    setups: list[str] | None = None,
    sweep_id: int | None = None,
    run_ids: list[int] | None = None,
    target_loss: float | None = None,
    smooth_window: int = 10,
) -> None:
    """Write the figures and summary files into ``out`` and print the summary table."""
    from stepcli.report import NoRunsError, SelectionError, build_report
    from stepcli.report.summary import display_rows, markdown_table, numeric_rows

    try:
        result = build_report(
            store,
            out,
            image_format=image_format,
            setups=setups,
            sweep_id=sweep_id,
            run_ids=run_ids,
            target_loss=target_loss,
            smooth_window=smooth_window,
        )
    except SelectionError as exc:
        raise ConfigError(str(exc)) from None
    except NoRunsError:
        console.error(f"{empty_message}; {_NEXT_STEP}")
        raise typer.Exit(1) from None

    if result.target is not None:
        console.info(result.target.description)
    for note in result.notes:
        console.info(f"note: {note}")
    if table_format == "markdown":
        console.stdout.file.write(markdown_table(display_rows(result.summary)))
        console.stdout.file.flush()
    elif table_format == "table":
        print_rows(display_rows(result.summary), "table", title="summary")
    else:
        print_rows(numeric_rows(result.summary), table_format)
    console.info(f"wrote {len(result.files)} files to {out}")


@app.command()
def export(
    table: Annotated[
        str, typer.Option(help="Table to export: runs, steps, evals, diagnostics or sweeps.")
    ],
    db: Db = "results.db",
    export_format: Annotated[
        str, typer.Option("--format", help="File format: csv or parquet.")
    ] = "csv",
    out: Annotated[
        str | None,
        typer.Option(help="Output file; default: exports/<table>.<csv|parquet>."),
    ] = None,
    chunk_rows: Annotated[
        int, typer.Option(help="Rows read from the store and written per chunk.")
    ] = 50_000,
) -> None:
    """Write every row of one store table to a CSV or Parquet file, in chunks."""
    from stepcli.report.export import (
        EXPORT_FORMATS,
        EXPORT_TABLES,
        default_export_path,
        export_table,
    )

    if table not in EXPORT_TABLES:
        raise ConfigError(f"invalid --table {table!r}: choose one of {', '.join(EXPORT_TABLES)}")
    if export_format not in EXPORT_FORMATS:
        raise ConfigError(
            f"invalid --format {export_format!r}: choose one of {', '.join(EXPORT_FORMATS)}"
        )
    if chunk_rows < 1:
        raise ConfigError(f"invalid --chunk-rows {chunk_rows}: must be an integer >= 1")
    path = Path(out) if out is not None else default_export_path(table, export_format)
    if path.is_dir():
        raise ConfigError(f"invalid --out {path}: it is a folder; pass a file path")
    _check_not_store(path, db)

    store = _open_existing(db)
    try:
        rows = export_table(store.engine, table, export_format, path, chunk_rows)
    finally:
        store.dispose()
    console.info(f"wrote {rows} rows of {table} to {path}")


_NEXT_STEP = "run stepcli train or stepcli experiment first"


def _open_existing(db: str) -> Store:
    """Open the store at ``db``, or exit 1 when ``db`` is a file path that does not exist."""
    if "://" not in db and not Path(db).expanduser().exists():
        console.error(f"store {db} not found; {_NEXT_STEP}, or pass --db")
        raise typer.Exit(1)
    return open_db(db)


def _check_not_store(path: Path, db: str) -> None:
    """Raise ``ConfigError`` when ``path`` is the SQLite store file or one of its side files."""
    if "://" in db and not db.startswith("sqlite"):
        return
    database = Path(make_url(normalize_url(db)).database or "").resolve()
    target = path.expanduser().resolve()
    if target in {database, Path(f"{database}-wal"), Path(f"{database}-shm")}:
        raise ConfigError(f"invalid --out {path}: it is the store itself; pass another file")


def _parse_run_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(
            f"invalid --run {text!r}: give comma-separated run ids such as 3,4,5"
        ) from None
    if not ids:
        raise ConfigError(f"invalid --run {text!r}: give at least one run id")
    return ids


def _filter_text(setup: str | None, sweep: int | None, run: str | None) -> str:
    parts = []
    if setup is not None:
        parts.append(f"--setup {setup}")
    if sweep is not None:
        parts.append(f"--sweep {sweep}")
    if run is not None:
        parts.append(f"--run {run}")
    return f" for {' '.join(parts)}" if parts else ""
