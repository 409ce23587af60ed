"""Result tables as Rich tables, JSON or CSV on stdout."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from stepcli import console


def format_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3g}"
        return f"{value:.4g}"
    if isinstance(value, dict):
        return " ".join(f"{k}={format_cell(v)}" for k, v in value.items())
    return str(value)


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def print_rows(
    rows: Sequence[dict[str, Any]],
    output: str,
    *,
    title: str | None = None,
    stream: Console | None = None,
) -> None:
    """Print ``rows`` (dicts with the same keys) as a table, JSON or CSV."""
    target = stream or console.stdout
    if output == "json":
        payload = [{k: _json_value(v) for k, v in row.items()} for row in rows]
        target.file.write(json.dumps(payload, indent=2, default=str) + "\n")
        target.file.flush()
        return
    columns = list(dict.fromkeys(key for row in rows for key in row))
    if output == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in row.items()}
            )
        target.file.write(buffer.getvalue())
        target.file.flush()
        return
    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(format_cell(row.get(column)) for column in columns))
    if not rows:
        target.print(f"{title or 'table'}: no rows", markup=False)
        return
    target.print(table)
