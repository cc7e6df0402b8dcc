"""Contrastive segmentation (MATH.md §6.3): the map of text A minus the map of text B, over ALL
the chosen heads (not one), on one symmetric colour scale: red towards A, blue towards B."""
import time

import numpy as np
import streamlit as st

from dashboard import live
from dashboard import widgets as w

st.title("Contrastive segmentation")
st.caption("Per patch, (share of cos(image, A)) - (share of cos(image, B)) summed over every chosen head.")
row = w.model_picker()
heads, description = w.head_set_picker(row, "contrast")
w.set_example_defaults(row, heads, ["contrast_a", "contrast_b"], "contrast_image")       # a first map that shows what the head carries
choice = w.image_input(row, "contrast")
c1, c2 = st.columns(2)
st.session_state.setdefault("contrast_a", "a red object")           # (a head without TextSpan texts)
st.session_state.setdefault("contrast_b", "a blue thing")
text_a = c1.text_input("Text A (red)", key="contrast_a", max_chars=300)
text_b = c2.text_input("Text B (blue)", key="contrast_b", max_chars=300)

if choice is not None and heads:
    if not text_a.strip() or not text_b.strip():
        st.warning("Type both texts to contrast them.")
        st.stop()
    t0 = time.perf_counter()
    (t_a, _), (t_b, _) = live.text_vector(row, text_a), live.text_vector(row, text_b)   # [d] each
    map_a = live.topic_map(row, choice.image, choice.key, heads, t_a)           # [gh, gw]
    map_b = live.topic_map(row, choice.image, choice.key, heads, t_b)
    diff = map_a - map_b
    crop, box = live.model_view_box(row, choice.image)                           # [S, S] RGB, its box
    elapsed = time.perf_counter() - t0
    vmax = float(np.abs(diff).max()) or 1e-12
    st.markdown(f"**{w.plain(text_a)}** (red) minus **{w.plain(text_b)}** (blue) over {w.plain(description)}")
    w.map_views(choice.image, crop, box, diff, vmax, f"A - B on {w.plain(choice.caption)}", low="towards B", high="towards A")
    st.altair_chart(w.grid_chart(diff, vmax, "A - B per patch (one symmetric scale)"), width="content")
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("patches towards A", f"{(diff > 0).mean():.0%}")
    m2.metric("patches towards B", f"{(diff < 0).mean():.0%}")
    m3.metric("sum A - B", f"{diff.sum():+.4f}")
    m4.metric("computed in", f"{elapsed * 1000:.0f} ms")
    with st.expander("A and B separately (one shared scale)"):
        vab = float(max(np.abs(map_a).max(), np.abs(map_b).max())) or 1e-12
        x, y = st.columns(2)
        x.image(w.overlay(crop, map_a, vab), caption=f"A: {w.plain(text_a)}")
        y.image(w.overlay(crop, map_b, vab), caption=f"B: {w.plain(text_b)}")
        st.image(w.legend(vab))
    if 1 < len(heads) <= 32:
        per_head = {w.head_name(*h): live.topic_map(row, choice.image, choice.key, [h], t_a)
                    - live.topic_map(row, choice.image, choice.key, [h], t_b) for h in heads}
        vh = float(max(np.abs(g).max() for g in per_head.values())) or 1e-12
        st.markdown(f"**A - B for each head separately** ({w.plural(len(heads), 'head')}, one shared scale ±{vh:.4g})")
        w.small_multiples(crop, per_head, vh)
        st.image(w.legend(vh, "towards B", "towards A"))
