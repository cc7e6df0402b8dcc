"""Metrics: association and tag entropy per model side by side with the per-layer spread,
property x model head counts, mean-ablation curves, heads across models (a model x model matrix of
best-match similarity, dashboard/similar.py), and (on labelled factors such as the shapes world)
the head x factor probe matrix beside the head labels; then the measured sections of
dashboard/measures.py (agreement beyond chance with its baselines, the paper's scores as read, the
label-free ground truth, the size study). Every chart's table is a CSV away.

Every chart that tells models apart colours them with widgets.model_colour (one fixed colour per
model, greys for random-init controls) and names them on an axis or in a legend; the depth axis can
be the layer index or the relative depth (layer + 1) / layers; a random-init control's range is
drawn as a grey band behind the scores; the ablation target opens on the largest per-head drop."""
import altair as alt
import pandas as pd
import streamlit as st

from dashboard import measures, similar
from dashboard import widgets as w
from dashboard.data import q
from warehouse import queries

st.title("Metrics")
st.caption("Scores of MATH.md §5 (SQL views head_scores / model_scores), agreement beyond chance, the paper's scores "
           "as read and the label-free ground truth (§11, migration 007), ablations (§2), probes and the size study.")
row = w.model_picker()
model_id = row["model_id"]

# --------------------------------------------------------------------------- scores
models_df = q(queries.models)
controls = w.random_models(models_df)
depth_mode = st.radio("Depth axis", ["layer", "relative depth"], key="metrics_depth", horizontal=True,
                      help="relative depth = (layer + 1) / layers: 1 is the last block of every model, so a "
                           "4-layer and an 8-layer model line up")
relative = depth_mode == "relative depth"
n_layers = dict(zip(models_df.model_id, models_df.layers))


def with_depth(df):
    """df (with model_id, layer) plus `depth` = (layer + 1) / layers of its model (NaN where layer is NULL)."""
    df = df.copy()
    df["depth"] = [float("nan") if pd.isna(l) else (int(l) + 1) / int(n_layers[m])    # NULL layer: a whole-model row
                   for m, l in zip(df.model_id, df.layer)]
    return df


def head_drops(abl):
    """Per-head accuracy drops: model_id, dataset_id, factor, layer, head, drop = baseline - accuracy."""
    base = (abl[abl.kind == "baseline"].groupby(["model_id", "dataset_id", "factor"]).accuracy.max()
            .rename("base").reset_index())
    d = abl[abl.kind == "head"].merge(base, on=["model_id", "dataset_id", "factor"])
    d["drop"] = d["base"] - d["accuracy"]
    return d


def largest_drop(drops, model, target):
    """The largest |drop| of one head of `model` on `target` (dataset, factor); None without per-head rows."""
    d = drops[(drops.model_id == model) & (drops.dataset_id == target[0]) & (drops.factor == target[1])]
    return float(d["drop"].abs().max()) if len(d) else None


def default_ablation_target(drops, model, targets):
    """The target where one head of `model` matters most (largest |drop|); for a model without per-head
    ablations, the target with the largest drop of any model; the first target when every drop is 0."""
    d = drops[drops.model_id == model]
    if d.empty or float(d["drop"].abs().max()) == 0:
        d = drops
    if d.empty or float(d["drop"].abs().max()) == 0:
        return targets[0]
    best = d.assign(m=d["drop"].abs()).groupby(["dataset_id", "factor"]).m.max()
    return tuple(best.sort_values(ascending=False, kind="stable").index[0])


st.header("Association and tag entropy (within heads)")
hs = q(queries.head_scores)
if hs.empty:
    st.info("No head scores yet: label heads (`python -m etl label`) so the head_scores view has rows.")
else:
    hs = with_depth(hs[hs.property.notna()])
    ms = q(queries.model_scores)
    st.dataframe(ms, hide_index=True, width="stretch", column_config=w.short_columns(ms))
    w.csv_download(ms, "model_scores", key="dl_model_scores")
    order = [m for m in models_df.model_id if m in set(hs.model_id)]     # by image-tower size, as everywhere
    if controls:
        st.caption(f"Grey band: the range of the random-init control{'s' if len(controls) > 1 else ''} "
                   f"({w.plain(', '.join(controls))}) over its heads, dashed line its mean: what training adds is "
                   "the distance from it.")
    for score, meaning in (("association", "higher: a head's texts agree with its label"),
                           ("tag_entropy", "lower: a head's texts share one property; within one head, not the "
                                           "paper's entanglement")):
        st.subheader(f"{score.capitalize()} ({meaning})")
        domain = w.zoom_domain(hs[score])

        def score_charts(score=score, domain=domain):
            """(per model, per layer) charts of one score (built once per warehouse version and inputs)."""
            y = alt.Y(f"{score}:Q", scale=alt.Scale(domain=domain, clamp=True), title=score)
            x_model = alt.X("model_id:N", sort=order, title=None,
                            axis=alt.Axis(labelAngle=-30, labelLimit=0, labelOverlap=False))
            layers = []
            ctl = hs[hs.model_id.isin(controls)]
            if len(ctl):
                band = alt.Chart(pd.DataFrame({"lo": [ctl[score].min()], "hi": [ctl[score].max()],
                                               "mean": [ctl[score].mean()], "control": [", ".join(controls)]}))
                layers = [band.mark_rect(color=w.CONTROL_BAND, opacity=0.18).encode(
                              y=alt.Y("lo:Q", scale=alt.Scale(domain=domain, clamp=True)), y2="hi:Q",
                              tooltip=["control", "lo", "hi", "mean"]),
                          band.mark_rule(color=w.CONTROL_BAND, strokeDash=[5, 3], strokeWidth=2).encode(
                              y=alt.Y("mean:Q", scale=alt.Scale(domain=domain, clamp=True)))]
            # half the page wide: one model a legend row (side by side, two long names overflow the column)
            colour = w.model_colour(legend=alt.Legend(orient="bottom", labelLimit=0, columns=1))
            boxes = (alt.Chart(hs).mark_boxplot(extent="min-max", size=28, opacity=0.85)
                     .encode(x=x_model, y=y, color=colour))
            means = (alt.Chart(hs).mark_point(shape="diamond", filled=True, size=70, color="black")
                     .encode(x=x_model, y=alt.Y(f"mean({score}):Q", scale=alt.Scale(domain=domain, clamp=True)), tooltip=["model_id", alt.Tooltip(f"mean({score}):Q", format=".3f")]))
            per_model = alt.layer(*layers, boxes, means).properties(
                title="per model (all labelled heads; diamond: mean)", height=260)
            if relative:
                agg = (hs.groupby(["model_id", "layer", "depth"])[score]
                       .agg(["mean", "min", "max", "count"]).reset_index())
                base = alt.Chart(agg).encode(x=alt.X("depth:Q", title="relative depth (layer + 1) / layers",
                                                     scale=alt.Scale(domain=[0, 1])), color=colour)
                per_layer = alt.layer(
                    *layers,
                    base.mark_line(point=True).encode(y=alt.Y("mean:Q", scale=alt.Scale(domain=domain, clamp=True),
                                                              title=score),
                                                      tooltip=["model_id", "layer", "depth", "mean", "min", "max",
                                                               "count"]),
                    base.mark_rule(opacity=0.5).encode(y="min:Q", y2="max:Q")
                ).properties(title="per relative depth (mean over the layer's heads, bar: min-max)", height=260)
            else:
                per_layer = alt.layer(*layers, alt.Chart(hs).mark_boxplot(extent="min-max")
                                      .encode(x=alt.X("layer:O", axis=alt.Axis(labelAngle=0)),
                                              xOffset=alt.XOffset("model_id:N", sort=order), y=y, color=colour)
                                      ).properties(title="per layer (spread over the layer's heads)", height=260)
            return per_model, per_layer

        # two charts in two columns, each as wide as its column: side by side they fit 1280 px
        left, right = st.columns(2)
        deps = (score, relative, tuple(order), tuple(controls))
        w.chart(f"chart_{score}", lambda: score_charts()[0], deps, container=left, width="stretch")
        w.chart(f"chart_{score}_layers", lambda: score_charts()[1], deps, container=right, width="stretch")
        st.caption(f"y axis zoomed to {domain[0]:g} .. {domain[1]:g}, where the {score} values lie.")
        w.csv_download(hs[["model_id", "layer", "head", "head_name", "property", "depth", score]],
                       f"{score}_per_head", key=f"dl_{score}")

# --------------------------------------------------------------------------- property counts
st.header("Heads per property and model")
counts = q(queries.property_head_counts)
if counts.empty:
    st.info("No labelled heads yet.")
else:
    by_size = [m for m in models_df.model_id if m in set(counts.model_id)]     # a row per model, smallest first

    def counts_chart():
        base = alt.Chart(counts).encode(y=alt.Y("model_id:N", title=None, sort=by_size, axis=alt.Axis(labelLimit=0)),
                                        x=alt.X("property:N", title=None,
                                                axis=alt.Axis(labelAngle=-30, labelLimit=0, orient="top")))
        grid = (base.mark_rect().encode(color=alt.Color("n_heads:Q", title="heads", scale=alt.Scale(scheme="blues")),
                                        tooltip=["property", "model_id", "n_heads"])
                + base.mark_text(fontSize=12).encode(text="n_heads:Q"))
        return grid.properties(height=30 * len(by_size))
    w.chart("chart_counts", counts_chart, (tuple(by_size),), width="stretch")
    w.csv_download(counts, "property_head_counts", key="dl_counts")

# --------------------------------------------------------------------------- ablations
st.header("Mean ablation")
abl = q(queries.ablations)
if abl.empty:
    st.info("No ablation results yet: run `python -m etl ablate`.")
else:
    targets = sorted({(d, f) for d, f in zip(abl.dataset_id, abl.factor)})
    drops = head_drops(abl)
    default = default_ablation_target(drops, model_id, targets)
    tkey = f"abl_target@{model_id}"
    if st.session_state.get(tkey) not in targets:
        st.session_state[tkey] = default
    target = st.selectbox("Dataset and target", targets, key=tkey,
                          format_func=lambda t: f"{t[0]} · {t[1]}"
                          + (f"  (largest drop {largest_drop(drops, model_id, t):.3f})"
                             if largest_drop(drops, model_id, t) is not None else ""),
                          help="opens on the target where one head of this model matters most (largest drop)")
    a = with_depth(abl[(abl.dataset_id == target[0]) & (abl.factor == target[1])])
    curve = a[a.kind == "attn_upto"]
    refs = a[a.kind.isin(["baseline", "mlps"])]

    def ablation_chart():
        x_curve = (alt.X("depth:Q", title="attention ablated up to relative depth (layer + 1) / layers",
                         scale=alt.Scale(domain=[0, 1]))
                   if relative else alt.X("layer:O", title="attention ablated in layers <= l"))
        colour = w.model_colour(legend=alt.Legend(orient="right", labelLimit=400))   # below, it would squash the plot
        lines = (alt.Chart(curve).mark_line(point=True)
                 .encode(x=x_curve, y=alt.Y("accuracy:Q", scale=alt.Scale(domain=[0, 1])), color=colour,
                         tooltip=["model_id", "layer", "depth", "accuracy"]))
        rules = (alt.Chart(refs).mark_rule(strokeDash=[4, 3])
                 .encode(y="accuracy:Q", color=colour, tooltip=["model_id", "kind", "accuracy"]))
        return (lines + rules).properties(height=280, title="cumulative attention ablation "
                                                            "(dashed: baseline and all MLPs ablated)")
    w.chart("chart_ablation", ablation_chart, (tuple(target), relative), width="stretch")
    per_head = a[(a.kind == "head") & (a.model_id == model_id)].copy()
    if not per_head.empty:
        base_acc = float(a[(a.kind == "baseline") & (a.model_id == model_id)].accuracy.max())
        per_head["drop"] = base_acc - per_head.accuracy
        big = float(max(per_head["drop"].abs().max(), 1e-3))
        w.chart("chart_head_ablation", lambda: (
            alt.Chart(per_head).mark_rect()
            .encode(x="head:O", y=alt.Y("layer:O", sort="descending"),
                    color=alt.Color("drop:Q", scale=alt.Scale(scheme="redblue", domain=[-big, big],
                                                              domainMid=0, reverse=True)),
                    tooltip=["layer", "head", "accuracy", "drop"])
            .properties(title=f"accuracy drop when one head of {model_id} is mean-ablated", height=200)),
            (model_id, tuple(target)), width="stretch")
    w.csv_download(a, "ablations", key="dl_ablations")

# --------------------------------------------------------------------------- heads across models
st.header("Heads across models")
all_models = list(models_df.model_id)                     # by image-tower size
if len(all_models) < 2:
    st.info("One model only: heads across models need a second model embedded on the same images and texts.")
else:
    by = st.radio("Similarity", list(similar.MEASURES), key="metrics_similar_by", horizontal=True,
                  format_func=lambda k: similar.MEASURES[k])
    mm = similar.model_matrix(all_models, by)
    st.caption("Row model A, column model B: the mean over A's heads of each head's best match among B's heads "
               "(models/similarity.py). CKA compares the heads' outputs on the images both models embedded; rho "
               "compares which of the shared texts each head varies along. Directed: a small model's few heads "
               "find partners among a large model's many more easily than the reverse. A random-init control "
               "row or column is the measure's floor: where the control scores as high as a trained model "
               "(CKA on the toy world, whose image variance is mostly the background that untrained heads "
               "carry too), the measure sees what training did not add.")
    label = {m: f"{m} (random init)" if m in controls else m for m in all_models}
    mm["A"] = mm.model_a.map(label)
    mm["B"] = mm.model_b.map(label)
    names = [label[m] for m in all_models]

    def similarity_chart():
        # the axes' names in the title: a y-axis title beside long model names overlaps them
        base = alt.Chart(mm).encode(x=alt.X("B:N", sort=names, title=None,
                                            axis=alt.Axis(labelAngle=-30, labelLimit=0, orient="top",
                                                          labelOverlap=False)),
                                    y=alt.Y("A:N", sort=names, title=None, axis=alt.Axis(labelLimit=0)))
        heat = (base.mark_rect().encode(color=alt.Color("mean_best:Q", title="mean best match",
                                                        scale=alt.Scale(scheme="viridis", domain=[0, 1]),
                                                        legend=alt.Legend(gradientLength=70)),   # inside 110 px
                                        tooltip=["model_a", "model_b", alt.Tooltip("mean_best:Q", format=".3f"),
                                                 "n_heads", "n_images", "n_texts"])
                + base.mark_text(fontSize=12).encode(text=alt.Text("mean_best:Q", format=".2f"),
                                                     color=alt.condition("datum.mean_best > 0.6", alt.value("black"),
                                                                         alt.value("white"))))
        return heat.properties(height=max(110, 34 * len(all_models)),     # room for the colour legend
                               title="row: model A (its heads) · column: model B (matched in)")
    w.chart("chart_model_similarity", similarity_chart, (by, tuple(all_models)), width="stretch")
    w.csv_download(mm.drop(columns=["A", "B"]), f"model_similarity_{by}", key="dl_model_similarity")
    pairs = [(a, b) for a in all_models for b in all_models if a != b]
    pkey = "metrics_similar_pair"
    if st.session_state.get(pkey) not in pairs:
        st.session_state[pkey] = next(((a, b) for a, b in pairs if a == model_id), pairs[0])
    pa_, pb_ = st.selectbox("Per-head matching", pairs, key=pkey, format_func=lambda p: f"{p[0]}  →  {p[1]}")
    bm = similar.best_matches(pa_, pb_, by)
    if bm.empty:
        st.info(f"{w.plain(pa_)} and {w.plain(pb_)} share no " + ("images." if by == "cka" else "texts."))
    else:
        st.caption(f"Each head of **{w.plain(pa_)}** (A) with its best match among the heads of "
                   f"**{w.plain(pb_)}** (B).")                           # the ids here: headers stay short
        st.dataframe(bm[["head_name", "match", "similarity", "link"]], hide_index=True, width="stretch",
                     key="similar_pairs_table",
                     column_config={"head_name": st.column_config.TextColumn("head of A", help=f"a head of {pa_}"),
                                    "match": st.column_config.TextColumn("best match in B",
                                                                         help=f"its most similar head of {pb_}"),
                                    "similarity": st.column_config.ProgressColumn(
                                        "similarity", format="%.3f", min_value=0.0, max_value=1.0),
                                    "link": st.column_config.LinkColumn("head page of the match",
                                                                        display_text="open")})
        w.csv_download(bm, f"best_matches_{pa_.replace('/', '_')}_{pb_.replace('/', '_')}_{by}",
                       key="dl_best_matches")

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
    p["label_truth"] = [f"{lab} · {tf}" if isinstance(tf, str) else lab
                        for lab, tf in zip(p["property"], p["true_factor"])]

    def probe_chart():
        y = alt.Y("head_name:N", sort=order, title="head")
        height = max(200, 22 * len(order))
        reach = float(max(p.above_chance.abs().max(), 1e-3))      # a symmetric scale: a cell's colour is its distance from chance
        matrix = (alt.Chart(p).mark_rect()
                  .encode(x=alt.X("factor:N"), y=y,
                          color=alt.Color("above_chance:Q", title="accuracy - chance",   # 0 (chance) is white
                                          scale=alt.Scale(scheme="redblue", domain=[-reach, reach], domainMid=0,
                                                          reverse=True)),
                          tooltip=["head_name", "factor", "accuracy", "chance", "eta2", "property", "true_factor"])
                  .properties(title="held-out probe accuracy above chance", width=60 * p.factor.nunique(), height=height))
        labels = (alt.Chart(p.drop_duplicates("head_name")).mark_text(align="left", fontSize=12, color="#222")
                  .encode(y=alt.Y("head_name:N", sort=order, axis=None), text="label_truth:N")
                  .properties(title="label · true factor", width=170, height=height))
        return alt.hconcat(matrix, labels)
    w.chart("chart_probes", probe_chart, (model_id, ds))
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
    # the counts as 'right / specialised' and 'false / unspecialised': 8 columns fit 1280 px, 10 did not
    shown = pd.DataFrame({
        "model": agree.model_id, "dataset": agree.dataset_id, "labeler": agree.labeler, "heads": agree.n_heads,
        "right": [f"{r} / {n}" for r, n in zip(agree.n_right, agree.n_specialised)],
        "false": [f"{f} / {n}" for f, n in zip(agree.n_false, agree.n_unspecialised)],
        "agreement": agree.agreement, "false rate": agree.false_label_rate})
    st.dataframe(shown, hide_index=True, width="stretch", key="label_agreement_table", column_config={
        "right": st.column_config.TextColumn("right", help="specialised heads labelled with their factor's "
                                                           "property / specialised heads"),
        "false": st.column_config.TextColumn("false", help="unspecialised heads with a false label / "
                                                           "unspecialised heads"),
        "agreement": st.column_config.NumberColumn("agreement", format="%.3f", help="right / specialised"),
        "false rate": st.column_config.NumberColumn("false rate", format="%.3f", help="false / unspecialised")})
    w.csv_download(agree, "label_agreement", key="dl_agreement")
    truth = q(queries.head_label_truth, model_id)
    if not truth.empty:
        ds = st.selectbox("Shapes dataset", sorted(truth.dataset_id.unique()), key="truth_ds")
        t = truth[truth.dataset_id == ds].copy()
        t["true"] = t.true_factor.fillna("(unspecialised)")
        conf = t.groupby(["label", "true"]).size().reset_index(name="heads")

        def confusion_chart():
            base = alt.Chart(conf).encode(x=alt.X("true:N", title="true factor", axis=alt.Axis(labelAngle=0)),
                                          y=alt.Y("label:N", title="label"))
            return ((base.mark_rect().encode(color=alt.Color("heads:Q", scale=alt.Scale(scheme="blues")),
                                             tooltip=["label", "true", "heads"])
                     + base.mark_text(fontSize=13).encode(text="heads:Q"))
                    .properties(title=f"label x true factor, {model_id}", height=34 * conf.label.nunique()))
        w.chart("chart_confusion", confusion_chart, (model_id, ds), width="stretch")
        w.csv_download(t, f"head_label_truth_{model_id.replace('/', '_')}", key="dl_truth")

# --------------------------------------------------------------------------- measured (issue 19: dashboard/measures.py)
measures.agreement()
measures.paper_scores()
measures.code_scores()
measures.study()
