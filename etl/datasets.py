"""Image sources for the embed job: the shapes world, scikit-image's photos, a folder
(torchvision ImageFolder layout or flat), or a CSV manifest. Each yields Items lazily."""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

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
    items: Callable[[], Iterator[Item]]
    n_images: Optional[int] = None


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

    def items():
        for i in range(n):
            s = shapes.scene(i, seed)  # pixels, factors and caption in one deterministic draw
            yield Item(f"{dataset_id}/{i}", (lambda s=s: s.to_pil()), path=f"shapes:{seed}:{i}",
                       caption=s.caption, factors=dict(s.factors))
    return Dataset(dataset_id, dataset_id, "shapes", items, n)


def _skimage() -> Dataset:
    import skimage.data as data

    def items():
        for name in SKIMAGE_PHOTOS:
            fn = getattr(data, name, None)
            if fn is None:
                continue
            def load(name=name):
                from models.images import skimage_photo
                return skimage_photo(name)
            yield Item(f"skimage/{name}", load, path=f"skimage.data.{name}", label=name)
    return Dataset("skimage", "scikit-image sample photos", "skimage", items, None)


def _file_loader(path: Path) -> Callable[[], Image.Image]:
    def load():
        from models import load_image
        return load_image(path)
    return load


def _folder(root: Path) -> Dataset:
    root = root.resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ValueError(f"image folder {root} is empty: put images in it (flat, or one subfolder per class)")
    dataset_id = f"folder:{root}"
    classes = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})

    def items():
        for p in files:
            rel = p.relative_to(root)
            label = rel.parts[0] if len(rel.parts) > 1 else None
            yield Item(f"{dataset_id}/{rel.as_posix()}", _file_loader(p), path=str(p), label=label)
    ds = Dataset(dataset_id, root.name, "folder", items, len(files))
    ds.classes = classes  # type: ignore[attr-defined]
    return ds


def _csv(manifest: Path) -> Dataset:
    manifest = manifest.resolve()
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "path" not in rows[0]:
        raise ValueError(f"CSV manifest {manifest} needs a header with a 'path' column (optional: label, caption)")
    dataset_id = f"csv:{manifest}"

    def items():
        for row in rows:
            p = Path(row["path"])
            p = p if p.is_absolute() else manifest.parent / p
            yield Item(f"{dataset_id}/{row['path']}", _file_loader(p), path=str(p),
                       label=row.get("label") or None, caption=row.get("caption") or None)
    return Dataset(dataset_id, manifest.stem, "csv", items, len(rows))


sha256_image = pixel_sha256     # the one definition is models.images.pixel_sha256
