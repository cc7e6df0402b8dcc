"""Safe image loading: every format Pillow reads, converted to RGB, with clear errors for
files that are not images, truncated, decompression bombs, or too large."""
from __future__ import annotations

import io
import math
import os
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 40_000_000      # ~ 6300 x 6300; larger images are refused before decoding
FULL_DECODE_PIXELS = 16_000_000   # above this a JPEG is decoded at 1/2, 1/4 or 1/8 scale (Pillow's draft), still
                                  # >= 2000 px on its short side; other formats are refused. Peak memory per image,
                                  # decoding plus a model's preprocess, then stays under 200 MB (tests/jobs/test_hostile_images.py)
MAX_ASPECT = 50              # longest side / shortest side; a model's resize scales the short side up to its
                             # input size, so a 100000 x 1 strip would become 224 x 22,400,000 (GBs)
MAX_BYTES = 50 * 1024 * 1024
# What one image may take to decode and convert to RGB, estimated from its header before any pixel is
# decoded (``decode_bytes``): Pillow's own copy of the pixels (1, 2 or 4 bytes each by mode and bit
# depth), the RGB result, a rotated copy for an EXIF orientation, and what a decoder holds beside
# the image (libwebp decodes a whole frame into buffers of its own). With a model's preprocess the
# peak stays under 200 MB (tests/jobs/test_hostile_images.py measures it for every mode).
MAX_DECODE_BYTES = 150 * 2**20
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}   # else 4 a pixel
_DECODER_BYTES = {"WEBP": 12}      # measured: WebP files (RGB, RGBA, lossy or not) took 11-13 bytes a pixel beyond the image
_SLACK_BYTES = 1                   # the strips, the preprocess's first resize and the thumbnail: under 1 byte a pixel
_STRIP_PIXELS = 1 << 18            # conversions run strip by strip, each strip at most 256 K pixels (1 MB of
                                   # float32): one strip of a temporary at a time, whatever the image's width
_GREY_TO_L = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")   # scaled to an 8-bit L image before RGB


class ImageError(ValueError):
    """An input is not a usable image; the message says what was wrong."""


def load_image(source: Union[str, os.PathLike, bytes, io.IOBase], max_pixels: int = MAX_PIXELS,
               max_bytes: int = MAX_BYTES) -> Image.Image:
    """Open, check and convert to RGB (first frame of animations, CMYK/16-bit/palette/alpha handled)."""
    name = "upload" if isinstance(source, (bytes, io.IOBase)) else str(source)
    if isinstance(source, bytes):
        if len(source) > max_bytes:
            raise ImageError(f"{name}: file is {len(source) / 2**20:.1f} MB, over the {max_bytes / 2**20:.0f} MB limit")
        source = io.BytesIO(source)
    elif not isinstance(source, io.IOBase):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{name}: no such file")
        if path.stat().st_size > max_bytes:
            raise ImageError(f"{name}: file is {path.stat().st_size / 2**20:.1f} MB, over the {max_bytes / 2**20:.0f} MB limit")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(source)
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(f"{name}: {w} x {h} pixels is over the limit of {max_pixels:,} pixels "
                                 "(a possible decompression bomb); resize it first")
            if w * h > FULL_DECODE_PIXELS:
                if img.format != "JPEG":
                    raise ImageError(f"{name}: {w} x {h} pixels is over {FULL_DECODE_PIXELS // 10**6} MP for a "
                                     f"{img.format or 'non-JPEG'} file (JPEGs up to {max_pixels // 10**6} MP are "
                                     "decoded at reduced scale); resize it first")
                img.draft("RGB", (max(1, w * 2000 // min(w, h)), max(1, h * 2000 // min(w, h))))
            if min(w, h) < 1 or max(w, h) > MAX_ASPECT * min(w, h):
                raise ImageError(f"{name}: {w} x {h} pixels has an aspect ratio over {MAX_ASPECT}:1; a model "
                                 "would scale its short side up to the input size and use gigabytes; crop it first")
            need = decode_bytes(img)
            if need > MAX_DECODE_BYTES:
                dw, dh = img.size          # (a JPEG's reduced decoding size)
                raise ImageError(f"{name}: {dw} x {dh} pixels of mode {img.mode} ({img.format or 'unknown'} file) "
                                 f"would take {need / 2**20:.0f} MB to decode and convert, over the "
                                 f"{MAX_DECODE_BYTES / 2**20:.0f} MB limit; resize it or save it as 8-bit RGB first")
            img.seek(0)
            img.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image Pillow can read (formats: PNG, JPEG, GIF, BMP, TIFF, WebP, ...)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{name}: refused as a possible decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: the image is damaged or truncated ({exc})") from None
    return to_rgb(img)


def decode_bytes(img: Image.Image) -> int:
    """Bytes that decoding ``img`` (opened, not yet loaded) and converting it to RGB take at the
    peak, from its header alone: its pixels as Pillow keeps them (1 byte for 1-bit, L and P; 2 for
    16-bit greys; 4 for every other mode: RGB is stored as 4), the RGB result (none when it is RGB),
    a rotated copy when EXIF says to rotate, the decoder's own buffers (``_DECODER_BYTES``) and a
    byte a pixel for what works beside them (measured per mode and format: the estimate is within
    a few MB of the peak RSS, or above it)."""
    w, h = img.size
    stored = _STORED_BYTES.get(img.mode, 4)
    out = 0 if img.mode == "RGB" else 4 + (1 if img.mode in _GREY_TO_L else 0)   # RGB (+ the 8-bit grey before it)
    try:
        rotate = 4 if img.getexif().get(0x0112, 1) != 1 else 0
    except Exception:  # noqa: BLE001 - a damaged EXIF block: loading reports it
        rotate = 0
    return w * h * (stored + out + rotate + _DECODER_BYTES.get(img.format or "", 0) + _SLACK_BYTES)


def _strips(size: tuple[int, int]):
    w, h = size
    rows = max(1, _STRIP_PIXELS // max(w, 1))
    for y in range(0, h, rows):
        yield (0, y, w, min(h, y + rows))


def _grey_to_l(img: Image.Image, lo, span) -> Image.Image:
    """A 16/32-bit grey or float image -> 8-bit L as ``(x - lo) / span * 255`` in float32, one strip
    at a time (a whole-image float32 copy of a 12 MP 16-bit PNG was 190 MB)."""
    out = Image.new("L", img.size)
    for box in _strips(img.size):
        a = np.array(img.crop(box), dtype=np.float32)          # (rows, w) float32, one strip; then in place
        if lo is not None:
            np.subtract(a, lo, out=a)
        np.multiply(a, np.float32(255) / span, out=a)
        np.clip(a, 0, 255, out=a)
        out.paste(Image.fromarray(a.astype(np.uint8), "L"), box)
    return out


def _on_white(img: Image.Image) -> Image.Image:
    """An image with alpha (RGBA, LA, PA, P with a transparent colour) composited on white, one strip
    at a time (whole-image RGBA copies and bands of a 16 MP image were 240 MB)."""
    out = Image.new("RGB", img.size, (255, 255, 255))
    for box in _strips(img.size):
        tile = img.crop(box).convert("RGBA")
        out.paste(tile, box, tile.getchannel("A"))
    return out


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; 16-bit greys are scaled, alpha composited on white. Beside the
    image it takes the RGB result (and a rotated copy for an EXIF orientation), no more
    (``decode_bytes``)."""
    img = ImageOps.exif_transpose(img) if img.getexif().get(0x0112, 1) != 1 else img   # copies only to rotate
    if img.mode in _GREY_TO_L and img.mode != "F":
        hi = img.getextrema()[1] if img.size[0] * img.size[1] else 0
        img = _grey_to_l(img, None, np.float32(hi if hi > 0 else 1.0))
    elif img.mode == "F":
        lo, hi = img.getextrema() if img.size[0] * img.size[1] else (0.0, 1.0)
        lo, hi = np.float32(lo), np.float32(hi)
        img = _grey_to_l(img, lo, max(hi - lo, 1e-12))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        return _on_white(img)
    return img if img.mode == "RGB" else img.convert("RGB")


def pixel_sha256(img: Image.Image) -> str:
    """sha256 of the decoded RGB pixels (the same picture hashes the same in any file format):
    what the embed job stores in `images.sha256`, and what tells a file on disk is still that image.
    Hashed strip by strip (the digest of ``img.tobytes()`` without a whole-image copy)."""
    import hashlib
    h = hashlib.sha256()
    for box in _strips(img.size):
        h.update(img.crop(box).tobytes())
    return h.hexdigest()


def skimage_photo(name: str) -> Image.Image:
    """scikit-image's sample photo `name` (``skimage.data.<name>``) as 8-bit RGB, exactly as the
    embed job reads it (booleans to 0/255, other non-uint8 arrays min-max scaled).
    ImageError when scikit-image or the photo is not available."""
    try:
        import skimage.data as data
    except ImportError:
        raise ImageError(f"skimage.data.{name}: scikit-image is not installed") from None
    fn = getattr(data, name, None)
    if fn is None or not callable(fn):
        raise ImageError(f"skimage.data.{name}: no such photo in this scikit-image")
    try:
        a = np.asarray(fn())
    except Exception as exc:       # a photo fetched on demand (pooch) that is not in the cache offline
        raise ImageError(f"skimage.data.{name}: cannot be loaded here ({type(exc).__name__}: {exc})") from None
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        a = (255 * (a - a.min()) / max(float(a.max() - a.min()), 1e-9)).astype(np.uint8)
    return to_rgb(Image.fromarray(a))


def png_bytes(img: Image.Image) -> bytes:
    """Lossless PNG bytes of an image (what `images.original` stores for images with no file)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def thumbnail_jpeg(img: Image.Image, side: int = 128, quality: int = 85) -> bytes:
    """JPEG bytes of the image with its longest side `side` px: what ``img.copy().thumbnail((side,
    side))`` gives, without the whole-image copy (the resize reads the image and makes the small one)."""
    w, h = img.size
    t = img
    if w > side or h > side:          # Pillow's thumbnail size: the aspect kept, each side rounded to the closer
        aspect = w / h
        x, y = side, side

        def closer(number: float, key) -> int:
            return max(min(math.floor(number), math.ceil(number), key=key), 1)
        if x / y >= aspect:
            x = closer(y * aspect, key=lambda n: abs(aspect - n / y))
        else:
            y = closer(x / aspect, key=lambda n: 0 if n == 0 else abs(aspect - x / n))
        t = img.resize((x, y), Image.Resampling.BICUBIC, reducing_gap=2.0)
    buf = io.BytesIO()
    t.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def pixels_to_tensor(lm, images: np.ndarray):
    """uint8 [B, S, S, 3] at the model's own input size -> normalised float32 [B, 3, S, S].

    The mean and std come from the model's preprocess (``visual.preprocess_cfg``), so the
    result equals ``lm.preprocess`` on each image (no resize is needed at the input size).
    ``lm`` is a LoadedModel or an open_clip CLIP module.
    """
    import torch
    model = getattr(lm, "model", lm)
    cfg = model.visual.preprocess_cfg
    return _normalised(torch.from_numpy(np.ascontiguousarray(images)), cfg["mean"], cfg["std"])


def _normalised(pixels, mean, std):
    """uint8 tensor [B, S, S, 3] -> float32 [B, 3, S, S], as torchvision's to_tensor then normalize
    compute it (x / 255, then (x - mean) / std, in float32: the same bits)."""
    import torch
    x = pixels.permute(0, 3, 1, 2).to(dtype=torch.float32).div(255)
    return x.sub_(torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)) \
            .div_(torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))


def _pil_steps(transforms) -> Optional[list]:
    """The transforms of a preprocess before its tensor conversion (ToTensor, PILToTensor, open_clip's
    MaybeToTensor), or None when it has none."""
    for i, t in enumerate(transforms):
        if type(t).__name__.endswith("ToTensor"):
            return list(transforms[:i])
    return None


def model_view(lm, image: Image.Image) -> Image.Image:
    """The part of `image` the model sees, as an RGB PIL image [S, S] (S = lm.image_size).

    Applies the model's own preprocess (``lm.preprocess.transforms``) up to its tensor
    conversion: its Resize, CenterCrop and mode conversion, with their own sizes and
    interpolation; no normalisation. ``lm.preprocess(image)`` equals this image converted to a
    tensor and normalised, so maps upsampled to S x S lie exactly over what the model saw.
    """
    return model_view_box(lm, image)[0]


# size-changing steps whose geometry crop_box follows: a resize scales each axis, a centre crop cuts
# (old - new) / 2 off each side, rounded as torchvision's center_crop rounds it
_RESIZES = ("Resize", "ResizeKeepRatio")
_CENTER_CROPS = ("CenterCrop", "CenterCropOrPad")


def model_view_box(lm, image: Image.Image) -> tuple[Image.Image, Optional[tuple[float, float, float, float]]]:
    """(model_view(lm, image), box): box = (x0, y0, x1, y1), the region of ``image`` (its own pixel
    coordinates, floats; may reach past the image where a crop pads) that becomes the model's S x S input.
    Patch (r, c) of a [gh, gw] grid covers x0 + c (x1 - x0) / gw .. x0 + (c + 1) (x1 - x0) / gw, and the
    same in y (models.maps.patch_boxes). box is None when the preprocess has a size-changing step other
    than a resize or a centre crop (then only the crop can be drawn)."""
    transforms = getattr(lm.preprocess, "transforms", None)
    if transforms is None:
        raise TypeError(f"the model's preprocess is not a Compose of transforms: {lm.preprocess!r}")
    steps = _pil_steps(transforms)
    if steps is None:
        raise TypeError(f"the model's preprocess has no tensor conversion: {lm.preprocess!r}")
    view = image
    sx = sy = 1.0                 # current pixels per original pixel
    ox = oy = 0.0                 # the current image's origin in scaled original coordinates
    known = True
    for t in steps:
        before = view.size
        view = t(view)
        after = view.size
        if after == before:
            continue
        name = type(t).__name__
        if name in _RESIZES:
            fx, fy = after[0] / before[0], after[1] / before[1]
            sx, sy, ox, oy = sx * fx, sy * fy, ox * fx, oy * fy
        elif name in _CENTER_CROPS:
            ox += int(round((before[0] - after[0]) / 2.0))
            oy += int(round((before[1] - after[1]) / 2.0))
        else:
            known = False
    view = view.convert("RGB")
    size = getattr(lm, "image_size", None)
    if size is not None and view.size != (size, size):
        raise ValueError(f"the model's preprocess gives a {view.size[0]} x {view.size[1]} image, not {size} x {size}")
    if not known:
        return view, None
    w, h = view.size
    return view, (ox / sx, oy / sy, (ox + w) / sx, (oy + h) / sy)


class BatchedPreprocess:
    """A model's preprocess split at its tensor conversion, so the per-image part stays small.

    ``image(img)`` runs the PIL transforms (Resize, CenterCrop, mode conversion) and returns the
    crop as uint8 [S, S, 3]; ``batch(list of those)`` converts and normalises the whole batch at once
    -> float32 [B, 3, S, S]. ``batch([image(x) for x in imgs])`` equals ``torch.stack([preprocess(x)
    for x in imgs])`` bit for bit: the same float32 operations (x / 255, then (x - mean) / std), one
    batch at a time instead of one image at a time (toy model: 0.55 -> 0.2 ms per image; the uint8
    crop is also a quarter of the float32 tensor in the loader's queue).

    A preprocess that is not a Compose ending in a tensor conversion and a Normalize (open_clip's
    own always is) runs unsplit: ``image`` is the preprocess, ``batch`` stacks."""

    def __init__(self, preprocess):
        self.preprocess = preprocess
        transforms = list(getattr(preprocess, "transforms", None) or [])
        steps = _pil_steps(transforms)
        tail = [type(t).__name__ for t in transforms[len(steps):]] if steps is not None else []
        self.pil_steps = steps if tail in (["ToTensor", "Normalize"], ["MaybeToTensor", "Normalize"]) else None
        if self.pil_steps is not None:
            self.mean, self.std = transforms[-1].mean, transforms[-1].std

    def image(self, img: Image.Image):
        """One image -> uint8 tensor [S, S, 3] (split) or the preprocess's own output (unsplit)."""
        import torch
        if self.pil_steps is None:
            return self.preprocess(img)
        for t in self.pil_steps:
            img = t(img)
        if not isinstance(img, Image.Image) or img.mode != "RGB":
            raise TypeError(f"the preprocess's PIL steps gave {img!r}, not an RGB image")
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())

    def batch(self, pixels: list):
        """What ``image`` gave for each image of a batch -> float32 [B, 3, S, S]."""
        import torch
        x = torch.stack(pixels)
        return x if self.pil_steps is None else _normalised(x, self.mean, self.std)
