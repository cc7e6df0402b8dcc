"""Safe image loading: every format Pillow reads, converted to RGB, with clear errors for
files that are not images, truncated, decompression bombs, or too large."""
from __future__ import annotations

import io
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


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; 16-bit greys are scaled, alpha composited on white."""
    img = ImageOps.exif_transpose(img) if img.getexif().get(0x0112, 1) != 1 else img   # copies only to rotate
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float32)
        hi = a.max() if a.size and a.max() > 0 else 1.0
        img = Image.fromarray((a / hi * 255).clip(0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        a = np.asarray(img, dtype=np.float32)
        lo, hi = (a.min(), a.max()) if a.size else (0.0, 1.0)
        img = Image.fromarray(((a - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        bg = Image.new("RGB", img.size, (255, 255, 255))
        bg.paste(img.convert("RGBA"), mask=img.convert("RGBA").split()[-1])
        return bg
    return img if img.mode == "RGB" else img.convert("RGB")


def pixel_sha256(img: Image.Image) -> str:
    """sha256 of the decoded RGB pixels (the same picture hashes the same in any file format):
    what the embed job stores in `images.sha256`, and what tells a file on disk is still that image."""
    from models.hashing import sha256_bytes
    return sha256_bytes(img.tobytes())


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
    """JPEG bytes of the image with its longest side `side` px."""
    t = img.copy()
    t.thumbnail((side, side))
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
