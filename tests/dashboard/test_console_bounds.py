"""Break 2 of issue 21, reproduced against a real server: one console query used to take the
dashboard process down. `SELECT list_resize([[1::TINYINT]], 3000, [1::TINYINT]) AS l FROM
range(10000)` stayed inside the worker's caps but the Streamlit process peaked at 4.1 GB and
`/_stcore/health` stalled for up to 58 s; `SELECT vec FROM head_embeddings` on a d = 768 model
rendered in 77 s and its CSV took 91 s.

Here `streamlit run dashboard/app.py` serves a warehouse with 12,000 head vectors of d = 768; a
real browser (the system chromium) runs both queries on the SQL console page, then both results
are downloaded whole through their links, while a sampler reads the server process's RSS
(/proc/<pid>/status) and asks `/_stcore/health` every 0.25 s. The server must stay within
+300 MB of its RSS after the page's first render, health must answer within 1 s every time, and
the downloads must hold every row (written by a console worker, streamed by the server).
"""
from __future__ import annotations

import csv
import io
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
MODEL = "wide/d768"
D, IMAGES, HEADS = 768, 1000, 12
BOMB = "SELECT list_resize([[1::TINYINT]], 3000, [1::TINYINT]) AS l FROM range(10000)"
VEC = "SELECT vec FROM head_embeddings"
RSS_BUDGET = 300 * 2**20
HEALTH_S = 1.0

pytestmark = [pytest.mark.slow, pytest.mark.browser]


@pytest.fixture(scope="module")
def wide_warehouse(tmp_path_factory) -> Path:
    """One model of d = 768 with 1,000 images x 12 heads of one layer: 12,000 head vectors (37 MB)."""
    from warehouse import writer, writes
    p = tmp_path_factory.mktemp("wide") / "w.duckdb"
    rng = np.random.default_rng(0)
    ids = [f"wide/{i}" for i in range(IMAGES)]
    with writer(p) as con:
        con.execute("""INSERT INTO models (model_id, arch, source, layers, heads, width, embed_dim, patch_size,
                       image_size, pooling, analysed_layers) VALUES (?, 'ViT-B-16', 'random', 12, 12, 768, ?, 16,
                       224, 'tok', [11])""", [MODEL, D])
        con.executemany("INSERT INTO images (image_id, dataset_id, label) VALUES (?, 'wide', 'x')", [[i] for i in ids])
        for start in range(0, IMAGES, 250):
            heads = rng.normal(size=(250, 1, HEADS, D)).astype(np.float32)
            writes.insert_head_embeddings(con, MODEL, ids[start:start + 250], [11], heads, new=True)
    return p


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _settled_rss(pid: int, within: float = 180.0) -> int:
    """The server's RSS once its start-up work is over: the app's first run starts a background warm-up
    (dashboard/warm.py: torch, open_clip and the default model, several hundred MB) that must not be
    counted as the console's growth. Settled: under 8 MB of change over 4 s."""
    deadline = time.monotonic() + within
    last = _rss(pid)
    while time.monotonic() < deadline:
        time.sleep(4)
        now = _rss(pid)
        if abs(now - last) < 8 * 2**20:
            return now
        last = now
    raise AssertionError(f"the server's memory did not settle within {within:.0f} s")


class Sampler(threading.Thread):
    """The server's RSS and /_stcore/health's answer time, every 0.25 s."""

    def __init__(self, pid: int, base: str) -> None:
        super().__init__(daemon=True)
        self.pid, self.base = pid, base
        self.rss: list[int] = []
        self.health: list[float] = []
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.rss.append(_rss(self.pid))
            t0 = time.monotonic()
            try:
                ok = urllib.request.urlopen(f"{self.base}/_stcore/health", timeout=5).read() == b"ok"
                if not ok:
                    self.failures.append("health did not say ok")
            except OSError as exc:
                self.failures.append(f"health: {exc}")
            self.health.append(time.monotonic() - t0)
            self.stop.wait(0.25)


@pytest.fixture(scope="module")
def server(tmp_path_factory, wide_warehouse):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("bounds_log") / "streamlit.log"
    env = {k: v for k, v in os.environ.items() if k != "ATLAS_TOKEN"}
    env["ATLAS_WAREHOUSE"] = str(wide_warehouse)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "dashboard/app.py", "--server.port",
                                 str(port), "--server.address", "127.0.0.1"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if urllib.request.urlopen(f"{base}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"streamlit did not start: {log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield proc, base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


LINK = '[data-testid="stLinkButton"] a'


def _run_query(page, sql: str) -> str:
    """Run ``sql`` on the console page; returns its download link once its result is drawn (each
    result registers a new link)."""
    old = page.locator(LINK).first.get_attribute("href")
    page.locator('textarea[aria-label="SQL"]').fill(sql)
    page.get_by_role("button", name="Run").click()
    page.wait_for_function("old => { const a = document.querySelector('[data-testid=\"stLinkButton\"] a'); "
                           "return (a && a.getAttribute('href') !== old) || "
                           "document.querySelector('[data-testid=\"stAlertContentError\"]'); }",
                           arg=old, timeout=180_000)
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=180_000)
    errors = [e.inner_text() for e in page.locator('[data-testid="stAlertContentError"]').all()]
    assert not errors, errors
    return page.locator(LINK).first.get_attribute("href")


def _download(base: str, href: str) -> tuple[int, list[str], int]:
    """(bytes, header row, data rows) of a streamed download, read in 1 MiB pieces."""
    with urllib.request.urlopen(base + href, timeout=180) as r:
        length = int(r.headers["content-length"])
        first, n, rows = b"", 0, 0
        while True:
            chunk = r.read(1 << 20)
            if not chunk:
                break
            if not first:
                first = chunk[:20_000]
            n += len(chunk)
            rows += chunk.count(b"\n")
    assert n == length
    header = next(csv.reader(io.StringIO(first.decode(errors="ignore").split("\n", 1)[0])))
    return n, header, rows - 1


def test_console_bombs_leave_the_dashboard_process_bounded_and_healthy(server):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install -y chromium`")
    from playwright.sync_api import sync_playwright
    proc, base = server
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_context(viewport={"width": 1400, "height": 1600}).new_page()
        page.goto(f"{base}/sql-console")
        page.locator("h1", has_text="SQL console").first.wait_for(timeout=180_000)
        page.wait_for_selector('[data-testid="stDataFrame"]', timeout=180_000)   # the first example ran
        baseline = _settled_rss(proc.pid)
        sampler = Sampler(proc.pid, base)
        sampler.start()
        try:
            shown = {}
            for name, sql in (("bomb", BOMB), ("vec", VEC)):
                t0 = time.monotonic()
                link = _run_query(page, sql)
                assert not page.locator('[data-testid="stException"]').count()
                caption = page.locator('[data-testid="stCaptionContainer"]', has_text=" rows").last.inner_text()
                shown[name] = (time.monotonic() - t0, caption, link)
            downloads = {name: _download(base, link) for name, (_, _, link) in shown.items()}
        finally:
            sampler.stop.set()
            sampler.join()
            browser.close()
    peak = max(sampler.rss) - baseline
    print(f"\nbaseline RSS {baseline / 2**20:.0f} MB, peak +{peak / 2**20:.0f} MB; health max "
          f"{max(sampler.health):.3f} s over {len(sampler.health)} probes; shown: "
          f"{ {k: (round(v[0], 1), v[1]) for k, v in shown.items()} }; downloads: "
          f"{ {k: (v[0], v[2]) for k, v in downloads.items()} }")
    assert sampler.failures == []
    assert peak < RSS_BUDGET, f"the server grew by {peak / 2**20:.0f} MB"
    assert max(sampler.health) < HEALTH_S, f"health took {max(sampler.health):.2f} s"
    assert shown["bomb"][1].startswith("10,000 rows") and shown["vec"][1].startswith("10,000 rows")
    n, header, rows = downloads["bomb"]
    assert header == ["l"] and rows == 10_000 and n > 10_000 * 3000 * 3     # every list whole: [[1], [1], ...]
    n, header, rows = downloads["vec"]
    assert header == ["vec"] and rows == IMAGES * HEADS                       # every row, not the 10,000 shown
