"""Per-head nearest neighbours of an image (MATH.md §6.4): one row per head, the top-k warehouse
images by c_query[l,h] . c_db[l,h], so each row shows what that head alone finds similar."""
import streamlit as st

from dashboard import live
from dashboard import widgets as w
from dashboard.data import q
from warehouse import queries

st.title("Per-head neighbours of an image")
st.caption("Rows are heads; each row ranks the warehouse by that head's embedding only.")
row = w.model_picker()
heads, description = w.head_set_picker(row, "inn", modes=("a layer", "a property's heads", "one head"))
choice = w.image_input(row, "inn")
k = st.slider("Neighbours per head", 1, 10, 5, key="inn_k")

if choice is not None and heads:
    queries_vec = live.query_head_vectors(row, choice, heads)                    # [n_heads, d]
    hits = q(queries.neighbours_per_head, row["model_id"], heads, queries_vec, k, choice.image_id)
    a, b = st.columns([1, 4])
    a.image(live.model_view(row, choice.image), caption=f"query: {w.plain(choice.caption)}", width="stretch")
    with b:
        st.markdown(f"**{w.plain(description)}**: top {k} per head (score = c_query[l,h] · c_db[l,h])")
        w.head_rows(hits, w.head_labels(row), heads, k)
    w.csv_download(hits, "image_neighbours_per_head", key="dl_inn")
