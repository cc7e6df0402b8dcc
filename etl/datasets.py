"""Image sources for the embed job: the shapes world, scikit-image's photos, a folder
(torchvision ImageFolder layout or flat), or a CSV manifest. Each yields Items lazily.

A dataset yields each image once: a manifest that lists a file twice (or as ``a.png`` and
``./a.png``, or by a relative and an absolute path), or a folder that reaches one file by two
names (a symlink), yields it under its first spelling; ``Dataset.duplicates`` counts the rest."""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from PIL import Image

from models.images import pixel_sha256

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
                  ".ico", ".jfif", ".tga", ".pcx", ".dds", ".icns", ".psd"}
SKIMAGE_PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "hubble_deep_field",
                  "immunohistochemistry", "camera", "coins", "horse", "page", "text", "moon", "clock",
                  "colorwheel", "logo", "retina", "cat", "grass", "gravel", "brick"]


@dataclass
class Item:
    image_id: str                          # '<dataset_id>/<relative path or index>'
    load: Callable[[], Image.Image]        # raises models.ImageError on a bad file
    path: Optional[str] = None
    label: Optional[str] = None
    caption: Optional[str] = None
    factors: dict = field(default_factory=dict)


@dataclass
class Dataset:
    dataset_id: str
    name: str
    source: str                            # 'shapes' | 'skimage' | 'folder' | 'csv'
    # items(shard=(k, w)): every w-th item from the k-th, in order (default: all); a parallel
    # loader's workers each take one shard without building the others' items
    items: Callable[..., Iterator[Item]]
    n_images: Optional[int] = None
    duplicates: int = 0                    # entries left out because they name a file already listed


@dataclass
class Prepared:
    """One image ready for the model and the warehouse."""
    item: Item
    pixels: Any                            # what the preprocess gave: torch.Tensor [3, H, W], or [S, S, 3] uint8 (BatchedPreprocess.image)
    thumbnail: bytes                       # JPEG, longest side 128 px
    sha256: str                            # of the decoded pixels
    size: tuple[int, int]                  # (width, height) of the original
    original: Optional[bytes]              # lossless PNG when no file can be read again (shapes), else None


def prepare_item(item: Item, preprocess: Callable, keep_original: bool) -> Prepared | tuple[str, str]:
    """Read, decode and preprocess one item; a bad file costs only itself: it comes back as
    ``(path or image_id, reason)`` for the `errors` table instead of raising."""
    from models import ImageError, thumbnail_jpeg
    from models.images import png_bytes
    try:
        img = item.load()
        return Prepared(item, preprocess(img), thumbnail_jpeg(img), pixel_sha256(img), img.size,
                        png_bytes(img) if keep_original else None)
    except ImageError as exc:
        return (item.path or item.image_id, str(exc))
    except Exception as exc:  # a damaged file (or one too big to preprocess)
        return (item.path or item.image_id, f"{type(exc).__name__}: {exc}")


def open_dataset(spec: str) -> Dataset:
    """'shapes:N:seed=S' | 'skimage' | a folder | a .csv manifest (columns: path[, label][, caption])."""
    if spec.startswith("shapes"):
        return _shapes(spec)
    if spec == "skimage":
        return _skimage()
    path = Path(spec).expanduser()
    if path.is_dir():
        return _folder(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return _csv(path)
    if path.exists():
        raise ValueError(f"dataset '{spec}' is a file but not a .csv manifest (columns: path[, label][, caption])")
    raise ValueError(f"unknown dataset '{spec}': use 'shapes:N:seed=S' (e.g. shapes:2000:seed=0), 'skimage', "
                     "an image folder (ImageFolder layout or flat), or a CSV manifest")


def _shapes(spec: str) -> Dataset:
    from etl.world import shapes
    n, seed = shapes.parse_dataset_name(spec)
    dataset_id = shapes.dataset_name(n, seed)

    def items(shard=(0, 1)):
        for i in range(shard[0], n, shard[1]):
            s = shapes.scene(i, seed)  # pixels, factors and caption in one deterministic draw
            yield Item(f"{dataset_id}/{i}", (lambda s=s: s.to_pil()), path=f"shapes:{seed}:{i}",
                       caption=s.caption, factors=dict(s.factors))
    return Dataset(dataset_id, dataset_id, "shapes", items, n)


def _skimage() -> Dataset:
    import skimage.data as data

    names = [n for n in SKIMAGE_PHOTOS if getattr(data, n, None) is not None]   # this scikit-image's photos

    def items(shard=(0, 1)):
        for name in names[shard[0]::shard[1]]:
            def load(name=name):
                from models.images import skimage_photo
                return skimage_photo(name)
            yield Item(f"skimage/{name}", load, path=f"skimage.data.{name}", label=name)
    return Dataset("skimage", "scikit-image sample photos", "skimage", items, len(names))


def _file_loader(path: Path) -> Callable[[], Image.Image]:
    def load():
        from models import load_image
        return load_image(path)
    return load


def _unique_files(paths: list[Path]) -> tuple[list[int], int]:
    """Indices of the first entry naming each file (by resolved path), and how many were left out."""
    seen: set[Path] = set()
    keep = []
    for i, p in enumerate(paths):
        try:
            key = p.resolve()
        except (OSError, RuntimeError):   # a symlink loop: keep it, loading it reports the error
            key = p.absolute()
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return keep, len(paths) - len(keep)


def _folder(root: Path) -> Dataset:
    root = root.resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    keep, duplicates = _unique_files(files)
    files = [files[i] for i in keep]
    if not files:
        raise ValueError(f"image folder {root} is empty: put images in it (flat, or one subfolder per class)")
    dataset_id = f"folder:{root}"
    classes = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})

    def items(shard=(0, 1)):
        for p in files[shard[0]::shard[1]]:
            rel = p.relative_to(root)
            label = rel.parts[0] if len(rel.parts) > 1 else None
            yield Item(f"{dataset_id}/{rel.as_posix()}", _file_loader(p), path=str(p), label=label)
    ds = Dataset(dataset_id, root.name, "folder", items, len(files), duplicates)
    ds.classes = classes  # type: ignore[attr-defined]
    return ds


def _csv(manifest: Path) -> Dataset:
    manifest = manifest.resolve()
    try:
        # utf-8-sig: a manifest saved by Excel or Notepad starts with a byte-order mark
        with open(manifest, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = [h.strip() for h in reader.fieldnames or []]
    except UnicodeDecodeError as exc:
        raise ValueError(f"CSV manifest {manifest} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                         f"save it as UTF-8") from None
    except csv.Error as exc:
        raise ValueError(f"CSV manifest {manifest} is not a readable CSV ({exc}); fix the file") from None
    if "path" not in header:
        raise ValueError(f"CSV manifest {manifest} needs a header with a 'path' column (optional: label, caption); "
                         f"its header is {', '.join(repr(h) for h in header) or 'empty'}")
    rows = [{(k or "").strip(): v for k, v in row.items()} for row in rows]
    if not rows:
        raise ValueError(f"CSV manifest {manifest} lists no image: add one row per image under its 'path' header")
    dataset_id = f"csv:{manifest}"

    def file_of(row) -> Path:
        p = Path((row["path"] or "").strip()).expanduser()
        return p if p.is_absolute() else manifest.parent / p
    keep, duplicates = _unique_files([file_of(r) for r in rows])
    rows = [rows[i] for i in keep]

    def items(shard=(0, 1)):
        for row in rows[shard[0]::shard[1]]:
            p = file_of(row)
            yield Item(f"{dataset_id}/{row['path']}", _file_loader(p), path=str(p),
                       label=row.get("label") or None, caption=row.get("caption") or None)
    return Dataset(dataset_id, manifest.stem, "csv", items, len(rows), duplicates)


sha256_image = pixel_sha256     # the one definition is models.images.pixel_sha256
