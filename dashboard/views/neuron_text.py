"""Which neurons write this text? The analysed neurons ranked by the cosine of their principal
direction (pc, MATH.md §10) with the text's unit embedding. The URL keeps the model and the text."""
import streamlit as st

from dashboard import live, nav
from dashboard import widgets as w
from dashboard.data import q
from warehouse import queries

st.title(nav.TITLES[nav.NEURON_TEXT])
st.caption("A neuron's second-order effect lies close to one direction (its pc). The neurons whose pc points most "
           "along a text's embedding are the ones that write that text into the image embedding, through the "
           "later attention heads, on the images where they fire.")
url = (st.query_params.get("model"), st.query_params.get("text"))
fresh = url != st.session_state.get("_neuron_text_url")
if fresh and url[0]:
    st.session_state["_atlas_model"] = url[0]
if fresh and url[1]:
    st.session_state["neuron_text"] = url[1]
st.session_state.setdefault("neuron_text", "a red shape")
row = w.model_picker()
model_id = row["model_id"]
layers = w.analysed_neuron_layers(model_id)
c1, c2, c3 = st.columns([3, 1, 1])
text = c1.text_input("Text", key="neuron_text", max_chars=300)
choices = ["every analysed layer"] + [int(l) for l in layers.layer]
which = c2.selectbox("MLP layer", choices, key=f"neuron_text_layer@{model_id}",
                     format_func=lambda l: l if isinstance(l, str) else f"layer {l}")
k = c3.slider("Neurons", 5, 50, 15, key="neuron_text_k")
st.query_params.from_dict({"model": model_id, "text": text})
st.session_state["_neuron_text_url"] = (model_id, text)
if not text.strip():
    st.warning("Type a text to find the neurons that write it.")
    st.stop()
t_hat, source = live.text_vector(row, text)
df = q(queries.neurons_writing, model_id, t_hat, k, None if isinstance(which, str) else int(which))
df.insert(0, "page", [w.neuron_page_url(model_id, l, n) for l, n in zip(df.layer, df.neuron)])
df.insert(1, "name", [w.neuron_name(l, n) for l, n in zip(df.layer, df.neuron)])
st.text(f"{text!r} ({source}): the {len(df)} neurons of {model_id} whose pc is most aligned with it.")
st.dataframe(df, hide_index=True, width="stretch", key="neuron_text_table",
             column_config={"page": st.column_config.LinkColumn("page", display_text="open"),
                            "cosine": st.column_config.ProgressColumn(format="%+.3f", min_value=-1.0, max_value=1.0),
                            "share_matters": st.column_config.NumberColumn(format="%.3f"),
                            "mean_norm": st.column_config.NumberColumn(format="%.2e")})
w.csv_download(df, f"neurons_writing_{model_id.replace('/', '_')}", key="dl_neuron_text")
if len(df):
    best = df.iloc[0]
    w.neuron_page_link(model_id, int(best.layer), int(best.neuron),
                       label=f"Neuron page of {best['name']}, the closest (cosine {best.cosine:+.3f})")
