"""Benchmark: a top-10 per-head neighbour query over 50,000 images of d = 512 (target <= 100 ms).

    python -m warehouse.bench                 # JSON with every number, for `make bench`
    python -m warehouse.bench --heads 12      # more heads around the queried one

The warehouse is built in a temporary folder through :func:`warehouse.writer` (so with the real
schema), with the queried head's 50,000 rows among other heads' rows, interleaved the way the
embed job appends them (all heads of a batch of images together). The query is MATH.md §6.4,
per-head nearest neighbours of a warehouse image, as one SQL statement (:data:`NEIGHBOURS_SQL`).
It is timed twice: as appended, and after :func:`warehouse.optimize` re-clusters the model's
rows by (layer, head, image_id), which the embed job does at its end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from .db import connect, optimize, release_readers, writer

__all__ = ["CONSOLE_CPU_BOMBS", "NEIGHBOURS_SQL", "build_bench_warehouse", "time_neighbours", "bench_neighbours", "main"]

TARGET_MS = 100.0
MODEL = "bench/random"

# CPU-bound SQL console queries that only the console's 10 s time cap stops (hostile suite): one long
# function call, one scan hashing two billion rows. `python -m dashboard.bench` runs them from two
# sessions while it times the pages (issue 11: p95 page time within 2x of idle).
CONSOLE_CPU_BOMBS = ["SELECT levenshtein(repeat('a', 150000), repeat('b', 150000))",
                     "SELECT count(*) FROM range(2000000000) t(x) WHERE hash(x) % 7 = 3"]

# per-head nearest neighbours of an image (MATH.md §6.4): c_query[l,h] . c_db[l,h], top 10
NEIGHBOURS_SQL = """
SELECT e.image_id, list_inner_product(e.vec, q.vec) AS score
FROM head_embeddings e,
     (SELECT vec FROM head_embeddings
      WHERE model_id = $model_id AND layer = $layer AND head = $head AND image_id = $image_id) q
WHERE e.model_id = $model_id AND e.layer = $layer AND e.head = $head
ORDER BY score DESC
LIMIT 10
"""


def build_bench_warehouse(path: str | os.PathLike, n_images: int = 50_000, n_heads: int = 4,
                          d: int = 512, layer: int = 11, batch: int = 10_000) -> None:
    """Fill ``path`` with ``n_images x n_heads`` random head embeddings of width ``d``.

    Rows are appended in image batches with all heads of a batch interleaved, like the
    embed job writes them (one :func:`writer` batch each).
    """
    for start in range(0, n_images, batch):
        stop = min(n_images, start + batch)
        with writer(path) as con:
            con.execute(f"""
                INSERT INTO head_embeddings (model_id, image_id, layer, head, vec)
                SELECT ?, 'img/' || lpad(i::VARCHAR, 6, '0'), ?, h::INTEGER,
                       list_transform(range({int(d)}), lambda x: (random() - 0.5)::FLOAT)
                FROM range(?, ?) a(i), range(?) b(h)
                ORDER BY i, h""", [MODEL, layer, start, stop, n_heads])


def time_neighbours(path: str | os.PathLike, head: int, runs: int = 9, layer: int = 11,
                    image_id: str = "img/012345") -> dict:
    """Median milliseconds of :data:`NEIGHBOURS_SQL` three ways.

    ``query_ms``: on one open read connection (``query_cpu_ms``: the process CPU time of the
    same runs, which machine load inflates less than wall time). ``connect_query_ms``: ``with connect(): query``
    each time, as the dashboard's named queries do (the per-process warm instance is reused).
    ``fresh_instance_ms``: the same with the warm instance disabled (``ATLAS_READER_KEEP_S=0``:
    a cold buffer pool every time, the cost a reader pays right after a job's batch).
    """
    params = {"model_id": MODEL, "layer": layer, "head": head, "image_id": image_id}

    cpu: list[float] = []

    def timed(fn) -> list[float]:
        out = []
        for _ in range(runs):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            out.append((time.perf_counter() - t0) * 1000)
            cpu.append((time.process_time() - c0) * 1000)
        return out

    release_readers(path)
    with connect(path) as con:
        rows = con.execute(NEIGHBOURS_SQL, params).fetchall()
        warm = timed(lambda: con.execute(NEIGHBOURS_SQL, params).fetchall())
        warm_cpu = list(cpu)
    scores = [r[1] for r in rows]
    if len(rows) != 10 or scores != sorted(scores, reverse=True):
        raise AssertionError(f"neighbour query returned a wrong answer: {rows[:3]}")

    def one_query():
        with connect(path) as c:
            c.execute(NEIGHBOURS_SQL, params).fetchall()

    pooled = timed(one_query)
    release_readers(path)
    saved = os.environ.get("ATLAS_READER_KEEP_S")
    os.environ["ATLAS_READER_KEEP_S"] = "0"
    try:
        fresh = timed(one_query)
    finally:
        if saved is None:
            os.environ.pop("ATLAS_READER_KEEP_S", None)
        else:
            os.environ["ATLAS_READER_KEEP_S"] = saved
    return {"query_ms": round(statistics.median(warm), 1), "query_min_ms": round(min(warm), 1),
            "query_cpu_ms": round(statistics.median(warm_cpu), 1),
            "connect_query_ms": round(statistics.median(pooled), 1),
            "fresh_instance_ms": round(statistics.median(fresh), 1)}


def bench_neighbours(n_images: int = 50_000, n_heads: int = 4, d: int = 512, runs: int = 9,
                     workdir: str | os.PathLike | None = None, details: dict | None = None) -> float:
    """Median ms of a top-10 neighbour query for one head over ``n_images`` images (clustered).

    Builds a temporary warehouse (in ``workdir`` or a temp folder; removed afterwards), times
    the query as appended and after :func:`optimize`, and returns the clustered median
    (the number to hold against the 100 ms target). Pass a dict as ``details`` to receive
    every measurement.
    """
    if n_heads < 1 or n_images < 12_346:
        raise ValueError("bench_neighbours needs n_heads >= 1 and n_images > 12345 (it queries img/012345)")
    out = details if details is not None else {}
    with tempfile.TemporaryDirectory(dir=workdir, prefix="atlas-bench-") as tmp:
        path = Path(tmp) / "bench.duckdb"
        t0 = time.perf_counter()
        build_bench_warehouse(path, n_images, n_heads, d)
        out.update(n_images=n_images, n_heads=n_heads, d=d, rows=n_images * n_heads,
                   build_s=round(time.perf_counter() - t0, 1))
        head = n_heads // 2
        out["appended"] = time_neighbours(path, head, runs)
        t0 = time.perf_counter()
        with writer(path) as con:
            optimize(con, MODEL)
        out["optimize_s"] = round(time.perf_counter() - t0, 1)
        out["clustered"] = time_neighbours(path, head, runs)
        out["file_mb"] = round(path.stat().st_size / 2**20)
        release_readers(path)
    out["target_ms"] = TARGET_MS
    out["load_average"] = round(os.getloadavg()[0], 2)
    out["cpus"] = os.cpu_count()
    return out["clustered"]["query_ms"]


def main(argv: list[str] | None = None) -> int:
    """CLI: print the benchmark's numbers as JSON; exit 1 when the target is missed."""
    ap = argparse.ArgumentParser(prog="python -m warehouse.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=50_000, help="images (rows of the queried head)")
    ap.add_argument("--heads", type=int, default=4, help="heads stored around the queried one")
    ap.add_argument("--dim", type=int, default=512, help="embedding width d")
    ap.add_argument("--runs", type=int, default=9, help="timed runs per measurement (median)")
    ap.add_argument("--workdir", default=None, help="folder for the temporary warehouse")
    args = ap.parse_args(argv)
    details: dict = {}
    ms = bench_neighbours(args.images, args.heads, args.dim, args.runs, args.workdir, details)
    details["ok"] = ms <= TARGET_MS
    print(json.dumps(details, indent=2))
    return 0 if details["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
