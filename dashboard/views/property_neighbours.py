"""Property-based nearest neighbours (MATH.md §6.1): images that look alike *in one property*.

Query and database vectors are the sums of the head embeddings of the heads labelled with
the property; images are ranked by the dot product (their share of cosine similarity)."""
import streamlit as st

from dashboard import live
from dashboard import widgets as w
from dashboard.data import q
from warehouse import queries

st.title("Property neighbours")
st.caption("Nearest neighbours through only the heads that carry one property (e.g. colours), "
           "so images match in that property and not in everything else.")
row = w.model_picker()
model_id = row["model_id"]
props = q(queries.properties, model_id)
if props.empty:
    st.info("No head of this model is labelled yet. Label heads with `python -m etl label` "
            "(or `python -m etl run ...`), then reload.")
    st.stop()
names = [p for p in props.property if p not in w.NOT_A_PROPERTY]      # 'mixed' is no property
if not names:
    st.info("No head of this model carries a property label: every labelled head is 'mixed'.")
    st.stop()
if st.session_state.pop("_atlas_head_link_new", False):     # opened from a head card: that head's property
    linked = st.session_state["_atlas_head"]
    prop_of_head = w.head_labels(row).get(w.parse_head(linked))
    if prop_of_head not in names:       # a 'mixed' head names no property: say so, never show another one
        from dashboard import links, nav
        st.query_params.from_dict({"model": model_id, "head": linked})        # the link as it was asked
        links.refuse(nav.PROPERTY_NN, f"the property neighbours of {linked}",
                     f"is labelled '{prop_of_head or 'unlabelled'}', not with a property",
                     f"the properties of {model_id}'s heads: " + ", ".join(names) + ".", {"model": model_id},
                     f"{nav.TITLES[nav.PROPERTY_NN]} of {model_id}, choosing a property")
    st.session_state[f"pnn_prop@{model_id}"] = prop_of_head
counts = dict(zip(props.property, props.n_heads))
prop = st.selectbox("Property", names, key=f"pnn_prop@{model_id}", format_func=lambda p: f"{p} ({w.plural(int(counts[p]), 'head')})")
heads = [(int(r.layer), int(r.head)) for r in q(queries.property_heads, model_id, prop).itertuples()]
st.caption(f"{w.plural(len(heads), 'head')} labelled '{w.plain(prop)}': " + ", ".join(w.head_name(*h) for h in heads))
choice = w.image_input(row, "pnn")
k = st.slider("Neighbours", 1, 24, 8, key="pnn_k")

if choice is not None and heads:
    query = live.query_head_vectors(row, choice, heads).sum(0)                  # [d]
    hits = q(queries.neighbours_by_head_sum, model_id, heads, query, k, choice.image_id)
    a, b = st.columns([1, 3])
    with a:
        st.image(live.model_view(row, choice.image), caption=f"query: {w.plain(choice.caption)}", width="stretch")
    with b:
        st.markdown(f"**Top {len(hits)} by '{w.plain(prop)}' heads** (score = sum of head embeddings, dot product)")
        w.thumbnails(hits, columns=4)
    st.dataframe(hits.drop(columns=["thumbnail"]), hide_index=True, width="stretch")
    w.csv_download(hits, f"property_neighbours_{prop}", key="dl_pnn")
