"""Who may open the dashboard: local by default, a token for anything else.

The server binds to 127.0.0.1 unless told otherwise (`make dashboard HOST=0.0.0.0`). On any other
address it refuses to start without an access token in ``$ATLAS_TOKEN`` (`python -m dashboard`
checks before Streamlit starts; app.py checks again for a bare `streamlit run`). With a token set,
every session must enter it before any page renders. Tokens are compared in constant time; wrong
tokens are rate-limited per session (a growing wait) and per process (at most ``MAX_FAILURES``
wrong tokens in any ``WINDOW_S``-second window, for all sessions together).

For a team, put the dashboard behind your single sign-on instead (README, "Sharing the dashboard").
"""
from __future__ import annotations

import hmac
import ipaddress
import os
import threading
import time

MAX_FAILURES = 20
WINDOW_S = 60.0
LOCAL_NAMES = {"localhost", "127.0.0.1", "::1", ""}

_lock = threading.Lock()
_failures: list[float] = []          # monotonic times of wrong tokens, all sessions of this process


def is_local(address: str | None) -> bool:
    """Whether a bind address only accepts connections from this machine (loopback)."""
    address = (address or "").strip().strip("[]")
    if address in LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def configured_token() -> str | None:
    token = os.environ.get("ATLAS_TOKEN", "")
    return token or None


def start_refusal(address: str | None) -> str | None:
    """Why the server must not start on ``address`` (None: it may)."""
    if is_local(address) or configured_token():
        return None
    return (f"refusing to serve the dashboard on {address}: that address is reachable from other machines, "
            "and no access token is set. Set ATLAS_TOKEN to a long random secret (e.g. "
            "`export ATLAS_TOKEN=$(python -c 'import secrets; print(secrets.token_urlsafe(24))')`), "
            "or serve on 127.0.0.1 (the default), or put it behind your single sign-on (README).")


def check_token(given: str, expected: str) -> bool:
    """Constant-time comparison of a submitted token with the configured one."""
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def record_failure(now: float | None = None) -> None:
    with _lock:
        _failures.append(time.monotonic() if now is None else now)


def process_locked(now: float | None = None) -> float:
    """Seconds until this process accepts another token attempt (0: now)."""
    now = time.monotonic() if now is None else now
    with _lock:
        while _failures and _failures[0] < now - WINDOW_S:
            _failures.pop(0)
        if len(_failures) < MAX_FAILURES:
            return 0.0
        return max(0.0, _failures[0] + WINDOW_S - now)


def session_wait(failures: int) -> float:
    """Seconds one session waits after its ``failures``-th wrong token: 0, 0, 1, 2, 4, ... at most 60."""
    return 0.0 if failures < 2 else min(60.0, 2.0 ** (failures - 2))


def gate() -> None:
    """Streamlit: stop the script unless this session may see the pages (call before any page)."""
    import streamlit as st
    refusal = start_refusal(st.get_option("server.address"))
    if refusal:
        st.error(refusal)
        st.stop()
    token = configured_token()
    if token is None or st.session_state.get("_atlas_access"):
        return
    st.title("CLIP Atlas")
    st.caption("This dashboard is shared with an access token. Ask whoever runs it for the token.")
    state = st.session_state.setdefault("_atlas_token_state", {"failures": 0, "until": 0.0})
    given = st.text_input("Access token", type="password", key="_atlas_token_input")
    if given:
        now = time.monotonic()
        wait = max(state["until"] - now, process_locked(now))
        if wait > 0:
            st.warning(f"Too many wrong tokens: try again in {wait:.0f} s.")
        elif check_token(given, token):
            st.session_state["_atlas_access"] = True
            del st.session_state["_atlas_token_input"]
            st.rerun()
        else:
            state["failures"] += 1
            state["until"] = now + session_wait(state["failures"])
            record_failure(now)
            st.error("Wrong token.")
    st.stop()
