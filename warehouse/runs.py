"""Job bookkeeping: one row in ``runs`` per job execution, one row in ``errors`` per skipped item.

    from warehouse.runs import run_record, record_error
    with run_record(path, "embed", {"model": "toy-shapes", "dataset": "shapes:2000:seed=0"}) as run_id:
        for batch in batches:
            with writer(path) as con:
                ...                                       # write the batch
                record_error(con, run_id, "img/42.png", "truncated PNG")

A job that finds everything already stored marks its run ``run_id.skipped = True``: it ends
'skipped', so the runs table shows what a re-run recomputed and what it did not.

``start_run`` and ``finish_run`` each open their own short write batch, so a job never holds
the warehouse between batches.

A run records the process that runs it (``pid``, ``host``). A job killed outright (SIGKILL, a
crash, a power cut) never finishes its run; :func:`mark_interrupted`, called by every
:func:`start_run`, turns the 'running' rows of this host whose process is gone into
'interrupted', and :func:`effective_status` tells a reader the same without writing.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
from datetime import datetime, timezone
from typing import Any, Iterator, Optional

import duckdb

from .db import writer

__all__ = ["STATUSES", "RunId", "new_run_id", "start_run", "finish_run", "record_error", "run_record",
           "completed_run", "up_to_date", "changed_since_start", "mark_interrupted", "pid_alive", "effective_status", "this_host"]

STATUSES = ("running", "ok", "skipped", "failed", "interrupted")


class RunId(str):
    """A run's id (a plain ``str`` for every caller) that a job can mark as skipped: set
    ``run.skipped = True`` when it found everything already done, and the run ends 'skipped'."""
    skipped = False


def new_run_id(job: str) -> str:
    """``<job>-<UTC yyyymmddThhmmss>-<6 hex>``: sortable by time, unique across processes."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"{job}-{stamp}-{secrets.token_hex(3)}"


def _params_json(params: Any) -> str:
    try:
        return json.dumps(params if params is not None else {}, sort_keys=True, default=str)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"run params must be JSON-serialisable (a dict of plain values): {exc}") from exc


def this_host() -> str:
    """The name this machine records in ``runs.host``."""
    return socket.gethostname()


def pid_alive(pid: int | None) -> bool:
    """Whether process ``pid`` exists on this host (a process we may not signal exists too)."""
    if pid is None or int(pid) <= 0:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def effective_status(status: str, pid: int | None, host: str | None) -> str:
    """A run's status as a reader should show it: 'interrupted' for a 'running' run of this host
    whose process is gone. Runs of other hosts, and runs recorded before their process was
    (``pid`` NULL), keep their stored status: their process cannot be checked from here."""
    if status == "running" and pid is not None and host == this_host() and not pid_alive(pid):
        return "interrupted"
    return status


def mark_interrupted(path: str | os.PathLike | None, con: duckdb.DuckDBPyConnection | None = None) -> list[str]:
    """Set status 'interrupted' (and ``finished_at``) on the 'running' runs of this host whose
    process is gone; returns their run ids. Inside ``con``'s write batch when given, else in its own."""
    if con is None:
        with writer(path) as own:
            return mark_interrupted(path, own)
    rows = con.execute("SELECT run_id, pid FROM runs WHERE status = 'running' AND host = ? AND pid IS NOT NULL",
                       [this_host()]).fetchall()
    dead = [run_id for run_id, pid in rows if not pid_alive(pid)]
    if dead:
        con.execute("UPDATE runs SET status = 'interrupted', finished_at = current_timestamp, "
                    "error = 'the process ' || pid || ' on ' || host || ' ended without finishing the run' "
                    "WHERE list_contains(?, run_id)", [dead])
    return dead


def start_run(path: str | os.PathLike | None, job: str, params: dict | None = None) -> str:
    """Insert a ``runs`` row with status 'running' (this process's pid and host) and return its
    ``run_id``; earlier runs of this host whose process is gone become 'interrupted' first."""
    if not job:
        raise ValueError("start_run needs a job name, e.g. 'embed'")
    run_id = new_run_id(job)
    with writer(path) as con:
        mark_interrupted(path, con)
        con.execute("INSERT INTO runs (run_id, job, params, status, pid, host) VALUES (?, ?, ?, 'running', ?, ?)",
                    [run_id, job, _params_json(params), os.getpid(), this_host()])
    return run_id


def finish_run(path: str | os.PathLike | None, run_id: str, status: str = "ok",
               error: str | None = None) -> None:
    """Set a run's final ``status`` ('ok', 'skipped' or 'failed'), ``finished_at`` and ``error`` text."""
    if status not in ("ok", "skipped", "failed"):
        raise ValueError(f"finish_run status must be 'ok', 'skipped' or 'failed', not {status!r}")
    with writer(path) as con:
        found = con.execute(
            "UPDATE runs SET status = ?, finished_at = current_timestamp, error = ? "
            "WHERE run_id = ? RETURNING run_id", [status, error, run_id]).fetchall()
        if not found:
            raise KeyError(f"No run {run_id!r} in the warehouse; start it with start_run() first.")


def record_error(con: duckdb.DuckDBPyConnection, run_id: str | None, item: str, reason: str) -> None:
    """Record a skipped item (file path or item key) and why, inside the caller's write batch."""
    con.execute("INSERT INTO errors (run_id, item, reason) VALUES (?, ?, ?)",
                [run_id, str(item), str(reason)])


@contextlib.contextmanager
def run_record(path: str | os.PathLike | None, job: str, params: dict | None = None) -> Iterator[str]:
    """Start a run, yield its id, finish it 'ok', or 'failed' with the exception text on error.

    The exception is re-raised. Ctrl-C (KeyboardInterrupt) is recorded as failed too.
    """
    run_id = RunId(start_run(path, job, params))
    try:
        yield run_id
    except BaseException as exc:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        with contextlib.suppress(Exception):
            finish_run(path, run_id, "failed", text)
        raise
    finish_run(path, run_id, "skipped" if run_id.skipped else "ok")


def completed_run(path: str | os.PathLike | None, job: str, params: dict) -> str | None:
    """The latest run of ``job`` with exactly these ``params`` that ended 'ok' (None if there is none)."""
    from .db import connect
    with connect(path, read_only=True) as con:
        row = con.execute("SELECT run_id FROM runs WHERE job = ? AND status = 'ok' AND params::VARCHAR = ? "
                          "ORDER BY started_at DESC LIMIT 1", [job, _params_json(params)]).fetchone()
    return row[0] if row else None


def _others_since(con, job: str, since, key: Optional[str], value: Optional[str]) -> int:
    """Runs of jobs other than ``job`` for ``params[key] == value`` (any params when ``key`` is None)
    that started after ``since`` and did not end 'skipped'."""
    if key is None:
        (n,) = con.execute("SELECT count(*) FROM runs WHERE job <> ? AND started_at > ? AND status <> 'skipped'",
                           [job, since]).fetchone()
        return int(n)
    (n,) = con.execute("SELECT count(*) FROM runs WHERE job <> ? AND started_at > ? AND status <> 'skipped' "
                       "AND json_extract_string(params, '$.' || ?) = ?", [job, since, key, value]).fetchone()
    return int(n)


def up_to_date(path: str | os.PathLike | None, job: str, params: dict, key: Optional[str] = "model_id") -> str | None:
    """The latest 'ok' or 'skipped' run of ``job`` with exactly these ``params`` after which no other
    job changed anything for the same ``params[key]`` (no run of another job with that key started
    after it finished, except runs that ended 'skipped'); None when there is none. What `run-zoo` asks
    before loading a model: a pipeline that completed and was not touched since has nothing left to do.
    ``key`` None: no other job changed anything at all since (what an in-place study asks)."""
    from .db import connect
    if path is None or not os.path.exists(path):
        return None
    with connect(path, read_only=True) as con:
        row = con.execute("SELECT run_id, finished_at FROM runs WHERE job = ? AND status IN ('ok', 'skipped') "
                          "AND params::VARCHAR = ? ORDER BY started_at DESC LIMIT 1",
                          [job, _params_json(params)]).fetchone()
        if row is None:
            return None
        value = None if key is None else str(params[key])
        return row[0] if _others_since(con, job, row[1], key, value) == 0 else None


def changed_since_start(path: str | os.PathLike | None, run_id: str, key: str = "model_id") -> bool:
    """Whether a run of another job for the same ``params[key]`` as run ``run_id`` (a composing job such
    as `run`) started after it and did more than skip: the composing job then did work."""
    from .db import connect
    with connect(path, read_only=True) as con:
        job, started, value = con.execute(
            "SELECT job, started_at, json_extract_string(params, '$.' || ?) FROM runs WHERE run_id = ?",
            [key, run_id]).fetchone()
        return _others_since(con, job, started, key, value) > 0
