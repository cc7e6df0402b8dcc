"""Image sources (etl/datasets.py): each image once, manifests as users save them."""
from __future__ import annotations

import os

import pytest
from PIL import Image

from etl.datasets import open_dataset


@pytest.fixture()
def pngs(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (60 * i, 20, 200 - 40 * i)).save(root / f"{i}.png")
    return root


def test_a_manifest_that_lists_a_file_twice_yields_it_once(pngs):
    manifest = pngs / "list.csv"
    manifest.write_text("path,label\n0.png,a\n1.png,b\n0.png,a\n./1.png,b\n"
                        f"{pngs / '2.png'},c\nsub/../2.png,c\n3.png,d\n")
    ds = open_dataset(str(manifest))
    items = list(ds.items())
    assert [i.image_id.rsplit("/", 1)[-1] for i in items] == ["0.png", "1.png", "2.png", "3.png"]
    assert len({i.image_id for i in items}) == 4
    assert ds.n_images == 4 and ds.duplicates == 3
    assert [i.label for i in items] == ["a", "b", "c", "d"]


def test_a_manifest_with_a_byte_order_mark_is_read(pngs):
    manifest = pngs / "bom.csv"
    manifest.write_text("\ufeffpath,caption\n0.png,a red square\n", encoding="utf-8")
    items = list(open_dataset(str(manifest)).items())
    assert [(i.image_id.endswith("/0.png"), i.caption) for i in items] == [(True, "a red square")]


@pytest.mark.parametrize("text,phrase", [
    ("file,label\n0.png,a\n", "needs a header with a 'path' column"),
    ("path,label\n", "lists no image"),
])
def test_bad_manifests_say_what_to_fix(pngs, text, phrase):
    manifest = pngs / "bad.csv"
    manifest.write_text(text)
    with pytest.raises(ValueError, match=phrase):
        open_dataset(str(manifest))


def test_a_manifest_that_is_not_utf8_is_refused_clearly(pngs):
    manifest = pngs / "latin1.csv"
    manifest.write_bytes("path,caption\n0.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        open_dataset(str(manifest))


def test_a_folder_that_reaches_a_file_twice_yields_it_once(pngs):
    os.symlink(pngs / "0.png", pngs / "z-link.png")
    ds = open_dataset(str(pngs))
    names = [i.image_id.rsplit("/", 1)[-1] for i in ds.items()]
    assert names == ["0.png", "1.png", "2.png", "3.png"] and ds.duplicates == 1


def test_a_file_name_that_is_not_utf8_costs_only_itself(pngs):
    """Issue 21 break 6: the item of a name that cannot be encoded loads as an ImageError naming the
    file in a printable form; the folder's other files are items as before."""
    from models import ImageError
    with open(os.path.join(os.fsencode(pngs), b"\xff\xfe_bad.png"), "wb") as f:
        f.write((pngs / "0.png").read_bytes())
    items = list(open_dataset(str(pngs)).items())
    assert [i.image_id.rsplit("/", 1)[-1] for i in items] == ["0.png", "1.png", "2.png", "3.png", "\\xff\\xfe_bad.png"]
    bad = items[-1]
    assert bad.path == f"{pngs}/\\xff\\xfe_bad.png" and bad.path.encode("utf-8")
    with pytest.raises(ImageError, match=r"_bad.png: the file name is not valid UTF-8, so it cannot be stored"):
        bad.load()
    assert items[0].load().size == (16, 16)


MANIFEST_CHILD = r"""
import json, sys
def rss(field):
    return int([l.split()[1] for l in open("/proc/self/status") if l.startswith(field)][0]) / 1024
from etl.datasets import open_dataset
open("/proc/self/clear_refs", "w").write("5")
base = rss("VmRSS:")
ds = open_dataset(sys.argv[1])
shards = [sum(1 for _ in ds.items(shard=(k, 2))) for k in range(2)]
last = None
for last in ds.items():
    pass
print(json.dumps({"n": ds.n_images, "duplicates": ds.duplicates, "shards": shards, "last": last.image_id,
                  "peak_mb": rss("VmHWM:") - base}))
"""


def _big_manifest(path, rows: int, every: int) -> int:
    """``rows`` rows over 1,000 folders; every ``every``-th row names the file of the row before it
    (spelt ./x or sub/../x); returns the number of repeats."""
    repeats = 0
    with open(path, "w") as f:
        f.write("path,label,caption\n")
        for i in range(rows):
            if i % every == every - 1:
                j = i - 1
                f.write(f"./imgs/d{j % 1000}/../d{j % 1000}/{j:08d}.png,c,a scene {j}\n")
                repeats += 1
            else:
                f.write(f"imgs/d{i % 1000}/{i:08d}.png,c{i % 7},a scene {i}\n")
    return repeats


@pytest.mark.parametrize("rows,limit_mb", [
    (200_000, 40),
    pytest.param(2_000_000, 250, marks=pytest.mark.slow)])
def test_a_large_manifest_is_streamed_in_bounded_memory(tmp_path, rows, limit_mb):
    """Issue 21 break 7: a 2,000,000-row manifest took 3.07 GB to open (every row held as a dict and
    a resolved Path). Now it is read as a stream: 16 bytes a row while it opens, one kept."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    manifest = tmp_path / "big.csv"
    repeats = _big_manifest(manifest, rows, every=1000)
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", MANIFEST_CHILD, str(manifest)], capture_output=True, text=True,
                       cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert (got["n"], got["duplicates"]) == (rows - repeats, repeats) and sum(got["shards"]) == rows - repeats
    assert got["last"] == f"csv:{manifest}/imgs/d{(rows - 2) % 1000}/{rows - 2:08d}.png"
    assert got["peak_mb"] < limit_mb, got
