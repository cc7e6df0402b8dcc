"""Fast first visits (dashboard/cache.py, widgets.chart, dashboard/warm.py): what is costly is built once
per warehouse version, kept in memory and on disk beside the warehouse, and is the same as built fresh.
AppTest on a copy of the `dashboard_warehouse` fixture (the cache folder goes beside it)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from dashboard import cache, nav, widgets
from tests.warehouse_reads import distinct_reads

ROOT = Path(__file__).resolve().parents[2]
APP = str(ROOT / "dashboard" / "app.py")


@pytest.fixture(scope="module")
def wh(dashboard_warehouse, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("firstvisit")
    shutil.copy(dashboard_warehouse, d / "warehouse.duckdb")
    return d / "warehouse.duckdb"


@pytest.fixture(autouse=True)
def _use(wh, monkeypatch):
    monkeypatch.setenv("ATLAS_WAREHOUSE", str(wh))


def metrics_charts() -> list[tuple]:
    at = AppTest.from_file(APP, default_timeout=300)
    at.run()
    at.switch_page(nav.METRICS).run()
    assert not at.exception, [e.value for e in at.exception]
    return [(json.loads(c.proto.spec), [(d.name, d.data.data) for d in c.proto.datasets], c.proto.id)
            for c in at.get("vega_lite_chart")]


def test_cached_chart_specs_equal_fresh_ones_and_come_back_from_disk(wh, monkeypatch):
    cache.forget_memory()
    first = metrics_charts()                                      # built now, kept in memory and on disk
    assert len(first) >= 8
    files = list(cache.folder(wh).glob("chart-*.pkl"))
    assert len(files) == len(first), (len(files), len(first))
    kept = {f.name.split("-")[1] for f in cache.folder(wh).glob("query-*.pkl")}
    assert kept == {"label_kappa", "model_measures", "paper_scores"}, kept
    # a restarted server: nothing in memory, every chart and costly view read back from disk, none built
    cache.forget_memory()
    from dashboard import data
    from warehouse import queries
    data._cached.clear()
    import streamlit.elements.vega_charts as vc

    def no_building(*a, **k):
        raise AssertionError("a chart was built although its spec is on disk")

    def no_query(name):
        def run(*a, **k):
            raise AssertionError(f"the view {name} was computed again although its result is on disk")
        run.__name__ = name                                   # the cache keys a query by its name
        return run
    monkeypatch.setattr(vc, "_convert_altair_to_vega_lite_spec", no_building)
    for name in kept:
        monkeypatch.setattr(queries, name, no_query(name))
    again = metrics_charts()
    assert [(s, d) for s, d, _ in again] == [(s, d) for s, d, _ in first]
    monkeypatch.undo()
    monkeypatch.setenv("ATLAS_WAREHOUSE", str(wh))
    # the same page with every chart built afresh by Streamlit's own conversion (no cache), sized as
    # widgets.chart sizes it: the same specs and data
    import streamlit as st
    from streamlit.elements.vega_charts import _convert_altair_to_vega_lite_spec

    def direct(key, build, deps=(), container=None, **kw):
        spec = widgets.sized(_convert_altair_to_vega_lite_spec(build()), kw.get("width") == "stretch")
        return (container or st).vega_lite_chart(spec, key=key, **kw)
    monkeypatch.setattr(widgets, "chart", direct)
    cache.forget_memory()
    fresh = metrics_charts()
    assert len(fresh) == len(first)
    for a, b in zip(fresh, first):
        assert (a[0], a[1]) == (b[0], b[1]), first_difference((a[0], a[1]), (b[0], b[1]))


def first_difference(a, b, path="") -> str:
    """Where two specs first differ: the path and both values (a failure names the field, not a
    truncated repr of two whole specs)."""
    if type(a) is not type(b):
        return f"{path}: {type(a).__name__} {a!r:.300} vs {type(b).__name__} {b!r:.300}"
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                return f"{path}.{k}: only in {'fresh' if k in a else 'cached'}"
            if a[k] != b[k]:
                return first_difference(a[k], b[k], f"{path}.{k}")
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return f"{path}: {len(a)} vs {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return first_difference(x, y, f"{path}[{i}]")
    return f"{path}: {a!r:.300} vs {b!r:.300}"


def test_a_new_warehouse_version_gets_a_new_folder_and_the_old_one_goes(wh):
    cache.forget_memory()
    old = cache.folder(wh)
    cache.built("probe-entry", (1,), lambda: {"x": 1})
    assert old.is_dir()
    st = wh.stat()
    os.utime(wh, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))      # the ETL wrote: a new version
    new = cache.folder(wh)
    assert new != old and new.parent == old.parent
    assert cache.built("probe-entry", (1,), lambda: {"x": 2}) == {"x": 2}  # not the old version's value
    assert new.is_dir() and not old.exists()


def test_the_warm_up_loads_the_default_model_once(wh):
    from dashboard import live, warm
    from warehouse import queries
    thread = warm.start(wh)
    assert warm.start(wh) is thread                                       # once per process
    thread.join(timeout=300)
    row = queries.model_row(wh, widgets.default_model(queries.models(wh)))
    assert live.loaded(live.spec_key(row))


def test_every_view_gives_the_same_bits_on_every_read(wh):
    """What the cache keeps must be what a fresh read gives: no view of the warehouse may add floats in
    the order its threads happen to meet the rows (migration 010; a view added later with a float sum
    or mean needs an ORDER BY in the aggregate)."""
    counts = distinct_reads(wh)
    assert len(counts) >= 15, sorted(counts)
    assert {v: n for v, n in counts.items() if n != 1} == {}
