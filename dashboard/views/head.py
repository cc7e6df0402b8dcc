"""One head, everything about it, at a permalink: /head?model=...&layer=...&head=...

The URL holds the state: it is read when the page opens (a link, a reload) and rewritten on every
run, so a reload or a copied URL shows the same head. `head` may also be a head name (`L3.H1`).
Shows: label, confidence, scores and the ground-truth factor (head_truth); TextSpan texts with
their variance; the bank's texts ranked by their mean projection on the head (both ends, with the
head's variance along each); the images at both ends of the head's projection on a direction (its
first TextSpan text or a typed text), random samples per score quartile and the histogram of the
scores; links to every analysis of this head; the most similar heads of another model (by their
outputs on the shared images and by their text behaviour, dashboard/similar.py), each linking to
its own page."""
import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from dashboard import live, similar
from dashboard import widgets as w
from dashboard.data import q
from warehouse import queries


def _url_head() -> tuple:
    """(model, head name or None) from the URL: ?model=..&layer=..&head=.. or ?head=L3.H1."""
    model, layer, head = (st.query_params.get(k) for k in ("model", "layer", "head"))
    name = None
    try:
        if layer is not None and head is not None:
            name = w.head_name(int(layer), int(head))
        elif head is not None:
            name = w.head_name(*w.parse_head(head))
    except ValueError:
        name = None
    return model, name


st.title("Head")
url_model, url_head = _url_head()
if (url_model, url_head) != st.session_state.get("_head_page_url"):   # a link or a reload: the URL wins
    if url_model:
        st.session_state["_atlas_model"] = url_model
row = w.model_picker()                        # (consumes ?model=, ?head=; the URL is written back below)
model_id = row["model_id"]
if url_head and (url_model, url_head) != st.session_state.get("_head_page_url"):
    st.session_state["_atlas_head"] = url_head
st.session_state.pop("_atlas_head_link_new", None)
layer, head = w.one_head_picker(row, "head_page", label="Head")
name = w.head_name(layer, head)
st.query_params.from_dict({"model": model_id, "layer": str(layer), "head": str(head)})
st.session_state["_head_page_url"] = (model_id, name)

st.header(f"{name} of {w.plain(model_id)}", anchor=False)
st.caption(f"Permalink: {w.code(f'?model={model_id}&layer={layer}&head={head}')} — reload or share this URL to "
           "open the same head.")

label = q(queries.head_label, model_id, layer, head)
score = q(queries.head_score, model_id, layer, head)
truth = q(queries.head_truth_of, model_id, layer, head)
w.head_evidence(label, score, truth)

st.markdown(f"**Analyses of {name}**")
w.head_links(model_id, layer, head, label.get("property"), head_page=False)

# (tables full width: at 1280 px a half-width column would scroll their last columns out of sight)
texts = q(queries.head_texts, model_id, layer, head)
st.subheader("TextSpan texts")
if texts.empty:
    st.info("No TextSpan texts for this head yet: run `python -m etl textspan`.")
else:
    st.dataframe(texts, hide_index=True, width="stretch", key="head_textspan",
                 column_config=w.textspan_columns(texts))
st.subheader("The bank's texts on this head")
ranking = q(queries.head_text_ranking, model_id, layer, head)
if ranking.empty:
    st.info("No text embeddings or head embeddings for this model: run `python -m etl texts` and `embed`.")
else:
    k = min(10, len(ranking))
    st.caption(f"{w.plural(len(ranking), 'text')}, ranked by the head's mean share of cos(image, text) "
               "over the warehouse's images; variance: how much the head moves along the text.")
    fmt = {"mean": st.column_config.NumberColumn(format="%+.5f"),
           "variance": st.column_config.NumberColumn(format="%.2e")}
    st.markdown("Highest mean projection")
    st.dataframe(ranking.head(k), hide_index=True, width="stretch", column_config=fmt, key="head_rank_top")
    st.markdown("Lowest mean projection")
    st.dataframe(ranking.tail(k).iloc[::-1], hide_index=True, width="stretch", column_config=fmt,
                 key="head_rank_bottom")

st.subheader("Similar heads in other models")
others = [m for m in q(queries.models).model_id if m != model_id]
if not others:
    st.info("No other model in the warehouse to compare this head with: embed another model "
            "(`python -m etl run --model ...`) on the same images and texts.")
else:
    controls = set(w.random_models())
    pick_key = f"head_similar_model@{model_id}"
    if st.session_state.get(pick_key) not in others:            # default: the first other trained model
        st.session_state[pick_key] = next((m for m in others if m not in controls), others[0])
    sc1, sc2 = st.columns([2, 3])
    other = sc1.selectbox("Other model", others, key=pick_key,
                          format_func=lambda m: f"{m} (random init)" if m in controls else m)
    by = sc2.radio("Similarity", list(similar.MEASURES), key="head_similar_by", horizontal=True,
                   format_func=lambda k: similar.MEASURES[k])
    matches = similar.similar_heads(model_id, (layer, head), other, by=by, k=5)
    pr = similar.pair(model_id, other)
    if matches.empty:
        st.info(f"No head embeddings of {name} to compare." if (layer, head) not in pr["heads_a"] else
                f"{w.plain(model_id)} and {w.plain(other)} share no images (CKA needs images embedded by both)."
                if by == "cka" else f"{w.plain(model_id)} and {w.plain(other)} share no embedded texts.")
    else:
        st.caption(f"The heads of {w.plain(other)} most like {name}: CKA of their outputs on the "
                   f"{w.plural(pr['n_images'], 'image')} both models embedded (1: the same geometry up to "
                   f"rotation and scale), and Spearman's rho of their variance along each of the "
                   f"{w.plural(pr['n_texts'], 'text')} both embedded (1: the same texts in the same order). "
                   "The two joint spaces differ, so no vectors are compared directly (models/similarity.py).")
        for r in matches.itertuples():
            c1, c2, c3, c4 = st.columns([3, 1, 1, 2])
            with c1:
                w.head_page_link(other, r.layer, r.head, label=f"{r.rank}. {r.head_name} of {w.plain(other)}")
            c2.markdown(f"CKA **{r.cka:.3f}**")
            c3.markdown(f"rho **{r.text:+.3f}**")
            c4.markdown(w.plain(r.property))
        w.csv_download(matches, f"similar_{name}_in_{other.replace('/', '_')}", key="dl_head_similar")

st.subheader("Images along a direction")
options = (["first TextSpan text"] if not texts.empty else []) + ["typed text"]
basis = st.radio("Direction", options, key="head_basis", horizontal=True)
if basis == "first TextSpan text":
    direction_text = str(texts.text.iloc[0])
else:
    direction_text = st.text_input("Text", value="a red object", key="head_text", max_chars=300)
if not direction_text.strip():
    st.warning("Type a text to project the head's embeddings on.")
    st.stop()
t_hat, source = live.text_vector(row, direction_text)
scores = q(queries.head_image_scores, model_id, layer, head, np.asarray(t_hat, dtype=np.float32))
if scores.empty:
    st.info("No head embeddings for this head yet: run `python -m etl embed`.")
    st.stop()
st.caption(f"score = c[{name}] · t̂(**{w.plain(direction_text)}**) ({source}): the head's share of cos(image, text), "
           f"over {w.plural(len(scores), 'image')}.")
n_show = st.slider("Images at each end", 2, 16, 6, key="head_k")
top, bottom = scores.head(n_show), scores.tail(n_show).iloc[::-1]


def _thumbs(df: pd.DataFrame, key: str) -> None:
    th = q(queries.image_thumbnails, tuple(df.image_id)).merge(df[["image_id", "score"]], on="image_id")
    w.thumbnails(th.set_index("image_id").loc[list(df.image_id)].reset_index(), columns=min(n_show, 8))


st.markdown(f"**Top {w.plural(len(top), 'image')}** (most towards the text)")
_thumbs(top, "top")
st.markdown(f"**Bottom {w.plural(len(bottom), 'image')}** (most away from the text)")
_thumbs(bottom, "bottom")

hist = (alt.Chart(scores[["image_id", "score"]], title=f"Scores of {name} on '{direction_text}'")
        .mark_bar().encode(x=alt.X("score:Q", bin=alt.Bin(maxbins=40), title="c[l,h] · t̂"),
                           y=alt.Y("count():Q", title="images"))
        .properties(height=220))
st.altair_chart(hist, width="stretch", key="head_hist")

if len(scores) >= 4:
    st.markdown("**Random samples per score quartile** (lowest quartile first)")
    quart = pd.qcut(scores.score.rank(method="first"), 4, labels=["Q1 (lowest)", "Q2", "Q3", "Q4 (highest)"])
    rng = np.random.default_rng(0)
    for qname in ["Q1 (lowest)", "Q2", "Q3", "Q4 (highest)"]:
        members = scores[quart == qname]
        pick = members.iloc[np.sort(rng.choice(len(members), size=min(4, len(members)), replace=False))]
        st.caption(f"{qname}: scores {members.score.min():+.4f} .. {members.score.max():+.4f}")
        _thumbs(pick, qname)
w.csv_download(scores, f"scores_{model_id.replace('/', '_')}_{name}", key="dl_head_scores")
