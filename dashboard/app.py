"""CLIP Atlas dashboard entry: routes to one file per page (`streamlit run dashboard/app.py`)."""
import sys
from pathlib import Path

# `streamlit run` puts dashboard/ on sys.path, not the repository root that holds models/ and warehouse/.
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import altair as alt  # noqa: E402
import streamlit as st  # noqa: E402

from dashboard.access import gate  # noqa: E402
from dashboard.nav import PAGES  # noqa: E402

# Altair's debug mode validates every sub-object of a chart against the Vega-Lite schema as it is
# built (for better tracebacks); the whole spec is still validated once when Streamlit serialises
# it. Off, the Metrics page (nine layered charts) renders in about half the time.
alt.utils.schemapi.disable_debug_mode()

st.set_page_config(page_title="CLIP Atlas", page_icon=":material/hub:", layout="wide")
gate()                     # local by default; a token for anything else (dashboard/access.py)
# expanded: every page in the sidebar (collapsed, Streamlit shows 10 and a "View more" button)
st.navigation([st.Page(path, title=title, icon=icon, url_path=url, default=(i == 0))
               for i, (path, title, icon, url) in enumerate(PAGES)], expanded=True).run()
