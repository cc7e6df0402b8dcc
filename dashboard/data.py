"""Which warehouse the dashboard reads, and cached calls of the named queries (warehouse/queries.py).

The warehouse path: `--warehouse PATH` after `--` on the streamlit command line, else
$ATLAS_WAREHOUSE, else $ATLAS_HOME/warehouse.duckdb (ATLAS_HOME defaults to ./var).
Query results are cached with st.cache_data under a key that includes the file's size and
mtime (and its WAL's), so results of a new ETL run show on the next rerun.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

import streamlit as st

from dashboard.safe_text import plain
from warehouse import WarehouseError, default_warehouse_path, queries
from warehouse.db import FILL_COMMAND

DEMO_COMMAND = "make demo"


def warehouse_path() -> Path:
    """The warehouse file this dashboard reads (see the module docstring for the order)."""
    argv = sys.argv[1:]
    for i, a in enumerate(argv):
        if a == "--warehouse" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if a.startswith("--warehouse="):
            return Path(a.split("=", 1)[1])
    if os.environ.get("ATLAS_WAREHOUSE"):
        return Path(os.environ["ATLAS_WAREHOUSE"])
    return default_warehouse_path(create=False)


def fill_commands(path: Path) -> list[str]:
    """The exact commands that fill the warehouse at `path`."""
    return [DEMO_COMMAND, f"{FILL_COMMAND} --warehouse {path}"]


def stamp(path: Path) -> tuple:
    """Changes whenever the file (or its write-ahead log) changes: part of every cache key."""
    out = []
    for p in (path, path.with_name(path.name + ".wal")):
        try:
            s = p.stat()
            out.append((s.st_mtime_ns, s.st_size))
        except OSError:
            out.append(None)
    return tuple(out)


@st.cache_data(show_spinner=False, max_entries=512)
def _cached(name: str, path: str, key: tuple, args: tuple) -> Any:
    return getattr(queries, name)(path, *args)


def q_kept(query: Callable, *args) -> Any:
    """``q``, and kept on disk per warehouse version (dashboard/cache.py), for the views that take a second
    or more to compute (label_kappa's head bootstrap, model_measures): `make demo`'s warm-up builds them,
    and a freshly started server reads them back instead of recomputing them on its first visit."""
    from dashboard import cache
    return cache.built(f"query-{query.__name__}", tuple(args), lambda: q(query, *args))


def q(query: Callable, *args) -> Any:
    """Run the named query `query` (a function of warehouse.queries) on this dashboard's warehouse, cached.

    A missing, locked or otherwise unreadable warehouse stops the page with a message that
    says what to do, instead of a traceback.
    """
    path = warehouse_path()
    try:
        return _cached(query.__name__, str(path), stamp(path), tuple(args))
    except WarehouseError as exc:
        st.error(plain(exc))
        st.stop()
