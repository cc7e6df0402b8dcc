"""numpy's BLAS thread count, set for a block of work.

On a shared 2-core host, a multi-threaded OpenBLAS call waits on its slowest thread: a 600 x 600
linear solve took 0.5-0.9 s with numpy's default two threads beside other work, and 0.02-0.1 s
on one (measured while the toy zoo trained). Work made of many medium-sized calls (the probes'
ridge solves) runs single-threaded under ``numpy_blas_threads(1)``.

numpy's wheels bundle scipy-openblas, which exports its thread-count calls; where that library is
not found (another BLAS), the block runs as BLAS decides. (scipy's own OpenBLAS, a separate
library, is set by etl/text/textspan.py for its Gram products.)
"""
from __future__ import annotations

import contextlib
import functools


@functools.lru_cache(maxsize=1)
def _numpy_openblas():
    """(get, set) of numpy's bundled OpenBLAS thread count, found once per process, or None."""
    import ctypes
    import glob
    import os

    import numpy as np
    try:
        libs = sorted(glob.glob(os.path.dirname(np.__file__) + ".libs/libscipy_openblas*.so*"))
        lib = ctypes.CDLL(libs[0]) if libs else None
        get, put = lib.scipy_openblas_get_num_threads64_, lib.scipy_openblas_set_num_threads64_
    except (OSError, AttributeError):
        return None
    get.restype, put.argtypes = ctypes.c_int, [ctypes.c_int]
    return get, put


@contextlib.contextmanager
def numpy_blas_threads(n: int):
    """Run the block with numpy's BLAS on ``n`` threads (process-wide), then restore the count."""
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
