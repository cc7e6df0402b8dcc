"""The embed job's parallel loader (etl/loader.py): worker processes ahead of the model give the
same warehouse as one thread, bad files cost only themselves, and workers never outlive the job."""
from __future__ import annotations

import multiprocessing
from pathlib import Path

import duckdb
import numpy as np
import pytest
from PIL import Image

from etl.datasets import Dataset, Item, open_dataset
from etl.loader import Loader, default_workers
from tests.jobs.test_etl_jobs import cli, count
from tests.unit.test_models_io import bomb_png


def _preprocess(img):
    import torch
    return torch.from_numpy(np.asarray(img.resize((8, 8)), np.float32)).permute(2, 0, 1)   # [3, 8, 8]


@pytest.fixture()
def folder(tmp_path) -> Path:
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(23):
        Image.new("RGB", (30 + i, 20), (10 * i, 200 - 5 * i, 7)).save(root / f"{i:02d}.png")
    (root / "bomb.png").write_bytes(bomb_png())
    (root / "notes.png").write_text("not an image")
    return root


@pytest.mark.parametrize("spec", ["shapes:37:seed=2", "skimage", "folder", "csv"])
def test_shards_partition_the_items_in_order(spec, folder):
    if spec == "folder":
        spec = str(folder)
    elif spec == "csv":
        manifest = folder / "m.csv"
        manifest.write_text("path,label\n" + "".join(f"{i:02d}.png,c{i % 3}\n" for i in range(23)))
        spec = str(manifest)
    ds = open_dataset(spec)
    every = [i.image_id for i in ds.items()]
    for w in (1, 2, 3, 5):
        shards = [[i.image_id for i in ds.items(shard=(k, w))] for k in range(w)]
        assert sorted(sum(shards, [])) == sorted(every)
        assert all(s == every[k::w] for k, s in enumerate(shards))


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_loader_yields_every_image_once_and_each_bad_file_as_an_error(folder, workers):
    ds = open_dataset(str(folder))
    done = {f"{ds.dataset_id}/03.png"}
    loader = Loader(ds, done, _preprocess, batch_size=4, workers=workers)
    batches = list(loader)
    good = [p.item.image_id for b, _ in batches for p in b]
    errors = [e for _, e in batches for e in e]
    assert sorted(good) == sorted(f"{ds.dataset_id}/{i:02d}.png" for i in range(23) if i != 3)
    assert all(len(b) <= 4 for b, _ in batches)
    assert sorted(Path(p).name for p, _ in errors) == ["bomb.png", "notes.png"]
    assert any("decompression bomb" in r for _, r in errors)
    first = next(p for b, _ in batches for p in b)
    assert tuple(first.pixels.shape) == (3, 8, 8) and len(first.sha256) == 64 and first.thumbnail[:2] == b"\xff\xd8"
    assert not multiprocessing.active_children()


def test_a_consumer_that_stops_early_leaves_no_worker_behind():
    ds = open_dataset("shapes:4000:seed=1")
    loader = Loader(ds, set(), _preprocess, batch_size=8, workers=2)
    first = next(iter(loader))
    assert len(first[0]) == 8
    loader.close()
    assert not multiprocessing.active_children()


def test_a_dataset_that_fails_in_a_worker_fails_the_job_with_its_own_message():
    def items(shard=(0, 1)):
        for i in range(shard[0], 50, shard[1]):
            if i == 31:
                raise ValueError("manifest row 31 names a folder; list image files only")
            yield Item(f"broken/{i}", lambda: Image.new("RGB", (9, 9)), path=f"/x/{i}.png")
    ds = Dataset("broken", "broken", "csv", items, 50)
    with pytest.raises(ValueError, match="^manifest row 31 names a folder; list image files only$"):
        for _ in Loader(ds, set(), _preprocess, batch_size=4, workers=2):
            pass
    assert not multiprocessing.active_children()


@pytest.mark.slow             # worker processes: half a minute
def test_embed_with_worker_processes_equals_embed_in_one_thread(tmp_path, folder):
    """The same rows and vectors whatever the loader: workers only change who prepares a batch."""
    for w in ("0", "2"):
        for dataset in ("shapes:150:seed=4", str(folder)):
            r = cli("embed", "--model", "toy-shapes", "--dataset", dataset, "--loader-workers", w, "--batch-size", "16",
                    "--warehouse", str(tmp_path / f"w{w}.duckdb"), env={"ATLAS_HOME": str(tmp_path / "home")})
            assert r.returncode == 0, r.stderr
    a, b = (duckdb.connect(str(tmp_path / f"w{w}.duckdb"), read_only=True) for w in ("0", "2"))
    for sql in ["SELECT image_id, dataset_id, path, sha256, label, caption, width, height, thumbnail, original "
                "FROM images ORDER BY image_id",
                "SELECT image_id, factor, value FROM image_factors ORDER BY ALL",
                "SELECT item FROM errors ORDER BY item"]:
        assert a.execute(sql).fetchall() == b.execute(sql).fetchall(), sql
    for sql in ["SELECT image_id, vec FROM image_embeddings ORDER BY image_id",
                "SELECT image_id, layer, head, vec FROM head_embeddings ORDER BY image_id, layer, head"]:
        x, y = a.execute(sql).fetchall(), b.execute(sql).fetchall()
        assert len(x) == len(y) > 0 and [r[:-1] for r in x] == [r[:-1] for r in y]
        assert np.abs(np.array([r[-1] for r in x]) - np.array([r[-1] for r in y])).max() < 1e-6
    assert count(tmp_path / "w2.duckdb", "SELECT count(*) FROM image_embeddings") == 150 + 23
    assert count(tmp_path / "w2.duckdb", "SELECT count(*) FROM errors") == 2


def test_loader_workers_flag_is_validated(tmp_path):
    r = cli("embed", "--model", "toy-shapes", "--dataset", "shapes:5:seed=0", "--loader-workers", "-1",
            "--warehouse", str(tmp_path / "w.duckdb"))
    assert r.returncode == 2 and "--loader-workers" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("cores, on_gpu, want", [(2, False, 0), (2, True, 1), (8, False, 1), (16, False, 2),
                                                 (16, True, 8), (64, True, 8), (None, False, 0)])
def test_default_workers_leave_the_cpu_to_a_cpu_model(monkeypatch, cores, on_gpu, want):
    monkeypatch.setattr("etl.loader.os.cpu_count", lambda: cores)
    assert default_workers(on_gpu) == want
