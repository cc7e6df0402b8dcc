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
