"""Every page and job on a MAP-pooled tower (SigLIP's class: the SigLIP-style toy, random init),
on a warehouse built by the product's own jobs (`run`, every step, ablation included).

What differs from a class-token tower, and is checked here: there is no class token (the per-patch
maps hold every token: T = 64 patches, no prefix), the match page's bars include the pool MLP's
term (`pool_mlp`) and still add up to cos(image, text) computed by open_clip's encode_image, the
warehouse's models row says `pooling = 'map'`, and every page renders without an exception."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest

import models
from dashboard import live, nav
from dashboard.originals import resolve
from warehouse import queries

APP = str(Path(__file__).resolve().parents[2] / "dashboard" / "app.py")
MODEL = "toy-shapes-map/random-seed0"


pytestmark = pytest.mark.slow          # builds a warehouse for one more model (about 1.5 min on two idle cores)
SHAPES = "shapes:24:seed=13"


@pytest.fixture(scope="module")
def map_warehouse(tmp_path_factory) -> Path:
    """`run` (every step) and `ablate` (on half the scenes) on the SigLIP-style toy, random init."""
    from etl.cli import main
    tmp = tmp_path_factory.mktemp("mapwh")
    wh = tmp / "w.duckdb"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATLAS_HOME", str(tmp))
        mp.setenv("ATLAS_NO_PROGRESS", "1")
        common = ["--model", "toy-shapes-map", "--random-init", "--seed", "0", "--dataset", SHAPES, "--warehouse", str(wh)]
        assert main(["run", *common, "--skip", "ablate"]) == 0
        assert main(["ablate", *common, "--max-images", "12"]) == 0
    return wh


def test_jobs_fill_the_warehouse_for_a_map_tower(map_warehouse):
    row = queries.model_row(map_warehouse, MODEL)
    assert (row["pooling"], int(row["layers"]), int(row["heads"]), int(row["patch_size"])) == ("map", 6, 4, 8)
    assert list(row["analysed_layers"]) == list(range(6))
    lm = models.model_from_row(row)
    ims = list(queries.images(map_warehouse, MODEL).image_id)
    assert len(ims) == 24
    # the stored head vectors of an image are its live decomposition's, and sum with rest to the embedding
    img = resolve(queries.image_record(map_warehouse, ims[0])).image
    dec = models.decompose(lm, lm.preprocess(img)[None], layers=row["analysed_layers"])
    stored = queries.image_head_vectors(map_warehouse, MODEL, ims[0], [(5, 0), (0, 3)])
    assert np.abs(stored - np.stack([dec.head_cls[0, 5, 0].numpy(), dec.head_cls[0, 0, 3].numpy()])).max() < 1e-4
    assert np.abs(queries.image_embedding(map_warehouse, MODEL, ims[0]) - dec.embedding[0].numpy()).max() < 1e-4
    # TextSpan, labels and the ablation ran on every analysed layer
    assert len(queries.head_texts(map_warehouse, MODEL, 5, 0)) > 0
    abl = queries.ablations(map_warehouse)
    assert (abl.model_id == MODEL).any()


def test_match_bars_include_the_pool_mlp_and_sum_to_the_cosine(map_warehouse):
    row = queries.model_row(map_warehouse, MODEL)
    lm = models.model_from_row(row)
    img = resolve(queries.image_record(map_warehouse, list(queries.images(map_warehouse, MODEL).image_id)[1])).image
    t_hat = models.encode_texts(lm, ["a red circle on a white background"]).numpy()[0]
    b = live.breakdown(row, img, "test:map", t_hat)
    comp = b.components
    assert (comp.kind == "pool MLP").sum() == 1 and (comp.kind == "head").sum() == 24
    with torch.no_grad():
        z = lm.model.encode_image(lm.preprocess(img)[None])[0].double().numpy()
    cos = float(z @ t_hat / (np.linalg.norm(z) * np.linalg.norm(t_hat)))
    assert comp.share.sum() == pytest.approx(cos, abs=1e-4)
    assert abs(comp.share[comp.kind != "pool MLP"].sum() - cos) > 1e-4      # the pool MLP's bar matters
    # the per-patch map holds every token: no class token on a MAP tower
    dec = live.decompose_image(row, img, "test:map")
    assert dec.head_tokens.shape[3] == 64 and lm.tower.prefix == 0
    grid = live.topic_map(row, img, "test:map", [(5, 0), (4, 1)], t_hat)
    assert grid.shape == (8, 8)
    assert grid.sum() == pytest.approx(float((dec.head_cls[0, 5, 0] + dec.head_cls[0, 4, 1]).double() @ torch.as_tensor(t_hat).double()), abs=1e-5)


@pytest.mark.parametrize("path", [p for p, *_ in nav.PAGES])
def test_every_page_renders_on_a_map_tower(map_warehouse, monkeypatch, path):
    monkeypatch.setenv("ATLAS_WAREHOUSE", str(map_warehouse))
    at = AppTest.from_file(APP, default_timeout=180)
    at.run()
    if path in (nav.HEAD, nav.MATCH):
        at.query_params.update({"model": MODEL, "layer": "5", "head": "0"} if path == nav.HEAD else
                               {"model": MODEL, "text": "a red circle"})
    at.switch_page(path).run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.sidebar.selectbox(key="atlas_model_picker").value == MODEL
    if path == nav.MATCH:
        assert at.success and not at.error                 # the bars add up (the page checks it)
