"""Break 10 of issue 21: text from data is text. A label or URL text such as
`![b](http://host/beacon.png)` was rendered as Markdown (the page fetched the URL, a tracking
beacon), and `[Session expired: re-enter token](http://evil)` showed as a link-styled phishing line.

A copy of the dashboard tests' warehouse gets hostile strings in a head label, a TextSpan text and
the images' labels and captions; an upload gets a hostile file name; the match page gets one as
its `?text=` URL parameter; the console gets one in a failing query's message. Every page that
shows them runs under AppTest, and every piece of Markdown it renders (body text, captions,
alerts, metric labels and values, image captions, link labels, expander labels, radio options,
help tooltips) is checked: the hostile text is there, escaped (it reads exactly as written), and
never as live Markdown. tests/dashboard/test_browser.py renders the same pages in chromium.
"""
from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from dashboard import nav, widgets
from dashboard.safe_text import plain
from tests.dashboard.rendered import shown
from warehouse import queries, writer

ROOT = Path(__file__).resolve().parents[2]
APP = str(ROOT / "dashboard" / "app.py")

LABEL = "![b](http://127.0.0.1:9/label-beacon.png)"
TEXT = "[Session expired: re-enter token](http://evil.example/login)"
IMAGE_LABEL = "<img src=http://127.0.0.1:9/h.png> :red[x] [x](javascript:a)"   # <= 60: describe() keeps it whole
FILE_NAME = "![b](http://127.0.0.1:9/upload-beacon.png).png"
URL_TEXT = "[Session expired: re-enter token](http://evil.example/url) ![u](http://127.0.0.1:9/url.png)"
QUERY_VALUE = "![q](http://127.0.0.1:9/query.png)"
HOSTILE = (LABEL, TEXT, IMAGE_LABEL, FILE_NAME, URL_TEXT, QUERY_VALUE)
LIVE = ("](http", "![", "<img", ":red[", "](javascript", "http:", "www.")   # live Markdown, HTML or an autolink


@pytest.fixture(scope="module")
def hostile_warehouse(dashboard_warehouse, tmp_path_factory) -> tuple[Path, str, tuple[int, int]]:
    """A copy of the dashboard warehouse: every head label of the model the dashboard opens on is
    LABEL, the first TextSpan text of its last analysed head is TEXT, every image's label and
    caption is IMAGE_LABEL. Returns (path, model_id, that head)."""
    p = tmp_path_factory.mktemp("hostile") / "warehouse.duckdb"
    shutil.copy(dashboard_warehouse, p)
    model_id = widgets.default_model(queries.models(p))
    head = widgets.analysed_heads(queries.model_row(p, model_id))[-1]
    first = queries.head_texts(p, model_id, *head)
    assert not first.empty
    with writer(p) as con:
        con.execute("UPDATE head_labels SET property = ? WHERE model_id = ?", [LABEL, model_id])
        con.execute("UPDATE texts SET text = ? WHERE text_id = (SELECT text_id FROM head_texts WHERE model_id = ? "
                    "AND layer = ? AND head = ? AND rank = 0)", [TEXT, model_id, *head])
        con.execute("UPDATE images SET label = ?, caption = ?", [IMAGE_LABEL, IMAGE_LABEL])
    return p, model_id, head


def _markdown_sources(at: AppTest) -> list[str]:
    """Every string of the page that Streamlit renders as Markdown."""
    out = []
    for kind in ("markdown", "caption", "title", "header", "subheader", "error", "warning", "info", "success",
                 "latex"):
        out += [str(e.value) for e in getattr(at, kind)]
    for m in at.metric:
        out += [str(m.label), str(m.value), m.proto.help]
    for e in at.expander:
        out.append(str(e.label))
    for r in at.radio:
        out += [str(o) for o in r.options] + [str(r.label)]
    for el in at.get("image"):
        out += [img.caption for img in el.proto.imgs]
    for kind in ("page_link", "link_button"):
        for el in at.get(kind):
            out += [el.proto.label, el.proto.help]
    for widget in list(at.selectbox) + list(at.text_input) + list(at.slider) + list(at.toggle):
        out += [str(widget.label), widget.proto.help]
    return [s for s in out if s]


def _check(at: AppTest, *expected: str) -> list[str]:
    """No Markdown source of the page holds a hostile string live; each of ``expected`` is shown,
    escaped, exactly as written."""
    assert not at.exception, [e.value for e in at.exception]
    sources = _markdown_sources(at)
    for s in sources:
        for raw in HOSTILE:
            assert raw not in s, (raw, s)
        unescaped = re.sub(r"\\.", "", s)              # what is left once escaped characters are taken out
        assert not any(live in unescaped for live in LIVE), s
    for text in expected:
        assert any(plain(text) in s for s in sources), (text, sources)
        assert any(text in shown(s) for s in sources)
    return sources


@pytest.fixture
def hostile(hostile_warehouse, monkeypatch):
    monkeypatch.setenv("ATLAS_WAREHOUSE", str(hostile_warehouse[0]))
    monkeypatch.delenv("ATLAS_TOKEN", raising=False)
    return hostile_warehouse


def _page(path: str, **query) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=180)
    at.run()
    if query:
        at.query_params.update(query)
    at.switch_page(path).run()
    return at


def test_labels_and_image_labels_on_the_atlas_are_text(hostile):
    at = _page(nav.ATLAS)
    _check(at, LABEL, IMAGE_LABEL)
    assert shown([m.value for m in at.metric if m.label == "label"][0]) == LABEL
    assert any(f"({LABEL})" in shown(l.proto.label) for l in at.get("page_link"))


def test_a_texts_label_and_image_labels_on_the_head_page_are_text(hostile):
    _, model_id, (layer, head) = hostile
    at = _page(nav.HEAD, model=model_id, layer=str(layer), head=str(head))
    sources = _check(at, LABEL, TEXT, IMAGE_LABEL)
    assert any(f"t̂(**{plain(TEXT)}**)" in s for s in sources)          # the direction: the first TextSpan text


def test_a_url_parameter_on_the_match_page_is_text(hostile):
    at = _page(nav.MATCH, text=URL_TEXT)
    assert at.text_input(key="match_text").value == URL_TEXT
    _check(at, URL_TEXT, IMAGE_LABEL)


def test_an_upload_file_name_is_text(hostile):
    at = _page(nav.TOPIC)
    at.radio(key="topic_source").set_value("upload").run()
    img = Image.new("RGB", (64, 64), (200, 30, 30))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    at.file_uploader(key="topic_upload").upload(FILE_NAME, buf.getvalue())
    at.run()
    _check(at, FILE_NAME)
    assert any(plain(FILE_NAME) in img.caption for el in at.get("image") for img in el.proto.imgs)
    at.file_uploader(key="topic_upload").upload("![b](http://127.0.0.1:9/bad-upload.png).png", b"not an image")
    at.run()
    _check(at, "![b](http://127.0.0.1:9/bad-upload.png).png")
    assert at.error


@pytest.mark.parametrize("path", [nav.IMAGE_NN, nav.TEXT_NN, nav.PROPERTY_NN])
def test_labels_on_the_neighbour_pages_are_text(hostile, path):
    at = _page(path)
    if path == nav.IMAGE_NN:
        _check(at, IMAGE_LABEL)
    else:
        _check(at, LABEL if path == nav.PROPERTY_NN else IMAGE_LABEL)


def test_a_value_quoted_in_a_console_error_is_text(hostile):
    at = _page(nav.SQL)
    at.text_area(key="sql_text").set_value(f"SELECT CAST('{QUERY_VALUE}' AS INTEGER) AS n")
    at.button[0].click().run()
    _check(at, QUERY_VALUE)
    assert at.error and QUERY_VALUE in shown(at.error[0].value)


# --------------------------------------------------------------------------- the same in a real browser

@pytest.mark.browser
def test_hostile_text_in_chromium_loads_nothing_and_links_nowhere(hostile, tmp_path):
    """The head page (label, TextSpan text, image labels) and the match page with a hostile
    `?text=` in chromium: no request leaves for a URL taken from data, no link or image element
    points at one, and the strings read as written."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.parse
    import urllib.request
    from playwright.sync_api import sync_playwright
    chromium = "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.fail(f"{chromium} is missing: `apt-get install -y chromium`")
    path, model_id, (layer, head) = hostile
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "ATLAS_TOKEN"}
    env["ATLAS_WAREHOUSE"] = str(path)
    with open(tmp_path / "log.txt", "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", APP, "--server.port", str(port)],
                                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    requests: list[str] = []
    try:
        for _ in range(400):
            try:
                if urllib.request.urlopen(f"{base}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.3)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_context(viewport={"width": 1400, "height": 2200}).new_page()
            page.on("request", lambda r: requests.append(r.url))
            urls = [(f"{base}/head?model={urllib.parse.quote(model_id)}&layer={layer}&head={head}", (LABEL, TEXT)),
                     (f"{base}/head-match?text={urllib.parse.quote(URL_TEXT)}", (URL_TEXT,))]
            for url, texts in urls:
                page.goto(url)
                page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=240_000)
                page.wait_for_selector('[data-testid="stImage"]', timeout=240_000)
                page.wait_for_timeout(1500)
                assert not page.locator('[data-testid="stException"]').count()
                body = page.locator("body").inner_text().replace("\u2060", "")    # word joiners: invisible
                for text in texts:
                    assert text in body, text
                hrefs = page.eval_on_selector_all("a[href]", "els => els.map(e => e.getAttribute('href'))")
                srcs = page.eval_on_selector_all("img[src]", "els => els.map(e => e.getAttribute('src'))")
                assert not [h for h in hrefs if "evil.example" in h or "127.0.0.1:9" in h or "javascript:" in h]
                assert not [s for s in srcs if "127.0.0.1:9" in s]
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert not [u for u in requests if not u.startswith(base) and ("127.0.0.1:9/" in u or "evil.example" in u)]
