"""What is costly to build, built once per warehouse version: in this process's memory, and on disk so a
restarted server has it too (Metrics' chart specs, the heads-across-models matrices).

    value = cache.built("model-matrix", ("cka", ids), lambda: compute())

The key is the warehouse's identity and version (its resolved path and ``data.stamp``: size and mtime of
the file and its write-ahead log), a digest of the dashboard's code, and the caller's ``name`` and ``key``. The disk copy lives under
``cache/dashboard/<warehouse>-<version>/`` beside the warehouse file (under $ATLAS_HOME for the default
warehouse); when a warehouse changes, the folders of its older versions are removed. Only this process writes there (pickles of its own results, written to a
temporary name and renamed); a folder that cannot be written leaves the memory layer alone working.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Optional

from dashboard.data import stamp, warehouse_path

MAX_IN_MEMORY = 256
_memory: "OrderedDict[tuple, Any]" = OrderedDict()
_lock = threading.Lock()
_pruned: set[str] = set()


def _digest(value) -> str:
    return hashlib.sha256(repr(value).encode()).hexdigest()[:16]


def _code() -> str:
    """A digest of the dashboard's and the models' code: a chart drawn by other code is another entry."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted([*root.glob("dashboard/**/*.py"), *root.glob("models/*.py")]):
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


CODE = _code()


def folder(path: Optional[Path] = None) -> Path:
    """This warehouse version's cache folder: ``cache/dashboard/`` beside the warehouse file (for the
    default ``$ATLAS_HOME/warehouse.duckdb``, under $ATLAS_HOME), one subfolder per warehouse, version
    and code."""
    path = Path(path or warehouse_path())
    return path.parent / "cache" / "dashboard" / f"{_digest(str(path.resolve()))}-{_digest((stamp(path), CODE))}"


def _prune(here: Path) -> None:
    """Remove the folders of this warehouse's other (older) versions, once per process and version."""
    if str(here) in _pruned:
        return
    _pruned.add(str(here))
    prefix = here.name.split("-")[0] + "-"
    for other in here.parent.glob(prefix + "*"):
        if other != here and other.is_dir():
            shutil.rmtree(other, ignore_errors=True)


def built(name: str, key: tuple, build: Callable[[], Any], spinner: Optional[str] = None) -> Any:
    """``build()``'s result for (this warehouse version, name, key): from memory, else from disk, else
    built now (under a spinner saying ``spinner``, on a page) and kept in both."""
    path = warehouse_path()
    version = (str(path), stamp(path), name, key)
    with _lock:
        if version in _memory:
            _memory.move_to_end(version)
            return _memory[version]
    here = folder(path)
    file = here / f"{name}-{_digest(key)}.pkl"
    value, found = None, False
    if file.is_file():
        try:
            with open(file, "rb") as f:
                stored_key, value = pickle.load(f)
            found = stored_key == key
        except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError, ValueError):
            found = False
    if not found:
        if spinner:
            import streamlit as st
            with st.spinner(spinner):
                value = build()
        else:
            value = build()
        try:
            here.mkdir(parents=True, exist_ok=True)
            _prune(here)
            tmp = file.with_name(f".{file.name}.{os.getpid()}.{threading.get_ident()}")
            with open(tmp, "wb") as f:
                pickle.dump((key, value), f, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, file)
        except OSError:
            pass                               # a read-only folder: the memory layer still works
    with _lock:
        _memory[version] = value
        while len(_memory) > MAX_IN_MEMORY:
            _memory.popitem(last=False)
    return value


def forget_memory() -> None:
    """Drop the in-memory layer (tests: what a restarted server sees)."""
    with _lock:
        _memory.clear()
