"""Every dashboard page under streamlit.testing.AppTest on a warehouse built in code
(tests/fixtures_dashboard.py: two random-init toy models, 24 generated scenes).

Each page: runs without an exception, shows its widgets, and its results change when its
inputs change; uploads of bad or odd files give clear messages or are converted; a missing or
empty warehouse shows the command that fills it.
"""
from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(ROOT / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

from streamlit.testing.v1 import AppTest  # noqa: E402

import fixtures_dashboard as fx  # noqa: E402
import models  # noqa: E402
from dashboard import live, nav, widgets  # noqa: E402
from warehouse import queries, writer  # noqa: E402

APP = str(ROOT / "dashboard" / "app.py")
SEED0, SEED1 = "toy-shapes/random-seed0", "toy-shapes/random-seed1"
FILL = "python -m etl run --model toy-shapes --dataset shapes:2000:seed=0"


@pytest.fixture(scope="session")
def warehouse_file(tmp_path_factory) -> Path:
    return fx.build_fixture_warehouse(tmp_path_factory.mktemp("atlas"))


@pytest.fixture(autouse=True)
def _use_warehouse(request, monkeypatch):
    if "warehouse_file" in request.fixturenames:
        monkeypatch.setenv("ATLAS_WAREHOUSE", str(request.getfixturevalue("warehouse_file")))


def page(path: str, **query) -> AppTest:
    """Run the app, switch to `path` (with optional link query params), run it, check no exception."""
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    if query:
        at.query_params.update(query)
    at.switch_page(path).run()
    assert_ok(at)
    return at


def assert_ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def charts(at: AppTest) -> list:
    return at.get("vega_lite_chart")


def chart_rows(chart) -> list[dict]:
    """The data rows of an Altair chart element (Streamlit ships them as Arrow datasets)."""
    rows = []
    for ds in chart.proto.datasets:
        rows.extend(pa.ipc.open_stream(ds.data.data).read_all().to_pylist())
    return rows


def model_options(at: AppTest) -> list[str]:
    """Model ids offered by the sidebar picker (options are shown as '<id>  (<n> images)')."""
    return [o.split("  ")[0] for o in at.sidebar.selectbox(key="atlas_model_picker").options]


def metric(at: AppTest, label: str) -> str:
    found = [m.value for m in at.metric if m.label == label]
    assert found, f"no metric '{label}' in {[m.label for m in at.metric]}"
    return found[0]


def png(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


# --------------------------------------------------------------------------- every page

@pytest.mark.parametrize("path", [p for p, *_ in nav.PAGES])
def test_every_page_runs_with_title_and_model_picker(warehouse_file, path):
    at = page(path)
    assert at.title[0].value == nav.TITLES[path] or path == nav.ATLAS
    assert model_options(at) == [SEED0, SEED1]
    assert at.sidebar.selectbox(key="atlas_model_picker").value == SEED0


@pytest.mark.parametrize("path", [p for p, *_ in nav.PAGES])
def test_missing_warehouse_shows_the_fill_command(tmp_path, monkeypatch, path):
    monkeypatch.setenv("ATLAS_WAREHOUSE", str(tmp_path / "nothing.duckdb"))
    at = AppTest.from_file(APP, default_timeout=60).run()
    at.switch_page(path).run()
    assert_ok(at)
    assert "does not exist yet" in at.warning[0].value
    code = "\n".join(c.value for c in at.code)
    assert "make demo" in code and FILL in code


def test_empty_warehouse_shows_the_fill_command(tmp_path, monkeypatch):
    path = tmp_path / "empty.duckdb"
    with writer(path):
        pass                                           # schema only, no rows
    monkeypatch.setenv("ATLAS_WAREHOUSE", str(path))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert_ok(at)
    assert "holds no model yet" in at.warning[0].value
    assert FILL in "\n".join(c.value for c in at.code)


def test_model_choice_follows_across_pages(warehouse_file):
    at = page(nav.ATLAS)
    at.sidebar.selectbox(key="atlas_model_picker").select(SEED1).run()
    at.switch_page(nav.METRICS).run()
    assert_ok(at)
    assert at.sidebar.selectbox(key="atlas_model_picker").value == SEED1


def test_new_etl_results_show_without_restart(warehouse_file, tmp_path, monkeypatch):
    """The query cache is keyed by the file's mtime: a model written after the first load appears."""
    path = tmp_path / "copy.duckdb"
    shutil.copy(warehouse_file, path)
    monkeypatch.setenv("ATLAS_WAREHOUSE", str(path))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert len(model_options(at)) == 2
    with writer(path) as con:
        con.execute("INSERT INTO models SELECT * REPLACE ('toy-shapes/random-seed9' AS model_id, 9 AS seed) "
                    "FROM models WHERE model_id = ?", [SEED0])
    at.run()
    assert_ok(at)
    assert "toy-shapes/random-seed9" in model_options(at)


# --------------------------------------------------------------------------- atlas

def test_atlas_grid_and_head_card_follow_the_choice(warehouse_file):
    at = page(nav.ATLAS)
    grid = chart_rows(charts(at)[0])
    assert len(grid) == 6 * 4                          # layers x heads of the toy model
    labels = queries.head_grid(warehouse_file, SEED0)
    assert {r["property"] for r in grid} == set(labels.property)
    picker = at.selectbox(key=f"atlas_head@{SEED0}")
    texts = {}
    for name in ("L2.H0", "L5.H3"):
        picker.select(name).run()
        assert_ok(at)
        l, h = widgets.parse_head(name)
        expected = queries.head_texts(warehouse_file, SEED0, l, h)
        shown = at.dataframe[-1].value
        assert list(shown.text) == list(expected.text)
        assert metric(at, "label") == queries.head_label(warehouse_file, SEED0, l, h)["property"]
        texts[name] = list(shown.text)
        picker = at.selectbox(key=f"atlas_head@{SEED0}")
    links = [pl.proto.page for pl in at.get("page_link")]
    assert len(links) == 5 and all("L5.H3" in pl.proto.label for pl in at.get("page_link"))
    at.sidebar.selectbox(key="atlas_model_picker").select(SEED1).run()
    assert chart_rows(charts(at)[0]) != grid


def test_head_link_opens_the_page_on_that_model_and_head(warehouse_file):
    at = page(nav.TOPIC, model=SEED1, head="L4.H2")
    assert at.sidebar.selectbox(key="atlas_model_picker").value == SEED1
    assert at.radio(key="topic_mode").value == "one head"
    assert at.selectbox(key=f"topic_head@{SEED1}").value == "L4.H2"


def test_head_link_to_property_neighbours_opens_that_heads_property(warehouse_file):
    label = queries.head_label(warehouse_file, SEED1, 5, 1)["property"]
    at = page(nav.PROPERTY_NN, model=SEED1, head="L5.H1")
    assert at.selectbox(key=f"pnn_prop@{SEED1}").value == label


@pytest.mark.parametrize("path", [nav.TOPIC, nav.PROPERTY_NN, nav.IMAGE_NN])
def test_links_to_unknown_models_or_heads_fall_back_quietly(warehouse_file, path):
    at = page(path, model="no-such/model", head="not-a-head")
    assert at.sidebar.selectbox(key="atlas_model_picker").value == SEED0


# --------------------------------------------------------------------------- property neighbours

def test_property_neighbours_change_with_property_and_k(warehouse_file):
    at = page(nav.PROPERTY_NN)
    props = list(queries.properties(warehouse_file, SEED0).property)
    assert len(props) >= 2 and at.selectbox(key=f"pnn_prop@{SEED0}").value == props[0]
    first = at.dataframe[-1].value
    assert len(first) == 8
    query_id = at.selectbox(key="pnn_image").value
    assert query_id not in set(first.image_id)        # the query is not its own neighbour
    at.slider(key="pnn_k").set_value(3).run()
    assert len(at.dataframe[-1].value) == 3
    at.selectbox(key=f"pnn_prop@{SEED0}").select(props[1]).run()
    assert_ok(at)
    other = at.dataframe[-1].value
    assert list(other.score) != list(first.score[:3])
    # scores are the dot products of sums of head embeddings, recomputed here independently
    heads = [(int(r.layer), int(r.head)) for r in queries.property_heads(warehouse_file, SEED0, props[1]).itertuples()]
    q = queries.image_head_vectors(warehouse_file, SEED0, query_id, heads).sum(0)
    top = other.image_id.iloc[0]
    db = queries.image_head_vectors(warehouse_file, SEED0, top, heads).sum(0)
    assert other.score.iloc[0] == pytest.approx(float(q @ db), rel=1e-4)


# --------------------------------------------------------------------------- uploads

GOOD_UPLOADS = {
    "scene.png": lambda: png(fx.draw_scene("circle", "red", "white", "left")),
    "cmyk.jpg": lambda: png(Image.new("CMYK", (90, 70), (0, 200, 200, 0)), "JPEG"),
    "deep16.png": lambda: png(Image.fromarray((np.arange(80 * 80).reshape(80, 80) * 9).astype(np.uint16))),
    "palette.png": lambda: png(fx.draw_scene("square", "blue", "black", "right").convert("P")),
    "animated.gif": lambda: png(fx.draw_scene("circle", "green", "white", "left"), "GIF", save_all=True,
                                append_images=[fx.draw_scene("square", "red", "black", "right")], duration=100),
}
BAD_UPLOADS = {
    "notes.png": (lambda: b"this is a text file, not a picture", "not an image"),
    "cut.png": (lambda: png(fx.draw_scene("circle", "red", "white", "left"))[:300], "truncated"),
    "bomb.png": (lambda: png(Image.new("1", (7000, 7000))), "decompression bomb"),
    "huge.bmp": (lambda: b"BM" + bytes(21 * 2**20), "upload limit"),
}


@pytest.mark.parametrize("name", list(GOOD_UPLOADS))
def test_odd_but_valid_uploads_are_converted_and_segmented(warehouse_file, name):
    at = page(nav.TOPIC)
    at.radio(key="topic_source").set_value("upload").run()
    at.file_uploader(key="topic_upload").upload(name, GOOD_UPLOADS[name]())
    at.run()
    assert_ok(at)
    assert not at.error, [e.value for e in at.error]
    assert float(metric(at, "max |patch|")) > 0
    assert len(at.image) >= 1


@pytest.mark.parametrize("name", list(BAD_UPLOADS))
def test_bad_uploads_get_a_clear_message(warehouse_file, name):
    make, words = BAD_UPLOADS[name]
    at = page(nav.TOPIC)
    at.radio(key="topic_source").set_value("upload").run()
    at.file_uploader(key="topic_upload").upload(name, make())
    at.run()
    assert_ok(at)
    assert at.error and name in at.error[0].value and words in at.error[0].value, [e.value for e in at.error]
    assert not [m for m in at.metric if m.label == "max |patch|"]


# --------------------------------------------------------------------------- segmentation

def test_topic_map_changes_with_text_and_matches_the_decomposition(warehouse_file):
    at = page(nav.TOPIC)
    at.radio(key="topic_mode").set_value("all analysed heads").run()
    first = metric(at, "sum over patches")
    # independent recomputation: sum over heads and patches of c[l,h,i] . t_hat
    row = queries.model_row(warehouse_file, SEED0)
    lm = models.model_from_row(row)
    image_id = at.selectbox(key="topic_image").value
    img = models.load_image(queries.image_record(warehouse_file, image_id)["path"])
    dec = models.decompose(lm, lm.preprocess(img)[None], layers=row["analysed_layers"], tokens=True)
    t = models.encode_texts(lm, ["a red object"])[0]
    assert float(first) == pytest.approx(float((dec.head_tokens[0, :, :, 1:] @ t).sum()), abs=1e-4)
    at.text_input(key="topic_text").set_value("a square").run()
    assert_ok(at)
    assert metric(at, "sum over patches") != first
    at.text_input(key="topic_text").set_value("   ").run()
    assert "Type a text" in at.warning[0].value


def test_contrastive_uses_every_chosen_head_and_flips_when_swapped(warehouse_file):
    at = page(nav.CONTRASTIVE)
    at.radio(key="contrast_mode").set_value("a layer").run()
    layer_sum = float(metric(at, "sum A - B"))
    at.radio(key="contrast_mode").set_value("one head").run()
    at.selectbox(key=f"contrast_head@{SEED0}").select("L5.H0").run()
    one_head_sum = float(metric(at, "sum A - B"))
    assert layer_sum != pytest.approx(one_head_sum)
    at.text_input(key="contrast_a").set_value("a blue thing")
    at.text_input(key="contrast_b").set_value("a red object").run()
    assert_ok(at)
    assert float(metric(at, "sum A - B")) == pytest.approx(-one_head_sum, abs=2e-4)
    towards_a, towards_b = (float(metric(at, m).rstrip("%")) for m in ("patches towards A", "patches towards B"))
    assert towards_a + towards_b <= 100.5


def test_query_images_are_shown_as_the_pages_model_crops_them(warehouse_file):
    """The neighbours and segmentation pages show models.model_view of the page's model (64 px
    toy here, not a fixed 224); a model that cannot be loaded shows the image as it is."""
    row = queries.model_row(warehouse_file, SEED0)
    img = Image.new("RGB", (300, 200), (10, 200, 30))
    view = live.model_view(row, img)
    assert view.size == (row["image_size"], row["image_size"]) == (64, 64)
    gone = dict(row, model_id="gone", source="checkpoint", checkpoint_path="/nonexistent/w.pt", seed=None)
    assert live.model_view(gone, img) is img


def test_colours_are_symmetric():
    """(The map itself is tested in tests/test_maps.py.)"""
    rgb_pos, a_pos = widgets.colorize(np.array([0.5]), 1.0)
    rgb_neg, a_neg = widgets.colorize(np.array([-0.5]), 1.0)
    assert a_pos == a_neg and rgb_pos[0, 0] > rgb_pos[0, 2] and rgb_neg[0, 2] > rgb_neg[0, 0]


def test_head_addresses_round_trip_and_bad_ones_explain_the_form():
    assert widgets.parse_head(widgets.head_name(11, 3)) == (11, 3)
    assert widgets.parse_head(" l2.h10 ") == (2, 10)
    with pytest.raises(ValueError, match="L<layer>.H<head>"):
        widgets.parse_head("layer 11 head 3")


# --------------------------------------------------------------------------- per-head neighbours

def test_image_neighbours_rows_are_heads_and_follow_layer_and_k(warehouse_file):
    at = page(nav.IMAGE_NN)
    layer = at.selectbox(key="inn_layer").value
    assert row_heads(at) == [f"L{layer}.H{h}" for h in range(4)]
    assert len(score_captions(at)) == 4 * 5
    at.slider(key="inn_k").set_value(2).run()
    assert len(score_captions(at)) == 4 * 2
    before = score_captions(at)
    at.selectbox(key="inn_layer").select(2).run()
    assert_ok(at)
    assert row_heads(at) == [f"L2.H{h}" for h in range(4)]
    assert score_captions(at) != before


def row_heads(at: AppTest) -> list[str]:
    return [m.value.split("**")[1] for m in at.markdown if m.value.startswith("**L")]


def score_captions(at: AppTest) -> list[str]:
    """Captions of per-head neighbour thumbnails: '<label>  \n<score>'."""
    out = []
    for c in at.caption:
        last = c.value.split("\n")[-1].strip()
        try:
            float(last)
        except ValueError:
            continue
        out.append(c.value)
    return out


def test_text_neighbours_use_stored_or_live_text_and_change_with_text(warehouse_file):
    at = page(nav.TEXT_NN)
    at.text_input(key="tnn_text").set_value("a circle").run()
    assert_ok(at)
    stored = [m.value for m in at.markdown if "stored text embedding" in m.value]
    assert stored
    first = [c.value for c in at.caption]
    at.text_input(key="tnn_text").set_value("a purple hexagon far away").run()
    assert_ok(at)
    assert [m.value for m in at.markdown if "encoded live" in m.value]
    assert [c.value for c in at.caption] != first


# --------------------------------------------------------------------------- metrics

def test_metrics_charts_and_downloads_follow_the_model(warehouse_file):
    at = page(nav.METRICS)
    assert len(charts(at)) >= 5
    names = [d.proto.label for d in at.download_button]
    assert any("model_scores" in n for n in names) and any("ablations" in n for n in names)
    assert any("probes" in n for n in names) and any("property_head_counts" in n for n in names)
    probes0 = chart_rows(charts(at)[-1])
    assert {r["factor"] for r in probes0} == {"shape", "color", "position"}
    at.sidebar.selectbox(key="atlas_model_picker").select(SEED1).run()
    assert_ok(at)
    assert chart_rows(charts(at)[-1]) != probes0


# --------------------------------------------------------------------------- SQL console

def run_sql(at: AppTest, sql: str) -> AppTest:
    at.text_area(key="sql_text").set_value(sql)
    at.button[0].click().run()
    assert_ok(at)
    return at


def test_sql_console_runs_examples_and_changes_with_the_query(warehouse_file):
    at = page(nav.SQL)
    first = at.dataframe[0].value
    assert len(first) > 0
    at.selectbox(key="sql_example").select("Model scores").run()
    assert_ok(at)
    scores = at.dataframe[0].value
    assert sorted(scores.model_id) == [SEED0, SEED1] and "association" in scores.columns
    run_sql(at, "SELECT model_id, count(*) AS n FROM head_embeddings GROUP BY model_id ORDER BY model_id")
    assert list(at.dataframe[0].value.n) == [24 * 16, 24 * 16]
    assert any("query_result" in d.proto.label for d in at.download_button)


@pytest.mark.parametrize("sql, words", [
    ("DROP TABLE models", "read-only"),
    ("COPY models TO '/tmp/x.csv'", "Refused"),
    ("SELECT * FROM read_csv('/etc/passwd')", "Refused"),
    ("INSTALL httpfs", "Refused"),
    ("SELEC nonsense FROM", "syntax error"),
])
def test_sql_console_refuses_with_a_clear_message(warehouse_file, sql, words):
    at = run_sql(page(nav.SQL), sql)
    assert at.error and words.lower() in at.error[0].value.lower(), [e.value for e in at.error]
    assert not at.dataframe


def test_sql_console_clip_text_embeds_with_the_models_text_tower(warehouse_file):
    at = run_sql(page(nav.SQL), f"SELECT len(clip_text('{SEED0}', 'a circle')) AS d, "
                                f"list_inner_product(clip_text('{SEED0}', 'a circle'), "
                                f"clip_text('{SEED0}', 'a circle')) AS norm2")
    assert not at.error, [e.value for e in at.error]
    out = at.dataframe[0].value
    assert int(out.d[0]) == 128 and float(out.norm2[0]) == pytest.approx(1.0, abs=1e-5)


# --------------------------------------------------------------------------- bench

def test_bench_times_every_page_and_the_live_toy_path(warehouse_file):
    from dashboard import bench
    switch = bench.bench_page_switch(warehouse_file)
    assert set(switch["per_page_s"]) == {title for _, title, *_ in nav.PAGES}
    assert all(t > 0 for t in switch["per_page_s"].values()) and switch["max_s"] >= switch["median_s"]
    toy = bench.bench_topic_segmentation(queries.model_row(warehouse_file, SEED0), repeats=1)
    assert toy["heads"] == 16 and toy["median_s"] > 0 and toy["cpu_s"] > 0


def test_the_dashboard_opens_on_the_most_recent_trained_model():
    import pandas as pd
    from dashboard.widgets import default_model
    df = pd.DataFrame({"model_id": ["a/random-seed0", "b/bundled", "c/bundled", "d/random-seed1"],
                       "source": ["random", "bundled", "bundled", "random"],
                       "created_at": pd.to_datetime(["2026-01-04", "2026-01-01", "2026-01-02", "2026-01-05"])})
    assert default_model(df) == "c/bundled"                 # newest trained; random-init models never
    assert default_model(df[df.source == "random"]) == "a/random-seed0"
