"""Which heads make this match? (issue 10 item 4): for one image and one text, every analysed head's
and every layer's direct share of cos(image, text), ranked, each head's bar linked to its head page.

The image embedding is exactly the sum of its direct contributions (MATH.md §1: heads, MLP terms,
out-proj biases, the embedding term, and for an attention pool with an MLP (SigLIP: MAP) the pool MLP's
term `pool_mlp`), so cos(image, text) = sum over components c of
<c, t> / (|img| |t|): the bars add up to the cosine, and the page checks that they do.
The URL keeps the state (?model=...&image=...&text=...): a reload or a shared link shows the same
match (uploads are not in the URL).
"""
import time
from urllib.parse import urlencode

import altair as alt
import numpy as np
import streamlit as st

from dashboard import live, nav
from dashboard import widgets as w
from dashboard.data import q
from warehouse import queries

DEFAULT_TEXT = "there is a red shape"
TOL = 1e-4
KIND_COLOURS = ["#4c78a8", "#9ecae9", "#f58518", "#bab0ac", "#54a24b", "#b279a2"]   # in the order of live.KINDS


def head_url(model_id: str, layer: int, head: int) -> str:
    """The head page's permalink, relative to this page (/head-match -> /head?...)."""
    return f"{nav.URLS[nav.HEAD]}?{urlencode(w.head_page_params(model_id, layer, head))}"


st.title(nav.TITLES[nav.MATCH])
st.caption("Which heads make CLIP say this? For one image and one text, each component's direct share of "
           "cos(image, text): the embedding is exactly the sum of these parts (MATH.md §1), so the bars add "
           "up to the cosine. Click a head's bar (or its link below) to open its page.")

url = tuple(st.query_params.get(k) for k in ("model", "image", "text"))
fresh = url != st.session_state.get("_match_url")          # a link or a reload: the URL wins
if fresh and url[0]:
    st.session_state["_atlas_model"] = url[0]
row = w.model_picker()
model_id = row["model_id"]
image_ids = list(q(queries.images, model_id).image_id)
if fresh and url[1] in image_ids:
    st.session_state["match_source"] = "warehouse image"
    st.session_state["match_image"] = url[1]
if st.session_state.get("match_image") is not None and st.session_state["match_image"] not in image_ids:
    del st.session_state["match_image"]                     # another model's image: the picker's default
if fresh and url[2]:
    st.session_state["match_text"] = url[2]
st.session_state.setdefault("match_text", DEFAULT_TEXT)

left, right = st.columns([1, 2])
with left:
    choice = w.image_input(row, "match")
    text = st.text_input("Text", key="match_text", max_chars=300)
params = {"model": model_id, "text": text}
if choice is not None and choice.image_id is not None:
    params["image"] = choice.image_id
st.query_params.from_dict(params)
st.session_state["_match_url"] = (model_id, params.get("image"), text)
if choice is None:
    st.stop()
if not text.strip():
    st.warning("Type a text to see which heads make the image match it.")
    st.stop()

t0 = time.perf_counter()
t_hat, source = live.text_vector(row, text)
b = live.breakdown(row, choice.image, choice.key, t_hat)
elapsed = time.perf_counter() - t0
with left:
    st.image(live.model_view(row, choice.image), caption=f"{w.plain(choice.caption)} (the model's crop)", width=280)

comp = b.components.copy()
labels = w.head_labels(row)
is_head = comp.kind == "head"
comp["label"] = [labels.get((int(l), int(h)), "") if k else ""
                 for l, h, k in zip(comp.layer.fillna(-1), comp["head"].fillna(-1), is_head)]
comp["head page"] = [head_url(model_id, int(l), int(h)) if k else None
                     for l, h, k in zip(comp.layer.fillna(-1), comp["head"].fillna(-1), is_head)]
comp["bar"] = [f"{c} · {lab}" if lab else c for c, lab in zip(comp.component, comp.label)]
gap = abs(b.sum_of_bars - b.cos)
analysed = ", ".join(map(str, row["analysed_layers"]))

with right:
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("cos(image, text)", f"{b.cos:+.4f}")
    m2.metric("analysed heads", f"{comp.share[is_head].sum():+.4f}",
              help=f"sum of the direct shares of the {w.plural(int(is_head.sum()), 'head')} of layers {analysed}")
    m3.metric("everything else", f"{comp.share[~is_head].sum():+.4f}",
              help="other layers' attention, MLPs, out-proj biases and the embedding term")
    m4.metric("computed in", f"{elapsed * 1000:.0f} ms")
    check = (f"Check: sum of the bars = {b.sum_of_bars:+.6f}, cos(image, text) = {b.cos:+.6f}, "
             f"|difference| = {gap:.1e}")
    if gap <= TOL:
        st.success(f"{check} ≤ {TOL:g}", icon=":material/check:")
    else:
        st.error(f"{check} > {TOL:g}: the bars do not add up", icon=":material/error:")
    st.caption(f"**{w.plain(text)}** ({source}) on {w.plain(choice.caption)}; model {w.plain(model_id)}.")
    if choice.image_id is not None and choice.faithful:
        stored = q(queries.image_embedding, model_id, choice.image_id).astype(np.float64)
        t64 = np.asarray(t_hat, dtype=np.float64)
        stored_cos = float(stored @ t64 / (np.linalg.norm(stored) * np.linalg.norm(t64)))
        st.caption(f"The warehouse's stored embedding of this image gives cos = {stored_cos:+.6f} "
                   f"(|difference from the live decomposition| = {abs(stored_cos - b.cos):.1e}).")

kinds = list(live.KINDS)
colour = alt.Color("kind:N", title="component", scale=alt.Scale(domain=kinds, range=KIND_COLOURS),
                   legend=alt.Legend(orient="top", columns=6, labelLimit=220))
tips = ["rank", "component", "kind", "label", alt.Tooltip("share:Q", format="+.5f"), "head page"]
bars = (alt.Chart(comp[["rank", "bar", "component", "kind", "label", "share", "head page"]],
                  title=f"Direct shares of cos(image, text), highest first ({len(comp)} bars)")
        .mark_bar()
        .encode(y=alt.Y("bar:N", sort=alt.SortField("rank"), title=None,
                        axis=alt.Axis(labelLimit=320, labelOverlap=False)),
                x=alt.X("share:Q", title="share of cos(image, text)"),
                color=colour, href="head page:N", tooltip=tips)
        .properties(height=alt.Step(20)))
rule = alt.Chart().mark_rule(color="#555").encode(x=alt.datum(0))
st.altair_chart(alt.layer(bars, rule), width="stretch", key="match_bars")

st.markdown("**Head pages** (the heads that push most towards the text, then most away from it)")
heads_only = comp[is_head]
top = heads_only.head(6)
bottom = heads_only.iloc[len(top):].tail(3).iloc[::-1]              # never a head twice
cols = st.columns(3)
for i, r in enumerate(list(top.itertuples()) + list(bottom.itertuples())):
    with cols[i % 3]:
        w.head_page_link(model_id, int(r.layer), int(r.head),
                         label=f"{r.component}{f' · {w.plain(r.label)}' if r.label else ''}: {r.share:+.4f}")

st.markdown("**Neurons behind a head** (MATH.md §10: each MLP neuron's second-order share of the head's share, "
            "alpha[n, head] times u[n, head] . t; open a neuron's page from its row)")
behind = heads_only[heads_only.layer >= 1]
if behind.empty:
    st.info("No analysed head has an MLP layer before it.")
else:
    names = list(behind.component)
    if st.session_state.get("match_neuron_head") not in names:
        st.session_state["match_neuron_head"] = names[0]
    pick = st.selectbox("Head", names, key="match_neuron_head",
                        format_func=lambda c: f"{c}: share {float(behind.share[behind.component == c].iloc[0]):+.4f}")
    hl, hh = w.parse_head(pick)
    nb, total = live.neurons_behind(row, choice.image, choice.key, (hl, hh), t_hat, k=12)
    nb.insert(0, "page", [w.neuron_page_url(model_id, l, n) for l, n in zip(nb.layer, nb.neuron)])
    nb.insert(1, "neuron name", [w.neuron_name(l, n) for l, n in zip(nb.layer, nb.neuron)])
    head_share = float(behind.share[behind.component == pick].iloc[0])
    st.caption(f"{pick}'s share {head_share:+.4f}; all neurons of MLP layers 0..{hl - 1} together "
               f"{total:+.4f} of it (the rest: the embedding term, earlier heads and biases). Largest first.")
    st.dataframe(nb, hide_index=True, width="stretch", key="match_neurons",
                 column_config={"page": st.column_config.LinkColumn("page", display_text="open neuron page"),
                                "share": st.column_config.NumberColumn(format="%+.5f")})

per_layer = b.layers.copy()
outside = comp[comp.kind.isin(["embedding term", "pool MLP"])]
st.markdown("**Every layer's direct share** (attention heads, MLP and out-proj bias per layer; "
            + " and ".join(f"the {k} {outside.share[outside.kind == k].sum():+.4f}" for k in outside.kind.unique())
            + " not in a layer)")
layer_chart = (alt.Chart(per_layer).mark_bar()
               .encode(x=alt.X("layer:O", axis=alt.Axis(labelAngle=0)), xOffset="part:N",
                       y=alt.Y("share:Q", title="share of cos(image, text)"),
                       color=alt.Color("part:N", scale=alt.Scale(domain=["attention heads", "MLP", "out-proj bias"],
                                                                 range=[KIND_COLOURS[0], KIND_COLOURS[2],
                                                                        KIND_COLOURS[3]])),
                       tooltip=["layer", "part", alt.Tooltip("share:Q", format="+.5f")])
               .properties(height=240))
st.altair_chart(layer_chart, width="stretch", key="match_layers")

with st.expander(f"Every bar as a table ({len(comp)} rows)"):
    table = comp[["rank", "component", "kind", "label", "share", "head page"]]
    st.dataframe(table, hide_index=True, width="stretch",
                 column_config={"share": st.column_config.NumberColumn(format="%+.6f"),
                                "head page": st.column_config.LinkColumn(display_text="open head page")})
    w.csv_download(table, f"match_{model_id.replace('/', '_')}", key="dl_match")
