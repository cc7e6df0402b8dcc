"""A folder of good and hostile images: embed loads every good one, and each bad one becomes
exactly one `errors` row (the job does not stop, and the upload path uses the same guard)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
from PIL import Image

from tests.jobs.test_hostile_images import hostile_zoo

ROOT = Path(__file__).resolve().parents[2]


def test_embed_keeps_the_good_images_and_records_each_bad_one(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    zoo = hostile_zoo(folder)
    rng = np.random.default_rng(1)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (80, 90, 3), dtype=np.uint8)).save(folder / f"good_{i}.png")
    # issue 21 break 6: a name that is not UTF-8 stopped the whole folder (exit 2, nothing stored, every rerun)
    with open(os.path.join(os.fsencode(folder), b"\xff\xfe_bad.png"), "wb") as f:
        f.write((folder / "good_0.png").read_bytes())
    bad = {name for name, (_, expect) in zoo.items() if expect is not None} | {"\\xff\\xfe_bad.png"}
    good = len(zoo) - len(bad) + 1 + 5
    wh = tmp_path / "w.duckdb"
    r = subprocess.run([sys.executable, "-m", "etl", "embed", "--model", "toy-shapes", "--dataset", str(folder),
                        "--warehouse", str(wh), "--batch-size", "4"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "ATLAS_HOME": str(tmp_path), "ATLAS_NO_PROGRESS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    con = duckdb.connect(str(wh), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM images").fetchone()[0] == good
        assert con.execute("SELECT count(*) FROM image_embeddings").fetchone()[0] == good
        errors = {Path(item).name for (item,) in con.execute("SELECT item FROM errors").fetchall()}
        reason = con.execute("SELECT reason FROM errors WHERE item LIKE '%_bad.png'").fetchall()
    finally:
        con.close()
    assert errors == bad
    assert reason == [(f"{folder}/\\xff\\xfe_bad.png: the file name is not valid UTF-8, so it cannot be stored; "
                       "rename it (e.g. with `convmv -f latin1 -t utf8`) and run the job again",)]
