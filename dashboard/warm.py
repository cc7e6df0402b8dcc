"""A started server gets ready before anyone asks: in a background thread, import torch and open_clip
(about 5 CPU-s) and load the model the dashboard opens on into the process-wide model cache
(dashboard/live.py), so the first visit of a page that runs the model live (match, segmentation) does
not pay for them. Started by `python -m dashboard` as the server starts, and by the app's first run
(whichever comes first; once per process). Uses no Streamlit call: it runs outside any page."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional

_started: Optional[threading.Thread] = None
_lock = threading.Lock()


def _warm(path: Path) -> None:
    try:
        import models.registry  # noqa: F401  (torch, open_clip)
        from dashboard import live
        from dashboard.widgets import default_model
        from warehouse import queries
        df = queries.models(path)
        if len(df):
            row = queries.model_row(path, default_model(df))
            live.load(live.spec_key(row), row)
    except Exception:      # noqa: BLE001  (a warm-up must never take the server down; the page says why)
        pass


def start(path) -> threading.Thread:
    """Start the warm-up for the warehouse at ``path`` (once per process); returns its thread."""
    global _started
    with _lock:
        if _started is None:
            _started = threading.Thread(target=_warm, args=(Path(path),), name="atlas-warm-up", daemon=True)
            _started.start()
        return _started
