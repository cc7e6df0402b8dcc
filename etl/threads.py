"""Thread counts for numerical work on small matrices: numpy's BLAS and torch's intra-op pool.

Both pools default to one thread per core. For small matrices (the toy models' width-64 to -192
towers, the probes' 129 x 129 ridge systems, the ablation's [n, d] @ [d, V] scores) the threads
mostly wait on each other, and on a shared host they wait for a thread the scheduler has preempted.
Measured on the 2-core host under load (load average 15): the ablation's accuracy table for the
large toy took 49.9 s (6.3 CPU-s) on two torch threads and 2.9 s (0.34 CPU-s) on one; its
decomposition of 512 scenes 75-82 s (9.6-9.9 CPU-s) against 22-26 s (2.6-3.2 CPU-s). Since two
threads burn 3x the CPU for the same work, one thread is also the faster choice on an idle 2-core
host. ``torch_threads`` and ``numpy_blas_threads`` set a count for a block and restore it;
``for_model`` chooses one thread for a small model (image tower width < SMALL_WIDTH) and leaves
larger ones (ViT-B and up, whose GEMMs do use the cores) as they are.

numpy's BLAS:

numpy ships its own OpenBLAS (``numpy.libs/libscipy_openblas64_*``), which by default runs every call
on one thread per core. For batches of small matrices (the probes' 129 x 129 ridge systems, one per
head) the threads only wait on each other: on a 2-core host, the probes of 48 heads x 2 factors took
20.7 CPU-s on two threads against 5.6 CPU-s on one, with the same accuracies, and on a loaded host
the waiting threads multiply the wall time (81 s against 19 s). ``numpy_blas_threads(1)`` runs a
block on one thread and restores the count after. Builds of numpy without that library (MKL,
Accelerate) are left as they are.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from etl.blas import blas_threads, set_threads


def numpy_blas_threads_now() -> Optional[int]:
    """numpy's BLAS thread count now, or None where its OpenBLAS is not found (etl/blas.py)."""
    return set_threads(None, "numpy")


def numpy_blas_threads(n: int):
    """Run a block with numpy's BLAS on ``n`` threads (process-wide while it runs), then restore (etl/blas.py)."""
    return blas_threads(n, "numpy")


SMALL_WIDTH = 512       # image-tower widths below this run their numerical work on one thread


@contextlib.contextmanager
def torch_threads(n: Optional[int]) -> Iterator[None]:
    """Run the block with torch's intra-op pool at ``n`` threads (None: unchanged), then restore."""
    if n is None:
        yield
        return
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def threads_for(width: int) -> Optional[int]:
    """1 for a model whose image tower is narrower than SMALL_WIDTH, None (every core) otherwise."""
    return 1 if int(width) < SMALL_WIDTH else None


@contextlib.contextmanager
def for_model(width: int) -> Iterator[None]:
    """torch and numpy's BLAS on one thread for a small model's block (``threads_for``); unchanged for others."""
    n = threads_for(width)
    if n is None:
        yield
        return
    with torch_threads(n), numpy_blas_threads(n):
        yield

