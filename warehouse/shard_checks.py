"""What `attach` checks in a shard set's Parquet files before they touch the warehouse.

A shard set is untrusted input: its files may name anything, hold other columns, vectors of
another length, NaN, or keys that repeat within the set or clash with the warehouse. Three kinds
of check, all streaming (one row group, or DuckDB's own streaming, at a time):

- ``file_problem(table, path, rows, d)``: one file against the table's schema
  (``writes.SHARD_SCHEMAS``: names and types exactly), its row count against the manifest's, and
  for the vector tables every row a list of exactly ``d`` finite floats (read with
  ``shard_files.read_vectors``, the fast page reader, then a finite test on each row group);
- ``set_key_problems(files, ...)``: the keys within the set, in SQL over its files in a private
  in-memory DuckDB (key columns only): every (model, image, layer, head) once, of the set's model,
  analysed layers and heads, of an image the set lists; image embeddings and factors likewise;
- ``warehouse_key_problems(con, ...)``: inside attach's write transaction, the set against the
  warehouse: images stored under another dataset, and head rows that another set attached in place
  already brings.

Each returns what is wrong as text for people (None or [] when nothing is). No file is written.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional, Sequence

import duckdb
import numpy as np

from .shard_files import Irregular, owner, read_vectors
from .writes import SHARD_SCHEMAS

VECTOR_TABLES = ("head_embeddings", "image_embeddings")
CHECK_MEMORY = "1GB"             # the private DuckDB of set_key_problems (it spills beyond)


def _type(t) -> str:
    """An Arrow type as text, a list by its element type only (Parquet names the element 'element',
    Arrow 'item': the same column)."""
    import pyarrow as pa
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        kind = "list" if pa.types.is_list(t) else str(t).split("<")[0]
        return f"{kind}<{_type(t.value_type)}>"
    return str(t)


def _schema_text(fields) -> str:
    return ", ".join(f"{n} {t}" for n, t in fields)


def file_problem(table: str, path: str | os.PathLike, rows: int, d: int) -> Optional[str]:
    """What is wrong with one shard file of ``table`` (None when nothing): its columns and types are
    not exactly the warehouse's, it holds another number of rows than ``rows``, or (vector tables) a
    row whose ``vec`` is not a list of ``d`` finite floats."""
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
    except Exception as exc:  # noqa: BLE001 - not Parquet, damaged footer, ...
        return f"is not a readable Parquet file ({' '.join(str(exc).split())[:200]})"
    want = [(f.name, _type(f.type)) for f in SHARD_SCHEMAS[table]]
    got = [(f.name, _type(f.type)) for f in schema]
    if got != want:
        return f"has columns ({_schema_text(got)}), not the {table} table's ({_schema_text(want)})"
    if pf.metadata.num_rows != rows:
        return f"holds {pf.metadata.num_rows:,} rows, not the {rows:,} its manifest entry says"
    if table not in VECTOR_TABLES:
        return None
    buf = None
    for rg in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        if n == 0:
            continue
        try:
            X = read_vectors(str(path), rg, out=buf)                  # [n, d'] float32
        except Irregular:
            return f"has rows whose vec is null, holds nulls or differs in length (row group {rg}); every vec must " \
                   f"be a list of exactly {d} floats"
        if X.shape != (n, d):
            return f"has vectors of dimension {X.shape[1]}, not the model's d = {d} (row group {rg})"
        # a finite sum means every element is finite (NaN and inf carry through a sum); only when it
        # is not (NaN, inf, or an overflow of large finite values) is each element looked at
        if not np.isfinite(X.sum()):
            bad = int((~np.isfinite(X)).any(axis=1).sum())
            if bad:
                return f"has {bad:,} vectors with NaN or infinite elements (row group {rg}); vectors must be finite"
        buf = owner(X)
    return None


def _con() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(config={"memory_limit": CHECK_MEMORY, "threads": max(1, min(4, os.cpu_count() or 1))})
    con.execute("SET enable_progress_bar = false")
    return con


def set_key_problems(files: dict[str, list[str]], model_id: str, layers: Sequence[int], heads: int,
                     dataset_id: str, n_images: int) -> list[str]:
    """The key problems within one shard set (``files``: table -> its files, every table present):
    repeated keys (with their count), rows of another model, dataset, layer or head, rows of images
    the set does not list, null keys. ``n_images``: the images the manifest counts."""
    problems: list[str] = []
    if not files["images"]:
        return [] if n_images == 0 else [f"the manifest counts {n_images:,} images but names no shard"]
    p = {"images": files["images"], "emb": files["image_embeddings"], "fac": files["image_factors"],
         "heads": files["head_embeddings"], "m": model_id, "ds": dataset_id,
         "layers": [int(x) for x in layers], "h": int(heads)}
    with contextlib.closing(_con()) as con:
        con.execute("CREATE TEMP TABLE ids AS SELECT DISTINCT image_id FROM read_parquet($images)",
                    {"images": p["images"]})
        n, null, other_ds = con.execute(
            "SELECT count(*), count(*) FILTER (WHERE image_id IS NULL), "
            "count(*) FILTER (WHERE dataset_id IS DISTINCT FROM $ds) FROM read_parquet($images)",
            {"images": p["images"], "ds": dataset_id}).fetchone()
        distinct = con.execute("SELECT count(*) FROM ids WHERE image_id IS NOT NULL").fetchone()[0]
        if n - null != distinct:
            problems.append(f"images: {n - null - distinct:,} repeated image ids")
        if null:
            problems.append(f"images: {null:,} rows without an image id")
        if other_ds:
            problems.append(f"images: {other_ds:,} rows of a dataset other than {dataset_id!r}")
        if n != n_images:
            problems.append(f"images: {n:,} rows, not the {n_images:,} the manifest counts")

        n, dup, other_m, foreign = con.execute("""
            SELECT count(*), count(*) - count(DISTINCT image_id),
                   count(*) FILTER (WHERE model_id IS DISTINCT FROM $m),
                   count(*) FILTER (WHERE image_id IS NULL OR image_id NOT IN (SELECT image_id FROM ids))
            FROM read_parquet($emb)""", {"emb": p["emb"], "m": model_id}).fetchone()
        if dup:
            problems.append(f"image_embeddings: {dup:,} repeated (model, image) keys")
        if other_m:
            problems.append(f"image_embeddings: {other_m:,} rows of a model other than {model_id!r}")
        if foreign:
            problems.append(f"image_embeddings: {foreign:,} rows of images the set does not list")
        if n != distinct:
            problems.append(f"image_embeddings: {n:,} rows for {distinct:,} images (one each is needed)")

        dup, foreign = con.execute("""
            SELECT count(*) - count(DISTINCT (image_id, factor)),
                   count(*) FILTER (WHERE image_id IS NULL OR factor IS NULL
                                    OR image_id NOT IN (SELECT image_id FROM ids))
            FROM read_parquet($fac)""", {"fac": p["fac"]}).fetchone()
        if dup:
            problems.append(f"image_factors: {dup:,} repeated (image, factor) keys")
        if foreign:
            problems.append(f"image_factors: {foreign:,} rows without a key or of images the set does not list")

        n, other_m, bad_lh, foreign = con.execute("""
            SELECT count(*), count(*) FILTER (WHERE model_id IS DISTINCT FROM $m),
                   count(*) FILTER (WHERE layer IS NULL OR head IS NULL OR NOT list_contains($layers, layer)
                                    OR head < 0 OR head >= $h),
                   count(*) FILTER (WHERE image_id IS NULL OR image_id NOT IN (SELECT image_id FROM ids))
            FROM read_parquet($heads)""", {"heads": p["heads"], "m": model_id, "layers": p["layers"],
                                            "h": p["h"]}).fetchone()
        distinct = con.execute("SELECT count(*) FROM (SELECT DISTINCT image_id, layer, head FROM read_parquet($heads))",
                               {"heads": p["heads"]}).fetchone()[0]
        if n != distinct:
            problems.append(f"head_embeddings: {n - distinct:,} duplicate (model, image, layer, head) keys")
        if other_m:
            problems.append(f"head_embeddings: {other_m:,} rows of a model other than {model_id!r}")
        if bad_lh:
            problems.append(f"head_embeddings: {bad_lh:,} rows outside the analysed layers {p['layers']} and "
                            f"heads 0-{heads - 1}")
        if foreign:
            problems.append(f"head_embeddings: {foreign:,} rows of images the set does not list")
    return problems


def warehouse_key_problems(con, shard_dir: str, model_id: str, layers: Sequence[int],
                           image_files: Sequence[str]) -> list[str]:
    """Inside attach's write transaction (after the sets it replaces are forgotten): images of the set
    that the warehouse stores under another dataset, and head rows of the set's images that another
    set attached in place already brings (the view would show them twice)."""
    problems = []
    other = con.execute("""
        SELECT count(*) FROM images w JOIN read_parquet($f) s USING (image_id)
        WHERE w.dataset_id IS DISTINCT FROM s.dataset_id""", {"f": list(image_files)}).fetchone()[0]
    if other:
        problems.append(f"{other:,} of its images are stored under another dataset (image ids are the "
                        f"images table's key)")
    sets = con.execute("SELECT shard_dir, files FROM shard_sets WHERE mode = 'in_place' AND shard_dir <> $d "
                       "AND len(files) > 0", {"d": shard_dir}).fetchall()
    in_place = [f for _, fs in sets for f in fs]
    if in_place:
        try:
            clash = con.execute("""
                SELECT count(*) FROM read_parquet($others) o
                WHERE o.model_id = $m AND list_contains($layers, o.layer)
                  AND o.image_id IN (SELECT image_id FROM read_parquet($f))""",
                                {"others": in_place, "m": model_id, "layers": [int(x) for x in layers],
                                 "f": list(image_files)}).fetchone()[0]
        except duckdb.IOException as exc:
            raise ValueError(f"a shard set attached in place ({', '.join(d for d, _ in sets)}) cannot be read, so "
                             f"this set's keys cannot be checked against it ({' '.join(str(exc).split())[:200]}); "
                             f"detach the set whose files are gone (`python -m etl attach --detach --shards DIR`) "
                             f"and attach again") from None
        if clash:
            problems.append(f"{clash:,} of its (model, image, layer, head) keys are already read in place from "
                            f"{', '.join(d for d, _ in sets)} (detach that set first: `python -m etl attach "
                            f"--detach --shards DIR`)")
    return problems
