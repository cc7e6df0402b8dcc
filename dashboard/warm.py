"""A started server gets ready before anyone asks: in a background thread, import torch and open_clip
(about 5 CPU-s) and load the model the dashboard opens on into the process-wide model cache
(dashboard/live.py), so the first visit of a page that runs the model live (match, segmentation) does
not pay for them. Started by `python -m dashboard` as the server starts, and by the app's first run
(whichever comes first; once per process). Uses no Streamlit call: it runs outside any page."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Optional

_started: Optional[threading.Thread] = None
_lock = threading.Lock()


def _warm(path: Optional[Path], server: bool = False) -> None:
    try:
        import models.registry  # noqa: F401  (torch, open_clip)
        if server:             # the Streamlit runtime starts after the app is imported; its caches need it
            from streamlit import runtime
            for _ in range(600):
                if runtime.exists():
                    break
                time.sleep(0.1)
        if path is None:       # dashboard.data declares Streamlit caches: imported once the runtime exists
            from dashboard.data import warehouse_path
            path = warehouse_path()
            if not path.exists():
                return
        from dashboard import live
        from dashboard.widgets import default_model
        from warehouse import queries
        df = queries.models(path)
        if len(df):
            row = queries.model_row(path, default_model(df))
            live.load(live.spec_key(row), row)
    except Exception:      # noqa: BLE001  (a warm-up must never take the server down; the page says why)
        pass


def start(path, server: bool = False) -> threading.Thread:
    """Start the warm-up for the warehouse at ``path`` (once per process); returns its thread. ``server``:
    started by the server as it starts (app.py), before the Streamlit runtime exists: the model is loaded
    into the runtime's caches once it does; ``path`` None: the dashboard's warehouse (dashboard.data)."""
    global _started
    with _lock:
        if _started is None:
            _started = threading.Thread(target=_warm, args=(None if path is None else Path(path), server),
                                        name="atlas-warm-up", daemon=True)
            _started.start()
        return _started


def visit_every_page(path) -> dict:
    """Run every page once (Streamlit's AppTest, server side, no browser), in page order, on the warehouse
    at ``path``: what is costly is then built for this warehouse version and kept on disk beside it
    (dashboard/cache.py), so a server started afterwards reads it back. Returns seconds per page."""
    import os
    import time
    from streamlit.testing.v1 import AppTest
    from dashboard.nav import PAGES
    os.environ["ATLAS_WAREHOUSE"] = str(path)
    at = AppTest.from_file(str(Path(__file__).with_name("app.py")), default_timeout=1800)
    seconds = {}
    for i, (page, title, *_) in enumerate(PAGES):
        t0 = time.perf_counter()
        (at.run() if i == 0 else at.switch_page(page).run())
        seconds[title] = round(time.perf_counter() - t0, 2)
        if at.exception:
            raise RuntimeError(f"page {title} raised: {at.exception[0].value}")
    return seconds


def main(argv=None) -> int:
    """`python -m dashboard.warm [--warehouse PATH]`: build the dashboard's per-version cache now (after
    `make etl`, so the first visits of a freshly started server read it instead of building it)."""
    import argparse
    import json
    import logging
    import time
    import warnings
    from dashboard.data import warehouse_path
    p = argparse.ArgumentParser(prog="python -m dashboard.warm", description=main.__doc__)
    p.add_argument("--warehouse", default=None, help="warehouse file (default $ATLAS_WAREHOUSE or "
                                                     "$ATLAS_HOME/warehouse.duckdb)")
    args = p.parse_args(argv)
    path = Path(args.warehouse) if args.warehouse else warehouse_path()
    if not path.exists():
        print(f"error: no warehouse at {path}; build it with `make etl`", flush=True)
        return 2
    logging.getLogger("streamlit").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    seconds = visit_every_page(path)
    print(f"[warm] the dashboard's cache for {path} built in {time.perf_counter() - t0:.1f} s: "
          + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()), flush=True)
    print(json.dumps({"warehouse": str(path), "seconds": seconds}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
