"""Links that never lie (dashboard/links.py): every page's permalink parameters with bad values.

A link to a model the warehouse does not hold, to a head or layer the model does not have, to a head
that is not an address at all, or to an image the model did not embed must stop the page with what
was asked, what exists and a link to the nearest valid page, and show nothing else under that URL
(no chart, table or image of another object); the URL stays as asked. The nearest link itself opens
a page without an error. On the `dashboard_warehouse` fixture (tests/conftest.py), under AppTest.
"""
from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs

import pytest
from streamlit.testing.v1 import AppTest

from dashboard import links, nav, widgets
from warehouse import queries

ROOT = Path(__file__).resolve().parents[2]
APP = str(ROOT / "dashboard" / "app.py")
PAGES = [p for p, *_ in nav.PAGES]
HEAD_PAGES = [p for p in PAGES if p not in links.NEURON_PAGES]     # on the neuron pages `layer` is an MLP layer


@pytest.fixture(autouse=True)
def _use_warehouse(dashboard_warehouse, monkeypatch):
    monkeypatch.setenv("ATLAS_WAREHOUSE", str(dashboard_warehouse))


@pytest.fixture(scope="module")
def app(dashboard_warehouse):
    """One AppTest session for the module (each case sets its own query)."""
    import os
    os.environ["ATLAS_WAREHOUSE"] = str(dashboard_warehouse)
    at = AppTest.from_file(APP, default_timeout=180)
    at.run()
    return at


def open_page(at: AppTest, path: str, **query) -> AppTest:
    at.query_params.clear()
    at.query_params.update(query)
    at.switch_page(path).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def refused(at: AppTest, asked: str, problem: str, picker: bool = False) -> dict:
    """The page stopped with the refusal: its message, what exists, one link to the nearest valid page,
    and nothing else; returns the link's query."""
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and asked in errors[0] and problem in errors[0], errors
    assert any(m.value.startswith("**What exists:**") for m in at.markdown)
    assert not at.get("vega_lite_chart") and not at.dataframe and not at.get("imgs")
    assert not at.metric and bool(at.sidebar.selectbox) == picker       # (a bad model: not even the picker)
    (link,) = [pl for pl in at.get("page_link") if pl.proto.label.startswith("Open the nearest valid page")]
    return {k: v[0] for k, v in parse_qs(link.proto.query_string).items()}, link.proto.page


def models(warehouse) -> list[str]:
    return list(queries.models(warehouse).model_id)


@pytest.mark.parametrize("path", PAGES)
def test_an_unknown_model_is_refused_on_every_page(app, dashboard_warehouse, path):
    ids = models(dashboard_warehouse)
    asked = ids[0] + "-nope"
    at = open_page(app, path, model=asked)
    near, page = refused(at, f"the model '{asked}'", "is not in this warehouse")
    assert near == {"model": ids[0]} and page == ("" if path == nav.ATLAS else nav.URLS[path])   # the closest spelling
    assert dict(at.query_params) == {"model": asked}                    # the URL is left as asked
    assert all(m in at.markdown[-1].value or any(m in x.value for x in at.markdown) for m in ids)
    open_page(app, path, **near)                                        # the nearest page opens
    assert not at.error


@pytest.mark.parametrize("path", HEAD_PAGES)
def test_a_head_the_model_does_not_have_is_refused_on_every_page(app, dashboard_warehouse, path):
    model = models(dashboard_warehouse)[-1]
    row = queries.model_row(dashboard_warehouse, model)
    last = int(row["analysed_layers"][-1])
    query = {"model": model, "layer": "99", "head": "0"} if path == nav.HEAD else {"model": model, "head": "L99.H0"}
    at = open_page(app, path, **query)
    near, _ = refused(at, "99", f"does not exist in {model}")
    want = {"model": model, "layer": str(last), "head": "0"} if path == nav.HEAD else \
        {"model": model} if path == nav.PROPERTY_NN else {"model": model, "head": widgets.head_name(last, 0)}
    assert near == want
    assert dict(at.query_params) == query
    open_page(app, path, **near)
    assert not at.error


@pytest.mark.parametrize("path", HEAD_PAGES)
def test_a_head_that_is_no_address_is_refused_on_every_page(app, dashboard_warehouse, path):
    model = models(dashboard_warehouse)[0]
    at = open_page(app, path, model=model, head="the-best-head")
    refused(at, "the head 'the-best-head'", "is not a head address")


@pytest.mark.parametrize("path", links.NEURON_PAGES)
def test_an_mlp_layer_or_neuron_the_model_does_not_have_is_refused_on_the_neuron_pages(app, dashboard_warehouse, path):
    model = models(dashboard_warehouse)[0]
    layers = queries.neuron_layers(dashboard_warehouse, model)
    assert len(layers) >= 1, "the dashboard warehouse's `run` analyses one MLP layer per model"
    layer, width = int(layers.layer.iloc[0]), int(layers.n_neurons.iloc[0])
    missing = next(l for l in range(99) if l not in set(layers.layer))
    at = open_page(app, path, model=model, layer=str(missing))
    near, _ = refused(at, f"MLP layer '{missing}'", "was not analysed for neurons")
    assert near == ({"model": model, "layer": str(layer)} | ({"neuron": "0"} if path == nav.NEURON else {}))
    at = open_page(app, path, model=model, layer="five")
    refused(at, "MLP layer 'five'", "is not a layer number")
    if path == nav.NEURON:
        at = open_page(app, path, model=model, layer=str(layer), neuron=str(width + 3))
        near, _ = refused(at, f"neuron '{width + 3}'", f"is not a neuron of that layer (0-{width - 1})")
        assert near == {"model": model, "layer": str(layer), "neuron": str(width - 1)}
        open_page(app, path, **near)
        assert not at.error and at.header[0].value == widgets.neuron_name(layer, width - 1)


def test_head_page_head_index_out_of_range_and_malformed_layer(app, dashboard_warehouse):
    model = models(dashboard_warehouse)[0]
    row = queries.model_row(dashboard_warehouse, model)
    layer, heads = int(row["analysed_layers"][0]), int(row["heads"])
    at = open_page(app, nav.HEAD, model=model, layer=str(layer), head=str(heads + 5))
    near, _ = refused(at, f"layer '{layer}', head '{heads + 5}'", "does not exist")
    assert near == {"model": model, "layer": str(layer), "head": str(heads - 1)}
    at = open_page(app, nav.HEAD, model=model, layer="five", head="1")
    refused(at, "layer 'five'", "is not a head address")
    at = open_page(app, nav.HEAD, model=model, layer=str(layer), head="1")        # a good link still works
    assert not at.error and at.header[0].value == f"{widgets.head_name(layer, 1)} of {model}"


def test_match_page_unknown_image_is_refused_with_the_nearest_image(app, dashboard_warehouse):
    model = models(dashboard_warehouse)[0]
    ims = list(queries.images(dashboard_warehouse, model).image_id)
    asked = ims[3] + "x"
    at = open_page(app, nav.MATCH, model=model, image=asked, text="a red shape")
    near, _ = refused(at, f"the image '{asked}'", f"is not embedded for {model}")
    assert near == {"model": model, "image": ims[3], "text": "a red shape"}
    open_page(app, nav.MATCH, **near)
    assert not at.error


def test_property_neighbours_of_a_mixed_head_says_so(app, dashboard_warehouse):
    """A head labelled 'mixed' names no property: its property-neighbours link says so instead of opening
    the page on another property's heads."""
    for model in models(dashboard_warehouse):
        grid = queries.head_grid(dashboard_warehouse, model)
        mixed = grid[grid.property == "mixed"]
        if len(mixed):
            break
    else:
        pytest.fail("the fixture has no 'mixed' head")
    name = widgets.head_name(int(mixed.layer.iloc[0]), int(mixed["head"].iloc[0]))
    at = open_page(app, nav.PROPERTY_NN, model=model, head=name)
    near, _ = refused(at, f"the property neighbours of {name}", "is labelled 'mixed', not with a property",
                      picker=True)
    assert near == {"model": model}
    assert dict(at.query_params) == {"model": model, "head": name}


def test_nearest_head_rules():
    assert links.nearest_head(99, 0, [0, 1, 2, 3], 2) == (3, 0)
    assert links.nearest_head(5, 7, [8, 9, 10, 11], 12) == (8, 7)           # a layer before the analysed ones
    assert links.nearest_head(9, 1, [8, 10], 4) == (10, 1)                   # a tie goes to the later layer
    assert links.nearest_head(None, None, [2, 3], 4) == (3, 3)
    assert links.nearest_model("toy-shapes/bundld", ["toy-shapes/bundled", "ViT-B-16/openai"], "x") == \
        "toy-shapes/bundled"
    assert links.nearest_model("zzzzzzzz", ["ab", "cd"], "cd") == "cd"
