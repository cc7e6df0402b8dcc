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

``attach`` treats a set as untrusted (whoever wrote it): the manifest is checked field by field
(``check_manifest``), every file it names must be exactly ``<table>/<id>.parquet`` of the set's
own folder, reached through no symlink (``shard_file``), match its size and sha256, the
warehouse's columns and types, the model's d and hold only finite vectors, and every key must
hold within the set (``check_set``) and against the warehouse; only then is the set written, in
one transaction (``attach_set``).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import stat
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Optional

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


MAX_MANIFEST_BYTES = 512 * 2**20   # a million-image set's manifest is a few MB (its error records the most)
MAX_ROWS = 2**40                   # rows a manifest may claim for one file (each is checked against the file)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of a shard set, checked field by field (``check_manifest``): a ValueError of one
    line names the first field that is missing or of the wrong kind."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {directory}: it is not a shard directory written by "
                                f"`python -m etl embed --engine ray`")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ValueError(f"{path} is {path.stat().st_size / 2**20:,.0f} MB, over the {MAX_MANIFEST_BYTES >> 20} MB a "
                         f"manifest may take; it is not one written by `python -m etl embed --engine ray`")
    try:
        m = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") != VERSION:
        raise ValueError(f"{path} is not a {FORMAT} v{VERSION} manifest")
    check_manifest(m, path)
    return m


class _Bad(ValueError):
    pass


def _field(obj, key, kind: str, where: str, optional: bool = False):
    """obj[key] checked to be ``kind`` (str: non-empty, text, int, nonneg, pos, bool, dict, list; 'str?' also
    None); _Bad naming it."""
    if not isinstance(obj, dict):
        raise _Bad(f"{where or 'the manifest'} is {type(obj).__name__}, not an object")
    name = f"{where}.{key}" if where else key
    if key not in obj:
        if optional:
            return None
        raise _Bad(f"{name} is missing")
    return _value(obj[key], kind, name)


def _value(v, kind: str, name: str):
    if kind.endswith("?") and v is None:
        return None
    kind = kind.rstrip("?")
    ok = {"str": isinstance(v, str) and v != "", "text": isinstance(v, str), "bool": isinstance(v, bool),
          "dict": isinstance(v, dict), "list": isinstance(v, list),
          "int": isinstance(v, int) and not isinstance(v, bool) and abs(v) <= MAX_ROWS,
          "nonneg": isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_ROWS,
          "pos": isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_ROWS}[kind]
    if not ok:
        what = {"str": "a non-empty string", "text": "a string", "bool": "true or false", "dict": "an object", "list": "a list",
                "int": "an integer", "nonneg": f"an integer from 0 to {MAX_ROWS:,}",
                "pos": f"an integer from 1 to {MAX_ROWS:,}"}[kind]
        shown = json.dumps(v)
        raise _Bad(f"{name} is {shown[:60] + '...' if len(shown) > 60 else shown}, not {what}")
    return v


_MODEL_ROW = {"model_id": "str", "arch": "str", "pretrained": "str?", "source": "str", "checkpoint_path": "str?",
              "seed": "int?", "layers": "pos", "heads": "pos", "width": "pos", "embed_dim": "pos",
              "patch_size": "pos", "image_size": "pos", "pooling": "str"}


def check_manifest(m: dict, path: str | os.PathLike = MANIFEST) -> None:
    """Every field attach and the Ray engine read, of the kind they expect, and consistent: the model
    row's columns, analysed layers within the model, per shard an id of 9+ digits equal to its first
    index, the four tables' entries (path, rows, bytes, sha256), images = image embeddings rows, head
    rows = images x layers x heads, no shard twice. A ValueError of one line names the first field
    that is wrong."""
    try:
        model_id = _field(m, "model_id", "str", "")
        model = _field(m, "model", "dict", "")
        row = _field(model, "row", "dict", "model")
        for key, kind in _MODEL_ROW.items():
            _field(row, key, kind, "model.row")
        if row["model_id"] != model_id:
            raise _Bad(f"model.row.model_id {row['model_id']!r} is not model_id {model_id!r}")
        _field(model, "onnx_path", "str?", "model", optional=True)
        _field(model, "onnx_sha256", "str?", "model", optional=True)
        layers = _field(m, "layers", "list", "")
        for i, layer in enumerate(layers):
            _value(layer, "nonneg", f"layers[{i}]")
        if not layers or len(set(layers)) != len(layers) or max(layers) >= row["layers"]:
            raise _Bad(f"layers {json.dumps(layers)[:60]} are not distinct layers of a {row['layers']}-layer model")
        dataset = _field(m, "dataset", "dict", "")
        for key, kind in (("dataset_id", "str"), ("name", "text"), ("source", "str"), ("n_images", "nonneg?")):
            _field(dataset, key, kind, "dataset")
        _field(m, "shard_size", "pos", "", optional=True)
        _field(m, "n_items", "nonneg?", "", optional=True)
        _field(m, "complete", "bool", "", optional=True)
        errors = _field(m, "errors", "list", "")
        for i, e in enumerate(errors):
            _field(e, "item", "str", f"errors[{i}]")
            _field(e, "reason", "text", f"errors[{i}]")
        heads = row["heads"]
        seen: set[str] = set()
        for i, entry in enumerate(_field(m, "shards", "list", "")):
            where = f"shards[{i}]"
            sid = _field(entry, "id", "str", where)
            if not _SHARD_FILE.match(f"{sid}.parquet"):
                raise _Bad(f"{where}.id {sid[:40]!r} is not a shard id ({_ID_DIGITS} or more digits)")
            if sid in seen:
                raise _Bad(f"{where}.id {sid!r} names a shard a second time")
            seen.add(sid)
            if _field(entry, "first_index", "nonneg", where) != int(sid):
                raise _Bad(f"{where}.first_index {entry['first_index']} is not its id {sid}")
            n = _field(entry, "n_images", "nonneg", where)
            files = _field(entry, "files", "dict", where)
            if sorted(files) != sorted(_tables()):
                raise _Bad(f"{where}.files names {sorted(files)}, not the tables {sorted(_tables())}")
            for table in _tables():
                f = _field(files, table, "dict", f"{where}.files")
                for key, kind in (("path", "str"), ("rows", "nonneg"), ("bytes", "nonneg"), ("sha256", "str")):
                    _field(f, key, kind, f"{where}.files.{table}")
                if not _SHA256.match(f["sha256"]):
                    raise _Bad(f"{where}.files.{table}.sha256 is not 64 lower-case hex digits")
            if files["images"]["rows"] != n or files["image_embeddings"]["rows"] != n:
                raise _Bad(f"{where} counts {n:,} images but its images and image_embeddings files "
                           f"{files['images']['rows']:,} and {files['image_embeddings']['rows']:,} rows")
            if files["head_embeddings"]["rows"] != n * len(layers) * heads:
                raise _Bad(f"{where}.files.head_embeddings.rows {files['head_embeddings']['rows']:,} is not "
                           f"{n:,} images x {len(layers)} layers x {heads} heads")
    except _Bad as exc:
        raise ValueError(f"{path}: {exc}; the manifest is damaged or was not written by `python -m etl embed "
                         f"--engine ray`: write the set again") from None


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


def shard_file(directory: Path, manifest: dict, entry: dict, table: str) -> Path:
    """The file a manifest entry names for ``table``, refused (ValueError) unless it is exactly
    ``<table>/<id>.parquet`` of the set's own folder: no other name, no '..', no absolute path, and
    a regular file reached through no symlink (so no file outside the folder is ever read, hashed
    or registered for the SQL console)."""
    directory = Path(directory)
    rel, want = entry["files"][table]["path"], f"{table}/{entry['id']}.parquet"
    if rel != want:
        raise ValueError(f"{directory / MANIFEST} names {rel[:200]!r} as the {table} file of shard {entry['id']}, "
                         f"not {want!r}: a set names only its own files, inside its folder; write the set again")
    p = directory / want
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        raise ValueError(f"shard file {p} named in the manifest is missing; re-run `python -m etl embed "
                         f"--engine ray` with the same model and dataset to write it again") from None
    if stat.S_ISLNK(st.st_mode) or os.path.realpath(p) != str(p):
        raise ValueError(f"shard file {p} is reached through a symlink; a set's files must lie in its folder "
                         f"{directory} themselves: copy them there")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"shard file {p} is not a regular file")
    return p


def verify(directory: Path, manifest: dict, check: Optional[Callable[[str, Path, dict], Optional[str]]] = None
           ) -> None:
    """Every file the manifest names is the set's own (``shard_file``) with its recorded size and
    sha256, and, with ``check(table, path, manifest entry of the file)``, has nothing that check says
    is wrong (right after the file's sha256, so its bytes come from the page cache); a ValueError
    names the first that fails."""
    from models.hashing import sha256_file
    directory = Path(directory)
    for entry in manifest["shards"]:
        for table, f in entry["files"].items():
            p = shard_file(directory, manifest, entry, table)
            if p.stat().st_size != f["bytes"] or sha256_file(p) != f["sha256"]:
                raise ValueError(f"shard file {p} does not match its sha256 in the manifest (changed or damaged "
                                 f"after it was written); delete it and re-run `python -m etl embed --engine ray` "
                                 f"with the same model and dataset")
            problem = check(table, p, f) if check is not None else None
            if problem:
                raise ValueError(f"shard file {p} {problem}; the set cannot be attached: write it again with "
                                 f"`python -m etl embed --engine ray`")


def check_set(directory: Path, manifest: dict) -> None:
    """Everything ``attach`` checks before the warehouse is touched, read-only and streaming: every
    file (``verify``: its own, its sha256, the warehouse's schema exactly, its rows, vectors of the
    model's d, all finite: ``warehouse.shard_checks.file_problem``), then the keys within the set
    (``set_key_problems``). A ValueError of one line says what is wrong."""
    from warehouse.shard_checks import file_problem, set_key_problems
    row = manifest["model"]["row"]
    d = int(row["embed_dim"])
    verify(directory, manifest, lambda table, p, f: file_problem(table, p, f["rows"], d))
    files = {t: [str(directory / e["files"][t]["path"]) for e in manifest["shards"]] for t in _tables()}
    problems = set_key_problems(files, manifest["model_id"], manifest["layers"], int(row["heads"]),
                                manifest["dataset"]["dataset_id"], image_rows(manifest))
    if problems:
        raise ValueError(f"shard set {directory} cannot be attached: {'; '.join(problems)}; write it again with "
                         f"`python -m etl embed --engine ray`")


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
               run_id: Optional[str] = None) -> dict:
    """Register one shard set in the warehouse at ``path`` (through warehouse.writer).

    The set is untrusted: first, read-only, its manifest is checked field by field, every file it
    names must be its own (``shard_file``), match its sha256, the warehouse's schema and the model's
    d, hold finite vectors, and the set's keys must hold (``check_set``). Then ONE write
    transaction, so a failed or killed attach leaves the warehouse exactly as it was: the keys
    against the warehouse (``warehouse_key_problems``), then `images`, `image_factors` and
    `image_embeddings` copied in (idempotent; streamed by DuckDB from the files), and
    `head_embeddings` too when the set has fewer than ``copy_below`` head rows (mode 'copy');
    otherwise they stay in the Parquet files and the writer makes `head_embeddings` the view over
    them (mode 'in_place'). Attaching the same manifest in the same mode again does nothing; a set
    can move between modes without duplicating a row; a set of the same model and dataset registered
    from another directory (the set was moved) is replaced.
    """
    from models.hashing import sha256_file
    from warehouse import optimize, writer, writes
    from warehouse.queries import shard_set
    from warehouse.shard_checks import warehouse_key_problems
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
    check_set(directory, manifest)
    shards = manifest["shards"]
    files = {t: [str(directory / e["files"][t]["path"]) for e in shards] for t in _tables()}
    model = manifest["model"]
    with writer(path) as con:           # the whole set or nothing
        moved = writes.delete_other_shard_sets(con, model_id, dataset["dataset_id"], key)   # a moved set
        if shards:
            problems = warehouse_key_problems(con, key, model_id, manifest["layers"], files["images"])
            if problems:
                raise ValueError(f"shard set {directory} cannot be attached to {path}: {'; '.join(problems)}")
        writes.upsert_model(con, model["row"], manifest["layers"], model.get("onnx_path"), model.get("onnx_sha256"))
        writes.upsert_dataset(con, dataset["dataset_id"], dataset["name"], dataset["source"], dataset.get("n_images"))
        writes.insert_errors_once(con, run_id, [(e["item"], e["reason"]) for e in manifest["errors"]])
        # rows first, into the table as it is named now (the base table while a view stands): DuckDB
        # cannot insert into a table renamed earlier in the same transaction when an index was made
        # again on it, so the view <-> table change comes last (refresh_head_embeddings_view)
        for table in ["images", "image_factors", "image_embeddings"] + (["head_embeddings"] if mode == "copy" else []):
            writes.insert_shard_files(con, table, files[table])
        in_place: list[str] = []
        if mode == "copy":
            optimize(con, model_id)
        else:                     # rows of these images stored in the table (an earlier copy) would be doubled
            writes.delete_head_embeddings_of_image_files(con, model_id, files["images"], manifest["layers"])
            in_place = files["head_embeddings"]
        writes.upsert_shard_set(con, key, model_id, dataset["dataset_id"], mode, msha, len(shards),
                                image_rows(manifest), n_head, in_place, run_id)
        result["files_in_place"] = writes.refresh_head_embeddings_view(con)
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
