"""The BLAS thread count of numpy's and scipy's bundled OpenBLAS, set for a block of work.

On a shared 2-core host, a multi-threaded OpenBLAS call waits on its slowest thread: a 600 x 600
linear solve took 0.5-0.9 s with numpy's default two threads beside other work, and 0.02-0.1 s
on one (measured while the toy zoo trained). Work made of many medium-sized calls (the probes'
ridge solves) runs single-threaded under ``blas_threads(1)``; TextSpan's Gram products set
scipy's (``blas_threads(1, "scipy")``).

numpy's and scipy's wheels each bundle a scipy-openblas, which exports its thread-count calls (numpy's
with a 64-bit-integer suffix); where the library is not found (another BLAS), the block runs as
BLAS decides.
"""
from __future__ import annotations

import contextlib
import functools

_SYMBOLS = {"numpy": "scipy_openblas_{}_num_threads64_", "scipy": "scipy_openblas_{}_num_threads"}


@functools.lru_cache(maxsize=None)
def openblas_calls(package: str = "numpy"):
    """(get, set) of ``package``'s bundled OpenBLAS thread count ('numpy' or 'scipy'), found once per
    process, or None."""
    import ctypes
    import glob
    import importlib
    import os
    try:
        mod = importlib.import_module(package)
        libs = sorted(glob.glob(os.path.dirname(mod.__file__) + ".libs/libscipy_openblas*.so*"))
        lib = ctypes.CDLL(libs[0]) if libs else None
        get, put = (getattr(lib, _SYMBOLS[package].format(w)) for w in ("get", "set"))
    except (ImportError, OSError, AttributeError):
        return None
    get.restype, put.argtypes = ctypes.c_int, [ctypes.c_int]
    return get, put


def set_threads(n: int | None, package: str = "numpy") -> int | None:
    """Set ``package``'s OpenBLAS thread count (process-wide; None: leave it), returning the previous one,
    or None where that library is not found."""
    found = openblas_calls(package)
    if found is None:
        return None
    get, put = found
    before = int(get())
    if n is not None:
        put(int(n))
    return before


@contextlib.contextmanager
def blas_threads(n: int, package: str = "numpy"):
    """Run the block with ``package``'s BLAS on ``n`` threads, then restore the count."""
    before = set_threads(n, package)
    try:
        yield
    finally:
        if before is not None:
            set_threads(before, package)


