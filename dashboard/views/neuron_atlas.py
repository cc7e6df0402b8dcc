"""The neurons of one analysed MLP layer (MATH.md §10), sortable by effect and by label, each row
linked to its neuron page. The URL keeps the model and layer (?model=...&layer=...)."""
import altair as alt
import streamlit as st

from dashboard import nav
from dashboard import widgets as w
from dashboard.data import q
from warehouse import queries

SORTS = {"effect (mean norm)": ("mean_norm", False), "selectivity (share where it matters)": ("share_matters", True),
         "label": ("label", True), "one direction (pc share)": ("pc_share", False),
         "text reconstruction (r2)": ("recon_r2", False), "neuron": ("neuron", True)}

st.title(nav.TITLES[nav.NEURON_ATLAS])
st.caption("Every neuron of an MLP layer by its second-order effect: what it writes into the image embedding "
           "through the later attention heads. Open a neuron's page from its row or its dot.")
url = (st.query_params.get("model"), st.query_params.get("layer"))
fresh = url != st.session_state.get("_neuron_atlas_url")
if fresh and url[0]:
    st.session_state["_atlas_model"] = url[0]
row = w.model_picker()
model_id = row["model_id"]
layers = w.analysed_neuron_layers(model_id)
options = [int(l) for l in layers.layer]
key = f"neuron_atlas_layer@{model_id}"
try:
    want = int(url[1]) if fresh and url[1] is not None else None
except ValueError:
    want = None
if want in options:
    st.session_state[key] = want
if st.session_state.get(key) not in options:
    st.session_state[key] = options[0]
c1, c2 = st.columns([1, 2])
layer = c1.selectbox("MLP layer", options, key=key,
                     format_func=lambda l: f"layer {l} (reach {layers[layers.layer == l].reach.iloc[0]:.3g})")
sort = c2.radio("Sort by", list(SORTS), key="neuron_atlas_sort", horizontal=True)
st.query_params.from_dict({"model": model_id, "layer": str(layer)})
st.session_state["_neuron_atlas_url"] = (model_id, str(layer))

info = layers[layers.layer == layer].iloc[0]
df = q(queries.neuron_atlas, model_id, layer)
col, asc = SORTS[sort]
df = df.sort_values([col, "neuron"], ascending=[asc, True], kind="stable").reset_index(drop=True)
df.insert(0, "page", [w.neuron_page_url(model_id, layer, n) for n in df.neuron])
st.text(f"{len(df)} neurons of MLP layer {layer} of {model_id}, over {int(info.n_images)} images of {info.dataset_id}; "
        f"effects through {int(info.later_heads)} later heads.")

m = st.columns(4)
m[0].metric("median share where it matters", f"{100 * df.share_matters.median():.1f} %")
m[1].metric("median pc share", f"{100 * df.pc_share.median():.0f} %")
m[2].metric("median text r2", f"{df.recon_r2.median():.2f}")
m[3].metric("specialised (shapes world)", f"{int(df.specialised.sum())} of {len(df)}",
            help="eta2 of the top factor >= 0.4 and >= 3x the second (MATH.md §7, the heads' rule)")

labels = sorted(set(df.label))
colour = alt.Color("label:N", scale=alt.Scale(domain=labels, range=[w.NOT_A_PROPERTY.get(p, w.PALETTE[i % len(w.PALETTE)])
                                                                    for i, p in enumerate(labels)]),
                   legend=alt.Legend(orient="bottom", columns=6))
dots = (alt.Chart(df[["page", "neuron", "label", "mean_norm", "share_matters", "top_text"]])
        .mark_circle(size=40, opacity=0.8)
        .encode(x=alt.X("share_matters:Q", title="share of images where it matters"),
                y=alt.Y("mean_norm:Q", scale=alt.Scale(type="log"), title="mean effect norm (log)"),
                color=colour, href="page:N",
                tooltip=["neuron", "label", alt.Tooltip("mean_norm:Q", format=".2e"),
                         alt.Tooltip("share_matters:Q", format=".3f"), "top_text"])
        .properties(height=320))
st.altair_chart(dots, width="stretch", key="neuron_atlas_dots")

SHOWN = ["page", "neuron", "label", "mean_norm", "share_matters", "pc_share", "recon_r2", "top_text"]  # the CSV has all
st.dataframe(df, hide_index=True, width="stretch", key="neuron_atlas_table",
             column_order=[c for c in SHOWN if c in df.columns],      # 1280 px: the quantiles are in the CSV
             column_config={"page": st.column_config.LinkColumn("page", display_text="open", width="small"),
                            "neuron": st.column_config.NumberColumn("neuron", width="small"),
                            "top_text": st.column_config.TextColumn("top text", width="medium"),
                            "mean_norm": st.column_config.NumberColumn("mean norm", format="%.2e"),
                            "q99": st.column_config.NumberColumn(format="%.2e"),
                            "max_norm": st.column_config.NumberColumn(format="%.2e"),
                            "share_matters": st.column_config.NumberColumn("matters on", format="%.3f"),
                            "pc_share": st.column_config.NumberColumn("pc share", format="%.2f"),
                            "recon_r2": st.column_config.NumberColumn("text r2", format="%.2f"),
                            "top_coef": st.column_config.NumberColumn(format="%+.3f"),
                            "top_eta2": st.column_config.NumberColumn(format="%.2f")})
w.csv_download(df, f"neurons_{model_id.replace('/', '_')}_L{layer}", key="dl_neuron_atlas")

counts = df.groupby("label", as_index=False).size().rename(columns={"size": "neurons"})
st.altair_chart(alt.Chart(counts, title="Neurons per label").mark_bar()
                .encode(x=alt.X("neurons:Q"), y=alt.Y("label:N", sort="-x", title=None), color=colour,
                        tooltip=["label", "neurons"]).properties(height=alt.Step(18)),
                width="stretch", key="neuron_atlas_labels")

abl = q(queries.neuron_ablations, model_id)
abl = abl[abl.layer == layer]
if not abl.empty:
    st.subheader("Zero-shot check (the paper's)", anchor=False)
    st.caption("Toy-eval accuracy with every neuron's effect of this layer replaced at once: by nothing (zero), its "
               "mean, its rank-1 form (phi . pc) pc, or its projection on its sparse text reconstruction.")
    table = abl.pivot_table(index="factor", columns="variant", values="accuracy").reset_index()
    order = [c for c in ("factor", "baseline", "zero", "mean", "rank1", "sparse") if c in table.columns]
    st.dataframe(table[order], hide_index=True, width="stretch", key="neuron_atlas_ablation")
