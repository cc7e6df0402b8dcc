"""Live maps of warehouse images decompose the stored embedding (issue 10, MATH.md §6.2).

For a warehouse image resolved by dashboard.originals.resolve (the pixels the embed job saw), the
live map's sum over patches plus the class-token term equals the stored head embedding's dot
product with the text, per head, to 1e-4: on the toy model of the dashboard warehouse (shapes
scenes from their stored lossless originals, scikit-image photos by name) and on a random-init
ViT-B-32 over a folder of generated PNGs (files checked by their pixel sha256). The stored
thumbnail, the old source of live maps, does not pass the same check.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import models
from dashboard.originals import resolve
from models import maps
from warehouse import queries

TOL = 1e-4
TEXTS = ["a red circle", "a photo of a cat", "a small blue square on the left"]


def _live_terms(lm, row, img, texts_hat) -> dict:
    """{(layer, head): [n_texts]} of map.sum() + class-token term, computed live on `img`."""
    layers = [int(l) for l in row["analysed_layers"]]
    with torch.no_grad():
        dec = models.decompose(lm, lm.preprocess(img)[None], layers=layers, tokens=True)
    out = {}
    for j, l in enumerate(layers):
        for h in range(int(row["heads"])):
            vals = []
            for t in texts_hat:
                m = maps.topic_map(dec, [(l, h)], t, lm.grid)                               # [gh, gw]
                cls = float(dec.head_tokens[0, j, h, 0].double() @ torch.as_tensor(t).double())
                vals.append(m.sum() + cls)
            out[(l, h)] = np.array(vals)
    return out


def _max_gap(wh, lm, row, image_id, img, texts_hat) -> float:
    heads = [(int(l), h) for l in row["analysed_layers"] for h in range(int(row["heads"]))]
    stored = queries.image_head_vectors(wh, row["model_id"], image_id, heads).astype(np.float64)   # [n, d]
    live = _live_terms(lm, row, img, texts_hat)
    t = np.stack(texts_hat).astype(np.float64)                                                   # [m, d]
    return max(float(np.abs(live[hd] - stored[i] @ t.T).max()) for i, hd in enumerate(heads))


def _check(wh, model_id, image_ids, expect_sources):
    row = queries.model_row(wh, model_id)
    lm = models.model_from_row(row)
    texts_hat = list(models.encode_texts(lm, TEXTS).numpy())
    thumb_gaps = []
    for image_id, source in zip(image_ids, expect_sources):
        rec = queries.image_record(wh, image_id)
        r = resolve(rec)
        assert r.faithful and r.source == source, (image_id, r.source, r.note)
        gap = _max_gap(wh, lm, row, image_id, r.image, texts_hat)
        assert gap < TOL, f"{image_id}: live map + class token differs from the stored head embedding by {gap:.2e}"
        thumb = models.load_image(bytes(rec["thumbnail"]))
        thumb_gaps.append(_max_gap(wh, lm, row, image_id, thumb, texts_hat))
    assert max(thumb_gaps) > 10 * TOL, f"the thumbnail passes too (gaps {thumb_gaps}): the check cannot fail"


def test_toy_model_maps_decompose_stored_embeddings(dashboard_warehouse):
    wh = dashboard_warehouse
    ims = queries.images(wh, "toy-shapes-small-seed1/bundled")
    shapes = [i for i in ims.image_id if i.startswith("shapes")][:2]
    photos = [i for i in ("skimage/astronaut", "skimage/coffee") if i in set(ims.image_id)]
    assert len(shapes) == 2 and len(photos) == 2
    recs = {i: queries.image_record(wh, i) for i in shapes + photos}
    assert all(recs[i]["original"] is not None for i in shapes)          # migration 006, filled by embed
    assert all(recs[i]["original"] is None for i in photos)              # found again by name
    _check(wh, "toy-shapes-small-seed1/bundled", shapes + photos, ["stored original"] * 2 + ["scikit-image"] * 2)


@pytest.fixture(scope="module")
def b32_folder_warehouse(tmp_path_factory):
    """A random-init ViT-B-32 embedded over a folder of 3 generated PNGs (torch backend)."""
    from etl.cli import main
    tmp = tmp_path_factory.mktemp("b32")
    folder = tmp / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(96, 64), (64, 64), (50, 120)]):
        a = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        a[: h // 2, : w // 2] = (200, 30 * i, 20)                       # some structure, not only noise
        Image.fromarray(a).save(folder / f"img{i}.png")
    wh = tmp / "w.duckdb"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATLAS_HOME", str(tmp))
        mp.setenv("ATLAS_NO_PROGRESS", "1")
        assert main(["embed", "--model", "ViT-B-32", "--random-init", "--dataset", str(folder),
                     "--backend", "torch", "--layers", "last2", "--warehouse", str(wh)]) == 0
    return wh, folder


def test_random_vit_b32_maps_decompose_stored_embeddings(b32_folder_warehouse):
    wh, folder = b32_folder_warehouse
    model_id = queries.model_ids(wh)[0]
    ids = sorted(queries.images(wh, model_id).image_id)
    assert len(ids) == 3
    assert all(queries.image_record(wh, i)["original"] is None for i in ids)   # files: nothing copied
    _check(wh, model_id, ids, ["file"] * 3)


def test_changed_or_missing_file_falls_back_to_thumbnail(b32_folder_warehouse, tmp_path):
    wh, folder = b32_folder_warehouse
    model_id = queries.model_ids(wh)[0]
    rec = dict(queries.image_record(wh, sorted(queries.images(wh, model_id).image_id)[0]))
    changed = tmp_path / "changed.png"
    Image.new("RGB", (96, 64), (1, 2, 3)).save(changed)
    r = resolve({**rec, "path": str(changed)})
    assert (r.source, r.faithful) == ("thumbnail", False) and "sha256 mismatch" in r.note
    r = resolve({**rec, "path": str(tmp_path / "gone.png")})
    assert (r.source, r.faithful) == ("thumbnail", False) and "no original file" in r.note
