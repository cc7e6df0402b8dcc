"""Per-head nearest neighbours of a text (MATH.md §6.5): for each head, the warehouse images whose
head embedding c_db[l,h] has the largest share along the text, c_db[l,h] . t_hat."""
import streamlit as st

from dashboard import live
from dashboard import widgets as w
from dashboard.data import q
from warehouse import queries

st.title("Per-head neighbours of a text")
st.caption("Which images does each head push most towards a text?")
row = w.model_picker()
heads, description = w.head_set_picker(row, "tnn", modes=("one head", "a layer", "a property's heads"))
text = st.text_input("Text", value="a red object", key="tnn_text", max_chars=300)
k = st.slider("Images per head", 1, 10, 5, key="tnn_k")

if heads and text.strip():
    t_hat, source = live.text_vector(row, text)
    hits = q(queries.neighbours_per_head_of_text, row["model_id"], heads, t_hat, k)
    st.markdown(f"**{w.plain(text)}** ({source}) over {w.plain(description)}: top {k} per head (score = c_db[l,h] · t)")
    w.head_rows(hits, w.head_labels(row), heads, k)
    w.csv_download(hits, "text_neighbours_per_head", key="dl_tnn")
elif not text.strip():
    st.warning("Type a text to rank the images by.")
