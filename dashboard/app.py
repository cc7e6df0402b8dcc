"""CLIP Atlas dashboard entry (`streamlit run dashboard/app.py`, `python -m dashboard`), in two roles:

* **the server** (imported without a script run context): ``streamlit run`` finds ``app`` below, an
  ``st.App``, and serves it with uvicorn: the access guard on every HTTP path and the start-up check
  of the sockets really bound (dashboard/guard.py), and the SQL console's streamed downloads
  (dashboard/downloads.py), around this same file as the Streamlit script;
* **the Streamlit script** (run by the Streamlit runtime, or AppTest): the gate, then routing to one
  file per page.
"""
import sys
from pathlib import Path

# `streamlit run` puts dashboard/ on sys.path, not the repository root that holds models/ and warehouse/.
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import streamlit as st  # noqa: E402
from streamlit.runtime.scriptrunner import get_script_run_ctx  # noqa: E402

if get_script_run_ctx(suppress_warning=True) is None:
    from starlette.middleware import Middleware

    from dashboard import downloads, guard, warm
    app = st.App(__file__, middleware=[Middleware(guard.AccessGuard)], lifespan=guard.lifespan,
                 routes=downloads.routes())
    warm.start(None, server=True)      # get ready as the server starts, before a browser asks (dashboard/warm.py)
else:
    import altair as alt

    from dashboard import warm
    from dashboard.access import gate
    from dashboard.data import warehouse_path
    from dashboard.nav import PAGES, page_of_url

    # Altair's debug mode validates every sub-object of a chart against the Vega-Lite schema as it is
    # built (for better tracebacks); the whole spec is still validated once when Streamlit serialises
    # it. Off, the Metrics page (nine layered charts) renders in about half the time.
    alt.utils.schemapi.disable_debug_mode()

    # The tab icon is an emoji: Streamlit draws it as an inline SVG. A `:material/...:` page icon would be
    # fetched from fonts.gstatic.com by every browser that opens a page (offline: net::ERR_NAME_NOT_RESOLVED).
    st.set_page_config(page_title="CLIP Atlas", page_icon="🧭", layout="wide")
    gate()                     # local by default; a token for anything else (dashboard/access.py)
    if warehouse_path().exists():      # import torch and load the default model in the background, once
        warm.start(warehouse_path())
    # expanded: every page in the sidebar (collapsed, Streamlit shows 10 and a "View more" button)
    page = st.navigation([st.Page(path, title=title, icon=icon, url_path=url, default=(i == 0))
                          for i, (path, title, icon, url) in enumerate(PAGES)], expanded=True)
    st.session_state["_atlas_page"] = page_of_url(page.url_path)     # which page runs (links name it)
    page.run()
