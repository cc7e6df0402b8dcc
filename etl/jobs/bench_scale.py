"""`bench-scale`: the store at a million images (issue 13 item 6; `make bench-scale`, not part of `make bench`).

    python -m etl bench-scale                      # 1,000,000 images: about 27 GB on disk, for a while
    python -m etl bench-scale --images 2000        # the same steps, small (the test)

What it does, through the product's own code, in a temporary folder that is deleted afterwards
(also on an error or Ctrl-C):

1. **Generate** a shard set of one model and one layer: 12 heads, d = 512, random float32
   vectors (seeded; this measures the store, not a model), in the format `embed --engine ray`
   writes (``etl.shards.write_shard``: the `warehouse.writes.SHARD_SCHEMAS` tables, one row group
   per head, and the manifest). Images rows carry no thumbnails, and image embeddings are random
   unit vectors. The free disk is checked first.
2. **Attach** it in place to a fresh warehouse (``etl.shards.attach_set``: verify every file's
   sha256, copy the images and image embeddings in, `head_embeddings` becomes the view).
3. **Top-10 neighbours** of one head over every image (``warehouse.queries.neighbours_per_head``,
   what the dashboard runs): cold (the shard files dropped from the page cache, a fresh DuckDB
   instance) and warm (median of ``--runs``). Checked against the true top 10 (brute force) when
   the set is small enough for memory.
4. **TextSpan** of the layer's 12 heads over every image, streamed (the covariance form:
   ``warehouse.queries.head_vector_batches`` -> ``etl.text.textspan.HeadMoments`` ->
   ``textspan_from_moments``), with a text bank of the product's size (random unit vectors).

The last line printed is one JSON object; the figures' keys carry the image count (``1m`` for
1,000,000: ``neighbours_top10_1m_s``, ``textspan_layer_1m_s``, ``attach_1m_s``, ``disk_gb_1m``).
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

from etl.common import UsageError, non_negative_int, positive_int

MODEL_ID = "bench-scale/random-vectors"
# shaped like ViT-B-16's image tower (12 layers of 12 heads of 64, joint embedding d = 512)
MODEL_ROW = {"model_id": MODEL_ID, "arch": "ViT-B-16", "pretrained": None, "source": "random", "checkpoint_path": None,
             "seed": 0, "layers": 12, "heads": 12, "width": 768, "embed_dim": 512, "patch_size": 16,
             "image_size": 224, "pooling": "tok"}
LAYER, HEADS, D, HEAD_DIM = 11, 12, 512, 64
QUERY_HEAD = 5
TEXTSPAN_K, TEXTSPAN_R = 10, 80     # the textspan job's defaults
TARGET_NEIGHBOURS_S = 2.0        # top-10 over 1M images, one head
TARGET_TEXTSPAN_S = 120.0        # the layer's 12 heads over 1M images, 2 cores
BRUTE_FORCE_MAX = 200_000        # images: check the neighbour answer by numpy below this


def add_parser(sub) -> None:
    p = sub.add_parser("bench-scale", help="the store at 1,000,000 images: shards, attach, neighbours, TextSpan "
                                           "(make bench-scale)",
                       description="Generate a synthetic shard set (one model, one layer, 12 heads, d = 512, random "
                                   "float32 vectors: it measures the store, not a model), attach it in place, time "
                                   "the top-10 neighbour query of one head and TextSpan of the layer over every "
                                   "image, then delete it all. The last line is one JSON object.")
    p.add_argument("--images", type=positive_int, default=1_000_000, metavar="N",
                   help="images in the set (default 1,000,000: about 27 GB)")
    p.add_argument("--dir", default=None, metavar="DIR",
                   help="make the temporary folder inside DIR (default: inside $ATLAS_HOME); it is deleted afterwards")
    p.add_argument("--shard-size", type=positive_int, default=65_536, metavar="N",
                   help="images per shard (default 65,536: 16 shard files for 1M images, one 65,536-row row group "
                        "per head)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random vectors (default 0)")
    p.add_argument("--texts", type=positive_int, default=None, metavar="M",
                   help="text bank size for TextSpan (default: the size of the product's atlas bank)")
    p.add_argument("--runs", type=positive_int, default=5, help="warm neighbour queries, median (default 5)")
    p.set_defaults(func=run)


# --------------------------------------------------------------------------- the synthetic set

def image_ids(first: int, n: int) -> list[str]:
    """The ids of images first .. first+n-1 (zero-padded: sorted ids are index order)."""
    return [f"bench-scale/{i:09d}" for i in range(first, first + n)]


def head_vectors(seed: int, first: int, n: int, heads: int = HEADS, d: int = D) -> np.ndarray:
    """The head embeddings of the shard starting at image ``first``: float32 [heads, n, d], uniform
    in [-0.5, 0.5), from the generator seeded (seed, first) (so a test can regenerate them)."""
    out = np.random.default_rng([seed, first]).random((heads, n, d), dtype=np.float32)
    out -= 0.5
    return out


def image_vectors(seed: int, first: int, n: int, d: int = D) -> np.ndarray:
    v = np.random.default_rng([seed, first, 1]).random((n, d), dtype=np.float32)
    v -= 0.5
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def query_vector(seed: int, d: int = D) -> np.ndarray:
    """The neighbour query's vector (a stand-in for c_query[l,h] of an image outside the set)."""
    return np.random.default_rng([seed, 2**32 - 1]).random(d, dtype=np.float32) - np.float32(0.5)


def text_vectors(seed: int, m: int, d: int = D) -> np.ndarray:
    t = np.random.default_rng([seed, 2**32 - 2]).standard_normal((m, d), dtype=np.float32)
    return t / np.linalg.norm(t, axis=1, keepdims=True)


def _shard_tables(seed: int, first: int, n: int, dataset_id: str) -> dict:
    """One shard's tables (warehouse.writes.SHARD_SCHEMAS), head rows sorted by (layer, head,
    image_id) as writes.shard_tables sorts them, built head-major without copying the vectors."""
    import pyarrow as pa

    from warehouse.writes import SHARD_SCHEMAS, vector_column
    ids = image_ids(first, n)
    s = SHARD_SCHEMAS
    vec = head_vectors(seed, first, n)
    none_str = pa.nulls(n, pa.string())
    none_int = pa.nulls(n, pa.int32())
    return {
        "head_embeddings": pa.table({
            "model_id": pa.array([MODEL_ID] * (n * HEADS), pa.string()),
            "image_id": pa.array(ids * HEADS, pa.string()),
            "layer": pa.array(np.full(n * HEADS, LAYER, np.int32)),
            "head": pa.array(np.repeat(np.arange(HEADS, dtype=np.int32), n)),
            "vec": vector_column(vec.reshape(-1, D))}, schema=s["head_embeddings"]),
        "image_embeddings": pa.table({"model_id": pa.array([MODEL_ID] * n, pa.string()),
                                      "image_id": pa.array(ids, pa.string()),
                                      "vec": vector_column(image_vectors(seed, first, n))}, schema=s["image_embeddings"]),
        "image_factors": s["image_factors"].empty_table(),
        "images": pa.table({"image_id": pa.array(ids, pa.string()), "dataset_id": pa.array([dataset_id] * n, pa.string()),
                            "path": none_str, "sha256": none_str, "label": none_str, "caption": none_str,
                            "width": none_int, "height": none_int, "thumbnail": pa.nulls(n, pa.binary()),
                            "original": pa.nulls(n, pa.binary())}, schema=s["images"]),
    }


def bytes_needed(images: int) -> int:
    """Disk for the set (head and image embeddings, float32, uncompressible) plus the warehouse's copy
    of the image embeddings, with 10 % and 1 GB to spare."""
    per_image = (HEADS + 2) * D * 4 + 200
    return int(images * per_image * 1.1) + (1 << 30)


def generate(directory: Path, images: int, seed: int, shard_size: int) -> dict:
    """Write the set into ``directory`` (etl.shards.write_shard, manifest last); returns its manifest."""
    from etl import shards
    from etl.common import progress
    dataset = {"dataset_id": f"bench-scale:{images}:seed={seed}", "name": f"bench-scale {images:,} random images",
               "source": "synthetic", "n_images": images}
    manifest = shards.new_manifest(MODEL_ROW, [LAYER], None, None, dataset, shard_size)
    with shards.locked(directory), progress(None, total=images, unit="img", desc="generate shards") as bar:
        for first in range(0, images, shard_size):
            n = min(shard_size, images - first)
            manifest["shards"].append(shards.write_shard(directory, first, _shard_tables(seed, first, n,
                                                                                          dataset["dataset_id"])))
            bar.update(n)
        manifest["n_items"], manifest["complete"] = images, True
        shards.write_manifest(directory, manifest)
    return manifest


def _drop_from_page_cache(files) -> None:
    """Evict these files' pages from the OS page cache (only ours; a cold read without root)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _suffix(images: int) -> str:
    """'1m' for 1,000,000, '2k' for 2,000, else the number."""
    for unit, name in ((1_000_000, "m"), (1_000, "k")):
        if images % unit == 0:
            return f"{images // unit}{name}"
    return str(images)


# --------------------------------------------------------------------------- the measurements

def time_neighbours(path: str, files: list[str], seed: int, runs: int) -> dict:
    """Top-10 of head (LAYER, QUERY_HEAD) by c . q through queries.neighbours_per_head: cold, then warm."""
    from warehouse import release_readers
    from warehouse.queries import neighbours_per_head
    q = query_vector(seed)[None]
    release_readers(path)
    _drop_from_page_cache(files)
    saved = os.environ.get("ATLAS_READER_KEEP_S")
    os.environ["ATLAS_READER_KEEP_S"] = "0"              # a fresh DuckDB instance: nothing cached
    try:
        t0 = time.perf_counter()
        hits = neighbours_per_head(path, MODEL_ID, [(LAYER, QUERY_HEAD)], q, k=10)
        cold = time.perf_counter() - t0
    finally:
        if saved is None:
            os.environ.pop("ATLAS_READER_KEEP_S", None)
        else:
            os.environ["ATLAS_READER_KEEP_S"] = saved
    warm, cpu = [], []
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        again = neighbours_per_head(path, MODEL_ID, [(LAYER, QUERY_HEAD)], q, k=10)
        warm.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    if again.image_id.tolist() != hits.image_id.tolist():
        raise AssertionError("the neighbour query gave two different answers")
    release_readers(path)
    return {"cold_s": cold, "warm_s": statistics.median(warm), "warm_min_s": min(warm),
            "warm_cpu_s": statistics.median(cpu), "image_ids": hits.image_id.tolist(),
            "scores": [float(x) for x in hits.score]}


def brute_force_top10(images: int, seed: int, shard_size: int) -> list[str]:
    """The true top 10 of the query head by numpy over the regenerated vectors (ties: lowest id)."""
    q = query_vector(seed).astype(np.float64)
    scores = np.concatenate([head_vectors(seed, first, min(shard_size, images - first))[QUERY_HEAD].astype(np.float64)
                             @ q for first in range(0, images, shard_size)])
    order = np.lexsort((np.arange(images), -scores))[:10]
    ids = image_ids(0, images)
    return [ids[i] for i in order]


def time_textspan(path: str, seed: int, texts: int, k: int = TEXTSPAN_K, r: int = TEXTSPAN_R,
                  batch_rows: int = 65_536) -> dict:
    """TextSpan of the layer's heads over every image, streamed; the picks are returned for checking."""
    import torch

    from etl.text.textspan import HeadMoments, textspan_from_moments
    from warehouse.queries import head_vector_batches
    T = text_vectors(seed, texts)
    t0, c0 = time.perf_counter(), time.process_time()
    moments = HeadMoments(HEADS, D)
    rows = 0
    for h in range(HEADS):              # as the textspan job streams a layer (shard row groups read ahead on threads)
        for X in head_vector_batches(path, MODEL_ID, LAYER, h, batch_rows, reuse=True):
            moments.add(h, X)
            rows += len(X)
    read_s = time.perf_counter() - t0
    idx, var = textspan_from_moments(moments, T, k=k, r=r, max_rank=HEAD_DIM)
    total = time.perf_counter() - t0
    return {"total_s": total, "read_and_moments_s": read_s, "picks_s": total - read_s,
            "cpu_s": time.process_time() - c0, "rows": rows, "texts": texts, "k": k, "r": r,
            "torch_threads": torch.get_num_threads(), "images_per_head": [int(x) for x in moments.n],
            "idx": idx.tolist(), "variance": var.tolist()}


def bench_scale(images: int = 1_000_000, directory: Optional[str] = None, shard_size: int = 65_536, seed: int = 0,
                texts: Optional[int] = None, runs: int = 5) -> dict:
    """Generate, attach, query, TextSpan, delete; returns every figure (see the module docstring)."""
    import duckdb

    from etl.shards import attach_set
    from etl.text.bank import ATLAS_BANK, bank_texts
    from warehouse import atlas_home, release_readers
    parent = Path(directory).expanduser() if directory else atlas_home()
    parent.mkdir(parents=True, exist_ok=True)
    need, free = bytes_needed(images), shutil.disk_usage(parent).free
    if need > free:
        raise UsageError(f"bench-scale with {images:,} images needs about {need / 1e9:.1f} GB free in {parent}, "
                         f"{free / 1e9:.1f} GB are; free some space, pass --dir on a larger disk, or fewer --images")
    texts = texts or len(bank_texts(ATLAS_BANK))
    if texts < TEXTSPAN_K or images < 2:
        raise UsageError(f"bench-scale needs at least {TEXTSPAN_K} texts and 2 images (TextSpan picks "
                         f"{TEXTSPAN_K} texts per head), got --texts {texts} and --images {images}")
    tag = _suffix(images)
    out: dict = {"images": images, "layer": LAYER, "heads": HEADS, "d": D, "shard_size": shard_size, "seed": seed,
                 "vectors": "random float32 (seeded): this measures the store, not a model",
                 "cpus": os.cpu_count(), "duckdb": duckdb.__version__,
                 "load_average_start": [round(x, 2) for x in os.getloadavg()],
                 "disk_free_gb_before": round(free / 1e9, 1)}
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=parent))
    path = str(tmp / "bench.duckdb")
    out["dir"] = str(tmp)
    try:
        shard_dir = tmp / "shards"
        t0 = time.perf_counter()
        manifest = generate(shard_dir, images, seed, shard_size)
        out[f"generate_{tag}_s"] = round(time.perf_counter() - t0, 1)
        files = [str(shard_dir / e["files"]["head_embeddings"]["path"]) for e in manifest["shards"]]
        set_bytes = sum(f["bytes"] for e in manifest["shards"] for f in e["files"].values())
        out[f"disk_gb_{tag}"] = round(set_bytes / 1e9, 2)
        out[f"head_embeddings_gb_{tag}"] = round(sum(os.path.getsize(f) for f in files) / 1e9, 2)
        out["shard_files"] = len(manifest["shards"]) * len(manifest["tables"])

        t0 = time.perf_counter()
        attached = attach_set(path, shard_dir, copy_below=0)
        out[f"attach_{tag}_s"] = round(time.perf_counter() - t0, 1)
        out["attach_mode"] = attached["mode"]
        release_readers(path)
        out[f"warehouse_gb_{tag}"] = round(os.path.getsize(path) / 1e9, 2)

        nb = time_neighbours(path, files, seed, runs)
        out[f"neighbours_top10_{tag}_s"] = round(nb["warm_s"], 3)
        out[f"neighbours_top10_cold_{tag}_s"] = round(nb["cold_s"], 3)
        out[f"neighbours_top10_min_{tag}_s"] = round(nb["warm_min_s"], 3)
        out[f"neighbours_top10_cpu_{tag}_s"] = round(nb["warm_cpu_s"], 3)
        out["neighbours_top10_ids"] = nb["image_ids"]
        if images <= BRUTE_FORCE_MAX:
            out["neighbours_equal_brute_force"] = nb["image_ids"] == brute_force_top10(images, seed, shard_size)

        ts = time_textspan(path, seed, texts)
        out[f"textspan_layer_{tag}_s"] = round(ts["total_s"], 1)
        out[f"textspan_read_and_moments_{tag}_s"] = round(ts["read_and_moments_s"], 1)
        out[f"textspan_picks_{tag}_s"] = round(ts["picks_s"], 2)
        out[f"textspan_cpu_{tag}_s"] = round(ts["cpu_s"], 1)
        out["textspan"] = {k: ts[k] for k in ("rows", "texts", "k", "r", "torch_threads", "images_per_head")}
        out["textspan"]["texts_are"] = "random unit vectors, d = 512, as many as the atlas bank"
        out["textspan_idx_head0"] = ts["idx"][0]
        out["targets"] = {f"neighbours_top10_{tag}_s": TARGET_NEIGHBOURS_S, f"textspan_layer_{tag}_s": TARGET_TEXTSPAN_S}
        out["ok"] = nb["warm_s"] <= TARGET_NEIGHBOURS_S and ts["total_s"] <= TARGET_TEXTSPAN_S
    finally:
        release_readers(path)
        shutil.rmtree(tmp, ignore_errors=True)
        out["deleted"] = not tmp.exists()
        out["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return out


def run(args) -> int:
    out = bench_scale(args.images, args.dir, args.shard_size, args.seed, args.texts, args.runs)
    tag = _suffix(args.images)
    print(f"\n## The store at {args.images:,} images (layer {LAYER}, {HEADS} heads, d = {D}; random vectors)")
    for key, unit in ((f"disk_gb_{tag}", "GB"), (f"generate_{tag}_s", "s"), (f"attach_{tag}_s", "s"),
                      (f"neighbours_top10_cold_{tag}_s", "s"), (f"neighbours_top10_{tag}_s", "s (warm median)"),
                      (f"textspan_layer_{tag}_s", "s")):
        print(f"  {key:<34} {out.get(key)} {unit}")
    print(json.dumps(out))
    return 0
