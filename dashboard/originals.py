"""The pixels a warehouse image was embedded from, found again without the ETL side (issue 10).

A live map of a warehouse image decomposes exactly its stored embedding (MATH.md §6.2) only when
it runs on the same pixels the embed job saw. `resolve(record)` finds them, in this order:

1. `images.original`: lossless PNG bytes the embed job stores for images with no file on disk
   (the generated shapes scenes; migration 006);
2. `images.path` like `skimage.data.astronaut`: scikit-image's photo of that name;
3. `images.path` a file on this machine (folder and CSV datasets);

each accepted only when the sha256 of its decoded RGB pixels equals `images.sha256`
(models.images.pixel_sha256, what the embed job stored). When none is found the stored JPEG
thumbnail is used, `faithful` is False and `note` says why: its map is an approximation.
No Streamlit here: pages call it through widgets.image_input, tests call it directly.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from PIL import Image

from models.images import ImageError, load_image, pixel_sha256, skimage_photo

SKIMAGE_PREFIX = "skimage.data."


@dataclass
class Resolved:
    image: Image.Image        # RGB
    source: str               # 'stored original' | 'scikit-image' | 'file' | 'thumbnail'
    faithful: bool            # True: the pixels hash to images.sha256 (the embedded image itself)
    note: str                 # one sentence for the page: where the pixels came from


def _candidates(rec: dict):
    """(source, loader) pairs to try, cheapest first."""
    original = rec.get("original")
    if original is not None and len(bytes(original)):
        yield "stored original", lambda: load_image(bytes(original))
    path = rec.get("path") or ""
    if path.startswith(SKIMAGE_PREFIX):
        yield "scikit-image", lambda: skimage_photo(path[len(SKIMAGE_PREFIX):])
    elif path and os.path.isfile(path):
        yield "file", lambda: load_image(path)


def resolve(rec: dict) -> Resolved:
    """The embedded pixels of an `images` row (warehouse.queries.image_record), else its thumbnail.

    ImageError when neither an original nor a thumbnail can be read."""
    want = rec.get("sha256")
    why: list[str] = []
    for source, load in _candidates(rec):
        try:
            img = load()
        except ImageError as exc:
            why.append(f"{source}: {exc}")
            continue
        if want and pixel_sha256(img) == want:
            where = rec.get("path") if source != "stored original" else "the warehouse's lossless copy"
            return Resolved(img, source, True, f"original pixels ({source}: {where}), checked against the stored sha256")
        why.append(f"{source}: its pixels differ from the embedded image (sha256 mismatch)")
    if not why:
        path = rec.get("path")
        why.append(f"no original file on this machine{f' ({path})' if path else ''} and none stored in the warehouse")
    thumb = rec.get("thumbnail")
    if thumb is None:
        raise ImageError(f"{rec.get('image_id')}: the original is gone ({'; '.join(why)}) and no thumbnail is stored")
    return Resolved(load_image(bytes(thumb)), "thumbnail", False,
                    "the stored JPEG thumbnail, because the original is gone (" + "; ".join(why) + "): "
                    "the map approximates, it does not decompose the stored embedding exactly")

