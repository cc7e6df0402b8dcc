"""Head embeddings read straight out of in-place shard files (warehouse.shard_files) and the fast
per-head neighbour query built on them: the page reader gives pyarrow's floats (uncompressed and
snappy, falls back on nulls and ragged lists), row groups are chosen by statistics, and
neighbours_per_head over an in-place set (table rows mixed in, an image excluded, near-ties) gives
exactly the answer of the same SQL over the whole view."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from etl import shards
from warehouse import connect, queries, writer, writes
from warehouse import shard_files as sf

MODEL_ROW = {"model_id": "toy/nb", "arch": "toy", "pretrained": None, "source": "random", "checkpoint_path": None,
             "seed": 0, "layers": 2, "heads": 3, "width": 24, "embed_dim": 16, "patch_size": 8, "image_size": 16,
             "pooling": "tok"}
LAYERS, H, D = [0, 1], 3, 16
DATASET = {"dataset_id": "nb:40", "name": "nb:40", "source": "synthetic", "n_images": 40}


def _ids(first, n):
    return [f"nb/{i:04d}" for i in range(first, first + n)]


def _heads(first, n):
    """[n, layers, H, D] float32, with exact duplicates across images (ties) and small values."""
    rng = np.random.default_rng(first + 7)
    v = rng.standard_normal((n, len(LAYERS), H, D)).astype(np.float32)
    v[1::5] = v[0]                                     # every fifth image repeats the shard's first: exact ties
    return v


def make_set(directory, n=40, shard=16):
    manifest = shards.new_manifest(MODEL_ROW, LAYERS, None, None, DATASET, shard)
    for first in range(0, n, shard):
        m = min(shard, n - first)
        ids = _ids(first, m)
        emb = np.random.default_rng(first).standard_normal((m, D)).astype(np.float32)
        tables = writes.shard_tables(MODEL_ROW["model_id"], DATASET["dataset_id"], ids, [None] * m, ["0" * 64] * m,
                                     [f"label {i}" for i in ids], [None] * m, [(16, 16)] * m, [b"jpeg"] * m, [],
                                     LAYERS, emb, _heads(first, m))
        manifest["shards"].append(shards.write_shard(directory, first, tables))
    manifest["n_items"], manifest["complete"] = n, True
    shards.write_manifest(directory, manifest)
    return manifest


@pytest.fixture(scope="module")
def attached(tmp_path_factory):
    """A warehouse with the set in place plus rows of the same model in the table (images 100..104)
    and another model's rows."""
    tmp = tmp_path_factory.mktemp("nb")
    make_set(tmp / "set")
    p = str(tmp / "w.duckdb")
    shards.attach_set(p, tmp / "set", copy_below=0)
    extra = _ids(100, 5)
    vecs = np.random.default_rng(5).standard_normal((5, len(LAYERS), H, D)).astype(np.float32)
    with writer(p) as con:
        writes.insert_head_embeddings(con, MODEL_ROW["model_id"], extra, LAYERS, vecs)
        writes.insert_head_embeddings(con, "other/model", _ids(0, 3), LAYERS, vecs[:3] * 100)
        writes.upsert_dataset(con, "extra:5", "extra:5", "synthetic", 5)
        con.execute("INSERT INTO images (image_id, dataset_id, label) SELECT unnest($i), $d, 'extra'",
                    {"i": extra, "d": "extra:5"})
    return p, tmp / "set"


def _sql_answer(path, heads, qs, k, exclude=None):
    with connect(path) as con:
        return queries._neighbours_per_head_sql(con, "head_embeddings", MODEL_ROW["model_id"], heads,
                                                np.asarray(qs, np.float32), k, exclude)


def test_vec_is_written_uncompressed_and_the_rest_compressed(attached):
    _, d = attached
    f = pq.ParquetFile(next((d / "head_embeddings").glob("*.parquet")))
    rg = f.metadata.row_group(0)
    comp = {rg.column(j).path_in_schema.split(".")[0]: rg.column(j).compression for j in range(rg.num_columns)}
    assert comp["vec"] == "UNCOMPRESSED"
    assert comp["image_id"] == comp["model_id"] == comp["layer"] == comp["head"] == "SNAPPY"
    # every table of the shard: only the vectors go uncompressed
    for table in writes.SHARD_TABLES:
        md = pq.ParquetFile(next((d / table).glob("*.parquet"))).metadata.row_group(0)
        for j in range(md.num_columns):
            c = md.column(j)
            assert c.compression == ("UNCOMPRESSED" if c.path_in_schema.startswith("vec.") else "SNAPPY"), (table, c.path_in_schema)
    assert f.metadata.num_row_groups == len(LAYERS) * H          # still one row group per (layer, head)


def test_page_reader_equals_pyarrow_uncompressed_snappy_and_falls_back(tmp_path):
    rng = np.random.default_rng(0)
    v = rng.standard_normal((5000, 64)).astype(np.float32)
    vec = pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), 64).cast(pa.list_(pa.float32()))
    t = pa.table({"image_id": [str(i) for i in range(5000)], "vec": vec})
    for codec in ("none", "snappy", "zstd"):
        f = tmp_path / f"{codec}.parquet"
        pq.write_table(t, f, compression={"image_id": "snappy", "vec.list.element": codec}, data_page_size=20_000, use_dictionary=False)
        with open(f, "rb") as fh:
            pf = pq.ParquetFile(fh)
            assert pf.metadata.row_group(0).column(1).compression == codec.upper().replace("NONE", "UNCOMPRESSED")
            fast = sf._fast_vectors(fh, pf.metadata, 0, 1, 3, 1)
        assert fast is not None and np.array_equal(fast, v), codec        # the page path, not the fallback
        assert np.array_equal(sf.read_vectors(str(f), 0), v)
    # a null vector and a ragged list: the page path declines, pyarrow says Irregular
    for bad in ([[1.0, 2.0], None], [[1.0, 2.0], [3.0]]):
        f = tmp_path / "bad.parquet"
        pq.write_table(pa.table({"vec": pa.array(bad, pa.list_(pa.float32()))}), f)
        with open(f, "rb") as fh:
            pf = pq.ParquetFile(fh)
            assert sf._fast_vectors(fh, pf.metadata, 0, 0, 3, 1) is None
        with pytest.raises(sf.Irregular):
            sf.read_vectors(str(f), 0)
    with pytest.raises(sf.Irregular):
        sf.read_vectors(str(tmp_path / "gone.parquet"), 0)


def test_row_groups_are_chosen_by_statistics(attached):
    p, d = attached
    files = sorted(str(f) for f in (d / "head_embeddings").glob("*.parquet"))
    groups = sf.head_groups(files, MODEL_ROW["model_id"], 1, 2)
    assert [(g[0], g[2]) for g in groups] == [(f, False) for f in files]        # one exact group per file
    X, cols = sf.read_rows(groups[0], MODEL_ROW["model_id"], 1, 2)
    assert np.array_equal(X, _heads(0, 16)[:, 1, 2]) and cols["image_id"].to_pylist() == _ids(0, 16)
    assert groups[0][3] == np.abs(_heads(0, 16)[:, 1, 2]).max()    # the bound of the values, from the statistics
    assert sf.head_groups(files, "other/model", 1, 2) == [] and sf.head_groups(files, MODEL_ROW["model_id"], 1, 3) == []


@pytest.mark.parametrize("k", [1, 3, 10, 60])
def test_fast_neighbours_equal_the_sql_over_the_view(attached, k):
    p, _ = attached
    heads = [(1, 2), (0, 0), (1, 0)]
    rng = np.random.default_rng(k)
    qs = rng.standard_normal((3, D)).astype(np.float32)
    for exclude in (None, "nb/0000", "nb/0102", "nb/0017"):
        got = queries.neighbours_per_head(p, MODEL_ROW["model_id"], heads, qs, k=k, exclude=exclude)
        want = _sql_answer(p, heads, qs, k, exclude)
        pd.testing.assert_frame_equal(got, want)
        assert exclude not in got.image_id.tolist()
    assert len(got) == 3 * min(k, 44)                   # 40 in the files + 5 in the table, one excluded
    with connect(p) as con:                             # the files' rows were narrowed, not all handed over
        from warehouse.db import in_place_shard_files
        cand = queries._shard_candidates(in_place_shard_files(con), MODEL_ROW["model_id"], heads, qs, k, None)
    assert cand.num_rows == 3 * 40 if k >= 40 else cand.num_rows < 3 * 40
    if k >= 44:                                         # the table's rows are ranked with the files'
        assert set(_ids(100, 5)) - {"nb/0017"} <= set(got.image_id) and len(set(got.image_id)) == 44


def test_fast_neighbours_keep_exact_ties_in_image_id_order(attached):
    p, _ = attached
    q = _heads(0, 1)[0, 1, 2]                          # image 0's own vector: it and its copies tie at the top
    got = queries.neighbours_per_head(p, MODEL_ROW["model_id"], [(1, 2)], q[None], k=5)
    assert got.image_id.tolist()[:4] == ["nb/0000", "nb/0001", "nb/0006", "nb/0011"]
    assert got.score.iloc[0] == got.score.iloc[3]
    pd.testing.assert_frame_equal(got, _sql_answer(p, [(1, 2)], q[None], 5))


def test_a_missing_shard_file_goes_through_the_view(attached, monkeypatch):
    p, _ = attached
    calls = []
    real = queries._neighbours_per_head_sql
    monkeypatch.setattr(queries, "_neighbours_per_head_sql", lambda con, source, *a: calls.append(source) or real(con, source, *a))

    def broken(*a, **k):
        raise sf.Irregular("gone")
    monkeypatch.setattr(sf, "read_rows", broken)
    q = np.ones((1, D), np.float32)
    got = queries.neighbours_per_head(p, MODEL_ROW["model_id"], [(0, 1)], q, k=4)
    assert calls == ["head_embeddings"] and len(got) == 4


@pytest.mark.parametrize("dataset, n", [(None, 45), (DATASET["dataset_id"], 40), ("extra:5", 5)])
def test_head_vector_batches_read_the_files_and_the_table(attached, dataset, n):
    """The streamed rows of one head (files through shard_files, the table through DuckDB) are the
    view's rows of that head, as a multiset, in batches of at most batch_rows; --dataset filters both."""
    p, _ = attached
    batches = list(queries.head_vector_batches(p, MODEL_ROW["model_id"], 1, 2, batch_rows=7, dataset=dataset))
    assert all(0 < len(b) <= 7 and b.dtype == np.float32 and b.shape[1] == D for b in batches)
    got = np.concatenate(batches)
    sql = ("SELECT vec FROM head_embeddings WHERE model_id = ? AND layer = 1 AND head = 2"
           + ("" if dataset is None else " AND image_id IN (SELECT image_id FROM images WHERE dataset_id = ?)"))
    with connect(p) as con:
        want = np.array([r[0] for r in con.execute(sql, [MODEL_ROW["model_id"]] + ([dataset] if dataset else [])).fetchall()],
                        np.float32)
    assert len(got) == len(want) == n
    np.testing.assert_array_equal(np.unique(got, axis=0), np.unique(want, axis=0))
    np.testing.assert_array_equal(np.sort(got.sum(1)), np.sort(want.sum(1)))          # multiplicities too


def test_head_vector_batches_reuse_gives_the_same_rows_in_few_buffers(attached, monkeypatch):
    """With reuse=True the shard batches are views of recycled buffers: folded in one by one (as
    HeadMoments does) they give what fresh arrays give; read one group at a time, one buffer serves all."""
    p, _ = attached
    fresh = [b.copy() for b in queries.head_vector_batches(p, MODEL_ROW["model_id"], 0, 1)]
    for workers in (1, 2):
        monkeypatch.setattr(sf, "threads", lambda: workers)
        seen, owners = [], []
        for b in queries.head_vector_batches(p, MODEL_ROW["model_id"], 0, 1, reuse=True):
            seen.append(b.copy())                  # consumed before the next batch is asked for
            owners.append(sf.owner(b))             # (kept alive: identities stay distinct)
        np.testing.assert_array_equal(np.concatenate(seen), np.concatenate(fresh))
        shard_owners = {id(o) for o in owners[-3:]}                     # the 3 files' row groups come last
        assert all(o is not None for o in owners[-3:]) and len(seen) == 4         # 1 table batch + 3 row groups
        if workers == 1:
            assert len(shard_owners) == 1
        assert len(shard_owners) <= 3
