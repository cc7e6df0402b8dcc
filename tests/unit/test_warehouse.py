"""Warehouse: locations, migrations, one writer / many readers across processes, runs, score views."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import duckdb
import numpy as np
import pytest

import warehouse
from warehouse import (
    WarehouseBusyError,
    WarehouseError,
    WarehouseMissingError,
    connect,
    default_warehouse_path,
    migrate,
    schema_version,
    writer,
)
from warehouse.db import available_migrations, pending_migrations
from warehouse.runs import finish_run, record_error, run_record, start_run

from tests.warehouse_reads import distinct_reads

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# --------------------------------------------------------------------------- locations

def test_default_path_uses_atlas_home_and_creates_it(tmp_path, monkeypatch):
    home = tmp_path / "atlas" / "home"
    monkeypatch.setenv("ATLAS_HOME", str(home))
    p = default_warehouse_path()
    assert p == home / "warehouse.duckdb"
    assert home.is_dir()


def test_default_path_is_var_under_cwd(tmp_path, monkeypatch):
    monkeypatch.delenv("ATLAS_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_warehouse_path().resolve() == (tmp_path / "var" / "warehouse.duckdb").resolve()
    assert (tmp_path / "var").is_dir()


def test_missing_warehouse_read_only_says_how_to_fill_it(tmp_path):
    p = tmp_path / "nope.duckdb"
    with pytest.raises(WarehouseMissingError) as err:
        connect(p)
    msg = str(err.value)
    assert str(p) in msg
    assert "python -m etl run --model toy-shapes --dataset shapes:2000:seed=0" in msg
    assert "make demo" in msg
    assert not p.exists()  # a read-only open never creates the file
    assert isinstance(err.value, FileNotFoundError)


# --------------------------------------------------------------------------- settings

def test_memory_limit_default_argument_and_env(tmp_path, monkeypatch):
    p = tmp_path / "w.duckdb"
    monkeypatch.delenv("ATLAS_DUCKDB_MEMORY", raising=False)
    with writer(p):
        pass

    def limit(**kw):
        with connect(p, **kw) as con:
            return con.execute("SELECT current_setting('memory_limit')").fetchone()[0]

    assert limit() == "1.8 GiB"                     # 2GB = 2e9 bytes
    assert limit(memory_limit="500MB") == "476.8 MiB"
    monkeypatch.setenv("ATLAS_DUCKDB_MEMORY", "300MB")
    assert limit() == "286.1 MiB"
    with connect(p, threads=1) as con:
        assert con.execute("SELECT current_setting('threads')").fetchone()[0] == 1


# --------------------------------------------------------------------------- migrations

def test_migrations_are_applied_in_order_and_recorded(tmp_path):
    p = tmp_path / "w.duckdb"
    files = available_migrations()
    assert [v for v, _, _ in files] == sorted(v for v, _, _ in files)
    assert files[0][:2] == (1, "init") and files[1][:2] == (2, "scores")
    with writer(p) as con:
        assert schema_version(con) == files[-1][0]
        rows = con.execute("SELECT version, name FROM schema_migrations ORDER BY version").fetchall()
        assert rows == [(v, n) for v, n, _ in files]
    with connect(p) as con:
        assert pending_migrations(con) == []
        names = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        assert {"models", "head_embeddings", "texts", "runs", "errors"} <= names
        views = {r[0] for r in con.execute(
            "SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
        assert {"head_text_matches", "head_scores", "model_scores", "property_heads"} <= views


def test_migrate_is_idempotent_and_incremental(tmp_path):
    d = tmp_path / "migs"
    d.mkdir()
    (d / "001_a.sql").write_text("CREATE TABLE a (x INTEGER);")
    con = duckdb.connect(str(tmp_path / "m.duckdb"))
    assert schema_version(con) == 0
    assert migrate(con, d) == [1]
    assert migrate(con, d) == []
    (d / "002_b.sql").write_text("CREATE TABLE b (y INTEGER); INSERT INTO b VALUES (7);")
    assert migrate(con, d) == [2]
    assert schema_version(con) == 2
    assert con.execute("SELECT y FROM b").fetchall() == [(7,)]
    con.close()


def test_failing_migration_rolls_back_and_names_the_file(tmp_path):
    d = tmp_path / "migs"
    d.mkdir()
    (d / "001_a.sql").write_text("CREATE TABLE a (x INTEGER);")
    (d / "002_bad.sql").write_text("CREATE TABLE half (x INTEGER); SELECT * FROM no_such_table;")
    con = duckdb.connect(str(tmp_path / "m.duckdb"))
    with pytest.raises(WarehouseError, match="002_bad.sql"):
        migrate(con, d)
    assert schema_version(con) == 1
    tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    assert "half" not in tables and "a" in tables
    con.close()


def test_badly_named_migration_is_refused(tmp_path):
    d = tmp_path / "migs"
    d.mkdir()
    (d / "init.sql").write_text("SELECT 1;")
    with pytest.raises(WarehouseError, match="NNN_name.sql"):
        available_migrations(d)


# --------------------------------------------------------------------------- writer

def test_writer_commits_on_success_and_rolls_back_on_error(tmp_path):
    p = tmp_path / "w.duckdb"
    with writer(p) as con:
        con.execute("INSERT INTO properties VALUES ('colors', 'colours')")
    with pytest.raises(ValueError):
        with writer(p) as con:
            con.execute("INSERT INTO properties VALUES ('animals', NULL)")
            raise ValueError("boom")
    with connect(p) as con:
        assert con.execute("SELECT property FROM properties").fetchall() == [("colors",)]


def test_busy_error_names_the_holding_process(tmp_path):
    p = tmp_path / "w.duckdb"
    with writer(p):
        pass
    holder = _python("""
        import sys, time
        from warehouse import writer
        with writer(sys.argv[1]):
            print("holding", flush=True)
            time.sleep(30)
    """, str(p))
    try:
        assert holder.stdout.readline().strip() == "holding"
        t0 = time.monotonic()
        with pytest.raises(WarehouseBusyError) as err:
            connect(p, timeout_s=0.5)
        assert 0.4 < time.monotonic() - t0 < 5
        assert f"PID {holder.pid}" in str(err.value) or f"process {holder.pid}" in str(err.value)
        with pytest.raises(WarehouseBusyError):
            with writer(p, timeout_s=0.3):
                pass
    finally:
        holder.kill()
        holder.wait()
    with connect(p, timeout_s=10) as con:  # released once the holder is gone
        assert schema_version(con) >= 2


READER = """
    import json, sys, time
    from warehouse import connect
    path, stop = sys.argv[1], sys.argv[2]
    import os
    seen, failures = [], []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done = os.path.exists(stop)
        try:
            with connect(path, timeout_s=60) as con:
                seen.append(con.execute("SELECT count(*) FROM errors").fetchone()[0])
        except Exception as exc:  # any failure is a test failure
            failures.append(repr(exc))
        if done:
            break
    print(json.dumps({"seen": seen, "failures": failures}))
"""

WRITER = """
    import sys, time
    from warehouse import writer
    path, n_batches, batch, stop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    for b in range(n_batches):
        with writer(path, timeout_s=60) as con:
            con.executemany("INSERT INTO errors (run_id, item, reason) VALUES (?, ?, 'x')",
                            [["r", f"{b}-{i}"] for i in range(batch)])
        time.sleep(0.02)   # a job computes between batches
    open(stop, "w").close()
    print("done")
"""


@pytest.mark.slow
def test_reader_process_sees_only_committed_batches_while_writer_process_commits(tmp_path):
    p = tmp_path / "w.duckdb"
    stop = tmp_path / "writer-done"
    with writer(p):
        pass
    n_batches, batch = 25, 7
    reader = _python(READER, str(p), str(stop))
    w = _python(WRITER, str(p), str(n_batches), str(batch), str(stop))
    w_out, w_err = w.communicate(timeout=180)
    r_out, r_err = reader.communicate(timeout=180)
    assert w.returncode == 0, w_err
    assert w_out.strip() == "done"
    assert reader.returncode == 0, r_err
    result = json.loads(r_out)
    assert result["failures"] == []
    seen = result["seen"]
    assert len(seen) >= 3
    assert all(c % batch == 0 for c in seen), seen                 # never half a batch
    assert all(a <= b for a, b in zip(seen, seen[1:])), seen       # monotone
    assert seen[-1] == n_batches * batch                           # last read after the last commit
    assert len(set(seen)) >= 3, seen                               # it really read during the job
    with connect(p) as con:
        assert con.execute("SELECT count(*) FROM errors").fetchone()[0] == n_batches * batch


WAIT_WRITER = """
    import sys, time
    from warehouse import writer
    t0 = time.monotonic()
    with writer(sys.argv[1], timeout_s=20) as con:
        con.execute("INSERT INTO properties VALUES ('from-writer', NULL)")
    print(round(time.monotonic() - t0, 3))
"""


def test_warm_read_instance_is_reused_then_released_when_idle(tmp_path, monkeypatch):
    from warehouse import db
    p = tmp_path / "w.duckdb"
    with writer(p):
        pass
    monkeypatch.setenv("ATLAS_READER_KEEP_S", "0.3")
    with connect(p) as con:
        con.execute("SELECT 1").fetchall()
    keeper = db._keepers.get(p.resolve())
    assert keeper is not None
    with connect(p) as con:
        assert con.execute("SELECT count(*) FROM properties").fetchall() == [(0,)]
    assert db._keepers.get(p.resolve()) is keeper            # same warm instance
    deadline = time.monotonic() + 5
    while p.resolve() in db._keepers and time.monotonic() < deadline:
        time.sleep(0.05)
    assert p.resolve() not in db._keepers                     # closed after 0.3 s idle


def test_a_warm_reader_gives_way_to_a_writer_process_at_once(tmp_path, monkeypatch):
    from warehouse import db
    p = tmp_path / "w.duckdb"
    with writer(p):
        pass
    monkeypatch.setenv("ATLAS_READER_KEEP_S", "60")          # idle expiry cannot explain it
    with connect(p) as con:
        con.execute("SELECT 1").fetchall()
    assert p.resolve() in db._keepers
    w = _python(WAIT_WRITER, str(p))
    out, err = w.communicate(timeout=60)
    assert w.returncode == 0, err
    assert float(out) < 3.0                                   # the write-pending marker released it
    assert p.resolve() not in db._keepers
    with connect(p) as con:                                   # and readers see the commit
        assert con.execute("SELECT property FROM properties").fetchall() == [("from-writer",)]


def test_a_writer_in_the_reading_process_releases_the_warm_instance(tmp_path, monkeypatch):
    p = tmp_path / "w.duckdb"
    with writer(p):
        pass
    monkeypatch.setenv("ATLAS_READER_KEEP_S", "60")
    with connect(p) as con:
        con.execute("SELECT 1").fetchall()
    t0 = time.monotonic()
    with writer(p, timeout_s=5) as con:
        con.execute("INSERT INTO properties VALUES ('x', NULL)")
    assert time.monotonic() - t0 < 2
    with connect(p) as con:
        assert con.execute("SELECT count(*) FROM properties").fetchall() == [(1,)]


def test_a_reader_left_open_in_the_same_process_gives_a_clear_error(tmp_path, monkeypatch):
    p = tmp_path / "w.duckdb"
    with writer(p):
        pass
    monkeypatch.setenv("ATLAS_READER_KEEP_S", "0")
    con = connect(p)
    try:
        with pytest.raises(WarehouseBusyError, match="this process"):
            with writer(p, timeout_s=0.3):
                pass
    finally:
        con.close()


# --------------------------------------------------------------------------- runs

def test_runs_start_finish_and_errors(tmp_path):
    p = tmp_path / "w.duckdb"
    run_id = start_run(p, "embed", {"model": "toy-shapes", "batch": 32})
    assert run_id.startswith("embed-")
    with writer(p) as con:
        record_error(con, run_id, "img/1.png", "truncated PNG")
    with connect(p) as con:
        status, params, finished = con.execute(
            "SELECT status, params, finished_at FROM runs WHERE run_id = ?", [run_id]).fetchone()
        assert status == "running" and finished is None
        assert json.loads(params) == {"model": "toy-shapes", "batch": 32}
        assert con.execute("SELECT item, reason FROM errors WHERE run_id = ?", [run_id]).fetchall() == [
            ("img/1.png", "truncated PNG")]
    finish_run(p, run_id)
    with connect(p) as con:
        status, finished, error = con.execute(
            "SELECT status, finished_at, error FROM runs WHERE run_id = ?", [run_id]).fetchone()
    assert status == "ok" and finished is not None and error is None
    with pytest.raises(ValueError, match="'ok', 'skipped' or 'failed'"):
        finish_run(p, run_id, "done")
    with pytest.raises(KeyError, match="start_run"):
        finish_run(p, "no-such-run")


def test_run_record_marks_failures_with_the_exception_text(tmp_path):
    p = tmp_path / "w.duckdb"
    with run_record(p, "texts", {"bank": "atlas"}) as ok_id:
        pass
    with pytest.raises(RuntimeError, match="model exploded"):
        with run_record(p, "embed", {}) as bad_id:
            raise RuntimeError("model exploded")
    with connect(p) as con:
        rows = dict(con.execute("SELECT run_id, status || '|' || coalesce(error, '') FROM runs").fetchall())
    assert rows[ok_id] == "ok|"
    assert rows[bad_id] == "failed|RuntimeError: model exploded"
    # non-JSON values (paths) are stored as their text
    path_run = start_run(p, "embed", {"images": tmp_path / "imgs"})
    with connect(p) as con:
        params = con.execute("SELECT params FROM runs WHERE run_id = ?", [path_run]).fetchone()[0]
    assert json.loads(params) == {"images": str(tmp_path / "imgs")}


# --------------------------------------------------------------------------- score views

PROPS = ["colors", "animals", "shapes", "locations", "textures"]


def _reference_scores(head_texts, text_prop, labels, judgments, n_props):
    """Literal python implementation of MATH.md §5 (see 002_scores.sql for the bucket rules)."""
    out = {}
    for head, tids in head_texts.items():
        k = len(tids)
        buckets = [text_prop.get(t) or "unknown" for t in tids]
        counts = Counter(buckets)
        q = np.array(list(counts.values()), float) / k
        entropy = float(-(q * np.log(q)).sum())
        possible = n_props + sum(1 for b in counts if b not in PROPS[:n_props])
        denom = min(k, possible)
        ent = 0.0 if denom <= 1 else entropy / math.log(denom)
        label = labels.get(head)
        if label is None:
            assoc = None
        else:
            m = [judgments[(head, t)] if (head, t) in judgments else (text_prop.get(t) == label)
                 for t in tids]
            assoc = float(np.mean(m))
        out[head] = (label, assoc, ent)
    return out


def _build(p, head_texts, text_prop, labels, judgments, n_props=len(PROPS), model="m"):
    with writer(p) as con:
        con.executemany("INSERT INTO properties VALUES (?, NULL)", [[x] for x in PROPS[:n_props]])
        con.executemany("INSERT INTO texts VALUES (?, 'atlas', ?, ?) ON CONFLICT DO NOTHING",
                        [[t, f"text {t}", pr] for t, pr in text_prop.items()])
        rows = []
        for (layer, head), tids in head_texts.items():
            for r, t in enumerate(tids):
                rows.append([model, layer, head, r, t, 0.1 / (r + 1)])
        con.executemany("INSERT INTO head_texts (model_id, layer, head, rank, text_id, variance_explained) "
                        "VALUES (?, ?, ?, ?, ?, ?)", rows)
        con.executemany("INSERT INTO head_labels (model_id, layer, head, property, confidence, labeler) "
                        "VALUES (?, ?, ?, ?, 0.5, 'offline')",
                        [[model, l, h, pr] for (l, h), pr in labels.items()])
        if judgments:
            con.executemany("INSERT INTO text_judgments VALUES (?, ?, ?, ?, ?, ?, 'llm:test', NULL)",
                            [[model, l, h, t, labels[(l, h)], a] for ((l, h), t), a in judgments.items()])


def _view(p, sql):
    with connect(p) as con:
        return con.execute(sql).fetchall()


def test_head_scores_match_a_python_reference_on_random_heads(tmp_path):
    rng = np.random.default_rng(0)
    text_prop = {f"t{i}": (None if i % 11 == 0 else PROPS[int(rng.integers(len(PROPS)))]) for i in range(60)}
    text_prop["x_off"] = "weather"     # a tag outside the `properties` vocabulary
    tids = list(text_prop)
    head_texts, labels, judgments = {}, {}, {}
    for layer in (2, 3):
        for head in range(6):
            k = int(rng.integers(1, 12))
            chosen = [tids[j] for j in rng.choice(len(tids), size=k, replace=False)]
            head_texts[(layer, head)] = chosen
            if head % 3:
                labels[(layer, head)] = PROPS[int(rng.integers(len(PROPS)))] if head != 5 else "mixed"
                for t in chosen[:2]:
                    judgments[((layer, head), t)] = bool(rng.integers(2))
    p = tmp_path / "w.duckdb"
    _build(p, head_texts, text_prop, labels, judgments)
    ref = _reference_scores(head_texts, text_prop, labels, judgments, len(PROPS))
    rows = _view(p, "SELECT layer, head, property, association, tag_entropy, n_texts FROM head_scores")
    assert len(rows) == len(head_texts)
    for layer, head, prop, assoc, ent, n in rows:
        label, r_assoc, r_ent = ref[(layer, head)]
        assert prop == label
        assert n == len(head_texts[(layer, head)])
        assert (assoc is None) == (r_assoc is None)
        if assoc is not None:
            assert assoc == pytest.approx(r_assoc, abs=1e-12)
        assert ent == pytest.approx(r_ent, abs=1e-9)
        assert 0.0 <= ent <= 1.0 + 1e-12

    # model and layer scores are means over labelled heads
    labelled = [v for v in ref.values() if v[0] is not None]
    (assoc, ent, n_heads, n_analysed, n_mixed), = _view(
        p, "SELECT association, tag_entropy, n_heads, n_analysed_heads, n_mixed_heads FROM model_scores")
    assert n_heads == len(labelled) and n_analysed == len(ref)
    assert n_mixed == sum(1 for v in labelled if v[0] == "mixed")
    assert assoc == pytest.approx(np.mean([v[1] for v in labelled]))
    assert ent == pytest.approx(np.mean([v[2] for v in labelled]))
    for layer, l_assoc, l_n in _view(p, "SELECT layer, association, n_heads FROM layer_scores"):
        mine = [ref[(layer, h)] for h in range(6) if ref[(layer, h)][0] is not None]
        assert l_n == len(mine)
        assert l_assoc == pytest.approx(np.mean([v[1] for v in mine]))

    # property_heads counts the heads per label
    counts = Counter(v[0] for v in labelled)
    got = {pr: n for pr, n in _view(p, "SELECT property, n_heads FROM property_heads")}
    assert got == dict(counts)


def test_the_score_views_give_the_same_bits_on_every_read(tmp_path):
    """Migration 010: float sums and means in a fixed order. Before it, two reads of one warehouse
    could differ in the last bit of tag_entropy (DuckDB's threads add in the order they meet rows)."""
    rng = np.random.default_rng(1)
    text_prop = {f"t{i}": PROPS[int(rng.integers(len(PROPS)))] for i in range(200)}
    tids = list(text_prop)
    head_texts, labels = {}, {}
    for layer in range(12):
        for head in range(12):
            head_texts[(layer, head)] = [tids[j] for j in rng.choice(len(tids), size=10, replace=False)]
            labels[(layer, head)] = PROPS[int(rng.integers(len(PROPS)))]
    p = tmp_path / "w.duckdb"
    _build(p, head_texts, text_prop, labels, {})
    views = ("head_scores", "layer_scores", "model_scores")
    assert distinct_reads(p, views, reads=25) == dict.fromkeys(views, 1)


def test_tag_entropy_edge_cases(tmp_path):
    text_prop = {"c1": "colors", "c2": "colors", "c3": "colors",
                 "a1": "animals", "s1": "shapes", "l1": "locations", "x1": "textures", "u1": None}
    head_texts = {
        (0, 0): ["c1"],                                 # k = 1 -> 0
        (0, 1): ["c1", "c2", "c3"],                     # one property -> 0
        (0, 2): ["c1", "a1", "s1", "l1", "x1"],         # uniform over k = 5 = #properties -> 1
        (0, 3): ["c1", "a1"],                           # uniform, k = 2 < #properties -> 1
        (0, 4): ["u1", "c1"],                           # unknown is its own bucket -> 1
        (0, 5): ["c1", "c2", "a1"],                     # skewed: H(2/3, 1/3) / ln 3
    }
    labels = {(0, 1): "colors", (0, 2): "colors", (0, 4): "colors"}
    judgments = {((0, 2), "a1"): True, ((0, 1), "c2"): False}
    p = tmp_path / "w.duckdb"
    _build(p, head_texts, text_prop, labels, judgments)
    got = {h: (a, e) for h, a, e in _view(p, "SELECT head, association, tag_entropy FROM head_scores")}
    assert got[0] == (None, 0.0)
    assert got[1][1] == 0.0
    assert got[1][0] == pytest.approx(2 / 3)            # the judge overrides a matching tag
    assert got[2][1] == pytest.approx(1.0)
    assert got[2][0] == pytest.approx(2 / 5)            # tag match + judged match
    assert got[3][1] == pytest.approx(1.0)
    assert got[4] == (pytest.approx(0.5), pytest.approx(1.0))   # an untagged text never matches
    h = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert got[5][1] == pytest.approx(h / math.log(3))


def test_tag_entropy_with_a_single_property_vocabulary_is_zero(tmp_path):
    p = tmp_path / "w.duckdb"
    _build(p, {(0, 0): ["c1", "c2"]}, {"c1": "colors", "c2": "colors"}, {(0, 0): "colors"}, {}, n_props=1)
    assert _view(p, "SELECT association, tag_entropy FROM head_scores") == [(1.0, 0.0)]


def test_head_text_matches_and_property_concentration(tmp_path):
    text_prop = {"c1": "colors", "c2": "colors", "a1": "animals", "a2": "animals"}
    head_texts = {(1, 0): ["c1", "a1"], (1, 1): ["c2", "a2"]}   # variance 0.1, 0.05 by rank
    labels = {(1, 0): "colors", (1, 1): "animals"}
    p = tmp_path / "w.duckdb"
    _build(p, head_texts, text_prop, labels, {((1, 1), "c2"): True})
    rows = _view(p, 'SELECT head, rank, label, text_property, "match" FROM head_text_matches ORDER BY head, rank')
    assert rows == [(0, 0, "colors", "colors", True), (0, 1, "colors", "animals", False),
                    (1, 0, "animals", "colors", True), (1, 1, "animals", "animals", True)]
    ph = {r[0]: r[1:] for r in _view(
        p, "SELECT property, n_heads, heads, variance_concentration, share_of_heads FROM property_heads")}
    # colours: 0.1 in head L1.H0 (labelled colors) of 0.1 + 0.1 in all heads -> 0.5
    assert ph["colors"] == (1, ["L1.H0"], pytest.approx(0.5), pytest.approx(0.5))
    # animals: 0.05 in L1.H1 of 0.05 + 0.05 -> 0.5
    assert ph["animals"][2] == pytest.approx(0.5)


def test_optimize_clusters_one_models_head_embeddings_without_losing_rows(tmp_path):
    p = tmp_path / "w.duckdb"
    with writer(p) as con:
        for m in ("a", "b"):
            con.execute("""INSERT INTO head_embeddings
                           SELECT ?, 'img' || lpad(i::VARCHAR, 3, '0'), (i % 3)::INT, (i % 5)::INT, [i::FLOAT, 1.0]
                           FROM range(200) t(i)""", [m])
        before = con.execute("SELECT model_id, sum(list_sum(vec)), count(*) FROM head_embeddings "
                             "GROUP BY ALL ORDER BY 1").fetchall()
        b_before = con.execute("SELECT layer, head FROM head_embeddings WHERE model_id = 'b'").fetchall()
        assert warehouse.optimize(con, "a") == 200
    with connect(p) as con:
        assert con.execute("SELECT model_id, sum(list_sum(vec)), count(*) FROM head_embeddings "
                           "GROUP BY ALL ORDER BY 1").fetchall() == before
        a_keys = con.execute("SELECT layer, head, image_id FROM head_embeddings WHERE model_id = 'a'").fetchall()
        b_keys = con.execute("SELECT layer, head FROM head_embeddings WHERE model_id = 'b'").fetchall()
        storage = {r[0] for r in con.execute(
            "SELECT compression FROM pragma_storage_info('head_embeddings') WHERE segment_type = 'FLOAT'").fetchall()}
    assert a_keys == sorted(a_keys)
    assert b_keys == b_before and b_keys != sorted(b_keys)      # the other model is left alone
    assert storage == {"Uncompressed"}                         # vectors stay uncompressed
    with writer(p) as con:
        assert warehouse.is_clustered(con, "a") and not warehouse.is_clustered(con, "b")
        assert warehouse.optimize(con) == 200                  # only b: a is in order already
    with connect(p) as con:
        keys = con.execute("SELECT model_id, layer, head FROM head_embeddings").fetchall()
    assert keys == sorted(keys)
    size = p.stat().st_size
    for _ in range(3):                                         # a rerun that adds nothing rewrites nothing
        with writer(p) as con:
            assert warehouse.optimize(con) == 0
    assert p.stat().st_size == size


def test_neighbour_benchmark_runs_and_clusters(tmp_path):
    from warehouse.bench import bench_neighbours
    details: dict = {}
    ms = bench_neighbours(n_images=12_400, n_heads=3, d=16, runs=2, workdir=tmp_path, details=details)
    assert ms == details["clustered"]["query_ms"] and ms > 0
    assert details["rows"] == 12_400 * 3
    assert set(details["appended"]) == set(details["clustered"]) == {
        "query_ms", "query_min_ms", "query_cpu_ms", "connect_query_ms", "fresh_instance_ms"}
    assert list(tmp_path.iterdir()) == []                 # the temporary warehouse is removed


def test_migration_005_upgrades_a_warehouse_in_place(tmp_path):
    """005 (shard_sets) on a warehouse built by 001-003: rows kept, head_embeddings still the table,
    the new table empty, and writes through the shard registry work."""
    from warehouse import writes
    old = tmp_path / "old"
    old.mkdir()
    for f in available_migrations():
        if f[0] < 5:
            (old / f[2].name).write_text(f[2].read_text())
    p = tmp_path / "w.duckdb"
    con = duckdb.connect(str(p))
    try:
        migrate(con, old)
        writes.insert_head_embeddings(con, "m/x", ["i/0"], [0], np.ones((1, 1, 2, 3), np.float32))
        writes.upsert_dataset(con, "d", "d", "shapes", 1)
    finally:
        con.close()
    with writer(p) as con:                                   # the writer applies 005
        assert schema_version(con) >= 5
        assert con.execute("SELECT count(*) FROM head_embeddings").fetchall() == [(2,)]
        assert con.execute("SELECT count(*) FROM datasets").fetchall() == [(1,)]
        assert con.execute("SELECT count(*) FROM shard_sets").fetchall() == [(0,)]
        assert writes.head_embeddings_target(con) == "head_embeddings"
        writes.upsert_shard_set(con, "/s", "m/x", "d", "copy", "0" * 64, 1, 1, 2, [], None)
        assert writes.refresh_head_embeddings_view(con) == 0
    with connect(p) as con:
        assert con.execute("SELECT shard_dir, mode, files FROM shard_sets").fetchall() == [("/s", "copy", [])]
        assert con.execute("SELECT count(*) FROM duckdb_views() WHERE view_name = 'head_embeddings'").fetchall() == [(0,)]


# --------------------------------------------------------------------------- keys (migration 004)

def _warehouse_at(p: Path, version: int, tmp_path: Path) -> duckdb.DuckDBPyConnection:
    """A warehouse built by the shipped migrations up to ``version`` only (an older release's file)."""
    d = tmp_path / f"migrations_upto_{version}"
    d.mkdir()
    for v, _, f in available_migrations():
        if v <= version:
            (d / f.name).write_text(f.read_text())
    con = duckdb.connect(str(p))
    assert migrate(con, d) == list(range(1, version + 1))
    return con


def _keyed_tables(con) -> dict[str, str]:
    """{table: how its rows are keyed} for every table with a primary key or a unique index."""
    keyed = {r[0]: r[1] for r in con.execute(
        "SELECT table_name, constraint_text FROM duckdb_constraints() "
        "WHERE constraint_type IN ('PRIMARY KEY', 'UNIQUE')").fetchall()}
    keyed.update({r[0]: r[1] for r in con.execute(
        "SELECT table_name, sql FROM duckdb_indexes() WHERE is_unique").fetchall()})
    return keyed


def test_every_table_with_a_natural_key_refuses_duplicates(tmp_path):
    p = tmp_path / "w.duckdb"
    with writer(p):
        pass
    with connect(p) as con:
        tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        keyed = _keyed_tables(con)
    assert tables - set(keyed) == {"errors"}          # a log: one row per failed item and attempt
    assert keyed["head_embeddings"] == "PRIMARY KEY(model_id, image_id, layer, head)"
    assert "coalesce(layer, -1)" in keyed["ablations"].lower()
    with writer(p) as con:
        con.execute("INSERT INTO head_embeddings VALUES ('m', 'i', 0, 1, [1.0])")
        con.execute("INSERT INTO ablations VALUES ('m', 'd', 'shape', 'baseline', NULL, NULL, 0.5, NULL)")
        con.execute("INSERT INTO ablations VALUES ('m', 'd', 'shape', 'head', 0, 1, 0.5, NULL)")
    for sql in ("INSERT INTO head_embeddings VALUES ('m', 'i', 0, 1, [2.0])",
                "INSERT INTO ablations VALUES ('m', 'd', 'shape', 'baseline', NULL, NULL, 0.7, NULL)",
                "INSERT INTO ablations VALUES ('m', 'd', 'shape', 'head', 0, 1, 0.7, NULL)"):
        with pytest.raises(duckdb.ConstraintException):
            with writer(p) as con:
                con.execute(sql)
    with connect(p) as con:
        assert con.execute("SELECT count(*) FROM head_embeddings").fetchone()[0] == 1
        assert con.execute("SELECT count(*) FROM ablations").fetchone()[0] == 2


def test_migration_004_upgrades_a_003_warehouse_and_removes_duplicates(tmp_path):
    p = tmp_path / "old.duckdb"
    con = _warehouse_at(p, 3, tmp_path)
    # head_embeddings as a manifest listing image 'a' twice and a second embed process left it:
    # every (image, layer, head) of a and b stored twice, c once; the first copy of a is [1, x]
    rows = []
    for copy in (1.0, 2.0):
        for image in ("a", "b"):
            rows += [("m", image, layer, head, [copy, 10.0 * layer + head]) for layer in (0, 1) for head in (0, 1, 2)]
    rows += [("m", "c", layer, head, [3.0, 10.0 * layer + head]) for layer in (0, 1) for head in (0, 1, 2)]
    rows += [("other", "a", 0, 0, [9.0, 9.0])]
    con.executemany("INSERT INTO head_embeddings VALUES (?, ?, ?, ?, ?)", rows)
    con.executemany("INSERT INTO ablations VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [
        ("m", "d", "shape", "baseline", None, None, 0.5, "r1"),
        ("m", "d", "shape", "mlps", None, None, 0.4, "r1"),
        ("m", "d", "shape", "attn_upto", 0, None, 0.3, "r1"),
        ("m", "d", "shape", "head", 0, 1, 0.2, "r1"),
        ("m", "d", "shape", "head", 0, 2, 0.25, "r1"),
        ("m", "d", "shape", "baseline", None, None, 0.55, "r2"),     # the same keys again, newer
        ("m", "d", "shape", "head", 0, 1, 0.22, "r2"),
        ("m", "d", "color", "baseline", None, None, 0.9, "r1"),
    ])
    con.execute("INSERT INTO image_embeddings VALUES ('m', 'a', [1.0]), ('m', 'b', [1.0]), ('m', 'c', [1.0])")
    con.execute("INSERT INTO runs (run_id, job, status) VALUES ('embed-old', 'embed', 'running')")
    con.close()
    assert len(rows) == 2 * 2 * 6 + 6 + 1

    with writer(p) as con:                      # a writer applies the pending migration 004
        assert schema_version(con) == available_migrations()[-1][0] >= 4
    with connect(p) as con:
        he = con.execute("SELECT model_id, image_id, layer, head, vec FROM head_embeddings").fetchall()
        ab = con.execute("SELECT factor, kind, layer, head, accuracy, run_id FROM ablations "
                         "ORDER BY factor, kind, layer, head").fetchall()
        run = con.execute("SELECT status, pid, host FROM runs WHERE run_id = 'embed-old'").fetchone()
        n_images = con.execute("SELECT count(*) FROM image_embeddings").fetchone()[0]
        for (view,) in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall():
            con.execute(f"SELECT * FROM {view}").fetchall()       # every view still binds
        keyed = _keyed_tables(con)
        storage = {r[0] for r in con.execute(
            "SELECT compression FROM pragma_storage_info('head_embeddings') WHERE segment_type = 'FLOAT'").fetchall()}
    # exactly one row per key; every key of every model kept; the first copy of each kept
    assert len(he) == 3 * 6 + 1
    assert len({r[:4] for r in he}) == len(he)
    assert {r[:4] for r in he} == {r[:4] for r in rows}
    assert {tuple(r[4]) for r in he if r[0] == "m" and r[1] in ("a", "b")} == {
        (1.0, 10.0 * layer + head) for layer in (0, 1) for head in (0, 1, 2)}
    assert [r[4][0] for r in he if r[1] == "c"] == [3.0] * 6
    assert storage == {"Uncompressed"}
    # ablations: one row per key, NULL layer/head included; the newest of each duplicate kept
    assert ab == [("color", "baseline", None, None, 0.9, "r1"),
                  ("shape", "attn_upto", 0, None, 0.3, "r1"),
                  ("shape", "baseline", None, None, 0.55, "r2"),
                  ("shape", "head", 0, 1, 0.22, "r2"),
                  ("shape", "head", 0, 2, 0.25, "r1"),
                  ("shape", "mlps", None, None, 0.4, "r1")]
    assert n_images == 3
    assert run == ("running", None, None)       # no process recorded: left as it was
    assert {"head_embeddings", "ablations"} <= set(keyed)


def test_embedding_writes_are_idempotent_on_their_keys(tmp_path):
    from warehouse import writes
    p = tmp_path / "w.duckdb"
    rng = np.random.default_rng(0)
    heads = rng.standard_normal((3, 2, 4, 8)).astype(np.float32)        # [n, L', H, d]
    emb = rng.standard_normal((3, 8)).astype(np.float32)
    ids = ["x/0", "x/1", "x/0"]                                          # x/0 twice in one batch
    with writer(p) as con:
        assert writes.insert_head_embeddings(con, "m", ids, [4, 5], heads) == 2 * 2 * 4
        assert writes.insert_image_embeddings(con, "m", ids, emb) == 2
        assert writes.insert_images(con, "x", ids, [None] * 3, ["s"] * 3, [None] * 3, [None] * 3,
                                    [(1, 1)] * 3, [b""] * 3) == 2
        assert writes.insert_image_factors(con, [("x/0", "shape", "a"), ("x/0", "shape", "b")]) == 1
    with writer(p) as con:                 # a second writer with the same images stores nothing new
        assert writes.insert_head_embeddings(con, "m", ["x/1", "x/2"], [4, 5], heads[:2]) == 2 * 4
        assert writes.insert_image_embeddings(con, "m", ["x/1", "x/2"], emb[:2]) == 1
        assert writes.insert_text_embeddings(con, "m", ["t", "t"], emb[:2]) == 1
    with connect(p) as con:
        assert con.execute("SELECT count(*) FROM head_embeddings").fetchone()[0] == 3 * 2 * 4
        assert con.execute("SELECT count(*) FROM image_embeddings").fetchone()[0] == 3
        # the stored vector of a repeated key is the first one written
        got = np.array(con.execute("SELECT vec FROM head_embeddings WHERE image_id = 'x/1' AND layer = 5 "
                                   "AND head = 3").fetchone()[0], np.float32)
        assert np.array_equal(got, heads[1, 1, 3])
        got = np.array(con.execute("SELECT vec FROM head_embeddings WHERE image_id = 'x/0' AND layer = 4 "
                                   "AND head = 0").fetchone()[0], np.float32)
        assert np.array_equal(got, heads[0, 0, 0])
    # the replace_* writers keep one row per key too (the last one given)
    with writer(p) as con:
        writes.replace_ablations(con, "m", "d", [
            dict(factor="shape", kind="baseline", layer=None, head=None, accuracy=0.1),
            dict(factor="shape", kind="baseline", layer=None, head=None, accuracy=0.2)], "r")
    with connect(p) as con:
        assert con.execute("SELECT accuracy FROM ablations").fetchall() == [(0.2,)]


# --------------------------------------------------------------------------- interrupted runs

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_run_whose_process_is_gone_shows_and_becomes_interrupted(tmp_path):
    from warehouse import queries
    from warehouse.runs import STATUSES, mark_interrupted, this_host
    p = tmp_path / "w.duckdb"
    run_id = start_run(p, "embed", {})
    dead = _dead_pid()
    with writer(p) as con:
        pid, host = con.execute("SELECT pid, host FROM runs WHERE run_id = ?", [run_id]).fetchone()
        assert (pid, host) == (os.getpid(), this_host())
        con.executemany("INSERT INTO runs (run_id, job, status, pid, host) VALUES (?, 'embed', 'running', ?, ?)",
                        [["killed", dead, this_host()], ["elsewhere", dead, "another-host"],
                         ["finished", dead, this_host()]])
        con.execute("UPDATE runs SET status = 'ok' WHERE run_id = 'finished'")
    assert "interrupted" in STATUSES
    # a reader sees it at once, without writing
    shown = dict(queries.runs(p)[["run_id", "status"]].itertuples(index=False))
    assert shown == {run_id: "running", "killed": "interrupted", "elsewhere": "running", "finished": "ok"}
    with connect(p) as con:
        assert con.execute("SELECT status FROM runs WHERE run_id = 'killed'").fetchone()[0] == "running"
    # the next writing job stores it
    later = start_run(p, "texts", {})
    with connect(p) as con:
        stored = dict(con.execute("SELECT run_id, status FROM runs").fetchall())
        error = con.execute("SELECT error FROM runs WHERE run_id = 'killed'").fetchone()[0]
    assert stored == {run_id: "running", "killed": "interrupted", "elsewhere": "running", "finished": "ok",
                      later: "running"}
    assert str(dead) in error
    assert mark_interrupted(p) == []


def test_a_killed_job_process_is_interrupted_on_the_next_start(tmp_path):
    p = tmp_path / "w.duckdb"
    proc = _python("""
        import sys, time
        from warehouse.runs import start_run
        print(start_run(sys.argv[1], "embed", {}), flush=True)
        time.sleep(60)
    """, str(p))
    run_id = proc.stdout.readline().strip()
    proc.kill()
    proc.wait()
    with connect(p) as con:
        assert con.execute("SELECT status FROM runs WHERE run_id = ?", [run_id]).fetchone()[0] == "running"
    start_run(p, "texts", {})
    with connect(p) as con:
        assert con.execute("SELECT status FROM runs WHERE run_id = ?", [run_id]).fetchone()[0] == "interrupted"


# --------------------------------------------------------------------------- unusable locations

def test_unusable_warehouse_locations_are_one_line_errors(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    text = tmp_path / "notes.txt"
    text.write_text("not a database\n")
    cases = [(folder, True, "is a folder"), (folder, False, "is a folder"),
             (text, True, "is not a DuckDB warehouse"), (text, False, "is not a DuckDB warehouse"),
             (text / "w.duckdb", False, "cannot create the folder")]
    for path, read_only, phrase in cases:
        with pytest.raises(WarehouseError) as err:
            if read_only:
                connect(path).close()
            else:
                with writer(path):
                    pass
        assert phrase in str(err.value) and "\n" not in str(err.value), (path, read_only, err.value)
    assert text.read_text() == "not a database\n"


def test_check_location_refuses_what_can_hold_no_warehouse_and_creates_nothing(tmp_path):
    from warehouse import check_location
    folder = tmp_path / "folder"
    folder.mkdir()
    text = tmp_path / "notes.txt"
    text.write_text("not a database\n")
    good = tmp_path / "good.duckdb"
    with writer(good):
        pass
    for path, phrase in [(folder, "is a folder"), (text, "is not a DuckDB warehouse"),
                         (text / "sub" / "w.duckdb", "which is a file, not a folder")]:
        with pytest.raises(WarehouseError, match=phrase):
            check_location(path)
    assert check_location(good) == good
    assert check_location(tmp_path / "new" / "w.duckdb") == tmp_path / "new" / "w.duckdb"
    assert not (tmp_path / "new").exists()


def test_reading_the_default_warehouse_creates_nothing(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("ATLAS_HOME", str(home))
    with pytest.raises(WarehouseMissingError):
        connect()
    assert not home.exists()
    assert default_warehouse_path(create=False) == home / "warehouse.duckdb" and not home.exists()


def _before(tmp_path, version: int):
    """A connection to a new warehouse built by every migration before ``version`` (the migrations
    copied to a folder of their own), and the versions it applied."""
    old = tmp_path / "old"
    old.mkdir()
    for v, _, f in available_migrations():
        if v < version:
            (old / f.name).write_text(f.read_text())
    con = duckdb.connect(str(tmp_path / "u.duckdb"))
    return con, migrate(con, old)


def test_006_originals_upgrades_a_warehouse_in_place_and_keeps_its_images(tmp_path):
    """Migration 006 adds images.original (NULL for existing rows); insert_images fills it."""
    from warehouse import writes
    from warehouse.db import MIGRATIONS_DIR
    con, _ = _before(tmp_path, 6)
    writes.insert_images(con, "d", ["d/1"], ["/nowhere.png"], ["ab"], [None], [None], [(4, 4)], [b"jpg"])
    assert "original" not in [r[0] for r in con.execute("DESCRIBE images").fetchall()]
    assert 6 in migrate(con, MIGRATIONS_DIR)
    assert con.execute("SELECT image_id, path, thumbnail, original FROM images").fetchall() == \
        [("d/1", "/nowhere.png", b"jpg", None)]
    writes.insert_images(con, "d", ["d/2"], [None], ["cd"], [None], [None], [(4, 4)], [b"jpg"], [b"png"])
    assert con.execute("SELECT original FROM images WHERE image_id = 'd/2'").fetchall() == [(b"png",)]
    con.close()


def test_008_neurons_upgrades_a_warehouse_in_place_and_keeps_its_rows(tmp_path):
    """Migration 008 adds the neuron tables and views to a warehouse built by every earlier
    migration; its rows stay; the views read written neuron rows."""
    import pyarrow as pa
    from warehouse import writes
    from warehouse.db import MIGRATIONS_DIR
    con, applied = _before(tmp_path, 8)
    assert applied == [v for v, _, f in available_migrations() if v < 8]
    writes.insert_images(con, "d", ["d/1", "d/2"], [None, None], ["ab", "cd"], [None, None], [None, None],
                         [(4, 4), (4, 4)], [b"jpg", b"jpg"])
    writes.upsert_factor_properties(con, {"color": "colors", "shape": "shapes"})
    assert 8 in migrate(con, MIGRATIONS_DIR)
    assert con.execute("SELECT count(*) FROM images").fetchone()[0] == 2
    con.execute("BEGIN")
    f = {"neuron": pa.array([0, 1], pa.int32())}
    writes.replace_neuron_layer(
        con, "m", 3,
        layer_row={"dataset_id": "d", "n_images": 2, "n_neurons": 2, "later_heads": 1, "reach": 0.5, "bank": "b",
                   "texts_k": 1, "pc_images": 2, "matters_share": 0.9, "alpha_stored": True, "run_id": "r"},
        stats=pa.table({**f, **{c: [0.1, 0.2] for c in ("mean_norm", "q50", "q90", "q99", "max_norm", "share_matters",
                                                        "hist_max", "pc_share", "recon_r2")},
                        "hist_counts": pa.array([[1, 1], [2, 0]], pa.list_(pa.int32())),
                        "pc": writes.vector_column(np.eye(2, dtype=np.float32)), "run_id": ["r", "r"]}),
        top_images=pa.table({**f, "rank": pa.array([0, 0], pa.int32()), "image_id": ["d/1", "d/2"],
                             "norm": [1.0, 2.0], "projection": [1.0, 2.0]}),
        texts=pa.table({**f, "rank": pa.array([0, 0], pa.int32()), "text_id": ["t", "t"], "coef": [1.0, -1.0],
                        "gain": [0.5, 0.6]}),
        labels=pa.table({"neuron": pa.array([0, 1, 0, 1], pa.int32()), "labeling": ["labeler"] * 2 + ["tag-shuffled"] * 2,
                         "draw": pa.array([0, 0, 0, 0], pa.int32()), "property": ["colors", "mixed", "shapes", "colors"],
                         "confidence": [1.0, 0.0, 1.0, 1.0], "labeler": ["offline"] * 4, "prompt_hash": ["h"] * 4,
                         "p_value": pa.array([None] * 4, pa.float64()), "raw": pa.array([None] * 4, pa.string()),
                         "run_id": ["r"] * 4}),
        head_effects=pa.table({**f, "head_layer": pa.array([4, 4], pa.int32()), "head": pa.array([0, 0], pa.int32()),
                               "effect": [0.1, 0.2]}),
        factor_variance=pa.table({"dataset_id": ["d"] * 4, "neuron": pa.array([0, 0, 1, 1], pa.int32()),
                                  "factor": ["color", "shape"] * 2, "eta2": [0.9, 0.1, 0.3, 0.25], "run_id": ["r"] * 4}),
        ablations=pa.table({"eval": ["toy"], "variant": ["baseline"], "factor": ["color"], "accuracy": [0.5],
                            "run_id": ["r"]}))
    writes.insert_neuron_alpha(con, "m", 3, ["d/1", "d/1"], np.ones((2, 2, 1), np.float32))
    con.execute("COMMIT")
    assert con.execute("SELECT count(*), any_value(len(alpha)) FROM neuron_alpha").fetchone() == (1, 2)
    # neuron 0 is specialised in colour and labelled colors; neuron 1 is not specialised and 'mixed'
    assert con.execute("SELECT neuron, specialised, true_factor FROM neuron_truth ORDER BY neuron").fetchall() == \
        [(0, True, "color"), (1, False, None)]
    got = con.execute("SELECT labeling, n_neurons, n_specialised, n_right, kappa FROM neuron_label_agreement "
                      "ORDER BY labeling").fetchall()
    # labeler: categories (color, none) vs truth (color, none): kappa 1; shuffled: (shape, color) vs
    # (color, color: neuron 1's label's factor explains 0.3 >= 0.2): p_o = 1/2, p_e = 1/2 * 0 + 1/2 * 1 -> kappa 0
    assert got == [("labeler", 2, 1, 1, 1.0), ("tag-shuffled", 2, 1, 0, 0.0)]
    con.close()


def test_009_text_votes_reads_v7s_decision_from_offline_labels_only(tmp_path):
    """Migration 009 adds the 'text-votes' labelling (offline-v8 labels keep v7's decision in raw) to
    head_labelings on a warehouse built by every earlier migration; labels without it (v7's own raw,
    an LLM's free text) give no row, and the stored labels stay."""
    from warehouse.db import MIGRATIONS_DIR
    con, applied = _before(tmp_path, 9)
    assert 9 not in applied
    rows = [("m", 0, 0, "colors", "offline", '{"version": "offline-v8", "v7": {"property": "mixed"}}'),
            ("m", 0, 1, "mixed", "offline", '{"version": "offline-v8", "v7": {"property": "shapes"}}'),
            ("m", 1, 0, "shapes", "offline", '{"version": "offline-v7", "shares": {}}'),
            ("n", 0, 0, "colors", "llm:x", "colors, because the texts name hues {")]
    con.executemany("INSERT INTO head_labels (model_id, layer, head, property, labeler, raw) VALUES (?, ?, ?, ?, ?, ?)", rows)
    assert migrate(con, MIGRATIONS_DIR) == [9, 10]
    got = con.execute("SELECT model_id, layer, head, property FROM head_labelings WHERE labeling = 'text-votes' "
                      "ORDER BY 1, 2, 3").fetchall()
    assert got == [("m", 0, 0, "mixed"), ("m", 0, 1, "shapes")]
    assert con.execute("SELECT count(*) FROM head_labelings WHERE labeling = 'labeler'").fetchone()[0] == 4
    con.close()
