"""numpy's BLAS thread count for a block of many small matrix products.

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
import ctypes
import functools
import glob
import os
from typing import Iterator, Optional


@functools.lru_cache(maxsize=1)
def _numpy_openblas():
    """(get, set) of numpy's bundled OpenBLAS thread count, found once per process, or None."""
    try:
        import numpy
        libs = sorted(glob.glob(os.path.join(os.path.dirname(numpy.__file__) + ".libs", "libscipy_openblas*.so*")))
        lib = ctypes.CDLL(libs[0]) if libs else None
        names = [("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
                 ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads")]
        for get_name, set_name in names:
            if lib is not None and hasattr(lib, get_name) and hasattr(lib, set_name):
                get, put = getattr(lib, get_name), getattr(lib, set_name)
                get.restype, put.argtypes = ctypes.c_int, [ctypes.c_int]
                return get, put
    except OSError:
        pass
    return None


def numpy_blas_threads_now() -> Optional[int]:
    """numpy's BLAS thread count now, or None where its OpenBLAS is not found."""
    found = _numpy_openblas()
    return None if found is None else int(found[0]())


@contextlib.contextmanager
def numpy_blas_threads(n: int) -> Iterator[None]:
    """Run the block with numpy's BLAS on ``n`` threads (process-wide while it runs), then restore."""
    found = _numpy_openblas()
    if found is None:
        yield
        return
    get, put = found
    before = int(get())
    put(int(n))
    try:
        yield
    finally:
        put(before)
