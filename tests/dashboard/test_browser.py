"""The dashboard in a real browser: `streamlit run dashboard/app.py` on 127.0.0.1 (free port) with
the `dashboard_warehouse` fixture (tests/conftest.py: built by the product's own ETL jobs), Debian's
/usr/bin/chromium driven by the playwright Python package.

Every page is opened, waited for until its script has finished running, checked for Streamlit
exception elements and for its own content, and saved to tests/_artifacts/screenshots/<page>.png (or $ATLAS_SCREENSHOTS). Then a
real upload, a head-card link and the model picker across a sidebar page switch; the head page and
the match page by their URLs, through a reload (match.png is saved from its link's state).

Needs the system browser (no browser downloads): `apt-get install -y chromium`.
"""
from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dashboard import nav
from dashboard.widgets import default_model
from etl.world import shapes
from warehouse import queries

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
# screenshots go to an ignored folder; `ATLAS_SCREENSHOTS=docs/screenshots ATLAS_BROWSER_WAREHOUSE=var/warehouse.duckdb`
# refreshes the README's pictures from the demo warehouse
SHOTS = Path(os.environ.get("ATLAS_SCREENSHOTS", ROOT / "tests" / "_artifacts" / "screenshots"))
PAGE_TIMEOUT_MS = 120_000
# what proves each page rendered its results, beyond the absence of exceptions
EXPECT = {
    nav.ATLAS: ['[data-testid="stVegaLiteChart"]', '[data-testid="stMetric"]', '[data-testid="stImage"]'],
    nav.HEAD: ['[data-testid="stImage"]', '[data-testid="stDataFrame"]', '[data-testid="stVegaLiteChart"]',
               '[data-testid="stMetric"]'],
    nav.MATCH: ['[data-testid="stImage"]', '[data-testid="stVegaLiteChart"]', '[data-testid="stMetric"]',
                '[data-testid="stAlertContentSuccess"]'],
    nav.PROPERTY_NN: ['[data-testid="stImage"]', '[data-testid="stDataFrame"]'],
    nav.TOPIC: ['[data-testid="stImage"]', '[data-testid="stVegaLiteChart"]', '[data-testid="stMetric"]'],
    nav.CONTRASTIVE: ['[data-testid="stImage"]', '[data-testid="stVegaLiteChart"]', '[data-testid="stMetric"]'],
    nav.IMAGE_NN: ['[data-testid="stImage"]'],
    nav.TEXT_NN: ['[data-testid="stImage"]'],
    nav.NEURON_ATLAS: ['[data-testid="stVegaLiteChart"]', '[data-testid="stDataFrame"]', '[data-testid="stMetric"]'],
    nav.NEURON: ['[data-testid="stImage"]', '[data-testid="stDataFrame"]', '[data-testid="stVegaLiteChart"]',
                 '[data-testid="stMetric"]'],
    nav.NEURON_TEXT: ['[data-testid="stDataFrame"]'],
    nav.METRICS: ['[data-testid="stVegaLiteChart"]', '[data-testid="stDownloadButton"]'],
    nav.SQL: ['[data-testid="stDataFrame"]', '[data-testid="stLinkButton"]'],
}


SERVER_LOG: dict = {}          # the module's server log, read by the last test


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def warehouse(request) -> Path:
    """$ATLAS_BROWSER_WAREHOUSE when set (e.g. the demo's, for the README's pictures), else the
    dashboard tests' warehouse (built only when needed)."""
    if os.environ.get("ATLAS_BROWSER_WAREHOUSE"):
        return Path(os.environ["ATLAS_BROWSER_WAREHOUSE"])
    return request.getfixturevalue("dashboard_warehouse")


@pytest.fixture(scope="module")
def server(tmp_path_factory, warehouse):
    """A streamlit server on `warehouse`; yields its base URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("log") / "streamlit.log"
    SERVER_LOG["path"] = log
    env = dict(os.environ, ATLAS_WAREHOUSE=str(warehouse))
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "dashboard/app.py", "--server.port", str(port),
             "--server.address", "127.0.0.1", "--server.headless", "true",
             "--browser.gatherUsageStats", "false", "--", "--warehouse", str(warehouse)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if urllib.request.urlopen(f"{base}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"streamlit did not start (exit {proc.poll()}); its log:\n{log.read_text()[-4000:]}")
            time.sleep(0.3)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's browser with `apt-get install -y chromium` "
                    "(the test drives the system chromium; it never downloads one)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def tab(browser):
    ctx = browser.new_context(viewport={"width": 1440, "height": 2000})
    page = ctx.new_page()
    yield page
    ctx.close()


def url_of(base: str, path: str) -> str:
    return base + "/" if path == nav.ATLAS else f"{base}/{nav.URLS[path]}"


def wait_done(page, title: str, expect: tuple[str, ...] = ()) -> None:
    """Wait for the page's title, for its script run to finish, for the `expect` elements (or an
    exception) to be drawn (the browser draws after the server reports the run finished), and
    for images to load."""
    page.locator("h1", has_text=title).first.wait_for(timeout=PAGE_TIMEOUT_MS)
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=PAGE_TIMEOUT_MS)
    for selector in expect:
        page.locator(f'{selector}, [data-testid="stException"]').first.wait_for(state="attached",
                                                                                timeout=PAGE_TIMEOUT_MS)
    page.wait_for_function("Array.from(document.images).every(i => i.complete)", timeout=PAGE_TIMEOUT_MS)
    page.wait_for_timeout(500)                     # let vega finish drawing before screenshots


def assert_no_exception(page, where: str) -> None:
    exc = page.locator('[data-testid="stException"]')
    assert exc.count() == 0, f"{where}: {exc.first.inner_text()[:2000]}"


def title_of(path: str) -> str:
    return "CLIP Atlas" if path == nav.ATLAS else nav.TITLES[path]


# What the page shows must be readable: a table whose columns scroll out of its box, a metric whose value
# is cut with an ellipsis, a chart label or title elided by Vega ('…'), or a chart wider than the page
# is a problem (checked at 1280 and 1920 px). Tables are canvases (glide-data-grid): their scroller
# says whether the columns fit, and the accessible table lists the columns drawn.
ELIDED_JS = """() => {
  const out = [];
  const main = document.querySelector('[data-testid="stMain"]') || document.body;
  const text = (el) => (el.innerText || el.textContent || '').trim().replace(/\\s+/g, ' ').slice(0, 80);
  main.querySelectorAll('[data-testid="stDataFrame"]').forEach((d, i) => {
    const s = d.querySelector('.dvn-scroller');
    const table = d.querySelector('table[role="grid"]');
    const heads = table ? Array.from(table.querySelectorAll('thead th')).map(t => t.textContent) : [];
    const n = table ? +table.getAttribute('aria-colcount') : 0;
    if (s && s.scrollWidth > s.clientWidth + 1)
      out.push(`table ${i} [${heads.join(', ')}]: its columns need ${s.scrollWidth} px, it has ${s.clientWidth}`);
    else if (n && heads.length < n) out.push(`table ${i} [${heads.join(', ')}]: ${heads.length} of ${n} columns drawn`);
  });
  main.querySelectorAll('[data-testid="stMetricValue"], [data-testid="stMetricLabel"]').forEach((m) => {
    [m, ...m.querySelectorAll('*')].forEach((e) => {
      if (e.clientWidth > 0 && e.scrollWidth > e.clientWidth + 1) out.push(`metric '${text(m)}' cut: ${e.scrollWidth} > ${e.clientWidth} px`);
    });
  });
  main.querySelectorAll('[data-testid="stVegaLiteChart"]').forEach((c, i) => {
    c.querySelectorAll('svg text').forEach((t) => {
      if ((t.textContent || '').includes('\u2026')) out.push(`chart ${i}: '${t.textContent}' elided`);
    });
    const g = c.querySelector('svg, canvas');
    if (g && g.getBoundingClientRect().right > main.getBoundingClientRect().right + 1)
      out.push(`chart ${i}: ${Math.round(g.getBoundingClientRect().width)} px wide, past the page's right edge`);
  });
  return Array.from(new Set(out));
}"""


def off_machine(requests: list[str], server: str) -> list[str]:
    """The requested URLs whose host is not the dashboard's own (data: and blob: URLs are local)."""
    from urllib.parse import urlparse
    own = urlparse(server).netloc
    return sorted({u for u in requests if urlparse(u).scheme in ("http", "https", "ws", "wss")
                   and urlparse(u).netloc != own})


@pytest.mark.parametrize("path", [p for p, *_ in nav.PAGES])
def test_every_page_renders_without_exception(server, tab, path):
    """Each page: no exception, no JavaScript error, its content drawn, no request off the machine and
    no failed request; at 1280 and 1920 px nothing cut off (ELIDED_JS), with a screenshot at each width."""
    errors: list[str] = []
    requests: list[str] = []
    failed: list[str] = []
    tab.on("pageerror", lambda e: errors.append(str(e)))
    tab.on("request", lambda r: requests.append(r.url))
    tab.on("requestfailed", lambda r: failed.append(f"{r.url}: {r.failure}"))
    tab.goto(url_of(server, path))
    wait_done(tab, title_of(path), tuple(EXPECT[path]))
    assert_no_exception(tab, path)
    assert tab.get_by_text("Page not found").count() == 0, f"{path}: opening its URL directly is not routed"
    links = tab.locator('[data-testid="stSidebarNav"] a').all_inner_texts()
    assert [t.strip().splitlines()[-1] for t in links] == [title for _, title, *_ in nav.PAGES], links
    for selector in EXPECT[path]:
        assert tab.locator(selector).count() > 0, f"{path}: nothing matches {selector}"
    assert not errors, f"{path}: JavaScript errors {errors}"
    shot = whole_page_screenshot(tab, f"{Path(path).stem}.png", check=lambda: assert_no_exception(tab, path))
    assert shot.stat().st_size > 10_000
    for width in (1280, 1920):
        tab.set_viewport_size({"width": width, "height": 1400})
        tab.wait_for_timeout(1500)                                   # the layout and the charts follow the width
        cut = tab.evaluate(ELIDED_JS)
        assert cut == [], f"{path} at {width} px: " + "; ".join(cut)
        whole_page_screenshot(tab, f"{Path(path).stem}_{width}.png", width=width)
    assert off_machine(requests, server) == [], f"{path}: requests off the machine"
    assert not failed, f"{path}: failed requests {failed}"


def whole_page_screenshot(tab, name: str, check=None, width: int = 1440) -> Path:
    """Save SHOTS/name: the app scrolls inside its main container, so the window grows to the
    content (at most 6,000 px) for a whole-page shot; ``check`` runs just before it is taken."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    shot = SHOTS / name
    height = tab.evaluate("""() => Math.max(...Array.from(document.querySelectorAll('[data-testid="stMain"] *'))
                                   .map(e => e.scrollHeight))""")
    tab.set_viewport_size({"width": width, "height": min(max(1000, int(height) + 80), 6000)})
    tab.wait_for_timeout(800)
    if check is not None:
        check()
    tab.screenshot(path=str(shot), full_page=True)
    return shot


def _upload(tab, name: str, data: bytes, mime: str) -> None:
    tab.get_by_text("upload", exact=True).click()
    tab.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(
        {"name": name, "mimeType": mime, "buffer": data})


def test_real_uploads_segment_or_explain(server, tab):
    tab.goto(url_of(server, nav.TOPIC))
    wait_done(tab, title_of(nav.TOPIC))
    buf = io.BytesIO()
    shapes.scene(5, seed=77, size=224).to_pil().save(buf, format="PNG")     # a scene of the product's world
    _upload(tab, "scene.png", buf.getvalue(), "image/png")
    tab.get_by_text("scene.png: the whole image").first.wait_for(timeout=PAGE_TIMEOUT_MS)
    wait_done(tab, title_of(nav.TOPIC), tuple(EXPECT[nav.TOPIC]))
    assert_no_exception(tab, "upload scene.png")
    tab.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(
        {"name": "notes.png", "mimeType": "image/png", "buffer": b"plain text, not pixels"})
    alert = tab.locator('[data-testid="stAlertContentError"]', has_text="not an image")
    alert.first.wait_for(timeout=PAGE_TIMEOUT_MS)
    wait_done(tab, title_of(nav.TOPIC))
    assert_no_exception(tab, "upload notes.png")


def test_head_card_link_and_model_choice_carry_across_pages(server, tab, warehouse):
    """Pick a model that is not the one the dashboard opens on, follow a head card's link, switch page."""
    ms = queries.models(warehouse)
    other = next(m for m in ms.model_id if m != default_model(ms))
    tab.goto(url_of(server, nav.ATLAS))
    wait_done(tab, "CLIP Atlas")
    model_box = tab.get_by_role("combobox", name="Model", exact=True)
    model_box.click()
    option = re.compile("^" + re.escape(other).replace("/", r"\/") + " ")      # playwright sends it as /.../
    tab.get_by_role("option", name=option).click()
    tab.locator("h3", has_text=f"Heads of {other}").first.wait_for(timeout=PAGE_TIMEOUT_MS)
    wait_done(tab, "CLIP Atlas")
    link = tab.get_by_role("link", name=re.compile(r"Topic segmentation of L\d+\.H\d+"))
    head = re.search(r"L\d+\.H\d+", link.first.inner_text()).group(0)
    link.first.click()
    wait_done(tab, "Topic segmentation", tuple(EXPECT[nav.TOPIC]))
    assert_no_exception(tab, "topic page from a head link")
    assert tab.get_by_role("combobox", name="Model", exact=True).input_value().startswith(other + " ")
    assert tab.get_by_role("combobox", name="Head", exact=True).input_value().startswith(head + " ")
    tab.locator('[data-testid="stSidebarNav"] a', has_text="Metrics").click()
    wait_done(tab, "Metrics", tuple(EXPECT[nav.METRICS]))
    assert_no_exception(tab, "metrics after a sidebar switch")
    assert tab.get_by_role("combobox", name="Model", exact=True).input_value().startswith(other + " ")


def test_head_permalink_survives_reload_and_page_switch(server, tab, warehouse):
    """Open /head?model=&layer=&head= for a model and head that are not the defaults, reload, switch
    page and come back: the same head each time, and the URL still names it. Saves head.png beside the other screenshots."""
    from urllib.parse import parse_qs, urlparse
    ms = queries.models(warehouse)
    other = next(m for m in ms.model_id if m != default_model(ms))
    row = queries.model_row(warehouse, other)
    layer, head = int(row["analysed_layers"][0]), 0                     # not the pickers' default (the last head)
    name = f"L{layer}.H{head}"
    want = {"model": [other], "layer": [str(layer)], "head": [str(head)]}
    tab.goto(f"{server}/{nav.URLS[nav.HEAD]}?model={other}&layer={layer}&head={head}")

    def check(where: str) -> None:
        wait_done(tab, "Head", tuple(EXPECT[nav.HEAD]))
        assert_no_exception(tab, where)
        tab.locator("h2", has_text=f"{name} of {other}").first.wait_for(timeout=PAGE_TIMEOUT_MS)
        assert tab.get_by_role("combobox", name="Model", exact=True).input_value().startswith(other + " "), where
        assert tab.get_by_role("combobox", name="Head", exact=True).input_value().startswith(name + " "), where
        tab.wait_for_function(f"() => window.location.search.includes('layer={layer}')", timeout=PAGE_TIMEOUT_MS)
        assert parse_qs(urlparse(tab.url).query) == want, (where, tab.url)

    check("head permalink")
    tab.reload()
    check("head permalink after reload")
    tab.locator('[data-testid="stSidebarNav"] a', has_text="Metrics").click()
    wait_done(tab, "Metrics", tuple(EXPECT[nav.METRICS]))
    tab.locator('[data-testid="stSidebarNav"] a[href$="/head"]').click()
    check("head page after a sidebar switch")
    shot = whole_page_screenshot(tab, "head.png")
    assert shot.stat().st_size > 10_000


def test_neuron_permalink_survives_reload_and_page_switch(server, tab, warehouse):
    """Open /neuron?model=&layer=&neuron= for a model that is not the default and a neuron that is not
    the picker's default (0), reload, switch page and come back: the same neuron each time, and the
    URL still names it. Saves neuron.png beside the other screenshots."""
    from urllib.parse import parse_qs, urlparse
    ms = queries.models(warehouse)
    other = next(m for m in ms.model_id if m != default_model(ms))
    layers = queries.neuron_layers(warehouse, other)
    assert len(layers), f"{other} has no analysed MLP layer"
    layer, n_neurons = int(layers.layer.iloc[0]), int(layers.n_neurons.iloc[0])
    neuron = n_neurons - 1
    name = f"L{layer}.N{neuron}"
    want = {"model": [other], "layer": [str(layer)], "neuron": [str(neuron)]}
    tab.goto(f"{server}/{nav.URLS[nav.NEURON]}?model={other}&layer={layer}&neuron={neuron}")

    def check(where: str) -> None:
        wait_done(tab, nav.TITLES[nav.NEURON], tuple(EXPECT[nav.NEURON]))
        assert_no_exception(tab, where)
        tab.locator("h2", has_text=name).first.wait_for(timeout=PAGE_TIMEOUT_MS)
        assert tab.get_by_role("combobox", name="Model", exact=True).input_value().startswith(other + " "), where
        assert tab.get_by_role("spinbutton", name=re.compile("^Neuron")).input_value() == str(neuron), where
        tab.wait_for_function(f"() => window.location.search.includes('neuron={neuron}')", timeout=PAGE_TIMEOUT_MS)
        assert parse_qs(urlparse(tab.url).query) == want, (where, tab.url)

    check("neuron permalink")
    tab.reload()
    check("neuron permalink after reload")
    tab.locator('[data-testid="stSidebarNav"] a', has_text="Metrics").click()
    wait_done(tab, "Metrics", tuple(EXPECT[nav.METRICS]))
    tab.locator('[data-testid="stSidebarNav"] a[href$="/neuron"]').click()
    check("neuron page after a sidebar switch")
    shot = whole_page_screenshot(tab, "neuron.png")
    assert shot.stat().st_size > 10_000


def test_match_page_keeps_its_link_through_a_reload_and_links_heads(server, tab, warehouse):
    """Open /head-match?model=&image=&text= for a model that is not the default, reload: the same model,
    image and text, the sum check, and links to head pages; one of them opens that head's page.
    Saves match.png beside the other screenshots."""
    from urllib.parse import parse_qs, urlencode, urlparse
    ms = queries.models(warehouse)
    other = next(m for m in ms.model_id if m != default_model(ms))
    ims = list(queries.images(warehouse, other).image_id)
    image_id = "skimage/astronaut" if "skimage/astronaut" in ims else ims[-1]    # not the picker's default
    text = "there is a red shape"
    want = {"model": [other], "image": [image_id], "text": [text]}
    tab.goto(f"{server}/{nav.URLS[nav.MATCH]}?{urlencode({'model': other, 'image': image_id, 'text': text})}")

    def check(where: str) -> None:
        wait_done(tab, nav.TITLES[nav.MATCH], tuple(EXPECT[nav.MATCH]))
        assert_no_exception(tab, where)
        assert tab.get_by_role("combobox", name="Model", exact=True).input_value().startswith(other + " "), where
        assert tab.get_by_role("combobox", name="Warehouse image", exact=True).input_value().startswith(image_id), where
        assert tab.locator('[data-testid="stTextInputField"][aria-label="Text"]').input_value() == text, where
        assert "sum of the bars" in tab.locator('[data-testid="stAlertContentSuccess"]').first.inner_text(), where
        tab.wait_for_function("() => window.location.search.includes('image=')", timeout=PAGE_TIMEOUT_MS)
        assert parse_qs(urlparse(tab.url).query) == want, (where, tab.url)

    check("match page from its link")
    tab.reload()
    check("match page after reload")
    shot = whole_page_screenshot(tab, "match.png")
    assert shot.stat().st_size > 10_000
    links = tab.locator('[data-testid="stMain"] a[href*="head?model="]')
    assert links.count() >= 3
    name = re.search(r"L\d+\.H\d+", links.first.inner_text()).group(0)
    links.first.click()
    wait_done(tab, "Head", tuple(EXPECT[nav.HEAD]))
    assert_no_exception(tab, "head page from the match page")
    tab.locator("h2", has_text=f"{name} of {other}").first.wait_for(timeout=PAGE_TIMEOUT_MS)


def test_a_click_on_an_atlas_grid_cell_opens_that_heads_page(server, tab, warehouse):
    """The Atlas grid is an Altair chart with a point selection: clicking an analysed head's cell opens
    /head?model=&layer=&head= on that head."""
    from urllib.parse import parse_qs, urlparse
    ms = queries.models(warehouse)
    model_id = default_model(ms)
    row = queries.model_row(warehouse, model_id)
    layer, head = int(row["analysed_layers"][0]), 0                       # not the pickers' default
    name = f"L{layer}.H{head}"
    tab.goto(url_of(server, nav.ATLAS))
    wait_done(tab, "CLIP Atlas", tuple(EXPECT[nav.ATLAS]))
    cell = tab.locator(f'[data-testid="stVegaLiteChart"] [aria-roledescription="rect mark"][aria-label*="head_name: {name};"]')
    assert cell.count() == 1, cell.count()
    cell.first.click(position={"x": 8, "y": 6})                           # a corner: the label is drawn in the middle
    tab.locator("h2", has_text=f"{name} of {model_id}").first.wait_for(timeout=PAGE_TIMEOUT_MS)
    wait_done(tab, "Head", tuple(EXPECT[nav.HEAD]))
    assert_no_exception(tab, "head page from an Atlas grid click")
    tab.wait_for_function(f"() => window.location.search.includes('layer={layer}')", timeout=PAGE_TIMEOUT_MS)
    assert parse_qs(urlparse(tab.url).query) == {"model": [model_id], "layer": [str(layer)], "head": [str(head)]}


@pytest.mark.parametrize("path", [p for p, *_ in nav.PAGES])
def test_a_bad_permalink_says_what_exists_on_every_page(server, tab, warehouse, path):
    """A link to a model the warehouse does not hold: the page says what was asked and what exists, links
    the nearest valid page, keeps the asked URL, and shows no other model's content."""
    from urllib.parse import parse_qs, urlparse
    ids = list(queries.models(warehouse).model_id)
    asked = ids[0] + "-gone"
    tab.goto(url_of(server, path) + f"?model={asked}")
    wait_done(tab, title_of(path))
    assert_no_exception(tab, path)
    alert = tab.locator('[data-testid="stAlertContentError"]')
    assert alert.count() == 1 and f"the model '{asked}'" in alert.inner_text(), path
    exists = tab.get_by_text("What exists:")
    assert exists.count() == 1 and all(m in exists.locator("xpath=..").inner_text() for m in ids)
    link = tab.get_by_role("link", name=re.compile("Open the nearest valid page"))
    assert parse_qs(urlparse(link.get_attribute("href")).query) == {"model": [ids[0]]}
    assert parse_qs(urlparse(tab.url).query) == {"model": [asked]}
    for selector in ('[data-testid="stVegaLiteChart"]', '[data-testid="stDataFrame"]', '[data-testid="stImage"]',
                     '[data-testid="stMetric"]'):
        assert tab.locator(selector).count() == 0, (path, selector)
    link.click()
    wait_done(tab, title_of(path))
    assert tab.locator('[data-testid="stAlertContentError"]').count() == 0
    assert tab.get_by_role("combobox", name="Model", exact=True).input_value().startswith(ids[0] + " ")


# last in the file: the server has served every test above
FALSE_ALARMS = ("warning", "initialized randomly", "no runtime found", "traceback", "error")


def test_the_server_log_holds_no_warning_after_every_page(server):
    """Issue 22: no false warnings. Every test above ran against this server (pages, uploads, bad links);
    its log holds the start banner and nothing that reads as a warning or an error."""
    lines = [l for l in SERVER_LOG["path"].read_text(errors="replace").splitlines() if l.strip()]
    assert any("You can now view your Streamlit app" in l for l in lines)
    alarms = [l for l in lines if any(w in l.lower() for w in FALSE_ALARMS)]
    assert alarms == [], "\n".join(alarms[:20])
