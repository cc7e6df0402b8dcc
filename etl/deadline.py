"""A wall-clock deadline that nothing inside the guarded call can bypass.

A client's own timeouts are per operation (connect, each read): a server that trickles its headers
one line every half second never trips a 3 s read timeout, and a library that retries or waits
inside its own loop is out of the caller's hands. :func:`call_with_deadline` bounds the whole call
from outside it:

- in the main thread, by ``SIGALRM`` (``setitimer``): the handler raises :class:`DeadlineExceeded`
  wherever the call is (a blocking ``recv`` is interrupted, Python runs the handler, the exception
  unwinds the call and its ``with`` blocks close its sockets). It derives from BaseException, so a
  library's ``except Exception`` cannot swallow or rewrap it. An outer timer (a deadline inside a
  deadline) is restored with its remaining time.
- in any other thread (no signals there), the call runs in a daemon helper thread and the caller
  stops waiting at the deadline; the helper is abandoned (it ends when its own I/O does).
"""
from __future__ import annotations

import signal
import threading
import time
from typing import Callable, TypeVar

T = TypeVar("T")


class DeadlineExceeded(BaseException):
    """The guarded call ran past its wall-clock deadline (``seconds``)."""

    def __init__(self, seconds: float):
        super().__init__(f"ran past its deadline of {seconds:g} s")
        self.seconds = seconds


def _signals_usable() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


def call_with_deadline(fn: Callable[[], T], seconds: float, signals: bool = True) -> T:
    """``fn()``, or :class:`DeadlineExceeded` once ``seconds`` of wall-clock time have passed.
    ``signals=False``: always the watched thread (for a call that blocks inside C code, where a
    signal handler would only run once the C call returns)."""
    seconds = float(seconds)
    if seconds <= 0:
        raise DeadlineExceeded(seconds)
    if signals and _signals_usable():
        return _with_alarm(fn, seconds)
    return _with_thread(fn, seconds)


def _with_alarm(fn: Callable[[], T], seconds: float) -> T:
    start = time.monotonic()
    armed = [True]

    def fire(signum, frame):
        if armed[0]:                     # (a signal that lands while the call is being left is let go)
            raise DeadlineExceeded(seconds)

    outer_left, _ = signal.getitimer(signal.ITIMER_REAL)
    if outer_left and outer_left <= seconds:      # an outer deadline comes first: it stands for both
        return fn()
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn()
    finally:
        armed[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if outer_left:              # give the outer deadline back what is left of it
            signal.setitimer(signal.ITIMER_REAL, max(1e-3, outer_left - (time.monotonic() - start)))


def _with_thread(fn: Callable[[], T], seconds: float) -> T:
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:        # handed to the caller as it is
            box["error"] = exc

    t = threading.Thread(target=target, name="atlas-deadline", daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        raise DeadlineExceeded(seconds)
    if "error" in box:
        raise box["error"]
    return box["value"]
