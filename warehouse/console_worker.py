"""The SQL console's worker process: runs console queries on behalf of the dashboard, one at a
time, and is killed by its caller when one runs too long.

Started by :func:`warehouse.console.run_console_query` (never by hand). It imports duckdb and
pyarrow (not torch), warms DuckDB's parser on an in-memory database, announces itself and waits
on stdin for a request. For each request it caps its own memory with ``setrlimit(RLIMIT_DATA)``
(the first time; the cap cannot be raised again), opens the warehouse read-only with external
access off, hardens and locks the instance, inspects the statement, runs it and sends at most
``max_rows`` rows / ``max_bytes`` Arrow bytes back, then closes the warehouse. It serves another
request only while its peak RSS stayed under a quarter of its cap (and the query text was short);
otherwise it exits. The caller enforces the time limit by killing this process; ``alarm()`` is
a backstop, and the worker dies with its caller (``PR_SET_PDEATHSIG``). Stdout carries only the
protocol's frames (described in warehouse/console.py); anything else printed goes to stderr.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import signal
import struct
import sys
import threading


def _limit_memory(cap: int) -> None:
    """RLIMIT_DATA = ``cap`` (soft and hard: this process cannot raise it again)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    new = cap if hard == resource.RLIM_INFINITY else min(cap, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (new, new))


def peak_rss() -> int | None:
    """This process's peak RSS in bytes (VmHWM: its own address space, since exec)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


REUSE_MAX_SQL_CHARS = 100_000   # a worker that parsed a longer text is not reused
REUSE_MAX_RSS_SHARE = 0.25      # nor one whose peak RSS passed a quarter of its memory cap


class _Done(Exception):
    """The request was answered; ``reusable``: the worker may take another request (it closed
    the warehouse; its memory stayed small; nothing but the answer outlives the request)."""

    def __init__(self, reusable: bool) -> None:
        self.reusable = reusable


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when the process that started it dies (best effort)."""
    parent = os.getppid()
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)    # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:                                        # it died before prctl
        os._exit(0)


NICE = 10      # a console query yields the CPU to page renders (CFS weight 110 vs 1024 at nice 0)


def main() -> None:
    _die_with_parent()
    # Lower priority first: a CPU-bound query (a function-call bomb, a big join) then costs the
    # dashboard's own page renders little on a busy host; it still gets every idle cycle.
    with contextlib.suppress(OSError):
        os.nice(int(os.environ.get("ATLAS_CONSOLE_NICE", NICE)))
    # The protocol owns the real stdout; anything else printed (by DuckDB, warnings) goes to
    # stderr so it cannot corrupt a frame.
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    inp = sys.stdin.buffer
    lock = threading.Lock()

    def send(kind: bytes, payload: bytes) -> None:
        with lock:
            out.write(kind + struct.pack(">Q", len(payload)) + payload)

    def send_json(kind: bytes, obj) -> None:
        send(kind, json.dumps(obj).encode())

    import duckdb
    import pyarrow  # noqa: F401 - imported before the query arrives: a spare worker is ready

    import warehouse.console as C

    # warm the parser, the serialiser and the Arrow path on a throw-away in-memory database,
    # so that a spare worker has paid for its first-use costs before a query arrives
    warm = duckdb.connect(":memory:")
    try:
        C.check_query("SELECT 1 AS x FROM range(1)", warm)
        warm.sql("SELECT 1 AS x").to_arrow_reader(1024).read_all()
    finally:
        warm.close()

    send_json(b"S", {"pid": os.getpid()})
    cap = None
    while True:
        line = inp.readline()
        if not line:                   # the caller no longer needs this (spare) worker
            break
        req = json.loads(line)
        reusable = False
        opened: list = []           # the warehouse connection, closed before any answer

        def fail(kind: str, message: str, reusable: bool = True) -> None:
            # a refusal, or an error of the query itself (a binder error, a failed cast): the
            # worker can serve again unless memory ran out or it grew
            _close(opened)
            ok = reusable and kind not in ("memory", "timeout") and _reusable_after_run(req)
            send_json(b"E", {"kind": kind, "message": _short(message), "peak_rss": peak_rss(),
                             "reusable": ok})
            raise _Done(ok)

        # a backstop for the caller's kill: SIGALRM's default action ends the process even
        # inside a long C call (the caller normally kills it at timeout_s)
        signal.alarm(math.ceil(float(req.get("timeout_s", 60))) + 5)
        try:
            if cap is None:
                cap = int(req["memory_bytes"])
                _limit_memory(cap)
            elif int(req["memory_bytes"]) != cap:
                fail("error", "internal: a reused worker got another memory cap", reusable=False)
            _run(req, send, send_json, fail, inp, lock, opened)
        except _Done as done:
            reusable = done.reusable
        except MemoryError:
            _close(opened)
            _fail_quietly(send_json, "memory", "out of memory")
        except BaseException as exc:  # noqa: BLE001 - one line to the caller, never a traceback
            _close(opened)
            try:
                msg = C._one_line(exc)
            except BaseException:  # noqa: BLE001
                msg = type(exc).__name__
            _fail_quietly(send_json, "memory" if _is_memory_error(exc, duckdb) else "error",
                          msg if _is_memory_error(exc, duckdb) else f"The query failed: {msg}")
        signal.alarm(0)
        if not reusable:
            break
    out.flush()
    os._exit(0)


def _short(message: str, limit: int = 2000) -> str:
    """Messages that echo a huge query stay readable (and small)."""
    return message if len(message) <= limit else message[:limit] + " ..."


def _close(opened: list) -> None:
    """Close the request's warehouse connection (if any) so the file is free when the caller
    hears back; a DuckDB instance lives as long as its connection."""
    while opened:
        try:
            opened.pop().close()
        except BaseException:  # noqa: BLE001
            pass


def _fail_quietly(send_json, kind: str, message: str) -> None:
    try:
        send_json(b"E", {"kind": kind, "message": _short(message), "peak_rss": peak_rss(),
                         "reusable": False})
    except BaseException:  # noqa: BLE001 - the caller sees the worker end instead
        pass


def _is_memory_error(exc: BaseException, duckdb) -> bool:
    """Out of memory: Python's MemoryError, DuckDB's OutOfMemoryException (its buffer manager's
    limit, or a failed allocation under RLIMIT_DATA), Arrow's ArrowMemoryError, a bad_alloc."""
    if isinstance(exc, (MemoryError, duckdb.OutOfMemoryException)):
        return True
    return type(exc).__name__ == "ArrowMemoryError" or "std::bad_alloc" in str(exc)


def _run(req: dict, send, send_json, fail, inp, lock, opened: list) -> None:
    import duckdb
    from pathlib import Path

    from warehouse import console as C
    from warehouse.db import WarehouseBusyError, WarehouseMissingError, _open, in_place_shard_files

    sql = req["sql"]
    try:
        C.check_query(sql)                         # statement type first: nothing opened yet
    except C.QueryRefused as exc:
        fail("refused", str(exc))
    except C.ConsoleError as exc:
        fail("error", str(exc))

    cfg = {
        "memory_limit": req["duckdb_memory"], "threads": int(req["threads"]),
        "enable_external_access": False, "autoinstall_known_extensions": False,
        "autoload_known_extensions": False, "python_enable_replacements": False,
        "temp_directory": "",              # no spilling: a big sort fails instead of filling a disk
    }
    try:
        con = _open(Path(req["path"]), True, cfg, float(req["lock_timeout_s"]))
        opened.append(con)
        if in_place_shard_files(con):
            # head_embeddings reads Parquet shards: reopen, allow exactly those files, external
            # access off (console.allow_shard_files); the files are read again on the new
            # connection, so a set attached in between is covered
            _close(opened)
            con = _open(Path(req["path"]), True, {**cfg, "enable_external_access": True},
                        float(req["lock_timeout_s"]))
            opened.append(con)
            C.allow_shard_files(con, in_place_shard_files(con))
    except WarehouseMissingError as exc:
        fail("missing", str(exc))
    except WarehouseBusyError as exc:
        fail("busy", C._one_line(exc))
    try:
        try:
            con.execute("SET enable_progress_bar = false")   # nothing on the dashboard's stderr
            C.harden(con)
            query = C.check_query(sql, con)
        except C.QueryRefused as exc:
            fail("refused", str(exc))
        except C.ConsoleError as exc:
            fail("error", str(exc))
        if req.get("clip_text"):
            _register_remote_clip_text(con, send_json, inp, lock)
        try:
            rel = con.sql(query)
            reader = rel.to_arrow_reader(1024) if rel is not None else None
            if req.get("mode") == "csv":
                _send_csv(reader, int(req["max_bytes"]), float(req.get("stream_s", 900)), send, send_json,
                          close=lambda: _close(opened))
            _send_result(reader, int(req["max_rows"]), int(req["max_bytes"]), send, send_json,
                         reusable=lambda: _reusable_after_run(req), close=lambda: _close(opened),
                         preview_chars=req.get("preview_chars"))
        except duckdb.PermissionException as exc:
            fail("refused", f"Refused: the query tried to access files, the network or "
                            f"settings, which the console does not allow ({C._one_line(exc)}).")
        except duckdb.InterruptException:
            fail("timeout", "interrupted")
        except duckdb.ParserException as exc:
            fail("error", f"Syntax error: {C._one_line(exc)}")
        except duckdb.Error as exc:
            if _is_memory_error(exc, duckdb):
                fail("memory", C._one_line(exc))
            if "read-only" in str(exc).lower():
                fail("refused", f"Refused: {C._WRITE_HINT} ({C._one_line(exc)})")
            fail("error", f"The query failed: {C._one_line(exc)}")
    finally:
        _close(opened)


def _register_remote_clip_text(con, send_json, inp, lock) -> None:
    """``clip_text(model_id, text)``: each distinct pair is embedded by the calling process."""
    import duckdb
    from duckdb import sqltypes as T

    memo: dict[tuple[str, str], list[float]] = {}
    ask = threading.Lock()   # DuckDB may call from several threads; one question at a time

    def clip_text(model_id: str, text: str) -> list[float]:
        key = (model_id, text)
        with ask:
            if key not in memo:
                send_json(b"C", [model_id, text])
                reply = json.loads(inp.readline() or b'{"error": "the console went away"}')
                if "error" in reply:
                    raise ValueError(reply["error"])
                memo[key] = reply["vec"]
            return memo[key]

    con.create_function("clip_text", clip_text, [T.VARCHAR, T.VARCHAR], duckdb.list_type(T.FLOAT))


def _send_result(reader, max_rows: int, max_bytes: int, send, send_json, reusable, close,
                 preview_chars: int | None = None) -> None:
    """At most ``max_rows`` rows and ``max_bytes`` bytes as one Arrow IPC stream, sent after
    ``close()`` (the warehouse is free when the caller has the rows); raises :class:`_Done` with
    ``reusable()``. With ``preview_chars``, text, binary and nested values are previews of at most
    that many characters (warehouse/console_cells.py) and ``max_bytes`` caps what the previews cost
    once shown (their Arrow bytes plus a Python string's overhead per text cell); else it caps Arrow
    bytes."""
    import pyarrow as pa

    from warehouse.console_cells import Previewer, display_bytes

    if reader is None:                                   # a statement without a result
        ipc = _ipc(pa.schema([]), [])
        close()
        ok = reusable()
        send_json(b"R", {"rows": 0, "truncated": False, "note": None, "peak_rss": peak_rss(),
                         "reusable": ok})
        send(b"A", ipc)
        raise _Done(ok)
    preview = Previewer(reader.schema, int(preview_chars)) if preview_chars else None
    schema = preview.out_schema() if preview else reader.schema
    cost = display_bytes if preview else (lambda b, k=None: b.slice(0, b.num_rows if k is None else k).nbytes)
    batches, rows, nbytes, note = [], 0, 0, None
    for batch in reader:
        if not batch.num_rows:
            continue
        if rows >= max_rows:                             # one row more than the cap exists
            note = f"stopped at the first {max_rows:,} rows"
            break
        if rows + batch.num_rows > max_rows:
            batch, note = batch.slice(0, max_rows - rows), f"stopped at the first {max_rows:,} rows"
        if preview:
            batch = preview(batch)
        if nbytes + cost(batch) > max_bytes:
            keep = _rows_that_fit(batch, max_bytes - nbytes, cost)
            batch = batch.slice(0, keep)
            note = (f"stopped at the first {rows + keep:,} rows: the result passed the "
                    f"{_mb(max_bytes)} limit on result data" if rows + keep else
                    f"no rows shown: the first row alone passes the {_mb(max_bytes)} limit on "
                    f"result data")
        if batch.num_rows:
            batches.append(batch)
            rows += batch.num_rows
            nbytes += cost(batch)
        if note:
            break
    ipc = _ipc(schema, batches)
    del batches, reader
    if preview:
        preview.close()
    close()
    ok = reusable()
    send_json(b"R", {"rows": rows, "truncated": note is not None, "note": note, "peak_rss": peak_rss(),
                     "reusable": ok})
    send(b"A", ipc)
    raise _Done(ok)


CSV_CHUNK = 1 << 20          # bytes per B frame of a download


def _send_csv(reader, max_bytes: int, stream_s: float, send, send_json, close) -> None:
    """The whole result as CSV (warehouse/console_cells.CsvText: nested and binary values as DuckDB's
    text), at most ``max_bytes`` of it (cut after the batch that passes the cap), written to an
    unlinked temporary file while the query runs; then the warehouse is closed, an H frame says
    the size, and the file follows in B frames of at most CSV_CHUNK bytes, which the caller reads
    as its client takes them (the backstop alarm is moved to ``stream_s``). Never reusable."""
    import itertools
    import tempfile

    import pyarrow as pa
    import pyarrow.csv as pcsv

    from warehouse.console_cells import CsvText

    rows, size, note = 0, 0, None
    with tempfile.TemporaryFile(prefix="atlas-console-") as f:
        if reader is not None:
            text = CsvText(reader.schema)
            for batch in itertools.chain([None], reader):    # None: the header line
                if batch is not None and not batch.num_rows:
                    continue
                table = (pa.Table.from_batches([text(batch)], schema=text.out_schema()) if batch is not None
                         else text.out_schema().empty_table())
                buf = pa.BufferOutputStream()
                pcsv.write_csv(table, buf, write_options=pcsv.WriteOptions(include_header=batch is None))
                data = buf.getvalue()
                f.write(data)
                size += data.size
                rows += table.num_rows
                if size > max_bytes:
                    note = (f"the download stopped at {rows:,} rows: it passed the {_mb(max_bytes)} limit on "
                            f"downloads")
                    break
            text.close()
        del reader
        close()
        send_json(b"H", {"rows": rows, "bytes": size, "truncated": note is not None, "note": note,
                         "peak_rss": peak_rss()})
        signal.alarm(math.ceil(stream_s) + 5)
        f.seek(0)
        while True:
            chunk = f.read(CSV_CHUNK)
            if not chunk:
                break
            send(b"B", chunk)
    raise _Done(False)


def _reusable_after_run(req: dict) -> bool:
    """A worker whose query ran may serve again while its lifetime peak RSS stayed small (its
    allocator may keep what a big query took; RLIMIT_DATA caps the process, not the query)."""
    rss = peak_rss()
    return rss is not None and rss <= REUSE_MAX_RSS_SHARE * int(req["memory_bytes"]) \
        and len(req["sql"]) <= REUSE_MAX_SQL_CHARS


def _rows_that_fit(batch, budget: int, cost) -> int:
    """The largest k with cost(batch, k) <= budget (binary search; cost grows with k)."""
    lo, hi = 0, batch.num_rows
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(batch, mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _mb(n: int) -> str:
    return f"{n / 1e6:.3g} MB" if n >= 10**6 else f"{n / 1e3:.3g} KB"


def _ipc(schema, batches) -> bytes:
    import pyarrow as pa
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as w:
        for b in batches:
            w.write_batch(b)
    return sink.getvalue().to_pybytes()


if __name__ == "__main__":
    main()
