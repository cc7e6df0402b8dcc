"""The neuron pages (MATH.md §10) under AppTest, on the dashboard tests' warehouse (tests/conftest.py:
`run` includes the neurons job, so each model has one analysed MLP layer). Expectations are read from
the warehouse through warehouse.queries and recomputed with models/, never from constants."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import models
from dashboard import nav, widgets
from models.neurons import second_order
from tests.dashboard.test_dashboard_apptest import (assert_ok, chart_rows, charts_with, metric, page,  # noqa: F401
                                                    warehouse_file, chosen, _use_warehouse, warehouse_image)
from warehouse import queries


def _analysed(warehouse, model_id):
    layers = queries.neuron_layers(warehouse, model_id)
    assert len(layers) >= 1, f"{model_id} has no analysed MLP layer: `run` should run the neurons job"
    return layers.iloc[0]


def _strongest(warehouse, model_id, layer) -> int:
    df = queries.neuron_atlas(warehouse, model_id, layer)
    return int(df.sort_values("mean_norm", ascending=False).neuron.iloc[0])


def test_neuron_page_opens_from_its_permalink_and_shows_the_stored_neuron(warehouse_file, chosen):
    model_id = chosen[0]
    info = _analysed(warehouse_file, model_id)
    layer = int(info.layer)
    n = _strongest(warehouse_file, model_id, layer)
    at = page(nav.NEURON, model=model_id, layer=str(layer), neuron=str(n))
    assert at.header[0].value == widgets.neuron_name(layer, n)
    assert dict(at.query_params) == {"model": model_id, "layer": str(layer), "neuron": str(n)}
    rec = queries.neuron_record(warehouse_file, model_id, layer, n)
    assert metric(at, "label") == widgets.plain(rec["label"])
    assert metric(at, "matters on") == f"{100 * rec['share_matters']:.1f} % of images"
    assert metric(at, "texts reconstruct") == f"r2 {rec['recon_r2']:.2f}"
    texts = queries.neuron_texts(warehouse_file, model_id, layer, n)
    shown = next(d.value for d in at.dataframe if "coef" in d.value.columns)
    assert list(shown.text) == list(texts.text) and len(texts) >= 1
    np.testing.assert_allclose(shown.coef, texts.coef)
    hist = next(r for r in charts_with(at, "images", "from"))
    assert sum(r["images"] for r in hist) == int(info.n_images)            # every image in one bin
    truth = queries.neuron_factors(warehouse_file, model_id, layer, n)
    eta = next(r for r in charts_with(at, "eta2", "factor"))
    assert sorted(r["factor"] for r in eta) == sorted(truth.factor) and len(truth) == 7
    heads = next(r for r in charts_with(at, "head_name", "effect"))
    assert len(heads) == int(info.later_heads)
    top = queries.neuron_top_images(warehouse_file, model_id, layer, n, 16)
    captions = [i.proto.imgs[0].caption for i in at.get("image") if i.proto.imgs and i.proto.imgs[0].caption]
    assert any(c.startswith(widgets.plain(top.image_id.iloc[0])) for c in captions), captions[:3]
    # the live map sums to phi_n . pc, as models.neurons computes it for the page's image
    image_id = at.selectbox(key="neuron_image").value
    lm = models.model_from_row(queries.model_row(warehouse_file, model_id))
    so = second_order(lm, lm.preprocess(warehouse_image(warehouse_file, image_id))[None], layer, phi=True)
    want = float(so.phi[0, n].double() @ torch.as_tensor(rec["pc"]).double())
    assert float(metric(at, "phi_n . direction")) == pytest.approx(want, rel=2e-3, abs=1e-6)
    # another neuron: the URL follows, the metrics change
    other = (n + 1) % int(info.n_neurons)
    at.number_input(key="neuron_index").set_value(other).run()
    assert_ok(at)
    assert dict(at.query_params) == {"model": model_id, "layer": str(layer), "neuron": str(other)}
    assert at.header[0].value == widgets.neuron_name(layer, other)


def test_neuron_atlas_sorts_by_effect_and_by_label_and_links_every_neuron(warehouse_file, chosen):
    model_id = chosen[0]
    layer = int(_analysed(warehouse_file, model_id).layer)
    at = page(nav.NEURON_ATLAS, model=model_id)
    assert dict(at.query_params) == {"model": model_id, "layer": str(layer)}
    table = next(d.value for d in at.dataframe if "share_matters" in d.value.columns)
    stored = queries.neuron_atlas(warehouse_file, model_id, layer)
    assert len(table) == len(stored) and table.mean_norm.is_monotonic_decreasing
    assert list(table.page) == [widgets.neuron_page_url(model_id, layer, k) for k in table.neuron]
    at.radio(key="neuron_atlas_sort").set_value("label").run()
    assert_ok(at)
    by_label = next(d.value for d in at.dataframe if "share_matters" in d.value.columns)
    assert list(by_label.label) == sorted(stored.label)
    assert sorted(by_label.neuron) == sorted(stored.neuron)
    dots = next(r for r in charts_with(at, "share_matters", "mean_norm", "page"))
    assert len(dots) == len(stored)
    abl = queries.neuron_ablations(warehouse_file, model_id)
    if len(abl):                                      # the zero-shot check of a shapes-world layer
        frames = [list(d.value.columns) for d in at.dataframe]
        shown = next((d.value for d in at.dataframe if "baseline" in d.value.columns), None)
        assert shown is not None, (frames, [i.value for i in at.info], abl.layer.unique())
        assert set(shown.columns) >= {"factor", "baseline", "zero", "mean", "rank1", "sparse"}


def test_neurons_that_write_a_text_rank_by_the_cosine_of_their_pc(warehouse_file, chosen):
    model_id = chosen[0]
    layer = int(_analysed(warehouse_file, model_id).layer)
    at = page(nav.NEURON_TEXT, model=model_id, text="a red shape")
    table = next(d.value for d in at.dataframe if "cosine" in d.value.columns)
    assert len(table) == 15 and table.cosine.is_monotonic_decreasing
    row = queries.model_row(warehouse_file, model_id)
    lm = models.model_from_row(row)
    t = models.encode_texts(lm, ["a red shape"])[0].numpy()
    stored = queries.neurons_writing(warehouse_file, model_id, t, 1000)
    best = stored.iloc[0]
    assert (int(table.layer.iloc[0]), int(table.neuron.iloc[0])) == (int(best.layer), int(best.neuron))
    pc = queries.neuron_record(warehouse_file, model_id, int(best.layer), int(best.neuron))["pc"]
    assert table.cosine.iloc[0] == pytest.approx(float(pc @ t), abs=1e-4)
    assert (stored.cosine.iloc[:15].to_numpy() >= stored.cosine.iloc[15:].max() - 1e-9).all()
    at.text_input(key="neuron_text").set_value("a blue circle").run()
    assert_ok(at)
    assert dict(at.query_params) == {"model": model_id, "text": "a blue circle"}
    again = next(d.value for d in at.dataframe if "cosine" in d.value.columns)
    assert list(again.cosine) != list(table.cosine)
    assert set(table.layer) == {layer}


def test_match_page_opens_the_neurons_behind_a_head(warehouse_file, chosen):
    model_id = chosen[0]
    image_id = queries.images(warehouse_file, model_id).image_id.iloc[0]
    at = page(nav.MATCH, model=model_id, image=image_id, text="there is a red shape")
    table = next((d.value for d in at.dataframe if "neuron name" in d.value.columns), None)
    assert table is not None, ([list(d.value.columns) for d in at.dataframe], [i.value for i in at.info])
    assert len(table) == 12 and table.share.abs().is_monotonic_decreasing
    assert list(table.page) == [widgets.neuron_page_url(model_id, l, n) for l, n in zip(table.layer, table.neuron)]
    head = at.selectbox(key="match_neuron_head").value
    l, h = widgets.parse_head(head)
    assert set(table.layer) <= set(range(l))
    options = at.selectbox(key="match_neuron_head").options
    other = next(o for o in options if not o.startswith(head + ":"))
    at.selectbox(key="match_neuron_head").set_value(other.split(":")[0]).run()
    assert_ok(at)
    again = next(d.value for d in at.dataframe if "neuron name" in d.value.columns)
    assert list(again.share) != list(table.share)


def test_plain_text_cannot_format_the_page():
    assert widgets.plain("**bold** :smile: $x$ [a](b) a_b") == r"\*\*bold\*\* \:smile\: \$x\$ \[a\]\(b\) a\_b"
    assert widgets.plain("L3.N7  two  spaces\nnewline") == r"L3\.N7 two spaces newline"
