"""One MLP neuron's second-order effect (MATH.md §10) at a permalink: /neuron?model=...&layer=...&neuron=...

The URL holds the state: read when the page opens (a link, a reload), written back on every run.
Shows: the effect norm's distribution (mean, quantiles, the share of images where the neuron matters,
histogram), its label and ground truth (eta2 per factor on the shapes world), the sparse text
decomposition of its principal direction with coefficients, its top images, how much of it goes
through each later head, and a per-patch map of its effect on a stored or uploaded image (each
token's part of phi_n . direction, computed live). Data-derived text is shown as plain text."""
import time

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from dashboard import live, nav
from dashboard import widgets as w
from dashboard.data import q
from warehouse import queries


def _int(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


st.title(nav.TITLES[nav.NEURON])
url = (st.query_params.get("model"), _int(st.query_params.get("layer")), _int(st.query_params.get("neuron")))
last = st.session_state.get("_neuron_url")                  # the neuron this session last showed
if url == (None, None, None) and last and last[0] == st.session_state.get("_atlas_model"):
    url = last          # back from another page (the sidebar link has no query; widget state is gone): that neuron
fresh = url != last or "neuron_index" not in st.session_state       # a link or a reload: the URL wins
if fresh and url[0]:
    st.session_state["_atlas_model"] = url[0]
row = w.model_picker()
model_id = row["model_id"]
layers = w.analysed_neuron_layers(model_id)
options = [int(l) for l in layers.layer]
if fresh and url[1] in options:
    st.session_state[f"neuron_layer@{model_id}"] = url[1]
if st.session_state.get(f"neuron_layer@{model_id}") not in options:
    st.session_state[f"neuron_layer@{model_id}"] = options[0]
c1, c2 = st.columns(2)
layer = c1.selectbox("MLP layer", options, key=f"neuron_layer@{model_id}", format_func=lambda l: f"layer {l}")
info = layers[layers.layer == layer].iloc[0]
n_neurons = int(info.n_neurons)
if fresh and url[2] is not None and 0 <= url[2] < n_neurons:
    st.session_state["neuron_index"] = url[2]
if not 0 <= st.session_state.get("neuron_index", 0) < n_neurons:
    st.session_state["neuron_index"] = 0
neuron = int(c2.number_input(f"Neuron (0 to {n_neurons - 1})", 0, n_neurons - 1, key="neuron_index", step=1))
st.query_params.from_dict(w.neuron_page_params(model_id, layer, neuron))
st.session_state["_neuron_url"] = (model_id, layer, neuron)

name = w.neuron_name(layer, neuron)
st.header(name, anchor=False)
st.text(f"{model_id}, MLP layer {layer}, neuron {neuron} of {n_neurons}; its effects reach the embedding through "
        f"{int(info.later_heads)} later heads. Over {int(info.n_images)} images of {info.dataset_id}.")
st.caption(f"Permalink: {w.code('?' + '&'.join(f'{k}={v}' for k, v in w.neuron_page_params(model_id, layer, neuron).items()))} "
           "— reload or share this URL to open the same neuron.")
rec = q(queries.neuron_record, model_id, layer, neuron)
if not rec:
    st.warning("This neuron has no stored statistics (the layer was analysed with fewer neurons?).")
    st.stop()

truth = q(queries.neuron_factors, model_id, layer, neuron)
m = st.columns(3) + st.columns(3)          # two rows: six in one row cut their values at 1280 px
m[0].metric("label", w.plain(rec.get("label") or "unlabelled"),
            help="offline labeler over the neuron's sparse texts, each weighted by the r2 it added (MATH.md §4)")
m[1].metric("mean effect", f"{rec['mean_norm']:.2e}", help="mean over the images of ||phi_n(I)||, on the unit-embedding scale")
m[2].metric("matters on", f"{100 * rec['share_matters']:.1f} % of images",
            help=f"the fewest images, largest effects first, holding {100 * float(info.matters_share):.0f} % of "
                 "sum ||phi_n||^2 (about 90 % for an effect of the same size on every image)")
m[3].metric("one direction", f"{100 * rec['pc_share']:.0f} %",
            help=f"share of the top {int(info.pc_images)} images' effect energy along the principal direction pc")
m[4].metric("texts reconstruct", f"r2 {rec['recon_r2']:.2f}",
            help=f"cos^2 of pc and its reconstruction from at most {int(info.texts_k)} texts of the "
                 f"{w.plain(info.bank)} bank (orthogonal matching pursuit)")
if truth.empty:
    m[5].metric("ground truth", "n/a", help="no shapes-world dataset behind this layer's statistics (MATH.md §7)")
else:
    t0 = truth.iloc[0]
    m[5].metric("ground truth", w.plain(t0.top_factor if t0.specialised else "unspecialised"),
                help=f"top factor explains eta2 = {truth.eta2.iloc[0]:.2f} of its effects' variance; specialised "
                     "when >= 0.4 and >= 3x the second (the heads' rule)")

# (full width: at 1280 px a half-width column cuts the texts table's columns off)
st.subheader("Sparse texts", anchor=False)
texts = q(queries.neuron_texts, model_id, layer, neuron)
st.caption("pc ≈ sum of coef × text embedding, in the order orthogonal matching pursuit chose them; gain: how "
           "much r2 each text added.")
st.dataframe(texts, hide_index=True, width="stretch", key="neuron_texts",
             column_config={"coef": st.column_config.NumberColumn(format="%+.3f"),
                            "gain": st.column_config.ProgressColumn(format="%.3f", min_value=0.0, max_value=1.0)})
w.csv_download(texts, f"texts_{model_id.replace('/', '_')}_{name}", key="dl_neuron_texts")
st.subheader("Effect norm over the images", anchor=False)
counts = rec["hist_counts"]
width = float(rec["hist_max"]) / max(len(counts), 1)
hist = pd.DataFrame({"from": [i * width for i in range(len(counts))], "to": [(i + 1) * width for i in range(len(counts))],
                     "images": counts})
chart = (alt.Chart(hist).mark_bar()
         .encode(x=alt.X("from:Q", title="||phi_n(I)||"), x2="to:Q",
                 y=alt.Y("images:Q", scale=alt.Scale(type="symlog"), title="images (symlog)"),
                 tooltip=[alt.Tooltip("from:Q", format=".2e"), alt.Tooltip("to:Q", format=".2e"), "images"])
         .properties(height=220))
st.altair_chart(chart, width="stretch", key="neuron_hist")
st.caption(f"median {rec['q50']:.2e}, 90 % {rec['q90']:.2e}, 99 % {rec['q99']:.2e}, max {rec['max_norm']:.2e}")

st.subheader("Top images", anchor=False)
top = q(queries.neuron_top_images, model_id, layer, neuron, 16)
if top.empty:
    st.info("No top images stored.")
else:
    st.caption("The images of largest effect norm, with ||phi_n|| and the projection on pc.")
    w.plain_thumbnails(top, lambda r: f"{r.image_id}  {r.norm:.2e}  pc {r.projection:+.2e}")

a, b = st.columns(2)
with a:
    st.subheader("Ground truth", anchor=False)
    if truth.empty:
        st.info("No shapes-world dataset behind this layer: eta2 is measured on generated scenes only.")
    else:
        chart = (alt.Chart(truth).mark_bar()
                 .encode(x=alt.X("eta2:Q", scale=alt.Scale(domain=[0, 1]), title="eta2 (share of the effects' variance)"),
                         y=alt.Y("factor:N", sort="-x", title=None), tooltip=["factor", alt.Tooltip("eta2:Q", format=".3f")])
                 .properties(height=200))
        st.altair_chart(chart, width="stretch", key="neuron_truth")
with b:
    st.subheader("Through the later heads", anchor=False)
    heads = q(queries.neuron_heads, model_id, layer, neuron)
    heads["head_name"] = [w.head_name(l, h) for l, h in zip(heads.head_layer, heads["head"])]
    chart = (alt.Chart(heads).mark_bar()
             .encode(x=alt.X("head_name:N", sort=None, title="later head"), y=alt.Y("effect:Q", title="mean ||alpha u||"),
                     tooltip=["head_name", alt.Tooltip("effect:Q", format=".2e")])
             .properties(height=200))
    st.altair_chart(chart, width="stretch", key="neuron_heads")

st.subheader("Where in an image", anchor=False)
st.caption("Per patch, its part of the neuron's effect along a direction: the sum over the later heads of "
           "alpha per source token times u . direction (class token apart). Red: along the direction, blue: against.")
choice = w.image_input(row, "neuron")
basis = st.radio("Direction", ["the neuron's pc", "a text"], key="neuron_basis", horizontal=True)
if basis == "a text":
    text = st.text_input("Text", value="a red object", key="neuron_map_text", max_chars=300)
    if not text.strip():
        st.warning("Type a text to map the neuron's effect along.")
        st.stop()
    direction, source = live.text_vector(row, text)
else:
    direction, source = rec["pc"], "pc"
if choice is not None:
    t0 = time.perf_counter()
    grid, cls_part = live.neuron_map(row, choice.image, choice.key, layer, neuron, direction)
    elapsed = time.perf_counter() - t0
    vmax = float(np.abs(grid).max()) or 1e-12
    crop, box = live.model_view_box(row, choice.image)                           # [S, S] RGB, its box
    c1, c2, c3 = st.columns(3)
    c1.metric("phi_n . direction", f"{grid.sum() + cls_part:+.3e}", help="the patches' sum plus the class token's part")
    c2.metric("class token's part", f"{cls_part:+.3e}")
    c3.metric("computed in", w.duration(elapsed))
    w.map_views(choice.image, crop, box, grid, vmax, w.plain(f"{choice.caption}: {name} along {source}"),
                low="against the direction", high="along the direction")
