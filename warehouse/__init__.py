"""The DuckDB warehouse: schema migrations, one-writer-many-readers connections, run records.

    from warehouse import connect, writer, default_warehouse_path
    with writer(path) as con: ...            # one batch: migrate, BEGIN ... COMMIT, close
    with connect(path) as con: ...           # short-lived read-only connection

See warehouse/db.py for the locking design and warehouse/migrations/*.sql for the schema.
"""

import re

from .db import (
    MIGRATIONS_DIR,
    WarehouseBusyError,
    WarehouseError,
    WarehouseMissingError,
    atlas_home,
    available_migrations,
    check_location,
    connect,
    default_warehouse_path,
    migrate,
    is_clustered,
    optimize,
    pending_migrations,
    release_readers,
    schema_version,
    writer,
)

__all__ = [
    "MIGRATIONS_DIR",
    "WarehouseBusyError",
    "WarehouseError",
    "WarehouseMissingError",
    "atlas_home",
    "available_migrations",
    "check_location",
    "connect",
    "default_warehouse_path",
    "migrate",
    "is_clustered",
    "optimize",
    "pending_migrations",
    "release_readers",
    "schema_version",
    "writer",
]


_HEAD_RE = re.compile(r"^\s*L(\d+)\s*\.\s*H(\d+)\s*$", re.IGNORECASE)


def head_name(layer: int, head: int) -> str:
    """(11, 3) -> 'L11.H3': a head's name (0-based layer and head), the one spelling everywhere."""
    return f"L{int(layer)}.H{int(head)}"


def parse_head(name: str) -> tuple[int, int]:
    """'L11.H3' -> (11, 3); a ValueError that shows the expected form otherwise."""
    m = _HEAD_RE.match(str(name))
    if not m:
        raise ValueError(f"'{name}' is not a head address; write it as L<layer>.H<head>, e.g. L11.H3 (0-based)")
    return int(m.group(1)), int(m.group(2))


__all__ += ["head_name", "parse_head"]
