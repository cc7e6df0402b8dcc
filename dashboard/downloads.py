"""The SQL console's full results as streamed CSV downloads (a route of app.py's ``st.App``).

The console page shows a bounded preview of a result (warehouse/console.py, ``preview_chars``);
the whole result is offered as a link, ``/_atlas/download/<id>.csv``. The id (random, 144 bits) is
registered here with the query, the warehouse file and its stamp, and the page's ``clip_text``.
When the link is opened, :func:`download` runs the query again in a console worker
(:class:`warehouse.console.CsvDownload`), which writes the CSV; this process passes it on in
chunks of at most 1 MiB as the browser takes them, so a result of any size costs the dashboard
one chunk. The route sits behind the access guard like every other path (dashboard/guard.py).

A link stays valid for ``TTL_S`` (the newest ``MAX_LINKS`` links); one whose warehouse has changed
since its query ran is refused (409), so a download is always the result the page showed.
"""
from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

PREFIX = "_atlas/download/"
MAX_LINKS = 256
TTL_S = 3600.0


@dataclass(frozen=True)
class Link:
    sql: str
    path: str
    stamp: tuple
    clip_text: Optional[Callable]
    created: float


_lock = threading.Lock()
_links: "OrderedDict[str, Link]" = OrderedDict()


def register(sql: str, path: str, stamp: tuple, clip_text: Optional[Callable] = None) -> str:
    """Remember a query for download; returns the link's URL path (``/<base>/_atlas/download/<id>.csv``)."""
    from dashboard.guard import base_path
    key = secrets.token_urlsafe(18)
    now = time.monotonic()
    with _lock:
        _links[key] = Link(sql, str(path), stamp, clip_text, now)
        while len(_links) > MAX_LINKS or (_links and now - next(iter(_links.values())).created > TTL_S):
            _links.popitem(last=False)
    return f"{base_path()}{PREFIX}{key}.csv"


def lookup(key: str) -> Optional[Link]:
    with _lock:
        link = _links.get(key)
    if link is None or time.monotonic() - link.created > TTL_S:
        return None
    return link


def _text(status: int, message: str):
    from starlette.responses import PlainTextResponse
    return PlainTextResponse(message + "\n", status_code=status,
                             headers={"cache-control": "no-store", "x-content-type-options": "nosniff"})


async def download(request):
    """GET /_atlas/download/<id>.csv: the registered query's whole result as CSV, streamed."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import StreamingResponse

    from dashboard.data import stamp
    from warehouse import WarehouseError
    from warehouse.console import ConsoleError, CsvDownload, QueryMemoryExceeded, QueryTimeout

    name = request.path_params["name"]
    link = lookup(name[:-4]) if name.endswith(".csv") else None
    if link is None:
        return _text(404, "This download link is unknown or expired: run the query again in the SQL console.")
    if stamp(Path(link.path)) != link.stamp:
        return _text(409, "The warehouse changed since this query ran: run it again in the SQL console, "
                          "then download.")
    try:
        job = await run_in_threadpool(CsvDownload, link.path, link.sql, clip_text=link.clip_text)
    except (QueryTimeout, QueryMemoryExceeded) as exc:
        return _text(503, f"The download stopped: {exc}")
    except (ConsoleError, WarehouseError) as exc:
        return _text(400 if isinstance(exc, ConsoleError) else 503, str(exc))

    async def body():
        chunks = job.chunks()
        try:
            while True:
                chunk = await run_in_threadpool(next, chunks, None)
                if chunk is None:
                    return
                yield chunk
        finally:
            job.close()              # the browser went away, or the stream ended: the worker goes

    headers = {"content-disposition": 'attachment; filename="query_result.csv"', "content-length": str(job.size),
               "cache-control": "no-store", "x-content-type-options": "nosniff"}
    if job.truncated:
        headers["x-atlas-note"] = job.note or "cut at the download limit"
    return StreamingResponse(body(), media_type="text/csv; charset=utf-8", headers=headers)


def routes() -> list:
    from starlette.routing import Route

    from dashboard.guard import base_path
    return [Route(f"{base_path()}{PREFIX}{{name}}", download, methods=["GET"])]
