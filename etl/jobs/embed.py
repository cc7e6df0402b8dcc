"""`export` (ONNX with per-head outputs) and `embed` (images -> image and head embeddings).

embed streams: a loader (worker processes, or a thread when the model needs every core) reads,
decodes and preprocesses batches ahead of the model (etl/loader.py), the main thread runs the
model (onnxruntime by default), and a writer thread, the one writer, commits behind it, coalescing
batches into few short write transactions. Re-running skips images already embedded for the
model; a killed job loses nothing committed. Memory stays bounded by the batches in flight and
DuckDB's memory_limit, not by the dataset size.

The writes are idempotent on the tables' keys: two `embed` processes on the same model and
dataset store each image once, and each reports what it stored itself (``embedded``) and what
the other had stored first (``stored_by_another``).
"""
from __future__ import annotations

import json
import queue
import threading
import time
from functools import partial
from pathlib import Path
from typing import Callable

from etl.common import add_embed_args, add_model_args, add_warehouse_arg, load_model_from_args, progress, warehouse_path


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export the image tower to ONNX with per-head outputs",
                       description="Write the decomposition graph (embedding, head_cls, rest[, head_tokens]) to "
                                   "$ATLAS_HOME/onnx/ (or --out) and store its path and sha256 in `models`.")
    add_model_args(p)
    add_warehouse_arg(p)
    p.add_argument("--layers", default="auto", help="analysed layers: auto (default: every layer of a model with at most 12 layers, the last 4 of deeper ones), all, last4, lastN, or 0-based indices")
    p.add_argument("--tokens", action="store_true", help="also output per-token head contributions")
    p.add_argument("--out", default=None, help="ONNX file (default: $ATLAS_HOME/onnx/<model>.onnx)")
    p.set_defaults(func=run_export)

    e = sub.add_parser("embed", help="embed images: unit image embeddings and head embeddings into the warehouse",
                       description="Decompose every image of a dataset and store image_embeddings and "
                                   "head_embeddings (analysed layers), images with thumbnails, and factor "
                                   "labels. Bad files are recorded in `errors` and skipped. Resumable.")
    add_model_args(e)
    add_warehouse_arg(e)
    add_embed_args(e)
    from etl.ray_engine import add_engine_args
    add_engine_args(e)
    e.set_defaults(func=run_embed)


def model_layers(lm, layers) -> list[int]:
    from models import resolve_layers
    return resolve_layers(layers, lm.layers)


def upsert_model(path: str, lm, layers: list[int], onnx_path: str | None = None, onnx_sha: str | None = None) -> None:
    """Insert or refresh the `models` row of a loaded model (analysed layers are unioned)."""
    from warehouse import writer, writes
    with writer(path) as con:
        writes.upsert_model(con, lm.row(), layers, onnx_path, onnx_sha)


def onnx_file(lm, layers: list[int]) -> Path:
    from models.onnx import GRAPH_VERSION
    safe = lm.model_id.replace("/", "__")
    name = f"{safe}__L{'-'.join(map(str, layers))}__{lm.fingerprint()[:12]}__g{GRAPH_VERSION}.onnx"
    from warehouse import atlas_home
    return atlas_home() / "onnx" / name


def export(path: str, lm, layers: list[int], out: str | None = None, tokens: bool = False) -> Path:
    """Export once (kept while the file exists and matches the stored sha256)."""
    from models.hashing import sha256_file_cached
    from models.onnx import export_onnx
    target = Path(out) if out else onnx_file(lm, layers)
    if tokens and not out:
        target = target.with_name(target.stem + "__tokens.onnx")
    if not target.exists():
        export_onnx(lm, target, layers, tokens=tokens)
    upsert_model(path, lm, layers, str(target), sha256_file_cached(target))
    return target


def run_export(args) -> int:
    from warehouse.runs import run_record
    path = warehouse_path(args)
    lm = load_model_from_args(args)
    layers = model_layers(lm, args.layers)
    with run_record(path, "export", {"model_id": lm.model_id, "layers": layers, "tokens": args.tokens}):
        target = export(path, lm, layers, args.out, args.tokens)
    print(json.dumps({"model_id": lm.model_id, "onnx_path": str(target)}))
    return 0


# ----------------------------------------------------------------------------------- embed

# A write transaction costs about 0.1 s of fixed work (open, migrate check, commit, close), and
# DuckDB's checkpoint at each close merges the small row groups appended so far (2,048 ViT-B-32
# images, 4 layers, on 2 cores: 10.0 s of writing in commits of 64 images, 6.9 s in 256, 3.9 s in
# 1,024), so the writer coalesces model batches: it commits when FLUSH_IMAGES images or FLUSH_BYTES
# of head embeddings are pending, or FLUSH_S after the first pending one, whichever comes first. A
# reader waits at most one such commit; a killed job loses at most the pending batches.
FLUSH_IMAGES = 1024
FLUSH_BYTES = 64 << 20
FLUSH_S = 10.0


def _write_batches(path: str, run_id: str, model_id: str, dataset_id: str, jobs: list, last: bool = False) -> int:
    """Commit several (batch, errors, decomposition) jobs in one write transaction; returns the
    image embeddings newly stored. ``last``: the job's final commit, which also re-clusters the
    model's head rows (``warehouse.optimize``) in the same transaction.

    The head rows of images whose image embedding is new go in with a plain INSERT (the cheap
    path, ``writes.insert_head_embeddings(new=True)``). Should one of them be stored all the same
    (head rows left without their image embedding), the key refuses it, the transaction is rolled
    back, and the same jobs are written again with every insert skipping stored rows."""
    import duckdb
    import torch
    batch = [b for job in jobs for b in job[0]]
    errors = [e for job in jobs for e in job[1]]
    decs = [job[2] for job in jobs if job[2] is not None]
    dec = None
    if decs:
        dec = decs[0]
        dec.embedding = torch.cat([d.embedding for d in decs])
        dec.head_cls = torch.cat([d.head_cls for d in decs])
    try:
        return _write_batch(path, run_id, model_id, dataset_id, batch, errors, dec, optimistic=True, last=last)
    except duckdb.ConstraintException:
        return _write_batch(path, run_id, model_id, dataset_id, batch, errors, dec, optimistic=False, last=last)


def _write_batch(path: str, run_id: str, model_id: str, dataset_id: str, batch, errors, dec,
                 optimistic: bool = False, last: bool = False) -> int:
    """One write transaction: error rows, then images, factors, image and head embeddings, and
    with ``last`` the re-clustering. batch: list[Prepared]; dec: its Decomposition (embedding
    [n, d], head_cls [n, L', H, d]). Returns the image embeddings newly stored (images another
    process stored first are left)."""
    from warehouse import optimize, writer
    from warehouse.runs import record_error
    with writer(path) as con:
        for item_path, reason in errors:
            record_error(con, run_id, item_path, reason)
        stored = _insert_batch(con, model_id, dataset_id, batch, dec, optimistic) if batch else 0
        if last:
            optimize(con, model_id)
        return stored


def _insert_batch(con, model_id: str, dataset_id: str, batch, dec, optimistic: bool) -> int:
    """The rows of a batch of prepared images and their decomposition; the image embeddings newly stored."""
    from warehouse import writes
    items = [b.item for b in batch]
    ids = [i.image_id for i in items]
    writes.insert_images(con, dataset_id, ids, [i.path for i in items], [b.sha256 for b in batch],
                         [i.label for i in items], [i.caption for i in items], [b.size for b in batch],
                         [b.thumbnail for b in batch], [b.original for b in batch])
    writes.insert_image_factors(con, [(i.image_id, k, str(v)) for i in items for k, v in i.factors.items()])
    stored = writes.insert_image_embeddings(con, model_id, ids, dec.embedding.numpy())   # [n, d]
    new = optimistic and stored == len(set(ids))       # no image of the batch was stored before
    writes.insert_head_embeddings(con, model_id, ids, dec.layers, dec.head_cls.numpy(), new=new)  # [n, L', H, d]
    return stored


class _Writer(threading.Thread):
    """The one writer, behind the model: coalesces queued jobs into few transactions (FLUSH_*).
    ``close(last=True)`` makes the final commit the job's last one (``commit(jobs, last=True)``)."""

    LAST = "last"

    def __init__(self, commit: Callable[..., int], depth: int = 8):
        super().__init__(name="atlas-embed-writer", daemon=True)
        self.commit, self.jobs = commit, queue.Queue(maxsize=depth)
        self.stored: list[int] = []
        self.failure: list[BaseException] = []

    def run(self) -> None:
        pending: list = []
        n = size = 0
        first = 0.0
        while True:
            wait = None if not pending else max(0.0, first + FLUSH_S - time.monotonic())
            try:
                job = self.jobs.get(timeout=wait)
            except queue.Empty:
                job = False                              # FLUSH_S passed: commit what is pending
            last = job is self.LAST
            if last:
                job = None
            if job:
                if not pending:
                    first = time.monotonic()
                pending.append(job)
                n += len(job[0]) + len(job[1])
                size += job[2].head_cls.nbytes if job[2] is not None else 0
            if (pending or last) and (job is None or job is False or n >= FLUSH_IMAGES or size >= FLUSH_BYTES):
                if not self.failure:
                    try:
                        self.stored.append(self.commit(pending, last=last))
                    except BaseException as exc:
                        self.failure.append(exc)
                pending, n, size = [], 0, 0
            if job is None:
                return

    def put(self, job) -> None:
        if self.failure:
            raise self.failure[0]
        self.jobs.put(job)

    def close(self, last: bool) -> None:
        """Commit what is pending and stop; ``last``: as the job's last commit (the job completed)."""
        self.jobs.put(self.LAST if last else None)
        self.join()


def _runner(path: str, lm, layers: list[int], backend: str, providers, threads: int = 0) -> Callable:
    """The model as a function of a [b, 3, H, W] batch -> Decomposition (exported once for onnx).
    threads: onnxruntime's intra-op threads (0: one per core)."""
    if backend == "onnx":
        from models.onnx import OnnxRunner, select_providers
        # no busy-waiting intra-op threads: the loader and the writer share the cores
        runner = OnnxRunner(export(path, lm, layers), providers=select_providers(providers), spin=False,
                            threads=threads)
        if runner.layers != layers:
            raise ValueError(f"ONNX file {runner.path} analyses layers {runner.layers}, not {layers}; delete it to re-export")
        return runner
    from models import decompose
    upsert_model(path, lm, layers)
    return lambda x: decompose(lm, x, layers)


def _model_on_gpu(lm, backend: str, providers) -> bool:
    """Whether the model will run on a GPU (the onnxruntime provider chosen, or torch's device)."""
    if backend == "onnx":
        from models.onnx import select_providers
        return select_providers(providers)[0] == "CUDAExecutionProvider"
    return str(getattr(lm, "device", "cpu")).startswith("cuda")


def embed(path: str, lm, dataset_spec: str, layers: list[int], backend: str = "onnx", providers=None,
          batch_size: int = 64, run_id: str | None = None, workers: int | None = None,
          model_threads: int = 0) -> dict:
    """Embed one dataset for one model; returns counts. Skips images already embedded.
    workers: loader processes ahead of the model (None: ``etl.loader.default_workers``, by where the
    model runs; 0: the loader thread). model_threads: onnxruntime's intra-op threads (0: every core)."""
    import torch
    from etl.datasets import open_dataset
    from etl.loader import Loader, default_workers
    from models.images import BatchedPreprocess
    from warehouse import writer, writes
    from warehouse.queries import embedded_image_ids
    dataset = open_dataset(dataset_spec)
    with writer(path) as con:
        writes.upsert_dataset(con, dataset.dataset_id, dataset.name, dataset.source, dataset.n_images)
    done = embedded_image_ids(path, lm.model_id, dataset.dataset_id)
    if workers is None:
        workers = default_workers(_model_on_gpu(lm, backend, providers))
    pre = BatchedPreprocess(lm.preprocess)       # per image: the crop (uint8); per batch: normalise
    loader = Loader(dataset, done, pre.image, batch_size, keep_originals=dataset.source == "shapes",
                    workers=workers)
    # (the runner is made after the loader's workers forked: a fork copies only the calling thread)
    run = _runner(path, lm, layers, backend, providers, model_threads)
    writer_thread = _Writer(partial(_write_batches, path, run_id, lm.model_id, dataset.dataset_id))
    writer_thread.start()
    total = (dataset.n_images - len(done)) if dataset.n_images else None
    n_ok = n_err = 0
    bar = progress(None, total=total, desc=f"embed {dataset.dataset_id}", unit="img")
    completed = False
    try:
        for batch, errors in loader:
            dec = None
            if batch:
                with torch.no_grad():
                    out = run(pre.batch([b.pixels for b in batch]))        # [b, 3, H, W]
                out.embedding, out.head_cls = out.embedding.float().cpu(), out.head_cls.float().cpu()
                dec = out
            writer_thread.put((batch, errors, dec))
            n_ok += len(batch)
            n_err += len(errors)
            bar.update(len(batch) + len(errors))
        completed = True
    finally:
        loader.close()
        writer_thread.close(last=completed)   # the last commit also re-clusters the model's head rows
        bar.close()
    if writer_thread.failure:
        raise writer_thread.failure[0]
    if n_ok == 0 and not done and n_err:
        raise ValueError(f"no readable image in dataset {dataset_spec}: {n_err} file(s) failed (see the `errors` table)")
    n_stored = sum(writer_thread.stored)
    return {"dataset_id": dataset.dataset_id, "embedded": n_stored, "skipped_done": len(done), "errors": n_err,
            "stored_by_another": n_ok - n_stored, "duplicates": dataset.duplicates}


def batch_bytes(lm, batch_size: int, n_layers: int) -> int:
    """A floor on the memory one model batch takes (float32): the input [b, 3, S, S] and its uint8
    crops, per layer being computed the residual stream, q, k, v and the MLP's 4x hidden layer
    (~12 x [b, T, width]) and the attention scores and weights (2 x [b, heads, T, T]), and the head
    embeddings out [b, L', heads, d]. T = (S / patch)^2 + 1 tokens."""
    S, P = lm.image_size, lm.patch_size
    T = (S // P) ** 2 + 1
    per_image = 4 * (3 * S * S + 12 * T * lm.width + 2 * lm.heads * T * T + n_layers * lm.heads * lm.embed_dim) \
        + 3 * S * S
    return int(batch_size) * per_image


def check_batch_fits(lm, batch_size: int, n_layers: int) -> None:
    """ValueError when one batch of this model cannot fit in half the machine's memory."""
    from etl.common import machine_memory
    need, budget = batch_bytes(lm, batch_size, n_layers), machine_memory() // 2
    if need > budget:
        per = batch_bytes(lm, 1, n_layers)
        raise ValueError(f"--batch-size {batch_size:,} of {lm.model_id} needs at least {need / 2**30:,.1f} GB "
                         f"({per / 2**20:,.1f} MB an image) but this machine has {machine_memory() / 2**30:,.1f} GB; "
                         f"use --batch-size {max(1, budget // per):,} or less")


def embed_datasets(path: str, lm, datasets: list[str], layers: list[int], backend: str = "onnx",
                   providers: str | None = None, batch_size: int = 64,
                   workers: int | None = None) -> list[dict]:
    """`embed` for each dataset spec, one run record each (a run with nothing left to embed ends 'skipped')."""
    from warehouse.runs import run_record
    results = []
    for spec in datasets:
        params = {"model_id": lm.model_id, "dataset": spec, "layers": layers, "backend": backend}
        with run_record(path, "embed", params) as run_id:
            result = embed(path, lm, spec, layers, backend, providers, batch_size, run_id, workers)
            run_id.skipped = result["embedded"] == 0 and result["errors"] == 0
        results.append({"model_id": lm.model_id, **result})
        print(json.dumps(results[-1]))
    return results


def run_embed(args) -> int:
    if args.engine == "ray":            # an address that does not answer: one line now, not Ray's retries later
        from etl.ray_engine import check_ray_address, check_ray_workers
        check_ray_workers(args.workers, args.ray_address)
        check_ray_address(args.ray_address)
    path = warehouse_path(args)       # a wrong --warehouse fails before the model loads
    lm = load_model_from_args(args)
    check_batch_fits(lm, args.batch_size, len(model_layers(lm, args.layers)))
    if args.engine == "ray":            # Ray Data actors -> Parquet shards -> attach (etl/ray_engine.py)
        from etl.ray_engine import embed_datasets_ray
        embed_datasets_ray(path, lm, args, model_layers(lm, args.layers), export)
        return 0
    embed_datasets(path, lm, args.dataset, model_layers(lm, args.layers), args.backend,
                   args.providers, args.batch_size, args.loader_workers)
    return 0
