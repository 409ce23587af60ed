"""Export of raw store tables to CSV or Parquet, streamed in chunks.

Rows are read with ``pandas.read_sql(..., chunksize=...)`` and appended to the output one
chunk at a time (CSV appends, Parquet uses one ``pyarrow.parquet.ParquetWriter``), so a
table of millions of steps never sits in memory as one DataFrame. The file is written under
a temporary name and renamed at the end, so a failed export leaves no partial file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import JSON, Boolean, DateTime, Float, Integer, String, Text, select
from sqlalchemy.engine import Engine

from stepcli.store.models import Diagnostic, Eval, MeasuredFloat, Run, Step, Sweep

EXPORT_TABLES = {
    "runs": Run,
    "steps": Step,
    "evals": Eval,
    "diagnostics": Diagnostic,
    "sweeps": Sweep,
}
EXPORT_FORMATS = {"csv": "csv", "parquet": "parquet"}
"""Export format and the file extension it gets."""
CHUNK_ROWS = 50_000
"""Rows per chunk read from the store and appended to the output."""


def default_export_path(table: str, export_format: str) -> Path:
    """Return ``exports/<table>.<extension>`` relative to the working folder."""
    return Path("exports") / f"{table}.{EXPORT_FORMATS[export_format]}"


def export_table(
    engine: Engine,
    table: str,
    export_format: str,
    path: Path,
    chunk_rows: int = CHUNK_ROWS,
) -> int:
    """Write every row of ``table`` to ``path`` in primary-key order and return the count.

    JSON columns (``hparams``, ``grid`` …) are written as JSON text. NaN in the float columns
    of steps, evals and diagnostics stays NaN in Parquet and becomes an empty CSV field,
    like NULL.
    """
    if table not in EXPORT_TABLES:
        raise ValueError(f"invalid --table {table!r}: choose one of {', '.join(EXPORT_TABLES)}")
    if export_format not in EXPORT_FORMATS:
        raise ValueError(
            f"invalid --format {export_format!r}: choose one of {', '.join(EXPORT_FORMATS)}"
        )
    if chunk_rows < 1:
        raise ValueError(f"invalid chunk size {chunk_rows}: must be >= 1")
    model = EXPORT_TABLES[table].__table__
    query = select(model).order_by(*model.primary_key.columns)
    schema = arrow_schema(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    rows = 0
    try:
        # A read transaction begins deferred (see stepcli.store.session), so in WAL mode this
        # long read never blocks a training run's writes.
        with engine.connect() as connection:
            chunks = pd.read_sql(query, connection, chunksize=chunk_rows)
            if export_format == "csv":
                rows = _write_csv(chunks, model, schema, partial)
            else:
                rows = _write_parquet(chunks, model, schema, partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return rows


def arrow_schema(table: object) -> pa.Schema:
    """Return the Arrow schema of a SQLAlchemy table: one field per column, all nullable."""
    fields = []
    for column in table.columns:
        fields.append(pa.field(column.name, _arrow_type(column.type), nullable=True))
    return pa.schema(fields)


def _arrow_type(column_type: object) -> pa.DataType:
    if isinstance(column_type, JSON):
        return pa.string()
    if isinstance(column_type, Boolean):
        return pa.bool_()
    if isinstance(column_type, MeasuredFloat | Float):
        return pa.float64()
    if isinstance(column_type, Integer):
        return pa.int64()
    if isinstance(column_type, DateTime):
        return pa.timestamp("us")
    if isinstance(column_type, String | Text):
        return pa.string()
    raise TypeError(f"no Arrow type for column type {column_type!r}")


def _normalise(chunk: pd.DataFrame, table: object, schema: pa.Schema) -> pd.DataFrame:
    """Give every chunk the same dtypes, whatever values (or NULLs) it happens to hold."""
    chunk = chunk.copy()
    for column in table.columns:
        name = column.name
        arrow_type = schema.field(name).type
        if isinstance(column.type, JSON):
            chunk[name] = chunk[name].map(
                lambda value: None if value is None else json.dumps(value, sort_keys=True)
            )
        elif pa.types.is_integer(arrow_type):
            chunk[name] = chunk[name].astype("Int64")
        elif pa.types.is_boolean(arrow_type):
            chunk[name] = chunk[name].astype("boolean")
        elif pa.types.is_floating(arrow_type):
            chunk[name] = chunk[name].astype("float64")
        elif pa.types.is_timestamp(arrow_type):
            chunk[name] = pd.to_datetime(chunk[name]).astype("datetime64[us]")
    return chunk


def _write_csv(chunks, table: object, schema: pa.Schema, path: Path) -> int:
    rows = 0
    with path.open("w", newline="", encoding="utf-8") as handle:
        header = True
        for chunk in chunks:
            _normalise(chunk, table, schema).to_csv(handle, header=header, index=False)
            header = False
            rows += len(chunk)
        if header:
            handle.write(",".join(schema.names) + "\n")
    return rows


def _write_parquet(chunks, table: object, schema: pa.Schema, path: Path) -> int:
    rows = 0
    with pq.ParquetWriter(path, schema) as writer:
        for chunk in chunks:
            frame = _normalise(chunk, table, schema)
            writer.write_table(pa.Table.from_pandas(frame, schema=schema, preserve_index=False))
            rows += len(chunk)
    return rows
