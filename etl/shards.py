"""Parquet shard sets: what `embed --engine ray` writes and `attach` registers in the warehouse.

A set is one directory, ``$ATLAS_HOME/shards/<model>/<dataset>/``::

    manifest.json                          every shard, its rows, bytes and sha256; error records
    images/000000000.parquet               one file per table and shard, columns exactly the
    image_factors/000000000.parquet        warehouse table's (warehouse.writes.SHARD_SCHEMAS)
    image_embeddings/000000000.parquet
    head_embeddings/000000000.parquet
    .lock                                  held (flock) by the job writing the set

A shard is one input block of the job; its id is the index of the block's first image in the
dataset, zero-padded (``000000128``), so ids never collide and a rerun writes only the shards
that are missing. Each file is written to a hidden temporary name, fsynced and renamed; the
``images`` file is renamed last and marks the shard complete. The manifest is rewritten (to a
temporary name, then renamed) after shards complete, so it never names a file that is not whole.
A job killed between a shard and the manifest leaves an orphan: the next run adopts it (a shard
whose four files are all there) or deletes its pieces (a shard without its ``images`` file).
Images that cannot be read become error records in the manifest (``errors``); they count as done.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Optional

MANIFEST = "manifest.json"
FORMAT = "clip-atlas-shards"
VERSION = 1
DEFAULT_COPY_BELOW = 1_000_000      # head_embeddings rows; a set with fewer is copied into the warehouse
_ID_DIGITS = 9
_SHARD_FILE = re.compile(r"^(\d{%d,})\.parquet$" % _ID_DIGITS)


def safe_name(name: str) -> str:
    """A model or dataset id as one folder name: 'toy-shapes/bundled' -> 'toy-shapes__bundled',
    'shapes:64:seed=5' -> 'shapes_64_seed=5-<sha8>' (a short hash keeps lossy names apart)."""
    from models.hashing import sha256_bytes
    s = name.replace("/", "__")
    safe = re.sub(r"[^A-Za-z0-9._=+-]+", "_", s).strip("._") or "x"
    if safe != s or len(safe) > 100:
        safe = f"{safe[:100]}-{sha256_bytes(name.encode())[:8]}"
    return safe


def shard_dir(root: str | os.PathLike, model_id: str, dataset_id: str) -> Path:
    """``<root>/<model-safe-name>/<dataset-safe-name>`` (absolute)."""
    return (Path(root) / safe_name(model_id) / safe_name(dataset_id)).resolve()


def shard_id(first_index: int) -> str:
    return f"{int(first_index):0{_ID_DIGITS}d}"


def _tables() -> tuple[str, ...]:
    from warehouse.writes import SHARD_TABLES
    return SHARD_TABLES


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold ``<directory>/.lock`` (flock) while writing a set; a second writer is refused."""
    import fcntl
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another job is writing the shards in {directory}; wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- the manifest

def new_manifest(model_row: dict, layers: list[int], onnx_path: Optional[str], onnx_sha256: Optional[str],
                 dataset: dict, shard_size: int) -> dict:
    return {"format": FORMAT, "version": VERSION, "model_id": model_row["model_id"],
            "model": {"row": model_row, "onnx_path": onnx_path, "onnx_sha256": onnx_sha256},
            "layers": [int(x) for x in layers], "dataset": dataset, "shard_size": int(shard_size),
            "tables": list(_tables()), "n_items": None, "complete": False, "shards": [], "errors": []}


def read_manifest(directory: str | os.PathLike) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {directory}: it is not a shard directory written by "
                                f"`python -m etl embed --engine ray`")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    if m.get("format") != FORMAT or m.get("version") != VERSION:
        raise ValueError(f"{path} is not a {FORMAT} v{VERSION} manifest")
    return m


def write_manifest(directory: Path, manifest: dict) -> None:
    """Atomically replace the manifest (temporary file, fsync, rename); shards sorted by id."""
    manifest["shards"].sort(key=lambda s: s["first_index"])
    path = Path(directory) / MANIFEST
    try:                     # unchanged: left as it is (its sha256 is how `attach` knows a set it has)
        old = json.loads(path.read_text())
        if {**old, "updated_at": None} == {**manifest, "updated_at": None}:
            return
    except (OSError, ValueError):
        pass
    manifest["updated_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    _write_atomic(path, json.dumps(manifest, indent=1).encode())


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def head_rows(manifest: dict) -> int:
    return sum(s["files"]["head_embeddings"]["rows"] for s in manifest["shards"])


def image_rows(manifest: dict) -> int:
    return sum(s["files"]["images"]["rows"] for s in manifest["shards"])


# --------------------------------------------------------------------------- shards

ROW_GROUP_ROWS = 1 << 16


def _write_parquet(table, path: Path) -> None:
    """One Parquet file; a head_embeddings table (sorted by layer, head, image_id) gets a new row
    group at every (layer, head) change, so each row group holds one head and its min/max
    statistics let a per-head query (DuckDB's filter or join pushdown) skip every other head's rows;
    without the cut, a shard of 1,024 images would be one row group of all its heads."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    # vectors never repeat: a dictionary attempt on `vec` (1 MB of dictionary before the fallback, in
    # every row group) made a 1M-image set of 1,024-image shards 30 % larger and slower to read
    dictionary = [c for c in table.column_names if c != "vec"]
    # and random-looking floats do not compress: snappy on `vec` saved ~0 % of the bytes and cost a
    # quarter of a per-head read (DuckDB's and warehouse.shard_files'); the other columns keep snappy
    # (keys are the leaf columns: a list's is "<name>.list.element"; a column not named is uncompressed)
    compression = {(f"{f.name}.list.element" if pa.types.is_list(f.type) else f.name): ("none" if f.name == "vec" else
                                                                                       "snappy") for f in table.schema}
    if "head" not in table.column_names or table.num_rows == 0:
        pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS, use_dictionary=dictionary,
                       compression=compression)
        return
    import numpy as np
    key = table.column("layer").to_numpy().astype(np.int64) * 1_000_003 + table.column("head").to_numpy()
    cuts = [0, *(np.flatnonzero(key[1:] != key[:-1]) + 1).tolist(), table.num_rows]
    with pq.ParquetWriter(path, table.schema, use_dictionary=dictionary, compression=compression) as w:
        for a, b in zip(cuts[:-1], cuts[1:]):
            w.write_table(table.slice(a, b - a), row_group_size=ROW_GROUP_ROWS)


def write_shard(directory: str | os.PathLike, first_index: int, tables: dict) -> dict:
    """Write one shard (the four Arrow tables of warehouse.writes.shard_tables): each file to a
    hidden temporary name, fsync, sha256, rename; ``images`` last. Returns its manifest entry."""
    from models.hashing import sha256_file
    directory = Path(directory)
    sid = shard_id(first_index)
    files = {}
    for table in _tables():                               # images last: the shard's commit mark
        rel = f"{table}/{sid}.parquet"
        final = directory / rel
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        _write_parquet(tables[table], tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        files[table] = {"path": rel, "rows": tables[table].num_rows, "bytes": tmp.stat().st_size,
                        "sha256": sha256_file(tmp)}
        os.replace(tmp, final)
    return {"id": sid, "first_index": int(first_index), "n_images": files["images"]["rows"], "files": files}


def _entry_from_files(directory: Path, sid: str) -> Optional[dict]:
    """The manifest entry of a complete shard found on disk (an orphan of a killed run), else None."""
    import pyarrow.parquet as pq

    from models.hashing import sha256_file
    files = {}
    for table in _tables():
        path = directory / table / f"{sid}.parquet"
        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception:  # noqa: BLE001 - missing or unreadable: the shard is not whole
            return None
        files[table] = {"path": f"{table}/{sid}.parquet", "rows": rows, "bytes": path.stat().st_size,
                        "sha256": sha256_file(path)}
    return {"id": sid, "first_index": int(sid), "n_images": files["images"]["rows"], "files": files}


def _whole(directory: Path, entry: dict) -> bool:
    """Every file of a manifest entry exists with its recorded size (attach checks the sha256)."""
    for f in entry["files"].values():
        p = directory / f["path"]
        if not p.is_file() or p.stat().st_size != f["bytes"]:
            return False
    return True


def resume(directory: Path, manifest: dict) -> tuple[dict, set[str], dict]:
    """Bring a set left by an earlier (maybe killed) run to a clean state; call under :func:`locked`.

    Deletes temporary files, drops manifest entries whose files are gone or changed size, adopts
    complete shards the manifest does not name, deletes pieces of incomplete ones. Returns (the
    manifest, image ids already done (in a shard or an error record), counts of what was fixed)."""
    import pyarrow.parquet as pq
    fixed = {"tmp_removed": 0, "entries_dropped": 0, "orphans_adopted": 0, "pieces_removed": 0}
    for table in _tables():
        for p in (directory / table).glob(".*.tmp-*") if (directory / table).is_dir() else []:
            p.unlink(missing_ok=True)
            fixed["tmp_removed"] += 1
    for p in directory.glob(f".{MANIFEST}.tmp-*"):
        p.unlink(missing_ok=True)
    kept = []
    for entry in manifest["shards"]:
        if _whole(directory, entry):
            kept.append(entry)
        else:
            fixed["entries_dropped"] += 1
    manifest["shards"] = kept
    known = {e["id"] for e in kept}
    images_dir = directory / "images"
    for p in sorted(images_dir.iterdir()) if images_dir.is_dir() else []:
        m = _SHARD_FILE.match(p.name)
        if m and m.group(1) not in known:
            entry = _entry_from_files(directory, m.group(1))
            if entry is not None:
                manifest["shards"].append(entry)
                known.add(entry["id"])
                fixed["orphans_adopted"] += 1
    for table in _tables():
        for p in (directory / table).glob("*.parquet") if (directory / table).is_dir() else []:
            m = _SHARD_FILE.match(p.name)
            if m and m.group(1) not in known:
                p.unlink(missing_ok=True)
                fixed["pieces_removed"] += 1
    done = {e["image_id"] for e in manifest["errors"]}
    for entry in manifest["shards"]:
        done.update(pq.read_table(directory / entry["files"]["images"]["path"], columns=["image_id"])
                    .column("image_id").to_pylist())
    return manifest, done, fixed


def verify(directory: Path, manifest: dict) -> None:
    """Every file the manifest names exists with its recorded size and sha256; a ValueError names
    the first that does not."""
    from models.hashing import sha256_file
    for entry in manifest["shards"]:
        for f in entry["files"].values():
            p = directory / f["path"]
            if not p.is_file():
                raise ValueError(f"shard file {p} named in the manifest is missing; re-run `python -m etl embed "
                                 f"--engine ray` with the same model and dataset to write it again")
            if p.stat().st_size != f["bytes"] or sha256_file(p) != f["sha256"]:
                raise ValueError(f"shard file {p} does not match its sha256 in the manifest (changed or damaged "
                                 f"after it was written); delete it and re-run `python -m etl embed --engine ray` "
                                 f"with the same model and dataset")


def find_sets(path: str | os.PathLike) -> list[Path]:
    """A shard directory (it holds manifest.json), or every set below a folder (e.g. $ATLAS_HOME/shards)."""
    p = Path(path).expanduser().resolve()
    if (p / MANIFEST).is_file():
        return [p]
    found = sorted(m.parent for m in p.rglob(MANIFEST)) if p.is_dir() else []
    if not found:
        raise FileNotFoundError(f"no shard set in {path}: pass a directory that holds {MANIFEST} (written by "
                                f"`python -m etl embed --engine ray`) or a folder above such directories")
    return found


# --------------------------------------------------------------------------- attach

def attach_set(path: str, directory: str | os.PathLike, copy_below: int = DEFAULT_COPY_BELOW,
               run_id: Optional[str] = None, batch_rows: int = 200_000) -> dict:
    """Register one shard set in the warehouse at ``path`` (through warehouse.writer).

    Reads the manifest, verifies every file's sha256, then copies `images`, `image_factors` and
    `image_embeddings` in (idempotent), and `head_embeddings` too when the set has fewer than
    ``copy_below`` head rows (mode 'copy'); otherwise they stay in the Parquet files and the writer
    makes `head_embeddings` the view over them (mode 'in_place'). Attaching the same manifest in
    the same mode again does nothing; a set can move between modes without duplicating a row; a set
    of the same model and dataset registered from another directory (the set was moved) is replaced.
    """
    import pyarrow.parquet as pq

    from models.hashing import sha256_file
    from warehouse import optimize, writer, writes
    from warehouse.queries import shard_set
    directory = Path(directory).resolve()
    manifest = read_manifest(directory)
    key = str(directory)
    msha = sha256_file(directory / MANIFEST)
    n_head = head_rows(manifest)
    mode = "copy" if n_head < int(copy_below) else "in_place"
    model_id, dataset = manifest["model_id"], manifest["dataset"]
    result = {"shard_dir": key, "model_id": model_id, "dataset_id": dataset["dataset_id"], "mode": mode,
              "shards": len(manifest["shards"]), "images": image_rows(manifest), "head_rows": n_head,
              "errors": len(manifest["errors"]), "skipped": False}
    before = shard_set(path, key)
    if before and before["manifest_sha256"] == msha and before["mode"] == mode:
        return {**result, "skipped": True}
    verify(directory, manifest)
    model = manifest["model"]
    with writer(path) as con:
        writes.upsert_model(con, model["row"], manifest["layers"], model.get("onnx_path"), model.get("onnx_sha256"))
        writes.upsert_dataset(con, dataset["dataset_id"], dataset["name"], dataset["source"], dataset.get("n_images"))
        moved = writes.delete_other_shard_sets(con, model_id, dataset["dataset_id"], key)   # a moved set
        if before and before["mode"] == "in_place" and mode == "copy":   # its rows come into the table now
            writes.delete_shard_set(con, key)
        writes.refresh_head_embeddings_view(con)
        writes.insert_errors_once(con, run_id, [(e["item"], e["reason"]) for e in manifest["errors"]])
    tables = ["images", "image_factors", "image_embeddings"] + (["head_embeddings"] if mode == "copy" else [])
    image_ids: list[str] = []
    group, rows = [], 0
    shards = manifest["shards"]
    for k, entry in enumerate(shards):                  # a few shards per write transaction
        group.append(entry)
        rows += entry["files"]["head_embeddings"]["rows"] if mode == "copy" else entry["n_images"]
        if rows < batch_rows and k + 1 < len(shards):
            continue
        with writer(path) as con:
            for e in group:
                for table in tables:
                    t = pq.read_table(directory / e["files"][table]["path"])
                    if table == "images":
                        image_ids += t.column("image_id").to_pylist()
                    writes.insert_shard_rows(con, table, t)
        group, rows = [], 0
    with writer(path) as con:
        files: list[str] = []
        if mode == "in_place":    # rows of these images stored in the table (an earlier copy) would be doubled
            writes.delete_head_embeddings_of_images(con, model_id, image_ids, manifest["layers"])
            files = [str(directory / e["files"]["head_embeddings"]["path"]) for e in shards]
        writes.upsert_shard_set(con, key, model_id, dataset["dataset_id"], mode, msha, len(shards),
                                image_rows(manifest), n_head, files, run_id)
        result["files_in_place"] = writes.refresh_head_embeddings_view(con)
        if mode == "copy":
            optimize(con, model_id)
    if moved:
        result["replaced"] = moved
    return result


def detach_set(path: str, directory: str | os.PathLike) -> dict:
    """Forget a registered shard set: the view stops reading its files (rows copied into the tables
    stay). For a set whose files were deleted, or before deleting them."""
    from warehouse import writer, writes
    from warehouse.queries import shard_set
    key = str(Path(directory).expanduser().resolve())
    before = shard_set(path, key)
    if before is None:
        raise ValueError(f"no shard set attached from {key} in {path}")
    with writer(path) as con:
        writes.delete_shard_set(con, key)
        files = writes.refresh_head_embeddings_view(con)
    return {"shard_dir": key, "detached": before["mode"], "files_in_place": files}
