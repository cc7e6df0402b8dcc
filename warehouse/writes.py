"""Named write statements: every SQL statement a job uses to write lives here.

Each function takes an open write connection (``with warehouse.writer(path) as con``), so the
caller decides how much goes into one transaction; nothing here commits or opens files.
Rows are inserted by column name (never by position), so a migration that adds a column
cannot shift values. Vectors are float32 arrays ``[n, d]``; heads are 0-based (layer, head).

Every table with a natural key refuses duplicates (migrations 001, 003, 004). The ``insert_*``
functions are idempotent on that key: a row whose key is already stored is left as it is
(``ON CONFLICT DO NOTHING``), and a key repeated within one call is written once (its first
row), so two processes that embed the same images store exactly what one would. They return
the number of rows they newly stored. (One exception, for speed: ``insert_head_embeddings(new=True)``
is a plain INSERT, for callers that know the rows are new and roll back on a key error.)
"""
from __future__ import annotations

import contextlib
import itertools
import re
from typing import Iterable, Optional, Sequence

import duckdb
import numpy as np
import pyarrow as pa

_names = itertools.count()


def vector_column(a: np.ndarray) -> pa.Array:
    """[n, d] float32 -> an Arrow list<float> column for a FLOAT[] warehouse column (no Python loop)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])
    return fixed.cast(pa.list_(pa.float32()))


def _first_of_each(keys: Sequence) -> list[int]:
    """Indices of the first occurrence of each key, in order (a key repeated within one batch is
    written once)."""
    seen: set = set()
    keep = []
    for i, k in enumerate(keys):
        if k not in seen:
            seen.add(k)
            keep.append(i)
    return keep


def _last_of_each(rows: Sequence, key) -> list:
    """``rows`` with a repeated ``key(row)`` kept once, at its last occurrence (for replace_*)."""
    return list({key(r): r for r in rows}.values())


def _insert(con: duckdb.DuckDBPyConnection, table: str, rows: pa.Table, on_conflict: str = "") -> int:
    """INSERT the Arrow table ``rows`` into ``table``, matching columns by name; returns rows inserted."""
    if rows.num_rows == 0:
        return 0
    name = f"_rows_{next(_names)}"
    cols = ", ".join(rows.column_names)
    con.register(name, rows)
    try:
        got = con.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM {name} {on_conflict}").fetchone()
    except duckdb.Error:
        # a failed INSERT aborts the transaction, and then unregister fails too: keep the first error
        with contextlib.suppress(duckdb.Error):
            con.unregister(name)
        raise
    con.unregister(name)
    return int(got[0]) if got else 0


def _insert_rows(con, table: str, columns: Sequence[str], rows: Sequence[Sequence], on_conflict: str = "") -> None:
    """INSERT plain Python rows (tuples in ``columns`` order) into ``table`` by column name."""
    if not rows:
        return
    marks = ", ".join("?" * len(columns))
    con.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks}) {on_conflict}",
                    [list(r) for r in rows])


# --------------------------------------------------------------------------- models, datasets, images

def upsert_model(con, row: dict, layers: Sequence[int], onnx_path: Optional[str] = None,
                 onnx_sha256: Optional[str] = None) -> list[int]:
    """Insert or refresh a `models` row (``LoadedModel.row()`` columns). Analysed layers are the
    union with the stored ones; a stored ONNX file is kept unless a new one is given. Returns the layers."""
    old = con.execute("SELECT analysed_layers, onnx_path, onnx_sha256 FROM models WHERE model_id = ?",
                      [row["model_id"]]).fetchone()
    layers = sorted(set(int(x) for x in layers))
    if old:
        layers = sorted(set(layers) | set(old[0] or []))
        onnx_path, onnx_sha256 = onnx_path or old[1], onnx_sha256 or old[2]
        con.execute("DELETE FROM models WHERE model_id = ?", [row["model_id"]])
    full = {**row, "analysed_layers": layers, "onnx_path": onnx_path, "onnx_sha256": onnx_sha256}
    _insert_rows(con, "models", list(full), [list(full.values())])
    return layers


def upsert_dataset(con, dataset_id: str, name: str, source: str, n_images: Optional[int]) -> None:
    _insert_rows(con, "datasets", ["dataset_id", "name", "source", "n_images"],
                 [(dataset_id, name, source, n_images)], "ON CONFLICT DO UPDATE SET n_images = excluded.n_images")


def insert_images(con, dataset_id: str, image_ids: Sequence[str], paths: Sequence[Optional[str]],
                  sha256: Sequence[str], labels: Sequence[Optional[str]], captions: Sequence[Optional[str]],
                  sizes: Sequence[tuple[int, int]], thumbnails: Sequence[bytes],
                  originals: Optional[Sequence[Optional[bytes]]] = None) -> int:
    """`images` rows (an image already stored is left as it is); returns rows newly stored.
    originals: lossless PNG bytes of images with no file on disk (migration 006), None where the
    image can be read again."""
    k = _first_of_each(image_ids)
    extra = {} if originals is None else {"original": pa.array([originals[i] for i in k], pa.binary())}
    return _insert(con, "images", pa.table({**extra,
        "image_id": [image_ids[i] for i in k], "dataset_id": [dataset_id] * len(k),
        "path": [paths[i] for i in k], "sha256": [sha256[i] for i in k],
        "label": pa.array([labels[i] for i in k], pa.string()),
        "caption": pa.array([captions[i] for i in k], pa.string()),
        "width": [sizes[i][0] for i in k], "height": [sizes[i][1] for i in k],
        "thumbnail": pa.array([thumbnails[i] for i in k], pa.binary())}), "ON CONFLICT DO NOTHING")


def insert_image_factors(con, rows: Sequence[tuple[str, str, str]]) -> int:
    """(image_id, factor, value) rows of `image_factors` (a stored (image, factor) is kept)."""
    rows = [rows[i] for i in _first_of_each([(r[0], r[1]) for r in rows])]
    return _insert(con, "image_factors", pa.table({"image_id": [r[0] for r in rows], "factor": [r[1] for r in rows],
                                                   "value": [r[2] for r in rows]}), "ON CONFLICT DO NOTHING")


def insert_image_embeddings(con, model_id: str, image_ids: Sequence[str], vecs: np.ndarray) -> int:
    """vecs: [n, d] unit image embeddings, one per image id; returns the embeddings newly stored
    (an image the model already has keeps its stored vector)."""
    k = _first_of_each(image_ids)
    return _insert(con, "image_embeddings", pa.table({
        "model_id": [model_id] * len(k), "image_id": [image_ids[i] for i in k],
        "vec": vector_column(np.asarray(vecs)[k])}), "ON CONFLICT DO NOTHING")


def insert_head_embeddings(con, model_id: str, image_ids: Sequence[str], layers: Sequence[int],
                           heads: np.ndarray, new: bool = False) -> int:
    """heads: [n, L', H, d], the head contributions c[l,h] of ``image_ids`` for the analysed ``layers``.
    Returns the rows newly stored (a stored (model, image, layer, head) keeps its vector).

    ``new``: the caller knows that none of these rows is stored yet, so a plain INSERT does (under
    the table's key, ``ON CONFLICT DO NOTHING`` costs about 5x a plain insert: 0.63 s against 0.13 s
    for 12,288 rows of d = 512). If a row was stored after all, the INSERT raises
    ``duckdb.ConstraintException`` and the caller's transaction must be rolled back and written
    again without ``new`` (etl/jobs/embed.py does)."""
    k = _first_of_each(image_ids)
    heads = np.asarray(heads)
    if len(k) < len(image_ids):                     # a repeated image: its first rows only
        heads, image_ids = heads[k], [image_ids[i] for i in k]
    n, L, H, d = heads.shape
    ids = np.repeat(np.array(image_ids, dtype=object), L * H)
    layer = np.tile(np.repeat(np.array(layers, np.int32), H), n)
    head = np.tile(np.arange(H, dtype=np.int32), n * L)
    return _insert(con, head_embeddings_target(con), pa.table({"model_id": [model_id] * (n * L * H),
                                                               "image_id": ids.tolist(), "layer": layer, "head": head,
                                                               "vec": vector_column(heads.reshape(-1, d))}),
                   "" if new else "ON CONFLICT DO NOTHING")


# --------------------------------------------------------------------------- texts

def upsert_properties(con, properties: dict[str, str]) -> None:
    """{property: description} into `properties` (descriptions refreshed)."""
    _insert(con, "properties", pa.table({"property": list(properties), "description": list(properties.values())}),
            "ON CONFLICT (property) DO UPDATE SET description = excluded.description")


def upsert_texts(con, bank: str, text_ids: Sequence[str], texts: Sequence[str],
                 tags: Sequence[Optional[str]]) -> None:
    """A bank's texts into `texts` (a text's property tag is refreshed)."""
    k = sorted({t: i for i, t in enumerate(text_ids)}.values())      # a repeated text: its last tag
    _insert(con, "texts", pa.table({"text_id": [text_ids[i] for i in k], "bank": [bank] * len(k),
                                    "text": [texts[i] for i in k],
                                    "property": pa.array([tags[i] for i in k], pa.string())}),
            "ON CONFLICT (text_id) DO UPDATE SET property = excluded.property")


def insert_text_embeddings(con, model_id: str, text_ids: Sequence[str], vecs: np.ndarray) -> int:
    """vecs: [m, d] unit text embeddings of ``text_ids`` for the model; returns those newly stored."""
    k = _first_of_each(text_ids)
    return _insert(con, "text_embeddings", pa.table({
        "model_id": [model_id] * len(k), "text_id": [text_ids[i] for i in k],
        "vec": vector_column(np.asarray(vecs)[k])}), "ON CONFLICT DO NOTHING")


# --------------------------------------------------------------------------- heads

def replace_head_texts(con, model_id: str, layer: int, heads: Sequence[int], rows: Iterable[dict]) -> None:
    """Replace the TextSpan texts of ``heads`` of one layer. A head's label and judgments were
    derived from its old texts, so they are dropped too. rows: dicts with the `head_texts` columns
    (head, rank, text_id, variance_explained, dataset_id, bank, run_id, r)."""
    for table in ("head_texts", "head_labels", "text_judgments"):
        con.execute(f"DELETE FROM {table} WHERE model_id = ? AND layer = ? AND list_contains(?, head)",
                    [model_id, layer, list(heads)])
    rows = _last_of_each([{"model_id": model_id, "layer": layer, **r} for r in rows],
                         key=lambda r: (r["head"], r["rank"]))
    if rows:
        _insert_rows(con, "head_texts", list(rows[0]), [list(r.values()) for r in rows])


def replace_head_label(con, model_id: str, layer: int, head: int, *, property: str, confidence: Optional[float],
                       labeler: str, prompt_hash: Optional[str], raw: Optional[str], run_id: Optional[str],
                       p_value: Optional[float]) -> None:
    con.execute("DELETE FROM head_labels WHERE model_id = ? AND layer = ? AND head = ?", [model_id, layer, head])
    _insert_rows(con, "head_labels", ["model_id", "layer", "head", "property", "confidence", "labeler",
                                      "prompt_hash", "raw", "run_id", "p_value"],
                 [(model_id, layer, head, property, confidence, labeler, prompt_hash, raw, run_id, p_value)])


def replace_text_judgment(con, model_id: str, layer: int, head: int, text_id: str, property: str,
                          associated: bool, judge: str, run_id: Optional[str]) -> None:
    con.execute("DELETE FROM text_judgments WHERE model_id = ? AND layer = ? AND head = ? AND text_id = ? "
                "AND property = ?", [model_id, layer, head, text_id, property])
    _insert_rows(con, "text_judgments", ["model_id", "layer", "head", "text_id", "property", "associated", "judge",
                                         "run_id"], [(model_id, layer, head, text_id, property, associated, judge,
                                                      run_id)])


# --------------------------------------------------------------------------- studies (ablation, probes)

def replace_ablations(con, model_id: str, dataset_id: str, rows: Sequence[dict], run_id: Optional[str]) -> None:
    """rows: dicts with factor, kind, layer, head, accuracy (etl ablation_table)."""
    con.execute("DELETE FROM ablations WHERE model_id = ? AND dataset_id = ?", [model_id, dataset_id])
    rows = _last_of_each(rows, key=lambda r: (r["factor"], r["kind"], r["layer"], r["head"]))
    _insert_rows(con, "ablations", ["model_id", "dataset_id", "factor", "kind", "layer", "head", "accuracy", "run_id"],
                 [(model_id, dataset_id, r["factor"], r["kind"], r["layer"], r["head"], r["accuracy"], run_id)
                  for r in rows])


def replace_component_means(con, model_id: str, dataset_id: str, means: Sequence[tuple[str, np.ndarray]]) -> None:
    """means: (component name, mean vector [d]) pairs."""
    con.execute("DELETE FROM component_means WHERE model_id = ? AND dataset_id = ?", [model_id, dataset_id])
    means = _last_of_each(means, key=lambda m: m[0])
    _insert_rows(con, "component_means", ["model_id", "dataset_id", "component", "vec"],
                 [(model_id, dataset_id, name, np.asarray(v, np.float32).tolist()) for name, v in means])


def upsert_factor_properties(con, mapping: dict[str, str]) -> None:
    """{factor: property}: the one property of each ground-truth factor."""
    _insert_rows(con, "factor_properties", ["factor", "property"], list(mapping.items()),
                 "ON CONFLICT (factor) DO UPDATE SET property = excluded.property")


def replace_probes(con, model_id: str, dataset_id: str, probes: Sequence[dict], eta2: Sequence[dict],
                   run_id: Optional[str]) -> None:
    """Probe accuracies (layer, head, factor, accuracy, chance) and variance shares (layer, head, factor, eta2)."""
    for table in ("probes", "head_factor_variance"):
        con.execute(f"DELETE FROM {table} WHERE model_id = ? AND dataset_id = ?", [model_id, dataset_id])
    probes = _last_of_each(probes, key=lambda r: (r["layer"], r["head"], r["factor"]))
    eta2 = _last_of_each(eta2, key=lambda r: (r["layer"], r["head"], r["factor"]))
    _insert_rows(con, "probes", ["model_id", "dataset_id", "layer", "head", "factor", "accuracy", "chance", "run_id"],
                 [(model_id, dataset_id, r["layer"], r["head"], r["factor"], r["accuracy"], r["chance"], run_id)
                  for r in probes])
    _insert_rows(con, "head_factor_variance", ["model_id", "dataset_id", "layer", "head", "factor", "eta2", "run_id"],
                 [(model_id, dataset_id, r["layer"], r["head"], r["factor"], r["eta2"], run_id) for r in eta2])


def replace_baseline_labels(con, model_id: str, baseline: str, layer: int, head: int,
                            labels: Sequence[str], prompt_hash: Optional[str], run_id: Optional[str]) -> None:
    """A head's labels by a baseline labeler, one per draw (labels[d] is draw d's)."""
    con.execute("DELETE FROM baseline_labels WHERE model_id = ? AND baseline = ? AND layer = ? AND head = ?",
                [model_id, baseline, layer, head])
    _insert_rows(con, "baseline_labels", ["model_id", "baseline", "draw", "layer", "head", "property",
                                          "prompt_hash", "run_id"],
                 [(model_id, baseline, d, layer, head, p, prompt_hash, run_id) for d, p in enumerate(labels)])


def replace_code_scores(con, model_id: str, dataset_id: str, rows: Sequence[dict], run_id: Optional[str]) -> None:
    """rows: dicts with score, value, lo, hi, n_boot (etl/world/disentanglement.py)."""
    con.execute("DELETE FROM code_scores WHERE model_id = ? AND dataset_id = ?", [model_id, dataset_id])
    _insert_rows(con, "code_scores", ["model_id", "dataset_id", "score", "value", "lo", "hi", "n_boot", "run_id"],
                 [(model_id, dataset_id, r["score"], r["value"], r["lo"], r["hi"], r["n_boot"], run_id)
                  for r in _last_of_each(rows, key=lambda r: r["score"])])


def replace_world_seeds(con, rows: Sequence[dict]) -> None:
    """The world-seed provenance (etl/world/seeds.py provenance()): seed, role, used_by."""
    con.execute("DELETE FROM world_seeds")
    _insert_rows(con, "world_seeds", ["seed", "role", "used_by"],
                 [(r["seed"], r["role"], r["used_by"]) for r in _last_of_each(rows, key=lambda r: (r["seed"], r["role"]))])


def replace_study(con, study: str, scores: Sequence[dict], sizes: Sequence[dict], verdicts: Sequence[dict],
                  run_id: Optional[str]) -> None:
    """A size study, whole: per-model scores (model_id, world_seed, dataset_id, size, image_params, score,
    value, lo, hi), per-size summaries (size, image_params, score, n_models, mean, lo, hi) and verdicts
    (score, definition, direction, n_models, slope, slope_lo, slope_hi, p_value, verdict)."""
    for table in ("study_scores", "study_sizes", "study_verdicts"):
        con.execute(f"DELETE FROM {table} WHERE study = ?", [study])
    _insert_rows(con, "study_scores", ["study", "model_id", "world_seed", "dataset_id", "size", "image_params",
                                       "score", "value", "lo", "hi", "run_id"],
                 [(study, r["model_id"], r["world_seed"], r["dataset_id"], r["size"], r["image_params"], r["score"],
                   r["value"], r["lo"], r["hi"], run_id)
                  for r in _last_of_each(scores, key=lambda r: (r["model_id"], r["world_seed"], r["score"]))])
    _insert_rows(con, "study_sizes", ["study", "size", "image_params", "score", "n_models", "mean", "lo", "hi",
                                      "run_id"],
                 [(study, r["size"], r["image_params"], r["score"], r["n_models"], r["mean"], r["lo"], r["hi"], run_id)
                  for r in _last_of_each(sizes, key=lambda r: (r["size"], r["score"]))])
    _insert_rows(con, "study_verdicts", ["study", "score", "definition", "direction", "n_models", "slope",
                                         "slope_lo", "slope_hi", "p_value", "verdict", "run_id"],
                 [(study, r["score"], r["definition"], r["direction"], r["n_models"], r["slope"], r["slope_lo"],
                   r["slope_hi"], r["p_value"], r["verdict"], run_id)
                  for r in _last_of_each(verdicts, key=lambda r: r["score"])])


# --------------------------------------------------------------------------- neurons (migration 008)

NEURON_TABLES = ("neuron_stats", "neuron_top_images", "neuron_texts", "neuron_labels", "neuron_head_effects",
                 "neuron_factor_variance", "neuron_ablations", "neuron_layers")


def replace_neuron_layer(con, model_id: str, layer: int, *, layer_row: dict, stats: pa.Table,
                         top_images: pa.Table, texts: pa.Table, labels: pa.Table, head_effects: pa.Table,
                         factor_variance: pa.Table, ablations: pa.Table) -> None:
    """Replace every summary row of one analysed MLP layer (migration 008) in the caller's
    transaction. layer_row: the `neuron_layers` columns but model_id and layer; the tables: Arrow
    tables with their table's columns but model_id and layer (stats' pc a list<float> column)."""
    for table in NEURON_TABLES:
        con.execute(f"DELETE FROM {table} WHERE model_id = ? AND layer = ?", [model_id, int(layer)])
    _insert_rows(con, "neuron_layers", ["model_id", "layer", *layer_row],
                 [[model_id, int(layer), *layer_row.values()]])
    for table, rows in (("neuron_stats", stats), ("neuron_top_images", top_images), ("neuron_texts", texts),
                        ("neuron_labels", labels), ("neuron_head_effects", head_effects),
                        ("neuron_factor_variance", factor_variance), ("neuron_ablations", ablations)):
        n = rows.num_rows
        rows = rows.append_column("model_id", pa.array([model_id] * n, pa.string())) \
                   .append_column("layer", pa.array([int(layer)] * n, pa.int32()))
        _insert(con, table, rows)


def insert_neuron_alpha(con, model_id: str, layer: int, image_ids: Sequence[str], alpha: np.ndarray) -> int:
    """alpha [B, N, P] of ``image_ids`` for MLP layer ``layer`` as `neuron_alpha` rows (neuron-major
    lists of N * P floats); an image already stored keeps its row. Returns rows newly stored."""
    k = _first_of_each(image_ids)
    a = np.asarray(alpha, dtype=np.float32)
    return _insert(con, "neuron_alpha", pa.table({
        "model_id": [model_id] * len(k), "layer": pa.array([int(layer)] * len(k), pa.int32()),
        "image_id": [image_ids[i] for i in k], "alpha": vector_column(a[k].reshape(len(k), -1))}),
        "ON CONFLICT DO NOTHING")


def delete_neuron_alpha(con, model_id: str, layer: int) -> None:
    """Drop the per-image alpha of one layer (a recomputation, or a run without --store-alpha)."""
    con.execute("DELETE FROM neuron_alpha WHERE model_id = ? AND layer = ?", [model_id, int(layer)])


# --------------------------------------------------------------------------- Parquet shards (embed --engine ray, attach)

# The Arrow schema of each table a shard holds: exactly the warehouse columns (INTEGER -> int32,
# FLOAT[] -> list<float32>), so a shard file reads back as the table's own rows. Write order:
# `images` last, so a shard whose `images` file exists is complete (the commit mark).
SHARD_SCHEMAS: dict[str, pa.Schema] = {
    "head_embeddings": pa.schema([("model_id", pa.string()), ("image_id", pa.string()), ("layer", pa.int32()),
                                  ("head", pa.int32()), ("vec", pa.list_(pa.float32()))]),
    "image_embeddings": pa.schema([("model_id", pa.string()), ("image_id", pa.string()),
                                   ("vec", pa.list_(pa.float32()))]),
    "image_factors": pa.schema([("image_id", pa.string()), ("factor", pa.string()), ("value", pa.string())]),
    "images": pa.schema([("image_id", pa.string()), ("dataset_id", pa.string()), ("path", pa.string()),
                         ("sha256", pa.string()), ("label", pa.string()), ("caption", pa.string()),
                         ("width", pa.int32()), ("height", pa.int32()), ("thumbnail", pa.binary()),
                         ("original", pa.binary())]),
}
SHARD_TABLES = tuple(SHARD_SCHEMAS)
HEAD_EMBEDDINGS_BASE = "head_embeddings_base"


def shard_tables(model_id: str, dataset_id: str, image_ids: Sequence[str], paths: Sequence[Optional[str]],
                 sha256: Sequence[str], labels: Sequence[Optional[str]], captions: Sequence[Optional[str]],
                 sizes: Sequence[tuple[int, int]], thumbnails: Sequence[bytes],
                 factors: Sequence[tuple[str, str, str]], layers: Sequence[int], embeddings: np.ndarray,
                 heads: np.ndarray, originals: Optional[Sequence[Optional[bytes]]] = None) -> dict[str, pa.Table]:
    """The rows that insert_images, insert_image_factors, insert_image_embeddings and
    insert_head_embeddings would write for one batch, as Arrow tables (SHARD_SCHEMAS) for a
    Parquet shard. embeddings: [n, d]; heads: [n, L', H, d]; head rows sorted by (layer, head,
    image_id), the order `optimize` gives the table."""
    n = len(image_ids)
    ids = list(image_ids)
    n_, L, H, d = heads.shape
    if n_ != n or len(embeddings) != n or len(layers) != L:
        raise ValueError(f"shard rows disagree: {n} images, embeddings {tuple(embeddings.shape)}, heads "
                         f"{tuple(heads.shape)}, layers {list(layers)}")
    order = sorted(range(n), key=ids.__getitem__)
    ids_sorted = np.array([ids[i] for i in order], dtype=object)
    h = np.ascontiguousarray(np.asarray(heads, np.float32)[order].transpose(1, 2, 0, 3))      # [L', H, n, d]
    s = SHARD_SCHEMAS
    return {
        "head_embeddings": pa.table({
            "model_id": pa.array([model_id] * (n * L * H), pa.string()),
            "image_id": pa.array(np.tile(ids_sorted, L * H).tolist(), pa.string()),
            "layer": pa.array(np.repeat(np.asarray(layers, np.int32), H * n), pa.int32()),
            "head": pa.array(np.tile(np.repeat(np.arange(H, dtype=np.int32), n), L), pa.int32()),
            "vec": vector_column(h.reshape(-1, d))}, schema=s["head_embeddings"]),
        "image_embeddings": pa.table({"model_id": pa.array([model_id] * n, pa.string()),
                                      "image_id": pa.array(ids, pa.string()),
                                      "vec": vector_column(np.asarray(embeddings, np.float32))},
                                     schema=s["image_embeddings"]),
        "image_factors": pa.table({"image_id": [r[0] for r in factors], "factor": [r[1] for r in factors],
                                   "value": [r[2] for r in factors]}, schema=s["image_factors"]),
        "images": pa.table({
            "image_id": ids, "dataset_id": [dataset_id] * n, "path": list(paths), "sha256": list(sha256),
            "label": list(labels), "caption": list(captions), "width": [int(x[0]) for x in sizes],
            "height": [int(x[1]) for x in sizes], "thumbnail": list(thumbnails),
            "original": list(originals) if originals is not None else [None] * n}, schema=s["images"]),
    }


def insert_shard_files(con, table: str, files: Sequence[str]) -> int:
    """Copy shard files of one table into the warehouse, streamed by DuckDB (``read_parquet``: no
    file is loaded whole); idempotent: a row whose key is already stored is left as it is
    (head_embeddings: matched on model_id, image_id, layer, head, and written to the base table
    while shards are attached in place). The files must have been checked (etl.shards.check_set:
    exactly the SHARD_SCHEMAS columns, keys unique within the set). Returns the rows inserted."""
    schema = SHARD_SCHEMAS.get(table)
    if schema is None:
        raise ValueError(f"{table!r} is not a shard table (one of {', '.join(SHARD_TABLES)})")
    if not files:
        return 0
    cols = ", ".join(schema.names)
    if table != "head_embeddings":
        got = con.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM read_parquet($files) ON CONFLICT DO NOTHING",
                          {"files": list(files)}).fetchone()
        return int(got[0]) if got else 0
    target = head_embeddings_target(con)
    got = con.execute(f"""
        INSERT INTO {target} (model_id, image_id, layer, head, vec)
        SELECT r.model_id, r.image_id, r.layer, r.head, r.vec FROM read_parquet($files) r
        WHERE NOT EXISTS (SELECT 1 FROM {target} t WHERE t.model_id = r.model_id AND t.image_id = r.image_id
                          AND t.layer = r.layer AND t.head = r.head)""", {"files": list(files)}).fetchone()
    return int(got[0]) if got else 0


def delete_head_embeddings_of_image_files(con, model_id: str, image_files: Sequence[str],
                                          layers: Sequence[int]) -> None:
    """Delete the model's head rows in ``layers`` of the images listed in shard ``image_files`` from the
    table (the base table while shards are attached in place): a set attached in place brings these
    rows itself."""
    if not image_files:
        return
    con.execute(f"DELETE FROM {head_embeddings_target(con)} WHERE model_id = $m AND list_contains($layers, layer) "
                f"AND image_id IN (SELECT image_id FROM read_parquet($files))",
                {"m": model_id, "layers": [int(x) for x in layers], "files": list(image_files)})


def insert_errors_once(con, run_id: Optional[str], rows: Sequence[tuple[str, str]]) -> None:
    """(item, reason) rows of `errors` that are not stored yet (a re-attached manifest adds none)."""
    for item, reason in rows:
        con.execute("INSERT INTO errors (run_id, item, reason) SELECT ?, ?, ? WHERE NOT EXISTS "
                    "(SELECT 1 FROM errors WHERE item = ? AND reason = ?)",
                    [run_id, str(item), str(reason), str(item), str(reason)])


def upsert_shard_set(con, shard_dir: str, model_id: str, dataset_id: str, mode: str, manifest_sha256: str,
                     n_shards: int, n_images: int, n_head_rows: int, files: Sequence[str],
                     run_id: Optional[str]) -> None:
    """Register (or re-register) a shard directory; ``files``: its head_embeddings files read in place
    (mode 'in_place'), empty for mode 'copy'. Call refresh_head_embeddings_view after it."""
    if mode not in ("copy", "in_place"):
        raise ValueError(f"shard set mode must be 'copy' or 'in_place', not {mode!r}")
    delete_shard_set(con, shard_dir)
    _insert_rows(con, "shard_sets", ["shard_dir", "model_id", "dataset_id", "mode", "manifest_sha256", "n_shards",
                                     "n_images", "n_head_rows", "files", "run_id"],
                 [(shard_dir, model_id, dataset_id, mode, manifest_sha256, int(n_shards), int(n_images),
                   int(n_head_rows), [str(f) for f in files], run_id)])


def delete_shard_set(con, shard_dir: str) -> None:
    """Forget a shard directory (call refresh_head_embeddings_view after it)."""
    con.execute("DELETE FROM shard_sets WHERE shard_dir = ?", [shard_dir])


def delete_other_shard_sets(con, model_id: str, dataset_id: str, shard_dir: str) -> list[str]:
    """Forget the sets of the same model and dataset registered from another directory (a set that
    was moved, attached from its new place); returns their directories. Call
    refresh_head_embeddings_view after it."""
    return [r[0] for r in con.execute(
        "DELETE FROM shard_sets WHERE model_id = ? AND dataset_id = ? AND shard_dir <> ? RETURNING shard_dir",
        [model_id, dataset_id, shard_dir]).fetchall()]


def head_embeddings_target(con) -> str:
    """The table that holds head_embeddings rows written by jobs: `head_embeddings`, or
    `head_embeddings_base` while `head_embeddings` is the view over shards attached in place."""
    return HEAD_EMBEDDINGS_BASE if _head_embeddings_is_view(con) else "head_embeddings"


def _head_embeddings_is_view(con) -> bool:
    return bool(con.execute(
        "SELECT count(*) FROM duckdb_views() WHERE view_name = 'head_embeddings' AND schema_name = 'main' "
        "AND database_name = current_database()").fetchall()[0][0])


def _sql_string(s: str) -> str:
    return "'" + str(s).replace("'", "''") + "'"


def _rename_table(con, old: str, new: str) -> None:
    """ALTER TABLE old RENAME TO new; DuckDB refuses that while an index (CREATE INDEX) depends on
    the table, so such indexes are dropped and made again on the renamed table."""
    indexes = con.execute(
        "SELECT index_name, sql FROM duckdb_indexes() WHERE table_name = ? AND schema_name = 'main' "
        "AND database_name = current_database() AND sql IS NOT NULL", [old]).fetchall()
    for name, _ in indexes:
        con.execute(f'DROP INDEX "{name}"')
    con.execute(f"ALTER TABLE {old} RENAME TO {new}")
    for _, sql in indexes:
        con.execute(re.sub(rf'\bON\s+(?:"{old}"|{old})\s*\(', f"ON {new}(", sql, count=1, flags=re.I))


def refresh_head_embeddings_view(con) -> int:
    """Make `head_embeddings` match `shard_sets`, inside the caller's write transaction.

    With head_embeddings files registered in place: the table is (or stays) renamed
    `head_embeddings_base` and `head_embeddings` is a view, its rows UNION ALL read_parquet(the
    files), so every query, view and page reads both. With none: the view is dropped and the
    table gets its name back. Returns the number of files read in place.
    """
    from warehouse.db import in_place_shard_files
    files = in_place_shard_files(con)
    is_view = _head_embeddings_is_view(con)
    if files:
        if not is_view:
            _rename_table(con, "head_embeddings", HEAD_EMBEDDINGS_BASE)
        listing = ", ".join(_sql_string(f) for f in files)
        con.execute(f"""
            CREATE OR REPLACE VIEW head_embeddings AS
            SELECT model_id, image_id, layer, head, vec FROM {HEAD_EMBEDDINGS_BASE}
            UNION ALL
            SELECT model_id, image_id, layer, head, vec FROM read_parquet([{listing}])""")
    elif is_view:
        con.execute("DROP VIEW head_embeddings")
        _rename_table(con, HEAD_EMBEDDINGS_BASE, "head_embeddings")
    return len(files)


@contextlib.contextmanager
def head_embeddings_as_table(con):
    """For migrations (warehouse.db.migrate, outside a transaction): inside, `head_embeddings` is the
    table of the migrations, whatever shards are attached in place; the view is made again after."""
    if not _head_embeddings_is_view(con):
        yield
        return
    con.execute("BEGIN TRANSACTION")
    con.execute("DROP VIEW head_embeddings")
    _rename_table(con, HEAD_EMBEDDINGS_BASE, "head_embeddings")
    con.execute("COMMIT")
    try:
        yield
    finally:
        con.execute("BEGIN TRANSACTION")
        refresh_head_embeddings_view(con)
        con.execute("COMMIT")


def copy_tables_to_file(con, file, tables: Sequence[str]) -> None:
    """Copy ``tables`` whole into a new DuckDB file ``file`` (what they cost on disk on their own: benchmarks)."""
    con.execute(f"ATTACH '{file}' AS copy_db")
    try:
        for tab in tables:
            con.execute(f"CREATE TABLE copy_db.{tab} AS SELECT * FROM {tab}")
    finally:
        con.execute("DETACH copy_db")
