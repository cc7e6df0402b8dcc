"""Image sources for the embed job: the shapes world, scikit-image's photos, a folder
(torchvision ImageFolder layout or flat), or a CSV manifest. Each yields Items lazily.

A dataset yields each image once: a manifest that lists a file twice (or as ``a.png`` and
``./a.png``, or by a relative and an absolute path), or a folder that reaches one file by two
names (a symlink), yields it under its first spelling; ``Dataset.duplicates`` counts the rest."""
from __future__ import annotations

import csv
import os
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


def printable_path(p: str | os.PathLike) -> str:
    """A path as valid UTF-8 text: bytes that are not UTF-8 (a name Python decoded with surrogate
    escapes) are written as ``\\xNN``, so the name can be stored and shown."""
    return os.fsencode(p).decode("utf-8", "backslashreplace")


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _require_utf8(path: Path, what: str) -> None:
    if not _is_utf8(str(path)):
        raise ValueError(f"{what} {printable_path(path)} has a path that is not valid UTF-8; rename it (its images "
                         f"are stored under that path)")


def _unnamable(dataset_id: str, path: Path, rel: str) -> Item:
    """An item for a file whose name is not valid UTF-8: loading it is an ImageError, so it becomes one
    `errors` row under its printable name, and the rest of the folder is embedded."""
    shown = printable_path(path)

    def load():
        from models import ImageError
        raise ImageError(f"{shown}: the file name is not valid UTF-8, so it cannot be stored; rename it "
                         f"(e.g. with `convmv -f latin1 -t utf8`) and run the job again")
    return Item(f"{dataset_id}/{printable_path(rel)}", load, path=shown)


def _folder(root: Path) -> Dataset:
    root = root.resolve()
    _require_utf8(root, "image folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    keep, duplicates = _unique_files(files)
    files = [files[i] for i in keep]
    if not files:
        raise ValueError(f"image folder {root} is empty: put images in it (flat, or one subfolder per class)")
    dataset_id = f"folder:{root}"
    classes = sorted({printable_path(p.relative_to(root).parts[0]) for p in files if len(p.relative_to(root).parts) > 1})

    def items(shard=(0, 1)):
        for p in files[shard[0]::shard[1]]:
            rel = p.relative_to(root)
            if not _is_utf8(rel.as_posix()):
                yield _unnamable(dataset_id, p, rel.as_posix())
                continue
            label = rel.parts[0] if len(rel.parts) > 1 else None
            yield Item(f"{dataset_id}/{rel.as_posix()}", _file_loader(p), path=str(p), label=label)
    ds = Dataset(dataset_id, root.name, "folder", items, len(files), duplicates)
    ds.classes = classes  # type: ignore[attr-defined]
    return ds


def _csv_rows(manifest: Path, columns: dict[str, int]) -> Iterator[tuple[str, Optional[str], Optional[str]]]:
    """(path, label, caption) of each row of a manifest, read as a stream (``columns``: the header's
    index of each; a missing cell is ''); a ValueError that names the line when the file is not
    UTF-8 or not CSV."""
    ip, il, ic = columns["path"], columns.get("label"), columns.get("caption")
    line = 1
    try:
        # utf-8-sig: a manifest saved by Excel or Notepad starts with a byte-order mark
        with open(manifest, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            next(reader, None)                                         # the header
            for row in reader:
                line = reader.line_num
                if not row:                                            # a blank line (DictReader skipped them too)
                    continue
                n = len(row)
                yield (row[ip] if ip < n else "", row[il] if il is not None and il < n else None,
                       row[ic] if ic is not None and ic < n else None)
    except UnicodeDecodeError as exc:
        raise ValueError(f"CSV manifest {manifest} is not UTF-8 text ({exc.reason} after line {line}); "
                         f"save it as UTF-8") from None
    except csv.Error as exc:
        raise ValueError(f"CSV manifest {manifest} is not a readable CSV after line {line} ({exc}); fix the file") \
            from None


def _csv_header(manifest: Path) -> list[str]:
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as f:
            return [h.strip() for h in next(csv.reader(f), [])]
    except UnicodeDecodeError as exc:
        raise ValueError(f"CSV manifest {manifest} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                         f"save it as UTF-8") from None
    except csv.Error as exc:
        raise ValueError(f"CSV manifest {manifest} is not a readable CSV ({exc}); fix the file") from None


def _listed_file(folder: str, listed: str) -> str:
    """``str(Path(folder) / Path(listed.strip()).expanduser())`` (an absolute path as it is), without
    pathlib's cost (a third of the time to open a 2,000,000-row manifest): '' and '.' parts dropped,
    repeated slashes folded, '..' kept."""
    p = os.path.expanduser(listed.strip())
    full = p if p.startswith("/") else f"{folder}/{p}"
    if full.startswith("//") and not full.startswith("///"):       # POSIX keeps exactly two leading slashes
        return str(Path(full))
    return "/" + "/".join(c for c in full.split("/") if c and c != ".")


class _FileKeys:
    """The identity of a listed file, cheaply: its folder resolved once (a bounded cache of folders),
    then its name, resolved too only when it is a symlink; as a 16-byte digest."""

    def __init__(self):
        self.folders: dict[str, str] = {}

    def __call__(self, path: str) -> bytes:
        import hashlib
        folder, name = os.path.split(path)
        real = self.folders.get(folder)
        if real is None:
            if len(self.folders) > 4096:
                self.folders.clear()
            real = self.folders[folder] = os.path.realpath(folder)
        full = os.path.join(real, name)
        if name in ("", ".", "..") or os.path.islink(full):
            full = os.path.realpath(full)
        return hashlib.blake2b(full.encode("utf-8", "surrogateescape"), digest_size=16).digest()


def _first_of_each(digests: bytearray, n: int):
    """bool [n]: True at the first row naming each file (rows' 16-byte digests, in order)."""
    import numpy as np
    keys = np.frombuffer(bytes(digests), dtype=">u8").reshape(n, 2)        # [n, 2]
    order = np.lexsort((keys[:, 1], keys[:, 0]))       # stable: equal files keep their row order
    ordered = keys[order]
    first = np.ones(n, bool)
    first[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
    keep = np.zeros(n, bool)
    keep[order[first]] = True
    return keep


def _csv(manifest: Path) -> Dataset:
    """A CSV manifest, streamed: opening it reads it once (the header, and each row's file identity
    to find repeated files: 16 bytes a row while it opens, one byte a row kept after), and each pass
    over the items reads it again. Rows are never all held at once."""
    manifest = manifest.resolve()
    _require_utf8(manifest, "CSV manifest")
    header = _csv_header(manifest)
    if "path" not in header:
        raise ValueError(f"CSV manifest {manifest} needs a header with a 'path' column (optional: label, caption); "
                         f"its header is {', '.join(repr(h) for h in header) or 'empty'}")
    columns = {name: header.index(name) for name in ("path", "label", "caption") if name in header}
    dataset_id = f"csv:{manifest}"
    folder = str(manifest.parent)
    key = _FileKeys()
    digests = bytearray()
    n_rows = 0
    for listed, _, _ in _csv_rows(manifest, columns):
        digests += key(_listed_file(folder, listed))
        n_rows += 1
    if not n_rows:
        raise ValueError(f"CSV manifest {manifest} lists no image: add one row per image under its 'path' header")
    keep = _first_of_each(digests, n_rows)
    del digests
    n_kept = int(keep.sum())

    def items(shard=(0, 1)):
        j = -1
        for i, (listed, label, caption) in enumerate(_csv_rows(manifest, columns)):
            if i >= n_rows:            # (the file grew since it was opened)
                return
            if not keep[i]:
                continue
            j += 1
            if j % shard[1] != shard[0]:
                continue
            p = _listed_file(folder, listed)
            yield Item(f"{dataset_id}/{listed}", _file_loader(p), path=p, label=label or None,
                       caption=caption or None)
    return Dataset(dataset_id, manifest.stem, "csv", items, n_kept, n_rows - n_kept)


sha256_image = pixel_sha256     # the one definition is models.images.pixel_sha256
