"""Hostile images (generated here): each costs only itself, with a clear message, and no image takes
the decoding + a model's preprocess past a stated memory figure (peak RSS measured in a child), in
any mode and bit depth; the estimate made from the header before decoding
(``models.images.decode_bytes``) bounds the measured peak of every image it admits."""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
PEAK_MB = 200            # the README's figure: decoding plus the model's own preprocess, per image


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny valid PNG declaring ``width`` x ``height`` 1-bit pixels, all zero (deflate compresses it)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    raw = zlib.compress(row * height, 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _striped(mode: str, size: tuple[int, int]) -> Image.Image:
    """An image of ``mode`` with a stripe every 50 rows (compresses to a few KB, decodes to its full size)."""
    img = Image.new(mode, size, 0)
    stripe = Image.new(mode, (size[0], 1), {"F": 0.5, "I": 70000, "I;16": 60000}.get(mode, 200 if mode in
                                                                                       ("L", "P", "1") else None)
                       or (200,) * len(mode))
    for y in range(0, size[1], 50):
        img.paste(stripe, (0, y))
    return img


def hostile_zoo(tmp: Path) -> dict[str, tuple[Path, str | None]]:
    """name -> (file, expected error phrase or None when it must load)."""
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8))
    frames = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(3)]
    files = {
        "strip_100000x1.png": (_png_header_only(100_000, 1), "aspect ratio"),
        "strip_2000000x1.png": (_png_header_only(2_000_000, 1), "aspect ratio"),
        "tall_1x300000.png": (_png_header_only(1, 300_000), "aspect ratio"),
        "bomb_20000x20000.png": (_png_header_only(20_000, 20_000), "decompression bomb"),
        "bomb_9000x9000.png": (_png_header_only(9_000, 9_000), "decompression bomb"),
        "truncated.jpg": (_save(photo, "JPEG")[:2000], "damaged or truncated"),
        "truncated.png": (_save(photo, "PNG")[:3000], "damaged or truncated"),
        "not_an_image.png": (b"just text pretending to be a picture " * 20, "not an image"),
        "empty.jpg": (b"", "not an image"),
        "cmyk.jpg": (_save(photo.convert("CMYK"), "JPEG"), None),
        "grey16.png": (_save(Image.fromarray((rng.integers(0, 65535, (50, 70))).astype(np.uint16)), "PNG"), None),
        "animated.gif": (_save(frames[0], "GIF", save_all=True, append_images=frames[1:]), None),
        "palette_alpha.png": (_save(photo.convert("P").convert("PA") if False else photo.convert("RGBA"), "PNG"), None),
        "wide_ok_1000x25.png": (_save(Image.new("RGB", (1000, 25), (9, 9, 9)), "PNG"), None),
        "big_ok_4000x3000.jpg": (_save(Image.new("RGB", (4000, 3000), (200, 10, 10)), "JPEG"), None),
        "big_ok_4600x3450.png": (_save(Image.new("RGB", (4600, 3450), (10, 200, 10)), "PNG"), None),
        "huge_6000x6000.jpg": (_save(Image.fromarray(rng.integers(0, 255, (6000, 6000, 3), dtype=np.uint8)),
                                     "JPEG", quality=70), None),
        "huge_6000x6000.png": (_save(Image.new("RGB", (6000, 6000), (1, 2, 3)), "PNG"), "over 16 MP"),
        # issue 21 break 8: small files whose pixels are large in other modes and bit depths
        "rgba_4000x3999_lossless.webp": (_save(Image.new("RGBA", (4000, 3999), (10, 20, 30, 128)), "WEBP",
                                               lossless=True), "to decode and convert, over the 150 MB limit"),
        "rgba_3000x3000.webp": (_save(Image.new("RGBA", (3000, 3000), (9, 9, 9, 9)), "WEBP", lossless=True),
                                "to decode and convert"),
        "rgb_2500x2500.webp": (_save(Image.new("RGB", (2500, 2500), (9, 90, 9)), "WEBP", quality=80), None),
        "rgba_4000x3999_70kb.png": (_save(_striped("RGBA", (4000, 3999)), "PNG", optimize=True), None),
        "grey16_4000x3000.png": (_save(_striped("I;16", (4000, 3000)), "PNG"), None),
        "grey16_3000x3000.tif": (_save(_striped("I;16", (3000, 3000)), "TIFF"), None),
        "float_2000x2000.tif": (_save(_striped("F", (2000, 2000)), "TIFF"), None),
        "int32_2000x2000.tif": (_save(_striped("I", (2000, 2000)), "TIFF"), None),
        "la_3000x3000.png": (_save(_striped("LA", (3000, 3000)), "PNG"), None),
        "cmyk_3000x3000.tif": (_save(_striped("CMYK", (3000, 3000)), "TIFF"), None),
        "palette_transparent_3000x3000.gif": (_save(_striped("P", (3000, 3000)), "GIF", transparency=0), None),
        "bilevel_4000x4000.png": (_save(_striped("1", (4000, 4000)), "PNG"), None),
    }
    out = {}
    for name, (data, expect) in files.items():
        p = tmp / name
        p.write_bytes(data)
        out[name] = (p, expect)
    link = tmp / "link_to_passwd.png"
    link.symlink_to("/etc/passwd")
    out[link.name] = (link, "not an image")
    return out


CHILD = r"""
import json, sys
import models
lm = models.load_model("ViT-B-32", random_init=True, seed=0)
def rss(field):
    return int([l.split()[1] for l in open("/proc/self/status") if l.startswith(field)][0]) / 1024
import ctypes, gc
trim = ctypes.CDLL("libc.so.6").malloc_trim
res = {}
for path in sys.argv[1:]:
    gc.collect()
    trim(0)                                             # freed memory back to the system: each image from the same floor
    open("/proc/self/clear_refs", "w").write("5")      # reset the peak to the current RSS
    base = rss("VmRSS:")
    try:
        from PIL import Image
        est = models.images.decode_bytes(Image.open(path)) / 2**20
    except Exception:
        est = None
    try:
        img = models.load_image(path)
        x = lm.preprocess(img)
        out = {"ok": list(x.shape)}
    except models.ImageError as exc:
        out = {"error": str(exc)}
    except Exception as exc:
        out = {"crash": f"{type(exc).__name__}: {exc}"}
    out["peak_mb"] = rss("VmHWM:") - base
    out["estimate_mb"] = est
    res[path] = out
print(json.dumps(res))
"""


def test_every_hostile_image_costs_only_itself_within_the_memory_figure(tmp_path):
    zoo = hostile_zoo(tmp_path)
    r = subprocess.run([sys.executable, "-c", CHILD, *[str(p) for p, _ in zoo.values()]], cwd=ROOT,
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(res) == len(zoo) >= 30
    for name, (path, expect) in zoo.items():
        got = res[str(path)]
        assert "crash" not in got, (name, got)
        if expect is None:
            assert got.get("ok") == [3, 224, 224], (name, got)
        else:
            assert expect in got.get("error", ""), (name, got)
            assert got["error"].count("\n") == 0 and name in got["error"]
        assert got["peak_mb"] <= PEAK_MB, (name, got["peak_mb"])
        if expect is None and got["estimate_mb"] is not None:   # the header estimate that admits a file bounds its peak
            assert got["peak_mb"] <= got["estimate_mb"] + 16, (name, got)
