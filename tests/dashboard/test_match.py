"""Which heads make this match? (issue 10 item 4): the bars of the match page add up to cos(image, text).

The image embedding is exactly the sum of its direct contributions (MATH.md §1), so the bars (every
head of the analysed layers, the other layers' attention, every MLP, the out-proj biases and the
embedding term) must sum to cos(image, text) to 1e-4, where the cosine is computed independently: by
open_clip's own `encode_image` (and, for warehouse images, from the stored image embedding, with the
head bars equal to the stored head embeddings' shares). On the toy model of the dashboard warehouse
and on a random-init ViT-B-32. Then the page itself under AppTest: it renders on a link's model,
image and text, keeps them in the URL, checks the sum, and links its heads to their head pages.
"""
from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pyarrow as pa
import pytest
import torch
from streamlit.testing.v1 import AppTest

import models
from dashboard import live, nav, widgets
from dashboard.originals import resolve
from etl.world import shapes
from tests.dashboard.rendered import shown
from warehouse import queries

TOL = 1e-4
TEXTS = ["there is a red shape", "a photo of a cat", "a small blue square on the left"]
APP = str(Path(__file__).resolve().parents[2] / "dashboard" / "app.py")


def _open_clip_cos(lm, img, t_hat) -> float:
    """cos(image, text) from open_clip's encode_image, not from the decomposition."""
    with torch.no_grad():
        z = lm.model.encode_image(lm.preprocess(img)[None])[0].double().numpy()
    t = np.asarray(t_hat, dtype=np.float64)
    return float(z @ t / (np.linalg.norm(z) * np.linalg.norm(t)))


def _check_bars(row, lm, img, key, texts_hat) -> list:
    out = []
    for t in texts_hat:
        b = live.breakdown(row, img, key, t)
        comp = b.components
        n_analysed = len(row["analysed_layers"])
        n_layers, n_heads = int(row["layers"]), int(row["heads"])
        assert len(comp) == n_analysed * n_heads + (n_layers - n_analysed) + n_layers + 2
        assert list(comp["rank"]) == list(range(1, len(comp) + 1))
        assert (np.diff(comp.share.to_numpy()) <= 0).all()                     # ranked, highest first
        cos = _open_clip_cos(lm, img, t)
        assert abs(comp.share.sum() - cos) < TOL, (comp.share.sum(), cos)
        assert abs(b.sum_of_bars - b.cos) < TOL and abs(b.cos - cos) < TOL
        assert b.layers.share.sum() + comp.share[comp.kind == "embedding term"].sum() == pytest.approx(cos, abs=TOL)
        heads_only = comp.share[comp.kind == "head"].sum()
        assert abs(heads_only - cos) > 10 * TOL, "the heads alone add up to the cosine: the check cannot fail"
        out.append(b)
    return out


def test_bars_sum_to_cos_on_the_toy_model_and_match_the_stored_decomposition(dashboard_warehouse):
    wh = dashboard_warehouse
    model_id = "toy-shapes-small-seed1/bundled"
    row = queries.model_row(wh, model_id)
    lm = models.model_from_row(row)
    texts_hat = list(models.encode_texts(lm, TEXTS).numpy())
    ims = list(queries.images(wh, model_id).image_id)
    image_ids = [i for i in ims if i.startswith("shapes")][:2] + ["skimage/astronaut"]
    heads = widgets.analysed_heads(row)
    for image_id in image_ids:
        r = resolve(queries.image_record(wh, image_id))
        assert r.faithful, r.note
        stored = queries.image_embedding(wh, model_id, image_id).astype(np.float64)
        stored_heads = queries.image_head_vectors(wh, model_id, image_id, heads).astype(np.float64)
        for t, b in zip(texts_hat, _check_bars(row, lm, r.image, f"test:{image_id}", texts_hat)):
            t64 = np.asarray(t, dtype=np.float64)
            assert abs(b.sum_of_bars - stored @ t64) < TOL                       # the stored embedding's cosine
            comp = b.components[b.components.kind == "head"]
            share = {(int(l), int(h)): s for l, h, s in zip(comp.layer, comp["head"], comp.share)}
            assert max(abs(share[hd] - stored_heads[i] @ t64) for i, hd in enumerate(heads)) < TOL


def test_bars_sum_to_cos_on_a_random_vit_b32():
    lm = models.load_model("ViT-B-32", random_init=True)
    row = lm.row() | {"analysed_layers": [10, 11]}
    texts_hat = list(models.encode_texts(lm, TEXTS).numpy())
    img = shapes.scene(3, seed=77, size=224).to_pil()
    bs = _check_bars(row, lm, img, "test:b32-scene", texts_hat)
    comp = bs[0].components
    assert (comp.kind == "head").sum() == 2 * 12 and (comp.kind == "attention of a layer").sum() == 10
    assert (comp.kind == "MLP").sum() == 12


# --------------------------------------------------------------------------- the page

@pytest.fixture
def app(dashboard_warehouse, monkeypatch):
    monkeypatch.setenv("ATLAS_WAREHOUSE", str(dashboard_warehouse))
    return dashboard_warehouse


def _page(**query) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=180)
    at.run()
    at.query_params.update(query)
    at.switch_page(nav.MATCH).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _bar_rows(at) -> list[dict]:
    for chart in at.get("vega_lite_chart"):
        for ds in chart.proto.datasets:          # (the zero line is a dataset of its own, with no columns)
            rows = pa.ipc.open_stream(ds.data.data).read_all().to_pylist()
            if rows and "head page" in rows[0]:
                return rows
    raise AssertionError("no bar chart with head page links")


def test_match_page_renders_the_bars_with_links_to_head_pages(app):
    wh = app
    models_df = queries.models(wh)
    model_id = next(m for m in models_df.model_id if m != widgets.default_model(models_df))   # not the default
    row = queries.model_row(wh, model_id)
    ims = list(queries.images(wh, model_id).image_id)
    image_id, text = ("skimage/astronaut" if "skimage/astronaut" in ims else ims[-1]), "a photo of four objects"
    assert image_id != ims[0]                             # not the image picker's default
    at = _page(model=model_id, image=image_id, text=text)
    assert at.title[0].value == nav.TITLES[nav.MATCH]
    assert at.sidebar.selectbox(key="atlas_model_picker").value == model_id
    assert at.selectbox(key="match_image").value == image_id and at.text_input(key="match_text").value == text
    assert dict(at.query_params) == {"model": [model_id], "image": [image_id], "text": [text]} or \
        {k: (v if isinstance(v, str) else v[0]) for k, v in at.query_params.items()} == \
        {"model": model_id, "image": image_id, "text": text}
    assert at.success and "≤ 0.0001" in at.success[0].value and not at.error

    rows = _bar_rows(at)
    heads = widgets.analysed_heads(row)
    head_rows = [r for r in rows if r["kind"] == "head"]
    assert len(head_rows) == len(heads)
    cos = float(at.metric[0].value)
    assert sum(r["share"] for r in rows) == pytest.approx(cos, abs=1e-4)
    lm = models.model_from_row(row)
    t_hat = queries.stored_text_vector(wh, model_id, text)
    if t_hat is None:
        t_hat = models.encode_texts(lm, [text]).numpy()[0]
    img = resolve(queries.image_record(wh, image_id)).image
    assert cos == pytest.approx(_open_clip_cos(lm, img, t_hat), abs=1e-4)
    for r in head_rows:                                   # every head's bar opens its head page
        u = urlparse(r["head page"])
        l, h = widgets.parse_head(r["component"])
        assert u.path == nav.URLS[nav.HEAD]
        assert parse_qs(u.query) == {"model": [model_id], "layer": [str(l)], "head": [str(h)]}
    assert all(r["head page"] is None for r in rows if r["kind"] != "head")

    links = [pl for pl in at.get("page_link") if pl.proto.page == nav.URLS[nav.HEAD]]
    assert len(links) == min(9, len(heads))
    ranked = [r["component"] for r in sorted(head_rows, key=lambda r: r["rank"])]
    first = parse_qs(links[0].proto.query_string)
    assert first["model"] == [model_id] and widgets.head_name(int(first["layer"][0]), int(first["head"][0])) == ranked[0]

    at.text_input(key="match_text").input("there is a red shape").run()
    assert not at.exception
    assert at.query_params["text"] in ("there is a red shape", ["there is a red shape"])
    assert sum(r["share"] for r in _bar_rows(at)) != pytest.approx(cos, abs=1e-6)   # a new text, new bars


def test_match_page_refuses_unknown_links_instead_of_showing_another_match(app):
    """A link to a model or an image the warehouse does not hold says what was asked and what exists
    (issue 22, dashboard/links.py): no bars of another model or image under the asked-for URL."""
    at = _page(model="no-such/model", image="no-such-image", text="a circle")
    assert len(at.error) == 1 and "the model 'no-such/model'" in shown(at.error[0].value)
    assert not at.success and not at.get("vega_lite_chart") and not at.selectbox
    model = widgets.default_model(queries.models(app))
    at = _page(model=model, image="no-such-image", text="a circle")
    assert len(at.error) == 1
    assert f"the image 'no-such-image', which is not embedded for {model}" in shown(at.error[0].value)
    assert not at.success and not at.get("vega_lite_chart")
    assert {k: (v if isinstance(v, str) else v[0]) for k, v in at.query_params.items()} == \
        {"model": model, "image": "no-such-image", "text": "a circle"}              # the URL stays as asked
