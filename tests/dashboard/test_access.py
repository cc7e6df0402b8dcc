"""Nobody gets in by accident: the dashboard binds locally, decides from the sockets it really binds,
refuses to serve beyond this machine without a token (whatever the entry point and working
directory), and with a token answers on no HTTP path (pages, websocket, /_stcore/*, /media/*,
uploads) before the token was entered. Wrong tokens are throttled per client, never globally.

The server tests start real servers (`python -m dashboard`, `streamlit run dashboard/app.py` from
another directory) and connect to this machine's non-loopback address when it has one; they also
read what was bound from /proc/net/tcp{,6}.
"""
from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from dashboard import access

ROOT = Path(__file__).resolve().parents[2]
APP = str(ROOT / "dashboard" / "app.py")
TOKEN = "correct-horse-battery-staple"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lan_address() -> str | None:
    """This machine's address on its default route (no packet is sent), or None."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.255", 9))
        ip = s.getsockname()[0]
    except OSError:
        return None
    finally:
        s.close()
    return None if access.is_loopback(ip) or ip == "0.0.0.0" else ip


LAN = _lan_address()


def _bound(port: int) -> list[str]:
    """Local addresses of every listening TCP socket on ``port`` on this machine (/proc/net/tcp{,6})."""
    out = []
    for name, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            addr, p = f[1].split(":")
            if f[3] != "0A" or int(p, 16) != port:          # 0A: LISTEN
                continue
            raw = bytes.fromhex(addr)
            words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))   # /proc: host-order words
            out.append(socket.inet_ntop(socket.AF_INET if width == 8 else socket.AF_INET6, words))
    return out


def _env(token: str | None = None, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "ATLAS_TOKEN" and not k.startswith("STREAMLIT_")}
    if token:
        env["ATLAS_TOKEN"] = token
    env.update(extra)
    return env


def _http(host: str, port: int, method: str = "GET", path: str = "/", body: bytes | None = None,
          headers: dict | None = None, source: str | None = None, timeout: float = 5.0):
    conn = http.client.HTTPConnection(host, port, timeout=timeout,
                                      source_address=(source, 0) if source else None)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict((k.lower(), v) for k, v in r.getheaders()), r.read()
    finally:
        conn.close()


# --------------------------------------------------------------------------- addresses and the refusal

@pytest.mark.parametrize("address,local", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                           ("127.8.9.1", True), ("[::1]", True), ("::ffff:127.0.0.1", True),
                                           ("0.0.0.0", False), ("::", False), ("", False), (None, False),
                                           ("  ", False), ("192.168.1.5", False), ("my-host.invalid", False)])
def test_local_addresses(address, local):
    assert access.is_local(address) is local


def test_the_empty_host_binds_every_interface():
    """Break 1: `--host ""` was taken for local. A bind resolves it to the wildcard."""
    assert set(access.bind_addresses("")) & {"0.0.0.0", "::"}
    assert access.exposed(access.bind_addresses("")) and access.exposed(access.bind_addresses(None))
    assert access.exposed(["127.0.0.1", "::1", "192.0.2.7"]) == ["192.0.2.7"]


def test_network_address_needs_a_token(monkeypatch):
    monkeypatch.delenv("ATLAS_TOKEN", raising=False)
    assert access.start_refusal("127.0.0.1") is None
    for host in ("0.0.0.0", "", None, "::"):
        assert "no access token is set" in access.start_refusal(host), host
    assert access.start_refusal(["127.0.0.1", "::"]).startswith("refusing to serve the dashboard on [::]:")
    monkeypatch.setenv("ATLAS_TOKEN", "s3cret-token-value")
    assert access.start_refusal("0.0.0.0") is None and access.start_refusal("") is None
    assert "does not check the access token on every HTTP path" in access.start_refusal("0.0.0.0", guarded=False)
    monkeypatch.setenv("ATLAS_TOKEN", "short")
    assert access.start_refusal("127.0.0.1").startswith("refusing to serve the dashboard: ATLAS_TOKEN is 5 "
                                                        "characters long; use at least 16")


def test_listening_addresses_are_read_from_the_sockets():
    """What the process really listens on, whatever string it was given: a socket bound to "" is
    the wildcard; a bound socket that does not listen is not a listener."""
    with socket.socket() as wild, socket.socket() as local, socket.socket() as idle:
        wild.bind(("", 0))
        wild.listen()
        local.bind(("127.0.0.1", 0))
        local.listen()
        idle.bind(("127.0.0.1", 0))
        found = access.listening_addresses()
        assert "0.0.0.0" in found and "127.0.0.1" in found
        assert access.exposed(found) == ["0.0.0.0"]
    assert "0.0.0.0" not in access.listening_addresses()


# --------------------------------------------------------------------------- tokens and throttling

def test_tokens_compare_exactly_and_cookies_are_not_the_token():
    assert access.check_token("abc", "abc") and not access.check_token("abd", "abc")
    assert not access.check_token("ab", "abc") and not access.check_token("ÄBC", "abc")
    value = access.cookie_value(TOKEN)
    assert TOKEN not in value and len(value) == 64
    assert access.cookie_ok(value, TOKEN) and not access.cookie_ok(value, TOKEN + "x")
    assert not access.cookie_ok(None, TOKEN) and not access.cookie_ok("", TOKEN) and not access.cookie_ok(value, None)


def test_wrong_tokens_are_throttled_per_client_never_globally():
    """Break 9: 21 wrong tokens from 21 fresh sessions locked the owner out for 53 s. Now each
    client waits for its own wrong tokens only: 0, 1, 2, 4, ... at most 60 s."""
    assert [access.session_wait(n) for n in range(1, 6)] == [0, 1, 2, 4, 8] and access.session_wait(40) == 60
    t = access.Throttle()
    waits = [t.failed("203.0.113.9", now=100.0 + i * 0.3) for i in range(25)]     # an attacker, 25 tries in 7.5 s
    assert waits[:4] == [0, 1, 2, 4] and waits[-1] == 60
    assert t.wait("203.0.113.9", now=108.0) == pytest.approx(60 - (108.0 - 107.2))
    assert t.wait("198.51.100.4", now=108.0) == 0.0                              # the owner: not slowed
    assert t.wait("2001:db8::1", now=108.0) == 0.0
    for i in range(3):                                                            # IPv6: one /64, one client
        t.failed(f"2001:db8::{i + 1}", now=110.0)
    assert t.wait("2001:db8::ffff", now=110.0) == 2.0 and t.wait("2001:db8:0:1::1", now=110.0) == 0.0
    t.succeeded("203.0.113.9")
    assert t.wait("203.0.113.9", now=110.0) == 0.0
    t.failed("192.0.2.1", now=0.0)
    t.failed("192.0.2.1", now=0.0)
    t.failed("192.0.2.1", now=0.0)
    assert t.failed("192.0.2.1", now=10_000.0) == 0.0                            # forgotten after an hour


def test_the_throttle_remembers_a_bounded_number_of_clients(monkeypatch):
    t = access.Throttle()
    monkeypatch.setattr(access.Throttle, "MAX_CLIENTS", 50)
    for i in range(200):
        for _ in range(3):
            t.failed(f"10.0.{i // 256}.{i % 256}", now=1.0)
    assert len(t._clients) == 50
    assert t.wait("10.0.0.199", now=1.0) == 2.0 and t.wait("10.0.0.0", now=1.0) == 0.0


# --------------------------------------------------------------------------- real servers

def test_python_m_dashboard_with_an_empty_host_refuses_to_start():
    """Break 1: `python -m dashboard --host ""` bound 0.0.0.0 and served every page without a token."""
    port = _free_port()
    r = subprocess.run([sys.executable, "-m", "dashboard", "--host", "", "--port", str(port)],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith('error: refusing to serve the dashboard on 0.0.0.0')
    assert _bound(port) == []
    for host in ("127.0.0.1", LAN):
        if host:
            with socket.socket() as s:
                assert s.connect_ex((host, port)) != 0


def test_server_on_a_network_address_without_a_token_refuses_to_start():
    port = _free_port()
    r = subprocess.run([sys.executable, "-m", "dashboard", "--host", "0.0.0.0", "--port", str(port)],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: refusing to serve the dashboard on 0.0.0.0")
    assert _bound(port) == []


def _start(args: list[str], cwd, env, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "streamlit", "run", APP, *args], cwd=cwd, env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def _wait_listening(proc, port: int, log: Path, host: str = "127.0.0.1", token: str | None = None) -> None:
    deadline = time.monotonic() + 120
    headers = {"Cookie": f"{access.COOKIE}={access.cookie_value(token)}"} if token else {}
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited ({proc.returncode}): {log.read_text()[-3000:]}")
        try:
            if _http(host, port, path="/_stcore/health", headers=headers, timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    pytest.fail(f"the server did not answer: {log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_streamlit_run_from_another_directory_on_every_interface_never_serves_without_a_token(tmp_path, how):
    """Break 1: `streamlit run dashboard/app.py` from another directory bound *:P with no gate.
    Asked for every interface (flag `--server.address ""` or STREAMLIT_SERVER_ADDRESS=0.0.0.0), it
    now exits 2 with one error line before answering any request, on any address."""
    port = _free_port()
    args = ["--server.port", str(port)] + (["--server.address", ""] if how == "flag" else [])
    env = _env(**({"STREAMLIT_SERVER_ADDRESS": "0.0.0.0"} if how == "env" else {}))
    log = tmp_path / "log.txt"
    proc = _start(args, tmp_path, env, log)
    answers, tries = [], 0
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            for host in ("127.0.0.1", LAN):
                if host:
                    tries += 1
                    try:
                        answers.append((host, _http(host, port, path="/_stcore/health", timeout=1)[0]))
                    except OSError:
                        pass
            time.sleep(0.05)
    finally:
        _stop(proc)
    text = log.read_text()
    assert proc.returncode == 2, text
    assert answers == [] and tries > 0
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: refusing to serve the dashboard on ")
    assert "no access token is set" in errors[0]
    assert _bound(port) == []


def test_streamlit_run_from_another_directory_binds_this_machine_only(tmp_path):
    """Without flags, `streamlit run dashboard/app.py` from any directory reads the config beside
    the entry script: it listens on 127.0.0.1 only, and the machine's other address gets nothing."""
    port = _free_port()
    log = tmp_path / "log.txt"
    proc = _start(["--server.port", str(port)], tmp_path, _env(), log)
    try:
        _wait_listening(proc, port, log)
        assert _bound(port) == ["127.0.0.1"]
        if LAN:
            with socket.socket() as s:
                s.settimeout(2)
                assert s.connect_ex((LAN, port)) != 0
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def token_server(tmp_path_factory):
    """`streamlit run dashboard/app.py --server.address 0.0.0.0` from another directory, with a token."""
    tmp = tmp_path_factory.mktemp("token_server")
    port = _free_port()
    log = tmp / "log.txt"
    proc = _start(["--server.port", str(port), "--server.address", "0.0.0.0"], tmp,
                  _env(TOKEN, ATLAS_WAREHOUSE=str(tmp / "none.duckdb")), log)
    try:
        _wait_listening(proc, port, log, token=TOKEN)
        yield port
    finally:
        _stop(proc)


PATHS = [("GET", "/"), ("GET", "/sql-console"), ("GET", "/_stcore/health"), ("GET", "/_stcore/metrics"),
         ("GET", "/_stcore/host-config"), ("GET", "/media/0123456789abcdef0123456789abcdef01234567.jpg"),
         ("PUT", "/_stcore/upload_file/session/file"), ("GET", "/static/js/index.js"),
         ("GET", "/component/x/index.html"), ("GET", "/_atlas/download/abc.csv")]


def _ws(port: int, host: str = "127.0.0.1", cookie: str | None = None):
    from websockets.sync.client import connect
    headers = {"Cookie": f"{access.COOKIE}={cookie}"} if cookie else None
    return connect(f"ws://{host}:{port}/_stcore/stream", additional_headers=headers, open_timeout=10,
                   subprotocols=["streamlit"], proxy=None)


def test_with_a_token_every_path_needs_it(token_server):
    """Break 12: /_stcore/metrics and /media/<hash>.jpg were served without the token. Every HTTP
    path and the websocket now answer only with the access cookie, on every address."""
    from websockets.exceptions import InvalidStatus
    port = token_server
    assert set(_bound(port)) == {"0.0.0.0"}
    for host in ("127.0.0.1", LAN):
        if not host:
            continue
        for method, path in PATHS:
            status, headers, body = _http(host, port, method, path, body=b"x" if method == "PUT" else None)
            assert status == 401, (host, path, status)
            assert b"ok" != body and b"streamlit" not in body.lower() and b"# HELP" not in body
            if method == "GET":
                assert b'name="token"' in body and headers["cache-control"] == "no-store"
        with pytest.raises(InvalidStatus) as ws_refused:
            _ws(port, host)
        assert ws_refused.value.response.status_code == 403
        with pytest.raises(InvalidStatus):
            _ws(port, host, cookie=access.cookie_value(TOKEN + "-old"))
    cookie = access.cookie_value(TOKEN)
    assert _http("127.0.0.1", port, path="/_stcore/health", headers={"Cookie": f"{access.COOKIE}={cookie}"})[2] == b"ok"
    status, _, body = _http("127.0.0.1", port, path="/_stcore/metrics", headers={"Cookie": f"{access.COOKIE}={cookie}"})
    assert status == 200
    status, _, _ = _http("127.0.0.1", port, path=PATHS[5][1], headers={"Cookie": f"{access.COOKIE}={cookie}"})
    assert status == 404                                  # past the guard: no such media file
    with _ws(port, LAN or "127.0.0.1", cookie=cookie) as ws:
        assert ws.protocol.state.name == "OPEN"


def _login(port: int, token: str, source: str | None = None, host: str = "127.0.0.1", next_path: str = "/head"):
    body = urllib.parse.urlencode({"token": token, "next": next_path}).encode()
    return _http(host, port, "POST", "/_atlas/login", body=body, source=source,
                 headers={"Content-Type": "application/x-www-form-urlencoded"})


def test_the_login_form_sets_the_cookie_and_never_redirects_off_site(token_server):
    port = token_server
    status, headers, body = _login(port, "not-the-token")
    assert status == 401 and b"Wrong token." in body and "set-cookie" not in headers
    status, headers, _ = _login(port, TOKEN, source="127.0.0.3")
    assert status == 303 and headers["location"] == "/head"
    cookie = headers["set-cookie"]
    assert cookie.startswith(f"{access.COOKIE}={access.cookie_value(TOKEN)};")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    for evil in ("//evil.example/x", "http://evil.example/", "/\\evil.example", "/x\r\nSet-Cookie: a=b"):
        status, headers, _ = _login(port, TOKEN, source="127.0.0.3", next_path=evil)
        assert status == 303 and headers["location"] == "/", evil
    status, _, body = _http("127.0.0.1", port, "POST", "/_atlas/login", body=b"token=" + b"x" * 5000)
    assert status == 413


def test_the_login_page_shows_the_requested_path_as_text(token_server):
    """The login form echoes the path it will return to; it is escaped, and the page runs no script."""
    status, headers, body = _http("127.0.0.1", token_server, path='/x"><script>alert(1)</script><img%20src=//evil>')
    assert status == 401 and b"<script" not in body and b"<img" not in body
    assert b"&lt;script&gt;" in body or b"%3Cscript%3E" in body
    assert "default-src 'none'" in headers["content-security-policy"]


def test_an_attackers_wrong_tokens_do_not_lock_the_owner_out(token_server):
    """Break 9 against the real server: 25 wrong tokens from one address (127.0.0.2) in a few
    seconds; that address is then made to wait, while the owner's right token, from another
    address, is taken at once."""
    port = token_server
    statuses = [_login(port, f"guess-{i}", source="127.0.0.2")[0] for i in range(25)]
    assert statuses[0] == 401 and statuses[1] == 401 and 429 in statuses
    status, headers, body = _login(port, TOKEN, source="127.0.0.2")
    assert status == 429 and b"try again in" in body and int(headers["retry-after"]) >= 1
    t0 = time.monotonic()
    owner = LAN or "127.0.0.4"
    status, headers, _ = _login(port, TOKEN, source=owner, host=owner if LAN else "127.0.0.1")
    assert status == 303 and time.monotonic() - t0 < 5


# --------------------------------------------------------------------------- the script's own gate (AppTest)

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
    access.THROTTLE.clear()
    at = AppTest.from_file(APP, default_timeout=120)
    return at, lambda: config.set_option("server.address", old)


def _page_text(at) -> str:
    return " ".join(str(e.value) for kind in ("markdown", "caption", "info", "error", "title", "header", "subheader")
                    for e in getattr(at, kind))


@pytest.mark.parametrize("address", ["0.0.0.0", ""])
def test_bare_streamlit_run_on_a_network_address_shows_only_the_refusal(monkeypatch, tmp_path, address):
    at, restore = _apptest(monkeypatch, tmp_path, address=address)
    try:
        at.run()
        assert not at.exception
        assert [e.value for e in at.error][0].startswith("refusing to serve the dashboard on ")
        assert len(at.text_input) == 0 and len(at.selectbox) == 0 and len(at.dataframe) == 0
    finally:
        restore()


def test_a_listener_beyond_loopback_closes_the_script_without_the_guard(monkeypatch, tmp_path):
    """The script decides from this process's sockets too: a wildcard listener in the process and a
    token, but no HTTP guard (a bare `streamlit run` of another entry file), renders only the refusal."""
    at, restore = _apptest(monkeypatch, tmp_path, address="127.0.0.1", token=TOKEN)
    monkeypatch.setattr(access, "_listening", [])
    monkeypatch.setattr(access, "_scanned_at", float("-inf"))
    try:
        with socket.socket() as wild:
            wild.bind(("0.0.0.0", 0))
            wild.listen()
            at.run()
        assert not at.exception
        assert "does not check the access token on every HTTP path" in at.error[0].value
        assert len(at.text_input) == 0
    finally:
        monkeypatch.setattr(access, "_listening", [])
        monkeypatch.setattr(access, "_scanned_at", float("-inf"))
        restore()


def test_with_a_token_no_page_content_before_the_token(monkeypatch, tmp_path):
    at, restore = _apptest(monkeypatch, tmp_path, address="127.0.0.1", token=TOKEN)
    try:
        at.run()
        assert not at.exception
        assert [t.label for t in at.text_input] == ["Access token"]
        assert len(at.selectbox) == 0 and len(at.dataframe) == 0 and "Every attention head" not in _page_text(at)
        at.text_input[0].input("wrong-token").run()
        assert "Wrong token." in [e.value for e in at.error]
        assert len(at.selectbox) == 0 and "Every attention head" not in _page_text(at)
        at.text_input[0].input(TOKEN).run()
        assert not at.exception
        assert len(at.text_input) == 0 or at.text_input[0].label != "Access token"
        assert "Every attention head" in _page_text(at)   # the (empty) Atlas page now renders
    finally:
        restore()
