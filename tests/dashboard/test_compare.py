"""Issue 10, items 5 and 6: heads across models (the head page's similar heads, the Metrics page's
model x model matrix) and Metrics that compare (model names on the axes, one colour per model on
every chart, relative depth, the random-init band, the ablation target's default, the zoomed
score axis). AppTest on the `dashboard_warehouse` fixture (a trained toy and its random-init
control; the control embedded fewer images, so the heads are compared on the shared ones).

Expectations are computed here from the warehouse (warehouse.queries) and the math
(models.similarity), never read back from the page's own helpers."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from urllib.parse import parse_qs

import numpy as np
import pyarrow as pa
import pytest
from streamlit.testing.v1 import AppTest

from dashboard import nav, widgets
from models import similarity as sim
from tests.dashboard.rendered import shown
from warehouse import queries

ROOT = Path(__file__).resolve().parents[2]
APP = str(ROOT / "dashboard" / "app.py")


@pytest.fixture(scope="module")
def wh(dashboard_warehouse) -> Path:
    return dashboard_warehouse


@pytest.fixture(autouse=True)
def _use_warehouse(request, monkeypatch):
    if "wh" in request.fixturenames:
        monkeypatch.setenv("ATLAS_WAREHOUSE", str(request.getfixturevalue("wh")))


@pytest.fixture(scope="module")
def models_df(wh):
    df = queries.models(wh)
    assert len(df) >= 2 and (df.source == "random").sum() >= 1, list(zip(df.model_id, df.source))
    return df


@pytest.fixture(scope="module")
def trained(models_df) -> str:
    return widgets.default_model(models_df)                 # the model the dashboard opens on (trained)


@pytest.fixture(scope="module")
def control(models_df) -> str:
    return str(models_df[models_df.source == "random"].model_id.iloc[0])


def page(path: str, **query) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=180)
    at.run()
    if query:
        at.query_params.update(query)
    at.switch_page(path).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def specs(at: AppTest) -> list[dict]:
    """The Vega-Lite spec of every Altair chart of the page, in page order."""
    return [json.loads(c.proto.spec) for c in at.get("vega_lite_chart")]


def rows_of(at: AppTest) -> list[list[dict]]:
    out = []
    for c in at.get("vega_lite_chart"):
        rows = []
        for ds in c.proto.datasets:
            rows.extend(pa.ipc.open_stream(ds.data.data).read_all().to_pylist())
        out.append(rows)
    return out


def walk(spec):
    """Every dict inside a spec (layers, concatenations, encodings)."""
    if isinstance(spec, dict):
        yield spec
        for v in spec.values():
            yield from walk(v)
    elif isinstance(spec, list):
        for v in spec:
            yield from walk(v)


def encodings(spec: dict, channel: str) -> list[dict]:
    return [d["encoding"][channel] for d in walk(spec) if isinstance(d.get("encoding"), dict)
            and channel in d["encoding"]]


def score_chart(at: AppTest, score: str) -> dict:
    """The two charts of one score, side by side in two columns (per model | per layer, each as wide as its
    column): the per-model chart drawing it on y, and the chart after it, as one {"hconcat": [...]}."""
    all_specs = specs(at)
    found = [i for i, s in enumerate(all_specs) if any(y.get("field") == score for y in encodings(s, "y"))
             and any(x.get("field") == "model_id" for x in encodings(s, "x"))
             and any(isinstance(d.get("mark"), dict) and d["mark"].get("type") == "boxplot" for d in walk(s))]
    assert len(found) == 1, (score, len(found))
    return {"hconcat": all_specs[found[0]:found[0] + 2]}


def titled(at: AppTest, words: str) -> dict:
    found = [s for s in specs(at) if words in json.dumps(s.get("title", ""))]
    assert len(found) == 1, (words, [s.get("title") for s in specs(at)])
    return found[0]


# --------------------------------------------------------------------------- item 6: metrics that compare

def test_model_names_on_the_axes_and_one_colour_per_model_on_every_chart(wh, models_df):
    at = page(nav.METRICS)
    ids = list(models_df.model_id)                   # smallest image tower first: every chart's order
    assert ids == sorted(ids, key=lambda m: (int(models_df.set_index("model_id").layers[m])
                                             * int(models_df.set_index("model_id").width[m]) ** 2, m))
    expected = widgets.model_colours(models_df)
    assert sorted(expected) == sorted(ids) and len(set(expected.values())) == len(ids)       # distinct colours
    for m, s in zip(models_df.model_id, models_df.source):                           # controls are grey
        assert (expected[m] in widgets.CONTROL_GREYS) == (s == "random")
    # the per-model box plot: model ids on the x axis, labels shown, every labelled model in its data
    box = score_chart(at, "association")
    xs = [x for x in encodings(box, "x") if x.get("field") == "model_id"]
    assert xs and all(x.get("axis", {}).get("labels", True) is not False for x in xs), xs
    labelled = set(queries.head_scores(wh).dropna(subset=["property"]).model_id)
    by_size = [m for m in ids if m in labelled]
    assert all(x["sort"] == by_size for x in xs), xs                                  # box plots by size too
    assert all(o["sort"] == by_size for o in encodings(box, "xOffset")), encodings(box, "xOffset")
    assert all(x.get("axis", {}).get("labelLimit") == 0 for x in xs)                  # names never cut
    data_models = {r["model_id"] for rows in rows_of(at) for r in rows if "association" in r}
    assert data_models == set(queries.head_scores(wh).model_id)
    # every colour channel on a model field uses the same domain -> range, whatever models the chart holds
    colour_charts = 0
    for key, spec in enumerate(specs(at)):
        colours = [c for c in encodings(spec, "color") if c.get("field") == "model_id"]
        for c in colours:
            assert c["scale"]["domain"] == ids, (key, c)
            assert c["scale"]["range"] == [expected[m] for m in ids], (key, c)
        colour_charts += bool(colours)
    assert colour_charts >= 5, colour_charts     # association, tag entropy, ablation, kappa, code scores


def test_random_init_band_and_zoomed_score_axis(wh, control):
    at = page(nav.METRICS)
    hs = queries.head_scores(wh)
    hs = hs[hs.property.notna()]
    for score in ("association", "tag_entropy"):
        spec = score_chart(at, score)
        ys = [y for y in encodings(spec, "y") if y.get("field") == score]
        domain = ys[0]["scale"]["domain"]
        assert all(y["scale"]["domain"] == domain for y in ys)
        lo, hi = float(hs[score].min()), float(hs[score].max())
        assert domain[0] <= lo and hi <= domain[1]                     # every value inside
        assert domain[1] - domain[0] <= (hi - lo) + 0.2 + 1e-9         # zoomed: at most a step beyond each end
        ctl = hs[hs.model_id == control][score]
        bands = [r for rows in rows_of(at) for r in rows if "lo" in r and "hi" in r and "control" in r]
        assert any(r["lo"] == pytest.approx(ctl.min()) and r["hi"] == pytest.approx(ctl.max())
                   and r["mean"] == pytest.approx(ctl.mean()) and control in r["control"] for r in bands), bands
        rects = [d for d in walk(spec) if isinstance(d.get("mark"), dict) and d["mark"].get("type") == "rect"]
        assert rects, "no band drawn"


def test_relative_depth_puts_models_of_different_depths_on_one_axis(wh, models_df):
    at = page(nav.METRICS)
    at.radio(key="metrics_depth").set_value("relative depth").run()
    assert not at.exception, [e.value for e in at.exception]
    layers = dict(zip(models_df.model_id, models_df.layers))
    spec = score_chart(at, "association")
    assert any(x.get("field") == "depth" for x in encodings(spec, "x"))
    depth_rows = [r for rows in rows_of(at) for r in rows if "depth" in r and "mean" in r and "model_id" in r]
    assert depth_rows
    for r in depth_rows:
        assert r["depth"] == pytest.approx((r["layer"] + 1) / layers[r["model_id"]])
        assert 0 < r["depth"] <= 1
    curve = titled(at, "cumulative attention ablation")
    assert any(x.get("field") == "depth" for x in encodings(curve, "x"))


def test_ablation_target_defaults_to_one_with_nonzero_drops(wh, trained):
    at = page(nav.METRICS)
    target = at.selectbox(key=f"abl_target@{trained}").value
    abl = queries.ablations(wh)

    def largest(t):
        a = abl[(abl.dataset_id == t[0]) & (abl.factor == t[1]) & (abl.model_id == trained)]
        base = float(a[a.kind == "baseline"].accuracy.max())
        return float((base - a[a.kind == "head"].accuracy).abs().max())

    targets = sorted(set(zip(abl.dataset_id, abl.factor)))
    assert largest(target) > 0
    assert largest(target) == max(largest(t) for t in targets)
    drops = [r for rows in rows_of(at) for r in rows if "drop" in r]
    assert drops and max(abs(r["drop"]) for r in drops) == pytest.approx(largest(target))


# --------------------------------------------------------------------------- item 5: heads across models

def expected_similarity(wh, a: str, b: str) -> dict:
    """Both measures computed here from the stored vectors on the images and texts both models embedded."""
    ia, ha, XA = queries.model_head_tensor(wh, a)
    ib, hb, XB = queries.model_head_tensor(wh, b)
    shared = sorted(set(ia) & set(ib))
    assert len(shared) >= 50
    XA = XA[[ia.index(i) for i in shared]]
    XB = XB[[ib.index(i) for i in shared]]
    ta, TA = queries.text_matrix(wh, a)
    tb, TB = queries.text_matrix(wh, b)
    texts = sorted(set(ta) & set(tb))
    TA, TB = TA[[ta.index(t) for t in texts]], TB[[tb.index(t) for t in texts]]
    return {"heads_a": ha, "heads_b": hb, "cka": sim.cka_matrix(XA, XB), "text": sim.text_similarity(XA, TA, XB, TB)}


def test_model_head_tensor_matches_the_per_layer_reads(wh, trained):
    image_ids, heads, X = queries.model_head_tensor(wh, trained)
    row = queries.model_row(wh, trained)
    assert heads == [(l, h) for l in row["analysed_layers"] for h in range(row["heads"])]
    assert image_ids == sorted(image_ids) and X.shape == (len(image_ids), len(heads), row["embed_dim"])
    for layer in row["analysed_layers"]:
        C = queries.layer_head_matrix(wh, trained, layer, row["heads"])             # [n, H, d], image_id order
        cols = [k for k, (l, _) in enumerate(heads) if l == layer]
        np.testing.assert_array_equal(X[:, cols], C)
    # a capped read: the first images by md5(image_id), the same rows as the full read
    ids50, heads50, X50 = queries.model_head_tensor(wh, trained, max_images=50)
    assert heads50 == heads and len(ids50) == 50
    assert ids50 == sorted(sorted(image_ids, key=lambda i: (hashlib.md5(i.encode()).hexdigest(), i))[:50])
    np.testing.assert_array_equal(X50, X[[image_ids.index(i) for i in ids50]])


def test_head_page_lists_similar_heads_of_the_other_model_with_links(wh, trained, control):
    exp = expected_similarity(wh, trained, control)
    i = len(exp["heads_a"]) - 1
    layer, head = exp["heads_a"][i]
    at = page(nav.HEAD, model=trained, layer=str(layer), head=str(head))
    assert shown(at.header[0].value) == f"{widgets.head_name(layer, head)} of {trained}"
    assert at.selectbox(key=f"head_similar_model@{trained}").value == control
    assert "Similar heads in other models" in [s.value for s in at.subheader]
    for by in ("cka", "text"):
        at.radio(key="head_similar_by").set_value(by).run()
        assert not at.exception, [e.value for e in at.exception]
        links = [p.proto for p in at.get("page_link") if p.proto.page == nav.URLS[nav.HEAD]]
        listed = []
        for p in links:
            qs = parse_qs(p.query_string)
            assert qs["model"] == [control], p.query_string
            listed.append((int(qs["layer"][0]), int(qs["head"][0])))
        order = sorted(range(len(exp["heads_b"])), key=lambda j: (-exp[by][i, j], exp["heads_b"][j]))
        assert listed == [exp["heads_b"][j] for j in order[:min(5, len(order))]], (by, listed)
        values = [m.value for m in at.markdown if m.value.startswith("CKA **")]
        assert [float(v.split("**")[1]) for v in values] == pytest.approx(
            [round(float(exp["cka"][i, j]), 3) for j in order[:len(listed)]], abs=1.5e-3)


def test_metrics_matrix_is_the_mean_best_match_and_shows_the_per_head_matching(wh, trained, control):
    at = page(nav.METRICS)
    exp = expected_similarity(wh, trained, control)
    for by in ("cka", "text"):
        at.radio(key="metrics_similar_by").set_value(by).run()
        assert not at.exception, [e.value for e in at.exception]
        cells = [r for rows in rows_of(at) for r in rows if "mean_best" in r]
        got = {(r["model_a"], r["model_b"]): r["mean_best"] for r in cells}
        assert got[(trained, control)] == pytest.approx(float(exp[by].max(1).mean()), abs=1e-4)
        assert got[(control, trained)] == pytest.approx(float(exp[by].max(0).mean()), abs=1e-4)
        assert all(a != b for a, b in got)                                   # no self-pairs
        at.selectbox(key="metrics_similar_pair").set_value((trained, control)).run()
        table = next(d.value for d in at.dataframe if "match" in d.value.columns)
        assert len(table) == len(exp["heads_a"])
        best = exp[by].argmax(1)
        assert list(table["match"]) == [widgets.head_name(*exp["heads_b"][j]) for j in best]
        np.testing.assert_allclose(table["similarity"], exp[by].max(1), atol=1e-4)
        assert all(link.startswith(f"{nav.URLS[nav.HEAD]}?model=") for link in table["link"])


def test_probe_matrix_colour_is_centred_on_chance(wh, trained):
    """Accuracy minus chance on a diverging scale symmetric around 0: a cell at chance is white, and a cell
    just below chance is pale, never the most saturated colour."""
    at = page(nav.METRICS)
    (spec,) = [s for s in specs(at) if any(c.get("field") == "above_chance" for c in encodings(s, "color"))]
    (colour,) = [c for c in encodings(spec, "color") if c.get("field") == "above_chance"]
    p = queries.probes(wh, trained)
    reach = float(p.above_chance.abs().max())
    assert colour["scale"]["domain"] == pytest.approx([-reach, reach])
    assert colour["scale"]["domainMid"] == 0 and colour["scale"]["scheme"] == "redblue"
