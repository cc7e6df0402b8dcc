"""The SQL console's backend: one read-only SELECT against the warehouse, capped in rows and time.

    from warehouse.console import run_console_query, EXAMPLE_QUERIES
    df, truncated = run_console_query(path, "SELECT * FROM model_scores", clip_text=text_tower)

What a console query can do: read the warehouse's tables and views (SELECT, WITH, FROM-first,
VALUES, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN). What it cannot: write, read or write files, reach
the network, install or load extensions, change settings. Two independent layers enforce it:

1. **Statement inspection** with DuckDB's own parser (``duckdb.extract_statements`` for the
   statement type, ``json_serialize_sql`` for the syntax tree): exactly one statement, of type
   SELECT or EXPLAIN; no file/network table functions (``read_csv``, ``read_parquet``,
   ``glob``, ...) and no table names that are paths or URLs (``FROM '/etc/passwd'``); no
   ``query()``/``query_table()`` (SQL hidden in a string). Each refusal says what and why.
2. **Connection settings**: the connection is read-only, ``enable_external_access = false``
   (no file system, no network, no ATTACH/COPY/INSTALL/LOAD), extension autoload/autoinstall
   off, Python replacement scans off, then ``lock_configuration = true`` so SQL cannot undo it.

Rows are capped (``max_rows``; the rest of the result is never fetched) and time is capped: a
timer thread calls ``con.interrupt()`` after ``timeout_s``.

In-process sharing: DuckDB keeps one database instance per file per process and the settings
above are instance-wide, so while a console query runs, the process's other open read
connections to the same warehouse are hardened too (harmless for readers); the instance and
its settings go away when the last connection closes, as readers should (open, read, close).
Console queries in one process run one at a time (``clip_text`` is registered on the instance
for the query's duration and removed afterwards).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from typing import Callable, Sequence

import duckdb
import numpy as np
import pandas as pd

from .db import connect, default_warehouse_path, release_readers

__all__ = [
    "ConsoleError",
    "QueryRefused",
    "QueryTimeout",
    "EXAMPLE_QUERIES",
    "check_query",
    "harden",
    "register_clip_text",
    "run_console_query",
]


class ConsoleError(ValueError):
    """A console query could not run; the message says what was wrong and what to do."""


class QueryRefused(ConsoleError):
    """The query would write, touch files or the network, or change settings."""


class QueryTimeout(ConsoleError):
    """The query ran longer than the console allows and was interrupted."""


_ALLOWED = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}

_WRITE_HINT = ("The SQL console is read-only: only SELECT queries (and WITH, DESCRIBE, SHOW, "
               "SUMMARIZE, EXPLAIN) run here. The warehouse is written by the jobs "
               "(`python -m etl ...`).")

_REFUSALS = {
    "INSERT": "INSERT writes to the warehouse.",
    "UPDATE": "UPDATE writes to the warehouse.",
    "DELETE": "DELETE writes to the warehouse.",
    "CREATE": "CREATE changes the schema.",
    "CREATE_FUNC": "CREATE MACRO/FUNCTION changes the schema.",
    "DROP": "DROP changes the schema.",
    "ALTER": "ALTER changes the schema.",
    "MERGE_INTO": "MERGE writes to the warehouse.",
    "COPY": "COPY reads or writes files, which the console does not allow; use the CSV "
            "download under the result table instead.",
    "COPY_DATABASE": "COPY FROM DATABASE writes a database.",
    "EXPORT": "EXPORT DATABASE writes files, which the console does not allow.",
    "ATTACH": "ATTACH opens other databases or files, which the console does not allow.",
    "DETACH": "DETACH changes the attached databases.",
    "LOAD": "INSTALL/LOAD of extensions is not allowed in the console.",
    "EXTENSION": "Extension statements are not allowed in the console.",
    "PRAGMA": "PRAGMA changes or inspects settings; use SELECT * FROM duckdb_settings() or "
              "DESCRIBE <table> instead.",
    "SET": "SET/RESET/USE changes settings, which are locked in the console.",
    "VARIABLE_SET": "SET VARIABLE changes session state, which the console does not allow.",
    "CALL": "CALL runs a procedure; use SELECT * FROM <table function>(...) instead.",
    "TRANSACTION": "Transactions are not needed: every console query is read-only.",
    "VACUUM": "VACUUM changes the database.",
    "ANALYZE": "ANALYZE changes the database's statistics.",
    "PREPARE": "PREPARE/EXECUTE are not supported; write the values into the query.",
    "EXECUTE": "PREPARE/EXECUTE are not supported; write the values into the query.",
    "UPDATE_EXTENSIONS": "Updating extensions is not allowed in the console.",
}

# Table functions that read files, list directories, reach the network, or run SQL from a string.
_FILE_FUNCTIONS = {
    "read_csv", "read_csv_auto", "sniff_csv", "read_parquet", "parquet_scan", "parquet_metadata",
    "parquet_schema", "parquet_file_metadata", "parquet_kv_metadata", "parquet_bloom_probe",
    "read_json", "read_json_auto", "read_json_objects", "read_json_objects_auto", "read_ndjson",
    "read_ndjson_auto", "read_ndjson_objects", "read_text", "read_blob", "glob", "read_xlsx",
    "iceberg_scan", "iceberg_metadata", "iceberg_snapshots", "delta_scan", "sqlite_scan",
    "sqlite_attach", "postgres_scan", "postgres_attach", "postgres_query", "mysql_scan",
    "mysql_query", "st_read", "read_avro", "arrow_scan", "query", "query_table",
}
_FILE_PREFIXES = ("read_", "parquet_", "iceberg_", "delta_", "sqlite_", "postgres_", "mysql_")


def _refuse_type(stmt: duckdb.Statement) -> None:
    kind = stmt.type.name
    reason = _REFUSALS.get(kind, f"{kind} statements are not allowed.")
    raise QueryRefused(f"Refused: {reason} {_WRITE_HINT}")


def _split(sql: str) -> duckdb.Statement:
    if not isinstance(sql, str) or not sql.strip():
        raise ConsoleError("The query is empty: write one SELECT statement, e.g. "
                           "SELECT * FROM model_scores.")
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.ParserException as exc:
        raise ConsoleError(f"Syntax error: {exc}") from None
    except duckdb.Error as exc:
        raise ConsoleError(f"The query could not be parsed: {exc}") from None
    if not statements:
        raise ConsoleError("The query is empty (only comments?): write one SELECT statement.")
    if len(statements) > 1:
        raise QueryRefused(
            f"One statement per query: found {len(statements)} statements separated by ';'. "
            f"Run them one at a time.")
    return statements[0]


def _strip_explain(query: str) -> str:
    """The statement under ``EXPLAIN [ANALYZE]`` (located with DuckDB's tokenizer)."""
    tokens = duckdb.tokenize(query)
    i = 0
    while i < len(tokens):
        start, _ = tokens[i]
        end = tokens[i + 1][0] if i + 1 < len(tokens) else len(query)
        word = query[start:end].strip().upper()
        if word not in ("EXPLAIN", "ANALYZE", "ANALYSE", "(", ")", "FORMAT", "JSON", "TEXT",
                        "HTML", "GRAPHVIZ", "YAML", "MERMAID", ","):
            return query[start:]
        i += 1
    return ""


def _walk_tables(node, out: list) -> list:
    if isinstance(node, dict):
        t = node.get("type")
        if t == "TABLE_FUNCTION":
            fn = node.get("function") or {}
            out.append(("function", str(fn.get("function_name", "")).lower()))
        elif t == "BASE_TABLE":
            out.append(("table", str(node.get("table_name", ""))))
        for v in node.values():
            _walk_tables(v, out)
    elif isinstance(node, list):
        for v in node:
            _walk_tables(v, out)
    return out


def _looks_like_path(name: str) -> bool:
    return any(ch in name for ch in "/\\:") or "." in name or name.startswith("~")


def _inspect_tree(con: duckdb.DuckDBPyConnection, query: str) -> None:
    """Refuse file/network access visible in the syntax tree of one SELECT."""
    tree = json.loads(con.execute("SELECT json_serialize_sql(?)", [query]).fetchall()[0][0])
    if tree.get("error"):
        # not serialisable (rare forms); the locked connection settings still apply
        return
    for kind, name in _walk_tables(tree, []):
        if kind == "function" and (name in _FILE_FUNCTIONS or name.startswith(_FILE_PREFIXES)):
            raise QueryRefused(
                f"Refused: {name}() reads files or the network (or runs SQL from a string), which "
                f"the console does not allow. Query the warehouse's tables and views instead, "
                f"e.g. SELECT * FROM head_scores.")
        if kind == "table" and _looks_like_path(name):
            raise QueryRefused(
                f"Refused: FROM '{name}' reads a file or URL, which the console does not allow. "
                f"Query the warehouse's tables and views instead (SHOW TABLES lists them).")


def check_query(sql: str, con: duckdb.DuckDBPyConnection | None = None) -> str:
    """Validate one console query and return its text; raise :class:`ConsoleError` otherwise.

    Without ``con`` only the statement type is checked; with a connection the syntax tree is
    inspected for file and network access too.
    """
    stmt = _split(sql)
    if stmt.type not in _ALLOWED:
        _refuse_type(stmt)
    if con is not None:
        inner = _strip_explain(stmt.query) if stmt.type == duckdb.StatementType.EXPLAIN else stmt.query
        if inner.strip():
            if stmt.type == duckdb.StatementType.EXPLAIN:
                check_query(inner)  # EXPLAIN of a write is refused like the write
            _inspect_tree(con, inner)
    return stmt.query


_HARDENING = (
    ("autoinstall_known_extensions", "false"),
    ("autoload_known_extensions", "false"),
    ("python_enable_replacements", "false"),
    ("enable_external_access", "false"),
)


def harden(con: duckdb.DuckDBPyConnection) -> None:
    """Make ``con``'s database instance unable to touch files, the network or extensions.

    Sets each option unless it already has the safe value, then locks the configuration.
    Raises :class:`ConsoleError` if a locked instance is not in the safe state.
    """
    current = dict(con.execute(
        "SELECT name, lower(value) FROM duckdb_settings() WHERE name IN "
        "('autoinstall_known_extensions', 'autoload_known_extensions', "
        "'python_enable_replacements', 'enable_external_access', 'lock_configuration')").fetchall())
    locked = current.get("lock_configuration") == "true"
    for name, value in _HARDENING:
        if current.get(name, value) == value:
            continue
        if locked:
            raise ConsoleError(
                f"The warehouse connection in this process has its configuration locked with "
                f"{name} = {current.get(name)}; close the process's other connections to the "
                f"warehouse and retry.")
        con.execute(f"SET {name} = {value}")
    if not locked:
        con.execute("SET lock_configuration = true")


def register_clip_text(con: duckdb.DuckDBPyConnection,
                       fn: Callable[[str, str], Sequence[float] | np.ndarray]) -> None:
    """Register ``clip_text(model_id VARCHAR, text VARCHAR) -> FLOAT[]`` on ``con``.

    ``fn(model_id, text)`` returns the unit text embedding (any 1-d float sequence or array),
    typically a cached text-tower call. Results are memoised per registration, so
    ``clip_text(model_id, 'a tornado')`` over many rows calls ``fn`` once per distinct pair.
    Combine with ``list_inner_product(vec, clip_text(...))``: the stored vectors are FLOAT[]
    (variable length), which ``array_inner_product`` does not accept without a cast to FLOAT[d].
    Remove it with ``con.remove_function('clip_text')`` before closing ``con`` if other
    connections to the same database stay open.
    """
    memo: dict[tuple[str, str], list[float]] = {}

    def clip_text(model_id: str, text: str) -> list[float]:
        key = (model_id, text)
        if key not in memo:
            vec = np.asarray(fn(model_id, text), dtype=np.float32).reshape(-1)
            memo[key] = vec.tolist()
        return memo[key]

    from duckdb import sqltypes as T
    con.create_function("clip_text", clip_text, [T.VARCHAR, T.VARCHAR],
                        duckdb.list_type(T.FLOAT))


_CONSOLE_LOCK = threading.Lock()


def _hardened_connection(path, timeout_s: float) -> duckdb.DuckDBPyConnection:
    """A read-only connection on a database instance hardened by :func:`harden`.

    The process's warm read instance is released first, so the console normally gets a fresh
    instance; if other threads' cursors keep an already locked instance alive (one that cannot
    take this connection's local settings), wait for them to finish, up to ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        release_readers(path)
        con = connect(path, read_only=True)
        try:
            harden(con)
            return con
        except ConsoleError:
            con.close()
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)
        except BaseException:
            con.close()
            raise


def _fetch_capped(con: duckdb.DuckDBPyConnection, query: str, max_rows: int) -> tuple[pd.DataFrame, bool]:
    con.execute(query)
    want = max_rows + 1
    vectors = max(1, math.ceil(want / duckdb.__standard_vector_size__))
    parts, n = [], 0
    while n < want:
        chunk = con.fetch_df_chunk(vectors)
        if not parts or len(chunk):
            parts.append(chunk)
        if not len(chunk):
            break
        n += len(chunk)
    truncated = n > max_rows
    if truncated:
        con.abort()
    df = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    return df.iloc[:max_rows].reset_index(drop=True), truncated


def run_console_query(path: str | os.PathLike | None, sql: str, max_rows: int = 10_000,
                      timeout_s: float = 10, clip_text: Callable | None = None
                      ) -> tuple[pd.DataFrame, bool]:
    """Run one read-only query on the warehouse; return ``(rows, truncated)``.

    ``truncated`` is True when the result had more than ``max_rows`` rows (the first
    ``max_rows`` are returned). ``clip_text``, when given, is registered as the SQL function
    ``clip_text(model_id, text)`` (see :func:`register_clip_text`). Raises
    :class:`QueryRefused` for anything but one SELECT/EXPLAIN without file access,
    :class:`QueryTimeout` after ``timeout_s`` seconds, :class:`ConsoleError` for syntax or
    query errors, and the warehouse's own errors for a missing or busy warehouse.
    """
    if max_rows < 1:
        raise ValueError("max_rows must be at least 1")
    if timeout_s <= 0:
        raise ValueError("timeout_s must be positive")
    check_query(sql)  # cheap refusals first, before opening anything
    path = path if path is not None else default_warehouse_path()
    if not _CONSOLE_LOCK.acquire(timeout=timeout_s):
        raise ConsoleError("Another console query is still running in this process; retry in a moment.")
    try:
        con = _hardened_connection(path, timeout_s)
        registered = False
        try:
            query = check_query(sql, con)
            if clip_text is not None:
                register_clip_text(con, clip_text)
                registered = True
            timer = threading.Timer(timeout_s, con.interrupt)
            timer.daemon = True
            timer.start()
            try:
                return _fetch_capped(con, query, max_rows)
            except duckdb.InterruptException:
                raise QueryTimeout(
                    f"The query ran longer than {timeout_s:g} s and was stopped. Narrow it with "
                    f"WHERE (e.g. one model_id, layer and head) or add a LIMIT.") from None
            except duckdb.PermissionException as exc:
                raise QueryRefused(
                    f"Refused: the query tried to access files, the network or settings, which "
                    f"the console does not allow ({exc}).") from None
            except duckdb.OutOfMemoryException as exc:
                raise ConsoleError(
                    f"The query needed more memory than the console allows ({exc}); narrow it "
                    f"with WHERE or aggregate before returning rows.") from None
            except duckdb.Error as exc:
                if "read-only" in str(exc).lower():
                    raise QueryRefused(f"Refused: {_WRITE_HINT} ({exc})") from None
                raise ConsoleError(f"The query failed: {exc}") from None
            finally:
                timer.cancel()
        finally:
            if registered:
                try:
                    con.remove_function("clip_text")
                except duckdb.Error:
                    pass
            con.close()
            release_readers(path)  # the hardened instance ends with the process's open cursors
    finally:
        _CONSOLE_LOCK.release()


EXAMPLE_QUERIES: dict[str, str] = {
    "Colour heads of every model": """\
-- heads labelled with the property 'colors', most consistent first
SELECT model_id, head_name, association, entanglement, confidence, top_text
FROM head_scores
WHERE property = 'colors'
ORDER BY association DESC, model_id, layer, head;""",
    "Heads whose first text mentions a background": """\
SELECT h.model_id, 'L' || h.layer || '.H' || h.head AS head_name, t.text, h.variance_explained
FROM head_texts h JOIN texts t USING (text_id)
WHERE h.rank = 0 AND t.text ILIKE '%background%'
ORDER BY h.model_id, h.layer, h.head;""",
    "Labels against the known factors (shapes world)": """\
-- per model: specialised heads (one factor explains >= 40 % of the head's variance and
-- >= 3x any other), how many carry the matching label, and false labels on the others
SELECT model_id, dataset_id, n_specialised, n_right, agreement, n_unspecialised, n_false, false_label_rate
FROM label_agreement
ORDER BY model_id, dataset_id;""",
    "Each head's true factor beside its label": """\
SELECT model_id, head_name, top_factor, round(top_eta2, 3) AS eta2, specialised, label,
       round(confidence, 2) AS confidence, round(p_value, 4) AS p_value, label_right, label_false
FROM head_label_truth
ORDER BY model_id, layer, head;""",
    "Top images of a head for a text (clip_text)": """\
-- the 8 images that head 0 of the last analysed layer of the first model pushes most
-- towards a text. clip_text(model_id, text) embeds the text with that model's text tower;
-- the stored vectors are FLOAT[], so use list_inner_product (array_inner_product needs
-- a cast to FLOAT[d]).
WITH q AS (
    SELECT model_id, list_max(analysed_layers) AS layer, 0 AS head,
           clip_text(model_id, 'a red circle') AS t
    FROM models ORDER BY model_id LIMIT 1
)
SELECT e.model_id, 'L' || e.layer || '.H' || e.head AS head_name, e.image_id, i.label,
       list_inner_product(e.vec, q.t) AS share
FROM head_embeddings e
JOIN q ON e.model_id = q.model_id AND e.layer = q.layer AND e.head = q.head
LEFT JOIN images i ON i.image_id = e.image_id
ORDER BY share DESC
LIMIT 8;""",
    "Model scores": """\
SELECT model_id, association, entanglement, n_heads, n_analysed_heads, n_mixed_heads, n_properties
FROM model_scores
ORDER BY association DESC;""",
    "Label counts per property": """\
SELECT property, model_id, n_heads, share_of_heads, heads
FROM property_heads
ORDER BY property, n_heads DESC, model_id;""",
    "Per-layer scores": """\
SELECT model_id, layer, association, entanglement, n_heads
FROM layer_scores
ORDER BY model_id, layer;""",
    "Recent job runs and their errors": """\
SELECT r.run_id, r.job, r.status, r.started_at, r.finished_at, r.error,
       count(e.item) AS n_errors
FROM runs r LEFT JOIN errors e USING (run_id)
GROUP BY ALL
ORDER BY r.started_at DESC
LIMIT 50;""",
}
