"""Metrics: association and entanglement per model side by side with the per-layer spread,
property x model head counts, mean-ablation curves, and (on labelled factors such as the shapes
world) the head x factor probe matrix beside the head labels. Every chart's table is a CSV away."""
import altair as alt
import streamlit as st

from dashboard import widgets as w
from dashboard.data import q
from warehouse import queries

st.title("Metrics")
st.caption("Scores of MATH.md §5 (SQL views head_scores / model_scores), ablations (§2) and probes.")
row = w.model_picker()
model_id = row["model_id"]

# --------------------------------------------------------------------------- scores
st.header("Association and entanglement")
hs = q(queries.head_scores)
if hs.empty:
    st.info("No head scores yet: label heads (`python -m etl label`) so the head_scores view has rows.")
else:
    hs = hs[hs.property.notna()].copy()
    ms = q(queries.model_scores)
    st.dataframe(ms, hide_index=True, width="stretch")
    w.csv_download(ms, "model_scores", key="dl_model_scores")
    for score, meaning in (("association", "higher: a head's texts agree with its label"),
                           ("entanglement", "lower: a head's texts share one property")):
        st.subheader(f"{score.capitalize()} ({meaning})")
        colour = alt.Color("model_id:N", title="model", legend=alt.Legend(orient="bottom", labelLimit=400))
        y = alt.Y(f"{score}:Q", scale=alt.Scale(domain=[0, 1]))
        per_model = (alt.Chart(hs).mark_boxplot(extent="min-max", size=28)
                     .encode(x=alt.X("model_id:N", title=None, axis=alt.Axis(labels=False, ticks=False)), y=y,
                             color=colour)
                     .properties(title="per model (all labelled heads)", width=60 * hs.model_id.nunique() + 60,
                                 height=260))
        per_layer = (alt.Chart(hs).mark_boxplot(extent="min-max")
                     .encode(x=alt.X("layer:O", axis=alt.Axis(labelAngle=0)), xOffset="model_id:N", y=y, color=colour)
                     .properties(title="per layer (spread over the layer's heads)", width=480, height=260))
        st.altair_chart(alt.hconcat(per_model, per_layer), key=f"chart_{score}")
        w.csv_download(hs[["model_id", "layer", "head", "head_name", "property", score]], f"{score}_per_head",
                       key=f"dl_{score}")

# --------------------------------------------------------------------------- property counts
st.header("Heads per property and model")
counts = q(queries.property_head_counts)
if counts.empty:
    st.info("No labelled heads yet.")
else:
    base = alt.Chart(counts).encode(x=alt.X("model_id:N", title=None, axis=alt.Axis(labelAngle=0, labelLimit=260, orient="top")),
                                    y=alt.Y("property:N"))
    grid = (base.mark_rect().encode(color=alt.Color("n_heads:Q", title="heads", scale=alt.Scale(scheme="blues")),
                                    tooltip=["property", "model_id", "n_heads"])
            + base.mark_text(fontSize=12).encode(text="n_heads:Q"))
    st.altair_chart(grid.properties(width=220 * counts.model_id.nunique(), height=26 * counts.property.nunique(),
                                    autosize=alt.AutoSizeParams(type="pad")),   # the size is the cells', not the frame's
                    key="chart_counts", width="content")
    w.csv_download(counts, "property_head_counts", key="dl_counts")

# --------------------------------------------------------------------------- ablations
st.header("Mean ablation")
abl = q(queries.ablations)
if abl.empty:
    st.info("No ablation results yet: run `python -m etl ablate`.")
else:
    targets = sorted({(d, f) for d, f in zip(abl.dataset_id, abl.factor)})
    target = st.selectbox("Dataset and target", targets, format_func=lambda t: f"{t[0]} · {t[1]}", key="abl_target")
    a = abl[(abl.dataset_id == target[0]) & (abl.factor == target[1])]
    curve = a[a.kind == "attn_upto"]
    refs = a[a.kind.isin(["baseline", "mlps"])]
    lines = (alt.Chart(curve).mark_line(point=True)
             .encode(x=alt.X("layer:O", title="attention ablated in layers <= l"),
                     y=alt.Y("accuracy:Q", scale=alt.Scale(domain=[0, 1])), color="model_id:N"))
    rules = (alt.Chart(refs).mark_rule(strokeDash=[4, 3])
             .encode(y="accuracy:Q", color="model_id:N", tooltip=["model_id", "kind", "accuracy"]))
    st.altair_chart((lines + rules).properties(height=280, title="cumulative attention ablation "
                                                                 "(dashed: baseline and all MLPs ablated)"),
                    key="chart_ablation")
    per_head = a[(a.kind == "head") & (a.model_id == model_id)].copy()
    if not per_head.empty:
        base_acc = float(a[(a.kind == "baseline") & (a.model_id == model_id)].accuracy.max())
        per_head["drop"] = base_acc - per_head.accuracy
        st.altair_chart(alt.Chart(per_head).mark_rect()
                        .encode(x="head:O", y=alt.Y("layer:O", sort="descending"),
                                color=alt.Color("drop:Q", scale=alt.Scale(scheme="redblue", domainMid=0, reverse=True)),
                                tooltip=["layer", "head", "accuracy", "drop"])
                        .properties(title=f"accuracy drop when one head of {model_id} is mean-ablated", height=200),
                        key="chart_head_ablation")
    w.csv_download(a, "ablations", key="dl_ablations")

# --------------------------------------------------------------------------- probes
st.header("Probe matrix")
pr = q(queries.probes, model_id)
if pr.empty:
    st.info("No probes for this model (they need a dataset with known factors, such as the shapes world).")
else:
    ds = st.selectbox("Dataset", sorted(pr.dataset_id.unique()), key="probe_ds")
    p = pr[pr.dataset_id == ds].copy()
    p["head_name"] = [w.head_name(l, h) for l, h in zip(p["layer"], p["head"])]
    order = [w.head_name(l, h) for l, h in sorted({(int(l), int(h)) for l, h in zip(p["layer"], p["head"])})]
    y = alt.Y("head_name:N", sort=order, title="head")
    height = max(200, 22 * len(order))
    matrix = (alt.Chart(p).mark_rect()
              .encode(x=alt.X("factor:N"), y=y,
                      color=alt.Color("above_chance:Q", title="accuracy - chance",
                                      scale=alt.Scale(scheme="redblue", domainMid=0, reverse=True)),
                      tooltip=["head_name", "factor", "accuracy", "chance", "eta2", "property", "true_factor"])
              .properties(title="held-out probe accuracy above chance", width=60 * p.factor.nunique(), height=height))
    p["label_truth"] = [f"{lab} · {tf}" if isinstance(tf, str) else lab
                        for lab, tf in zip(p["property"], p["true_factor"])]
    labels = (alt.Chart(p.drop_duplicates("head_name")).mark_text(align="left", fontSize=12, color="#222")
              .encode(y=alt.Y("head_name:N", sort=order, axis=None), text="label_truth:N")
              .properties(title="label · true factor", width=170, height=height))
    st.altair_chart(alt.hconcat(matrix, labels), key="chart_probes")
    w.csv_download(p, f"probes_{model_id.replace('/', '_')}", key="dl_probes")

# --------------------------------------------------------------------------- ground truth
st.header("Labels against the known factors")
st.caption("On the shapes world every image factor is known (MATH.md §7): a head is *specialised* in a factor "
           "when the factor's class means explain >= 40 % of its variance (eta²) and >= 3x any other factor. "
           "Agreement = specialised heads whose label is their factor's property; a false label = an "
           "unspecialised head labelled with a property no factor with eta² >= 0.2 carries. Views "
           "`head_truth`, `head_label_truth`, `label_agreement`.")
agree = q(queries.label_agreement)
if agree.empty:
    st.info("No ground truth yet: run `python -m etl probe --model ... --dataset shapes:N:seed=S` on a labelled model.")
else:
    st.dataframe(agree, hide_index=True, width="stretch")
    w.csv_download(agree, "label_agreement", key="dl_agreement")
    study = q(queries.model_study)
    study = study[study.dataset_id.notna()]
    if not study.empty:
        order = list(dict.fromkeys(study.model_id))
        x = alt.X("model_id:N", sort=order, title=None,
                  axis=alt.Axis(labelAngle=-25, labelLimit=240, labelOverlap=False))
        colour = alt.Color("model_id:N", sort=order, legend=None, scale=alt.Scale(scheme="tableau10"))
        charts = []
        for col, title in (("agreement", "label agreement (specialised heads)"),
                           ("false_label_rate", "false labels (unspecialised heads)"),
                           ("association", "association"), ("entanglement", "entanglement")):
            stem = "false" if col == "false_label_rate" else col
            lo, hi = f"{stem}_lo", f"{stem}_hi"
            base = alt.Chart(study).encode(x=x)
            charts.append((base.mark_point(filled=True, size=80).encode(
                               y=alt.Y(f"{col}:Q", scale=alt.Scale(domain=[0, 1]), title=None), color=colour,
                               tooltip=["model_id", "dataset_id", col, lo, hi])
                           + base.mark_rule(strokeWidth=2).encode(y=f"{lo}:Q", y2=f"{hi}:Q", color=colour))
                          .properties(title=title, width=70 * len(order) + 60, height=200))
        st.altair_chart(alt.vconcat(alt.hconcat(*charts[:2]), alt.hconcat(*charts[2:])), key="chart_study")
        st.caption("Models ordered by image-tower size (layers x width²); bars: 95 % intervals (Wilson for the "
                   "rates, mean +- 1.96 SE over heads for the scores).")
        w.csv_download(study, "model_study", key="dl_study")
    truth = q(queries.head_label_truth, model_id)
    if not truth.empty:
        ds = st.selectbox("Shapes dataset", sorted(truth.dataset_id.unique()), key="truth_ds")
        t = truth[truth.dataset_id == ds].copy()
        t["true"] = t.true_factor.fillna("(unspecialised)")
        conf = t.groupby(["label", "true"]).size().reset_index(name="heads")
        base = alt.Chart(conf).encode(x=alt.X("true:N", title="true factor", axis=alt.Axis(labelAngle=0)),
                                      y=alt.Y("label:N", title="label"))
        st.altair_chart((base.mark_rect().encode(color=alt.Color("heads:Q", scale=alt.Scale(scheme="blues")),
                                                 tooltip=["label", "true", "heads"])
                         + base.mark_text(fontSize=13).encode(text="heads:Q"))
                        .properties(title=f"label x true factor, {model_id}", width=110 * conf.true.nunique(),
                                    height=34 * conf.label.nunique(), autosize=alt.AutoSizeParams(type="pad")),
                        key="chart_confusion", width="content")
        w.csv_download(t, f"head_label_truth_{model_id.replace('/', '_')}", key="dl_truth")
