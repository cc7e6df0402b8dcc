"""The embed/export/ablate/probe jobs end to end on temporary warehouses."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import duckdb
import numpy as np
import pytest
import torch
from PIL import Image

from tests.unit.test_models_io import bomb_png

ENV = {**os.environ, "ATLAS_NO_PROGRESS": "1"}


def cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "etl", *args], capture_output=True, text=True,
                          timeout=timeout, env={**ENV, **(env or {})})


def rows(path, sql, params=()):
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute(sql, list(params)).fetchall()
    finally:
        con.close()


def count(path, sql, params=()):
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute(sql, list(params)).fetchone()[0]
    finally:
        con.close()


@pytest.fixture()
def image_folder(tmp_path):
    root = tmp_path / "imgs"
    for cls, colour in [("red", (220, 20, 20)), ("blue", (20, 20, 220))]:
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40 + 10 * i, 50), colour).save(root / cls / f"{i}.png")
    (root / "red" / "notes.txt").write_text("not an image")
    (root / "blue" / "bomb.png").write_bytes(bomb_png())
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (0, 200, 0)).save(good, format="PNG")
    (root / "blue" / "truncated.png").write_bytes(good.getvalue()[:60])
    return root


def test_embed_folder_records_bad_files_and_resumes(tmp_path, image_folder):
    wh = tmp_path / "w.duckdb"
    env = {"ATLAS_HOME": str(tmp_path / "home")}
    r = cli("embed", "--model", "toy-shapes", "--dataset", str(image_folder), "--warehouse", str(wh), env=env)
    assert r.returncode == 0, r.stderr
    assert count(wh, "SELECT count(*) FROM image_embeddings") == 6
    assert count(wh, "SELECT count(*) FROM head_embeddings") == 6 * 6 * 4      # auto: all 6 layers x 4 heads
    assert count(wh, "SELECT count(DISTINCT label) FROM images") == 2
    assert count(wh, "SELECT count(*) FROM images WHERE thumbnail IS NOT NULL") == 6
    reasons = duckdb.connect(str(wh), read_only=True).execute("SELECT item, reason FROM errors ORDER BY item").fetchall()
    assert len(reasons) == 3
    text = " ".join(r for _, r in reasons)
    assert "decompression bomb" in text and "not an image" in text and "truncated" in text
    # unit embeddings; heads are shares of it
    con = duckdb.connect(str(wh), read_only=True)
    vec = np.array(con.execute("SELECT vec FROM image_embeddings LIMIT 1").fetchone()[0])
    assert abs(np.linalg.norm(vec) - 1) < 1e-5
    onnx_path, sha = con.execute("SELECT onnx_path, onnx_sha256 FROM models").fetchone()
    con.close()
    assert os.path.exists(onnx_path) and len(sha) == 64
    # a re-run skips the finished images: no duplicates
    r = cli("embed", "--model", "toy-shapes", "--dataset", str(image_folder), "--warehouse", str(wh), env=env)
    assert r.returncode == 0 and '"embedded": 0' in r.stdout and '"skipped_done": 6' in r.stdout
    assert count(wh, "SELECT count(*) FROM head_embeddings") == 6 * 6 * 4
    assert count(wh, "SELECT count(*) FROM runs WHERE job = 'embed' AND status = 'ok'") == 2


def test_embed_torch_and_onnx_backends_agree(tmp_path):
    wh = tmp_path / "w.duckdb"
    for backend in ("onnx", "torch"):
        r = cli("embed", "--model", "toy-shapes", "--dataset", "shapes:20:seed=3", "--backend", backend, "--layers", "last4",
                "--warehouse", str(tmp_path / f"{backend}.duckdb"), env={"ATLAS_HOME": str(tmp_path)})
        assert r.returncode == 0, r.stderr
    q = "SELECT image_id, layer, head, vec FROM head_embeddings ORDER BY image_id, layer, head"
    a = duckdb.connect(str(tmp_path / "onnx.duckdb"), read_only=True).execute(q).fetchall()
    b = duckdb.connect(str(tmp_path / "torch.duckdb"), read_only=True).execute(q).fetchall()
    assert len(a) == len(b) == 20 * 16
    assert max(np.abs(np.array(x[3]) - np.array(y[3])).max() for x, y in zip(a, b)) < 1e-4
    assert count(tmp_path / "onnx.duckdb", "SELECT count(*) FROM image_factors") == 20 * 7
    # the job's last commit re-clustered the rows (written image by image) head by head
    physical = rows(tmp_path / "onnx.duckdb", "SELECT layer, head, image_id FROM head_embeddings ORDER BY rowid")
    assert physical == sorted(physical) and physical[0][:2] == (2, 0) and physical[-1][:2] == (5, 3)


def test_embed_over_head_rows_left_without_their_image_embedding(tmp_path):
    """The writer inserts the head rows of new images with a plain INSERT (no ON CONFLICT: 5x
    cheaper). Head rows stored without their image embedding make that INSERT fail on the key; the
    batch is then rolled back and written again skipping stored rows: nothing doubled, nothing lost,
    stored vectors kept."""
    wh = tmp_path / "w.duckdb"
    args = ("embed", "--model", "toy-shapes", "--dataset", "shapes:12:seed=4", "--warehouse", str(wh))
    env = {"ATLAS_HOME": str(tmp_path)}
    assert cli(*args, env=env).returncode == 0
    q = "SELECT image_id, layer, head, vec FROM head_embeddings ORDER BY ALL"
    con = duckdb.connect(str(wh))
    con.execute("UPDATE head_embeddings SET vec = [v * 2 FOR v IN vec] WHERE image_id LIKE '%/3'")
    con.execute("DELETE FROM image_embeddings WHERE image_id LIKE '%/3' OR image_id LIKE '%/7'")
    con.close()
    before = rows(wh, q)
    r = cli(*args, env=env)
    assert r.returncode == 0, r.stderr
    assert _json_lines(r.stdout)[-1]["embedded"] == 2
    assert rows(wh, q) == before                     # the doubled vectors kept, no row twice
    assert count(wh, "SELECT count(*) FROM image_embeddings") == 12
    assert len(before) == 12 * 6 * 4                 # toy, auto: all 6 layers x 4 heads per image


def test_embed_killed_midway_loses_nothing(tmp_path):
    wh = tmp_path / "w.duckdb"
    args = [sys.executable, "-m", "etl", "embed", "--model", "toy-shapes", "--dataset", "shapes:6000:seed=1",
            "--batch-size", "16", "--backend", "torch", "--layers", "last4", "--warehouse", str(wh)]
    proc = subprocess.Popen(args, env={**ENV, "ATLAS_HOME": str(tmp_path)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    seen = 0
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        try:
            seen = count(wh, "SELECT count(*) FROM image_embeddings")
        except duckdb.Error:
            continue  # the writer holds the file for a moment
        if seen >= 64:
            break
    assert proc.poll() is None, "the job finished before it could be killed; use a larger dataset"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = count(wh, "SELECT count(*) FROM image_embeddings")
    assert before >= 64 and before < 6000
    # every committed image has all its head rows (batches are atomic)
    assert count(wh, "SELECT count(*) FROM head_embeddings") == before * 16
    r = cli("embed", "--model", "toy-shapes", "--dataset", "shapes:6000:seed=1", "--backend", "torch",
            "--layers", "last4", "--warehouse", str(wh), env={"ATLAS_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert f'"skipped_done": {before}' in r.stdout
    assert count(wh, "SELECT count(*) FROM image_embeddings") == 6000
    assert count(wh, "SELECT count(*) FROM (SELECT DISTINCT image_id, layer, head FROM head_embeddings)") == 6000 * 16
    assert count(wh, "SELECT count(*) FROM head_embeddings") == 6000 * 16


@pytest.mark.parametrize("dataset,message", [
    ("shapes:abc", "bad shapes dataset name"),
    ("imagenet-1k", "unknown dataset 'imagenet-1k'"),
])
def test_bad_dataset_names(tmp_path, dataset, message):
    r = cli("embed", "--model", "toy-shapes", "--dataset", dataset, "--warehouse", str(tmp_path / "w.duckdb"))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_empty_folder_and_all_bad_files(tmp_path):
    (tmp_path / "empty").mkdir()
    r = cli("embed", "--model", "toy-shapes", "--dataset", str(tmp_path / "empty"), "--warehouse", str(tmp_path / "w.duckdb"))
    assert r.returncode == 2 and "is empty" in r.stderr
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.jpg").write_bytes(b"nope")
    r = cli("embed", "--model", "toy-shapes", "--dataset", str(tmp_path / "junk"), "--warehouse", str(tmp_path / "w.duckdb"),
            env={"ATLAS_HOME": str(tmp_path)})
    assert r.returncode == 2 and "no readable image" in r.stderr
    assert count(tmp_path / "w.duckdb", "SELECT count(*) FROM errors") == 1
    # both attempts are recorded as failed runs, with the reason
    assert count(tmp_path / "w.duckdb", "SELECT count(*) FROM runs WHERE status = 'failed' AND error LIKE '%image%'") == 2


def test_ablation_table_on_planted_components():
    """Ablating the component that carries a target must drop accuracy to chance; others keep it."""
    from etl.jobs.ablate import ablation_table
    g = torch.Generator().manual_seed(0)
    n, L, H, d = 400, 2, 2, 8
    y = np.arange(n) % 2
    text = torch.eye(d)[:2]                                        # class c <-> axis c
    heads = 0.01 * torch.randn(n, L, H, d, generator=g)
    heads[:, 1, 0, 0] += torch.from_numpy(y == 0).float()          # head L1.H0 carries the label
    heads[:, 1, 0, 1] += torch.from_numpy(y == 1).float()
    mlp = 0.01 * torch.randn(n, L, d, generator=g)
    bias = torch.zeros(n, L, d)
    comp = dict(heads=heads, mlp=mlp, attn_bias=bias, embedding=heads.sum((1, 2)) + mlp.sum(1))
    rows = ablation_table(comp, {"label": y}, {"label": text}, head_layers=[0, 1])
    acc = {(r["kind"], r["layer"], r["head"]): r["accuracy"] for r in rows}
    assert acc[("baseline", None, None)] == 1.0 and acc[("mlps", None, None)] == 1.0
    assert acc[("head", 1, 0)] <= 0.6 and acc[("head", 0, 0)] == 1.0 and acc[("head", 1, 1)] == 1.0
    assert acc[("attn_upto", 0, None)] == 1.0 and acc[("attn_upto", 1, None)] <= 0.6
    assert len(rows) == 1 + 1 + L + 2 * H


def test_ablate_and_probe_jobs(tmp_path):
    wh = str(tmp_path / "w.duckdb")
    env = {"ATLAS_HOME": str(tmp_path)}
    assert cli("embed", "--model", "toy-shapes", "--dataset", "shapes:120:seed=2", "--warehouse", wh, env=env).returncode == 0
    r = cli("ablate", "--model", "toy-shapes", "--dataset", "shapes:120:seed=2", "--warehouse", wh, env=env)
    assert r.returncode == 0, r.stderr
    # 7 factors x (baseline + mlps + 6 attn_upto + 24 heads: auto = all 6 layers)
    assert count(wh, "SELECT count(*) FROM ablations") == 7 * (1 + 1 + 6 + 24)
    assert count(wh, "SELECT count(*) FROM component_means") == 1 + 6 * (2 + 4)
    r = cli("probe", "--model", "toy-shapes/bundled", "--dataset", "shapes:120:seed=2", "--warehouse", wh, env=env)
    assert r.returncode == 0, r.stderr
    assert count(wh, "SELECT count(*) FROM probes") == 24 * 7
    assert count(wh, "SELECT count(*) FROM head_factor_variance") == 24 * 7
    assert count(wh, "SELECT count(*) FROM head_factor_variance WHERE eta2 < 0 OR eta2 > 1") == 0
    assert count(wh, "SELECT count(*) FROM factor_properties") == 7
    assert count(wh, "SELECT count(*) FROM head_truth") == 24


def test_run_builds_every_table_and_resumes(tmp_path):
    wh = str(tmp_path / "w.duckdb")
    env = {"ATLAS_HOME": str(tmp_path)}
    r = cli("run", "--model", "toy-shapes", "--dataset", "shapes:80:seed=4", "--warehouse", wh, env=env)
    assert r.returncode == 0, r.stderr
    for table, expected in [("image_embeddings", 80), ("head_embeddings", 80 * 24), ("head_texts", 24 * 10),
                            ("head_labels", 24), ("probes", 24 * 7), ("image_factors", 80 * 7),
                            ("head_factor_variance", 24 * 7), ("label_agreement", 1)]:
        assert count(wh, f"SELECT count(*) FROM {table}") == expected, table
    # the toy's default bank is the shapes world's own, and TextSpan used it with r capped at 32
    from etl.text.bank import world_bank
    assert count(wh, "SELECT count(*) FROM texts WHERE bank = 'shapes'") == len(world_bank())
    assert count(wh, "SELECT count(*) FROM head_texts WHERE bank <> 'shapes' OR r IS NULL OR r > 32") == 0
    assert count(wh, "SELECT analysed_layers FROM models WHERE model_id = 'toy-shapes/bundled'") == list(range(6))
    assert count(wh, "SELECT n_heads FROM model_scores WHERE model_id = 'toy-shapes/bundled'") == 24
    jobs = {"run", "embed", "texts", "textspan", "label", "judge", "ablate", "probe", "neurons"}   # `run` records itself too
    assert {r[0] for r in rows(wh, "SELECT DISTINCT job FROM runs WHERE status = 'ok'")} == jobs
    first = {r[0] for r in rows(wh, "SELECT run_id FROM runs")}
    # a second run recomputes nothing: every job it starts ends 'skipped', and nothing is duplicated
    r = cli("run", "--model", "toy-shapes", "--dataset", "shapes:80:seed=4", "--warehouse", wh, env=env)
    assert r.returncode == 0, r.stderr
    assert '"skipped_done": 80' in r.stdout
    second = [(j, st) for i, j, st in rows(wh, "SELECT run_id, job, status FROM runs") if i not in first]
    assert {j for j, _ in second} == jobs and {s for _, s in second} == {"skipped"}, second
    assert count(wh, "SELECT count(*) FROM head_embeddings") == 80 * 24
    assert count(wh, "SELECT count(*) FROM head_texts") == 24 * 10


# --------------------------------------------------------------------------- keys that refuse duplicates

TABLES = ("images", "image_factors", "image_embeddings", "head_embeddings", "datasets", "models")


def _counts(path) -> dict:
    return {t: count(path, f"SELECT count(*) FROM {t}") for t in TABLES}


def _json_lines(text: str) -> list[dict]:
    import json
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_two_embed_processes_on_one_warehouse_store_each_image_once(tmp_path):
    """Two `embed` processes on the same model, dataset and warehouse (and the same ONNX file to
    export): both succeed and the warehouse holds exactly what one run stores."""
    wh, single = tmp_path / "w.duckdb", tmp_path / "single.duckdb"
    args = ["embed", "--model", "toy-shapes-small", "--dataset", "shapes:60:seed=0", "--batch-size", "8"]
    env = {**ENV, "ATLAS_HOME": str(tmp_path / "home")}
    procs = [subprocess.Popen([sys.executable, "-m", "etl", *args, "--warehouse", str(wh)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert err == ""
    results = [_json_lines(out)[-1] for out, _ in outs]
    for r in results:
        assert r["embedded"] + r["stored_by_another"] + r["skipped_done"] == 60, r
    assert sum(r["embedded"] for r in results) == 60, results         # each image stored by one of them
    r = cli(*args, "--warehouse", str(single), env={"ATLAS_HOME": str(tmp_path / "home")})
    assert r.returncode == 0, r.stderr
    assert _counts(wh) == _counts(single) == {"images": 60, "image_factors": 60 * 7, "image_embeddings": 60,
                                              "head_embeddings": 60 * 4 * 2, "datasets": 1, "models": 1}
    assert rows(wh, "SELECT DISTINCT status FROM runs WHERE job = 'embed'") in ([("ok",)], [("ok",), ("skipped",)],
                                                                               [("skipped",), ("ok",)])
    assert list((tmp_path / "home" / "onnx").glob("*.tmp.onnx")) == []


def _png_folder(root, n: int):
    root.mkdir()
    for i in range(n):
        img = Image.new("RGB", (48, 48), (255 - 20 * i, 15 * i, (97 * i) % 256))
        for x in range(8 + i, 30 + i):
            for y in range(10, 20 + i):
                img.putpixel((x, y), ((50 * i) % 256, 255 - 10 * i, 30))
        img.save(root / f"img{i:02d}.png")
    return root


def test_a_manifest_that_lists_files_twice_embeds_each_once_and_textspan_force_works(tmp_path):
    imgs = _png_folder(tmp_path / "imgs", 12)
    lines = ["path,label"] + [f"img{i:02d}.png,c{i % 3}" for i in range(12)]
    lines += ["img00.png,c0", "./img01.png,c1", f"{imgs / 'img02.png'},c2", "img03.png,c0"]
    manifest = imgs / "manifest.csv"
    manifest.write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")     # as Excel saves it
    wh = str(tmp_path / "w.duckdb")
    env = {"ATLAS_HOME": str(tmp_path / "home")}
    r = cli("embed", "--model", "toy-shapes-small", "--dataset", str(manifest), "--warehouse", wh, env=env)
    assert r.returncode == 0, r.stderr
    out = _json_lines(r.stdout)[-1]
    assert (out["embedded"], out["duplicates"], out["errors"]) == (12, 4, 0)
    assert count(wh, "SELECT count(*) FROM images") == 12
    assert count(wh, "SELECT count(*) FROM image_embeddings") == 12
    assert count(wh, "SELECT count(*) FROM head_embeddings") == 12 * 4 * 2
    assert count(wh, "SELECT count(DISTINCT label) FROM images") == 3
    for step in (["texts", "--model", "toy-shapes-small/bundled"], ["textspan", "--model", "toy-shapes-small/bundled"],
                 ["textspan", "--model", "toy-shapes-small/bundled", "--force"]):
        r = cli(*step, "--warehouse", wh, env=env)
        assert r.returncode == 0, (step, r.stderr)
    assert _json_lines(r.stdout)[-1]["heads_written"] == 4 * 2
    assert count(wh, "SELECT count(*) FROM head_texts") == 4 * 2 * 10
    # a second embed of the same manifest stores nothing new
    r = cli("embed", "--model", "toy-shapes-small", "--dataset", str(manifest), "--warehouse", wh, env=env)
    assert r.returncode == 0 and _json_lines(r.stdout)[-1]["skipped_done"] == 12
    assert count(wh, "SELECT count(*) FROM head_embeddings") == 12 * 4 * 2


def test_decompose_reports_the_file_it_wrote(tmp_path):
    import json
    _png_folder(tmp_path / "imgs", 1)
    r = cli("decompose", "--model", "toy-shapes-small", "--image", str(tmp_path / "imgs" / "img00.png"),
            "--layers", "all", "--no-tokens", "--out", str(tmp_path / "out" / "heads"))
    assert r.returncode == 0, r.stderr
    written = json.loads(r.stdout.splitlines()[-1])["out"]
    assert written == str(tmp_path / "out" / "heads.npz") and os.path.isfile(written)
    with np.load(written) as z:
        assert z["head_cls"].shape == (1, 4, 2, 128)
