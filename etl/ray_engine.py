"""`embed --engine ray`: the embed job fanned out with Ray Data, results in Parquet shards.

The driver lists the dataset's items (etl/datasets.py; those already in a shard or recorded as
errors are skipped), turns them into a Ray dataset (``ray.data.from_items``, one block per shard
of ``--shard-size`` images) and maps it with an actor pool (``map_batches`` with
``ActorPoolStrategy``, ``--workers`` actors, ``--num-gpus-per-worker`` GPUs each). Each actor
loads the model once from its spec (``load_model(**lm.spec)``, for preprocessing) and the ONNX
graph the job exported (``OnnxRunner``, CUDA provider when its GPU is usable; or the torch
decomposition with ``--backend torch``); per block it decodes and preprocesses the images, runs
the graph in ``--batch-size`` micro-batches and writes one shard (etl/shards.py), returning the
shard's manifest entry and error records to the driver, which keeps the manifest. Then the set
is attached to the warehouse (``attach``; ``--no-attach`` leaves it to a later
``python -m etl attach``).

Without ``--ray-address`` the job starts a local Ray instance and stops it at the end. With an
address (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``) it joins that cluster and ships the
product's code to it (``py_modules``); the shard directory, ``$ATLAS_HOME/onnx`` and the image
files must then be on a filesystem that every node sees under the same path.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from etl import shards
from etl.common import (IMAGE_BYTES_MIN, fits_in_memory, machine_cores, machine_memory, non_negative_float,
                        non_negative_int, positive_int)


def add_engine_args(p) -> None:
    """The flags of `embed` that pick and configure the engine."""
    g = p.add_argument_group("engine (--engine ray: Ray Data, results in Parquet shards)")
    g.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="local (default): one process writes the warehouse batch by batch; ray: Ray Data actors "
                        "write Parquet shards under --shards-root, then the job attaches them")
    g.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="Ray cluster to join: auto, HOST:PORT or ray://HOST:PORT (default: start a local Ray "
                        "instance for the job and stop it after)")
    g.add_argument("--workers", type=positive_int, default=1, metavar="N",
                   help="actors in the pool (default 1; without --ray-address at most one per CPU core, with one "
                        "at most the cluster's CPUs)")
    g.add_argument("--num-gpus-per-worker", type=non_negative_float, default=0, metavar="G",
                   help="GPUs per actor (default 0: CPU actors); with 1, each actor runs ONNX on its own GPU")
    g.add_argument("--shard-size", type=shard_images, default=1024, metavar="N",
                   help="images per input block and per shard (default 1024)")
    g.add_argument("--shards-root", default=None, metavar="DIR",
                   help="where shard sets go, as <model>/<dataset>/ (default: $ATLAS_HOME/shards)")
    g.add_argument("--copy-below", type=non_negative_int, default=shards.DEFAULT_COPY_BELOW, metavar="ROWS",
                   help="attach: copy head_embeddings into the warehouse when the set has fewer rows than this, "
                        f"else read them in place (default {shards.DEFAULT_COPY_BELOW:,})")
    g.add_argument("--no-attach", action="store_true",
                   help="only write the shards; attach them later with `python -m etl attach --shards DIR`")


def shard_images(text: str) -> int:
    """Images per input block and shard: at least 1, as many as half the memory holds (an actor
    prepares a whole block at once)."""
    value = positive_int(text)
    fits_in_memory(value, IMAGE_BYTES_MIN, "images in one shard")
    return value


# the driver lists every image not done as a Ray row: its loader pickled, and for generated scenes
# the scene itself (pixels included); measured 13.4 KB per shapes scene, well under 2 KB per file
RAY_ROW_BYTES = {"shapes": 16 * 2**10}
RAY_ROW_BYTES_FILE = 2 * 2**10


def check_ray_workers(workers: int, address: Optional[str]) -> None:
    """A local Ray instance has one CPU per core and each actor takes one: more actors than cores
    would wait for a CPU forever. (On a cluster, ``_check_cluster_cpus`` once joined.)"""
    if address is None and workers > machine_cores():
        raise ValueError(f"--workers {workers:,} is more than this machine's {machine_cores()} CPU core(s), and each "
                         f"actor of the local Ray instance takes one (use at most {machine_cores()}, or join a "
                         f"cluster with --ray-address)")


def _check_cluster_cpus(workers: int, address: str) -> None:
    import ray
    cpus = int(ray.cluster_resources().get("CPU", 0))
    if workers > cpus:
        raise ValueError(f"--workers {workers:,} is more than the {cpus} CPU(s) of the Ray cluster at {address}, and "
                         f"each actor takes one (use at most {cpus})")


def _check_rows_fit(dataset, n_rows: int) -> None:
    each = RAY_ROW_BYTES.get(dataset.source, RAY_ROW_BYTES_FILE)
    budget = machine_memory() // 2
    if n_rows * each > budget:
        raise ValueError(f"dataset {dataset.dataset_id}: {n_rows:,} images would take the Ray driver at least "
                         f"{n_rows * each / 2**30:,.1f} GB to list ({each // 2**10} KB each) but this machine has "
                         f"{machine_memory() / 2**30:,.1f} GB; embed it in parts of at most {budget // each:,} images "
                         f"or with the local engine (--engine local streams it)")


# --------------------------------------------------------------------------- the actor

class ShardEmbedder:
    """A Ray Data actor: one model and one ONNX session per actor; one shard per input block."""

    def __init__(self, spec: dict, model_id: str, dataset_id: str, layers: list[int], onnx_path: Optional[str],
                 backend: str, providers: Optional[str], batch_size: int, directory: str,
                 keep_originals: bool = False):
        import torch

        from models import load_model
        device = "cuda" if backend == "torch" and torch.cuda.is_available() else "cpu"
        self.lm = load_model(**spec, device=device)
        self.model_id, self.dataset_id, self.layers = model_id, dataset_id, list(layers)
        self.batch_size, self.directory = int(batch_size), directory
        self.keep_originals = keep_originals          # generated images (shapes): no file to read them again from
        if backend == "onnx":
            from models.onnx import OnnxRunner, select_providers
            runner = OnnxRunner(onnx_path, providers=select_providers(providers))
            if runner.layers != self.layers:
                raise ValueError(f"ONNX file {onnx_path} analyses layers {runner.layers}, not {self.layers}")
            self.run = runner
        else:
            from models import decompose
            self.run = lambda x: decompose(self.lm, x.to(self.lm.device), self.layers)

    def __call__(self, block) -> dict:
        """block: a pyarrow.Table of rows made by ``_rows`` (one input block) -> one shard."""
        import torch
        from ray import cloudpickle

        from etl.datasets import Item, Prepared, prepare_item
        from warehouse.writes import shard_tables
        batch = {name: block.column(name).to_pylist() for name in block.column_names}
        index = np.asarray(batch["index"], dtype=np.int64)
        good, errors = [], []
        for k in np.argsort(index, kind="stable"):
            image_id, path = batch["image_id"][k], batch["path"][k]
            got = prepare_item(Item(image_id, cloudpickle.loads(batch["load"][k]), path=path),
                               self.lm.preprocess, self.keep_originals)
            if isinstance(got, Prepared):
                good.append((k, got.pixels, got.thumbnail, got.sha256, got.size, got.original))
            else:
                errors.append({"image_id": image_id, "item": got[0], "reason": got[1]})
        entry = None
        if good:
            embs, heads = [], []
            with torch.no_grad():
                for s in range(0, len(good), self.batch_size):
                    out = self.run(torch.stack([g[1] for g in good[s:s + self.batch_size]]))
                    embs.append(out.embedding.float().cpu().numpy())
                    heads.append(out.head_cls.float().cpu().numpy())
            ks = [g[0] for g in good]
            factors = [(batch["image_id"][k], f, str(v)) for k in ks for f, v in json.loads(batch["factors"][k]).items()]
            tables = shard_tables(
                self.model_id, self.dataset_id, [batch["image_id"][k] for k in ks], [batch["path"][k] for k in ks],
                [g[3] for g in good], [batch["label"][k] for k in ks], [batch["caption"][k] for k in ks],
                [g[4] for g in good], [g[2] for g in good], factors,
                self.layers, np.concatenate(embs), np.concatenate(heads), originals=[g[5] for g in good])
            entry = shards.write_shard(self.directory, int(index.min()), tables)
        return {"entry": [json.dumps(entry) if entry else ""], "errors": [json.dumps(errors)]}


# --------------------------------------------------------------------------- the driver

def _require_ray():
    # the driver's C++ side logs every failed retry to reach a cluster on stderr: errors only (read at import)
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "error")
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"--engine ray needs Ray Data ({exc}); install the pinned version: "
                         f".venv/bin/pip install ray==2.52.0 (requirements.txt)") from None
    return ray


RAY_PROBE_S = 5.0        # a --ray-address must accept a TCP connection within this
RAY_CONNECT_S = 10.0     # ... and Ray's own connect (ray.init) must finish within this
_ADDRESS = re.compile(r"(?:ray://)?(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(\d{1,5})")


def check_ray_address(address: Optional[str]) -> None:
    """Refuse a ``--ray-address`` that is malformed, or (HOST:PORT, ray://HOST:PORT) where nothing
    accepts a TCP connection within RAY_PROBE_S (DNS included): one line at once, instead of Ray's
    retries. ``auto`` and None are left to Ray (``_start_ray`` bounds its connect too)."""
    if address is None or address.strip() == "auto":
        return
    import socket

    from etl.deadline import DeadlineExceeded, call_with_deadline
    m = _ADDRESS.fullmatch(address.strip())
    if not m or not 0 < int(m.group(2)) < 65536:
        raise ValueError(f"--ray-address {address!r} is not auto, HOST:PORT or ray://HOST:PORT (port 1-65535)")
    host, port = m.group(1).strip("[]"), int(m.group(2))
    try:
        call_with_deadline(lambda: socket.create_connection((host, port), timeout=RAY_PROBE_S).close(),
                           RAY_PROBE_S, signals=False)
    except (OSError, DeadlineExceeded) as exc:
        why = exc.strerror or str(exc) if isinstance(exc, OSError) else f"no answer within {RAY_PROBE_S:g} s"
        raise ValueError(f"no Ray cluster answers at {address} ({why}); start one there (`ray start --head`) or "
                         f"leave --ray-address out to run a local Ray instance for the job") from None


def _start_ray(address: Optional[str], quiet: bool) -> bool:
    """Connect to ``address`` (within RAY_CONNECT_S) or start a local instance; True when this call
    started Ray."""
    import logging
    import warnings

    import ray
    import ray.data        # configures the "ray.data" logger, so its level is set after
    logging.getLogger("ray.data").setLevel(logging.ERROR if quiet else logging.WARNING)
    if ray.is_initialized():
        return False
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray\..*")
    kw = dict(logging_level=logging.WARNING, log_to_driver=not quiet)
    if address:
        import etl
        import models
        import warehouse
        from etl.deadline import DeadlineExceeded, call_with_deadline
        code = [str(Path(m.__file__).parent) for m in (etl, models, warehouse)]
        kw["logging_level"] = logging.ERROR          # (its warnings while joining are about this thread)
        try:        # ray.init blocks inside C++ (no signal handler runs there): a watched thread
            call_with_deadline(lambda: ray.init(address=address, runtime_env={"py_modules": code,
                                                                              "excludes": ["__pycache__"]}, **kw),
                               RAY_CONNECT_S, signals=False)
        except DeadlineExceeded:
            raise ValueError(f"the Ray cluster at {address} did not take the job within {RAY_CONNECT_S:g} s (is it a "
                             f"Ray head's GCS port, default 6379, and does this Ray ({ray.__version__}) match the "
                             f"cluster's?); or leave --ray-address out to run a local Ray instance") from None
        except ConnectionError as exc:
            raise ValueError(f"cannot join the Ray cluster at {address}: {' '.join(str(exc).split())[:300]}") from None
    else:
        ray.init(include_dashboard=False, **kw)
    return True


def _rows(dataset, done: set[str]) -> tuple[list[dict], int]:
    """Ray rows (one per image not done yet) and the number of items in the dataset."""
    from ray import cloudpickle
    rows, n = [], 0
    for i, item in enumerate(dataset.items()):
        n = i + 1
        if item.image_id in done:
            continue
        rows.append({"index": i, "image_id": item.image_id, "path": item.path, "label": item.label,
                     "caption": item.caption, "factors": json.dumps(item.factors),
                     "load": cloudpickle.dumps(item.load)})
    return rows, n


def embed_with_ray(path: str, lm, dataset_spec: str, layers: list[int], *, onnx_path: Optional[str],
                   onnx_sha256: Optional[str], backend: str = "onnx", providers: Optional[str] = None,
                   batch_size: int = 64, shards_root: Optional[str] = None, shard_size: int = 1024,
                   address: Optional[str] = None, workers: int = 1, gpus_per_worker: float = 0,
                   attach: bool = True, copy_below: int = shards.DEFAULT_COPY_BELOW,
                   run_id: Optional[str] = None) -> dict:
    """Embed one dataset into a shard set (resuming one left by an earlier run), then attach it."""
    from etl.common import progress
    from etl.datasets import open_dataset
    from warehouse import atlas_home
    if shard_size < 1 or workers < 1:
        raise ValueError("--shard-size and --workers must be at least 1")
    _require_ray()
    dataset = open_dataset(dataset_spec)
    directory = shards.shard_dir(shards_root or atlas_home() / "shards", lm.model_id, dataset.dataset_id)
    info = {"dataset_id": dataset.dataset_id, "name": dataset.name, "source": dataset.source,
            "n_images": dataset.n_images, "spec": dataset_spec}
    result = {"dataset_id": dataset.dataset_id, "engine": "ray", "shard_dir": str(directory)}
    with shards.locked(directory):
        if (directory / shards.MANIFEST).is_file():
            manifest = shards.read_manifest(directory)
            if manifest["model_id"] != lm.model_id or manifest["layers"] != list(layers) \
                    or manifest["dataset"]["dataset_id"] != dataset.dataset_id:
                raise ValueError(f"{directory} holds shards of {manifest['model_id']} layers {manifest['layers']} on "
                                 f"{manifest['dataset']['dataset_id']}, not of this job; use another --shards-root")
            manifest["model"].update(onnx_path=onnx_path, onnx_sha256=onnx_sha256)
        else:
            manifest = shards.new_manifest(lm.row(), layers, onnx_path, onnx_sha256, info, shard_size)
        manifest, done, fixed = shards.resume(directory, manifest)
        if dataset.n_images:
            _check_rows_fit(dataset, dataset.n_images - len(done))
        rows, n_items = _rows(dataset, done)
        manifest["n_items"] = n_items
        shards.write_manifest(directory, manifest)
        written = n_ok = n_err = 0
        if rows:
            import ray
            quiet = bool(os.environ.get("ATLAS_NO_PROGRESS"))
            started = _start_ray(address, quiet)
            try:
                if address:
                    _check_cluster_cpus(workers, address)
                ctx = ray.data.DataContext.get_current()
                ctx.enable_progress_bars = False
                ctx.print_on_execution_start = False
                ds = ray.data.from_items(rows, override_num_blocks=math.ceil(len(rows) / shard_size))
                out = ds.map_batches(
                    ShardEmbedder, batch_size=None, batch_format="pyarrow",
                    compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1, num_gpus=gpus_per_worker,
                    fn_constructor_kwargs=dict(spec=lm.spec, model_id=lm.model_id, dataset_id=dataset.dataset_id,
                                               layers=list(layers), onnx_path=onnx_path, backend=backend,
                                               providers=providers, batch_size=batch_size,
                                               directory=str(directory),
                                               keep_originals=dataset.source == "shapes"))
                bar = progress(None, total=len(rows), desc=f"embed (ray) {dataset.dataset_id}", unit="img")
                last = time.monotonic()
                try:
                    for summary in out.iter_rows():
                        errors = json.loads(summary["errors"])
                        manifest["errors"] += errors
                        n_err += len(errors)
                        if summary["entry"]:
                            entry = json.loads(summary["entry"])
                            manifest["shards"].append(entry)
                            written += 1
                            n_ok += entry["n_images"]
                        bar.update((entry["n_images"] if summary["entry"] else 0) + len(errors))
                        if time.monotonic() - last > 2.0:     # the manifest follows the shards
                            shards.write_manifest(directory, manifest)
                            last = time.monotonic()
                finally:
                    bar.close()
                    shards.write_manifest(directory, manifest)
            finally:
                if started:
                    ray.shutdown()
        manifest["complete"] = shards.image_rows(manifest) + len(manifest["errors"]) == n_items
        shards.write_manifest(directory, manifest)
    if n_ok == 0 and not done and n_err:
        raise ValueError(f"no readable image in dataset {dataset_spec}: {n_err} file(s) failed (see the "
                         f"`errors` list of {directory / shards.MANIFEST})")
    result.update(embedded=n_ok, skipped_done=len(done), errors=n_err, shards_written=written,
                  shards=len(manifest["shards"]), **{k: v for k, v in fixed.items() if v})
    if attach:
        a = shards.attach_set(path, directory, copy_below, run_id)
        result.update(attached=a["mode"], attach_skipped=a["skipped"])
    return result


def embed_datasets_ray(path: str, lm, args, layers: list[int], export: Callable) -> list[dict]:
    """`embed --engine ray` for each --dataset, one run record each; ``export`` is the embed job's
    ONNX export (path, lm, layers) -> file, which also stores the models row."""
    from models.hashing import sha256_file
    from warehouse import writer, writes
    from warehouse.runs import run_record
    onnx_path = onnx_sha = None
    if args.backend == "onnx":
        onnx_path = export(path, lm, layers)
        onnx_sha = sha256_file(onnx_path)
        onnx_path = str(Path(onnx_path).resolve())
    else:
        with writer(path) as con:
            writes.upsert_model(con, lm.row(), layers)
    results = []
    for spec in args.dataset:
        params = {"model_id": lm.model_id, "dataset": spec, "layers": layers, "backend": args.backend,
                  "engine": "ray"}
        with run_record(path, "embed", params) as run_id:
            result = embed_with_ray(
                path, lm, spec, layers, onnx_path=onnx_path, onnx_sha256=onnx_sha, backend=args.backend,
                providers=args.providers, batch_size=args.batch_size, shards_root=args.shards_root,
                shard_size=args.shard_size, address=args.ray_address, workers=args.workers,
                gpus_per_worker=args.num_gpus_per_worker, attach=not args.no_attach, copy_below=args.copy_below,
                run_id=run_id)
            run_id.skipped = result["embedded"] == 0 and result["errors"] == 0 and result.get("attach_skipped", True)
        results.append({"model_id": lm.model_id, **result})
        print(json.dumps(results[-1]))
    return results
