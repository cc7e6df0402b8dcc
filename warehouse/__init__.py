"""The DuckDB warehouse: schema migrations, one-writer-many-readers connections, run records.

    from warehouse import connect, writer, default_warehouse_path
    with writer(path) as con: ...            # one batch: migrate, BEGIN ... COMMIT, close
    with connect(path) as con: ...           # short-lived read-only connection

See warehouse/db.py for the locking design and warehouse/migrations/*.sql for the schema.
"""

from .db import (
    MIGRATIONS_DIR,
    WarehouseBusyError,
    WarehouseError,
    WarehouseMissingError,
    atlas_home,
    available_migrations,
    connect,
    default_warehouse_path,
    migrate,
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
    "connect",
    "default_warehouse_path",
    "migrate",
    "optimize",
    "pending_migrations",
    "release_readers",
    "schema_version",
    "writer",
]


def head_name(layer: int, head: int) -> str:
    """A head's display name, ``L{layer}.H{head}`` (0-based), the one spelling everywhere."""
    return f"L{int(layer)}.H{int(head)}"


__all__.append("head_name")
