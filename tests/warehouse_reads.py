"""Reading a warehouse's relations many times: how many different results each gives (migration 010
makes the views add floats in a fixed order, so every read of one warehouse gives the same bits)."""
from __future__ import annotations

from typing import Optional, Sequence

from warehouse import connect


def _canonical(row) -> tuple:
    return tuple(round(x, 9) if isinstance(x, float) else str(x) for x in row)


def distinct_reads(path, relations: Optional[Sequence[str]] = None, reads: int = 12,
                   threads: int = 4) -> dict[str, int]:
    """{relation: how many different results} over ``reads`` reads of each relation (every view of the
    warehouse when None), through the process's shared read instance as the pages read, with more
    threads than rows per group so that the order the threads meet rows varies most. Rows are put in a
    canonical order (sorted by their values rounded to 9 digits) and floats compared bit for bit."""
    with connect(path) as con:
        before = con.execute("SELECT current_setting('threads')").fetchone()[0]
        con.execute(f"SET threads = {threads}")
        try:
            if relations is None:
                relations = [r[0] for r in con.execute(
                    "SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()]
            out = {}
            for v in relations:
                seen = set()
                for _ in range(reads):
                    rows = sorted(con.execute(f"SELECT * FROM {v}").fetchall(), key=_canonical)
                    seen.add(repr([tuple(x.hex() if isinstance(x, float) else x for x in r) for r in rows]))
                out[v] = len(seen)
            return out
        finally:
            con.execute(f"SET threads = {before}")
