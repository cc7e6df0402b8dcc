"""Heads across models (issue 10.5) on the dashboard: the caching glue around models.similarity.

The math (linear CKA on the shared images, Spearman's rho of the variance profiles over the shared
texts) and its reasons are in models/similarity.py. Here: a model's HeadSummary is computed once
per warehouse version, a pair of models' [H_A, H_B] matrices once per pair, the model x model table once
(dashboard/cache.py: in memory and on disk, so a restarted server does not recompute them), and the
pages read ranked lists and the table.
"""
from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import cache, nav
from dashboard.data import q, warehouse_path
from dashboard.safe_text import plain
from models import similarity as sim
from warehouse import WarehouseError, head_name, queries

Head = tuple[int, int]
MAX_IMAGES = 4000       # images per model at most (a fixed md5 sample): CKA and the covariances are stable
                        # long before, and a 12-layer ViT's heads on 100k images would not fit in memory
MEASURES = {
    "cka": "outputs on the shared images (linear CKA)",
    "text": "text behaviour over the shared texts (Spearman's rho of variance profiles)",
}


def _summary(path: str, model_id: str) -> sim.HeadSummary:
    def build():
        image_ids, heads, X = queries.model_head_tensor(path, model_id, MAX_IMAGES)     # X [n, H, d]
        text_ids, T = queries.text_matrix(path, model_id)                   # T [M, d]
        return sim.summarise(image_ids, heads, X, text_ids, T)
    return cache.built("head-summary", (model_id, MAX_IMAGES), build,
                       spinner="Summarising the model's heads (once per warehouse version) ...")


def _restricted(path: str, model_id: str, keep: list[str]) -> sim.HeadSummary:
    """A model's summary on a subset of its images (the ones another model embedded too)."""
    image_ids, heads, X = queries.model_head_tensor(path, model_id, MAX_IMAGES)
    index = {i: k for k, i in enumerate(image_ids)}
    rows = [index[i] for i in keep]
    text_ids, T = queries.text_matrix(path, model_id)
    return sim.summarise(keep, heads, X[rows], text_ids, T)


def _pair(path: str, a: str, b: str) -> dict:
    def build():
        sa, sb = _summary(path, a), _summary(path, b)
        if sa.image_ids != sb.image_ids:                      # different image sets: compare on the shared ones
            shared = sorted(set(sa.image_ids) & set(sb.image_ids))
            if len(shared) >= 3:
                sa, sb = _restricted(path, a, shared), _restricted(path, b, shared)
        out = sim.compare(sa, sb)
        out.update(heads_a=sa.heads, heads_b=sb.heads)
        return out
    return cache.built("head-pair", (a, b, MAX_IMAGES), build, spinner="Comparing the two models' heads ...")


def pair(a: str, b: str) -> dict:
    """Both similarity matrices between model a's heads (rows) and model b's (columns):
    {'cka': [H_A, H_B] or None, 'text': [H_A, H_B] or None, 'heads_a', 'heads_b', 'n_images', 'n_texts'}.
    Computed for the sorted pair and transposed for the other order (both measures are symmetric)."""
    path = warehouse_path()
    lo, hi = sorted((a, b))
    try:
        r = _pair(str(path), lo, hi)
    except WarehouseError as exc:
        st.error(plain(exc))
        st.stop()
    if (lo, hi) == (a, b):
        return r
    return {"cka": None if r["cka"] is None else r["cka"].T, "text": None if r["text"] is None else r["text"].T,
            "heads_a": r["heads_b"], "heads_b": r["heads_a"], "n_images": r["n_images"], "n_texts": r["n_texts"]}


def head_url(model_id: str, layer: int, head: int) -> str:
    """The head page's permalink, relative to the app (works under any base path)."""
    from urllib.parse import urlencode
    return f"{nav.URLS[nav.HEAD]}?" + urlencode({"model": model_id, "layer": int(layer), "head": int(head)})


def similar_heads(model_a: str, head: Head, model_b: str, by: str = "cka", k: int = 5) -> pd.DataFrame:
    """The k heads of model_b most similar to `head` of model_a by measure `by` ('cka' or 'text'),
    most similar first. Columns: rank (1-based), head_name, layer, head, cka, text, property (its label).
    Empty when the measure cannot be computed (no shared images or texts) or the head is absent."""
    r = pair(model_a, model_b)
    cols = ["rank", "head_name", "layer", "head", "cka", "text", "property"]
    if r[by] is None or tuple(head) not in r["heads_a"]:
        return pd.DataFrame(columns=cols)
    i = r["heads_a"].index(tuple(head))
    labels = {(int(x.layer), int(x.head)): x.property for x in q(queries.head_grid, model_b).itertuples()}
    df = pd.DataFrame({"layer": [l for l, _ in r["heads_b"]], "head": [h for _, h in r["heads_b"]],
                       "cka": r["cka"][i] if r["cka"] is not None else float("nan"),
                       "text": r["text"][i] if r["text"] is not None else float("nan")})
    df["head_name"] = [head_name(l, h) for l, h in zip(df["layer"], df["head"])]
    df["property"] = [labels.get((int(l), int(h)), "") for l, h in zip(df["layer"], df["head"])]
    df = df.sort_values([by, "layer", "head"], ascending=[False, True, True], kind="stable").head(k)
    df.insert(0, "rank", range(1, len(df) + 1))
    return df[cols].reset_index(drop=True)


def best_matches(model_a: str, model_b: str, by: str = "cka") -> pd.DataFrame:
    """Each head of model_a with its best match in model_b: head_name, layer, head, match, match_layer,
    match_head, similarity, link (the match's head page). Empty when the measure is unavailable."""
    r = pair(model_a, model_b)
    S = r[by]
    if S is None or S.size == 0:
        return pd.DataFrame(columns=["head_name", "layer", "head", "match", "match_layer", "match_head",
                                     "similarity", "link"])
    j = S.argmax(1)
    rows = []
    for i, (l, h) in enumerate(r["heads_a"]):
        ml, mh = r["heads_b"][j[i]]
        rows.append({"head_name": head_name(l, h), "layer": l, "head": h, "match": head_name(ml, mh),
                     "match_layer": ml, "match_head": mh, "similarity": float(S[i, j[i]]),
                     "link": head_url(model_b, ml, mh)})
    return pd.DataFrame(rows)


def model_matrix(model_ids: list[str], by: str = "cka") -> pd.DataFrame:
    """For each ordered pair of different models (A, B): the mean over A's heads of the best-match
    similarity in B (sim.best_match), with the number of A's heads and what it was computed on.
    Columns: model_a, model_b, mean_best, n_heads, n_images, n_texts. Directed: a small model's few
    heads can each find a partner among a large model's many, not the other way round."""
    path = warehouse_path()
    try:
        return cache.built("model-matrix", (tuple(model_ids), by, MAX_IMAGES),
                           lambda: _matrix(str(path), tuple(model_ids), by), spinner="Comparing every pair of models ...")
    except WarehouseError as exc:
        st.error(plain(exc))
        st.stop()


def _matrix(path: str, model_ids: tuple, by: str) -> pd.DataFrame:
    rows = []
    for a in model_ids:
        for b in model_ids:
            if a == b:
                continue
            lo, hi = sorted((a, b))
            r = _pair(path, lo, hi)
            S = r[by] if (lo, hi) == (a, b) or r[by] is None else r[by].T
            rows.append({"model_a": a, "model_b": b,
                         "mean_best": float(sim.best_match(S).mean()) if S is not None and S.size else float("nan"),
                         "n_heads": len(r["heads_a"] if (lo, hi) == (a, b) else r["heads_b"]),
                         "n_images": r["n_images"], "n_texts": r["n_texts"]})
    return pd.DataFrame(rows, columns=["model_a", "model_b", "mean_best", "n_heads", "n_images", "n_texts"])
