"""The access guard in front of every HTTP path of the dashboard (an ASGI middleware of ``st.App``).

app.py serves ``st.App(..., middleware=[Middleware(AccessGuard)], lifespan=lifespan)``, so
``streamlit run dashboard/app.py`` (from any directory) and ``python -m dashboard`` both run it:

* :func:`lifespan` runs after the server socket is bound and before the first request is served.
  It reads this process's listening sockets (dashboard.access.listening_addresses) and ends the
  process with one ``error:`` line (exit 2) when one is reachable from other machines without
  ``$ATLAS_TOKEN`` (or the token is too short). Otherwise it marks the guard active for the
  Streamlit script's own gate.
* :class:`AccessGuard` looks at every HTTP request and websocket handshake. Without a token it
  serves connections that arrived on a loopback address only. With a token it serves only a
  request that carries the access cookie (an HMAC of the token): pages, ``/_stcore/stream``,
  ``/_stcore/health`` and ``/_stcore/metrics``, ``/media/*``, ``/_stcore/upload_file/*``, static
  files and the console's downloads alike. Anything else gets the login form (GET) or 401; a
  websocket is closed before it is accepted (403). The form posts to ``/_atlas/login``; a right
  token sets the cookie (HttpOnly, SameSite=Strict, Secure under TLS) and redirects back; wrong
  tokens are throttled per client address (dashboard.access.THROTTLE).
"""
from __future__ import annotations

import html
import os
import sys
import urllib.parse
from contextlib import asynccontextmanager

from dashboard import access

LOGIN = "_atlas/login"
MAX_FORM_BYTES = 4096


def base_path() -> str:
    """``/`` or ``/<server.baseUrlPath>/``."""
    try:
        from streamlit import config
        base = (config.get_option("server.baseUrlPath") or "").strip("/")
    except Exception:  # noqa: BLE001
        base = ""
    return f"/{base}/" if base else "/"


def refuse_and_exit(message: str) -> None:
    """One ``error:`` line on stderr, then exit 2 at once (nothing is served)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(2)


@asynccontextmanager
async def lifespan(_app):
    """st.App lifespan: refuse to serve from the sockets really bound, else mark the guard active."""
    refusal = access.start_refusal(access.listening_addresses(), guarded=True)
    if refusal:
        refuse_and_exit(refusal)
    access.GUARD.active = True
    try:
        yield
    finally:
        access.GUARD.active = False


def _page(message: str, next_path: str, status_note: str = "") -> bytes:
    """The login form: fixed text, no script, no external resource; ``next_path`` escaped."""
    login = html.escape(base_path() + LOGIN, quote=True)
    note = f'<p class="note">{html.escape(status_note)}</p>' if status_note else ""
    return (
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        "<meta name=\"referrer\" content=\"no-referrer\"><title>CLIP Atlas: access token</title>"
        "<style>body{font-family:sans-serif;max-width:32rem;margin:4rem auto;padding:0 1rem;color:#222}"
        "input{font-size:1rem;padding:.4rem;width:100%;box-sizing:border-box;margin:.5rem 0}"
        "button{font-size:1rem;padding:.4rem 1rem}.note{color:#b00020}</style></head><body>"
        f"<h1>CLIP Atlas</h1><p>{html.escape(message)}</p>{note}"
        f"<form method=\"post\" action=\"{login}\">"
        "<label for=\"token\">Access token</label>"
        "<input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"current-password\" autofocus>"
        f"<input type=\"hidden\" name=\"next\" value=\"{html.escape(next_path, quote=True)}\">"
        "<button type=\"submit\">Open</button></form></body></html>").encode("utf-8")


_ASK = "This dashboard is shared with an access token. Ask whoever runs it for the token."
_HEADERS = [(b"cache-control", b"no-store"), (b"x-frame-options", b"DENY"),
            (b"content-security-policy", b"default-src 'none'; style-src 'unsafe-inline'; form-action 'self'")]


async def _send(send, status: int, body: bytes, content_type: bytes = b"text/html; charset=utf-8",
                headers: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                            *_HEADERS, *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def _cookies(scope) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in scope.get("headers") or []:
        if name.lower() == b"cookie":
            for part in value.decode("latin-1").split(";"):
                k, _, v = part.strip().partition("=")
                out.setdefault(k, v)
    return out


def _safe_next(value: str | None) -> str:
    """A local path to go back to after the login (never another site: no scheme, no //host)."""
    base = base_path()
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value \
            or any(ord(c) < 32 for c in value) or value.rstrip("/") + "/" == base + LOGIN + "/":
        return base
    return value


def _client(scope) -> str | None:
    client = scope.get("client")
    return str(client[0]) if client else None


class AccessGuard:
    """ASGI middleware: every HTTP request and websocket handshake passes the access check first."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        token = access.configured_token()
        if token is None or access.token_problem():
            server = scope.get("server")
            if token is None and server and access.is_loopback(str(server[0])):
                await self.app(scope, receive, send)           # no token: this machine only
                return
            await self._deny(scope, send, 403, b"CLIP Atlas serves this machine only: no access token is set.\n")
            return
        if scope["type"] == "http" and scope["path"] == base_path() + LOGIN:
            await self._login(scope, receive, send, token)
            return
        if access.cookie_ok(_cookies(scope).get(access.COOKIE), token):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "http" and scope.get("method") in ("GET", "HEAD"):
            path = scope.get("raw_path") or scope["path"].encode()
            query = scope.get("query_string") or b""
            target = path.decode("latin-1") + (("?" + query.decode("latin-1")) if query else "")
            await _send(send, 401, _page(_ASK, _safe_next(target)))
            return
        await self._deny(scope, send, 401, b"CLIP Atlas: access token required.\n")

    async def _deny(self, scope, send, status: int, body: bytes) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})   # before accept: the handshake gets 403
            return
        await _send(send, status, body, b"text/plain; charset=utf-8")

    async def _login(self, scope, receive, send, token: str) -> None:
        if scope.get("method") != "POST":
            await _send(send, 200, _page(_ASK, base_path()))
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_FORM_BYTES:
                await _send(send, 413, b"The login form is at most 4 KB.\n", b"text/plain; charset=utf-8")
                return
        form = urllib.parse.parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        given = (form.get("token") or [""])[0]
        target = _safe_next((form.get("next") or [""])[0])
        client = _client(scope)
        wait = access.THROTTLE.wait(client)
        if wait > 0:
            await _send(send, 429, _page(_ASK, target, f"Too many wrong tokens from your address: try again in "
                                                       f"{wait:.0f} s."), headers=[(b"retry-after", str(int(wait) + 1).encode())])
            return
        if not given or not access.check_token(given, token):
            if given:
                access.THROTTLE.failed(client)
            await _send(send, 401, _page(_ASK, target, "Wrong token." if given else "Enter the token."))
            return
        access.THROTTLE.succeeded(client)
        secure = "; Secure" if _tls() else ""
        cookie = (f"{access.COOKIE}={access.cookie_value(token)}; Path={base_path()}; HttpOnly; "
                  f"SameSite=Strict{secure}")
        await _send(send, 303, b"", b"text/plain; charset=utf-8",
                    headers=[(b"location", target.encode("latin-1", "replace")), (b"set-cookie", cookie.encode())])


def _tls() -> bool:
    try:
        from streamlit import config
        return bool(config.get_option("server.sslCertFile"))
    except Exception:  # noqa: BLE001
        return False
