"""The SQL console's backend: one read-only query against the warehouse, run in a worker process
that is capped in time, memory, rows and bytes.

    from warehouse.console import run_console_query, EXAMPLE_QUERIES
    df, truncated = run_console_query(path, "SELECT * FROM model_scores", clip_text=text_tower)

What a console query can do: read the warehouse's tables and views (SELECT, WITH, FROM-first,
VALUES, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN). What it cannot: write, read or write files, reach
the network, install or load extensions, change settings, run SQL from a string, or take the
process that asked for it down with it.

**Isolation.** Queries run in a worker process (:mod:`warehouse.console_worker`: Python with
duckdb and pyarrow, no torch). Nothing of a query, its parsing included, runs in the calling
(dashboard) process, which only checks the text's length and converts the returned rows:

* **time**: the caller kills the worker (SIGKILL) ``timeout_s`` after handing it the query
  (default 10 s), so long single function calls (``levenshtein`` of two 150,000-character
  strings) and parser/planner bombs (a 20,000-way ``UNION ALL``, a huge ``IN`` list) stop like
  any slow scan; DuckDB's own interrupt is not checked inside one function call or the planner;
* **memory**: the worker caps itself with ``setrlimit(RLIMIT_DATA)`` (``memory_bytes``, default
  2.5 GB, env ``ATLAS_CONSOLE_MEMORY``); DuckDB's ``memory_limit`` in it is the warehouse's
  (2 GB), at most 80 % of the cap, and spilling to disk is off (``temp_directory = ''``), so a
  big sort fails instead of filling a disk. RLIMIT_DATA (Linux >= 4.7: heap and private writable
  mappings) rather than RLIMIT_AS: a worker reserves ~1.1 GB of address space before its first
  query (libraries, DuckDB's per-thread allocator arenas) while its data segment is ~0.2 GB, so
  RLIMIT_AS would leave ~1.4 GB of a 2.5 GB cap usable, shifting with the thread count. Measured
  under RLIMIT_DATA: the ``damerau_levenshtein`` bomb stops at a peak RSS of 2.40 GB under a
  2.5 GB cap and 0.80 GB under 1 GB; a worker starts at ~0.12 GB;
* **rows and bytes**: at most ``max_rows`` rows (10,000) and ``max_bytes`` of Arrow data
  (default 32 MB, env ``ATLAS_CONSOLE_MAX_BYTES``) come back; the rest is never fetched, and
  ``df.attrs["console_note"]`` says which cap cut the result; query texts longer than
  :data:`MAX_SQL_CHARS` are refused before any parsing;
* **CPU**: the worker runs at nice 10 (``ATLAS_CONSOLE_NICE``), so page renders come first on a busy
  host; DuckDB in the worker runs ``ATLAS_CONSOLE_THREADS`` threads (default: 4 or the number
  of cores, whichever is smaller); at most ``ATLAS_CONSOLE_WORKERS`` (default 2) console queries
  run at once per process.

A stopped query costs the caller nothing but a one-line message ("Query stopped: it ran past the
10 s limit. ..." / "Query stopped: it used more than 2.5 GB of memory. ..."); the next query gets
another worker. A worker takes ~0.4 s of CPU to start, so one is kept waiting (:func:`warm_up`;
``ATLAS_CONSOLE_SPARE=0`` turns this off): a worker whose query was refused, failed or returned,
and whose peak RSS stayed under a quarter of its cap, waits for the next query (each query opens
and closes its own DuckDB instance); a killed or grown worker is discarded and a fresh one
started. See the README for the measured overhead.

**What a query may do** is enforced twice inside the worker:

1. **Statement inspection** with DuckDB's own parser (``duckdb.extract_statements`` for the
   statement type, ``json_serialize_sql`` for the syntax tree, ``duckdb.tokenize`` for calls by
   name and as a fallback for forms the serialiser does not take): exactly one statement, of type
   SELECT or EXPLAIN; no INSERT/UPDATE/DELETE inside WITH; table functions only from an
   allow-list (:data:`ALLOWED_TABLE_FUNCTIONS`: generators and catalog views), so file and
   network readers (``read_csv``, ``read_parquet``, ``glob``, ...) are refused by name; functions
   that run SQL from a string (:data:`SQL_TEXT_FUNCTIONS`: ``query``, ``query_table``,
   ``json_execute_serialized_sql``) are refused in any position; no table names that are paths
   or URLs (``FROM '/etc/passwd'``). Each refusal says what and why.
2. **Connection settings**: the warehouse is opened read-only with
   ``enable_external_access = false`` (no file system, no network, no ATTACH/COPY/INSTALL/LOAD)
   from the first moment, extension autoload/autoinstall off, Python replacement scans off,
   then ``lock_configuration = true`` so SQL cannot undo it. One exception: while Parquet shards
   are attached in place (``shard_sets``, migration 005), ``head_embeddings`` is a view that reads
   them, so the worker sees that on a first open, closes, opens again with external access on,
   allows exactly the registered shard files (``allowed_paths``, :func:`allow_shard_files`),
   turns external access off and locks, all before the query is inspected. A query can then
   read those files only through the view: naming them (``read_parquet``, ``FROM 'x.parquet'``,
   ``COPY``) is still refused by the inspection.

Any error the parser, DuckDB, the worker or the conversion of the result can raise
(``duckdb.Error``, ``ValueError``, ``NotImplementedError``, ``OverflowError``, ...) reaches the
caller as one line in a :class:`ConsoleError`.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import duckdb

from .db import WarehouseBusyError, WarehouseMissingError, default_warehouse_path

__all__ = [
    "ConsoleError",
    "QueryRefused",
    "QueryTimeout",
    "QueryMemoryExceeded",
    "ALLOWED_TABLE_FUNCTIONS",
    "SQL_TEXT_FUNCTIONS",
    "DEFAULT_MEMORY_BYTES",
    "DEFAULT_MAX_BYTES",
    "MAX_SQL_CHARS",
    "EXAMPLE_QUERIES",
    "check_query",
    "harden",
    "allow_shard_files",
    "register_clip_text",
    "limits_text",
    "run_console_query",
    "CsvDownload",
    "warm_up",
]


class ConsoleError(ValueError):
    """A console query could not run; the message (one line) says what was wrong and what to do."""


class QueryRefused(ConsoleError):
    """The query would write, touch files or the network, change settings or run SQL from a string."""


class QueryTimeout(ConsoleError):
    """The query ran longer than the console allows; its worker was killed."""


class QueryMemoryExceeded(ConsoleError):
    """The query needed more memory than the console allows; its worker was stopped."""


DEFAULT_MEMORY_BYTES = 2_500_000_000   # the worker's RLIMIT_DATA (env ATLAS_CONSOLE_MEMORY)
DEFAULT_MAX_BYTES = 32_000_000         # Arrow bytes of result data (env ATLAS_CONSOLE_MAX_BYTES)
MAX_SQL_CHARS = 1_000_000              # longer query texts are refused before any parsing
STARTUP_LIMIT_S = 30.0                 # a worker that has not started by then is given up
_FRAME_SLACK = 4_000_000               # Arrow IPC framing allowed beyond max_bytes

_ALLOWED = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}

_WRITE_HINT = ("The SQL console is read-only: only SELECT queries (and WITH, DESCRIBE, SHOW, "
               "SUMMARIZE, EXPLAIN) run here. The warehouse is written by the jobs "
               "(`python -m etl ...`).")

_NARROW_HINT = "Narrow it with WHERE (e.g. one model_id, layer and head), aggregate, or add a LIMIT."

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
    "CHECKPOINT": "CHECKPOINT writes the database file.",
    "TRUNCATE": "TRUNCATE deletes every row of a table.",
    "DEALLOCATE": "DEALLOCATE drops a prepared statement; PREPARE/EXECUTE are not supported either.",
    "COMMENT": "COMMENT ON changes the schema.",
    "PREPARE": "PREPARE/EXECUTE are not supported; write the values into the query.",
    "EXECUTE": "PREPARE/EXECUTE are not supported; write the values into the query.",
    "UPDATE_EXTENSIONS": "Updating extensions is not allowed in the console.",
    "MULTI": "PIVOT without an IN list runs several statements; list the values to pivot on, "
             "e.g. PIVOT head_scores ON property IN ('colors', 'shapes') USING count(*).",
}

# Table functions a console query may call: generators and read-only views of the catalog and
# settings. Every other table function (and table macro) is refused by name, so functions a
# newer DuckDB or an extension adds are refused until someone allows them here.
ALLOWED_TABLE_FUNCTIONS = frozenset({
    "range", "generate_series", "unnest", "repeat", "repeat_row", "json_each", "json_tree",
    "pg_timezone_names", "icu_calendar_names",
    "duckdb_columns", "duckdb_constraints", "duckdb_databases", "duckdb_dependencies",
    "duckdb_extensions", "duckdb_functions", "duckdb_indexes", "duckdb_keywords", "duckdb_memory",
    "duckdb_optimizers", "duckdb_schemas", "duckdb_sequences", "duckdb_settings", "duckdb_tables",
    "duckdb_types", "duckdb_views",
    "pragma_table_info", "pragma_version", "pragma_platform", "pragma_database_size",
    "pragma_storage_info", "pragma_show", "pragma_collations", "pragma_metadata_info",
    "pragma_user_agent",
})

# Functions that execute SQL text (a second parser path around the inspection): refused in any
# position, as a table function or a scalar one. (`json_serialize_sql` / `json_deserialize_sql`
# only convert between SQL text and its syntax tree; they run nothing.)
SQL_TEXT_FUNCTIONS = frozenset({"query", "query_table", "json_execute_serialized_sql"})

# Table macros that read a table named by a string (their body runs query_table(name), which
# also takes file paths): refused as table functions; the histogram() aggregate stays allowed.
_STRING_TABLE_MACROS = {"histogram", "histogram_values"}

# For the refusal message only: what a refused table function would have done.
_FILE_FUNCTIONS = {
    "read_csv", "read_csv_auto", "sniff_csv", "read_parquet", "parquet_scan", "parquet_metadata",
    "parquet_schema", "parquet_file_metadata", "parquet_kv_metadata", "parquet_bloom_probe",
    "parquet_full_metadata", "read_json", "read_json_auto", "read_json_objects",
    "read_json_objects_auto", "read_ndjson", "read_ndjson_auto", "read_ndjson_objects", "read_text",
    "read_blob", "glob", "read_xlsx", "iceberg_scan", "iceberg_metadata", "iceberg_snapshots",
    "delta_scan", "sqlite_scan", "sqlite_attach", "postgres_scan", "postgres_attach",
    "postgres_query", "mysql_scan", "mysql_query", "st_read", "read_avro", "arrow_scan",
    "read_duckdb", "pandas_scan", "python_arrow_scan",
}
_FILE_PREFIXES = ("read_", "parquet_", "iceberg_", "delta_", "sqlite_", "postgres_", "mysql_")


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line: DuckDB's ``LINE n: ... ^`` context is dropped."""
    text = str(exc)
    text = re.split(r"\n\s*LINE \d+:", text, maxsplit=1)[0]
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return text or type(exc).__name__


# DuckDB parses some statements as another type (ANALYZE is a VACUUM, CHECKPOINT a CALL, COPY FROM
# DATABASE a PRAGMA, TRUNCATE a DELETE, ...): the refusal names the statement the user wrote, found
# by its leading keywords.
_LEADING = {
    "ANALYZE": "ANALYZE", "ANALYSE": "ANALYZE", "CHECKPOINT": "CHECKPOINT", "FORCE CHECKPOINT": "CHECKPOINT",
    "COPY FROM DATABASE": "COPY_DATABASE", "TRUNCATE": "TRUNCATE", "DEALLOCATE": "DEALLOCATE",
    "COMMENT ON": "COMMENT", "SET VARIABLE": "VARIABLE_SET", "RESET VARIABLE": "VARIABLE_SET",
}


def _leading_words(query: str, n: int = 3) -> list[str]:
    """The first ``n`` words of a statement, upper case, comments skipped (DuckDB's tokenizer)."""
    try:
        tokens = duckdb.tokenize(query)
    except Exception:  # noqa: BLE001 - a statement the tokenizer refuses: no words
        return []
    words = []
    for i, (start, kind) in enumerate(tokens):
        if kind == duckdb.token_type.comment:
            continue
        end = tokens[i + 1][0] if i + 1 < len(tokens) else len(query)
        words.append(query[start:end].strip().upper())
        if len(words) == n:
            break
    return words


def _refuse_type(kind: str, query: str = "") -> None:
    words = _leading_words(query)
    named = next((_LEADING[" ".join(words[:k])] for k in (3, 2, 1) if " ".join(words[:k]) in _LEADING), None)
    if named:
        reason = _REFUSALS[named]
    elif kind == "UNKNOWN":    # a type this duckdb's Python client has no name for (UPDATE EXTENSIONS)
        reason = f"{' '.join(words[:2])} statements are not allowed." if words else "This statement is not allowed."
    else:
        reason = _REFUSALS.get(kind, f"{kind} statements are not allowed.")
    raise QueryRefused(f"Refused: {reason} {_WRITE_HINT}")


def _split(sql: str) -> duckdb.Statement:
    if not isinstance(sql, str) or not sql.strip():
        raise ConsoleError("The query is empty: write one SELECT statement, e.g. "
                           "SELECT * FROM model_scores.")
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.ParserException as exc:
        raise ConsoleError(f"Syntax error: {_one_line(exc)}") from None
    except (duckdb.OutOfMemoryException, MemoryError):
        raise                       # the worker reports it as the memory cap
    except ValueError as exc:
        if "StatementType" in str(exc):
            # a statement type this duckdb's Python client has no name for (e.g. UPDATE
            # EXTENSIONS): never a SELECT
            raise QueryRefused(f"Refused: this kind of statement is not allowed ({_one_line(exc)}). "
                               f"{_WRITE_HINT}") from None
        raise ConsoleError(f"The query could not be parsed: {_one_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - any parser failure is the query's problem
        raise ConsoleError(f"The query could not be parsed: {_one_line(exc)}") from None
    if not statements:
        raise ConsoleError("The query is empty (only comments?): write one SELECT statement.")
    if len(statements) > 1:
        raise QueryRefused(
            f"One statement per query: found {len(statements)} statements separated by ';'. "
            f"Run them one at a time.")
    return statements[0]


def _statement_type(stmt: duckdb.Statement) -> str:
    try:
        return stmt.type.name
    except Exception:  # noqa: BLE001 - an unknown enum value
        return "UNKNOWN"


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


def _walk(node, out: list) -> list:
    """(kind, name) of every table function, scalar function, base table and SHOW target."""
    if isinstance(node, dict):
        t = node.get("type")
        if t == "TABLE_FUNCTION":
            fn = node.get("function") or {}
            out.append(("table_function", str(fn.get("function_name", "")).lower()))
        elif t == "BASE_TABLE":
            out.append(("table", str(node.get("table_name", ""))))
        elif t == "SHOW_REF":
            name = str(node.get("table_name", ""))
            if name and name != "\\" and not name.startswith("__"):   # SHOW TABLES / ALL TABLES
                out.append(("table", name))
        elif node.get("class") == "FUNCTION" and "function_name" in node:
            out.append(("function", str(node.get("function_name", "")).lower()))
        elif isinstance(t, str) and t.endswith("_QUERY_NODE"):     # INSERT/UPDATE/DELETE in a WITH
            out.append(("write", t[: -len("_QUERY_NODE")]))
        for v in node.values():
            _walk(v, out)
    elif isinstance(node, list):
        for v in node:
            _walk(v, out)
    return out


_WRITE_WORDS = {"insert", "update", "delete", "merge", "copy", "attach", "detach", "truncate",
                "create", "drop", "alter", "install", "load", "checkpoint", "vacuum"}


def _keywords(query: str) -> set[str]:
    """The keywords of ``query`` (DuckDB's tokenizer: not in strings, comments or quotes)."""
    tokens = duckdb.tokenize(query)
    out = set()
    for i, (start, kind) in enumerate(tokens):
        if kind == duckdb.token_type.keyword:
            end = tokens[i + 1][0] if i + 1 < len(tokens) else len(query)
            out.add(query[start:end].strip().lower())
    return out


def _called_names(query: str) -> list[str]:
    """Every word directly followed by ``(`` (DuckDB's tokenizer; strings and comments skipped)."""
    tokens = duckdb.tokenize(query)
    names = []
    for i, (start, kind) in enumerate(tokens[:-1]):
        if kind not in (duckdb.token_type.identifier, duckdb.token_type.keyword):
            continue
        nxt = tokens[i + 1][0]
        if query[nxt:nxt + 1] != "(":
            continue
        word = query[start:nxt].strip()
        if len(word) >= 2 and word[0] == word[-1] == '"':
            word = word[1:-1].replace('""', '"')
        names.append(word.lower())
    return names


def _looks_like_path(name: str) -> bool:
    return any(ch in name for ch in "/\\:") or "." in name or name.startswith("~")


def _refuse_function(name: str) -> None:
    if name in SQL_TEXT_FUNCTIONS:
        raise QueryRefused(
            f"Refused: {name}() runs SQL from a string, which the console does not allow. Write "
            f"the query itself instead.")
    if name in _STRING_TABLE_MACROS:
        raise QueryRefused(
            f"Refused: {name}() as a table function reads the table named by a string (through "
            f"query_table), which the console does not allow; use the aggregate instead, e.g. "
            f"SELECT histogram(layer) FROM head_scores.")
    if name in _FILE_FUNCTIONS or name.startswith(_FILE_PREFIXES):
        raise QueryRefused(
            f"Refused: {name}() reads files or the network, which the console does not allow. "
            f"Query the warehouse's tables and views instead, e.g. SELECT * FROM head_scores.")
    raise QueryRefused(
        f"Refused: {name}() is not one of the table functions the console allows (range, "
        f"generate_series, unnest, duckdb_tables(), duckdb_columns(), pragma_table_info(), ...). "
        f"Query the warehouse's tables and views instead.")


def _table_function_names(con: duckdb.DuckDBPyConnection) -> set[str]:
    """Names that are only table functions, table macros or pragmas (never scalar/aggregate)."""
    rows = con.execute(
        "SELECT lower(function_name), bool_or(function_type IN ('table', 'table_macro', 'pragma')), "
        "bool_and(function_type IN ('table', 'table_macro', 'pragma')) "
        "FROM duckdb_functions() GROUP BY ALL").fetchall()
    return {name for name, _, only_table in rows if only_table}


def _inspect_tree(con: duckdb.DuckDBPyConnection, query: str) -> None:
    """Refuse file/network access and SQL-from-string visible in the syntax tree of one SELECT."""
    try:
        _inspect(con, query)
    except RecursionError:
        raise QueryRefused("Refused: the query is nested too deeply for the console to check "
                           "(hundreds of levels of subqueries); flatten it with WITH.") from None


def _inspect(con: duckdb.DuckDBPyConnection, query: str) -> None:
    for name in _called_names(query):              # any position, even where the tree fails
        if name in SQL_TEXT_FUNCTIONS:
            _refuse_function(name)
    tree = json.loads(con.execute("SELECT json_serialize_sql(?)", [query]).fetchall()[0][0])
    if tree.get("error"):
        # forms the serialiser does not take (PIVOT, ...): every call that names a table
        # function outside the allow-list is refused; the locked connection settings still apply
        table_functions = _table_function_names(con)
        for name in _called_names(query):
            if (name in table_functions or name.startswith(_FILE_PREFIXES)) \
                    and name not in ALLOWED_TABLE_FUNCTIONS:
                _refuse_function(name)
        writes = sorted(_keywords(query) & _WRITE_WORDS)
        if writes:
            raise QueryRefused(f"Refused: {writes[0].upper()} inside a query is not allowed. {_WRITE_HINT}")
        return
    for kind, name in _walk(tree, []):
        if kind == "write":
            raise QueryRefused(f"Refused: {name} inside a WITH clause writes to the warehouse. "
                               f"{_WRITE_HINT}")
        if kind == "table_function" and name not in ALLOWED_TABLE_FUNCTIONS:
            _refuse_function(name)
        if kind == "function" and name in SQL_TEXT_FUNCTIONS:
            _refuse_function(name)
        if kind == "table" and _looks_like_path(name):
            raise QueryRefused(
                f"Refused: FROM '{name}' reads a file or URL, which the console does not allow. "
                f"Query the warehouse's tables and views instead (SHOW TABLES lists them).")


def check_query(sql: str, con: duckdb.DuckDBPyConnection | None = None) -> str:
    """Validate one console query and return its text; raise :class:`ConsoleError` otherwise.

    Without ``con`` only the statement type is checked; with a connection the syntax tree is
    inspected for file and network access and SQL-from-string too. Parses in the calling
    process: :func:`run_console_query` calls it inside its worker, never in the caller.
    """
    stmt = _split(sql)
    kind = _statement_type(stmt)
    if kind not in {t.name for t in _ALLOWED}:
        _refuse_type(kind, stmt.query)
    if con is not None:
        inner = _strip_explain(stmt.query) if kind == "EXPLAIN" else stmt.query
        if inner.strip():
            if kind == "EXPLAIN":
                check_query(inner)  # EXPLAIN of a write is refused like the write
            _inspect_tree(con, inner)
    return stmt.query


_HARDENING = (
    ("autoinstall_known_extensions", "false"),
    ("autoload_known_extensions", "false"),
    ("python_enable_replacements", "false"),
    ("enable_external_access", "false"),
)


def allow_shard_files(con: duckdb.DuckDBPyConnection, files: Sequence[str]) -> None:
    """On a connection opened with external access on (nothing of a query has run on it): allow
    exactly ``files`` (the Parquet files of shards attached in place, read by the writer's
    `head_embeddings` view), then turn external access off. :func:`harden` locks it after.

    DuckDB takes ``allowed_paths`` only while external access is on (and not in the connect
    config), hence this order. A query still cannot name a file itself: read_parquet and every
    other file function are refused by the inspection; only the view reads these files."""
    listing = ", ".join("'" + str(f).replace("'", "''") + "'" for f in files)
    con.execute(f"SET allowed_paths = [{listing}]")
    con.execute("SET enable_external_access = false")


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
                       fn: Callable[[str, str], Sequence[float]]) -> None:
    """Register ``clip_text(model_id VARCHAR, text VARCHAR) -> FLOAT[]`` on ``con``.

    ``fn(model_id, text)`` returns the unit text embedding (any 1-d float sequence or array),
    typically a cached text-tower call. Results are memoised per registration, so
    ``clip_text(model_id, 'a tornado')`` over many rows calls ``fn`` once per distinct pair.
    Combine with ``list_inner_product(vec, clip_text(...))``: the stored vectors are FLOAT[]
    (variable length), which ``array_inner_product`` does not accept without a cast to FLOAT[d].
    Remove it with ``con.remove_function('clip_text')`` before closing ``con`` if other
    connections to the same database stay open. (The console's worker registers its own
    ``clip_text``, which asks the calling process for each distinct pair.)
    """
    memo: dict[tuple[str, str], list[float]] = {}

    def clip_text(model_id: str, text: str) -> list[float]:
        key = (model_id, text)
        if key not in memo:
            memo[key] = _as_vector(fn(model_id, text))
        return memo[key]

    from duckdb import sqltypes as T
    con.create_function("clip_text", clip_text, [T.VARCHAR, T.VARCHAR],
                        duckdb.list_type(T.FLOAT))


def _as_vector(value) -> list[float]:
    import numpy as np
    return np.asarray(value, dtype=np.float32).reshape(-1).tolist()


# --------------------------------------------------------------------------- configuration

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B?)\s*$", re.I)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
          "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def _size(value: int | float | str) -> int:
    """Bytes from an int or a size like ``2.5GB``, ``512MiB`` (GB = 10**9, as DuckDB counts)."""
    if isinstance(value, (int, float)):
        return int(value)
    m = _SIZE_RE.match(str(value))
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS:
        raise ValueError(f"not a size: {value!r} (write e.g. 2.5GB or 512MB)")
    return int(float(m.group(1)) * _UNITS[unit])


def _fmt_size(n: int) -> str:
    for unit, f in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= f:
            return f"{n / f:.3g} {unit}"
    return f"{n} bytes"


def _env_size(name: str, default: int) -> int:
    value = os.environ.get(name)
    return _size(value) if value else default


def _duckdb_memory_limit(cap: int) -> str:
    """DuckDB's own limit inside the worker: the warehouse's (ATLAS_DUCKDB_MEMORY, 2GB), at most
    80 % of the worker's OS cap, so DuckDB's buffer manager refuses before malloc fails."""
    configured = _size(os.environ.get("ATLAS_DUCKDB_MEMORY") or "2GB")
    return f"{max(16, min(configured, int(cap * 0.8)) // 10**6)}MB"


def _console_threads() -> int:
    env = os.environ.get("ATLAS_CONSOLE_THREADS")
    return max(1, int(env)) if env else max(1, min(4, os.cpu_count() or 1))


# --------------------------------------------------------------------------- the worker, caller side
#
# Protocol. The caller starts `python -c "...console_worker.main()"` with pipes on stdin and
# stdout. Worker -> caller: frames of 1 kind byte + 8-byte big-endian length + payload:
#   S {"pid"}                 started (imports done), waiting for the request
#   C [model_id, text]        a clip_text() call; the caller answers with one JSON line
#   E {"kind", "message", "peak_rss", "reusable"}   the query failed or was refused (kind:
#                             refused, error, memory, timeout, missing, busy)
#   R {"rows", "truncated", "note", "peak_rss", "reusable"} then A <Arrow IPC stream>   the result
# reusable: the worker closed the warehouse, stayed under a quarter of its memory cap, and waits
# for another request line (else it exits; the caller kills it either way when it is not kept).
# Caller -> worker: one JSON line with the request, then one JSON line per C frame
# ({"vec": [...]} or {"error": "..."}).

_ROOT = Path(__file__).resolve().parents[1]
_BOOT = ("import sys; sys.path.insert(0, {root!r}); "
         "from warehouse.console_worker import main; main()")


class _Ended(Exception):
    """The worker closed its pipe without a final frame."""


class _Overdue(Exception):
    """A deadline passed while waiting for the worker."""


_spawner_lock = threading.Lock()
_spawner: tuple[int, "concurrent.futures.ThreadPoolExecutor"] | None = None


def _spawn(*args, **kwargs) -> subprocess.Popen:
    """Popen from one long-lived thread of this process. A worker dies with its parent
    (PR_SET_PDEATHSIG), and Linux sends that signal when the *thread* that forked the child ends:
    Streamlit runs every script run in a thread of its own, so a spare worker started during one
    run was killed when that run ended, and the next query could meet a dying worker."""
    import concurrent.futures
    global _spawner
    with _spawner_lock:
        if _spawner is None or _spawner[0] != os.getpid():
            _spawner = (os.getpid(), concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="atlas-console-spawner"))
        pool = _spawner[1]
    return pool.submit(subprocess.Popen, *args, **kwargs).result()


class _Worker:
    """One worker process (caller side): spawn, frames with deadlines, kill and reap."""

    def __init__(self) -> None:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        self.owner = os.getpid()
        self.t_spawn = time.monotonic()
        self.proc = _spawn([sys.executable, "-c", _BOOT.format(root=str(_ROOT))],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, close_fds=True, env=env)
        self.out_fd = self.proc.stdout.fileno()
        self.in_fd = self.proc.stdin.fileno()
        os.set_blocking(self.in_fd, False)
        self.buf = bytearray()
        self.started_at: float | None = None
        self.rusage = None
        self.hwm: int | None = None
        self.cap: int | None = None      # the memory cap of the requests it served
        self.status: int | None = None

    # -- reading and writing with deadlines

    def _fill(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Overdue()
        ready, _, _ = select.select([self.out_fd], [], [], left)
        if not ready:
            raise _Overdue()
        chunk = os.read(self.out_fd, 1 << 20)
        if not chunk:
            raise _Ended()
        self.buf += chunk

    def frame(self, deadline: float, max_len: int) -> tuple[bytes, bytes]:
        while len(self.buf) < 9:
            self._fill(deadline)
        kind = bytes(self.buf[:1])
        (n,) = struct.unpack(">Q", self.buf[1:9])
        if n > max_len:
            raise ConsoleError(f"The query worker sent {n:,} bytes at once, more than the "
                               f"{max_len:,} allowed; the query was stopped.")
        while len(self.buf) < 9 + n:
            self._fill(deadline)
        payload = bytes(self.buf[9:9 + n])
        del self.buf[:9 + n]
        return kind, payload

    def send(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        while view:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Overdue()
            _, ready, _ = select.select([], [self.in_fd], [], left)
            if not ready:
                raise _Overdue()
            try:
                n = os.write(self.in_fd, view)
            except BlockingIOError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                raise _Ended() from None
            view = view[n:]

    def wait_started(self) -> float:
        """Seconds spent waiting for the worker to finish starting (0 for a ready spare)."""
        if self.started_at is not None:
            return 0.0
        t0 = time.monotonic()
        try:
            kind, _ = self.frame(self.t_spawn + STARTUP_LIMIT_S, 1 << 16)
        except _Overdue:
            raise ConsoleError(f"The query worker did not start within {STARTUP_LIMIT_S:g} s "
                               f"(is the machine overloaded?); retry in a moment.") from None
        except _Ended:
            raise ConsoleError("The query worker exited while starting; see the server log.") from None
        if kind != b"S":
            raise ConsoleError("The query worker answered out of turn; retry.")
        self.started_at = time.monotonic()
        return self.started_at - t0

    def poll_started(self) -> bool:
        """Non-blocking: has the (spare) worker sent its start frame? False if it died."""
        if self.started_at is not None:
            return self.proc.poll() is None
        try:
            ready, _, _ = select.select([self.out_fd], [], [], 0)
            if ready:
                self.wait_started()
        except ConsoleError:
            return False
        return self.proc.poll() is None

    def _read_hwm(self) -> None:
        """The worker's peak RSS (VmHWM of its own address space) while it is still alive."""
        try:
            with open(f"/proc/{self.proc.pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"VmHWM:"):
                        self.hwm = int(line.split()[1]) * 1024
                        return
        except (OSError, ValueError, IndexError):
            pass

    def stop(self, grace_s: float = 0.0) -> None:
        """Kill the worker (it may already have exited; ``grace_s`` lets it exit on its own
        first) and reap it, keeping its rusage."""
        if self.status is not None or self.owner != os.getpid():
            return
        self._read_hwm()
        end = time.monotonic() + grace_s
        while grace_s > 0:
            try:
                pid, status, rusage = os.wait4(self.proc.pid, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                self.status, self.rusage = status, rusage
                self.proc.returncode = os.waitstatus_to_exitcode(status)
                self._close_pipes()
                return
            if time.monotonic() >= end:
                break
            time.sleep(0.01)
        try:
            os.kill(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            _, self.status, self.rusage = os.wait4(self.proc.pid, 0)
            self.proc.returncode = os.waitstatus_to_exitcode(self.status)
        except ChildProcessError:           # reaped elsewhere
            self.status = 0
        self._close_pipes()

    def _close_pipes(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass

    @property
    def peak_rss(self) -> int | None:
        """Peak RSS in bytes: the worker's own VmHWM (read before it was reaped, or sent in its
        last frame); else ``wait4``'s ru_maxrss, which Linux floors at the caller's own peak RSS
        (the spawned child inherits the caller's high-water mark until exec)."""
        if self.hwm is not None:
            return self.hwm
        return None if self.rusage is None else int(self.rusage.ru_maxrss) * 1024


_spare: _Worker | None = None
_spare_lock = threading.Lock()
_slots_lock = threading.Lock()
_slots: threading.BoundedSemaphore | None = None


def _slot_semaphore() -> threading.BoundedSemaphore:
    global _slots
    with _slots_lock:
        if _slots is None:
            n = int(os.environ.get("ATLAS_CONSOLE_WORKERS") or 2)
            _slots = threading.BoundedSemaphore(max(1, n))
        return _slots


def _spare_enabled() -> bool:
    return os.environ.get("ATLAS_CONSOLE_SPARE", "1").strip().lower() not in ("0", "false", "no", "off")


def _take_worker(cap: int) -> tuple[_Worker, bool]:
    """The spare worker if one is alive (and, if it served before, under the same memory cap),
    else a fresh one; (worker, was_spare)."""
    global _spare
    with _spare_lock:
        w, _spare = _spare, None
    if w is not None and w.owner == os.getpid() and w.cap in (None, cap) \
            and w.proc.poll() is None and w.poll_started():
        return w, True
    if w is not None:
        w.stop()
    return _Worker(), False


def _offer_spare(w: _Worker | None) -> None:
    """Keep ``w`` (a worker that answered and said it can serve again) or, with ``None``, a
    fresh worker as the spare for the next query; stop whatever is not kept."""
    global _spare
    if not _spare_enabled():
        if w is not None:
            w.stop()
        return
    if w is None:
        with _spare_lock:
            if _spare is not None and _spare.owner == os.getpid() and _spare.proc.poll() is None:
                return
        try:
            w = _Worker()
        except OSError:
            return
    with _spare_lock:
        old, _spare = _spare, w
    if old is not None and old is not w:
        old.stop()


def limits_text(max_rows: int = 10_000, timeout_s: float = 10) -> str:
    """The console's caps in words, as the defaults and environment set them."""
    cap = _env_size("ATLAS_CONSOLE_MEMORY", DEFAULT_MEMORY_BYTES)
    max_bytes = _env_size("ATLAS_CONSOLE_MAX_BYTES", DEFAULT_MAX_BYTES)
    return (f"At most {max_rows:,} rows and {_fmt_size(max_bytes)} of results, {timeout_s:g} s and "
            f"{_fmt_size(cap)} of memory per query")


def warm_up() -> None:
    """Start the spare worker now (if none is waiting), so the next query does not wait for a
    worker to start; the SQL console page calls it when it renders."""
    _offer_spare(None)


def _stop_spare() -> None:
    global _spare
    with _spare_lock:
        w, _spare = _spare, None
    if w is not None:
        w.stop()


atexit.register(_stop_spare)


def _memory_message(cap: int) -> str:
    return f"Query stopped: it used more than {_fmt_size(cap)} of memory. {_NARROW_HINT}"


def _timeout_message(timeout_s: float) -> str:
    return f"Query stopped: it ran past the {timeout_s:g} s limit. {_NARROW_HINT}"


def _raise_worker_error(err: dict, cap: int, timeout_s: float) -> None:
    kind, message = err.get("kind"), str(err.get("message") or "The query failed.")
    if kind == "refused":
        raise QueryRefused(message)
    if kind == "memory":
        raise QueryMemoryExceeded(_memory_message(cap))
    if kind == "timeout":
        raise QueryTimeout(_timeout_message(timeout_s))
    if kind == "missing":
        raise WarehouseMissingError(message)
    if kind == "busy":
        raise WarehouseBusyError(message)
    raise ConsoleError(message)


def _ended_error(w: _Worker, cap: int) -> ConsoleError:
    """The worker ended without an answer: a memory failure (peak RSS near the cap, or the
    abort/segfault of a failed allocation) or a crash."""
    st = w.status
    sig = os.WTERMSIG(st) if st is not None and os.WIFSIGNALED(st) else None
    rss = w.peak_rss or 0
    if rss >= 0.7 * cap or (sig == signal.SIGKILL and w.hwm is None):    # the kernel's OOM killer
        return QueryMemoryExceeded(_memory_message(cap))
    what = (f"signal {sig}, {signal.Signals(sig).name}" if sig is not None
            else f"exit status {os.waitstatus_to_exitcode(st or 0)}")
    return ConsoleError(f"Query stopped: the query worker ended unexpectedly ({what}). "
                        f"{_NARROW_HINT}")


def _to_frame(ipc: bytes):
    """The worker's Arrow IPC stream as a DataFrame, converted the way DuckDB converts (DECIMAL
    as float, DATE as datetime64, ...); timestamps and dates outside years 1-9999, which pandas
    cannot print, become DuckDB's text for them."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc
    table = pa.ipc.open_stream(pa.py_buffer(ipc)).read_all()
    table.validate()
    if not table.num_columns:
        return pd.DataFrame()
    as_text = []
    for i, field in enumerate(table.schema):
        if pa.types.is_timestamp(field.type) or pa.types.is_date(field.type):
            if pa.types.is_timestamp(field.type):
                us = pc.cast(pc.cast(table.column(i), pa.timestamp("us", tz=field.type.tz)), pa.int64())
            else:
                us = pc.multiply(pc.cast(pc.cast(table.column(i), pa.date32()), pa.int64()), 86_400_000_000)
            mm = pc.min_max(us)
            if mm["min"].is_valid and not (_MIN_US <= mm["min"].as_py() and mm["max"].as_py() <= _MAX_US):
                as_text.append(i)
    con = duckdb.connect(":memory:")
    try:
        rel = con.from_arrow(table)
        if as_text:
            names = table.schema.names
            cols = ", ".join(
                f'CAST(#{i + 1} AS VARCHAR) AS "{n.replace(chr(34), chr(34) * 2)}"' if i in as_text
                else f"#{i + 1}" for i, n in enumerate(names))
            rel = rel.project(cols)
        return rel.df()
    finally:
        con.close()


_MIN_US = -62135596800_000_000          # 0001-01-01 in µs since the epoch
_MAX_US = 253402300799_999_999          # 9999-12-31 23:59:59.999999


def _request(path, sql: str, max_rows: int, timeout_s: float, clip_text, max_bytes, memory_bytes,
             max_bytes_env: str, max_bytes_default: int, **extra) -> tuple[dict, int]:
    """Check a console request's arguments and text length (nothing is parsed here); returns the
    worker's request and the memory cap."""
    if max_rows < 1:
        raise ValueError("max_rows must be at least 1")
    if timeout_s <= 0:
        raise ValueError("timeout_s must be positive")
    cap = _size(memory_bytes) if memory_bytes is not None else _env_size("ATLAS_CONSOLE_MEMORY", DEFAULT_MEMORY_BYTES)
    max_bytes = _size(max_bytes) if max_bytes is not None else _env_size(max_bytes_env, max_bytes_default)
    if cap < 256 * 10**6:
        raise ValueError("memory_bytes must be at least 256MB (a worker needs ~0.2 GB to start)")
    if max_bytes < 1:
        raise ValueError("max_bytes must be positive")
    if not isinstance(sql, str) or not sql.strip():
        raise ConsoleError("The query is empty: write one SELECT statement, e.g. "
                           "SELECT * FROM model_scores.")
    if len(sql) > MAX_SQL_CHARS:
        raise QueryRefused(f"Refused: the query text is {len(sql):,} characters long; the console "
                           f"takes at most {MAX_SQL_CHARS:,}. Put long value lists in a WHERE on "
                           f"a range or a join instead.")
    path = Path(path if path is not None else default_warehouse_path()).absolute()
    request = {
        "path": str(path), "sql": sql, "max_rows": int(max_rows), "max_bytes": int(max_bytes),
        "memory_bytes": int(cap), "duckdb_memory": _duckdb_memory_limit(cap),
        "threads": _console_threads(), "lock_timeout_s": max(0.1, timeout_s / 2),
        "timeout_s": float(timeout_s),
        "clip_text": clip_text is not None, **extra,
    }
    return request, cap


def _answer_clip_text(w: "_Worker", payload: bytes, clip_text, deadline: float) -> None:
    """Answer the worker's clip_text(model_id, text) call (a C frame) with this process's function."""
    model_id, text = json.loads(payload)
    try:
        reply = {"vec": _as_vector(clip_text(model_id, text))}
    except Exception as exc:  # noqa: BLE001 - the query reports it
        reply = {"error": f"clip_text: {_one_line(exc)}"}
    w.send(json.dumps(reply).encode() + b"\n", deadline)


def run_console_query(path: str | os.PathLike | None, sql: str, max_rows: int = 10_000,
                      timeout_s: float = 10, clip_text: Callable | None = None, *,
                      max_bytes: int | str | None = None, memory_bytes: int | str | None = None,
                      preview_chars: int | None = None, stats: dict | None = None):
    """Run one read-only query on the warehouse in a worker process; return ``(rows, truncated)``.

    ``truncated`` is True when the result was cut: more than ``max_rows`` rows, or more than
    ``max_bytes`` of data (default 32 MB, env ``ATLAS_CONSOLE_MAX_BYTES``); the rows that fit are
    returned and ``rows.attrs["console_note"]`` says which cap cut it. ``preview_chars`` (the SQL
    console page: what a table can show) makes every text, binary and nested value a preview of at
    most that many characters and a size note (``[0.01, -0.02, ... … (768 items)``; see
    warehouse/console_cells.py), and ``max_bytes`` then caps the cells' total size as the caller
    will hold them (Arrow bytes plus a Python string's overhead per text cell); without it values
    come back whole and ``max_bytes`` counts Arrow bytes. The full result is :class:`CsvDownload`'s.
    ``timeout_s`` (default 10) is a hard wall-clock limit on the worker, from the moment it
    gets the query (parsing included); ``memory_bytes`` (default 2.5 GB, env
    ``ATLAS_CONSOLE_MEMORY``) its RLIMIT_DATA. ``clip_text``, when given, is offered as the SQL
    function ``clip_text(model_id, text)`` (see :func:`register_clip_text`); it runs in this
    process, once per distinct pair, and its time counts towards ``timeout_s``. ``stats``, if a
    dict, receives ``startup_s`` (waiting for a worker to start; 0 when one was waiting),
    ``query_s``, ``spare`` (a waiting worker was used), ``peak_rss`` (the worker's peak RSS in
    bytes over its life) and ``outcome`` (ok, truncated, refused, error, timeout, memory, crash).

    Raises :class:`QueryRefused` for anything but one SELECT/EXPLAIN without file access,
    :class:`QueryTimeout` / :class:`QueryMemoryExceeded` when a cap stopped it,
    :class:`ConsoleError` for syntax or query errors (one line each), and
    :class:`~warehouse.WarehouseMissingError` / :class:`~warehouse.WarehouseBusyError` for a
    missing or busy warehouse.
    """
    request, cap = _request(path, sql, max_rows, timeout_s, clip_text, max_bytes, memory_bytes,
                            "ATLAS_CONSOLE_MAX_BYTES", DEFAULT_MAX_BYTES,
                            preview_chars=int(preview_chars) if preview_chars else None)
    max_bytes = request["max_bytes"]
    info = stats if stats is not None else {}
    info.update(outcome=None, peak_rss=None, startup_s=None, query_s=None, spare=None)
    slots = _slot_semaphore()
    if not slots.acquire(timeout=timeout_s):
        raise ConsoleError("Other console queries are still running in this process; retry in a "
                           "moment.")
    w: _Worker | None = None
    reuse = False
    try:
        w, info["spare"] = _take_worker(cap)
        info["startup_s"] = w.wait_started()
        w.cap = cap
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        try:
            w.send(json.dumps(request).encode() + b"\n", deadline)
            while True:
                kind, payload = w.frame(deadline, 4 << 20)     # messages, clip_text calls
                if kind == b"C":
                    _answer_clip_text(w, payload, clip_text, deadline)
                elif kind == b"E":
                    err = json.loads(payload)
                    w.hwm = err.get("peak_rss")
                    if err.get("reusable") and not w.buf:
                        reuse = True        # it closed the warehouse and waits for more
                    else:
                        w.stop()
                    _raise_worker_error(err, cap, timeout_s)
                elif kind == b"R":
                    head = json.loads(payload)
                    w.hwm = head.get("peak_rss")
                    kind, ipc = w.frame(deadline, max_bytes + max_bytes // 10 + _FRAME_SLACK)
                    if kind != b"A":
                        raise ConsoleError("The query worker answered out of turn; retry.")
                    info["query_s"] = time.monotonic() - t0
                    if head.get("reusable") and not w.buf:
                        reuse = True
                    else:
                        w.stop()
                    break
                else:
                    raise ConsoleError("The query worker answered out of turn; retry.")
        except _Overdue:
            w.stop()
            info["outcome"] = "timeout"
            raise QueryTimeout(_timeout_message(timeout_s)) from None
        except _Ended:
            w.stop(grace_s=1.0)
            err = _ended_error(w, cap)
            info["outcome"] = "memory" if isinstance(err, QueryMemoryExceeded) else "crash"
            raise err from None
        try:
            df = _to_frame(ipc)
        except Exception as exc:  # noqa: BLE001 - any conversion failure is one line
            raise ConsoleError(f"The result could not be converted for display: {_one_line(exc)}") from None
        truncated = bool(head.get("truncated"))
        if head.get("note"):
            df.attrs["console_note"] = head["note"]
        info["outcome"] = "truncated" if truncated else "ok"
        return df, truncated
    except QueryMemoryExceeded:
        info["outcome"] = "memory"
        raise
    except QueryTimeout:
        info["outcome"] = "timeout"
        raise
    except QueryRefused:
        info["outcome"] = "refused"
        raise
    except ConsoleError:
        info["outcome"] = info["outcome"] or "error"
        raise
    finally:
        if w is not None:
            info["peak_rss"] = w.peak_rss
            if not reuse:
                w.stop()
                info["peak_rss"] = w.peak_rss
        slots.release()
        _offer_spare(w if reuse else None)


DEFAULT_DOWNLOAD_BYTES = 1_000_000_000   # CSV bytes of one download (env ATLAS_CONSOLE_DOWNLOAD_BYTES)
DEFAULT_DOWNLOAD_S = 60.0                # a download's query and CSV writing (env ATLAS_CONSOLE_DOWNLOAD_S)
STREAM_LIMIT_S = 900.0                   # the whole download, slow clients included
_CHUNK_MAX = (1 << 20) + 64              # a B frame (warehouse/console_worker.CSV_CHUNK)
_downloads_lock = threading.Lock()
_downloads: threading.BoundedSemaphore | None = None


def _download_semaphore() -> threading.BoundedSemaphore:
    global _downloads
    with _downloads_lock:
        if _downloads is None:
            _downloads = threading.BoundedSemaphore(max(1, int(os.environ.get("ATLAS_CONSOLE_DOWNLOADS") or 2)))
        return _downloads


class CsvDownload:
    """A console query's full result as CSV, written by a worker process and streamed from it in
    chunks of at most 1 MiB, so the calling (dashboard) process never holds the result.

        d = CsvDownload(path, sql)          # runs the query in a worker; raises like run_console_query
        d.rows, d.size, d.truncated, d.note
        for chunk in d.chunks(): ...        # the CSV bytes, d.size of them; then the worker is gone
        d.close()                           # any time, from any thread: kill the worker

    The worker runs the query under the console's inspection and caps (memory, ``timeout_s``
    for the query and the CSV writing: default 60 s, env ``ATLAS_CONSOLE_DOWNLOAD_S``), writes at
    most ``max_bytes`` of CSV (default 1 GB, env ``ATLAS_CONSOLE_DOWNLOAD_BYTES``; cut after the
    batch that passes it, ``truncated`` and ``note`` say so) to an unlinked temporary file, closes
    the warehouse, and then streams the file as the caller reads it (at most STREAM_LIMIT_S in
    all). Nested and binary values are DuckDB's text for them. At most ``ATLAS_CONSOLE_DOWNLOADS``
    (default 2) downloads run at once per process, beside the console's queries.
    """

    def __init__(self, path: str | os.PathLike | None, sql: str, *, timeout_s: float | None = None,
                 clip_text: Callable | None = None, max_bytes: int | str | None = None,
                 memory_bytes: int | str | None = None) -> None:
        timeout_s = float(timeout_s or os.environ.get("ATLAS_CONSOLE_DOWNLOAD_S") or DEFAULT_DOWNLOAD_S)
        request, self.cap = _request(path, sql, 1, timeout_s, clip_text, max_bytes, memory_bytes,
                                     "ATLAS_CONSOLE_DOWNLOAD_BYTES", DEFAULT_DOWNLOAD_BYTES,
                                     mode="csv", stream_s=STREAM_LIMIT_S)
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._closed = False
        self._slot = _download_semaphore()
        if not self._slot.acquire(timeout=1.0):
            raise ConsoleError("Other downloads are still running on this server; retry in a moment.")
        self._w: _Worker | None = None
        self._sent = 0
        try:
            self._start(request, clip_text)
        except BaseException:
            self.close()
            raise

    def _start(self, request: dict, clip_text) -> None:
        self._w = w = _Worker()
        w.wait_started()
        w.cap = self.cap
        self._end = time.monotonic() + STREAM_LIMIT_S
        deadline = time.monotonic() + self.timeout_s
        try:
            w.send(json.dumps(request).encode() + b"\n", deadline)
            while True:
                kind, payload = w.frame(deadline, 4 << 20)
                if kind == b"C":
                    _answer_clip_text(w, payload, clip_text, deadline)
                elif kind == b"E":
                    err = json.loads(payload)
                    w.hwm = err.get("peak_rss")
                    _raise_worker_error(err, self.cap, self.timeout_s)
                elif kind == b"H":
                    head = json.loads(payload)
                    w.hwm = head.get("peak_rss")
                    self.rows, self.size = int(head["rows"]), int(head["bytes"])
                    self.truncated, self.note = bool(head.get("truncated")), head.get("note")
                    return
                else:
                    raise ConsoleError("The query worker answered out of turn; retry.")
        except _Overdue:
            raise QueryTimeout(_timeout_message(self.timeout_s)) from None
        except _Ended:
            w.stop(grace_s=1.0)
            raise _ended_error(w, self.cap) from None

    def chunks(self):
        """The CSV bytes, in the worker's chunks; raises ConsoleError if the worker stops early."""
        try:
            while self._sent < self.size:
                if self._closed or self._w is None:
                    raise ConsoleError("The download was stopped.")
                try:
                    kind, payload = self._w.frame(self._end, _CHUNK_MAX)
                except _Overdue:
                    raise ConsoleError(f"The download ran past {STREAM_LIMIT_S:g} s and was stopped.") from None
                except (_Ended, OSError, ValueError):
                    raise ConsoleError("The download was stopped: its worker ended early.") from None
                if kind != b"B":
                    raise ConsoleError("The query worker answered out of turn; the download was stopped.")
                self._sent += len(payload)
                yield payload
        finally:
            self.close()

    def close(self) -> None:
        """Kill the worker (if it still runs) and free the download slot; idempotent, any thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            w, self._w = self._w, None
        if w is not None:
            w.stop()
        self._slot.release()


EXAMPLE_QUERIES: dict[str, str] = {
    "Colour heads of every model": """\
-- heads labelled with the property 'colors', most consistent first
SELECT model_id, head_name, association, tag_entropy, confidence, top_text
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
    "Labels beyond chance, beside both baselines": """\
-- Cohen's kappa over all heads: of the labels ('labeler'), of every constant labeler and of the
-- tag-shuffled labeler (mean over its draws); invented = a property whose factor explains < 0.2
SELECT model_id, dataset_id, labeling, count(*) AS draws, round(avg(kappa), 3) AS kappa,
       round(avg(accuracy), 3) AS raw_agreement, round(avg(n_invented), 1) AS invented, any_value(n_heads) AS heads
FROM labeling_agreement
GROUP BY model_id, dataset_id, labeling
ORDER BY model_id, dataset_id, kappa DESC NULLS LAST;""",
    "Every score of every model": """\
SELECT model_id, dataset_id, score, round(value, 3) AS value, round(lo, 3) AS lo, round(hi, 3) AS hi
FROM model_measures
ORDER BY model_id, dataset_id, score;""",
    "Model scores": """\
SELECT model_id, association, tag_entropy, n_heads, n_analysed_heads, n_mixed_heads, n_properties
FROM model_scores
ORDER BY association DESC;""",
    "Label counts per property": """\
SELECT property, model_id, n_heads, share_of_heads, heads
FROM property_heads
ORDER BY property, n_heads DESC, model_id;""",
    "Per-layer scores": """\
SELECT model_id, layer, association, tag_entropy, n_heads
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
