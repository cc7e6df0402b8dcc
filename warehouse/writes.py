"""Named write statements: every SQL statement a job uses to write lives here.

Each function takes an open write connection (``with warehouse.writer(path) as con``), so the
caller decides how much goes into one transaction; nothing here commits or opens files.
Rows are inserted by column name (never by position), so a migration that adds a column
cannot shift values. Vectors are float32 arrays ``[n, d]``; heads are 0-based (layer, head).
"""
from __future__ import annotations

import itertools
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


def _insert(con: duckdb.DuckDBPyConnection, table: str, rows: pa.Table, on_conflict: str = "") -> None:
    """INSERT the Arrow table ``rows`` into ``table``, matching columns by name."""
    if rows.num_rows == 0:
        return
    name = f"_rows_{next(_names)}"
    cols = ", ".join(rows.column_names)
    con.register(name, rows)
    try:
        con.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM {name} {on_conflict}")
    finally:
        con.unregister(name)


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
                  originals: Optional[Sequence[Optional[bytes]]] = None) -> None:
    """`images` rows (an image already stored is left as it is). originals: lossless PNG bytes of
    images with no file on disk (migration 006), None where the image can be read again."""
    n = len(image_ids)
    extra = {} if originals is None else {"original": pa.array(list(originals), pa.binary())}
    _insert(con, "images", pa.table({**extra,
        "image_id": list(image_ids), "dataset_id": [dataset_id] * n, "path": list(paths), "sha256": list(sha256),
        "label": pa.array(list(labels), pa.string()), "caption": pa.array(list(captions), pa.string()),
        "width": [s[0] for s in sizes], "height": [s[1] for s in sizes],
        "thumbnail": pa.array(list(thumbnails), pa.binary())}), "ON CONFLICT DO NOTHING")


def insert_image_factors(con, rows: Sequence[tuple[str, str, str]]) -> None:
    """(image_id, factor, value) rows of `image_factors`."""
    _insert(con, "image_factors", pa.table({"image_id": [r[0] for r in rows], "factor": [r[1] for r in rows],
                                            "value": [r[2] for r in rows]}), "ON CONFLICT DO NOTHING")


def insert_image_embeddings(con, model_id: str, image_ids: Sequence[str], vecs: np.ndarray) -> None:
    """vecs: [n, d] unit image embeddings, one per image id."""
    _insert(con, "image_embeddings", pa.table({"model_id": [model_id] * len(image_ids), "image_id": list(image_ids),
                                               "vec": vector_column(vecs)}), "ON CONFLICT DO NOTHING")


def insert_head_embeddings(con, model_id: str, image_ids: Sequence[str], layers: Sequence[int],
                           heads: np.ndarray) -> None:
    """heads: [n, L', H, d], the head contributions c[l,h] of ``image_ids`` for the analysed ``layers``."""
    n, L, H, d = heads.shape
    ids = np.repeat(np.array(list(image_ids), dtype=object), L * H)
    layer = np.tile(np.repeat(np.array(layers, np.int32), H), n)
    head = np.tile(np.arange(H, dtype=np.int32), n * L)
    _insert(con, "head_embeddings", pa.table({"model_id": [model_id] * (n * L * H), "image_id": ids.tolist(),
                                              "layer": layer, "head": head,
                                              "vec": vector_column(heads.reshape(-1, d))}))


# --------------------------------------------------------------------------- texts

def upsert_properties(con, properties: dict[str, str]) -> None:
    """{property: description} into `properties` (descriptions refreshed)."""
    _insert(con, "properties", pa.table({"property": list(properties), "description": list(properties.values())}),
            "ON CONFLICT (property) DO UPDATE SET description = excluded.description")


def upsert_texts(con, bank: str, text_ids: Sequence[str], texts: Sequence[str],
                 tags: Sequence[Optional[str]]) -> None:
    """A bank's texts into `texts` (a text's property tag is refreshed)."""
    _insert(con, "texts", pa.table({"text_id": list(text_ids), "bank": [bank] * len(text_ids), "text": list(texts),
                                    "property": pa.array(list(tags), pa.string())}),
            "ON CONFLICT (text_id) DO UPDATE SET property = excluded.property")


def insert_text_embeddings(con, model_id: str, text_ids: Sequence[str], vecs: np.ndarray) -> None:
    """vecs: [m, d] unit text embeddings of ``text_ids`` for the model."""
    _insert(con, "text_embeddings", pa.table({"model_id": [model_id] * len(text_ids), "text_id": list(text_ids),
                                              "vec": vector_column(vecs)}), "ON CONFLICT DO NOTHING")


# --------------------------------------------------------------------------- heads

def replace_head_texts(con, model_id: str, layer: int, heads: Sequence[int], rows: Iterable[dict]) -> None:
    """Replace the TextSpan texts of ``heads`` of one layer. A head's label and judgments were
    derived from its old texts, so they are dropped too. rows: dicts with the `head_texts` columns
    (head, rank, text_id, variance_explained, dataset_id, bank, run_id, r)."""
    for table in ("head_texts", "head_labels", "text_judgments"):
        con.execute(f"DELETE FROM {table} WHERE model_id = ? AND layer = ? AND list_contains(?, head)",
                    [model_id, layer, list(heads)])
    rows = [{"model_id": model_id, "layer": layer, **r} for r in rows]
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
    _insert_rows(con, "ablations", ["model_id", "dataset_id", "factor", "kind", "layer", "head", "accuracy", "run_id"],
                 [(model_id, dataset_id, r["factor"], r["kind"], r["layer"], r["head"], r["accuracy"], run_id)
                  for r in rows])


def replace_component_means(con, model_id: str, dataset_id: str, means: Sequence[tuple[str, np.ndarray]]) -> None:
    """means: (component name, mean vector [d]) pairs."""
    con.execute("DELETE FROM component_means WHERE model_id = ? AND dataset_id = ?", [model_id, dataset_id])
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
    _insert_rows(con, "probes", ["model_id", "dataset_id", "layer", "head", "factor", "accuracy", "chance", "run_id"],
                 [(model_id, dataset_id, r["layer"], r["head"], r["factor"], r["accuracy"], r["chance"], run_id)
                  for r in probes])
    _insert_rows(con, "head_factor_variance", ["model_id", "dataset_id", "layer", "head", "factor", "eta2", "run_id"],
                 [(model_id, dataset_id, r["layer"], r["head"], r["factor"], r["eta2"], run_id) for r in eta2])
