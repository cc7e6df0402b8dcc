"""SQL console: refuses writes, files, network, extensions and settings; caps rows and time."""

from __future__ import annotations

import time

import duckdb
import numpy as np
import pytest

from warehouse import WarehouseMissingError, connect, writer
from warehouse.console import (
    EXAMPLE_QUERIES,
    ConsoleError,
    QueryRefused,
    QueryTimeout,
    check_query,
    harden,
    register_clip_text,
    run_console_query,
)

D = 4
MODEL = "toy-shapes/bundled"


def _text_vec(model_id: str, text: str) -> np.ndarray:
    rng = np.random.default_rng(abs(hash((model_id, text))) % 2**32)
    v = rng.normal(size=D)
    return v / np.linalg.norm(v)


@pytest.fixture(scope="module")
def wh(tmp_path_factory):
    """A tiny warehouse (shared by this module's tests): one model, 30 images, 2 layers x 2 heads."""
    p = tmp_path_factory.mktemp("console") / "w.duckdb"
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(30, 2, 2, D)).astype(np.float32)
    with writer(p) as con:
        con.execute("""INSERT INTO models (model_id, arch, source, layers, heads, width, embed_dim,
                       patch_size, image_size, pooling, analysed_layers)
                       VALUES (?, 'toy', 'bundled', 4, 2, 8, ?, 8, 32, 'tok', [2, 3])""", [MODEL, D])
        con.executemany("INSERT INTO images (image_id, dataset_id, label) VALUES (?, 'shapes', ?)",
                        [[f"shapes/{i}", "circle" if i % 2 else "square"] for i in range(30)])
        con.executemany("INSERT INTO head_embeddings VALUES (?, ?, ?, ?, ?)",
                        [[MODEL, f"shapes/{i}", 2 + l, h, vecs[i, l, h].tolist()]
                         for i in range(30) for l in range(2) for h in range(2)])
        con.execute("INSERT INTO properties VALUES ('colors', NULL), ('animals', NULL)")
        con.execute("""INSERT INTO texts VALUES ('t1', 'atlas', 'a red circle', 'colors'),
                       ('t2', 'atlas', 'a dog on a grass background', 'animals'), ('t3', 'atlas', 'blue paint', 'colors')""")
        con.execute(f"""INSERT INTO head_texts (model_id, layer, head, rank, text_id, variance_explained) VALUES
                       ('{MODEL}', 3, 0, 0, 't1', 0.3), ('{MODEL}', 3, 0, 1, 't3', 0.2),
                       ('{MODEL}', 3, 1, 0, 't2', 0.4), ('{MODEL}', 3, 1, 1, 't1', 0.1)""")
        con.execute(f"""INSERT INTO head_labels (model_id, layer, head, property, confidence, labeler) VALUES
                       ('{MODEL}', 3, 0, 'colors', 0.9, 'offline'), ('{MODEL}', 3, 1, 'animals', 0.6, 'offline')""")
        con.execute("INSERT INTO runs (run_id, job, status) VALUES ('embed-1', 'embed', 'ok')")
    return p, vecs


def _count(p, table):
    with connect(p) as con:
        return con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]


# --------------------------------------------------------------------------- what works

def test_a_valid_select_returns_a_dataframe(wh):
    p, _ = wh
    df, truncated = run_console_query(p, "SELECT model_id, layer, head, property FROM head_labels ORDER BY head")
    assert not truncated
    assert list(df.columns) == ["model_id", "layer", "head", "property"]
    assert df["property"].tolist() == ["colors", "animals"]


@pytest.mark.parametrize("sql, n", [
    ("SHOW TABLES", None), ("DESCRIBE head_scores", None), ("FROM texts", 3),
    ("WITH x AS (SELECT 1 AS a) SELECT * FROM x", 1), ("VALUES (1), (2)", 2),
    ("EXPLAIN SELECT * FROM texts", None),
])
def test_read_only_forms_are_allowed(wh, sql, n):
    p, _ = wh
    df, truncated = run_console_query(p, sql)
    assert len(df) >= 1 and not truncated
    if n is not None:
        assert len(df) == n


def test_row_cap_truncates_and_says_so(wh):
    p, _ = wh
    df, truncated = run_console_query(p, "SELECT * FROM range(25) t(i) ORDER BY i DESC", max_rows=10)
    assert truncated and len(df) == 10
    assert df["i"].tolist() == list(range(24, 14, -1))
    df, truncated = run_console_query(p, "SELECT * FROM range(10)", max_rows=10)
    assert len(df) == 10 and not truncated
    df, truncated = run_console_query(p, "SELECT * FROM range(5000)", max_rows=4500)
    assert len(df) == 4500 and truncated


def test_empty_result_keeps_its_columns(wh):
    p, _ = wh
    df, truncated = run_console_query(p, "SELECT text_id, text FROM texts WHERE false")
    assert len(df) == 0 and list(df.columns) == ["text_id", "text"] and not truncated


def test_a_long_query_is_interrupted(wh):
    p, _ = wh
    t0 = time.monotonic()
    with pytest.raises(QueryTimeout, match=r"longer than 0\.5 s"):
        run_console_query(p, "SELECT count(*) FROM range(1000000000) a, range(1000) b WHERE a.range * b.range = -1",
                          timeout_s=0.5)
    assert time.monotonic() - t0 < 5
    df, _ = run_console_query(p, "SELECT 42 AS x")  # the connection is usable again
    assert df["x"].tolist() == [42]


# --------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("sql, words", [
    ("INSERT INTO texts VALUES ('x', 'b', 't', NULL)", "INSERT writes"),
    ("UPDATE texts SET text = 'x'", "UPDATE writes"),
    ("DELETE FROM texts", "DELETE writes"),
    ("CREATE TABLE t2 AS SELECT 1", "CREATE changes"),
    ("DROP TABLE texts", "DROP changes"),
    ("ALTER TABLE texts ADD COLUMN z INT", "ALTER changes"),
    ("COPY texts TO '/tmp/atlas_console_leak.csv'", "COPY reads or writes files"),
    ("COPY texts FROM '/etc/passwd'", "COPY reads or writes files"),
    ("EXPORT DATABASE '/tmp/atlas_console_export'", "EXPORT DATABASE writes files"),
    ("ATTACH '/tmp/other.duckdb' AS other", "ATTACH opens other databases"),
    ("DETACH other", "DETACH"),
    ("INSTALL httpfs", "INSTALL/LOAD"),
    ("LOAD httpfs", "INSTALL/LOAD"),
    ("PRAGMA version", "PRAGMA"),
    ("SET enable_external_access = true", "SET/RESET/USE"),
    ("RESET memory_limit", "SET/RESET/USE"),
    ("CALL pragma_version()", "CALL"),
    ("BEGIN TRANSACTION", "Transactions"),
    ("CHECKPOINT", "CALL"),
    ("EXPLAIN ANALYZE DELETE FROM texts", "DELETE writes"),
])
def test_writes_files_extensions_and_settings_are_refused(wh, sql, words):
    p, _ = wh
    with pytest.raises(QueryRefused) as err:
        run_console_query(p, sql)
    assert words in str(err.value)
    assert _count(p, "texts") == 3


def test_copy_creates_no_file(wh, tmp_path):
    p, _ = wh
    target = tmp_path / "leak.csv"
    with pytest.raises(QueryRefused):
        run_console_query(p, f"COPY (SELECT * FROM texts) TO '{target}'")
    assert not target.exists()


@pytest.mark.parametrize("sql, name", [
    ("SELECT * FROM read_csv('/etc/passwd')", "read_csv()"),
    ("SELECT * FROM read_csv_auto('/etc/passwd')", "read_csv_auto()"),
    ("SELECT * FROM read_text('/etc/passwd')", "read_text()"),
    ("SELECT * FROM read_blob('/etc/passwd')", "read_blob()"),
    ("SELECT * FROM glob('/etc/*')", "glob()"),
    ("SELECT * FROM read_parquet('https://example.com/x.parquet')", "read_parquet()"),
    ("SELECT * FROM texts WHERE text IN (SELECT column0 FROM read_csv('/etc/passwd'))", "read_csv()"),
    ("SELECT * FROM query('SELECT 1')", "query()"),
    ("SELECT * FROM '/etc/passwd'", "FROM '/etc/passwd'"),
    ('SELECT * FROM "data.csv"', "FROM 'data.csv'"),
    ("SELECT * FROM 'https://example.com/x.csv'", "reads a file or URL"),
])
def test_file_and_network_access_is_refused_by_inspection(wh, sql, name):
    p, _ = wh
    with pytest.raises(QueryRefused) as err:
        run_console_query(p, sql)
    assert name in str(err.value)


def test_multiple_statements_are_refused_and_none_runs(wh):
    p, _ = wh
    with pytest.raises(QueryRefused, match="One statement per query: found 2"):
        run_console_query(p, "SELECT 1; DROP TABLE texts")
    assert _count(p, "texts") == 3


def test_syntax_errors_and_empty_queries_say_so(wh):
    p, _ = wh
    with pytest.raises(ConsoleError, match="Syntax error") as err:
        run_console_query(p, "SELEC * FROM texts")
    assert not isinstance(err.value, QueryRefused)
    with pytest.raises(ConsoleError, match="empty"):
        run_console_query(p, "   ")
    with pytest.raises(ConsoleError, match="empty"):
        run_console_query(p, "-- only a comment")
    with pytest.raises(ConsoleError, match="does not exist"):
        run_console_query(p, "SELECT * FROM no_such_table")


def test_check_query_alone_checks_statement_types():
    assert check_query("SELECT 1") == "SELECT 1"
    with pytest.raises(QueryRefused):
        check_query("DELETE FROM t")


# --------------------------------------------------------------------------- defence in depth

def test_hardened_connection_blocks_files_and_settings_without_inspection(wh):
    p, _ = wh
    with connect(p) as con:
        harden(con)
        with pytest.raises(duckdb.PermissionException):
            con.execute("SELECT * FROM read_csv('/etc/passwd')").fetchall()
        with pytest.raises(duckdb.PermissionException):
            con.execute("COPY (SELECT 1) TO '/tmp/atlas_console_x.csv'")
        with pytest.raises(duckdb.Error):
            con.execute("SET enable_external_access = true")
        with pytest.raises(duckdb.Error):
            con.execute("LOAD httpfs")
        with pytest.raises(duckdb.Error, match="read-only"):
            con.execute("INSERT INTO properties VALUES ('x', NULL)")
        harden(con)  # idempotent on a locked, already safe instance


def test_console_releases_the_file_for_writers(wh):
    p, _ = wh
    before = _count(p, "properties")
    run_console_query(p, "SELECT * FROM texts")
    with writer(p, timeout_s=5) as con:  # a fresh, unlocked instance, read-write
        con.execute("INSERT INTO properties VALUES ('shapes', NULL)")
    assert _count(p, "properties") == before + 1


def test_missing_warehouse_says_how_to_fill_it(tmp_path):
    with pytest.raises(WarehouseMissingError, match="python -m etl run"):
        run_console_query(tmp_path / "none.duckdb", "SELECT 1")


# --------------------------------------------------------------------------- clip_text and vectors

def test_clip_text_udf_and_inner_products(wh):
    p, vecs = wh
    calls = []

    def tower(model_id, text):
        calls.append((model_id, text))
        return _text_vec(model_id, text)

    sql = f"""SELECT image_id, list_inner_product(vec, clip_text(model_id, 'a tornado')) AS share
              FROM head_embeddings WHERE model_id = '{MODEL}' AND layer = 3 AND head = 1
              ORDER BY share DESC LIMIT 5"""
    df, _ = run_console_query(p, sql, clip_text=tower)
    t = _text_vec(MODEL, "a tornado")
    expected = vecs[:, 1, 1] @ t
    order = np.argsort(-expected)[:5]
    assert df["image_id"].tolist() == [f"shapes/{i}" for i in order]
    assert np.allclose(df["share"].to_numpy(), expected[order], atol=1e-5)
    assert calls == [(MODEL, "a tornado")]       # memoised: one text-tower call for 30 rows
    # the function exists only while a console query runs
    with connect(p) as con:
        with pytest.raises(duckdb.CatalogException):
            con.execute("SELECT clip_text('m', 'x')")


def test_array_inner_product_needs_a_fixed_size_cast(wh):
    """FLOAT[] columns work with list_inner_product; array_inner_product needs FLOAT[d]."""
    p, vecs = wh
    with connect(p) as con:
        register_clip_text(con, _text_vec)
        try:
            with pytest.raises(duckdb.BinderException):
                con.execute("SELECT array_inner_product(vec, vec) FROM head_embeddings").fetchall()
            a = con.execute(f"""SELECT array_inner_product(vec::FLOAT[{D}], clip_text(model_id, 'x')::FLOAT[{D}]),
                                      list_inner_product(vec, clip_text(model_id, 'x'))
                               FROM head_embeddings WHERE layer = 2 AND head = 0 ORDER BY image_id""").fetchall()
        finally:
            con.remove_function("clip_text")
    a = np.array(a)
    assert np.allclose(a[:, 0], a[:, 1], atol=1e-6)
    ids = sorted(range(30), key=lambda i: f"shapes/{i}")
    assert np.allclose(a[:, 1], vecs[ids, 0, 0] @ _text_vec(MODEL, "x"), atol=1e-5)


def test_every_example_query_runs(wh):
    p, _ = wh
    results = {title: run_console_query(p, sql, clip_text=_text_vec)[0] for title, sql in EXAMPLE_QUERIES.items()}
    assert len(EXAMPLE_QUERIES) >= 5
    colour = results["Colour heads of every model"]
    assert colour["head_name"].tolist() == ["L3.H0"] and colour["association"].tolist() == [1.0]
    bg = results["Heads whose first text mentions a background"]
    assert bg["head_name"].tolist() == ["L3.H1"] and bg["text"].tolist() == ["a dog on a grass background"]
    top = results["Top images of a head for a text (clip_text)"]
    assert len(top) == 8 and top["head_name"].unique().tolist() == ["L3.H0"]
    assert top["share"].is_monotonic_decreasing
    scores = results["Model scores"]
    assert scores["n_heads"].tolist() == [2]
    counts = results["Label counts per property"]
    assert sorted(counts["property"]) == ["animals", "colors"]
    assert results["Recent job runs and their errors"]["run_id"].tolist() == ["embed-1"]
    assert len(results["Per-layer scores"]) == 1
