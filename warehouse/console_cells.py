"""What a console result's cells become on their way out of the query worker: short previews for the
dashboard's table, plain text for the CSV download.

Runs inside the console worker (warehouse/console_worker.py), on the Arrow record batches a query
returns, never on SQL text: each batch is scanned by a private in-memory DuckDB instance (external
access off, configuration locked) that only ever sees column references written here.

* :class:`Previewer` (display): every text, binary and nested value (lists, arrays, structs,
  maps, unions) becomes one string of at most ``chars`` characters plus a size note, e.g.
  ``[0.0123, -0.0456, ...`` + ``… (768 items)``. Lists are sliced before they are turned into text,
  so a 3,000-item list costs what its first items cost. A preview column is VARCHAR; numbers,
  dates and other narrow values pass through unchanged.
* :class:`CsvText` (download): every column Arrow's CSV writer cannot write (nested, binary,
  intervals, ...) is cast to DuckDB's text for it, whole; the rest passes through.

Cost model for the dashboard (:func:`display_bytes`): a preview batch counts its Arrow bytes plus
``CELL_OVERHEAD`` bytes per text cell, what a Python string costs beyond its characters once the
dashboard turns the rows into a DataFrame.
"""
from __future__ import annotations

import duckdb
import pyarrow as pa

CELL_OVERHEAD = 64          # bytes a Python str costs beyond its characters (CPython: 49 + ~1 per char)
ELLIPSIS = "\u2026"

_CSV_TYPES = (pa.types.is_boolean, pa.types.is_integer, pa.types.is_floating, pa.types.is_decimal,
              pa.types.is_date, pa.types.is_timestamp, pa.types.is_time, pa.types.is_string,
              pa.types.is_large_string, pa.types.is_null)


def _mem() -> duckdb.DuckDBPyConnection:
    """A private in-memory DuckDB for reshaping result batches: no files, no extensions, locked."""
    con = duckdb.connect(":memory:", config={
        "enable_external_access": False, "autoinstall_known_extensions": False,
        "autoload_known_extensions": False, "python_enable_replacements": False, "threads": 1})
    con.execute("SET lock_configuration = true")
    return con


def _is_nested(t: pa.DataType) -> bool:
    return pa.types.is_nested(t) or (hasattr(pa.types, "is_list_view") and
                                     (pa.types.is_list_view(t) or pa.types.is_large_list_view(t)))


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t) or (
        hasattr(pa.types, "is_list_view") and (pa.types.is_list_view(t) or pa.types.is_large_list_view(t)))


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or (
        hasattr(pa.types, "is_string_view") and pa.types.is_string_view(t))


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t) or (
        hasattr(pa.types, "is_binary_view") and pa.types.is_binary_view(t))


def _cut(text: str, size: str, chars: int) -> str:
    """SQL: ``text`` cut to ``chars`` characters with `` … (size)`` when longer (or when ``size`` is
    forced by the caller's CASE)."""
    return (f"CASE WHEN length({text}) > {chars} THEN left({text}, {chars}) || ' {ELLIPSIS} (' || {size} || ')' "
            f"ELSE {text} END")


def _preview_sql(col: str, t: pa.DataType, chars: int) -> str:
    count = "format('{:,}', %s)"
    if _is_text(t):
        return _cut(col, f"{count % f'length({col})'} || ' characters'", chars)
    if _is_binary(t):                # DuckDB writes a byte as \xAB: 4 characters at most
        head = f"CAST({col}[1:{chars}] AS VARCHAR)" if not pa.types.is_fixed_size_binary(t) else f"CAST({col} AS VARCHAR)"
        return (f"CASE WHEN octet_length({col}) > {chars} OR length({head}) > {chars} THEN left({head}, {chars}) || "
                f"' {ELLIPSIS} (' || {count % f'octet_length({col})'} || ' bytes)' ELSE {head} END")
    if _is_list(t):                  # slice first: a 3,000-item list costs what its first items cost
        items = max(1, chars // 2)
        head = f"CAST(list_slice({col}, 1, {items}) AS VARCHAR)"
        return (f"CASE WHEN len({col}) > {items} OR length({head}) > {chars} THEN left({head}, {chars}) || "
                f"' {ELLIPSIS} (' || {count % f'len({col})'} || ' items)' ELSE {head} END")
    text = f"CAST({col} AS VARCHAR)"
    return _cut(text, f"{count % f'length({text})'} || ' characters'", chars)


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class _Reshaper:
    """Applies one SQL projection (column i is ``c{i}``) to every batch of one schema."""

    def __init__(self, schema: pa.Schema, exprs: list[str] | None) -> None:
        self.schema = schema
        self.exprs = exprs
        self.con = _mem() if exprs else None

    def __call__(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        if self.con is None or not batch.num_rows:
            return batch
        names = [f"c{i}" for i in range(batch.num_columns)]
        rel = self.con.from_arrow(pa.Table.from_batches([batch.rename_columns(names)]))
        table = rel.project(", ".join(self.exprs)).to_arrow_table()
        table = table.rename_columns(self.schema.names).combine_chunks()
        batches = table.to_batches()
        return batches[0] if batches else pa.RecordBatch.from_pylist([], schema=table.schema)

    def out_schema(self) -> pa.Schema:
        if self.con is None:
            return self.schema
        fields = [f if self.exprs[i] == f"c{i}" else pa.field(f.name, pa.string()) for i, f in enumerate(self.schema)]
        return pa.schema(fields)

    def close(self) -> None:
        if self.con is not None:
            self.con.close()
            self.con = None


class Previewer(_Reshaper):
    """Display previews: text, binary and nested values cut to ``chars`` characters (see module doc)."""

    def __init__(self, schema: pa.Schema, chars: int) -> None:
        exprs = []
        for i, f in enumerate(schema):
            wide = _is_text(f.type) or _is_binary(f.type) or _is_nested(f.type) or pa.types.is_dictionary(f.type)
            exprs.append(f"{_preview_sql(f'c{i}', f.type, chars)} AS c{i}" if wide else f"c{i}")
        super().__init__(schema, exprs if any(e != f"c{i}" for i, e in enumerate(exprs)) else None)


class CsvText(_Reshaper):
    """Download text: columns Arrow's CSV writer cannot write are cast to DuckDB's text, whole."""

    def __init__(self, schema: pa.Schema) -> None:
        exprs = [f"c{i}" if any(ok(f.type) for ok in _CSV_TYPES) else f"CAST(c{i} AS VARCHAR) AS c{i}"
                 for i, f in enumerate(schema)]
        super().__init__(schema, exprs if any(e != f"c{i}" for i, e in enumerate(exprs)) else None)


def text_columns(schema: pa.Schema) -> int:
    """How many columns of ``schema`` become Python strings (or other objects) in a DataFrame."""
    return sum(1 for f in schema if not (pa.types.is_boolean(f.type) or pa.types.is_integer(f.type)
                                         or pa.types.is_floating(f.type) or pa.types.is_temporal(f.type)))


def display_bytes(batch: pa.RecordBatch, rows: int | None = None) -> int:
    """What the first ``rows`` rows of a preview batch cost once shown: Arrow bytes plus
    ``CELL_OVERHEAD`` per text cell."""
    rows = batch.num_rows if rows is None else rows
    return batch.slice(0, rows).nbytes + CELL_OVERHEAD * rows * text_columns(batch.schema)
