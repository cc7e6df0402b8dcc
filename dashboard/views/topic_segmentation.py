"""Topic segmentation (MATH.md §6.2): where in an image the chosen heads push towards a text.

The map is sum over the chosen heads of c[l,h,i] . t_hat for every patch i: each patch's
additive share of cos(image, text) through those heads, computed live on the image."""
import time

import numpy as np
import streamlit as st

from dashboard import live
from dashboard import widgets as w

st.title("Topic segmentation")
st.caption("Per patch, the share of cos(image, text) that the chosen heads carry: red pushes towards "
           "the text, blue away from it.")
row = w.model_picker()
heads, description = w.head_set_picker(row, "topic")
w.set_example_defaults(row, heads, ["topic_text"], "topic_image")       # a first map that shows what the head carries
choice = w.image_input(row, "topic")
st.session_state.setdefault("topic_text", "a red object")          # (a head without TextSpan texts)
text = st.text_input("Text", key="topic_text", max_chars=300)

if choice is not None and heads:
    if not text.strip():
        st.warning("Type a text to segment the image by.")
        st.stop()
    t0 = time.perf_counter()
    t_hat, source = live.text_vector(row, text)
    grid = live.topic_map(row, choice.image, choice.key, heads, t_hat)          # [gh, gw]
    size = int(row["image_size"])
    crop, box = live.model_view_box(row, choice.image)                           # [S, S] RGB, its box
    elapsed = time.perf_counter() - t0
    vmax = float(np.abs(grid).max()) or 1e-12
    st.markdown(f"**{w.plain(text)}** ({source}) over {w.plain(description)}")
    w.map_views(choice.image, crop, box, grid, vmax, w.plain(choice.caption))
    st.altair_chart(w.grid_chart(grid, vmax, f"patch grid {grid.shape[0]} x {grid.shape[1]} of the model's "
                                             f"{size} px crop"), width="content")
    m1, m2, m3 = st.columns(3)
    m1.metric("sum over patches", f"{grid.sum():+.4f}", help="these heads' share of cos(image, text), the class (prefix) tokens' own terms excluded")
    m2.metric("max |patch|", f"{vmax:.4f}")
    m3.metric("computed in", f"{elapsed * 1000:.0f} ms")
    if 1 < len(heads) <= 32:
        per_head = {w.head_name(*h): live.topic_map(row, choice.image, choice.key, [h], t_hat) for h in heads}
        vh = float(max(np.abs(g).max() for g in per_head.values())) or 1e-12
        st.markdown(f"**Each head separately** ({w.plural(len(heads), 'head')}, one shared scale ±{vh:.4g})")
        w.small_multiples(crop, per_head, vh)
        st.image(w.legend(vh))
