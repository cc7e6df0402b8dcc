"""Topic segmentation (MATH.md §6.2): where in an image the chosen heads push towards a text.

The map is sum over the chosen heads of c[l,h,i] . t_hat for every patch i: each patch's
additive share of cos(image, text) through those heads, computed live on the image."""
import time

import numpy as np
import streamlit as st

from dashboard import live
from dashboard import widgets as w
from models.maps import upsample

st.title("Topic segmentation")
st.caption("Per patch, the share of cos(image, text) that the chosen heads carry: red pushes towards "
           "the text, blue away from it.")
row = w.model_picker()
heads, description = w.head_set_picker(row, "topic")
choice = w.image_input(row, "topic")
text = st.text_input("Text", value="a red object", key="topic_text", max_chars=300)

if choice is not None and heads:
    if not text.strip():
        st.warning("Type a text to segment the image by.")
        st.stop()
    t0 = time.perf_counter()
    t_hat, source = live.text_vector(row, text)
    grid = live.topic_map(row, choice.image, choice.key, heads, t_hat)          # [gh, gw]
    size = int(row["image_size"])
    heat = upsample(grid, size)                                                  # [S, S]
    crop = live.model_view(row, choice.image)                                    # [S, S] RGB
    elapsed = time.perf_counter() - t0
    vmax = float(np.abs(grid).max()) or 1e-12
    st.markdown(f"**{text}** ({source}) over {description}")
    a, b = st.columns(2)
    with a:
        st.image(w.overlay(crop, heat, vmax), caption=f"{choice.caption} (the model's {size} px crop)")
    with b:
        st.altair_chart(w.grid_chart(grid, vmax, f"patch grid {grid.shape[0]} x {grid.shape[1]}"), width="content")
    m1, m2, m3 = st.columns(3)
    m1.metric("sum over patches", f"{grid.sum():+.4f}", help="these heads' share of cos(image, text), class token excluded")
    m2.metric("max |patch|", f"{vmax:.4f}")
    m3.metric("computed in", f"{elapsed * 1000:.0f} ms")
