"""Nobody gets in by accident: the dashboard binds locally, refuses a network address without a
token, and with a token shows nothing before the token is entered."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dashboard import access

ROOT = Path(__file__).resolve().parents[2]
APP = str(ROOT / "dashboard" / "app.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("address,local", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                           ("127.8.9.1", True), ("[::1]", True), ("0.0.0.0", False),
                                           ("::", False), ("192.168.1.5", False), ("my-host.lan", False)])
def test_local_addresses(address, local):
    assert access.is_local(address) is local


def test_network_address_needs_a_token(monkeypatch):
    monkeypatch.delenv("ATLAS_TOKEN", raising=False)
    assert access.start_refusal("127.0.0.1") is None
    assert "ATLAS_TOKEN" in access.start_refusal("0.0.0.0")
    monkeypatch.setenv("ATLAS_TOKEN", "s3cret-token-value")
    assert access.start_refusal("0.0.0.0") is None


def test_tokens_compare_exactly_and_wrong_ones_are_rate_limited(monkeypatch):
    assert access.check_token("abc", "abc") and not access.check_token("abd", "abc")
    assert not access.check_token("ab", "abc") and not access.check_token("ÄBC", "abc")
    assert [access.session_wait(n) for n in range(1, 6)] == [0, 1, 2, 4, 8] and access.session_wait(40) == 60
    monkeypatch.setattr(access, "_failures", [])
    for i in range(access.MAX_FAILURES):
        assert access.process_locked(now=100.0 + i) == 0.0
        access.record_failure(now=100.0 + i)
    assert access.process_locked(now=120.0) == pytest.approx(40.0)      # the first failure ages out at 160
    assert access.process_locked(now=161.0) == 0.0


def test_server_on_a_network_address_without_a_token_refuses_to_start():
    env = {k: v for k, v in os.environ.items() if k != "ATLAS_TOKEN"}
    port = _free_port()
    r = subprocess.run([sys.executable, "-m", "dashboard", "--host", "0.0.0.0", "--port", str(port)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: refusing to serve the dashboard on 0.0.0.0")
    with socket.socket() as s:                                   # and nothing listens on the port
        assert s.connect_ex(("127.0.0.1", port)) != 0


def _apptest(monkeypatch, tmp_path, address="0.0.0.0", token=None):
    from streamlit import config
    from streamlit.testing.v1 import AppTest
    if token is None:
        monkeypatch.delenv("ATLAS_TOKEN", raising=False)
    else:
        monkeypatch.setenv("ATLAS_TOKEN", token)
    monkeypatch.setenv("ATLAS_WAREHOUSE", str(tmp_path / "none.duckdb"))
    old = config.get_option("server.address")
    config.set_option("server.address", address)
    monkeypatch.setattr(access, "_failures", [])
    at = AppTest.from_file(APP, default_timeout=120)
    return at, lambda: config.set_option("server.address", old)


def _page_text(at) -> str:
    return " ".join(str(e.value) for kind in ("markdown", "caption", "info", "error", "title", "header", "subheader")
                    for e in getattr(at, kind))


def test_bare_streamlit_run_on_a_network_address_shows_only_the_refusal(monkeypatch, tmp_path):
    at, restore = _apptest(monkeypatch, tmp_path)
    try:
        at.run()
        assert not at.exception
        assert [e.value for e in at.error][0].startswith("refusing to serve the dashboard on 0.0.0.0")
        assert len(at.text_input) == 0 and len(at.selectbox) == 0 and len(at.dataframe) == 0
    finally:
        restore()


def test_with_a_token_no_page_content_before_the_token(monkeypatch, tmp_path):
    token = "correct-horse-battery-staple"
    at, restore = _apptest(monkeypatch, tmp_path, token=token)
    try:
        at.run()
        assert not at.exception
        assert [t.label for t in at.text_input] == ["Access token"]
        assert len(at.selectbox) == 0 and len(at.dataframe) == 0 and "Every attention head" not in _page_text(at)
        at.text_input[0].input("wrong-token").run()
        assert "Wrong token." in [e.value for e in at.error]
        assert len(at.selectbox) == 0 and "Every attention head" not in _page_text(at)
        at.text_input[0].input(token).run()
        assert not at.exception
        assert len(at.text_input) == 0 or at.text_input[0].label != "Access token"
        assert "Every attention head" in _page_text(at)   # the (empty) Atlas page now renders
    finally:
        restore()
