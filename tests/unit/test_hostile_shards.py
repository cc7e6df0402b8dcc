"""Hostile shard sets (issue 21 break 4): a set is untrusted input. Each case below attached with exit
0 before (or ended in "unexpected TypeError/KeyError"); now each is one `error:` line, exit code 2,
and the warehouse is exactly as it was (every table's rows, the view, the registered sets).

Each case edits a set written the way the Ray engine writes it (test_shards.make_set) and keeps the
manifest's sizes and sha256 in step with the edit, so only the check the case is about can catch it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from etl import shards
from etl.cli import main
from models.hashing import sha256_file
from tests.unit.test_shards import DATASET, LAYERS, MODEL_ROW, _vectors, expected_heads, make_set
from warehouse import release_readers, writer, writes

ROOT = Path(__file__).resolve().parents[2]


def state(path) -> dict:
    """Every table's row count and the sum of its rows' hashes (all columns but the timestamps a write
    stamps, such as attached_at), and the views' SQL: what 'exactly as before' compares. `runs`
    (the CLI's record of the attempt) is left out."""
    release_readers()
    con = duckdb.connect(str(path), read_only=True)
    try:
        cols: dict[str, list[str]] = {}
        for t, c in con.execute("SELECT table_name, column_name FROM duckdb_columns() WHERE internal = false "
                                "AND data_type NOT LIKE 'TIMESTAMP%' AND table_name IN (SELECT table_name FROM duckdb_tables()) "
                                "ORDER BY table_name, column_index").fetchall():
            cols.setdefault(t, []).append(f'"{c}"')
        out = {t: con.execute(f'SELECT count(*), sum(hash({", ".join(c)})) FROM "{t}"').fetchone()
               for t, c in cols.items() if t != "runs"}
        out["views"] = con.execute("SELECT view_name, sql FROM duckdb_views() WHERE NOT internal ORDER BY 1").fetchall()
        return out
    finally:
        con.close()


@pytest.fixture(scope="module")
def base_warehouse(tmp_path_factory):
    """Built once: a warehouse that holds a set attached in place (``first``, left untouched by the
    tests) and rows of the local engine."""
    root = tmp_path_factory.mktemp("hostile_shards")
    wh = root / "w.duckdb"
    make_set(root / "first")
    shards.attach_set(str(wh), root / "first", copy_below=0)
    with writer(wh) as con:
        writes.insert_head_embeddings(con, "other/model", ["x/0"], [0], np.ones((1, 1, 2, 4), np.float32))
    release_readers()
    return wh


@pytest.fixture()
def setup(base_warehouse, tmp_path, monkeypatch):
    """A copy of the base warehouse, and a fresh set (another dataset of the same model) to attack with."""
    monkeypatch.setenv("ATLAS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ATLAS_NO_PROGRESS", "1")
    wh = tmp_path / "w.duckdb"
    shutil.copy(base_warehouse, wh)
    victim = tmp_path / "set"
    make_other_set(victim)
    return wh, victim


OTHER = {**DATASET, "dataset_id": "shapes:6:seed=2", "name": "shapes:6:seed=2", "spec": "shapes:6:seed=2"}


def other_ids(first: int, n: int) -> list[str]:
    return [f"shapes:6:seed=2/{i}" for i in range(first, first + n)]


def make_other_set(directory, ids_of=other_ids, dataset=OTHER, blocks=((0, 2), (2, 2))) -> dict:
    manifest = shards.new_manifest(MODEL_ROW, LAYERS, None, None, dataset, 2)
    for first, n in blocks:
        ids = ids_of(first, n)
        emb, heads = _vectors(n, 100 + first)
        tables = writes.shard_tables(MODEL_ROW["model_id"], dataset["dataset_id"], ids, [None] * n, ["0" * 64] * n,
                                     [None] * n, [None] * n, [(16, 16)] * n, [b"jpeg"] * n,
                                     [(i, "color", "red") for i in ids], LAYERS, emb, heads)
        manifest["shards"].append(shards.write_shard(directory, first, tables))
    manifest["n_items"], manifest["complete"] = 4, True
    shards.write_manifest(directory, manifest)
    return manifest


def rewrite(directory: Path, table: str, shard: int, table_rows: pa.Table) -> None:
    """Replace one shard file with ``table_rows`` and bring the manifest's entry (rows, bytes, sha256) in step."""
    m = json.loads((directory / shards.MANIFEST).read_text())
    f = m["shards"][shard]["files"][table]
    p = directory / f["path"]
    pq.write_table(table_rows, p)
    f.update(rows=table_rows.num_rows, bytes=p.stat().st_size, sha256=sha256_file(p))
    (directory / shards.MANIFEST).write_text(json.dumps(m))


def read(directory: Path, table: str, shard: int = 0) -> pa.Table:
    m = json.loads((directory / shards.MANIFEST).read_text())
    return pq.read_table(directory / m["shards"][shard]["files"][table]["path"])


def attach_error(capsys, wh, directory, copy_below="0") -> str:
    """`python -m etl attach` in this process: exit code 2 and exactly one `error:` line."""
    capsys.readouterr()
    code = main(["attach", "--shards", str(directory), "--warehouse", str(wh), "--copy-below", copy_below])
    out, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), (code, out, err)
    return err


def edit_manifest(directory: Path, edit) -> None:
    """``edit(manifest)`` changes it in place, or returns what to write instead."""
    m = json.loads((directory / shards.MANIFEST).read_text())
    got = edit(m)
    (directory / shards.MANIFEST).write_text(json.dumps(m if got is None else got))


# --------------------------------------------------------------------------- paths

def _outside_copy(directory: Path, table: str) -> Path:
    outside = directory.parent / "outside"
    outside.mkdir(exist_ok=True)
    target = outside / f"{table}.parquet"
    shutil.copy(directory / table / "000000000.parquet", target)
    return target


@pytest.mark.parametrize("how", ["dotdot", "absolute", "file-symlink", "folder-symlink"])
def test_every_path_stays_inside_the_set(setup, capsys, how):
    """`../../outside/x.parquet`, an absolute path or a symlink attached with exit 0, and the outside
    file became readable through the console's allowed paths."""
    wh, victim = setup
    before = state(wh)
    outside = _outside_copy(victim, "head_embeddings")
    if how == "dotdot":
        edit_manifest(victim, lambda m: m["shards"][0]["files"]["head_embeddings"].update(
            path="head_embeddings/../../outside/head_embeddings.parquet"))
        phrase = "names 'head_embeddings/../../outside/head_embeddings.parquet' as the head_embeddings file"
    elif how == "absolute":
        edit_manifest(victim, lambda m: m["shards"][0]["files"]["head_embeddings"].update(path=str(outside)))
        phrase = f"names '{outside}' as the head_embeddings file"
    elif how == "file-symlink":
        (victim / "head_embeddings" / "000000000.parquet").unlink()
        (victim / "head_embeddings" / "000000000.parquet").symlink_to(outside)
        phrase = "000000000.parquet is reached through a symlink"
    else:
        moved = victim.parent / "elsewhere"
        shutil.move(str(victim / "head_embeddings"), str(moved))
        (victim / "head_embeddings").symlink_to(moved)
        phrase = "000000000.parquet is reached through a symlink"
    assert phrase in attach_error(capsys, wh, victim)
    assert state(wh) == before


# --------------------------------------------------------------------------- schemas and vectors

def _without_vec(t: pa.Table) -> pa.Table:
    return t.drop_columns(["vec"])


def _vec_of_dim(t: pa.Table, d: int) -> pa.Table:
    vec = writes.vector_column(np.ones((t.num_rows, d), np.float32))
    return t.set_column(t.schema.get_field_index("vec"), "vec", vec)


def _with_value(t: pa.Table, value: float) -> pa.Table:
    a = np.asarray(t.column("vec").to_pylist(), np.float32)
    a[1, 2] = value
    return t.set_column(t.schema.get_field_index("vec"), "vec", writes.vector_column(a))


def _layer_as_int64(t: pa.Table) -> pa.Table:
    return t.set_column(t.schema.get_field_index("layer"), "layer", t.column("layer").cast(pa.int64()))


def _ragged(t: pa.Table) -> pa.Table:
    rows = t.column("vec").to_pylist()
    rows[3] = rows[3][:-1]
    return t.set_column(t.schema.get_field_index("vec"), "vec", pa.array(rows, pa.list_(pa.float32())))


@pytest.mark.parametrize("table,edit,phrase", [
    ("head_embeddings", _without_vec, "has columns (model_id string, image_id string, layer int32, head int32), "
                                      "not the head_embeddings table's"),
    ("head_embeddings", lambda t: t.append_column("extra", pa.array([1] * t.num_rows)), "has columns"),
    ("head_embeddings", _layer_as_int64, "has columns (model_id string, image_id string, layer int64"),
    ("head_embeddings", lambda t: _vec_of_dim(t, 5), "has vectors of dimension 5, not the model's d = 4"),
    ("head_embeddings", _ragged, "has rows whose vec is null, holds nulls or differs in length"),
    ("head_embeddings", lambda t: _with_value(t, float("nan")), "has 1 vectors with NaN or infinite elements"),
    ("head_embeddings", lambda t: _with_value(t, float("inf")), "has 1 vectors with NaN or infinite elements"),
    ("image_embeddings", lambda t: _with_value(t, float("-inf")), "has 1 vectors with NaN or infinite elements"),
    ("image_embeddings", lambda t: _vec_of_dim(t, 3), "has vectors of dimension 3, not the model's d = 4"),
    ("images", lambda t: t.drop_columns(["thumbnail"]), "has columns (image_id string, dataset_id string, path "
                                                        "string, sha256 string, label string, caption string, width "
                                                        "int32, height int32, original binary), not the images"),
], ids=["no-vec", "extra-column", "int64-layer", "dim-5", "ragged", "nan", "inf", "image-inf", "image-dim-3",
        "images-no-thumbnail"])
def test_every_file_matches_the_warehouse_schema_and_the_models_d(setup, capsys, table, edit, phrase):
    """A head file without `vec` (which broke every later read of head_embeddings), vectors of the
    wrong dimension and NaN/inf were accepted."""
    wh, victim = setup
    before = state(wh)
    rewrite(victim, table, 1, edit(read(victim, table, 1)))
    err = attach_error(capsys, wh, victim)
    assert f"{table}/000000002.parquet {phrase}" in err, err
    assert state(wh) == before


def test_a_file_that_is_not_parquet_is_refused(setup, capsys):
    wh, victim = setup
    before = state(wh)
    p = victim / "image_factors" / "000000000.parquet"
    p.write_bytes(b"PAR1 not really")
    edit_manifest(victim, lambda m: m["shards"][0]["files"]["image_factors"].update(bytes=p.stat().st_size,
                                                                                    sha256=sha256_file(p)))
    assert "image_factors/000000000.parquet is not a readable Parquet file" in attach_error(capsys, wh, victim)
    assert state(wh) == before


# --------------------------------------------------------------------------- keys

def test_keys_hold_within_a_set_attached_in_place(setup, capsys):
    """Duplicate image ids across shards gave 256 duplicate head rows in place."""
    wh, victim = setup
    before = state(wh)
    shutil.rmtree(victim)
    make_other_set(victim, ids_of=lambda first, n: other_ids(0, n))         # both shards: images 0 and 1
    err = attach_error(capsys, wh, victim)
    assert "images: 2 repeated image ids" in err and "image_embeddings: 2 repeated (model, image) keys" in err
    assert "head_embeddings: 8 duplicate (model, image, layer, head) keys" in err, err
    assert state(wh) == before


def test_keys_hold_within_a_file(setup, capsys):
    wh, victim = setup
    before = state(wh)
    t = read(victim, "head_embeddings", 0)
    t = pa.concat_tables([t.slice(0, t.num_rows - 1), t.slice(0, 1)])       # the last row's key becomes the first's
    rewrite(victim, "head_embeddings", 0, t)
    err = attach_error(capsys, wh, victim, copy_below="1000000")
    assert "head_embeddings: 1 duplicate (model, image, layer, head) keys" in err, err
    assert state(wh) == before


@pytest.mark.parametrize("column,value,phrase", [
    ("model_id", "evil/model", "head_embeddings: 8 rows of a model other than 'toy/test'"),
    ("layer", 0, "head_embeddings: 8 rows outside the analysed layers [1, 2] and heads 0-1"),
    ("head", 7, "head_embeddings: 8 rows outside the analysed layers"),
    ("image_id", "shapes:6:seed=1/0", "head_embeddings: 8 rows of images the set does not list")])
def test_head_rows_belong_to_the_set(setup, capsys, column, value, phrase):
    wh, victim = setup
    before = state(wh)
    t = read(victim, "head_embeddings", 1)
    field = t.schema.field(column)
    rewrite(victim, "head_embeddings", 1, t.set_column(t.schema.get_field_index(column), field,
                                                       pa.array([value] * t.num_rows, field.type)))
    assert phrase in attach_error(capsys, wh, victim)
    assert state(wh) == before


def base_warehouse_dir(wh) -> str:
    release_readers()
    con = duckdb.connect(str(wh), read_only=True)
    try:
        return con.execute("SELECT shard_dir FROM shard_sets").fetchone()[0]
    finally:
        con.close()


def test_keys_hold_against_the_warehouse(setup, capsys):
    """A second set whose images are those of a set already read in place (another dataset's ids)
    would double the view's rows: refused with the count, naming the set to detach."""
    wh, victim = setup
    before = state(wh)
    shutil.rmtree(victim)
    make_other_set(victim, ids_of=lambda first, n: [f"shapes:6:seed=1/{i}" for i in range(first, first + n)],
                   dataset={**OTHER, "dataset_id": "shapes:6:seed=1-copy"})
    t = read(victim, "images", 0)
    err = attach_error(capsys, wh, victim)
    assert "4 of its images are stored under another dataset" in err, err
    first = base_warehouse_dir(wh)
    assert f"16 of its (model, image, layer, head) keys are already read in place from {first}" in err
    assert t.column("dataset_id").to_pylist() == ["shapes:6:seed=1-copy"] * 2
    assert state(wh) == before


# --------------------------------------------------------------------------- malformed manifests

def _set(path: str, value):
    def edit(m):
        obj, keys = m, path.split(".")
        for k in keys[:-1]:
            obj = obj[int(k)] if isinstance(obj, list) else obj[k]
        obj[keys[-1]] = value
    return edit


def _drop(path: str):
    def edit(m):
        obj, keys = m, path.split(".")
        for k in keys[:-1]:
            obj = obj[int(k)] if isinstance(obj, list) else obj[k]
        del obj[keys[-1]]
    return edit


def _claim_rows(n: int):
    def edit(m):
        e = m["shards"][0]
        e["n_images"] = n
        e["files"]["images"]["rows"] = e["files"]["image_embeddings"]["rows"] = n
        e["files"]["head_embeddings"]["rows"] = n * 2 * 2
    return edit


MALFORMED = [
    ("rows-abc", _set("shards.0.files.images.rows", "abc"),
     'shards[0].files.images.rows is "abc", not an integer from 0'),
    ("shards-object", _set("shards", {}), "shards is {}, not a list"),
    ("no-layers", _drop("layers"), "layers is missing"),
    ("no-dataset-id", _drop("dataset.dataset_id"), "dataset.dataset_id is missing"),
    ("no-files", _drop("shards.0.files"), "shards[0].files is missing"),
    ("no-sha256", _drop("shards.1.files.head_embeddings.sha256"), "shards[1].files.head_embeddings.sha256 is missing"),
    ("rows-1e15", _set("shards.0.files.head_embeddings.rows", 10**15),
     "shards[0].files.head_embeddings.rows is 1000000000000000, not an integer from 0 to 1,099,511,627,776"),
    ("claims-1e9-images", _claim_rows(10**9),
     "head_embeddings/000000000.parquet holds 8 rows, not the 4,000,000,000 its manifest entry says"),
    ("head-rows-off", _set("shards.0.files.head_embeddings.rows", 9), "is not 2 images x 2 layers x 2 heads"),
    ("rows-negative", _set("shards.0.n_images", -1), "shards[0].n_images is -1"),
    ("rows-bool", _set("shards.0.n_images", True), "shards[0].n_images is true"),
    ("model-row-list", _set("model.row", []), "model.row is [], not an object"),
    ("no-embed-dim", _drop("model.row.embed_dim"), "model.row.embed_dim is missing"),
    ("layers-strings", _set("layers", ["1", "2"]), 'layers[0] is "1"'),
    ("layer-out-of-model", _set("layers", [1, 7]), "are not distinct layers of a 3-layer model"),
    ("shard-twice", lambda m: m["shards"].append(dict(m["shards"][0])),
     "shards[2].id '000000000' names a shard a second time"),
    ("bad-id", _set("shards.0.id", "../x"), "shards[0].id '../x' is not a shard id"),
    ("errors-object", _set("errors", {"a": 1}), "errors is {\"a\": 1}, not a list"),
    ("sha-not-hex", _set("shards.0.files.images.sha256", "zz"), "sha256 is not 64 lower-case hex digits"),
    ("empty-object", lambda m: m.clear(), "is not a clip-atlas-shards v1 manifest"),
    ("top-level-list", lambda m: [m], "is not a clip-atlas-shards v1 manifest"),
    ("top-level-number", lambda m: 7, "is not a clip-atlas-shards v1 manifest"),
]


@pytest.mark.parametrize("edit,phrase", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_a_malformed_manifest_is_one_error_line(setup, capsys, edit, phrase):
    """A manifest claiming 10^15 rows left 96 images without head rows and no shard_sets row;
    `rows: "abc"`, `shards: {}` and a missing key ended in "unexpected TypeError/KeyError"."""
    wh, victim = setup
    before = state(wh)
    edit_manifest(victim, edit)
    assert phrase in attach_error(capsys, wh, victim), phrase
    assert state(wh) == before


# --------------------------------------------------------------------------- atomic

def test_a_failure_inside_the_write_leaves_the_warehouse_as_it_was(setup, monkeypatch):
    """The rows went in over several transactions: a failure after the first left them half in.
    Now one transaction: a failure at its last step rolls every row back."""
    wh, victim = setup
    before = state(wh)

    def fail(*a, **kw):
        raise RuntimeError("disk full (injected)")
    monkeypatch.setattr(writes, "upsert_shard_set", fail)
    with pytest.raises(RuntimeError, match="injected"):
        shards.attach_set(str(wh), victim, copy_below=10**6)
    assert state(wh) == before
    monkeypatch.undo()
    assert shards.attach_set(str(wh), victim, copy_below=0)["files_in_place"] == 3 + 2
    release_readers()
    con = duckdb.connect(str(wh), read_only=True)
    try:
        assert con.execute("SELECT count(*), count(DISTINCT (model_id, image_id, layer, head)) FROM head_embeddings "
                           "WHERE model_id = 'toy/test'").fetchone() == (24 + 16, 24 + 16)
        assert sorted(r for r in con.execute("SELECT * FROM head_embeddings WHERE image_id LIKE 'shapes:6:seed=1/%'")
                      .fetchall()) == expected_heads()
    finally:
        con.close()


KILL_CHILD = r"""
import sys
import etl.shards, models.hashing, warehouse, warehouse.shard_checks, pyarrow.parquet   # imports before the clock
print("go", flush=True)
etl.shards.attach_set(sys.argv[1], sys.argv[2], copy_below=int(sys.argv[3]))
print("done", flush=True)
"""


@pytest.mark.slow
def test_attach_killed_at_random_points_leaves_the_warehouse_before_or_after(tmp_path):
    """kill -9 at random points of an attach (checks, copy, re-clustering, commit): the warehouse is
    exactly as before it or exactly as after it, never between; the next attach completes it."""
    import random
    import time

    from etl.jobs.bench_scale import generate
    directory = tmp_path / "set"
    generate(directory, 1800, seed=3, shard_size=600)                   # 3 shards, 12 heads, d = 512
    wh = tmp_path / "w.duckdb"
    make_set(tmp_path / "first")
    shards.attach_set(str(wh), tmp_path / "first", copy_below=0)        # the warehouse has a view and rows
    base = tmp_path / "base.duckdb"
    shutil.copy(wh, base)
    before = state(wh)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ATLAS_NO_PROGRESS": "1"}

    def child(copy_below: int):
        p = subprocess.Popen([sys.executable, "-c", KILL_CHILD, str(wh), str(directory), str(copy_below)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        assert p.stdout.readline().strip() == "go"
        return p, time.monotonic()

    after = {}
    def reset():
        Path(f"{wh}.wal").unlink(missing_ok=True)                       # (a killed writer's log must not replay)
        shutil.copy(base, wh)

    for copy_below in (10**6, 0):                                        # copy, then in place
        reset()
        p, t0 = child(copy_below)
        assert p.stdout.readline().strip() == "done", p.stderr.read()[-2000:]
        full = time.monotonic() - t0
        p.wait()
        after[copy_below] = state(wh)
        assert after[copy_below] != before
        rng = random.Random(copy_below)
        seen = {"before": 0, "after": 0}
        # kill points spread over the first half of a full attach (its first run, timed above, pays cold
        # caches, so a later one may commit sooner: points over the whole of it all landed after the commit)
        for lo, hi in ((0.05, 0.15), (0.15, 0.3), (0.3, 0.5)):
            reset()
            p, t0 = child(copy_below)
            time.sleep(max(0.05, rng.uniform(lo, hi) * full))
            p.kill()
            p.wait()
            got = state(wh)
            assert got in (before, after[copy_below])
            seen["before" if got == before else "after"] += 1
            shards.attach_set(str(wh), directory, copy_below=copy_below)     # the next attach completes it
            assert state(wh) == after[copy_below]
        assert seen["before"] >= 1, seen
