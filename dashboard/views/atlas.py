"""Atlas (home): the models in the warehouse, a layer x head grid coloured by property label (a
click on an analysed head opens its head page, /head?model=&layer=&head=), and a head card
(TextSpan texts, label, scores, top images, links to every analysis)."""
import altair as alt
import streamlit as st

from dashboard import nav
from dashboard import widgets as w
from dashboard.data import q
from warehouse import queries

st.title("CLIP Atlas")
st.caption("Every attention head of every CLIP vision transformer in the warehouse, described by text.")
row = w.model_picker()
model_id = row["model_id"]

with st.expander(f"Models in the warehouse ({len(q(queries.models))})", expanded=True):
    ms = q(queries.models)
    shown = ms.assign(tower=[f"{l} x {wd}, {h} heads" for l, wd, h in zip(ms.layers, ms.width, ms.heads)],
                      input=[f"{s} px / {p} px patches" for s, p in zip(ms.image_size, ms.patch_size)])
    st.dataframe(shown[["model_id", "source", "tower", "input", "n_images", "n_labelled_heads"]], hide_index=True,
                 width="stretch", column_config={"n_images": st.column_config.NumberColumn("images"),
                                                 "n_labelled_heads": st.column_config.NumberColumn("labelled heads")})
    st.caption("Smallest image tower first. Every column of the `models` table is in the CSV.")
    w.csv_download(ms, "models", key="dl_models")

grid = q(queries.head_grid, model_id)
grid["head_name"] = [w.head_name(l, h) for l, h in zip(grid["layer"], grid["head"])]
st.subheader(f"Heads of {w.plain(model_id)}")
st.caption(f"{row['layers']} layers x {row['heads']} heads; analysed layers "
           f"{', '.join(map(str, row['analysed_layers']))}. Click an analysed head to open its page; "
           "the head card below follows the head picker.")
pick = alt.selection_point(name="pick", fields=["layer", "head"], on="click")
labels = sorted(set(grid.property) - set(w.NOT_A_PROPERTY))
greys = [p for p in w.NOT_A_PROPERTY if p in set(grid.property)]
colour = alt.Color("property:N", title="property label",
                   scale=alt.Scale(domain=labels + greys,
                                   range=[w.PALETTE[i % len(w.PALETTE)] for i in range(len(labels))]
                                   + [w.NOT_A_PROPERTY[p] for p in greys]),
                   legend=alt.Legend(orient="bottom", columns=6, symbolLimit=0, labelLimit=200))
base = alt.Chart(grid).encode(x=alt.X("head:O", title="head", axis=alt.Axis(labelAngle=0, orient="top")),
                              y=alt.Y("layer:O", title="layer", sort="descending"))
cells = (base.mark_rect(stroke="white", strokeWidth=2)
         .encode(color=colour, opacity=alt.condition(pick, alt.value(1.0), alt.value(0.45)),
                 tooltip=["head_name", "property", alt.Tooltip("confidence:Q", format=".2f"),
                          alt.Tooltip("p_value:Q", title="p-value", format=".3g"), "top_text"])
         .add_params(pick))
names = base.mark_text(fontSize=10, color="#222").encode(text=alt.Text("property:N"))
chart = alt.layer(cells, names).properties(height=30 * int(row["layers"]),   # the plot's height; width fits the page
                                           autosize=alt.AutoSizeParams(type="fit-x", contains="padding"))
event = st.altair_chart(chart, on_select="rerun", selection_mode="pick", key="atlas_grid", width="stretch")
picked = ((event or {}).get("selection") or {}).get("pick") or []      # a dict-like chart state
if not picked:
    st.session_state.pop("_atlas_grid_pick", None)
elif picked[0].get("layer") in row["analysed_layers"]:
    layer_, head_ = int(picked[0]["layer"]), int(picked[0]["head"])
    name = w.head_name(layer_, head_)
    if st.session_state.get("_atlas_grid_pick") != name:       # a new click, not the same selection again
        st.session_state["_atlas_grid_pick"] = name
        st.session_state["_atlas_head"] = name
        st.switch_page(nav.HEAD, query_params=w.head_page_params(model_id, layer_, head_))   # its permalink
w.csv_download(grid, f"heads_{model_id.replace('/', '_')}", key="dl_grid")

st.subheader("Head card")
layer, head = w.one_head_picker(row, "atlas_head")
label = q(queries.head_label, model_id, layer, head)
score = q(queries.head_score, model_id, layer, head)
w.head_evidence(label, score, q(queries.head_truth_of, model_id, layer, head))

texts = q(queries.head_texts, model_id, layer, head)      # full width: a half column would hide its last columns
st.markdown(f"**TextSpan texts of {w.head_name(layer, head)}** (variance explained)")
if texts.empty:
    st.info("No TextSpan texts for this head yet: run `python -m etl textspan`.")
else:
    st.dataframe(texts, hide_index=True, width="stretch", column_config=w.textspan_columns(texts))
    w.csv_download(texts, f"texts_{w.head_name(layer, head)}", key="dl_texts")
top = q(queries.head_top_images, model_id, layer, head, 8)
st.markdown(f"**Top images** (score = c[l,h] · {w.plain(top.basis.iloc[0]) if len(top) else 'text'})")
if top.empty:
    st.info("No head embeddings for this head yet: run `python -m etl embed`.")
else:
    w.thumbnails(top, columns=8)

st.markdown("**Analyses of this head**")
w.head_links(model_id, layer, head, label.get("property"))
