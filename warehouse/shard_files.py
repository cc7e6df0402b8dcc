"""Reading head embeddings straight out of in-place Parquet shard files (``etl.shards``), for the two
reads that touch every image of a head: the per-head neighbour query and TextSpan's stream
(``warehouse.queries.neighbours_per_head``, ``head_vector_batches``).

DuckDB (and pyarrow) rebuild a ``FLOAT[]`` column from its repetition and definition levels, one
level pair per float: about 0.2 s per 65,536-row row group of d = 512, most of a per-head query.
A shard's ``vec`` column is a list of exactly d floats per row, no nulls, PLAIN-encoded (and, as
``etl.shards`` writes it now, uncompressed), so its data pages are: the levels (a short unit,
``[0, 1 x (d-1)]`` per row, repeated; one run of "present") and then the floats themselves. This
module reads a row group's pages, checks that the levels say exactly that (byte for byte, so any
other shape is never misread) and takes the floats as they lie: one copy, ~10x faster. Anything
else (nulls, ragged lists, dictionary pages, data page v2, another encoding) goes through pyarrow,
and rows that are not a clean [rows, d] float32 matrix raise :class:`Irregular` so the caller
answers with its SQL instead.

Row groups are chosen by their statistics: a shard file holds one row group per (layer, head)
(``etl.shards._write_parquet``), so a head reads 1/H of a file. Shapes at the boundaries:
``read_vectors`` -> float32 [rows, d]; ``head_groups`` -> [(file, row group, needs row filter)].
No SQL here (warehouse.queries keeps the statements).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

__all__ = ["Irregular", "HeadGroup", "head_groups", "read_vectors", "read_rows", "map_groups", "owner", "threads"]

# (file, row group index, rows must be filtered by model/layer/head, max |element| of vec by the
# statistics or None)
HeadGroup = tuple[str, int, bool, Optional[float]]


class Irregular(ValueError):
    """A row group whose vectors are not one non-null list of d floats per row (or a file that cannot
    be read here): the caller answers through DuckDB instead."""


def threads() -> int:
    """Worker threads for reading row groups: the CPUs, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


# --------------------------------------------------------------------------- which row groups

def _stat_range(rg, j: int):
    st = rg.column(j).statistics
    if st is None or not st.has_min_max:
        return None
    return st.min, st.max


def head_groups(files: Sequence[str], model_id: str, layer: int, head: int) -> list[HeadGroup]:
    """The row groups of ``files`` that may hold rows of (model_id, layer, head), by their min/max
    statistics; the flag says whether some of the group's rows may be of another model or head (then
    ``read_rows`` filters). Raises :class:`Irregular` when a file cannot be opened."""
    import pyarrow.parquet as pq
    out: list[HeadGroup] = []
    want = {"model_id": model_id, "layer": int(layer), "head": int(head)}
    import math
    for f in files:
        try:
            md = pq.ParquetFile(f).metadata
        except (OSError, ValueError) as exc:
            raise Irregular(f"cannot read {f}: {exc}") from None
        cols = {md.schema.column(j).path: j for j in range(md.num_columns)}
        if not set(want) <= set(cols):
            raise Irregular(f"{f} lacks a column of {sorted(want)}")
        vec_leaf = next((j for p, j in cols.items() if p.split(".")[0] == "vec"), None)
        for i in range(md.num_row_groups):
            rg = md.row_group(i)
            if rg.num_rows == 0:
                continue
            exact, skip = True, False
            for name, value in want.items():
                r = _stat_range(rg, cols[name])
                if r is None:
                    exact = False
                    continue
                lo, hi = r
                if isinstance(lo, bytes):
                    lo, hi = lo.decode(), hi.decode()
                if not lo <= value <= hi:
                    skip = True
                    break
                if lo != hi:
                    exact = False
            if not skip:
                r = _stat_range(rg, vec_leaf) if vec_leaf is not None else None
                vmax = None
                if r is not None and isinstance(r[0], float) and not (math.isnan(r[0]) or math.isnan(r[1])):
                    vmax = max(abs(r[0]), abs(r[1]))
                out.append((str(f), i, not exact, vmax))
    return out


# --------------------------------------------------------------------------- Thrift (compact) page headers

def _varint(buf, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _value(buf, pos: int, t: int):
    """One compact-protocol value of type t at pos -> (value, new pos); containers are skipped (None)."""
    if t in (1, 2):
        return t == 1, pos
    if t == 3:
        return buf[pos], pos + 1
    if t in (4, 5, 6):
        n, pos = _varint(buf, pos)
        return (n >> 1) ^ -(n & 1), pos
    if t == 7:
        return None, pos + 8
    if t == 8:
        n, pos = _varint(buf, pos)
        return None, pos + n
    if t in (9, 10):
        h = buf[pos]
        pos += 1
        size, et = h >> 4, h & 0x0F
        if size == 15:
            size, pos = _varint(buf, pos)
        for _ in range(size):
            _, pos = _value(buf, pos, et) if et not in (1, 2) else (None, pos + 1)
        return None, pos
    if t == 11:
        size, pos = _varint(buf, pos)
        if size:
            kv = buf[pos]
            pos += 1
            for _ in range(size):
                _, pos = _value(buf, pos, kv >> 4)
                _, pos = _value(buf, pos, kv & 0x0F)
        return None, pos
    if t == 12:
        return _struct(buf, pos)
    raise Irregular(f"unknown Thrift type {t} in a page header")


def _struct(buf, pos: int) -> tuple[dict, int]:
    fields: dict = {}
    fid = 0
    while True:
        h = buf[pos]
        pos += 1
        if h == 0:
            return fields, pos
        t, delta = h & 0x0F, h >> 4
        if delta:
            fid += delta
        else:
            n, pos = _varint(buf, pos)
            fid = (n >> 1) ^ -(n & 1)
        fields[fid], pos = _value(buf, pos, t)


# --------------------------------------------------------------------------- one row group's vectors

_DATA_PAGE, _PLAIN, _RLE, _UNCOMPRESSED = 0, 0, 3, "UNCOMPRESSED"
_HEADER_READ = 1 << 14


def _rle_runs(buf: bytes, bit_width: int) -> Iterator[tuple[bool, int, object]]:
    """The runs of an RLE / bit-packed hybrid stream: (is_rle, count, value or the packed bytes)."""
    pos, nbytes = 0, (bit_width + 7) // 8
    while pos < len(buf):
        h, pos = _varint(buf, pos)
        if h & 1:
            groups = h >> 1
            yield False, groups * 8, buf[pos:pos + groups * bit_width]
            pos += groups * bit_width
        else:
            yield True, h >> 1, int.from_bytes(buf[pos:pos + nbytes], "little")
            pos += nbytes


def _row_unit(levels: bytes, d: int) -> Optional[bytes]:
    """The bytes encoding one row's repetition levels [0, 1, ..., 1] (d levels, bit width 1) at the
    start of ``levels``, ending on a run boundary; None when the stream does not start that way."""
    pos, got = 0, []
    while len(got) < d and pos < len(levels):
        h, pos = _varint(levels, pos)
        if h & 1:
            groups = h >> 1
            got += np.unpackbits(np.frombuffer(levels[pos:pos + groups], np.uint8), bitorder="little").tolist()
            pos += groups
        else:
            got += [levels[pos] & 1] * (h >> 1)
            pos += 1
    if got != [0] + [1] * (d - 1):
        return None
    return levels[:pos]


def _fast_vectors(f, meta, rg: int, j: int, max_def: int, max_rep: int, out: Optional[np.ndarray] = None
                  ) -> Optional[np.ndarray]:
    """float32 [rows, d] of leaf column j of row group rg, read page by page; None when a page is not
    PLAIN v1 data with every list present, non-null and of one length d (pyarrow then reads it)."""
    import pyarrow as pa
    col = meta.row_group(rg).column(j)
    rows = meta.row_group(rg).num_rows
    if col.physical_type != "FLOAT" or max_rep != 1 or col.has_dictionary_page or col.num_values % rows:
        return None
    d = col.num_values // rows
    codec = col.compression
    if out is None or out.dtype != np.float32 or not out.flags.c_contiguous or out.size < rows * d:
        out = np.empty(rows * d, np.float32)
    out = out.reshape(-1)[:rows * d]
    raw = out.view(np.uint8)
    pos, end = col.data_page_offset, col.data_page_offset + col.total_compressed_size
    filled = 0
    unit: Optional[bytes] = None
    def_bw = max(1, int(max_def).bit_length())
    fd = f.fileno()
    while pos < end:
        head = os.pread(fd, min(_HEADER_READ, end - pos), pos)
        hdr, hlen = _struct(head, 0)
        ptype, usize, csize = hdr.get(1), hdr.get(2), hdr.get(3)
        dp = hdr.get(5)
        if ptype != _DATA_PAGE or not isinstance(dp, dict) or dp.get(2) != _PLAIN or dp.get(4) != _RLE \
                or (max_def and dp.get(3) != _RLE):
            return None
        nvals = dp.get(1)
        if nvals is None or nvals % d or filled + nvals > rows * d:
            return None
        body_at = pos + hlen
        if codec == _UNCOMPRESSED:
            lv = os.pread(fd, min(usize, (nvals // d) * 16 + 64 + 16), body_at)   # the levels: a few bytes a row
            page = None
        else:
            page = pa.decompress(os.pread(fd, csize, body_at), decompressed_size=usize, codec=codec.lower(),
                                 asbytes=True)
            lv = page
        # repetition levels, then definition levels, each a 4-byte length and an RLE/bit-packed stream
        o = 0
        n_rep = int.from_bytes(lv[o:o + 4], "little")
        rep = lv[o + 4:o + 4 + n_rep]
        o += 4 + n_rep
        if unit is None:
            unit = _row_unit(rep, d)
            if unit is None:
                return None
        if len(rep) != n_rep or rep != unit * (nvals // d):
            return None
        if max_def:
            n_def = int.from_bytes(lv[o:o + 4], "little")
            deflv = lv[o + 4:o + 4 + n_def]
            o += 4 + n_def
            if len(deflv) != n_def:
                return None
            total = 0
            for is_rle, count, value in _rle_runs(deflv, def_bw):
                if not is_rle or value != max_def:
                    return None
                total += count
            if total != nvals:
                return None
        nbytes = nvals * 4
        if o + nbytes != usize:
            return None
        dst = memoryview(raw)[filled * 4:filled * 4 + nbytes]
        if page is None:
            if os.preadv(fd, [dst], body_at + o) != nbytes:
                return None
        else:
            dst[:] = page[o:o + nbytes]
        filled += nvals
        pos = body_at + csize
    if filled != rows * d:
        return None
    return out.reshape(rows, d)


def _arrow_vectors(pf, rg: int, column: str) -> np.ndarray:
    """float32 [rows, d] through pyarrow; Irregular unless every row is a non-null list of one length."""
    import pyarrow as pa
    arr = pf.read_row_group(rg, columns=[column], use_threads=False).column(0).combine_chunks()
    if not pa.types.is_list(arr.type) and not pa.types.is_large_list(arr.type):
        raise Irregular(f"column {column} is {arr.type}, not a list of floats")
    rows = len(arr)
    if arr.null_count or (rows and arr.values.null_count):
        raise Irregular("null vectors or null elements")
    offsets = np.asarray(arr.offsets)
    lengths = np.diff(offsets)
    if rows and (lengths != lengths[0]).any():
        raise Irregular("vectors of different lengths")
    d = int(lengths[0]) if rows else 0
    flat = arr.values.slice(int(offsets[0]) if rows else 0, rows * d).to_numpy(zero_copy_only=False)
    return flat.astype(np.float32, copy=False).reshape(rows, d)


def read_vectors(file: str, rg: int, column: str = "vec", out: Optional[np.ndarray] = None) -> np.ndarray:
    """float32 [rows, d]: the ``column`` (a list of d floats per row) of row group ``rg``, rows in file
    order. :class:`Irregular` when the rows are not such lists (or the file cannot be read). ``out``: a
    float32 buffer to fill when it is large enough (the result may be a view of it), which spares
    the page faults of a fresh 128 MB array per row group."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        with open(file, "rb") as f:
            pf = pq.ParquetFile(f)
            meta = pf.metadata
            leaves = [j for j in range(meta.num_columns) if meta.schema.column(j).path.split(".")[0] == column]
            if len(leaves) != 1:
                raise Irregular(f"{file} has no single leaf column for {column}")
            leaf = meta.schema.column(leaves[0])
            fast = _fast_vectors(f, meta, rg, leaves[0], leaf.max_definition_level, leaf.max_repetition_level, out)
            return fast if fast is not None else _arrow_vectors(pf, rg, column)
    except (OSError, pa.ArrowException, IndexError, KeyError, TypeError) as exc:
        raise Irregular(f"cannot read {column} of {file} row group {rg}: {exc}") from None


def read_rows(group: HeadGroup, model_id: str, layer: int, head: int, columns: Sequence[str] = ("image_id",),
              out: Optional[np.ndarray] = None) -> tuple[np.ndarray, dict]:
    """One row group's rows of (model_id, layer, head): (vectors float32 [m, d], {column: Arrow array [m]})."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    file, rg, needs_filter = group[:3]
    X = read_vectors(file, rg, out=out)
    names = list(columns) + (["model_id", "layer", "head"] if needs_filter else [])
    if not names:
        return X, {}
    try:
        tab = pq.ParquetFile(file).read_row_group(rg, columns=list(dict.fromkeys(names)), use_threads=False)
    except OSError as exc:
        raise Irregular(f"cannot read {file}: {exc}") from None
    if tab.num_rows != len(X):
        raise Irregular(f"{file} row group {rg}: {tab.num_rows} rows but {len(X)} vectors")
    if needs_filter:
        keep = pc.and_(pc.and_(pc.equal(tab.column("model_id"), model_id), pc.equal(tab.column("layer"), int(layer))),
                       pc.equal(tab.column("head"), int(head)))
        keep = pc.fill_null(keep, False)
        X, tab = X[keep.to_numpy(zero_copy_only=False)], tab.filter(keep)
    return X, {c: tab.column(c).combine_chunks() for c in columns}


def owner(a: np.ndarray) -> Optional[np.ndarray]:
    """The writable, contiguous numpy array that owns ``a``'s memory (to fill again as ``out``), or None
    (memory of Arrow's, or not one block)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a if a.base is None and a.flags.writeable and a.flags.c_contiguous else None


def map_groups(fn: Callable[[HeadGroup], object], groups: Sequence[HeadGroup], workers: Optional[int] = None
               ) -> Iterator[object]:
    """fn over the row groups on a few threads (reads and numpy release the GIL), results in order;
    at most two groups per worker are in flight, so memory holds a few row groups whatever their number."""
    workers = workers or threads()
    if workers == 1 or len(groups) <= 1:
        for g in groups:
            yield fn(g)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = []
        it = iter(groups)
        for g in it:
            pending.append(pool.submit(fn, g))
            if len(pending) >= 2 * workers:
                break
        while pending:
            fut = pending.pop(0)
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(fn, nxt))
            yield fut.result()
