"""`export` (ONNX with per-head outputs) and `embed` (images -> image and head embeddings).

embed streams: a loader thread reads and preprocesses batches, the main thread runs the
model (onnxruntime by default), a writer thread commits each batch in its own short write
transaction. Re-running skips images already embedded for the model; a killed job loses
nothing committed. Memory stays bounded by the queue depth, not the dataset size.

The writes are idempotent on the tables' keys: two `embed` processes on the same model and
dataset store each image once, and each reports what it stored itself (``embedded``) and what
the other had stored first (``stored_by_another``).
"""
from __future__ import annotations

import json
import queue
import threading
from pathlib import Path

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
    from models.hashing import sha256_file
    from models.onnx import export_onnx
    target = Path(out) if out else onnx_file(lm, layers)
    if tokens and not out:
        target = target.with_name(target.stem + "__tokens.onnx")
    if not target.exists():
        export_onnx(lm, target, layers, tokens=tokens)
    upsert_model(path, lm, layers, str(target), sha256_file(target))
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

def _loader(dataset, done: set, lm, batch_size: int, out: queue.Queue, stop: threading.Event) -> None:
    """Thread: read + preprocess images into batches; bad files become error records."""
    from models import ImageError, thumbnail_jpeg
    from models.images import png_bytes
    from etl.datasets import sha256_image
    batch, errors = [], []
    try:
        for item in dataset.items():
            if stop.is_set():
                return
            if item.image_id in done:
                continue
            try:
                img = item.load()
                original = png_bytes(img) if dataset.source == "shapes" else None   # no file to read it again from
                batch.append((item, lm.preprocess(img), thumbnail_jpeg(img), sha256_image(img), img.size, original))
            except ImageError as exc:
                errors.append((item.path or item.image_id, str(exc)))
            except Exception as exc:  # a damaged file (or one too big to preprocess) costs only itself
                errors.append((item.path or item.image_id, f"{type(exc).__name__}: {exc}"))
            if len(batch) == batch_size:
                out.put((batch, errors))
                batch, errors = [], []
        out.put((batch, errors))
    except BaseException as exc:  # surfaced in the main thread
        out.put(exc)
    finally:
        out.put(None)


def _write_batches(path: str, run_id: str, model_id: str, dataset_id: str, jobs: list) -> int:
    """Commit several (batch, errors, decomposition) jobs in one write transaction; returns the
    image embeddings newly stored."""
    import torch
    batch = [b for job in jobs for b in job[0]]
    errors = [e for job in jobs for e in job[1]]
    decs = [job[2] for job in jobs if job[2] is not None]
    dec = None
    if decs:
        dec = decs[0]
        dec.embedding = torch.cat([d.embedding for d in decs])
        dec.head_cls = torch.cat([d.head_cls for d in decs])
    return _write_batch(path, run_id, model_id, dataset_id, batch, errors, dec)


def _write_batch(path: str, run_id: str, model_id: str, dataset_id: str, batch, errors, dec) -> int:
    """One write transaction: error rows, then images, factors, image and head embeddings.
    Returns the image embeddings newly stored (images another process stored first are left)."""
    from warehouse import writer, writes
    from warehouse.runs import record_error
    with writer(path) as con:
        for item_path, reason in errors:
            record_error(con, run_id, item_path, reason)
        if not batch:
            return 0
        items = [b[0] for b in batch]
        ids = [i.image_id for i in items]
        writes.insert_images(con, dataset_id, ids, [i.path for i in items], [b[3] for b in batch],
                             [i.label for i in items], [i.caption for i in items], [b[4] for b in batch],
                             [b[2] for b in batch], [b[5] for b in batch])
        writes.insert_image_factors(con, [(i.image_id, k, str(v)) for i in items for k, v in i.factors.items()])
        stored = writes.insert_image_embeddings(con, model_id, ids, dec.embedding.numpy())   # [n, d]
        writes.insert_head_embeddings(con, model_id, ids, dec.layers, dec.head_cls.numpy())  # [n, L', H, d]
        return stored


def embed(path: str, lm, dataset_spec: str, layers: list[int], backend: str = "onnx", providers=None,
          batch_size: int = 64, run_id: str | None = None) -> dict:
    """Embed one dataset for one model; returns counts. Skips images already embedded."""
    import torch
    from etl.datasets import open_dataset
    from models import decompose
    from warehouse import optimize, writer, writes
    from warehouse.queries import embedded_image_ids
    dataset = open_dataset(dataset_spec)
    with writer(path) as con:
        writes.upsert_dataset(con, dataset.dataset_id, dataset.name, dataset.source, dataset.n_images)
    done = embedded_image_ids(path, lm.model_id, dataset.dataset_id)
    if backend == "onnx":
        from models.onnx import OnnxRunner, select_providers
        runner = OnnxRunner(export(path, lm, layers), providers=select_providers(providers))
        if runner.layers != layers:
            raise ValueError(f"ONNX file {runner.path} analyses layers {runner.layers}, not {layers}; delete it to re-export")
        run = runner
    else:
        upsert_model(path, lm, layers)
        def run(x):
            return decompose(lm, x, layers)
    loaded: queue.Queue = queue.Queue(maxsize=3)
    to_write: queue.Queue = queue.Queue(maxsize=8)
    stop = threading.Event()
    failure: list = []
    stored: list[int] = []

    def write_loop():
        done_writing = False
        while not done_writing:
            jobs = [to_write.get()]
            while not to_write.empty():  # coalesce what queued up while the last commit ran
                jobs.append(to_write.get_nowait())
            if jobs[-1] is None:
                done_writing = True
                jobs.pop()
            if failure or not jobs:
                continue
            try:
                stored.append(_write_batches(path, run_id, lm.model_id, dataset.dataset_id, jobs))
            except BaseException as exc:
                failure.append(exc)

    loader = threading.Thread(target=_loader, args=(dataset, done, lm, batch_size, loaded, stop), daemon=True)
    writer_thread = threading.Thread(target=write_loop, daemon=True)
    loader.start()
    writer_thread.start()
    total = (dataset.n_images - len(done)) if dataset.n_images else None
    n_ok = n_err = 0
    bar = progress(None, total=total, desc=f"embed {dataset.dataset_id}", unit="img")
    try:
        while (got := loaded.get()) is not None:
            if isinstance(got, BaseException):
                raise got
            if failure:
                raise failure[0]
            batch, errors = got
            dec = None
            if batch:
                with torch.no_grad():
                    out = run(torch.stack([b[1] for b in batch]))
                out.embedding, out.head_cls = out.embedding.float().cpu(), out.head_cls.float().cpu()
                dec = out
            to_write.put((batch, errors, dec))
            n_ok += len(batch)
            n_err += len(errors)
            bar.update(len(batch) + len(errors))
    finally:
        stop.set()
        to_write.put(None)
        writer_thread.join()
        bar.close()
    if failure:
        raise failure[0]
    if n_ok == 0 and not done and n_err:
        raise ValueError(f"no readable image in dataset {dataset_spec}: {n_err} file(s) failed (see the `errors` table)")
    with writer(path) as con:
        optimize(con, lm.model_id)
    n_stored = sum(stored)
    return {"dataset_id": dataset.dataset_id, "embedded": n_stored, "skipped_done": len(done), "errors": n_err,
            "stored_by_another": n_ok - n_stored, "duplicates": dataset.duplicates}


def embed_datasets(path: str, lm, datasets: list[str], layers: list[int], backend: str = "onnx",
                   providers: str | None = None, batch_size: int = 64) -> list[dict]:
    """`embed` for each dataset spec, one run record each (a run with nothing left to embed ends 'skipped')."""
    from warehouse.runs import run_record
    results = []
    for spec in datasets:
        params = {"model_id": lm.model_id, "dataset": spec, "layers": layers, "backend": backend}
        with run_record(path, "embed", params) as run_id:
            result = embed(path, lm, spec, layers, backend, providers, batch_size, run_id)
            run_id.skipped = result["embedded"] == 0 and result["errors"] == 0
        results.append({"model_id": lm.model_id, **result})
        print(json.dumps(results[-1]))
    return results


def run_embed(args) -> int:
    path = warehouse_path(args)       # a wrong --warehouse fails before the model loads
    lm = load_model_from_args(args)
    if args.engine == "ray":            # Ray Data actors -> Parquet shards -> attach (etl/ray_engine.py)
        from etl.ray_engine import embed_datasets_ray
        embed_datasets_ray(path, lm, args, model_layers(lm, args.layers), export)
        return 0
    embed_datasets(path, lm, args.dataset, model_layers(lm, args.layers), args.backend,
                   args.providers, args.batch_size)
    return 0
