"""`python -m etl bench-scale`, small: the figures' keys, the neighbour answer against numpy brute
force on the regenerated vectors, TextSpan's streamed picks against the in-memory form, a clear
refusal when the disk is too small, and nothing left behind (also after a failure)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from etl.jobs import bench_scale as bs

ROOT = Path(__file__).resolve().parents[2]
IMAGES, SHARD, SEED = 2000, 512, 3


def _run(*args, cwd=ROOT, env_extra=None):
    env = {**os.environ, "ATLAS_NO_PROGRESS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "etl", "bench-scale", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _head(h: int) -> np.ndarray:
    """Head h's vectors [IMAGES, d] regenerated from the seed, in image order."""
    return np.concatenate([bs.head_vectors(SEED, first, min(SHARD, IMAGES - first))[h]
                           for first in range(0, IMAGES, SHARD)])


def test_bench_scale_small_run(tmp_path):
    p = _run("--images", str(IMAGES), "--shard-size", str(SHARD), "--seed", str(SEED), "--dir", str(tmp_path),
             "--runs", "2", "--texts", "300")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    for key in ("disk_gb_2k", "generate_2k_s", "attach_2k_s", "neighbours_top10_2k_s", "neighbours_top10_cold_2k_s",
                "textspan_layer_2k_s"):
        assert isinstance(out[key], (int, float)) and out[key] >= 0, key
    assert out["images"] == IMAGES and out["attach_mode"] == "in_place"
    assert out["shard_files"] == 4 * 4 and out["textspan"]["texts"] == 300 and out["textspan"]["images_per_head"] == [IMAGES] * bs.HEADS
    # the neighbour query through the product's view equals numpy over the same vectors
    scores = _head(bs.QUERY_HEAD).astype(np.float64) @ bs.query_vector(SEED).astype(np.float64)
    top = np.lexsort((np.arange(IMAGES), -scores))[:10]
    assert out["neighbours_top10_ids"] == [f"bench-scale/{i:09d}" for i in top]
    assert out["neighbours_equal_brute_force"] is True
    # TextSpan streamed out of the warehouse picks what the in-memory form picks
    from etl.text.textspan import textspan_heads
    T = bs.text_vectors(SEED, out["textspan"]["texts"])
    idx, _ = textspan_heads(_head(0)[:, None], T, k=10, r=80, max_rank=bs.HEAD_DIM)
    assert out["textspan_idx_head0"] == idx[0].tolist()
    # everything deleted
    assert out["deleted"] is True and list(tmp_path.iterdir()) == []


def test_refuses_when_the_disk_is_too_small(tmp_path):
    p = _run("--images", str(10**12), "--dir", str(tmp_path))
    assert p.returncode == 2
    assert p.stderr.startswith("error: bench-scale with 1,000,000,000,000 images needs about")
    assert len(p.stderr.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_a_failure_midway_deletes_the_data(tmp_path, monkeypatch):
    import etl.shards

    def broken(*a, **k):
        raise RuntimeError("attach broke")
    monkeypatch.setenv("ATLAS_NO_PROGRESS", "1")
    monkeypatch.setattr(etl.shards, "attach_set", broken)
    with pytest.raises(RuntimeError, match="attach broke"):
        bs.bench_scale(images=600, directory=str(tmp_path), shard_size=SHARD, seed=SEED, runs=1)
    assert list(tmp_path.iterdir()) == []
