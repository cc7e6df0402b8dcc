"""The embed job's loader: image reading, decoding and preprocessing in parallel worker
processes ahead of the model, through a bounded queue.

Each worker (a torch DataLoader worker, forked, one torch thread) takes every w-th item of the
dataset (``Dataset.items(shard=(k, w))``), prepares it (``etl.datasets.prepare_item``) and hands
over whole batches: ``(list[Prepared], errors)``, where ``Prepared.pixels`` are what the given
``preprocess`` returns (the embed job's: ``models.images.BatchedPreprocess.image``, uint8 crops
[S, S, 3]) and ``errors`` are ``(path or image_id, reason)`` pairs. Batches cross the process boundary in
shared memory. With ``workers=0`` (or no ``fork``, e.g. on Windows) one thread does the same work.

Memory is bounded by the batches in flight, not by the dataset: at most ``prefetch`` batches per
worker, plus ``queue_depth`` batches waiting for the model. A worker is a child of the job: when
the job dies, its workers exit (torch's worker watchdog); when it stops early they are shut down.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import queue
import threading
from typing import Callable, Iterator, Optional

import torch.utils.data as tud

from etl.datasets import Dataset, Prepared, prepare_item

Batch = tuple[list[Prepared], list[tuple[str, str]]]


def default_workers(model_on_gpu: bool) -> int:
    """Loader processes when none are asked for. With the model on a GPU, one per spare core (at
    most 8): decoding is then the bottleneck. With the model on the CPU the loader and the model
    share the cores, and onnxruntime already runs on all of them: a loader process then preempts its
    threads, and each parallel loop waits for its slowest thread (measured on 2 cores, ViT-B-32:
    the model ran 15 % slower beside one loader process than beside the loader thread). So on CPU
    one process per 8 cores, and none (the loader thread) below 8."""
    cores = os.cpu_count() or 2
    return max(1, min(8, cores - 1)) if model_on_gpu else cores // 8


def _batches(dataset: Dataset, done: set[str], preprocess: Callable, batch_size: int, keep_originals: bool,
             shard: tuple[int, int]) -> Iterator[Batch]:
    """One shard's images, prepared and grouped into batches of ``batch_size`` good images
    (errors ride with the batch they were met in)."""
    good: list[Prepared] = []
    errors: list[tuple[str, str]] = []
    for item in dataset.items(shard=shard):
        if item.image_id in done:
            continue
        got = prepare_item(item, preprocess, keep_originals)
        if isinstance(got, Prepared):
            got.item = dataclasses.replace(got.item, load=None)    # a closure: it would not cross to the job
            good.append(got)
        else:
            errors.append(got)
        if len(good) == batch_size:
            yield good, errors
            good, errors = [], []
    if good or errors:
        yield good, errors


class _Shards(tud.IterableDataset):
    """torch IterableDataset: worker k of w yields ``_batches`` of shard (k, w). A failure outside
    one image (the dataset itself) is yielded as the exception, re-raised by the job as it is."""

    def __init__(self, *args):
        self.args = args

    def __iter__(self):
        info = tud.get_worker_info()
        shard = (info.id, info.num_workers) if info is not None else (0, 1)
        try:
            yield from _batches(*self.args, shard=shard)
        except Exception as exc:     # surfaced in the job as a one-line error, not a worker traceback
            # (only builtin types: a custom exception may not pickle across, and the batch would be lost)
            yield exc if type(exc) in (ValueError, OSError, RuntimeError) else RuntimeError(f"{type(exc).__name__}: {exc}")


def _identity(x):
    return x


def _source(dataset: Dataset, done: set[str], preprocess: Callable, batch_size: int, keep_originals: bool,
            workers: int, prefetch: int) -> Iterator:
    if workers <= 0 or "fork" not in multiprocessing.get_all_start_methods():
        return _batches(dataset, done, preprocess, batch_size, keep_originals, shard=(0, 1))
    # fork: the dataset (closures over files or a generator) needs no pickling, and a worker
    # starts in milliseconds instead of importing torch again
    loader = tud.DataLoader(_Shards(dataset, done, preprocess, batch_size, keep_originals), batch_size=None,
                            num_workers=workers, prefetch_factor=prefetch, collate_fn=_identity,
                            multiprocessing_context=multiprocessing.get_context("fork"))
    return iter(loader)


class Loader:
    """``for good, errors in Loader(...)``: prepared batches, read ahead of the consumer.

    Start it (iterate it) before creating onnxruntime sessions or writer threads: its workers fork
    from this process, and a fork copies only the calling thread.
    """

    def __init__(self, dataset: Dataset, done: set[str], preprocess: Callable, batch_size: int = 64,
                 keep_originals: bool = False, workers: Optional[int] = None, prefetch: int = 2,
                 queue_depth: int = 3):
        self.workers = default_workers(False) if workers is None else int(workers)
        self._src = _source(dataset, done, preprocess, batch_size, keep_originals, self.workers, prefetch)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="atlas-loader", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        try:
            for got in self._src:
                if self._stop.is_set():
                    break
                self._put(got)
                if isinstance(got, BaseException):
                    break
        except BaseException as exc:  # a worker that died (killed, out of memory): surfaced in the job
            self._put(RuntimeError(f"an image loader worker failed: {str(exc).splitlines()[0]}"))
        finally:
            self._shutdown()
            self._put(None)

    def _put(self, got) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(got, timeout=0.1)
                return
            except queue.Full:
                continue

    def _shutdown(self) -> None:
        stop = getattr(self._src, "_shutdown_workers", None)
        if stop is not None:
            stop()

    def __iter__(self) -> Iterator[Batch]:
        while True:
            got = self._queue.get()
            if got is None:
                return
            if isinstance(got, BaseException):
                self.close()           # its workers are gone before the failure propagates
                raise got
            yield got

    def close(self) -> None:
        """Stop reading ahead and shut the workers down (the consumer stopped early)."""
        self._stop.set()
        self._thread.join(timeout=30)
