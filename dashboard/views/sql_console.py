"""SQL console: one read-only query against the warehouse, run in a worker process
(warehouse/console.py refuses writes, file and network access, INSTALL/LOAD, settings and SQL
from strings, and caps time, memory, rows and result bytes; a stopped query cannot take this
server down), with example queries, `clip_text(model_id, text)` for semantic questions, and the
whole result as a streamed CSV download. Beside the editor, a schema browser: every table and view,
its columns and types, with one-line meanings (warehouse.queries.schema_browser, read outside the
console's worker: the console's allow-list is unchanged). A result with an `image_id` column can
show each image's thumbnail (its first THUMB_ROWS rows, thumbnails fetched by
warehouse.queries.image_thumbnails).

What this process holds of a result is bounded: the worker sends at most MAX_ROWS rows whose cells
cost at most the console's byte cap once shown, with every text, binary and nested value cut to a
PREVIEW_CHARS-character preview (`[0.01, -0.02, ... … (768 items)`). The last result of each
session is kept in its session state (not st.cache_data: no pickled copies), so other
interactions with the page do not run a 10 s query again. The whole result is not built here:
its download link (dashboard/downloads.py) has a worker write the CSV and streams it through."""
import base64
import os

import streamlit as st

from dashboard import downloads
from dashboard import widgets as w
from dashboard.data import q, stamp, warehouse_path
from warehouse import WarehouseBusyError, WarehouseError, queries
from warehouse.console import (EXAMPLE_QUERIES, ConsoleError, limits_text, run_console_query, warm_up)

MAX_ROWS = 10_000
PREVIEW_CHARS = 300                                                 # of one text, binary or nested value
THUMB_ROWS = 200                                                    # rows shown with thumbnails
TIMEOUT_S = float(os.environ.get("ATLAS_CONSOLE_TIMEOUT_S") or 10)   # memory and bytes: warehouse/console.py

warm_up()   # a query worker waits, imported, for the first query of this page
st.title("SQL console")
st.caption(f"Read-only DuckDB SQL over the warehouse's tables and views (head_scores, model_scores, "
           f"layer_scores, property_heads, ...). {limits_text(MAX_ROWS, TIMEOUT_S)}; long texts, lists "
           f"and structs are shown cut to {PREVIEW_CHARS} characters, whole in the CSV download. "
           "`clip_text(model_id, text)` embeds a text with that model's text tower.")
w.model_picker()
rows = {r["model_id"]: r for r in q(queries.models).to_dict("records")}   # resolved before the query runs


def clip_text(model_id: str, text: str):
    """The console's clip_text(): a cached text-tower call (the model loads on first use)."""
    from dashboard import live
    if model_id not in rows:
        raise ValueError(f"clip_text: no model '{model_id}' in the warehouse; the table `models` lists every model_id")
    return live.text_vectors(rows[model_id], [text])[0]


def run(sql: str, path, key: tuple) -> dict:
    """The session's result of ``sql`` on the warehouse as it is now (``key``): run once, then kept
    in the session state until the text or the warehouse changes. {"df", "truncated", "download"}
    or {"stopped": one-line message}; a busy warehouse is not remembered (retry)."""
    last = st.session_state.get("_atlas_sql_result")
    if last is not None and last["key"] == key:
        return last
    st.session_state.pop("_atlas_sql_result", None)          # the old preview goes before the new one comes
    try:
        with st.spinner("Running the query ..."):
            df, truncated = run_console_query(str(path), sql, max_rows=MAX_ROWS, timeout_s=TIMEOUT_S,
                                              clip_text=clip_text, preview_chars=PREVIEW_CHARS)
    except WarehouseBusyError as exc:
        return {"key": key, "stopped": str(exc)}
    except (ConsoleError, WarehouseError) as exc:
        result = {"key": key, "stopped": str(exc)}
    else:
        result = {"key": key, "df": df, "truncated": truncated,
                  "download": downloads.register(sql, str(path), key[1], clip_text)}
    st.session_state["_atlas_sql_result"] = result
    return result


def use_example() -> None:
    st.session_state["sql_text"] = EXAMPLE_QUERIES[st.session_state["sql_example"]]


def schema_browser() -> None:
    """Tables and views, their columns, types and meanings (static tables: the result is the page's only dataframe)."""
    schema = q(queries.schema_browser)
    rels = schema.drop_duplicates("relation")[["relation", "kind", "relation_meaning"]]
    kinds = dict(zip(rels.relation, rels.kind))
    st.markdown(f"**Schema** ({w.plural(int((rels.kind == 'table').sum()), 'table')}, "
                f"{w.plural(int((rels.kind == 'view').sum()), 'view')})")
    names = list(rels.relation)
    if st.session_state.get("sql_schema_relation") not in names:
        st.session_state["sql_schema_relation"] = "head_scores" if "head_scores" in names else names[0]
    rel = st.selectbox("Table or view", names, key="sql_schema_relation",
                       format_func=lambda r: f"{r} ({kinds[r]})")
    meaning = dict(zip(rels.relation, rels.relation_meaning)).get(rel) or ""
    st.caption(f"{w.code(rel)}: {w.plain(meaning)}" if meaning else w.code(rel))
    cols = schema[schema.relation == rel][["column", "type", "meaning"]]
    st.table(cols.set_index("column"))
    with st.expander("Every table and view"):
        st.markdown("\n".join(f"- {w.code(r.relation)} ({w.plain(r.kind)}): "
                              f"{w.plain(r.relation_meaning or '(no description)')}" for r in rels.itertuples()))


names = list(EXAMPLE_QUERIES)
editor, browser = st.columns([3, 2])
with editor:
    st.selectbox("Example queries", names, key="sql_example", on_change=use_example, index=None,
                 placeholder="Choose an example to load it into the editor")
    if "sql_text" not in st.session_state:
        st.session_state["sql_text"] = EXAMPLE_QUERIES[names[0]]
    with st.form("sql_form"):
        st.text_area("SQL", key="sql_text", height=260)
        st.form_submit_button("Run", icon=":material/play_arrow:", type="primary")
with browser:
    schema_browser()

sql = st.session_state["sql_text"].strip()
if not sql:
    st.info("Type a SELECT query, or choose an example.")
    st.stop()
path = warehouse_path()
result = run(sql, path, (sql, stamp(path), str(path)))
if "stopped" in result:
    st.error(w.plain(result["stopped"]))         # messages can quote the warehouse's values: plain text
    st.stop()
df, truncated = result["df"], result["truncated"]


def with_thumbnails(df):
    """The first THUMB_ROWS rows with an `image` column of thumbnail data URIs (None where the
    image_id is not a warehouse image), and the ImageColumn that shows it."""
    shown = df.head(THUMB_ROWS).copy()
    ids = list(dict.fromkeys(i for i in shown.image_id if isinstance(i, str)))
    th = q(queries.image_thumbnails, tuple(ids))
    uris = {r.image_id: "data:image/jpeg;base64," + base64.b64encode(bytes(r.thumbnail)).decode()
            for r in th.itertuples() if r.thumbnail is not None}
    shown.insert(0, "image", [uris.get(i) if isinstance(i, str) else None for i in shown.image_id])
    return shown, {"image": st.column_config.ImageColumn("image", width="small",
                                                         help="the image's stored thumbnail")}


note = df.attrs.get("console_note") or f"stopped at the first {MAX_ROWS:,} rows"
st.caption(f"{len(df):,} rows" + (f" ({note}; add a LIMIT or WHERE, or download the whole result)" if truncated else ""))
try:
    thumbs = "image_id" in df.columns and "image" not in df.columns and len(df) > 0
    if thumbs and st.toggle(f"Show thumbnails (the first {THUMB_ROWS} rows)", value=True, key="sql_thumbs",
                            help="the result has an image_id column: each row gets its image's stored thumbnail"):
        shown, config = with_thumbnails(df)
        st.dataframe(shown, hide_index=True, width="stretch", column_config=config, row_height=60)
    else:
        st.dataframe(df, hide_index=True, width="stretch")
except Exception as exc:  # noqa: BLE001 - a value the table cannot show: one line, not a traceback
    st.error(w.plain(f"The result could not be shown: {' '.join(str(exc).split())[:300]} "
                     f"(cast unusual columns to VARCHAR in the query)"))
st.link_button("Download query_result.csv (the whole result)", result["download"], icon=":material/download:",
               help="The query runs again in a worker that writes the CSV (lists, structs and long texts whole, "
                    "at most 1 GB); it streams from there.")
