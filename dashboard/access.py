"""Who may open the dashboard: this machine by default, a token for anything else.

The decision is made from the sockets the server actually listens on, not from the address string
it was given (``--host ""``, ``0.0.0.0``, ``::``, a LAN address or a host name all bind something
other machines can reach):

* ``python -m dashboard`` resolves ``--host`` the way a bind would (``getaddrinfo`` with
  ``AI_PASSIVE``: ``""`` is the wildcard) and refuses to start before Streamlit does;
* ``streamlit run dashboard/app.py``, from any directory, serves ``app`` (an ``st.App``) whose
  lifespan reads this process's listening sockets (:func:`listening_addresses`) before the first
  request is served and ends the process (exit 2, one ``error:`` line) when one is reachable from
  other machines and ``$ATLAS_TOKEN`` is unset (dashboard/guard.py);
* the Streamlit script checks again at every run (:func:`gate`): a server that listens beyond
  loopback without the HTTP guard (a bare ``streamlit run`` of another entry file) or without a token
  renders only the refusal.

With ``$ATLAS_TOKEN`` set, every HTTP path (pages, the websocket, ``/_stcore/*`` including health and
metrics, ``/media/*``, uploads, downloads) answers only to a browser that holds the access cookie,
which the guard's login form sets after the token was entered (dashboard/guard.py). Tokens are
compared in constant time; wrong tokens are throttled per client address (:class:`Throttle`), never
globally, so a stranger's wrong guesses cannot lock the owner out; a short token is refused at start.

For a team, put the dashboard behind your single sign-on instead (README, "Sharing the dashboard").
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import os
import socket
import stat
import threading
import time

MIN_TOKEN_CHARS = 16
COOKIE = "atlas_access"                      # HttpOnly, SameSite=Strict; an HMAC of the token, not the token
TOKEN_HINT = ("export ATLAS_TOKEN=$(python -c 'import secrets; print(secrets.token_urlsafe(24))')")


# --------------------------------------------------------------------------- addresses

def is_loopback(address: str | None) -> bool:
    """Whether one numeric socket address (``127.0.0.1``, ``::1``, ``::ffff:127.0.0.1``; brackets and
    a ``%zone`` allowed) is a loopback address. Names, wildcards and ``""`` are not."""
    text = (address or "").strip().strip("[]").split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


@functools.lru_cache(maxsize=64)
def bind_addresses(host: str | None) -> tuple[str, ...]:
    """The numeric addresses a TCP server bound to ``host`` listens on, as a bind resolves them
    (``getaddrinfo`` with ``AI_PASSIVE``: ``None`` and ``""`` are the wildcards ``0.0.0.0`` / ``::``,
    a name is looked up). A host that does not resolve gives ``("<host>",)``: not loopback."""
    name = None if host is None or not str(host).strip() else str(host).strip().strip("[]")
    try:
        infos = socket.getaddrinfo(name, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError):
        return (str(host),)
    return tuple(dict.fromkeys(info[4][0] for info in infos)) or (str(host),)


def is_local(host: str | None) -> bool:
    """Whether a server bound to ``host`` accepts connections from this machine only: every
    address it resolves to is loopback (``""`` and ``None`` bind every interface: not local)."""
    return all(is_loopback(a) for a in bind_addresses(host))


def _socket_fds() -> list[int]:
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return [int(n) for n in os.listdir(folder) if n.isdigit()]
        except OSError:
            continue
    return list(range(3, 1024))


def listening_addresses() -> list[str]:
    """The local addresses of every listening TCP socket of this process, read from the sockets
    themselves (``SO_ACCEPTCONN``, ``getsockname``): what the server really bound, whatever address
    string it was given. Unix sockets are left out (they are not reachable over a network)."""
    out = []
    for fd in _socket_fds():
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            dup = os.dup(fd)
        except OSError:
            continue
        try:
            s = socket.socket(fileno=dup)
        except OSError:
            os.close(dup)
            continue
        with s:
            try:
                if s.family not in (socket.AF_INET, socket.AF_INET6) or s.type != socket.SOCK_STREAM:
                    continue
                if not s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    continue
                out.append(str(s.getsockname()[0]))
            except OSError:
                continue
    return sorted(set(out))


def exposed(addresses) -> list[str]:
    """The addresses of ``addresses`` that other machines can reach (everything but loopback)."""
    return [a for a in addresses if not is_loopback(a)]


def _shown(addresses) -> str:
    return ", ".join(f"[{a}]" if ":" in a else (a or '""') for a in addresses)


# --------------------------------------------------------------------------- the token

def configured_token() -> str | None:
    token = os.environ.get("ATLAS_TOKEN", "")
    return token or None


def token_problem() -> str | None:
    """Why the configured token is unusable (None: it is fine or unset)."""
    token = configured_token()
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        return (f"ATLAS_TOKEN is {len(token)} characters long; use at least {MIN_TOKEN_CHARS} random characters "
                f"(e.g. `{TOKEN_HINT}`): wrong tokens are throttled per client, so the token's length is what "
                "stops guessing from many addresses.")
    return None


def start_refusal(addresses, guarded: bool = True) -> str | None:
    """Why a server listening on ``addresses`` must not serve (None: it may).

    ``addresses``: numeric listening addresses, or a host string (resolved by :func:`bind_addresses`).
    ``guarded``: every HTTP path of this server passes the access guard (dashboard/guard.py); a
    server reachable from other machines needs both the guard and a token."""
    if addresses is None or isinstance(addresses, str):
        addresses = bind_addresses(addresses)
    problem = token_problem()
    if problem:
        return f"refusing to serve the dashboard: {problem}"
    reachable = exposed(addresses)
    if not reachable:
        return None
    where = _shown(reachable)
    if configured_token() is None:
        return (f"refusing to serve the dashboard on {where}: that address is reachable from other machines, "
                f"and no access token is set. Set ATLAS_TOKEN to a long random secret (e.g. `{TOKEN_HINT}`), "
                "or serve on 127.0.0.1 (the default), or put it behind your single sign-on (README).")
    if not guarded:
        return (f"refusing to serve the dashboard on {where}: this server does not check the access token on "
                "every HTTP path (media, uploads, /_stcore). Start it with `python -m dashboard --host ...` or "
                "`streamlit run dashboard/app.py`, which do.")
    return None


def check_token(given: str, expected: str) -> bool:
    """Constant-time comparison of a submitted token with the configured one."""
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def cookie_value(token: str) -> str:
    """The access cookie's value for ``token``: an HMAC of it (the token itself never leaves the
    login form; changing the token invalidates every cookie)."""
    return hmac.new(token.encode("utf-8"), b"clip-atlas access cookie v1", hashlib.sha256).hexdigest()


def cookie_ok(value: str | None, token: str | None) -> bool:
    if not value or token is None:
        return False
    return hmac.compare_digest(value.encode("utf-8", "replace"), cookie_value(token).encode("utf-8"))


# --------------------------------------------------------------------------- throttling

def session_wait(failures: int) -> float:
    """Seconds a client waits after its ``failures``-th wrong token: 0, 1, 2, 4, ... at most 60."""
    return 0.0 if failures < 2 else min(60.0, 2.0 ** (failures - 2))


def client_key(address: str | None) -> str:
    """The throttle's key for a client address: the address itself, an IPv6 client by its /64
    (one host usually holds a whole /64)."""
    text = (address or "").strip().strip("[]").split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return text or "unknown"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else ip)


class Throttle:
    """Wrong tokens counted per client (:func:`client_key`): after its n-th wrong token a client waits
    :func:`session_wait` (n) seconds before its next try is looked at. Other clients are never
    slowed. A client's count is forgotten after a right token or ``FORGET_S`` without a wrong one;
    at most ``MAX_CLIENTS`` clients are remembered (the longest quiet go first)."""

    MAX_CLIENTS = 10_000
    FORGET_S = 3600.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clients: dict[str, tuple[int, float, float]] = {}   # key -> (failures, until, last)

    def wait(self, client: str | None, now: float | None = None) -> float:
        """Seconds until ``client``'s next token is looked at (0: now)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            entry = self._clients.get(client_key(client))
        if entry is None or now - entry[2] > self.FORGET_S:
            return 0.0
        return max(0.0, entry[1] - now)

    def failed(self, client: str | None, now: float | None = None) -> float:
        """Count a wrong token from ``client``; returns its wait before the next try."""
        now = time.monotonic() if now is None else now
        key = client_key(client)
        with self._lock:
            n, _, last = self._clients.pop(key, (0, 0.0, now))
            n = 1 if now - last > self.FORGET_S else n + 1
            wait = session_wait(n)
            self._clients[key] = (n, now + wait, now)               # (re)inserted last: most recent
            while len(self._clients) > self.MAX_CLIENTS:
                self._clients.pop(next(iter(self._clients)))
        return wait

    def succeeded(self, client: str | None) -> None:
        with self._lock:
            self._clients.pop(client_key(client), None)

    def clear(self) -> None:
        with self._lock:
            self._clients.clear()


THROTTLE = Throttle()


# --------------------------------------------------------------------------- the Streamlit script's gate

class _Guard:
    """Set by dashboard/guard.py's lifespan: every HTTP path of this process passes the access guard."""
    active = False


GUARD = _Guard()
RESCAN_S = 2.0
_listening: list[str] = []
_scanned_at = float("-inf")


def serving_addresses() -> list[str]:
    """Where this process serves: its listening sockets (kept once found; while none is found, looked
    for again at most every RESCAN_S seconds) and the configured ``server.address`` as a bind
    resolves it, when one is set."""
    global _listening, _scanned_at
    if not _listening and time.monotonic() - _scanned_at > RESCAN_S:
        _listening, _scanned_at = listening_addresses(), time.monotonic()
    out = list(_listening)
    try:
        from streamlit import config
        configured = config.get_option("server.address")
    except Exception:  # noqa: BLE001 - no Streamlit config: only the sockets count
        configured = None
    if configured is not None:
        out += [a for a in bind_addresses(configured) if a not in out]
    return out


def gate() -> None:
    """Streamlit: stop the script unless this session may see the pages (call before any page)."""
    import streamlit as st
    refusal = start_refusal(serving_addresses(), guarded=GUARD.active)
    if refusal:
        st.error(refusal)
        st.stop()
    token = configured_token()
    if token is None or st.session_state.get("_atlas_access"):
        return
    try:
        if cookie_ok(st.context.cookies.get(COOKIE), token):      # the guard's login form set it
            st.session_state["_atlas_access"] = True
            return
        client = st.context.ip_address or "127.0.0.1"
    except Exception:  # noqa: BLE001 - no request context (AppTest)
        client = "127.0.0.1"
    st.title("CLIP Atlas")
    st.caption("This dashboard is shared with an access token. Ask whoever runs it for the token.")
    given = st.text_input("Access token", type="password", key="_atlas_token_input")
    if given:
        wait = THROTTLE.wait(client)
        if wait > 0:
            st.warning(f"Too many wrong tokens from your address: try again in {wait:.0f} s.")
        elif check_token(given, token):
            THROTTLE.succeeded(client)
            st.session_state["_atlas_access"] = True
            del st.session_state["_atlas_token_input"]
            st.rerun()
        else:
            THROTTLE.failed(client)
            st.error("Wrong token.")
    st.stop()
