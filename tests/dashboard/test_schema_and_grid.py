"""Issue 10 item 7 and the Atlas grid's links: the SQL console's schema browser (every table and view
of the warehouse with its columns, types and meanings) and thumbnails beside results that carry an
image_id; the console still refuses what it refused; a click on an Atlas grid cell opens that head's
page by its permalink. AppTest on the dashboard tests' warehouse (tests/conftest.py)."""
from __future__ import annotations

import base64
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from dashboard import nav, widgets
from tests.dashboard.rendered import shown
from warehouse import connect, queries, schema_docs

APP = str(Path(__file__).resolve().parents[2] / "dashboard" / "app.py")


@pytest.fixture
def wh(dashboard_warehouse, monkeypatch):
    monkeypatch.setenv("ATLAS_WAREHOUSE", str(dashboard_warehouse))
    return dashboard_warehouse


def _page(path: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=180)
    at.run()
    at.switch_page(path).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _run_sql(at: AppTest, sql: str) -> AppTest:
    at.text_area(key="sql_text").set_value(sql)
    at.button[0].click().run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_schema_browser_lists_every_relation_with_columns_types_and_meanings(wh):
    schema = queries.schema_browser(wh)
    with connect(wh, read_only=True) as con:
        tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
        images_cols = [(r[0], r[1]) for r in con.execute("DESCRIBE images").fetchall()]
    rels = schema.drop_duplicates("relation").set_index("relation").kind.to_dict()
    assert rels == {**{t: "table" for t in tables}, **{v: "view" for v in views}}
    assert "head_scores" in views and "models" in tables
    img = schema[schema.relation == "images"]
    assert list(zip(img["column"], img["type"])) == images_cols                      # in table order, real types
    assert all(schema_docs.relation_meaning(r) for r in rels), [r for r in rels if not schema_docs.relation_meaning(r)]
    meaning = dict(zip(img["column"], img.meaning))
    assert meaning["thumbnail"] == "JPEG, longest side 128 px"                      # 001's comment
    assert meaning["original"].startswith("PNG bytes of the decoded RGB pixels")   # 006's comment above ALTER
    assert meaning["image_id"] == "'<dataset_id>/<relative path or index>'"

    at = _page(nav.SQL)
    assert at.selectbox(key="sql_schema_relation").value == "head_scores"
    table = at.table[0].value
    assert list(table.index) == list(schema[schema.relation == "head_scores"]["column"])
    at.selectbox(key="sql_schema_relation").select("images").run()
    table = at.table[0].value
    assert list(table.index) == [c for c, _ in images_cols] and list(table["type"]) == [t for _, t in images_cols]
    assert any("JPEG, longest side 128 px" in str(v) for v in table.meaning)
    assert any(schema_docs.relation_meaning("images") in shown(c.value) for c in at.caption)


def test_results_with_image_id_show_thumbnails_and_refusals_still_refuse(wh):
    model_id = queries.model_ids(wh)[0]
    at = _page(nav.SQL)
    _run_sql(at, f"SELECT image_id, label FROM images ORDER BY image_id LIMIT 5")
    df = at.dataframe[0].value
    assert list(df.columns) == ["image", "image_id", "label"]
    th = queries.image_thumbnails(wh, list(df.image_id)).set_index("image_id")
    for uri, image_id in zip(df.image, df.image_id):
        assert uri == "data:image/jpeg;base64," + base64.b64encode(bytes(th.thumbnail[image_id])).decode()
    at.toggle(key="sql_thumbs").set_value(False).run()
    assert list(at.dataframe[0].value.columns) == ["image_id", "label"]
    at.toggle(key="sql_thumbs").set_value(True).run()
    _run_sql(at, "SELECT 'not-an-image' AS image_id UNION ALL SELECT NULL")
    assert list(at.dataframe[0].value.image) == [None, None] or list(at.dataframe[0].value.image.isna()) == [True, True]
    _run_sql(at, f"SELECT model_id FROM models WHERE model_id = '{model_id}'")
    assert list(at.dataframe[0].value.columns) == ["model_id"] and not at.toggle   # no image_id: no option
    for sql, words in [("DROP TABLE models", "read-only"), ("SELECT * FROM read_csv('/etc/passwd')", "Refused"),
                       ("COPY images TO '/tmp/x.csv'", "Refused")]:
        _run_sql(at, sql)
        assert at.error and words.lower() in shown(at.error[0].value).lower(), [e.value for e in at.error]
        assert not at.dataframe                             # the schema browser draws static tables only


def test_a_click_on_an_atlas_grid_cell_opens_that_heads_page(wh):
    model_id = widgets.default_model(queries.models(wh))
    row = queries.model_row(wh, model_id)
    l, h = widgets.analysed_heads(row)[0]                   # not the head pickers' default (the last head)
    at = AppTest.from_file(APP, default_timeout=180)
    at.run()
    assert at.title[0].value == "CLIP Atlas"
    at.session_state["atlas_grid"] = {"selection": {"pick": [{"layer": l, "head": h}]}}   # what a click sends
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.title[0].value == nav.TITLES[nav.HEAD]
    assert {k: at.query_params[k] for k in ("model", "layer", "head")} in (
        {"model": model_id, "layer": str(l), "head": str(h)},
        {"model": [model_id], "layer": [str(l)], "head": [str(h)]})
    assert at.selectbox(key=f"head_page@{model_id}").value == widgets.head_name(l, h)
