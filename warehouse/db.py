"""Connections to the DuckDB warehouse: one writer, many readers, numbered migrations.

DuckDB lets exactly one *process* open a database file read-write, and while it holds the
file no other process can open it at all (not even read-only); read-only openers share the
file with each other but also keep a writer out. The warehouse therefore works like this:

* **Jobs** open the file with :func:`writer` for *one batch*: open read-write, apply pending
  migrations, ``BEGIN``, write, ``COMMIT`` (``ROLLBACK`` on error), close. Closing checkpoints
  the batch into the file, so the next reader sees it.
* **Readers** (the dashboard, the SQL console, jobs reading their inputs) open with
  :func:`connect` (read-only by default), read, and close straight away. The connection they get
  belongs to a per-process warm read instance that stays open while reads keep coming
  (``ATLAS_READER_KEEP_S``, default 2 s idle) and is closed as soon as a writer waits, so
  repeated dashboard queries hit a warm buffer pool without blocking jobs.
* Both retry with exponential backoff while the other side holds the lock, bounded by
  ``timeout_s`` (env ``ATLAS_LOCK_TIMEOUT``, default 60 s); then :class:`WarehouseBusyError`
  names the process DuckDB reports as the holder.
* A writer waiting for the lock announces itself in ``<warehouse>.write-pending``; new readers
  pause (at most ``READER_YIELD_S``) while that marker is fresh, so a busy dashboard cannot
  starve a job.

Because a reader can only open the file between two batches, it always sees the last
committed state, never half a batch.

Every connection sets DuckDB's ``memory_limit`` (DuckDB's own default is 80 % of RAM):
argument, else env ``ATLAS_DUCKDB_MEMORY``, else ``2GB``; ``threads`` likewise from
``ATLAS_DUCKDB_THREADS`` (default: DuckDB's, the number of cores).

Within one process DuckDB shares one database instance per file, and refuses a second
connection with a different configuration (read-only vs read-write, other memory limit)
while the first is open. Close readers before opening a writer in the same process; a
conflict with another thread's open connection is retried like a lock.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import re
import threading
import time
from pathlib import Path
from typing import Iterator

import duckdb

__all__ = [
    "WarehouseError",
    "WarehouseMissingError",
    "WarehouseBusyError",
    "MIGRATIONS_DIR",
    "check_location",
    "atlas_home",
    "default_warehouse_path",
    "connect",
    "writer",
    "migrate",
    "schema_version",
    "pending_migrations",
    "available_migrations",
    "optimize",
    "is_clustered",
    "in_place_shard_files",
    "release_readers",
]

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
DEFAULT_MEMORY_LIMIT = "2GB"
DEFAULT_LOCK_TIMEOUT_S = 60.0
READER_YIELD_S = 5.0          # how long a reader defers to a waiting writer, at most
READER_KEEP_S = 2.0           # how long an idle warm read instance stays open (ATLAS_READER_KEEP_S)
_PENDING_FRESH_S = 15.0       # a write-pending marker older than this is stale (crashed job)
FILL_COMMAND = "python -m etl run --model toy-shapes --dataset shapes:2000:seed=0"


class WarehouseError(RuntimeError):
    """Base class of the warehouse's own errors."""


class WarehouseMissingError(WarehouseError, FileNotFoundError):
    """The warehouse file does not exist (opening read-only never creates it)."""


class WarehouseBusyError(WarehouseError, TimeoutError):
    """Another process (or another connection in this process) held the file too long."""


# --------------------------------------------------------------------------- locations

def atlas_home(create: bool = True) -> Path:
    """``$ATLAS_HOME`` (default ``./var``), created if missing (unless ``create`` is False)."""
    home = Path(os.environ.get("ATLAS_HOME") or "var")
    if create:
        try:
            home.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WarehouseError(
                f"ATLAS_HOME {home} cannot be used as a folder ({exc.strerror or exc}); set ATLAS_HOME to a "
                f"writable folder, or pass --warehouse PATH") from None
    return home


def default_warehouse_path(create: bool = True) -> Path:
    """``$ATLAS_HOME/warehouse.duckdb`` (ATLAS_HOME defaults to ``./var``, created on demand;
    ``create=False`` for readers, which must not leave a folder behind)."""
    return atlas_home(create) / "warehouse.duckdb"


_DUCKDB_MAGIC = b"DUCK"      # bytes 8-12 of every DuckDB database file


def check_location(path: str | os.PathLike) -> Path:
    """A WarehouseError, before anything is opened or loaded, for a path that can hold no
    warehouse: a folder, a path under a file, or an existing file that is not a DuckDB database.
    Jobs call it first, so a wrong --warehouse fails before a model loads. Creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise WarehouseError(f"warehouse path {path} is a folder, not a DuckDB file; pass a file path, "
                             f"e.g. --warehouse {path / 'warehouse.duckdb'}")
    if path.is_file():
        try:
            with open(path, "rb") as f:
                head = f.read(12)
        except OSError as exc:
            raise WarehouseError(f"warehouse {path} cannot be read ({exc.strerror or exc}); fix its "
                                 f"permissions or choose another --warehouse PATH") from None
        if head[8:12] != _DUCKDB_MAGIC:
            raise WarehouseError(f"{path} is not a DuckDB warehouse (it does not start like a DuckDB database "
                                 f"file); point --warehouse at a .duckdb file these jobs wrote, or at a new path")
        return path
    for above in path.absolute().parents:
        if above.exists():
            if not above.is_dir():
                raise WarehouseError(f"warehouse path {path} lies under {above}, which is a file, not a folder; "
                                     f"choose another --warehouse PATH")
            break
    return path


def _check_location(path: Path, read_only: bool) -> None:
    """A WarehouseError for a path that cannot hold a warehouse (a folder, a file's child, an
    unwritable place for a writer), before DuckDB gets to answer with an IO error."""
    if path.is_dir():
        raise WarehouseError(f"warehouse path {path} is a folder, not a DuckDB file; pass a file path, "
                             f"e.g. --warehouse {path / 'warehouse.duckdb'}")
    if read_only:
        return
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WarehouseError(f"cannot create the folder {parent} for warehouse {path} "
                             f"({exc.strerror or type(exc).__name__}); choose a writable location with "
                             f"--warehouse PATH or ATLAS_HOME") from None
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise WarehouseError(f"warehouse {path} is not writable by this user; fix its permissions or "
                             f"choose another --warehouse PATH")
    if not path.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise WarehouseError(f"cannot create warehouse {path}: the folder {parent} is not writable; choose "
                             f"a writable location with --warehouse PATH or ATLAS_HOME")


def _open_error(path: Path, exc: Exception) -> WarehouseError:
    """A one-line WarehouseError for a DuckDB error that is not a lock conflict."""
    said = " ".join(str(exc).split())
    if "not a valid DuckDB database file" in said:
        return WarehouseError(f"{path} is not a DuckDB warehouse (DuckDB: {said}); point --warehouse at a "
                              f".duckdb file these jobs wrote, or at a new path")
    return WarehouseError(f"cannot open warehouse {path} (DuckDB: {said}); check the path, or point "
                          f"--warehouse at another file")


# --------------------------------------------------------------------------- connecting

def _memory_limit(value: str | None) -> str:
    return value or os.environ.get("ATLAS_DUCKDB_MEMORY") or DEFAULT_MEMORY_LIMIT


def _threads(value: int | None) -> int | None:
    if value is not None:
        return int(value)
    env = os.environ.get("ATLAS_DUCKDB_THREADS")
    return int(env) if env else None


def _lock_timeout(value: float | None) -> float:
    if value is not None:
        return float(value)
    env = os.environ.get("ATLAS_LOCK_TIMEOUT")
    return float(env) if env else DEFAULT_LOCK_TIMEOUT_S


def _is_lock_error(exc: Exception) -> bool:
    msg = str(exc)
    if isinstance(exc, duckdb.IOException):
        return "lock" in msg.lower()
    if isinstance(exc, duckdb.ConnectionException):
        return "different configuration" in msg
    return False


def _holder(exc: Exception) -> str:
    m = re.search(r"Conflicting lock is held in (.+?) \(PID (\d+)\)", str(exc))
    if m:
        return f"process {m.group(2)} ({m.group(1)})"
    if isinstance(exc, duckdb.ConnectionException):
        return ("another connection in this process with different settings "
                "(close read connections before opening a writer in the same process)")
    return "another process"


def _pending_marker(path: Path) -> Path:
    return path.with_name(path.name + ".write-pending")


def _writer_waiting(path: Path) -> bool:
    try:
        age = time.time() - _pending_marker(path).stat().st_mtime
    except OSError:
        return False
    return age < _PENDING_FRESH_S


def _config(memory_limit: str | None, threads: int | None) -> dict:
    cfg: dict = {"memory_limit": _memory_limit(memory_limit)}
    n_threads = _threads(threads)
    if n_threads is not None:
        cfg["threads"] = n_threads
    return cfg


def _quiet(con: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
    """No DuckDB progress bar on stderr: jobs draw their own (a per-connection setting)."""
    with contextlib.suppress(duckdb.Error):
        con.execute("SET enable_progress_bar = false")
    return con


def _open(path: Path, read_only: bool, cfg: dict, timeout_s: float | None) -> duckdb.DuckDBPyConnection:
    timeout = _lock_timeout(timeout_s)
    deadline = time.monotonic() + timeout
    delay = 0.01
    marker = _pending_marker(path)
    announced = False
    try:
        if read_only:
            # give a waiting writer its turn (bounded; stale markers are ignored)
            yield_until = time.monotonic() + min(READER_YIELD_S, timeout)
            while _writer_waiting(path) and time.monotonic() < yield_until:
                time.sleep(0.02)
        while True:
            _check_location(path, read_only)
            if read_only and not path.exists():
                raise WarehouseMissingError(
                    f"No warehouse at {path}. Fill it first: `{FILL_COMMAND} --warehouse {path}` "
                    f"(or `make demo` for the default warehouse), or point ATLAS_HOME / "
                    f"--warehouse at an existing one.")
            try:
                return _quiet(duckdb.connect(str(path), read_only=read_only, config=cfg))
            except (duckdb.IOException, duckdb.ConnectionException) as exc:
                if not _is_lock_error(exc):
                    raise _open_error(path, exc) from exc
                if time.monotonic() >= deadline:
                    raise WarehouseBusyError(
                        f"Warehouse {path} is held by {_holder(exc)} for more than {timeout:g} s "
                        f"({'read' if read_only else 'write'} open gave up). A job writes in "
                        f"batches and readers close at once, so this usually means a process "
                        f"keeps a connection open: wait for it or stop it, or raise "
                        f"ATLAS_LOCK_TIMEOUT. DuckDB said: {exc}") from exc
                if not read_only and not announced:
                    try:
                        marker.touch()
                        announced = True
                    except OSError:
                        pass
                elif announced:
                    with contextlib.suppress(OSError):
                        marker.touch()  # keep it fresh while we wait
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())) * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 0.5)
            except duckdb.Error as exc:   # a newer file format, a damaged file, ...
                raise _open_error(path, exc) from exc
    finally:
        if announced:
            with contextlib.suppress(OSError):
                marker.unlink()


# ---------------------------------------------------------------- warm read instances
#
# Opening the file costs little, but a fresh DuckDB instance starts with an empty buffer
# pool: the first scan of a head's vectors is 3-5x slower than the next. So a process keeps
# its read-only instance ("keeper" connection) open while it is being used; connect() hands
# out further connections to that instance (DuckDB shares one instance per file per process). A reaper thread closes the keeper after
# READER_KEEP_S seconds without a new connect(), or at once when a writer has announced
# itself in the write-pending marker, so jobs still get the file within a fraction of a
# second after the queries in flight finish. A reader never sees a half-written state: while
# the keeper is open no process can write the file at all.

class _Keeper:
    __slots__ = ("con", "cfg", "last_used", "pid")

    def __init__(self, con: duckdb.DuckDBPyConnection, cfg: dict) -> None:
        self.con, self.cfg, self.last_used, self.pid = con, cfg, time.monotonic(), os.getpid()


_keepers: dict[Path, _Keeper] = {}
_keepers_lock = threading.Lock()
_reaper: threading.Thread | None = None


def _keep_seconds() -> float:
    env = os.environ.get("ATLAS_READER_KEEP_S")
    return float(env) if env else READER_KEEP_S


def _drop(path: Path) -> None:
    k = _keepers.pop(path, None)
    if k is not None and k.pid == os.getpid():
        with contextlib.suppress(duckdb.Error):
            k.con.close()


def release_readers(path: str | os.PathLike | None = None) -> int:
    """Close this process's warm read instance of ``path`` (all warehouses when None).

    Connections already handed out keep working (and keep the instance) until closed. Called by :func:`writer` (a
    process cannot write a file it holds read-only) and tests.
    """
    with _keepers_lock:
        targets = list(_keepers) if path is None else [Path(path).resolve()]
        n = sum(1 for p in targets if p in _keepers)
        for p in targets:
            _drop(p)
        return n


atexit.register(release_readers)   # close warm instances cleanly at interpreter exit


def _reap() -> None:
    global _reaper
    while True:
        time.sleep(0.05)
        with _keepers_lock:
            now, keep = time.monotonic(), _keep_seconds()
            # (no connection may stay referenced from this daemon thread's frame)
            for p in [p for p, k in _keepers.items()
                      if now - k.last_used > keep or k.pid != os.getpid() or _writer_waiting(p)]:
                _drop(p)
            if not _keepers:
                _reaper = None
                return


def _warm_connection(p: Path, cfg: dict, timeout_s: float | None) -> duckdb.DuckDBPyConnection:
    key = p.resolve() if p.exists() else p.absolute()
    with _keepers_lock:
        k = _keepers.get(key)
        if k is not None:
            if k.cfg == cfg and k.pid == os.getpid() and not _writer_waiting(p):
                k.last_used = time.monotonic()
                # an independent connection to the keeper's instance (DuckDB's instance
                # cache), not a cursor: closing the keeper must not close it
                return _quiet(duckdb.connect(str(p), read_only=True, config=cfg))
            _drop(key)
    con = _open(p, True, cfg, timeout_s)
    global _reaper
    with _keepers_lock:
        if key in _keepers:           # another thread opened one meanwhile: same instance
            return con
        _keepers[key] = _Keeper(con, cfg)
        if _reaper is None:
            _reaper = threading.Thread(target=_reap, name="atlas-warehouse-reaper", daemon=True)
            _reaper.start()
        return _quiet(duckdb.connect(str(p), read_only=True, config=cfg))


def connect(path: str | os.PathLike | None = None, read_only: bool = True,
            memory_limit: str | None = None, threads: int | None = None,
            timeout_s: float | None = None) -> duckdb.DuckDBPyConnection:
    """Open the warehouse; retry (bounded by ``timeout_s``) while another process holds it.

    ``path`` defaults to :func:`default_warehouse_path`. Use it as ``with connect(p) as con:``
    and close it after reading: read connections share a per-process warm instance
    that stays open only while readers keep coming (``$ATLAS_READER_KEEP_S``, default 2 s;
    0 opens a fresh instance every time) and is closed as soon as a writer waits. A read-only
    open of a missing file raises :class:`WarehouseMissingError` saying how to fill it. A
    read-write open creates the file (and its folder) and applies pending migrations; prefer
    :func:`writer`, which also wraps the work in one transaction. ``memory_limit`` defaults to
    ``$ATLAS_DUCKDB_MEMORY`` or ``2GB``; ``threads`` to ``$ATLAS_DUCKDB_THREADS`` or all cores.
    """
    p = Path(path) if path is not None else default_warehouse_path(create=not read_only)
    cfg = _config(memory_limit, threads)
    if read_only:
        if _keep_seconds() > 0:
            return _warm_connection(p, cfg, timeout_s)
        return _open(p, True, cfg, timeout_s)
    _check_location(p, read_only=False)
    release_readers(p)
    con = _open(p, False, cfg, timeout_s)
    try:
        migrate(con)
    except BaseException:
        con.close()
        raise
    return con


@contextlib.contextmanager
def writer(path: str | os.PathLike | None = None, memory_limit: str | None = None,
           threads: int | None = None, timeout_s: float | None = None
           ) -> Iterator[duckdb.DuckDBPyConnection]:
    """One write batch: open read-write (retrying on lock), migrate, BEGIN, yield, COMMIT, close.

    On any exception the batch is rolled back and the exception re-raised. Keep the body to
    one batch (seconds): readers cannot open the file while it runs.
    """
    con = connect(path, read_only=False, memory_limit=memory_limit, threads=threads,
                  timeout_s=timeout_s)
    try:
        con.execute("BEGIN TRANSACTION")
        try:
            yield con
        except BaseException:
            with contextlib.suppress(duckdb.Error):
                con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")
    finally:
        con.close()


# --------------------------------------------------------------------------- migrations

_MIGRATION_RE = re.compile(r"^(\d{3,})_([A-Za-z0-9_\-]+)\.sql$")


def available_migrations(directory: Path = MIGRATIONS_DIR) -> list[tuple[int, str, Path]]:
    """The ``NNN_name.sql`` files of ``directory`` as ``(version, name, path)``, in order."""
    found: dict[int, tuple[int, str, Path]] = {}
    for f in sorted(directory.glob("*.sql")):
        m = _MIGRATION_RE.match(f.name)
        if not m:
            raise WarehouseError(f"Migration file {f} is not named NNN_name.sql; rename it.")
        version = int(m.group(1))
        if version in found:
            raise WarehouseError(
                f"Two migrations share version {version}: {found[version][2].name} and {f.name}; "
                f"renumber one of them.")
        found[version] = (version, m.group(2), f)
    return [found[v] for v in sorted(found)]


def _ensure_migrations_table(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("""
        CREATE TABLE IF NOT EXISTS schema_migrations (
            version    INTEGER PRIMARY KEY,
            name       VARCHAR NOT NULL,
            applied_at TIMESTAMP DEFAULT current_timestamp
        )""")


def _has_migrations_table(con: duckdb.DuckDBPyConnection) -> bool:
    return bool(con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'schema_migrations' "
        "AND schema_name = 'main' AND database_name = current_database()").fetchall()[0][0])


def schema_version(con: duckdb.DuckDBPyConnection) -> int:
    """Highest applied migration version (0 for an empty database)."""
    if not _has_migrations_table(con):
        return 0
    return int(con.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchall()[0][0])


def pending_migrations(con: duckdb.DuckDBPyConnection,
                       directory: Path = MIGRATIONS_DIR) -> list[tuple[int, str, Path]]:
    """Migrations of ``directory`` not yet recorded in ``schema_migrations``."""
    applied: set[int] = set()
    if _has_migrations_table(con):
        applied = {r[0] for r in con.execute("SELECT version FROM schema_migrations").fetchall()}
    return [m for m in available_migrations(directory) if m[0] not in applied]


def migrate(con: duckdb.DuckDBPyConnection, directory: Path = MIGRATIONS_DIR) -> list[int]:
    """Apply pending migrations in version order, each in its own transaction.

    Returns the versions applied. A failing migration is rolled back and raised as
    :class:`WarehouseError` naming the file; earlier ones stay applied.
    """
    pending = pending_migrations(con, directory)
    if not pending:
        return []
    _ensure_migrations_table(con)
    from .writes import head_embeddings_as_table   # shards attached in place: migrate the table, not the view
    with head_embeddings_as_table(con):
        return _apply(con, pending)


def _apply(con: duckdb.DuckDBPyConnection, pending: list[tuple[int, str, Path]]) -> list[int]:
    done = []
    for version, name, f in pending:
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(f.read_text())
            con.execute("INSERT INTO schema_migrations (version, name) VALUES (?, ?)", [version, name])
            con.execute("COMMIT")
        except duckdb.Error as exc:
            with contextlib.suppress(duckdb.Error):
                con.execute("ROLLBACK")
            raise WarehouseError(f"Migration {f.name} failed and was rolled back: {exc}") from exc
        done.append(version)
    return done


# --------------------------------------------------------------------------- maintenance

def optimize(con: duckdb.DuckDBPyConnection, model_id: str | None = None) -> int:
    """Re-cluster ``head_embeddings`` so that the rows of one head are contiguous; return rows moved.

    DuckDB keeps min/max zonemaps per column segment and row group; once a head's rows sit
    together (sorted by layer, head, image_id) a ``WHERE model_id = ? AND layer = ? AND
    head = ?`` scan skips every other head's data, which is what keeps per-head neighbour
    queries fast however many heads and models the warehouse holds. The embed job appends
    rows batch by batch (all heads of a batch of images interleaved), so it must call this at
    its end, inside a :func:`writer`, for the model it embedded: ``optimize(con, model_id)``.
    Only that model's rows are rewritten (``model_id=None`` rewrites every model, one at a
    time), and only when they are not in that order already (:func:`is_clustered`): a rerun
    that added nothing rewrites nothing, so the file does not grow. Idempotent; a killed job
    leaves correct but unclustered rows until the next call.
    """
    from .writes import head_embeddings_target
    table = head_embeddings_target(con)   # the table's own rows, never those of shards read in place
    if model_id is None:
        models = [r[0] for r in con.execute(
            f"SELECT DISTINCT model_id FROM {table} ORDER BY model_id").fetchall()]
    else:
        models = [model_id]
    moved = 0
    for m in models:
        if is_clustered(con, m):
            continue
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE _atlas_sorted_heads AS
            SELECT model_id, image_id, layer, head, vec FROM {table}
            WHERE model_id = ? ORDER BY layer, head, image_id""", [m])
        con.execute(f"DELETE FROM {table} WHERE model_id = ?", [m])
        moved += con.execute(f"INSERT INTO {table} (model_id, image_id, layer, head, vec) "
                             "SELECT * FROM _atlas_sorted_heads").fetchall()[0][0]
        con.execute("DROP TABLE _atlas_sorted_heads")
    return moved


def is_clustered(con: duckdb.DuckDBPyConnection, model_id: str) -> bool:
    """Whether the head-embedding rows of ``model_id`` (the table's own, as :func:`optimize` sees them)
    lie in storage order sorted by (layer, head, image_id): one scan of three key columns in rowid
    order, no vectors read (a few ms for 100,000 rows)."""
    from .writes import head_embeddings_target
    table = head_embeddings_target(con)
    (unsorted,) = con.execute(f"""
        SELECT count(*) FROM (
            SELECT layer, head, image_id, lag(layer) OVER w AS pl, lag(head) OVER w AS ph,
                   lag(image_id) OVER w AS pi
            FROM {table} WHERE model_id = ? WINDOW w AS (ORDER BY rowid))
        WHERE pl > layer OR (pl = layer AND (ph > head OR (ph = head AND pi > image_id)))""",
                              [model_id]).fetchone()
    return unsorted == 0


def in_place_shard_files(con: duckdb.DuckDBPyConnection) -> list[str]:
    """The head_embeddings Parquet files of shard sets attached in place (migration 005's
    `shard_sets`), in a stable order; [] before that migration or when none is."""
    if not con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'shard_sets' "
                       "AND schema_name = 'main' AND database_name = current_database()").fetchall()[0][0]:
        return []
    return [f for (files,) in con.execute("SELECT files FROM shard_sets WHERE mode = 'in_place' "
                                          "ORDER BY shard_dir").fetchall() for f in files]
