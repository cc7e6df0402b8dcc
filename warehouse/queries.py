"""Named read queries: every SQL statement the dashboard runs lives here.

Each function takes the warehouse path first, opens a short-lived read-only connection
(`warehouse.connect`), runs its query, closes, and returns a pandas DataFrame, a dict or a
numpy array. Nothing here keeps a connection open, so ETL writers are never blocked for
longer than one query.

Scores are the additive shares of MATH.md §1: `c[l,h] . q` for head embeddings `c` and a
query vector `q` (a text embedding or another image's head embedding), computed in SQL with
`list_inner_product` over the rows of the heads asked for. Heads are `(layer, head)` pairs,
0-based. Vectors come back as float32 numpy arrays.
"""
from __future__ import annotations

import os
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import pandas as pd

from warehouse import head_name
from warehouse.db import connect

Head = tuple[int, int]

# Columns shown with image hits (the thumbnail is JPEG bytes, longest side 128 px).
_IMAGE_COLUMNS = "i.label, i.caption, i.thumbnail"


def _df(path, sql: str, params: Optional[dict | list] = None) -> pd.DataFrame:
    with connect(path, read_only=True) as con:
        return con.execute(sql, params or {}).fetchdf()


def _heads_param(heads: Iterable[Head]) -> list[dict]:
    return [{"layer": int(l), "head": int(h)} for l, h in heads]


def _vec(v) -> list[float]:
    return np.asarray(v, dtype=np.float32).ravel().tolist()


# --------------------------------------------------------------------------- overview

def warehouse_summary(path) -> dict:
    """Row counts of the tables a dashboard needs; {'missing': True} when the file is absent."""
    if not os.path.exists(path):
        return {"missing": True, "models": 0, "images": 0, "head_embeddings": 0, "head_labels": 0}
    with connect(path, read_only=True) as con:
        tables = {r[0] for r in con.execute(     # head_embeddings is a view while shards are attached in place
            "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main' "
            "UNION ALL SELECT view_name FROM duckdb_views() WHERE schema_name = 'main' AND NOT internal").fetchall()}
        out = {"missing": False}
        for t in ("models", "images", "head_embeddings", "head_labels"):
            out[t] = int(con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) if t in tables else 0
        return out


def has_relation(path, name: str) -> bool:
    """Whether a table or view `name` exists (views of later migrations, e.g. head_scores)."""
    with connect(path, read_only=True) as con:
        return bool(con.execute(
            "SELECT count(*) FROM (SELECT table_name AS n FROM duckdb_tables() "
            "UNION ALL SELECT view_name FROM duckdb_views() WHERE NOT internal) WHERE n = $n",
            {"n": name}).fetchone()[0])


def models(path) -> pd.DataFrame:
    """One row per model, smallest image tower first (layers x width², then model_id: the order of every
    chart and list of models): the `models` columns plus embedded image and labelled head counts."""
    return _df(path, """
        SELECT m.model_id, m.arch, m.pretrained, m.source, m.checkpoint_path, m.seed,
               m.layers, m.heads, m.width, m.embed_dim, m.patch_size, m.image_size, m.pooling,
               m.analysed_layers,
               (SELECT count(*) FROM image_embeddings e WHERE e.model_id = m.model_id) AS n_images,
               (SELECT count(*) FROM head_labels hl WHERE hl.model_id = m.model_id) AS n_labelled_heads,
               m.created_at
        FROM models m ORDER BY m.layers * m.width * m.width, m.model_id""")


def model_row(path, model_id: str) -> dict:
    """The `models` row of one model as a dict (analysed_layers as a list of ints)."""
    df = _df(path, "SELECT * FROM models WHERE model_id = $m", {"m": model_id})
    if df.empty:
        raise KeyError(f"model '{model_id}' is not in the warehouse")
    row = df.iloc[0].to_dict()
    row["analysed_layers"] = [int(x) for x in row["analysed_layers"]]
    return row


# --------------------------------------------------------------------------- heads

def head_grid(path, model_id: str) -> pd.DataFrame:
    """Every (layer, head) of the model with its label, confidence, first text, and whether analysed.

    Columns: layer, head, analysed (bool), property ('not analysed' / 'unlabelled' when none),
    confidence, p_value, top_text, top_variance.
    """
    return _df(path, """
        WITH m AS (SELECT * FROM models WHERE model_id = $m),
        grid AS (
            SELECT l.range::INTEGER AS layer, h.range::INTEGER AS head,
                   list_contains(m.analysed_layers, l.range::INTEGER) AS analysed
            FROM m, range(m.layers) l, range(m.heads) h)
        SELECT g.layer, g.head, g.analysed,
               CASE WHEN hl.property IS NOT NULL THEN hl.property
                    WHEN g.analysed THEN 'unlabelled' ELSE 'not analysed' END AS property,
               hl.confidence, hl.p_value, t.text AS top_text, ht.variance_explained AS top_variance
        FROM grid g
        LEFT JOIN head_labels hl ON hl.model_id = $m AND hl.layer = g.layer AND hl.head = g.head
        LEFT JOIN head_texts ht ON ht.model_id = $m AND ht.layer = g.layer AND ht.head = g.head AND ht.rank = 0
        LEFT JOIN texts t ON t.text_id = ht.text_id
        ORDER BY g.layer, g.head""", {"m": model_id})


def head_label(path, model_id: str, layer: int, head: int) -> dict:
    """The head_labels row of one head ({} when the head is not labelled); p_value is the offline
    labeler's shuffled-tag p-value (NULL for other labelers)."""
    df = _df(path, """SELECT property, confidence, p_value, labeler, prompt_hash, raw, run_id FROM head_labels
                      WHERE model_id = $m AND layer = $l AND head = $h""",
             {"m": model_id, "l": int(layer), "h": int(head)})
    return df.iloc[0].to_dict() if len(df) else {}


def head_texts(path, model_id: str, layer: int, head: int) -> pd.DataFrame:
    """TextSpan texts of one head in rank order: rank, text, tag (the text's property), variance_explained."""
    return _df(path, """
        SELECT ht.rank, t.text, t.property AS tag, ht.variance_explained
        FROM head_texts ht JOIN texts t USING (text_id)
        WHERE ht.model_id = $m AND ht.layer = $l AND ht.head = $h ORDER BY ht.rank""",
               {"m": model_id, "l": int(layer), "h": int(head)})


def head_score(path, model_id: str, layer: int, head: int) -> dict:
    """The `head_scores` row (association, tag_entropy, ...) of one head; {} when absent."""
    if not has_relation(path, "head_scores"):
        return {}
    df = _df(path, "SELECT * FROM head_scores WHERE model_id = $m AND layer = $l AND head = $h",
             {"m": model_id, "l": int(layer), "h": int(head)})
    return df.iloc[0].to_dict() if len(df) else {}


def properties(path, model_id: str) -> pd.DataFrame:
    """Properties labelled on this model's heads with their head counts (most heads first)."""
    return _df(path, """
        SELECT property, count(*) AS n_heads FROM head_labels WHERE model_id = $m
        GROUP BY property ORDER BY n_heads DESC, property""", {"m": model_id})


def property_heads(path, model_id: str, prop: str) -> pd.DataFrame:
    """Heads labelled `prop`: layer, head, confidence (ordered by layer, head)."""
    return _df(path, """
        SELECT layer, head, confidence FROM head_labels
        WHERE model_id = $m AND property = $p ORDER BY layer, head""", {"m": model_id, "p": prop})


# --------------------------------------------------------------------------- images

def images(path, model_id: str, limit: int = 5000) -> pd.DataFrame:
    """Images embedded for the model (image_id, label, caption), in id order, at most `limit`."""
    return _df(path, """
        SELECT i.image_id, i.label, i.caption FROM images i
        WHERE EXISTS (SELECT 1 FROM image_embeddings e WHERE e.model_id = $m AND e.image_id = i.image_id)
        ORDER BY i.image_id LIMIT $k""", {"m": model_id, "k": int(limit)})


def image_embedded(path, model_id: str, image_id: str) -> bool:
    """Whether the model has an image embedding of ``image_id`` (a link's image is checked with it)."""
    df = _df(path, "SELECT count(*) AS n FROM image_embeddings WHERE model_id = $m AND image_id = $i",
             {"m": model_id, "i": str(image_id)})
    return bool(df.n.iloc[0])


def image_record(path, image_id: str) -> dict:
    """One `images` row (path, thumbnail bytes, label, caption, width, height); KeyError when absent."""
    df = _df(path, "SELECT * FROM images WHERE image_id = $i", {"i": image_id})
    if df.empty:
        raise KeyError(f"image '{image_id}' is not in the warehouse")
    return df.iloc[0].to_dict()


def image_head_vectors(path, model_id: str, image_id: str, heads: Sequence[Head]) -> np.ndarray:
    """Head embeddings c[l,h] of one warehouse image, float32 [len(heads), d] in the order given."""
    df = _df(path, """
        SELECT layer, head, vec FROM head_embeddings
        WHERE model_id = $m AND image_id = $i""", {"m": model_id, "i": image_id})
    by_head = {(int(r.layer), int(r.head)): r.vec for r in df.itertuples()}
    missing = [head_name(l, h) for l, h in heads if (int(l), int(h)) not in by_head]
    if missing:
        raise KeyError(f"image '{image_id}' has no head embeddings for {', '.join(missing)} of {model_id}")
    return np.stack([np.asarray(by_head[(int(l), int(h))], dtype=np.float32) for l, h in heads])


def head_top_images(path, model_id: str, layer: int, head: int, k: int = 8) -> pd.DataFrame:
    """Images that head (layer, head) pushes most towards its first TextSpan text.

    score = c[l,h] . t_hat(rank-0 text): the head's share of the cosine similarity with the
    text that explains most of its variance. When the head has no texts, score = ||c[l,h]||.
    Columns: image_id, score, basis ('text: ...' or 'norm'), label, caption, thumbnail.
    """
    return _df(path, f"""
        WITH t AS (
            SELECT te.vec, tx.text FROM head_texts ht
            JOIN text_embeddings te ON te.model_id = ht.model_id AND te.text_id = ht.text_id
            JOIN texts tx ON tx.text_id = ht.text_id
            WHERE ht.model_id = $m AND ht.layer = $l AND ht.head = $h AND ht.rank = 0),
        s AS (
            SELECT he.image_id,
                   CASE WHEN (SELECT count(*) FROM t) > 0
                        THEN list_inner_product(he.vec, (SELECT vec FROM t))
                        ELSE sqrt(list_inner_product(he.vec, he.vec)) END AS score,
                   coalesce('text: ' || (SELECT text FROM t), 'norm') AS basis
            FROM head_embeddings he
            WHERE he.model_id = $m AND he.layer = $l AND he.head = $h)
        SELECT s.image_id, s.score, s.basis, {_IMAGE_COLUMNS}
        FROM s JOIN images i USING (image_id)
        ORDER BY s.score DESC, s.image_id LIMIT $k""",
               {"m": model_id, "l": int(layer), "h": int(head), "k": int(k)})


def head_image_scores(path, model_id: str, layer: int, head: int, direction) -> pd.DataFrame:
    """Every image's projection of head (layer, head) on a direction: score = c[l,h] . direction.

    With a unit text embedding as direction, score is the head's additive share of cos(image,
    text) (MATH.md §1). Columns: image_id, score, label, caption (no thumbnails: see
    image_thumbnails); highest score first, ties by image_id."""
    return _df(path, """
        SELECT he.image_id, list_inner_product(he.vec, $v::FLOAT[]) AS score, i.label, i.caption
        FROM head_embeddings he JOIN images i USING (image_id)
        WHERE he.model_id = $m AND he.layer = $l AND he.head = $h
        ORDER BY score DESC, he.image_id""",
               {"m": model_id, "l": int(layer), "h": int(head), "v": _vec(direction)})


def image_thumbnails(path, image_ids: Sequence[str]) -> pd.DataFrame:
    """image_id, label, caption, thumbnail of the given images, in the order given."""
    ids = list(image_ids)
    if not ids:
        return pd.DataFrame(columns=["image_id", "label", "caption", "thumbnail"])
    df = _df(path, "SELECT image_id, label, caption, thumbnail FROM images WHERE list_contains($ids, image_id)",
             {"ids": ids})
    return df.set_index("image_id").loc[[i for i in ids if i in set(df.image_id)]].reset_index()


def image_embedding(path, model_id: str, image_id: str) -> np.ndarray:
    """The stored unit image embedding of one warehouse image, float32 [d]; KeyError when absent."""
    df = _df(path, "SELECT vec FROM image_embeddings WHERE model_id = $m AND image_id = $i",
             {"m": model_id, "i": image_id})
    if df.empty:
        raise KeyError(f"image '{image_id}' has no embedding for {model_id}")
    return np.asarray(df.vec.iloc[0], dtype=np.float32)


def schema_browser(path) -> pd.DataFrame:
    """Every table and view of the warehouse with its columns, types and one-line meanings (the
    SQL console's schema browser): relation, kind ('table' | 'view'), relation_meaning, column,
    type, meaning; in relation then column order. Meanings: warehouse.schema_docs (the README's
    one-liners for relations, the migrations' SQL comments for columns)."""
    from warehouse.schema_docs import column_meaning, relation_meaning
    df = _df(path, """
        SELECT c.table_name AS relation,
               CASE WHEN t.table_type = 'VIEW' THEN 'view' ELSE 'table' END AS kind,
               c.column_name AS "column", c.data_type AS type, c.ordinal_position
        FROM information_schema.columns c
        JOIN information_schema.tables t ON t.table_schema = c.table_schema AND t.table_name = c.table_name
        WHERE c.table_schema = 'main'
        ORDER BY c.table_name, c.ordinal_position""")
    df.insert(2, "relation_meaning", [relation_meaning(r) for r in df.relation])
    df["meaning"] = [column_meaning(r, c) for r, c in zip(df.relation, df["column"])]
    return df.drop(columns=["ordinal_position"]).reset_index(drop=True)


def head_text_ranking(path, model_id: str, layer: int, head: int) -> pd.DataFrame:
    """Every text embedded for the model, ranked by its mean projection on head (layer, head).

    With C [n, d] the head's embeddings c[l,h] over the model's images and t a unit text
    embedding: mean = mean_n(C) . t (the head's average share of cos(image, t)) and
    variance = t' cov(C) t (how much the head varies along t, what TextSpan maximises).
    Columns: text, tag, bank, mean, variance; highest mean first. Empty when either is missing."""
    with connect(path, read_only=True) as con:
        heads = con.sql("SELECT vec FROM head_embeddings WHERE model_id = ? AND layer = ? AND head = ?",
                        params=[model_id, int(layer), int(head)]).to_arrow_table()
        texts = con.sql("SELECT t.text, t.property AS tag, t.bank, e.vec FROM text_embeddings e "
                        "JOIN texts t USING (text_id) WHERE e.model_id = ? ORDER BY t.text_id",
                        params=[model_id]).to_arrow_table()
    cols = ["text", "tag", "bank", "mean", "variance"]
    if heads.num_rows == 0 or texts.num_rows == 0:
        return pd.DataFrame(columns=cols)
    C = _vectors(heads).astype(np.float64)                         # [n, d]
    T = _vectors(texts).astype(np.float64)                         # [m, d]
    mu = C.mean(0)
    X = C - mu
    cov = X.T @ X / max(len(C) - 1, 1)                             # [d, d]
    out = pd.DataFrame({"text": texts.column("text").to_pylist(), "tag": texts.column("tag").to_pylist(),
                        "bank": texts.column("bank").to_pylist(), "mean": T @ mu,
                        "variance": np.einsum("md,de,me->m", T, cov, T)})
    return out.sort_values(["mean", "text"], ascending=[False, True], kind="stable").reset_index(drop=True)


def head_truth_of(path, model_id: str, layer: int, head: int) -> pd.DataFrame:
    """The `head_truth` rows of one head (one per shapes dataset probed): top_factor, top_eta2,
    second_eta2, specialised, true_factor, true_property. Empty when nothing was probed."""
    if not has_relation(path, "head_truth"):
        return pd.DataFrame()
    return _df(path, "SELECT * FROM head_truth WHERE model_id = $m AND layer = $l AND head = $h ORDER BY dataset_id",
               {"m": model_id, "l": int(layer), "h": int(head)})


# --------------------------------------------------------------------------- nearest neighbours

def neighbours_by_head_sum(path, model_id: str, heads: Sequence[Head], query, k: int = 8,
                           exclude: Optional[str] = None) -> pd.DataFrame:
    """Property-based nearest neighbours (MATH.md §6.1).

    The database vector of an image is the sum of its head embeddings over `heads`; its score
    is that sum dotted with `query` ([d], the same sum for the query image). Linear, so SQL
    sums the per-head dot products. Columns: image_id, score, label, caption, thumbnail.
    """
    return _df(path, f"""
        WITH hs AS (SELECT u.layer, u.head FROM (SELECT unnest($heads) AS u)),
        s AS (
            SELECT he.image_id, sum(list_inner_product(he.vec, $q::FLOAT[])) AS score
            FROM head_embeddings he JOIN hs ON he.layer = hs.layer AND he.head = hs.head
            WHERE he.model_id = $m AND he.image_id IS DISTINCT FROM $x
            GROUP BY he.image_id)
        SELECT s.image_id, s.score, {_IMAGE_COLUMNS} FROM s JOIN images i USING (image_id)
        ORDER BY s.score DESC, s.image_id LIMIT $k""",
               {"m": model_id, "heads": _heads_param(heads), "q": _vec(query), "k": int(k),
                "x": exclude})


def neighbours_per_head(path, model_id: str, heads: Sequence[Head], queries, k: int = 5,
                        exclude: Optional[str] = None) -> pd.DataFrame:
    """Per-head nearest neighbours (MATH.md §6.4 and §6.5): for each head, the top-k images by
    c_db[l,h] . queries[j] (queries: [len(heads), d], one query vector per head).

    Columns: layer, head, rank (0-based), image_id, score, label, caption, thumbnail.

    One branch per head, each ``layer = L AND head = H ... ORDER BY score DESC, image_id LIMIT k``
    with its query vector a constant: the filter reaches the scan, so a clustered table (``optimize``)
    or Parquet shards (one row group per head, ``etl.shards``) are read only where that head lives,
    and each branch keeps a k-row heap instead of sorting every score. (A join on a table of
    (layer, head, q) and a window over every row took about 5 s for one head over 100,000 images
    on Parquet shards; this form 0.4 s.)

    With shard sets attached in place, the rows in their files are first narrowed in numpy
    (:func:`_shard_candidates`: each head's row groups read by ``warehouse.shard_files`` on a few
    threads, float32 dot products, every row that could be in the top k by DuckDB's own score
    kept), and the same branches then run over the table's rows and those candidates only: the
    answer, scores included, is the one the branches give over the whole view (4.5 s for one head
    over 1,000,000 images on 2 cores; this way well under 2 s). A shard file this cannot read as
    plain [rows, d] float32 (nulls, ragged lists, gone) sends the query through the view as before.
    """
    qs = np.asarray(queries, dtype=np.float32).reshape(len(heads), -1)
    if not len(heads):
        return pd.DataFrame(columns=["layer", "head", "rank", "image_id", "score", "label", "caption", "thumbnail"])
    from warehouse.db import in_place_shard_files
    from warehouse.shard_files import Irregular
    with connect(path, read_only=True) as con:
        files = in_place_shard_files(con)
        if files:
            try:
                cand = _shard_candidates(files, model_id, heads, qs, int(k), exclude)
            except Irregular:
                cand = None
            if cand is not None:
                name = f"_shard_candidates_{os.getpid()}_{id(cand)}"
                con.register(name, cand)
                try:
                    source = (f"(SELECT model_id, image_id, layer, head, vec FROM {_HEAD_EMBEDDINGS_BASE} "
                              f"UNION ALL SELECT model_id, image_id, layer, head, vec FROM {name})")
                    return _neighbours_per_head_sql(con, source, model_id, heads, qs, k, exclude)
                finally:
                    con.unregister(name)
        return _neighbours_per_head_sql(con, "head_embeddings", model_id, heads, qs, k, exclude)


_HEAD_EMBEDDINGS_BASE = "head_embeddings_base"    # warehouse.writes.HEAD_EMBEDDINGS_BASE: the table under the view


def _neighbours_per_head_sql(con, source: str, model_id: str, heads: Sequence[Head], qs: np.ndarray, k: int,
                             exclude: Optional[str]) -> pd.DataFrame:
    """The branches of :func:`neighbours_per_head` over ``source`` (a relation with head_embeddings' columns)."""
    params: dict = {"m": model_id, "k": int(k), "x": exclude}
    branches = []
    for j, (l, h) in enumerate(heads):
        params[f"q{j}"] = qs[j].tolist()
        branches.append(f"""(SELECT {int(l)} AS layer, {int(h)} AS head, he.image_id,
                    list_inner_product(he.vec, $q{j}::FLOAT[]) AS score
                FROM {source} he
                WHERE he.model_id = $m AND he.layer = {int(l)} AND he.head = {int(h)}
                  AND he.image_id IS DISTINCT FROM $x
                ORDER BY score DESC, he.image_id LIMIT $k)""")
    union = "\n            UNION ALL ".join(branches)
    return con.execute(f"""
        WITH s AS ({union})
        SELECT s.layer::INTEGER AS layer, s.head::INTEGER AS head,
               (row_number() OVER (PARTITION BY s.layer, s.head ORDER BY s.score DESC, s.image_id) - 1)::INTEGER AS rank,
               s.image_id, s.score, {_IMAGE_COLUMNS}
        FROM s JOIN images i USING (image_id)
        ORDER BY s.layer, s.head, rank""", params).fetchdf()


# float32 unit roundoff: a dot product of d terms in any order is within gamma_d sum|x_i q_i| of the exact one
_U32 = 2.0 ** -24
_MAX_CANDIDATES = 4096           # per row group; more means a degenerate bound (inf, huge values): use SQL


def _shard_candidates(files: list[str], model_id: str, heads: Sequence[Head], qs: np.ndarray, k: int,
                      exclude: Optional[str]):
    """The rows of the in-place shard files that may be among each head's top k (an Arrow table with
    head_embeddings' columns), or raise ``shard_files.Irregular``.

    numpy's float32 dot ``a`` and DuckDB's ``list_inner_product`` ``b`` (a sequential, fused sum)
    round differently, but both lie within gamma_d sum|x_i q_i| <= gamma_d max|x| ||q||_1 of the
    exact product, so |a - b| <= B (taken twice that, for margin). Any row among the top k by b has
    b >= (the k-th largest a) - B, so a >= a_k - 2B: every such row is kept; DuckDB then scores the
    few kept rows itself. Row groups are narrowed on their own (their a_k is a lower bound of the
    overall one), then together."""
    import pyarrow as pa

    from warehouse import shard_files as sf
    import threading
    d = qs.shape[1]
    gamma = d * _U32 / (1 - d * _U32)
    local = threading.local()
    parts = []
    for j, (l, h) in enumerate(heads):
        q = qs[j]
        q1 = float(np.abs(q.astype(np.float64)).sum())
        groups = sf.head_groups(files, model_id, int(l), int(h))

        def narrow(group, q=q, q1=q1, l=l, h=h):
            import pyarrow.compute as pc
            buf = getattr(local, "buf", None)               # one reused buffer per thread (X[keep] copies)
            X, cols = sf.read_rows(group, model_id, int(l), int(h), ("image_id",), out=buf)   # [m, d], {image_id: [m]}
            if (buf is None or X.size > buf.size) and X.flags.writeable and X.flags.c_contiguous:
                local.buf = X
            ids = cols["image_id"]
            if not len(X):
                return X, np.zeros(0, object), np.zeros(0, np.float32), 0.0
            if X.shape[1] != d:
                raise sf.Irregular(f"vectors of d = {X.shape[1]}, the query d = {d}")
            a = X @ q                                                          # [m] float32
            if exclude is not None:
                a[pc.fill_null(pc.equal(ids, exclude), False).to_numpy(zero_copy_only=False)] = -np.inf
            if np.isnan(a).any():
                raise sf.Irregular("NaN scores")
            vmax = group[3] if group[3] is not None else max(float(X.max()), -float(X.min()))
            bound = 4 * gamma * vmax * q1
            keep = np.arange(len(a))
            if len(a) > k:
                ak = np.partition(a, len(a) - k)[len(a) - k]
                keep = np.flatnonzero(a >= ak - 2 * bound)
                if len(keep) > _MAX_CANDIDATES:
                    raise sf.Irregular(f"{len(keep)} candidates in one row group")
            return X[keep], np.asarray(ids.take(keep).to_pylist(), dtype=object), a[keep], bound

        got = list(sf.map_groups(narrow, groups))
        if not got:
            continue
        X = np.concatenate([g[0] for g in got])
        ids = np.concatenate([g[1] for g in got])
        a = np.concatenate([g[2] for g in got])
        bound = max(g[3] for g in got)
        if exclude is not None:
            ok = ids != exclude
            X, ids, a = X[ok], ids[ok], a[ok]
        if len(a) > k:
            ak = np.partition(a, len(a) - k)[len(a) - k]
            keep = a >= ak - 2 * bound
            X, ids = X[keep], ids[keep]
        parts.append((int(l), int(h), X, ids))
    rows = sum(len(p[3]) for p in parts)
    flat = np.concatenate([p[2].reshape(-1) for p in parts]) if parts else np.zeros(0, np.float32)
    vec = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), d).cast(pa.list_(pa.float32()))
    return pa.table({
        "model_id": pa.array([model_id] * rows, pa.string()),
        "image_id": pa.array([str(i) for p in parts for i in p[3]], pa.string()),
        "layer": pa.array([p[0] for p in parts for _ in p[3]], pa.int32()),
        "head": pa.array([p[1] for p in parts for _ in p[3]], pa.int32()),
        "vec": vec})


def neighbours_per_head_of_text(path, model_id: str, heads: Sequence[Head], text_vec, k: int = 5) -> pd.DataFrame:
    """Per-head nearest neighbours of a text (MATH.md §6.5): top-k images by c_db[l,h] . t_hat."""
    t = np.asarray(text_vec, dtype=np.float32).ravel()
    return neighbours_per_head(path, model_id, heads, np.tile(t, (len(heads), 1)), k)


# --------------------------------------------------------------------------- texts

def stored_text_vector(path, model_id: str, text: str) -> Optional[np.ndarray]:
    """The stored unit embedding of `text` (any bank) for the model, or None if not embedded."""
    df = _df(path, """
        SELECT te.vec FROM texts t JOIN text_embeddings te USING (text_id)
        WHERE te.model_id = $m AND t.text = $t LIMIT 1""", {"m": model_id, "t": text})
    return np.asarray(df.vec.iloc[0], dtype=np.float32) if len(df) else None


def head_scores(path) -> pd.DataFrame:
    """The `head_scores` view (association and tag_entropy per labelled head, all models)."""
    if not has_relation(path, "head_scores"):
        return pd.DataFrame()
    return _df(path, "SELECT * FROM head_scores ORDER BY model_id, layer, head")


def model_scores(path) -> pd.DataFrame:
    """The `model_scores` view (one row per model)."""
    if not has_relation(path, "model_scores"):
        return pd.DataFrame()
    return _df(path, "SELECT * FROM model_scores ORDER BY model_id")


def property_head_counts(path) -> pd.DataFrame:
    """Heads per (property, model): property, model_id, n_heads."""
    return _df(path, """
        SELECT property, model_id, count(*) AS n_heads FROM head_labels
        GROUP BY property, model_id ORDER BY property, model_id""")


def runs(path, job: Optional[str] = None, limit: int = 50) -> pd.DataFrame:
    """The latest job runs, newest first: run_id, job, status, started_at, finished_at, error,
    pid, host, n_errors. A 'running' run of this host whose process is gone shows as
    'interrupted' (warehouse.runs.effective_status; the next writing job stores that status)."""
    from warehouse.runs import effective_status
    where = "WHERE r.job = $j" if job else ""
    df = _df(path, f"""
        SELECT r.run_id, r.job, r.status, r.started_at, r.finished_at, r.error, r.pid, r.host,
               count(e.item) AS n_errors
        FROM runs r LEFT JOIN errors e USING (run_id) {where}
        GROUP BY ALL ORDER BY r.started_at DESC LIMIT $k""", {"k": int(limit), **({"j": job} if job else {})})
    if len(df):
        df["status"] = [effective_status(s, None if p != p or p is None else int(p), h)
                        for s, p, h in zip(df["status"], df["pid"], df["host"])]
    return df


def ablations(path) -> pd.DataFrame:
    """All mean-ablation results: model_id, dataset_id, factor, kind, layer, head, accuracy."""
    return _df(path, """
        SELECT model_id, dataset_id, factor, kind, layer, head, accuracy FROM ablations
        ORDER BY model_id, dataset_id, factor, kind, layer, head""")


def probes(path, model_id: str) -> pd.DataFrame:
    """Linear-probe accuracies of one model's heads, with each head's label.

    Columns: dataset_id, layer, head, factor, accuracy, chance, above_chance, property.
    """
    return _df(path, """
        SELECT p.dataset_id, p.layer, p.head, p.factor, p.accuracy, p.chance,
               p.accuracy - p.chance AS above_chance, coalesce(hl.property, 'unlabelled') AS property,
               v.eta2, t.true_factor
        FROM probes p
        LEFT JOIN head_labels hl ON hl.model_id = p.model_id AND hl.layer = p.layer AND hl.head = p.head
        LEFT JOIN head_factor_variance v ON v.model_id = p.model_id AND v.dataset_id = p.dataset_id
              AND v.layer = p.layer AND v.head = p.head AND v.factor = p.factor
        LEFT JOIN head_truth t ON t.model_id = p.model_id AND t.dataset_id = p.dataset_id
              AND t.layer = p.layer AND t.head = p.head
        WHERE p.model_id = $m ORDER BY p.dataset_id, p.layer, p.head, p.factor""", {"m": model_id})


# --------------------------------------------------------------------------- ground truth

def label_agreement(path) -> pd.DataFrame:
    """The `label_agreement` view (one row per model and shapes dataset)."""
    return _df(path, "SELECT * FROM label_agreement ORDER BY model_id, dataset_id")


def head_label_truth(path, model_id: str) -> pd.DataFrame:
    """The `head_label_truth` view for one model: per head and dataset, the label, the true
    factor (NULL when unspecialised), top_factor, top_eta2, label_right, label_false."""
    return _df(path, "SELECT * FROM head_label_truth WHERE model_id = $m ORDER BY dataset_id, layer, head",
               {"m": model_id})


def label_kappa(path) -> pd.DataFrame:
    """The `label_kappa` view: per model and shapes dataset, Cohen's kappa of the labels with its
    head-bootstrap interval, wrong and invented labels, beside the best constant labeler and the
    tag-shuffled labeler (migration 007)."""
    return _df(path, "SELECT * FROM label_kappa ORDER BY model_id, dataset_id")


def paper_scores(path) -> pd.DataFrame:
    """The `paper_scores` view: Madasu et al.'s association and entanglement as read (migration 007)."""
    return _df(path, "SELECT * FROM paper_scores ORDER BY model_id")


def model_measures(path) -> pd.DataFrame:
    """Every score of every model on each shapes dataset (`model_measures`, long: model_id, dataset_id,
    score, value, lo, hi), with the model's image tower (source, layers, width, heads)."""
    return _df(path, """
        SELECT mm.*, m.source, m.layers, m.width, m.heads
        FROM model_measures mm JOIN models m USING (model_id)
        ORDER BY m.layers * m.width * m.width, mm.model_id, mm.dataset_id, mm.score""")


def shapes_datasets(path) -> list[str]:
    """The shapes-world datasets of the warehouse (those with ground truth), by name."""
    with connect(path, read_only=True) as con:
        return [r[0] for r in con.execute("SELECT dataset_id FROM datasets WHERE source = 'shapes' "
                                          "ORDER BY dataset_id").fetchall()]


def models_with_truth(path, dataset_id: str) -> list[str]:
    """The models with labels and ground truth (head_truth) on a shapes dataset."""
    with connect(path, read_only=True) as con:
        return [r[0] for r in con.execute(
            "SELECT DISTINCT model_id FROM head_truth JOIN head_labels USING (model_id, layer, head) "
            "WHERE dataset_id = ? ORDER BY model_id", [dataset_id]).fetchall()]


def measures_of(path, model_id: str, dataset_id: str) -> dict[str, tuple]:
    """{score: (value, lo, hi)} of one model on one shapes dataset (`model_measures`)."""
    with connect(path, read_only=True) as con:
        return {r[0]: tuple(r[1:]) for r in con.execute(
            "SELECT score, value, lo, hi FROM model_measures WHERE model_id = ? AND dataset_id = ?",
            [model_id, dataset_id]).fetchall()}


def study_tables(path, study: Optional[str] = None) -> dict[str, pd.DataFrame]:
    """A stored size study (`python -m etl study`): {'scores', 'sizes', 'verdicts', 'seeds'} frames;
    the study named ``study``, else the one written last. Empty frames before any study."""
    with connect(path, read_only=True) as con:
        if study is None:
            row = con.execute("SELECT s.study FROM study_verdicts s LEFT JOIN runs r USING (run_id) "
                              "ORDER BY r.finished_at DESC NULLS LAST LIMIT 1").fetchone()
            study = row[0] if row else ""
        out = {t: con.execute(f"SELECT * FROM study_{t} WHERE study = ? ORDER BY ALL", [study]).fetchdf()
               for t in ("scores", "sizes", "verdicts")}
        out["sizes"] = con.execute("SELECT * FROM study_sizes WHERE study = ? "
                                   "ORDER BY image_params NULLS LAST, size, score", [study]).fetchdf()
        out["seeds"] = con.execute("SELECT * FROM world_seeds ORDER BY seed, role").fetchdf()
    return out


# --------------------------------------------------------------------------- matrices for the jobs

def _vectors(tab, column: str = "vec") -> np.ndarray:
    """An arrow column of FLOAT[] lists -> float32 [rows, d]."""
    if tab.num_rows == 0:
        return np.zeros((0, 0), np.float32)
    vec = tab.column(column).combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return vec.astype(np.float32).reshape(tab.num_rows, -1)


def bank_text_matrix(path, model_id: str, bank: str) -> tuple[list[str], list, np.ndarray]:
    """(text_ids, property tags, T [M, d] float32) of a bank's texts embedded for the model,
    ordered by text_id (so an exact tie in TextSpan goes to the lowest text_id)."""
    with connect(path, read_only=True) as con:
        tab = con.sql("SELECT e.text_id, t.property, e.vec FROM text_embeddings e JOIN texts t USING (text_id) "
                      "WHERE e.model_id = ? AND t.bank = ? ORDER BY e.text_id", params=[model_id, bank]).to_arrow_table()
    return tab.column("text_id").to_pylist(), tab.column("property").to_pylist(), _vectors(tab)


def _dataset_filter(dataset: Optional[str]) -> tuple[str, list]:
    if dataset is None:
        return "", []
    return "AND image_id IN (SELECT image_id FROM images WHERE dataset_id = ?)", [dataset]


def layer_head_matrix(path, model_id: str, layer: int, heads: int, dataset: Optional[str] = None) -> np.ndarray:
    """Head embeddings of one layer, C [n, H, d] float32, images in image_id order (only the
    images of ``dataset`` when given). A ValueError unless there is one row per image and head."""
    where, extra = _dataset_filter(dataset)
    with connect(path, read_only=True) as con:
        tab = con.sql(f"SELECT image_id, head, vec FROM head_embeddings WHERE model_id = ? AND layer = ? {where} "
                      "ORDER BY image_id, head", params=[model_id, layer] + extra).to_arrow_table()
    n = tab.num_rows // heads
    head = tab.column("head").to_numpy()
    image = np.asarray(tab.column("image_id").to_pylist(), dtype=object)
    if tab.num_rows != n * heads or not (head.reshape(n, heads) == np.arange(heads)).all() \
            or not (image.reshape(n, heads) == image.reshape(n, heads)[:, :1]).all():
        raise ValueError(f"head_embeddings of model {model_id!r}, layer {layer} are not one row per image and "
                         f"head (expected {heads} heads per image); re-run `python -m etl embed` for the model")
    return _vectors(tab).reshape(n, heads, -1)


def head_vector_batches(path, model_id: str, layer: int, head: int, batch_rows: int = 65_536,
                        dataset: Optional[str] = None, reuse: bool = False) -> Iterator[np.ndarray]:
    """The embeddings c[l,h] of one head over the model's images (only ``dataset``'s when given),
    streamed: float32 [m, d] arrays of at most ``batch_rows`` rows each, in no particular order (for
    sums over images, such as TextSpan's covariance: etl.text.textspan.HeadMoments), so memory holds
    a few batches whatever the number of images (1,000,000 images x d = 512 is 2 GB per head).

    The table's rows come through DuckDB (the filter reaches the scan of a clustered table); rows in
    shard files attached in place are read by ``warehouse.shard_files`` (only the row groups of the
    head, by their statistics; the floats taken from the pages as they lie, a few row groups read
    ahead on threads), about 5x less CPU than DuckDB rebuilding the lists. A shard file that cannot be
    read so raises a ValueError (``shard_files.Irregular``) naming it. Holds one read connection while
    the table's rows are iterated.

    ``reuse``: a shard batch is a view of a buffer that is filled again once the batch after it is
    asked for (a consumer that folds each batch in before asking for the next, as HeadMoments does):
    a few row-group buffers serve the whole stream instead of a fresh 128 MB array per row group,
    whose page faults cost as much as reading it on a busy host."""
    from warehouse import shard_files as sf
    from warehouse.db import in_place_shard_files
    where, extra = _dataset_filter(dataset)
    batch_rows = max(1, int(batch_rows))
    with connect(path, read_only=True) as con:
        files = in_place_shard_files(con)
        source = _HEAD_EMBEDDINGS_BASE if files else "head_embeddings"
        wanted = None
        if files and dataset is not None:
            wanted = con.sql("SELECT image_id FROM images WHERE dataset_id = ?", params=[dataset]).to_arrow_table() \
                .column(0).combine_chunks()
        reader = con.sql(f"SELECT vec FROM {source} WHERE model_id = ? AND layer = ? AND head = ? {where}",
                         params=[model_id, int(layer), int(head)] + extra).to_arrow_reader(batch_rows)
        for batch in reader:
            if batch.num_rows:
                flat = batch.column(0).flatten().to_numpy(zero_copy_only=False)
                yield flat.astype(np.float32, copy=False).reshape(batch.num_rows, -1)
    if not files:
        return
    import queue
    groups = sf.head_groups(files, model_id, int(layer), int(head))
    workers = sf.threads()
    free: queue.LifoQueue = queue.LifoQueue()    # buffers for `reuse`: one per group in flight, one being consumed
    for _ in range(2 * workers + 1 if reuse else 0):
        free.put(None)

    def read(group):
        buf = free.get() if reuse else None
        X, cols = sf.read_rows(group, model_id, int(layer), int(head), ("image_id",) if wanted is not None else (),
                               out=buf)
        if wanted is not None:
            import pyarrow.compute as pc
            X = X[pc.is_in(cols["image_id"], value_set=wanted).to_numpy(zero_copy_only=False)]
        own = sf.owner(X) if reuse else None
        return X, (own if own is not None else buf)                         # [m, d], the buffer to give back
    for X, buf in sf.map_groups(read, groups, workers):
        for a in range(0, len(X), batch_rows):
            yield X[a:a + batch_rows]
        if reuse:
            free.put(buf)


def image_matrix(path, model_id: str, dataset: Optional[str] = None) -> np.ndarray:
    """Unit image embeddings Z [n, d] float32 of the model's images that have head embeddings,
    in image_id order (the order of ``layer_head_matrix``)."""
    where, extra = _dataset_filter(dataset)
    with connect(path, read_only=True) as con:
        tab = con.sql(f"SELECT image_id, vec FROM image_embeddings WHERE model_id = ? {where} AND image_id IN "
                      "(SELECT DISTINCT image_id FROM head_embeddings WHERE model_id = ?) ORDER BY image_id",
                      params=[model_id] + extra + [model_id]).to_arrow_table()
    return _vectors(tab)


# --------------------------------------------------------------------------- what the jobs read

def model_ids(path) -> list[str]:
    """Every model_id of the warehouse, sorted."""
    with connect(path, read_only=True) as con:
        return [r[0] for r in con.execute("SELECT model_id FROM models ORDER BY model_id").fetchall()]


def dataset_exists(path, dataset_id: str) -> bool:
    with connect(path, read_only=True) as con:
        return con.execute("SELECT 1 FROM datasets WHERE dataset_id = ?", [dataset_id]).fetchone() is not None


def embedded_image_ids(path, model_id: str, dataset_id: str) -> set[str]:
    """Image ids of a dataset that already have an image embedding for the model."""
    with connect(path, read_only=True) as con:
        return {r[0] for r in con.execute(
            "SELECT e.image_id FROM image_embeddings e JOIN images i USING (image_id) "
            "WHERE e.model_id = ? AND i.dataset_id = ?", [model_id, dataset_id]).fetchall()}


def embedded_text_ids(path, model_id: str, bank: str) -> set[str]:
    """Text ids of a bank that already have a text embedding for the model."""
    with connect(path, read_only=True) as con:
        return {r[0] for r in con.execute(
            "SELECT e.text_id FROM text_embeddings e JOIN texts t USING (text_id) "
            "WHERE e.model_id = ? AND t.bank = ?", [model_id, bank]).fetchall()}


def embedded_banks(path, model_id: str) -> list[str]:
    """Banks with at least one text embedded for the model, sorted."""
    with connect(path, read_only=True) as con:
        return [r[0] for r in con.execute(
            "SELECT DISTINCT t.bank FROM text_embeddings e JOIN texts t USING (text_id) WHERE e.model_id = ? "
            "ORDER BY 1", [model_id]).fetchall()]


def property_vocabulary(path) -> dict[str, str]:
    """The `properties` table as {property: description}."""
    with connect(path, read_only=True) as con:
        return dict(con.execute(
            "SELECT property, coalesce(description, '') FROM properties ORDER BY property").fetchall())


def head_text_state(path, model_id: str) -> dict[Head, tuple[int, Optional[str], Optional[str]]]:
    """{(layer, head): (texts stored, bank, dataset_id)} for the model's heads with TextSpan texts."""
    with connect(path, read_only=True) as con:
        return {(int(l), int(h)): (int(n), b, d) for l, h, n, b, d in con.execute(
            "SELECT layer, head, count(*), any_value(bank), any_value(dataset_id) FROM head_texts "
            "WHERE model_id = ? GROUP BY layer, head", [model_id]).fetchall()}


def head_text_items(path, model_id: str) -> dict[Head, list[tuple[str, str, Optional[str], float]]]:
    """{(layer, head): [(text_id, text, property tag, variance explained)]} in TextSpan rank order."""
    with connect(path, read_only=True) as con:
        rows = con.execute(
            "SELECT ht.layer, ht.head, ht.text_id, coalesce(t.text, ht.text_id), t.property, ht.variance_explained "
            "FROM head_texts ht LEFT JOIN texts t USING (text_id) "
            "WHERE ht.model_id = ? ORDER BY ht.layer, ht.head, ht.rank", [model_id]).fetchall()
    out: dict = {}
    for layer, head, tid, text, tag, var in rows:
        out.setdefault((int(layer), int(head)), []).append((tid, text, tag, float(var)))
    return out


def head_text_banks(path, model_id: str) -> list[str]:
    """The banks the model's TextSpan texts were drawn from."""
    with connect(path, read_only=True) as con:
        return [r[0] for r in con.execute("SELECT DISTINCT bank FROM head_texts WHERE model_id = ? "
                                          "AND bank IS NOT NULL ORDER BY 1", [model_id]).fetchall()]


def head_text_dataset(path, model_id: str) -> Optional[str]:
    """The dataset the model's TextSpan texts were computed on (None: every image of the model)."""
    with connect(path, read_only=True) as con:
        return con.execute("SELECT any_value(dataset_id) FROM head_texts WHERE model_id = ?",
                           [model_id]).fetchone()[0]


def head_label_state(path, model_id: str) -> dict[Head, tuple[str, Optional[str], str]]:
    """{(layer, head): (labeler, prompt_hash, property)} for the model's labelled heads."""
    with connect(path, read_only=True) as con:
        return {(int(l), int(h)): (lab, ph, p) for l, h, lab, ph, p in con.execute(
            "SELECT layer, head, labeler, prompt_hash, property FROM head_labels WHERE model_id = ?",
            [model_id]).fetchall()}


def baseline_label_state(path, model_id: str, baseline: str) -> dict[Head, tuple[int, Optional[str]]]:
    """{(layer, head): (draws stored, prompt_hash)} of a baseline labeler's labels of the model's heads."""
    with connect(path, read_only=True) as con:
        return {(int(l), int(h)): (int(n), ph) for l, h, n, ph in con.execute(
            "SELECT layer, head, count(*), any_value(prompt_hash) FROM baseline_labels "
            "WHERE model_id = ? AND baseline = ? GROUP BY layer, head", [model_id, baseline]).fetchall()}


def judged_texts(path, model_id: str, judge: str) -> set[tuple[int, int, str, str]]:
    """(layer, head, text_id, property) already judged by ``judge`` for the model."""
    with connect(path, read_only=True) as con:
        return {(int(l), int(h), t, p) for l, h, t, p in con.execute(
            "SELECT layer, head, text_id, property FROM text_judgments WHERE model_id = ? AND judge = ?",
            [model_id, judge]).fetchall()}


def score_rows(path, model_id: Optional[str] = None, heads: bool = False) -> tuple[list[dict], list[dict]]:
    """(model_scores rows, head_scores rows if ``heads``) as dicts, for one model or all."""
    where, params = ("WHERE model_id = ?", [model_id]) if model_id else ("", [])
    with connect(path, read_only=True) as con:
        m = con.execute(f"SELECT model_id, association, tag_entropy, n_heads FROM model_scores {where} "
                        "ORDER BY model_id", params).fetchdf()
        h = con.execute(f"SELECT model_id, layer, head, property, association, tag_entropy FROM head_scores "
                        f"{where} ORDER BY model_id, layer, head", params).fetchdf() if heads else pd.DataFrame()
    return m.to_dict("records"), h.to_dict("records")


def factor_head_embeddings(path, model_id: str, dataset_id: str
                           ) -> tuple[np.ndarray, list[int], dict[str, list[Optional[str]]]]:
    """Head embeddings of a labelled (shapes) dataset with the factor values of each image.

    Returns (X float32 [n, L', H, d] in image_id order, analysed layers [L'],
    {factor: value per image, None where unknown}, factors in name order); X has 0 rows when
    nothing is stored.
    """
    with connect(path, read_only=True) as con:
        tab = con.sql(
            "SELECT h.image_id, h.layer, h.head, h.vec FROM head_embeddings h JOIN images i USING (image_id) "
            "WHERE h.model_id = ? AND i.dataset_id = ? ORDER BY h.image_id, h.layer, h.head",
            params=[model_id, dataset_id]).to_arrow_table()
        facts = con.execute(
            "SELECT f.image_id, f.factor, f.value FROM image_factors f JOIN images i USING (image_id) "
            "WHERE i.dataset_id = ? ORDER BY f.factor", [dataset_id]).fetchall()   # factors in one order: the splits
    if tab.num_rows == 0 or not facts:
        return np.zeros((0, 0, 0, 0), np.float32), [], {}
    ids = tab.column("image_id").to_pylist()
    layer = np.asarray(tab.column("layer").to_numpy())
    head = np.asarray(tab.column("head").to_numpy())
    layers, heads = sorted(set(layer.tolist())), sorted(set(head.tolist()))
    images = list(dict.fromkeys(ids))
    vecs = _vectors(tab)                                                         # [n * L' * H, d]
    if len(ids) != len(images) * len(layers) * len(heads):
        raise ValueError(f"head_embeddings of {model_id} on {dataset_id} are not one row per image and head "
                         f"({len(ids)} rows for {len(images)} images); re-run `python -m etl embed`")
    X = vecs.reshape(len(images), len(layers), len(heads), -1)
    index = {i: k for k, i in enumerate(images)}
    by_factor: dict[str, list] = {}
    for image_id, factor, value in facts:
        by_factor.setdefault(factor, [None] * len(images))
        if image_id in index:
            by_factor[factor][index[image_id]] = value
    return X, layers, by_factor


# --------------------------------------------------------------------------- Parquet shards

def shard_set(path, shard_dir: str) -> Optional[dict]:
    """The `shard_sets` row of a shard directory (None when it is not attached, or the warehouse or
    the table is missing)."""
    if not os.path.exists(path):
        return None
    with connect(path, read_only=True) as con:
        if not con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'shard_sets'").fetchall()[0][0]:
            return None
        df = con.execute("SELECT * FROM shard_sets WHERE shard_dir = ?", [shard_dir]).fetchdf()
    return df.iloc[0].to_dict() if len(df) else None


# --------------------------------------------------------------------------- heads across models

def model_head_tensor(path, model_id: str, max_images: Optional[int] = None
                      ) -> tuple[list[str], list[Head], np.ndarray]:
    """Every stored head embedding of a model as one tensor, for comparing heads across models
    (models.similarity): (image_ids [n] sorted, heads [(layer, head)] sorted, X float32 [n, H, d]).

    max_images: at most this many images, the first by md5(image_id) (the same sample for every
    model that embedded them, so two models' samples coincide on shared images). Only images that
    have every head are kept (a partly embedded image would misalign rows); n = 0 when the model
    has no head embeddings. Read unordered and sorted here: an ORDER BY over list columns costs
    more than the read itself."""
    sample, params = "", [model_id]
    if max_images is not None:
        sample = ("AND image_id IN (SELECT image_id FROM (SELECT DISTINCT image_id FROM head_embeddings "
                  "WHERE model_id = ?) ORDER BY md5(image_id), image_id LIMIT ?)")
        params += [model_id, int(max_images)]
    with connect(path, read_only=True) as con:
        tab = con.sql(f"SELECT image_id, layer, head, vec FROM head_embeddings WHERE model_id = ? {sample}",
                      params=params).to_arrow_table()
    if tab.num_rows == 0:
        return [], [], np.zeros((0, 0, 0), np.float32)
    enc = tab.column("image_id").combine_chunks().dictionary_encode()
    images = np.asarray(enc.dictionary.to_pylist(), dtype=object)
    order = np.argsort(images, kind="stable")
    images, rank = images[order], np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    img = rank[enc.indices.to_numpy()]
    lh = np.stack([tab.column("layer").to_numpy(), tab.column("head").to_numpy()], 1).astype(np.int64)
    heads, hd = np.unique(lh, axis=0, return_inverse=True)
    hd = hd.ravel()
    vec = np.concatenate([c.flatten().to_numpy(zero_copy_only=False) for c in tab.column("vec").chunks])
    d = vec.size // tab.num_rows
    X = np.zeros((len(images), len(heads), d), np.float32)
    seen = np.zeros((len(images), len(heads)), bool)
    X[img, hd] = vec.astype(np.float32).reshape(tab.num_rows, d)
    seen[img, hd] = True
    full = seen.all(1)
    return [str(i) for i in images[full]], [(int(l), int(h)) for l, h in heads], X[full]


def text_matrix(path, model_id: str) -> tuple[list[str], np.ndarray]:
    """Every text embedded for the model (all banks): (text_ids [M] sorted, T float32 [M, d] unit rows)."""
    with connect(path, read_only=True) as con:
        tab = con.sql("SELECT text_id, vec FROM text_embeddings WHERE model_id = ? ORDER BY text_id",
                      params=[model_id]).to_arrow_table()
    return tab.column("text_id").to_pylist(), _vectors(tab)


# --------------------------------------------------------------------------- neurons (migration 008)

def neuron_layers(path, model_id: str) -> pd.DataFrame:
    """The model's analysed MLP layers (`neuron_layers` rows), by layer; empty when none (or before 008)."""
    if not has_relation(path, "neuron_layers"):
        return pd.DataFrame(columns=["layer"])
    return _df(path, "SELECT * FROM neuron_layers WHERE model_id = $m ORDER BY layer", {"m": model_id})


def neuron_atlas(path, model_id: str, layer: int) -> pd.DataFrame:
    """One row per neuron of an analysed layer: neuron, label (the labeler's), mean_norm, q99,
    max_norm, share_matters, pc_share, recon_r2, top_text (its first sparse text), top_coef,
    top_factor and top_eta2 (NULL off the shapes world), specialised."""
    return _df(path, """
        SELECT s.neuron, coalesce(l.property, 'unlabelled') AS label, s.mean_norm, s.q99, s.max_norm,
               s.share_matters, s.pc_share, s.recon_r2, t.text AS top_text, nt.coef AS top_coef,
               tr.top_factor, tr.top_eta2, coalesce(tr.specialised, false) AS specialised
        FROM neuron_stats s
        LEFT JOIN neuron_labels l ON l.model_id = s.model_id AND l.layer = s.layer AND l.neuron = s.neuron
              AND l.labeling = 'labeler'
        LEFT JOIN neuron_texts nt ON nt.model_id = s.model_id AND nt.layer = s.layer AND nt.neuron = s.neuron
              AND nt.rank = 0
        LEFT JOIN texts t ON t.text_id = nt.text_id
        LEFT JOIN neuron_truth tr ON tr.model_id = s.model_id AND tr.layer = s.layer AND tr.neuron = s.neuron
        WHERE s.model_id = $m AND s.layer = $l
        ORDER BY s.neuron""", {"m": model_id, "l": int(layer)})


def neuron_record(path, model_id: str, layer: int, neuron: int) -> dict:
    """One neuron's `neuron_stats` row with its label (property, confidence, p_value): pc as float32
    [d], hist_counts as a list; {} when the neuron is not stored."""
    df = _df(path, """
        SELECT s.*, l.property AS label, l.confidence, l.p_value
        FROM neuron_stats s
        LEFT JOIN neuron_labels l ON l.model_id = s.model_id AND l.layer = s.layer AND l.neuron = s.neuron
              AND l.labeling = 'labeler'
        WHERE s.model_id = $m AND s.layer = $l AND s.neuron = $n""",
             {"m": model_id, "l": int(layer), "n": int(neuron)})
    if df.empty:
        return {}
    row = df.iloc[0].to_dict()
    row["pc"] = np.asarray(row["pc"], dtype=np.float32)
    row["hist_counts"] = [int(c) for c in row["hist_counts"]]
    return row


def neuron_texts(path, model_id: str, layer: int, neuron: int) -> pd.DataFrame:
    """A neuron's sparse text decomposition in the order chosen: rank, text, tag, coef, gain."""
    return _df(path, """
        SELECT nt.rank, t.text, t.property AS tag, nt.coef, nt.gain
        FROM neuron_texts nt LEFT JOIN texts t USING (text_id)
        WHERE nt.model_id = $m AND nt.layer = $l AND nt.neuron = $n ORDER BY nt.rank""",
               {"m": model_id, "l": int(layer), "n": int(neuron)})


def neuron_top_images(path, model_id: str, layer: int, neuron: int, k: int = 16) -> pd.DataFrame:
    """The images of largest effect norm: rank, image_id, norm, projection (on pc), label, caption, thumbnail."""
    return _df(path, f"""
        SELECT n.rank, n.image_id, n.norm, n.projection, {_IMAGE_COLUMNS}
        FROM neuron_top_images n JOIN images i USING (image_id)
        WHERE n.model_id = $m AND n.layer = $l AND n.neuron = $n ORDER BY n.rank LIMIT $k""",
               {"m": model_id, "l": int(layer), "n": int(neuron), "k": int(k)})


def neuron_factors(path, model_id: str, layer: int, neuron: int) -> pd.DataFrame:
    """eta2 of every factor for one neuron (dataset_id, factor, eta2), highest first, with the
    neuron's truth (top_factor, specialised) on each row."""
    return _df(path, """
        SELECT v.dataset_id, v.factor, v.eta2, t.top_factor, t.specialised, t.true_property
        FROM neuron_factor_variance v
        JOIN neuron_truth t USING (model_id, dataset_id, layer, neuron)
        WHERE v.model_id = $m AND v.layer = $l AND v.neuron = $n ORDER BY v.dataset_id, v.eta2 DESC""",
               {"m": model_id, "l": int(layer), "n": int(neuron)})


def neuron_heads(path, model_id: str, layer: int, neuron: int) -> pd.DataFrame:
    """How much of one neuron's effect goes through each later head: head_layer, head, effect."""
    return _df(path, """
        SELECT head_layer, head, effect FROM neuron_head_effects
        WHERE model_id = $m AND layer = $l AND neuron = $n ORDER BY head_layer, head""",
               {"m": model_id, "l": int(layer), "n": int(neuron)})


def neurons_behind_head(path, model_id: str, head_layer: int, head: int, k: int = 20) -> pd.DataFrame:
    """The stored neurons (every analysed MLP layer before the head) whose effect goes most through
    head (head_layer, head): layer, neuron, effect, label."""
    if not has_relation(path, "neuron_head_effects"):
        return pd.DataFrame(columns=["layer", "neuron", "effect", "label"])
    return _df(path, """
        SELECT e.layer, e.neuron, e.effect, coalesce(l.property, 'unlabelled') AS label
        FROM neuron_head_effects e
        LEFT JOIN neuron_labels l ON l.model_id = e.model_id AND l.layer = e.layer AND l.neuron = e.neuron
              AND l.labeling = 'labeler'
        WHERE e.model_id = $m AND e.head_layer = $hl AND e.head = $h
        ORDER BY e.effect DESC, e.layer, e.neuron LIMIT $k""",
               {"m": model_id, "hl": int(head_layer), "h": int(head), "k": int(k)})


def neurons_writing(path, model_id: str, direction, k: int = 20, layer: Optional[int] = None) -> pd.DataFrame:
    """Neurons ranked by the cosine of their principal direction with a unit direction (a text):
    layer, neuron, cosine, label, share_matters, mean_norm; every analysed layer unless `layer`."""
    return _df(path, """
        SELECT s.layer, s.neuron, list_inner_product(s.pc, $v::FLOAT[]) AS cosine,
               coalesce(l.property, 'unlabelled') AS label, s.share_matters, s.mean_norm
        FROM neuron_stats s
        LEFT JOIN neuron_labels l ON l.model_id = s.model_id AND l.layer = s.layer AND l.neuron = s.neuron
              AND l.labeling = 'labeler'
        WHERE s.model_id = $m AND ($l IS NULL OR s.layer = $l)
        ORDER BY cosine DESC, s.layer, s.neuron LIMIT $k""",
               {"m": model_id, "v": _vec(direction), "k": int(k), "l": None if layer is None else int(layer)})


def neuron_ablations(path, model_id: str) -> pd.DataFrame:
    """The zero-shot check of the model's analysed layers: layer, eval, variant, factor, accuracy."""
    if not has_relation(path, "neuron_ablations"):
        return pd.DataFrame(columns=["layer", "eval", "variant", "factor", "accuracy"])
    return _df(path, "SELECT layer, eval, variant, factor, accuracy FROM neuron_ablations WHERE model_id = $m "
                     "ORDER BY layer, eval, variant, factor", {"m": model_id})


def neuron_label_agreement(path, model_id: Optional[str] = None) -> pd.DataFrame:
    """Per (model, dataset, layer): the labeler's kappa against the known factors (MATH.md §11, for
    neurons), the specialised neurons and how many of their labels are right, and the tag-shuffled
    labelings' mean kappa beside it (kappa_shuffled, n_draws)."""
    return _df(path, """
        SELECT a.model_id, a.dataset_id, a.layer, a.n_neurons, a.n_specialised, a.n_right,
               a.accuracy, a.kappa,
               (SELECT avg(b.kappa) FROM neuron_label_agreement b WHERE b.model_id = a.model_id
                  AND b.dataset_id = a.dataset_id AND b.layer = a.layer AND b.labeling = 'tag-shuffled') AS kappa_shuffled,
               (SELECT count(*) FROM neuron_label_agreement b WHERE b.model_id = a.model_id
                  AND b.dataset_id = a.dataset_id AND b.layer = a.layer AND b.labeling = 'tag-shuffled') AS n_draws
        FROM neuron_label_agreement a
        WHERE a.labeling = 'labeler' AND ($m IS NULL OR a.model_id = $m)
        ORDER BY a.model_id, a.dataset_id, a.layer""", {"m": model_id})


def neuron_alpha_rows(path, model_id: str, layer: int, neuron: int, paths: int) -> tuple[list[str], np.ndarray]:
    """One neuron's stored per-image alpha (--store-alpha): (image_ids sorted, alpha float32 [n, P]);
    paths: P = neuron_layers.later_heads * pool_heads."""
    K = int(paths)
    start = int(neuron) * K + 1
    with connect(path, read_only=True) as con:
        tab = con.sql("SELECT image_id, list_slice(alpha, ?, ?) AS a FROM neuron_alpha WHERE model_id = ? AND "
                      "layer = ? ORDER BY image_id", params=[start, start + K - 1, model_id, int(layer)]).to_arrow_table()
    return tab.column("image_id").to_pylist(), _vectors(tab, "a").reshape(-1, K)
