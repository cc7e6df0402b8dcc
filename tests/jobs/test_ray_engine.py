"""`embed --engine ray` on a local Ray instance (started and stopped by the job): the Parquet shards,
attached by copy and in place, give exactly the rows and vectors of the local engine; a run killed
after its first shards, with a shard lost and debris left behind, resumes without losing or
doubling a row and rewrites only the missing shards."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest

pytest.importorskip("ray")

from etl import shards                                     # noqa: E402
from etl.cli import main                                   # noqa: E402

MODEL, DATASET = "toy-shapes-small", "shapes:64:seed=5"
N = 64
HEADS = 4 * 2                                              # auto: all 4 layers x 2 heads


@pytest.fixture()
def env(tmp_path, monkeypatch):
    """ATLAS_HOME in tmp_path; Ray's session files in a short temporary folder (its socket paths
    must stay under 107 characters), removed after."""
    ray_tmp = tempfile.mkdtemp(prefix="atlas-ray-")
    e = {**os.environ, "ATLAS_HOME": str(tmp_path / "home"), "ATLAS_NO_PROGRESS": "1", "RAY_TMPDIR": ray_tmp}
    monkeypatch.setenv("ATLAS_HOME", e["ATLAS_HOME"])
    monkeypatch.setenv("ATLAS_NO_PROGRESS", "1")
    yield e
    shutil.rmtree(ray_tmp, ignore_errors=True)


def ray_embed(env, warehouse, *extra, timeout=300):
    r = subprocess.run([sys.executable, "-m", "etl", "embed", "--model", MODEL, "--dataset", DATASET, "--engine", "ray",
                        "--warehouse", str(warehouse), *extra], capture_output=True, text=True, env=env,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def snapshot(path) -> dict:
    """Every row the embed job writes, sorted; vectors as float32 arrays."""
    con = duckdb.connect(str(path), read_only=True)
    try:
        heads = con.execute("SELECT model_id, image_id, layer, head, vec FROM head_embeddings "
                            "ORDER BY model_id, image_id, layer, head").fetchall()
        images = con.execute("SELECT model_id, image_id, vec FROM image_embeddings ORDER BY model_id, image_id").fetchall()
        return {
            "images": con.execute("SELECT * FROM images ORDER BY image_id").fetchall(),
            "image_factors": con.execute("SELECT * FROM image_factors ORDER BY ALL").fetchall(),
            "datasets": con.execute("SELECT * EXCLUDE (created_at) FROM datasets").fetchall(),
            "models": con.execute("SELECT * EXCLUDE (created_at) FROM models").fetchall(),
            "head_keys": [r[:4] for r in heads], "head_vecs": np.array([r[4] for r in heads], np.float32),
            "image_keys": [r[:2] for r in images], "image_vecs": np.array([r[2] for r in images], np.float32),
        }
    finally:
        con.close()


def assert_same_rows(got: dict, want: dict) -> None:
    for key in want:
        if key.endswith("_vecs"):
            assert got[key].shape == want[key].shape, key
            assert np.abs(got[key] - want[key]).max() <= 1e-6, key
        else:
            assert got[key] == want[key], key
    assert len(want["head_keys"]) == N * HEADS and len(set(want["head_keys"])) == N * HEADS


def committed(directory: Path) -> dict[str, tuple[int, int]]:
    """Shards whose `images` file (the commit mark) exists: id -> (size, mtime_ns) of its head file."""
    out = {}
    for p in sorted((directory / "images").glob("*.parquet")) if (directory / "images").is_dir() else []:
        h = directory / "head_embeddings" / p.name
        st = h.stat()
        out[p.stem] = (st.st_size, st.st_mtime_ns)
    return out


def session_pids(sid: int) -> list[int]:
    """Processes of the session ``sid`` (the killed job and the Ray processes it started)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[3]) == sid:                       # field 6: session id
                pids.append(int(d.name))
    return pids


@pytest.mark.slow             # a Ray cluster and a killed worker: about a minute
def test_ray_engine_matches_the_local_engine_and_resumes_after_a_kill(tmp_path, env, capsys):
    t0 = time.monotonic()
    local, copied, in_place, resumed = (tmp_path / f"{n}.duckdb" for n in ("local", "copy", "view", "resumed"))
    assert main(["embed", "--model", MODEL, "--dataset", DATASET, "--warehouse", str(local)]) == 0
    want = snapshot(local)

    # the Ray engine: 8 blocks of 8 images -> 8 shards, attached by copy (64 x 8 rows < the default)
    out = ray_embed(env, copied, "--shard-size", "8")
    directory = Path(out["shard_dir"])
    assert directory == shards.shard_dir(tmp_path / "home" / "shards", f"{MODEL}/bundled", DATASET)
    assert (out["embedded"], out["shards_written"], out["errors"], out["attached"]) == (N, 8, 0, "copy")
    manifest = shards.read_manifest(directory)
    assert manifest["complete"] and manifest["n_items"] == N and manifest["errors"] == []
    assert [s["id"] for s in manifest["shards"]] == [f"{i:09d}" for i in range(0, N, 8)]
    assert {t: f["rows"] for t, f in manifest["shards"][0]["files"].items()} == \
        {"head_embeddings": 8 * HEADS, "image_embeddings": 8, "image_factors": 8 * 7, "images": 8}
    shards.verify(directory, manifest)                    # sizes and sha256 of every file
    assert_same_rows(snapshot(copied), want)

    # the same shards read in place: head_embeddings is the writer's view over table + files
    capsys.readouterr()
    assert main(["attach", "--shards", str(directory), "--warehouse", str(in_place), "--copy-below", "0"]) == 0
    assert json.loads(capsys.readouterr().out.strip())["mode"] == "in_place"
    assert_same_rows(snapshot(in_place), want)
    con = duckdb.connect(str(in_place), read_only=True)
    assert con.execute("SELECT count(*) FROM head_embeddings_base").fetchall() == [(0,)]
    con.close()
    from warehouse.console import run_console_query
    df, _ = run_console_query(in_place, "SELECT count(*) AS n FROM head_embeddings h JOIN images i USING (image_id)")
    assert df.n.tolist() == [N * HEADS]

    # a second run finds every image done: it starts no Ray, writes nothing, attaches nothing new
    out = ray_embed(env, copied, "--shard-size", "8")
    assert (out["embedded"], out["skipped_done"], out["shards_written"], out["attach_skipped"]) == (0, N, 0, True)

    # killed after its first shards (one image per block: 64 shards), then damaged
    root = tmp_path / "shards2"
    args = [sys.executable, "-m", "etl", "embed", "--model", MODEL, "--dataset", DATASET, "--engine", "ray",
            "--shard-size", "1", "--shards-root", str(root), "--no-attach", "--warehouse", str(resumed)]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    set_dir = shards.shard_dir(root, f"{MODEL}/bundled", DATASET)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and len(committed(set_dir)) < 4:
        time.sleep(0.02)
    assert proc.poll() is None, "the job ended before it could be killed: " + proc.stderr.read()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1)
    for pid in session_pids(proc.pid):                    # Ray helpers the killed job left behind
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    before = committed(set_dir)
    assert 4 <= len(before) < N, len(before)
    lost = sorted(before)[0]                              # a shard lost with its manifest entry
    for table in ("head_embeddings", "image_embeddings", "image_factors", "images"):
        (set_dir / table / f"{lost}.parquet").unlink()
    m = json.loads((set_dir / shards.MANIFEST).read_text())
    m["shards"] = [s for s in m["shards"] if s["id"] != lost]
    (set_dir / shards.MANIFEST).write_text(json.dumps(m))
    named = len(m["shards"])                              # the rest are orphans: written, not yet named
    del before[lost]
    missing = next(f"{i:09d}" for i in range(N) if f"{i:09d}" not in before and f"{i:09d}" != lost)
    shutil.copy(set_dir / "head_embeddings" / f"{sorted(before)[0]}.parquet",
                set_dir / "head_embeddings" / f"{missing}.parquet")           # a piece without its commit mark
    (set_dir / "images" / f".{missing}.parquet.tmp-1-dead").write_bytes(b"half a file")

    out = ray_embed(env, resumed, "--shard-size", "1", "--shards-root", str(root))
    assert out["skipped_done"] == len(before) and out["embedded"] == N - len(before)
    assert out["shards_written"] == N - len(before) and out["shards"] == N and out["attached"] == "copy"
    assert out.get("orphans_adopted", 0) == len(before) - named and out["tmp_removed"] >= 1
    assert out["pieces_removed"] >= 1
    after = committed(set_dir)
    assert sorted(after) == [f"{i:09d}" for i in range(N)]
    assert {k: after[k] for k in before} == before          # shards already written were not rewritten
    assert not list(set_dir.rglob(".*.tmp-*"))
    manifest = shards.read_manifest(set_dir)
    assert manifest["complete"] and len({s["id"] for s in manifest["shards"]}) == N
    assert_same_rows(snapshot(resumed), want)
    print(f"killed after {len(before) + 1} shards ({named} still named in the manifest once one was deleted); "
          f"resumed: {out}; test wall time {time.monotonic() - t0:.1f} s")


def test_the_actor_turns_bad_images_into_error_records(tmp_path, env):
    """ShardEmbedder called directly (no cluster): a block with an unreadable image and one that fails
    otherwise writes a shard of the good one and returns both as error records; a block with only
    bad images writes no file."""
    import pyarrow as pa
    from ray import cloudpickle

    from etl.datasets import open_dataset
    from etl.jobs.embed import export
    from etl.ray_engine import ShardEmbedder, _rows
    from models import ImageError, load_model, resolve_layers

    def unreadable():
        raise ImageError("truncated PNG")

    lm = load_model(MODEL)
    layers = resolve_layers("auto", lm.layers)
    onnx = export(str(tmp_path / "w.duckdb"), lm, layers)
    rows, n = _rows(open_dataset("shapes:3:seed=2"), set())
    rows[1].update(load=cloudpickle.dumps(unreadable), path="broken.png")
    rows[2]["load"] = cloudpickle.dumps(lambda: 1 / 0)
    actor = ShardEmbedder(lm.spec, lm.model_id, "shapes:3:seed=2", layers, str(onnx), "onnx", "cpu", 64,
                          str(tmp_path / "set"))
    out = actor(pa.Table.from_pylist(rows))
    entry, errors = json.loads(out["entry"][0]), json.loads(out["errors"][0])
    assert (n, entry["id"], entry["n_images"], entry["files"]["head_embeddings"]["rows"]) == (3, "000000000", 1, HEADS)
    assert errors == [{"image_id": "shapes:3:seed=2/1", "item": "broken.png", "reason": "truncated PNG"},
                      {"image_id": "shapes:3:seed=2/2", "item": "shapes:2:2",
                       "reason": "ZeroDivisionError: division by zero"}]
    out = actor(pa.Table.from_pylist(rows[1:]))
    assert out["entry"] == [""] and len(json.loads(out["errors"][0])) == 2
    assert sorted(p.name for p in (tmp_path / "set" / "images").iterdir()) == ["000000000.parquet"]


@pytest.mark.parametrize("address,phrase", [
    ("127.0.0.1:1", "no Ray cluster answers at 127.0.0.1:1 (Connection refused)"),
    ("ray://127.0.0.1:1", "no Ray cluster answers at ray://127.0.0.1:1 (Connection refused)"),
    ("127.0.0.1:99999", "is not auto, HOST:PORT or ray://HOST:PORT"),
    ("http://x", "is not auto, HOST:PORT or ray://HOST:PORT")])
def test_a_ray_address_that_does_not_answer_is_one_line_within_10_s(tmp_path, env, address, phrase):
    """Break 11 of issue 21: `--ray-address 127.0.0.1:1` hung past 180 s with 10 lines of Ray logs."""
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "etl", "embed", "--model", MODEL, "--dataset", DATASET, "--engine", "ray",
                        "--ray-address", address, "--warehouse", str(tmp_path / "w.duckdb")], capture_output=True,
                       text=True, env=env, timeout=120)
    took = time.monotonic() - t0
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    assert phrase in r.stderr and took < 10.0, (took, r.stderr)
    assert not (tmp_path / "w.duckdb").exists()                  # refused before anything was written
