"""The Metrics page's measured sections (issue 19; MATH.md §11), each one function the page calls:

    agreement()     labels against the truth beyond chance: Cohen's kappa beside the best constant
                    labeler and the tag-shuffled labeler, wrong and invented labels (view label_kappa)
    paper_scores()  Madasu et al.'s association and entanglement, as read (view paper_scores)
    code_scores()   the label-free ground truth: informativeness, DCI's D / C / I, MIG (table code_scores)
    study()         the size study `python -m etl study` stored: which world seeds were used for what,
                    per size the mean over model seeds, the trend, one verdict per definition

Every table is a CSV away; every model-coloured chart uses widgets.model_colour.
"""
from __future__ import annotations

import math

import altair as alt
import pandas as pd
import streamlit as st

from dashboard import widgets as w
from dashboard.data import q, q_kept
from warehouse import queries

CODE_SCORES = {"informativeness": "informativeness (best head's share of each factor)",
               "dci_d": "DCI disentanglement", "dci_c": "DCI completeness",
               "dci_i": "DCI informativeness (all heads, above chance)", "mig": "MIG"}
STUDY_LABELS = {"kappa": "kappa", "kappa_texts": "kappa, texts only (offline-v7)", "kappa_margin_shuffled": "kappa - shuffled labeler",
                "kappa_margin_constant": "kappa - best constant labeler", "wrong_rate": "wrong labels",
                "invented_rate": "invented labels", "paper_association": "association (paper, as read)",
                "paper_entanglement": "entanglement (paper, as read)", **CODE_SCORES}
# the size table's row names: the two long code-score names shortened (the code scores' caption explains them)
STUDY_ROWS = {**STUDY_LABELS, "informativeness": "informativeness", "dci_i": "DCI informativeness"}


def _cell(v, lo=None, hi=None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if lo is None or (isinstance(lo, float) and math.isnan(lo)):
        return f"{v:.2f}"
    return f"{v:.2f} [{lo:.2f}, {hi:.2f}]"


def agreement() -> None:
    """Labels against the known factors, corrected for chance, with both baselines beside them."""
    st.header("Labels beyond chance")
    st.caption("Every head gets a true category (the factor of a specialised head; for an unspecialised head the "
               "label's factor when it explains >= 0.2 of the head's variance, else *none*) and a label category "
               "(the factor its property names, *none* for `mixed`). **Cohen's kappa** over all heads is 0 for "
               "any labeler that ignores the heads (every constant labeler scores exactly 0) and 1 for perfect "
               "labels. Beside it: the **best constant labeler** (the one label with the highest raw agreement) and "
               "the **tag-shuffled labeler** (the same offline rule on the bank's tags permuted over its texts, 20 "
               "seeded draws: mean ± sd). **Wrong**: a specialised head labelled with another factor's property. "
               "**Invented**: any head labelled with a property whose factor explains < 0.2 of its variance. "
               "Intervals: 95 %, a bootstrap over heads for kappa and its margins, Wilson for the rates. "
               "View `label_kappa`.")
    lk = q_kept(queries.label_kappa)
    if lk.empty:
        st.info("No labels with ground truth yet: `python -m etl run --model ... --dataset shapes:N:seed=S`.")
        return
    # two tables of at most 7 short columns (one of 11 long ones would need ~1,430 px; the page has ~820
    # at 1280 px): kappa beside the shuffled labeler, then the raw counts; the CSV holds every column
    key = {"model": lk.model_id, "dataset": lk.dataset_id}
    beyond = pd.DataFrame({
        **key, "heads": lk.n_heads,
        "kappa": [_cell(*x) for x in zip(lk.kappa, lk.kappa_lo, lk.kappa_hi)],
        "tag-shuffled kappa": [_cell(m) + ("" if pd.isna(s) else f" ± {s:.2f}")
                               for m, s in zip(lk.shuffled_kappa, lk.shuffled_kappa_sd)],
        "margin over shuffled": [_cell(*x) for x in zip(lk.margin_shuffled, lk.margin_shuffled_lo,
                                                          lk.margin_shuffled_hi)],
    })
    st.dataframe(beyond, hide_index=True, width="stretch", key="label_kappa_table", column_config={
        "kappa": st.column_config.TextColumn("kappa", help="Cohen's kappa over all heads [95 % bootstrap over heads]"),
        "tag-shuffled kappa": st.column_config.TextColumn(
            "shuffled", help="kappa of the tag-shuffled labeler: mean ± sd over its seeded draws"),
        "margin over shuffled": st.column_config.TextColumn(
            "kappa - shuffled", help="kappa minus the tag-shuffled labeler's [95 % bootstrap over heads]")})
    counts = pd.DataFrame({
        **key,
        "raw agreement": lk.accuracy,
        "best constant (raw agreement, kappa 0)": [f"{c} ({a:.2f})" for c, a in zip(lk.constant_label,
                                                                                     lk.constant_accuracy)],
        "wrong": [f"{n} / {s}" for n, s in zip(lk.n_wrong, lk.n_specialised)],
        "invented": [f"{n} / {h}" for n, h in zip(lk.n_invented, lk.n_heads)],
        "shuffled: wrong / invented rate": [f"{a:.2f} / {b:.2f}" if not pd.isna(a) else f"– / {b:.2f}"
                                            for a, b in zip(lk.shuffled_wrong_rate, lk.shuffled_invented_rate)],
    })
    st.dataframe(counts, hide_index=True, width="stretch", key="label_counts_table", column_config={
        "raw agreement": st.column_config.NumberColumn(
            "agreement", format="%.2f", help="raw agreement: the share of heads whose label category is their true one"),
        "best constant (raw agreement, kappa 0)": st.column_config.TextColumn(
            "best constant", help="the one label with the highest raw agreement (its agreement); its kappa is 0"),
        "wrong": st.column_config.TextColumn("wrong", help="specialised heads labelled with another factor's "
                                                           "property / specialised heads"),
        "invented": st.column_config.TextColumn("invented", help="heads labelled with a property whose factor "
                                                                 "explains < 0.2 of their variance / heads"),
        "shuffled: wrong / invented rate": st.column_config.TextColumn(
            "shuffled", help="the tag-shuffled labeler's wrong rate / invented rate (mean over draws)")})
    w.csv_download(lk, "label_kappa", key="dl_label_kappa")
    w.chart("chart_label_kappa", lambda: _kappa_chart(lk), ())


def _kappa_chart(lk: pd.DataFrame) -> alt.LayerChart:
    """kappa per model beside the tag-shuffled labeler and the constant labelers' 0."""
    order = list(dict.fromkeys(lk.model_id))
    x = alt.X("model_id:N", sort=order, title=None, axis=alt.Axis(labelAngle=-25, labelLimit=240, labelOverlap=False))
    base = alt.Chart(lk).encode(x=x)
    y = alt.Y("kappa:Q", title="Cohen's kappa", scale=alt.Scale(domain=[-0.5, 1]))
    chart = alt.layer(
        alt.Chart(lk).mark_rule(color="#555", strokeDash=[4, 3]).encode(y=alt.datum(0.0)),   # no x: spans the plot
        base.mark_tick(color=w.CONTROL_BAND, thickness=3, size=26).encode(
            y=alt.Y("shuffled_kappa:Q", scale=alt.Scale(domain=[-0.5, 1])),
            tooltip=["model_id", "dataset_id", "shuffled_kappa", "shuffled_kappa_sd"]),
        base.mark_rule(strokeWidth=2).encode(y="kappa_lo:Q", y2="kappa_hi:Q", color=w.model_colour(show_legend=False)),
        base.mark_point(filled=True, size=90).encode(
            y=y, color=w.model_colour(show_legend=False),
            tooltip=["model_id", "dataset_id", "kappa", "kappa_lo", "kappa_hi", "margin_shuffled", "n_invented"]),
    ).properties(title="kappa (dot, 95 % bar) beside the tag-shuffled labeler (grey tick) and every constant "
                       "labeler (dashed, 0)", width=70 * len(order) + 80, height=240)
    return chart


def paper_scores() -> None:
    """Madasu et al.'s two scores, as read from the paper's words."""
    st.header("The paper's two scores, as read")
    st.caption("Madasu et al. (arXiv 2409.06579) measure *property consistency within heads* (association) and "
               "*property disentanglement across heads* (entanglement). Their formulas could not be retrieved, so "
               "these are readings of their words (view `paper_scores`, documented in migration 007): "
               "**association** = mean over the heads that carry a property of the share of their TextSpan texts "
               "that match it; **entanglement** = the share of property heads that repeat a property another head "
               "already carries, Σ(n_p − 1) / Σ n_p (the heads the authors' public follow-up code calls entangled). "
               "It cannot fall below 1 − P / N with P properties and N property heads, so read it beside the counts. "
               "The within-head entropy earlier versions called entanglement is `tag_entropy`.")
    ps = q_kept(queries.paper_scores)
    if ps.empty:
        st.info("No labelled heads yet.")
        return
    ps = ps.assign(floor=[None if not n else max(0.0, 1 - p / n) for p, n in zip(ps.n_properties, ps.n_property_heads)])
    shown = pd.DataFrame({   # 6 short columns (9 raw ones need ~980 px); the CSV holds every column
        "model": ps.model_id,
        "property heads": [f"{p} / {n}" for p, n in zip(ps.n_property_heads, ps.n_analysed_heads)],
        "properties": ps.n_properties,
        "association": [_cell(*x) for x in zip(ps.association, ps.association_lo, ps.association_hi)],
        "entanglement": ps.entanglement, "floor": ps.floor})
    st.dataframe(shown, hide_index=True, width="stretch", key="paper_scores_table", column_config={
        "property heads": st.column_config.TextColumn(
            "property heads", help="heads that carry a property / heads analysed"),
        "properties": st.column_config.NumberColumn("properties", help="distinct properties the heads carry"),
        "association": st.column_config.TextColumn(
            "association", help="mean share of a property head's TextSpan texts that match its property [95 %]"),
        "entanglement": st.column_config.NumberColumn(
            "entanglement", format="%.2f", help="Σ(n_p − 1) / Σ n_p over the properties"),
        "floor": st.column_config.NumberColumn(
            "floor", format="%.2f", help="the lowest entanglement possible: 1 − P / N (P properties, N property heads)")})
    w.csv_download(ps, "paper_scores", key="dl_paper_scores")


def code_scores() -> None:
    """The label-free ground truth of every model on every shapes dataset."""
    st.header("Ground truth without labels: heads as codes")
    st.caption("From the head embeddings and the known factors only (the `probe` job; table `code_scores`). "
               "m[h, f] = the information (plug-in, nats) between factor f and what a ridge probe reads from head h "
               "(cross-fitted, 4 folds); **informativeness** = mean over factors of the best head's m / H(f); "
               "**DCI** D and C with importance m (as disentanglement_lib's dci.py), **I** = one probe on all heads "
               "together, accuracy above chance; **MIG** = mean over factors of (best − second head) / H(f). "
               "A model that carries little can still score high on D (its little is spread unevenly: the random "
               "control), so read D and C beside informativeness and I. Bars: 95 % basic bootstrap over images.")
    mm = q_kept(queries.model_measures)
    cs = mm[mm.score.isin(list(CODE_SCORES))] if not mm.empty else mm
    if cs.empty:
        st.info("No label-free scores yet: `python -m etl probe --model ... --dataset shapes:N:seed=S`.")
        return
    w.chart("chart_code_scores", lambda: _code_chart(cs), ())
    w.csv_download(cs, "code_scores", key="dl_code_scores")


def _code_chart(cs: pd.DataFrame) -> alt.FacetChart:
    """Each label-free score per model, a dot with its 95 % bootstrap bar, one panel per score."""
    order = list(dict.fromkeys(cs.model_id))
    base = alt.Chart(cs.assign(name=cs.score.map(CODE_SCORES))).encode(
        x=alt.X("model_id:N", sort=order, title=None, axis=alt.Axis(labelAngle=-30, labelLimit=200)),
        color=w.model_colour(show_legend=False))
    chart = (base.mark_rule(strokeWidth=2).encode(y="lo:Q", y2="hi:Q")
             + base.mark_point(filled=True, size=70).encode(
                 y=alt.Y("value:Q", title=None, scale=alt.Scale(domain=[0, 1])),
                 tooltip=["model_id", "dataset_id", "score", "value", "lo", "hi"])
             ).properties(width=60 * len(order) + 40, height=170).facet(
                 facet=alt.Facet("name:N", title=None, sort=list(CODE_SCORES.values())), columns=3)
    return chart


def _provenance(seeds: pd.DataFrame) -> str:
    if seeds.empty:
        return ""
    by = {role: ", ".join(str(s) for s in sorted(g.seed)) for role, g in seeds.groupby("role")}
    names = {"training": "training", "tuning": "the labeler's constants (tuning)", "study": "the size study",
             "demo": "the demo warehouse", "earlier": "earlier studies and checks"}
    roles = [r for r in names if r in by] + sorted(set(by) - set(names))
    return "World seeds used for " + "; ".join(f"{names.get(r, r)}: {by[r]}" for r in roles) + "."


def study() -> None:
    """The stored size study: provenance, per-size table, trend chart, verdicts."""
    st.header("The size study: are larger models more interpretable?")
    t = q(queries.study_tables)
    if t["verdicts"].empty:
        st.info("No size study stored yet: `python -m etl study` (every zoo model on two held-out worlds) or "
                "`python -m etl study --in-place` (the models and shapes datasets of this warehouse).")
        return
    scores, sizes, verdicts = t["scores"], t["sizes"], t["verdicts"]
    name = verdicts.study.iloc[0]
    worlds = sorted(set(scores.world_seed))
    st.markdown(f"Study **{w.plain(name)}** on world seed{'s' if len(worlds) > 1 else ''} "
                f"**{', '.join(map(str, worlds))}**, {scores.model_id.nunique()} models. {_provenance(t['seeds'])}")
    st.caption("Per size (layers x width of the image tower, not the name): the mean over model seeds, each model "
               "averaged over the worlds, with a 95 % t interval over the seeds (none with one seed). The trend: "
               "least-squares slope against log10(image-tower parameters) over the trained models, its 95 % t "
               "interval, and a permutation p (values permuted over the models).")
    st.dataframe(size_table(sizes), hide_index=True, width="stretch", key="study_sizes_table",
                 column_config={"score": st.column_config.TextColumn("score", pinned=True)})
    w.csv_download(sizes, f"study_sizes_{name}", key="dl_study_sizes")
    for v in verdicts.itertuples():
        st.markdown(f"- {w.plain(v.verdict)}")       # the study job's sentence: text, never Markdown
    w.csv_download(verdicts, f"study_verdicts_{name}", key="dl_study_verdicts")
    options = [s for s in STUDY_LABELS if s in set(scores.score)]
    score = st.selectbox("Score against size", options, key="study_score", format_func=STUDY_LABELS.get)
    w.chart("chart_study_trend", lambda: _trend_chart(scores, sizes, score), (name, score))
    w.csv_download(scores, f"study_scores_{name}", key="dl_study_scores")


def size_table(sizes: pd.DataFrame) -> pd.DataFrame:
    """The per-size table as the page shows it: a row per score (STUDY_ROWS' names, then any other score),
    a column per size (smallest first as stored, 'random init' where the study stored it); first the rows
    'image-tower parameters' and 'models' (the most model seeds behind any score of the size), then
    'mean [95 %]' cells, '–' where the size has no value, '(n = k)' after a cell with fewer models.
    A size per column keeps the table narrow: 12 scores as columns need ~2,100 px."""
    order = list(dict.fromkeys(sizes["size"]))
    by = {size: g.set_index("score") for size, g in sizes.groupby("size", sort=False)}
    most = {size: int(by[size].n_models.max()) for size in order}
    scores = [c for c in STUDY_ROWS if c in set(sizes.score)] + sorted(set(sizes.score) - set(STUDY_ROWS))
    rows = [{"score": "image-tower parameters",
             **{size: "–" if pd.isna(by[size].image_params.iloc[0]) else f"{int(by[size].image_params.iloc[0]):,}"
                for size in order}},
            {"score": "models", **{size: str(most[size]) for size in order}}]
    for score in scores:
        row = {"score": STUDY_ROWS.get(score, score)}
        for size in order:
            if score not in by[size].index:
                row[size] = "–"
                continue
            r = by[size].loc[score]
            row[size] = _cell(r["mean"], r["lo"], r["hi"]) + ("" if int(r.n_models) == most[size]
                                                            else f" (n = {int(r.n_models)})")
        rows.append(row)
    return pd.DataFrame(rows, columns=["score", *order])


def _trend_chart(scores: pd.DataFrame, sizes: pd.DataFrame, score: str) -> alt.LayerChart:
    """One dot per model (its mean over worlds) against image-tower parameters, the size means dashed
    with their 95 % bars over seeds."""
    per_model = (scores[scores.score == score].groupby(["model_id", "size", "image_params"], as_index=False)
                 .agg(value=("value", "mean"), worlds=("world_seed", "nunique")))
    size_means = sizes[sizes.score == score].dropna(subset=["image_params"])
    x = alt.X("image_params:Q", scale=alt.Scale(type="log"), title="image-tower parameters (log)")
    colour = alt.Color("size:N", title="size", legend=alt.Legend(orient="bottom"))
    chart = alt.layer(
        alt.Chart(size_means).mark_rule(strokeWidth=3, opacity=0.5).encode(x=x, y="lo:Q", y2="hi:Q", color=colour),
        alt.Chart(size_means).mark_line(color="#333", strokeDash=[4, 3]).encode(x=x, y="mean:Q"),
        alt.Chart(per_model).mark_point(filled=True, size=80).encode(
            x=x, y=alt.Y("value:Q", title=STUDY_LABELS[score]), color=colour,
            tooltip=["model_id", "size", "image_params", "value", "worlds"]),
    ).properties(title=f"{STUDY_LABELS[score]}: one dot per model (mean over worlds); dashed: size means, bars: "
                       "95 % over seeds", height=280, width=520)
    return chart
