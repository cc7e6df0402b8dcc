"""CLIP Atlas dashboard entry: routes to one file per page (`streamlit run dashboard/app.py`)."""
import sys
from pathlib import Path

# `streamlit run` puts dashboard/ on sys.path, not the repository root that holds models/ and warehouse/.
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import altair as alt  # noqa: E402
import streamlit as st  # noqa: E402

from dashboard import warm  # noqa: E402
from dashboard.access import gate  # noqa: E402
from dashboard.data import warehouse_path  # noqa: E402
from dashboard.nav import PAGES, page_of_url  # noqa: E402

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
page = st.navigation([st.Page(path, title=title, icon=icon, url_path=url, default=(i == 0))
                      for i, (path, title, icon, url) in enumerate(PAGES)])
st.session_state["_atlas_page"] = page_of_url(page.url_path)     # which page runs (links name it)
page.run()
