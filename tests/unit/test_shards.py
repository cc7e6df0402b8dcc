"""Parquet shard sets without Ray: the shard schemas are the warehouse's, `attach` copies small sets
and reads large ones in place through the writer's `head_embeddings` view, moves a set between the
modes without losing or doubling a row, survives a later migration (even one that indexes the
table), and the SQL console reads the view while it still cannot name a file."""
from __future__ import annotations

import json
import shutil

import duckdb
import numpy as np
import pytest

from etl import shards
from models.hashing import sha256_file
from warehouse import MIGRATIONS_DIR, connect, migrate, optimize, writer, writes
from warehouse.console import QueryRefused, run_console_query

MODEL_ROW = {"model_id": "toy/test", "arch": "toy", "pretrained": None, "source": "random", "checkpoint_path": None,
             "seed": 0, "layers": 3, "heads": 2, "width": 8, "embed_dim": 4, "patch_size": 8, "image_size": 16,
             "pooling": "tok"}
LAYERS = [1, 2]
DATASET = {"dataset_id": "shapes:6:seed=1", "name": "shapes:6:seed=1", "source": "shapes", "n_images": 6,
           "spec": "shapes:6:seed=1"}
DUCKDB_TYPE = {"string": "VARCHAR", "int32": "INTEGER", "binary": "BLOB", "list<item: float>": "FLOAT[]"}


def _vectors(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 4)).astype(np.float32),
            rng.standard_normal((n, len(LAYERS), 2, 4)).astype(np.float32))


def _ids(first: int, n: int) -> list[str]:
    return [f"shapes:6:seed=1/{i}" for i in range(first, first + n)]


def make_set(directory, blocks=((0, 2), (2, 2), (4, 2))) -> dict:
    """A shard set of 6 images in 3 shards, written as the Ray engine writes it."""
    manifest = shards.new_manifest(MODEL_ROW, LAYERS, None, None, DATASET, 2)
    for first, n in blocks:
        ids = _ids(first, n)
        emb, heads = _vectors(n, first)
        tables = writes.shard_tables(
            MODEL_ROW["model_id"], DATASET["dataset_id"], ids, [f"shapes:1:{i}" for i in range(first, first + n)],
            ["0" * 64] * n, [None] * n, [f"scene {i}" for i in range(first, first + n)], [(16, 16)] * n,
            [b"\xff\xd8jpeg"] * n, [(i, "color", "red") for i in ids], LAYERS, emb, heads)
        manifest["shards"].append(shards.write_shard(directory, first, tables))
    manifest["errors"] = [{"image_id": "shapes:6:seed=1/6", "item": "shapes:1:6", "reason": "ImageError: bad file"}]
    manifest["n_items"], manifest["complete"] = 7, True
    shards.write_manifest(directory, manifest)
    return manifest


def rows(path, sql, params=()):
    with connect(path) as con:
        return con.execute(sql, list(params)).fetchall()


def head_rows(path):
    return rows(path, "SELECT model_id, image_id, layer, head, vec FROM head_embeddings ORDER BY ALL")


def is_view(path) -> bool:
    return bool(rows(path, "SELECT count(*) FROM duckdb_views() WHERE view_name = 'head_embeddings'")[0][0])


def expected_heads() -> list:
    out = []
    for first in (0, 2, 4):
        _, heads = _vectors(2, first)
        for k, image_id in enumerate(_ids(first, 2)):
            for li, layer in enumerate(LAYERS):
                for h in range(2):
                    out.append((MODEL_ROW["model_id"], image_id, layer, h, heads[k, li, h].tolist()))
    return sorted(out)


def test_shard_schemas_are_the_warehouse_columns(tmp_path):
    p = tmp_path / "w.duckdb"
    with writer(p):
        pass
    for table, schema in writes.SHARD_SCHEMAS.items():
        described = [(r[0], r[1]) for r in rows(p, f"DESCRIBE {table}")]
        assert described == [(f.name, DUCKDB_TYPE[str(f.type)]) for f in schema], table


def test_write_shard_is_atomic_and_the_manifest_names_sizes_and_checksums(tmp_path):
    d = tmp_path / "set"
    m = make_set(d)
    assert [s["id"] for s in m["shards"]] == ["000000000", "000000002", "000000004"]
    assert sorted(p.name for p in (d / "images").iterdir()) == ["000000000.parquet", "000000002.parquet",
                                                                 "000000004.parquet"]
    assert not list(d.rglob(".*.tmp-*"))
    on_disk = shards.read_manifest(d)
    assert on_disk["shards"][1]["files"]["head_embeddings"]["rows"] == 2 * 2 * 2
    shards.verify(d, on_disk)
    before = (d / shards.MANIFEST).stat().st_mtime_ns
    shards.write_manifest(d, on_disk)                      # unchanged content: the file is left alone
    assert (d / shards.MANIFEST).stat().st_mtime_ns == before


def test_resume_adopts_orphans_drops_pieces_and_temporaries(tmp_path):
    d = tmp_path / "set"
    m = make_set(d)
    m["shards"] = m["shards"][:1]                          # the driver died before naming shards 2 and 4
    shards.write_manifest(d, m)
    (d / "images" / "000000004.parquet").unlink()          # shard 4 never got its commit mark
    (d / "images" / ".000000006.parquet.tmp-1-ab").write_bytes(b"half")
    m, done, fixed = shards.resume(d, shards.read_manifest(d))
    assert [s["id"] for s in m["shards"]] == ["000000000", "000000002"]
    assert done == set(_ids(0, 4)) | {"shapes:6:seed=1/6"}          # error records count as done
    assert fixed == {"tmp_removed": 1, "entries_dropped": 0, "orphans_adopted": 1, "pieces_removed": 3}
    assert not (d / "head_embeddings" / "000000004.parquet").exists()
    assert not list(d.rglob(".*.tmp-*"))


def test_attach_copy_in_place_and_back_without_losing_or_doubling_a_row(tmp_path):
    d = tmp_path / "set"
    make_set(d)
    p = tmp_path / "w.duckdb"
    other = np.ones((1, 1, 2, 4), np.float32)
    with writer(p) as con:                                 # rows of the local engine: another model, and
        writes.insert_head_embeddings(con, "other/model", ["x/0"], [0], other)    # two images of this set
        _, heads = _vectors(2, 0)
        writes.insert_head_embeddings(con, MODEL_ROW["model_id"], _ids(0, 2), LAYERS, heads)
    want = sorted(expected_heads() + [("other/model", "x/0", 0, h, [1.0] * 4) for h in range(2)])

    r = shards.attach_set(str(p), d, copy_below=10**6)
    assert r["mode"] == "copy" and r["head_rows"] == 24 and not is_view(p)
    assert head_rows(p) == want
    assert rows(p, "SELECT count(*) FROM images")[0][0] == 6
    assert rows(p, "SELECT count(*) FROM image_factors")[0][0] == 6
    assert rows(p, "SELECT count(*) FROM image_embeddings")[0][0] == 6
    assert rows(p, "SELECT analysed_layers FROM models WHERE model_id = 'toy/test'") == [(LAYERS,)]
    assert shards.attach_set(str(p), d, copy_below=10**6)["skipped"]

    r = shards.attach_set(str(p), d, copy_below=0)
    assert r["mode"] == "in_place" and r["files_in_place"] == 3 and is_view(p)
    assert head_rows(p) == want
    assert rows(p, "SELECT count(*) FROM head_embeddings_base")[0][0] == 2      # only the other model's
    assert rows(p, "SELECT mode, n_images, n_head_rows, len(files) FROM shard_sets") == [("in_place", 6, 24, 3)]

    # the jobs keep writing while the view stands: into the base table, and optimize sees only it
    with writer(p) as con:
        writes.insert_head_embeddings(con, "other/model", ["x/1"], [0], other)
        assert optimize(con) == 4
    assert len(head_rows(p)) == len(want) + 2

    r = shards.attach_set(str(p), d, copy_below=10**6)
    assert r["mode"] == "copy" and not is_view(p)
    assert rows(p, "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'head_embeddings_base'")[0][0] == 0
    assert rows(p, "SELECT item, reason FROM errors") == [("shapes:1:6", "ImageError: bad file")]   # once
    assert [r for r in head_rows(p) if r[1] != "x/1"] == want and len(head_rows(p)) == len(want) + 2


def test_a_damaged_shard_is_refused_by_attach(tmp_path):
    d = tmp_path / "set"
    make_set(d)
    f = d / "head_embeddings" / "000000002.parquet"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="000000002.parquet does not match its sha256"):
        shards.attach_set(str(tmp_path / "w.duckdb"), d, copy_below=0)


def test_a_later_migration_sees_the_table_and_the_view_comes_back(tmp_path):
    d = tmp_path / "set"
    make_set(d)
    p = tmp_path / "w.duckdb"
    shards.attach_set(str(p), d, copy_below=0)
    migs = tmp_path / "migs"
    shutil.copytree(MIGRATIONS_DIR, migs)
    # a migration written against the schema: it indexes the table (an index blocks a plain rename)
    (migs / "099_index.sql").write_text("CREATE INDEX head_idx ON head_embeddings (model_id, layer, head);")
    con = duckdb.connect(str(p))
    try:
        assert migrate(con, migs) == [99]
    finally:
        con.close()
    assert is_view(p) and head_rows(p) == expected_heads()
    assert rows(p, "SELECT table_name FROM duckdb_indexes() WHERE index_name = 'head_idx'") == \
        [("head_embeddings_base",)]
    shards.attach_set(str(p), d, copy_below=10**6)          # back to a table: the index moves with it
    assert not is_view(p) and head_rows(p) == expected_heads()
    assert rows(p, "SELECT table_name FROM duckdb_indexes() WHERE index_name = 'head_idx'") == [("head_embeddings",)]


def test_the_console_reads_the_view_but_cannot_name_a_file(tmp_path):
    d = tmp_path / "set"
    make_set(d)
    p = tmp_path / "w.duckdb"
    shards.attach_set(str(p), d, copy_below=0)
    df, _ = run_console_query(p, "SELECT count(*) AS n, count(DISTINCT image_id) AS images FROM head_embeddings")
    assert df.to_dict("records") == [{"n": 24, "images": 6}]
    df, _ = run_console_query(p, "SELECT name, value FROM duckdb_settings() WHERE name IN "
                                 "('enable_external_access', 'lock_configuration') ORDER BY name")
    assert df.values.tolist() == [["enable_external_access", "false"], ["lock_configuration", "true"]]
    f = d / "head_embeddings" / "000000000.parquet"
    for sql in (f"SELECT * FROM read_parquet('{f}')", f"SELECT * FROM '{f}'", f"COPY (SELECT 1) TO '{f}'",
                "SELECT * FROM read_csv('/etc/hostname')"):
        with pytest.raises(QueryRefused):
            run_console_query(p, sql)
    assert json.loads((d / shards.MANIFEST).read_text())["shards"][0]["files"]["head_embeddings"]["sha256"] == \
        sha256_file(f)                                     # the refused COPY wrote nothing


def test_a_moved_set_is_attached_from_its_new_place_and_can_be_detached(tmp_path):
    d = tmp_path / "set"
    make_set(d)
    p = tmp_path / "w.duckdb"
    shards.attach_set(str(p), d, copy_below=0)
    moved = tmp_path / "elsewhere"
    shutil.move(str(d), str(moved))
    with pytest.raises(duckdb.Error):                      # the view names files that are gone
        head_rows(p)
    r = shards.attach_set(str(p), moved, copy_below=0)
    assert r["replaced"] == [str(d.resolve())] and head_rows(p) == expected_heads()
    assert rows(p, "SELECT shard_dir FROM shard_sets") == [(str(moved.resolve()),)]
    assert shards.detach_set(str(p), moved) == {"shard_dir": str(moved.resolve()), "detached": "in_place",
                                                "files_in_place": 0}
    assert not is_view(p) and head_rows(p) == [] and rows(p, "SELECT count(*) FROM images")[0][0] == 6
    with pytest.raises(ValueError, match="no shard set attached"):
        shards.detach_set(str(p), moved)
