"""SQL console: one read-only query against the warehouse, run in a worker process
(warehouse/console.py refuses writes, file and network access, INSTALL/LOAD, settings and SQL
from strings, and caps time, memory, rows and result bytes; a stopped query cannot take this
server down), with example queries, `clip_text(model_id, text)` for semantic questions, and the
result as CSV."""
import os

import streamlit as st

from dashboard import widgets as w
from dashboard.data import q, stamp, warehouse_path
from warehouse import WarehouseError, queries
from warehouse.console import (EXAMPLE_QUERIES, ConsoleError, QueryMemoryExceeded, QueryRefused, QueryTimeout,
                               limits_text, run_console_query, warm_up)

MAX_ROWS = 10_000
TIMEOUT_S = float(os.environ.get("ATLAS_CONSOLE_TIMEOUT_S") or 10)   # memory and bytes: warehouse/console.py

warm_up()   # a query worker waits, imported, for the first query of this page
st.title("SQL console")
st.caption(f"Read-only DuckDB SQL over the warehouse's tables and views (head_scores, model_scores, "
           f"layer_scores, property_heads, ...). {limits_text(MAX_ROWS, TIMEOUT_S)}. "
           "`clip_text(model_id, text)` embeds a text with that model's text tower.")
w.model_picker()
rows = {r["model_id"]: r for r in q(queries.models).to_dict("records")}   # resolved before the query runs


def clip_text(model_id: str, text: str):
    """The console's clip_text(): a cached text-tower call (the model loads on first use)."""
    from dashboard import live
    if model_id not in rows:
        raise ValueError(f"clip_text: no model '{model_id}' in the warehouse; the table `models` lists every model_id")
    return live.text_vectors(rows[model_id], [text])[0]


@st.cache_data(show_spinner="Running the query ...", max_entries=64)
def run(sql: str, path: str, key: tuple, _clip):
    """(rows, truncated, None), or (None, False, message) for a query that was refused or stopped
    by a cap: cached like a result, so that other interactions with the page do not run a query
    that ran 10 s again (editing the text runs it anew)."""
    try:
        df, truncated = run_console_query(path, sql, max_rows=MAX_ROWS, timeout_s=TIMEOUT_S, clip_text=_clip)
    except (QueryRefused, QueryTimeout, QueryMemoryExceeded) as exc:
        return None, False, str(exc)
    return df, truncated, None


def use_example() -> None:
    st.session_state["sql_text"] = EXAMPLE_QUERIES[st.session_state["sql_example"]]


names = list(EXAMPLE_QUERIES)
st.selectbox("Example queries", names, key="sql_example", on_change=use_example, index=None,
             placeholder="Choose an example to load it into the editor")
if "sql_text" not in st.session_state:
    st.session_state["sql_text"] = EXAMPLE_QUERIES[names[0]]
with st.form("sql_form"):
    st.text_area("SQL", key="sql_text", height=200)
    st.form_submit_button("Run", icon=":material/play_arrow:", type="primary")

sql = st.session_state["sql_text"].strip()
if not sql:
    st.info("Type a SELECT query, or choose an example.")
    st.stop()
path = warehouse_path()
try:
    df, truncated, stopped = run(sql, str(path), stamp(path), clip_text)
except ConsoleError as exc:
    st.error(str(exc))
    st.stop()
except WarehouseError as exc:
    st.error(str(exc))
    st.stop()
if stopped:
    st.error(stopped)
    st.stop()
note = df.attrs.get("console_note") or f"stopped at the first {MAX_ROWS:,} rows"
st.caption(f"{len(df):,} rows" + (f" ({note}; add a LIMIT or WHERE)" if truncated else ""))
try:
    st.dataframe(df, hide_index=True, width="stretch")
    w.csv_download(df, "query_result", key="dl_sql")
except Exception as exc:  # noqa: BLE001 - a value the table cannot show: one line, not a traceback
    st.error(f"The result could not be shown: {' '.join(str(exc).split())[:300]} "
             f"(cast unusual columns to VARCHAR in the query)")
