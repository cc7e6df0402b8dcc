"""Shapes world: a deterministic generator of synthetic scenes whose every factor is known.

A scene holds 1-4 objects that share shape, colour, size and pattern, so that the count and
the caption are well defined ("two small red circles in the top left on a striped background").

Factors (the vocabularies are ``FACTORS``):

- ``shape``      circle, square, triangle, diamond, cross, star
- ``color``      red, orange, yellow, green, cyan, blue, purple, pink (all chromatic, so no
                 object colour is ever a plain background colour)
- ``size``       small (radius 0.075 S) / large (radius 0.13 S), +-6 % jitter
- ``position``   the 3x3 grid cell ("top left" ... "bottom right", "center") that holds the
                 centre of the group (the mean of the object centres). Objects of a group are
                 packed tightly around that centre (2: side by side or stacked, 3: a triangle,
                 4: a 2x2 block), so a group of large objects can reach into the neighbouring
                 cells, but its centre is always at least ~2 pixels inside the named cell.
                 A single object's centre sits on the lattice of patch centres of an 8 x 8
                 grid (``SNAP``), so it meets the toy model's patch grid at a fixed phase.
- ``count``      "1" .. "4" (captions say "a"/"one", "two", ...)
- ``pattern``    solid, striped, dotted, checkered (the second tone is a darker shade of the
                 object's colour, so the named colour dominates every object)
- ``background`` white, black (plain), striped, dotted (grey), sky (blue gradient),
                 grass (green vertical-blade texture), water (blue waves)

Determinism: scene ``(seed, index)`` is drawn from its own ``numpy`` generator seeded with
``[seed, index]``, so any image can be regenerated alone, in any order, on any machine.

Speed: drawing is vectorised numpy on the object's bounding box only; ``bench_shapes()``
measures images per second on one core (target >= 2,000 at 64 px).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterator

import numpy as np

FACTORS: dict[str, list[str]] = {
    "shape": ["circle", "square", "triangle", "diamond", "cross", "star"],
    "color": ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink"],
    "size": ["small", "large"],
    "position": [
        "top left", "top middle", "top right",
        "middle left", "center", "middle right",
        "bottom left", "bottom middle", "bottom right",
    ],
    "count": ["1", "2", "3", "4"],
    "pattern": ["solid", "striped", "dotted", "checkered"],
    "background": ["white", "black", "striped", "dotted", "sky", "grass", "water"],
}
FACTOR_NAMES: tuple[str, ...] = tuple(FACTORS)

# RGB of each named colour (uint8 values); each scene jitters every channel by up to +-12.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (60, 200, 70),
    "cyan": (30, 205, 215),
    "blue": (30, 70, 225),
    "purple": (140, 50, 195),
    "pink": (250, 125, 195),
}
COLOR_JITTER = 12
PATTERN_SHADE = 0.45          # second tone of a pattern = colour * PATTERN_SHADE
OUTLINE_RGB = (25, 25, 25)
SIZE_RADIUS = {"small": 0.075, "large": 0.13}   # object radius as a fraction of the image side

_NUMBER_WORDS = {"1": "one", "2": "two", "3": "three", "4": "four"}
_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles",
           "diamond": "diamonds", "cross": "crosses", "star": "stars"}


@dataclass
class Scene:
    """One generated scene.

    image:   np.uint8 [S, S, 3] (RGB)
    factors: dict factor name -> value (one of ``FACTORS[name]``)
    caption: a natural-language caption naming some or all of the factors
    """

    image: np.ndarray
    factors: dict[str, str]
    caption: str
    seed: int = 0
    index: int = 0
    centers: list[tuple[float, float]] = field(default_factory=list)  # (y, x) per object, pixels
    named: tuple[str, ...] = ()       # the factors the caption states

    def to_pil(self):
        from PIL import Image
        return Image.fromarray(self.image, "RGB")


# --------------------------------------------------------------------------- dataset names

_NAME_RE = re.compile(r"^shapes:(\d+)(?::seed=(-?\d+))?$")


def parse_dataset_name(name: str) -> tuple[int, int]:
    """``"shapes:2000:seed=0"`` -> ``(2000, 0)``; the seed defaults to 0 (``"shapes:500"``).

    Raises ValueError naming the expected form for anything else.
    """
    if not isinstance(name, str):
        raise ValueError(f"dataset name must be a string like 'shapes:2000:seed=0', got {name!r}")
    m = _NAME_RE.match(name.strip())
    if not m:
        raise ValueError(
            f"bad shapes dataset name {name!r}: expected 'shapes:N' or 'shapes:N:seed=S' "
            "with N a positive integer and S an integer, e.g. 'shapes:2000:seed=0'")
    n = int(m.group(1))
    if n <= 0:
        raise ValueError(f"bad shapes dataset name {name!r}: N must be positive, got {n}")
    seed = int(m.group(2)) if m.group(2) is not None else 0
    return n, seed


def dataset_name(n: int, seed: int) -> str:
    """Inverse of ``parse_dataset_name``."""
    return f"shapes:{int(n)}:seed={int(seed)}"


# --------------------------------------------------------------------------- geometry


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates: yy, xx float32 [S, S]."""
    c = np.arange(size, dtype=np.float32) + 0.5
    yy, xx = np.meshgrid(c, c, indexing="ij")
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


_SQ3 = np.float32(np.sqrt(3.0) / 2.0)
_STAR_K = 5
_STAR_INNER = 0.42
# canonical star sector: tip T = (1, 0), inner vertex V = r_i (cos pi/5, sin pi/5);
# outward normal n of the edge TV, gauge = (n . p) / (n . T)
_sv = np.array([_STAR_INNER * np.cos(np.pi / _STAR_K), _STAR_INNER * np.sin(np.pi / _STAR_K)])
_se = _sv - np.array([1.0, 0.0])
_sn = np.array([-_se[1], _se[0]])
if _sn[0] < 0:
    _sn = -_sn
_STAR_N = (_sn / _sn[0]).astype(np.float32)  # so that n . T = 1


def _gauge(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Degree-1 homogeneous 'radius' of a shape in units of the object radius.

    u, v: float32 arrays (x right, y down) relative to the object centre, divided by the radius.
    Returns f with f <= 1 inside the shape; f scales linearly with distance from the centre,
    which keeps the outline width constant across shapes.
    """
    if shape == "circle":
        return np.sqrt(u * u + v * v)
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) * np.float32(1 / 0.8)
    if shape == "diamond":
        return (np.abs(u) + np.abs(v)) * np.float32(1 / 1.05)
    if shape == "triangle":
        # upward-pointing equilateral triangle, centroid at 0, circumradius 1.1 (inradius 0.55)
        f = np.maximum(v, np.maximum(_SQ3 * u - 0.5 * v, -_SQ3 * u - 0.5 * v))
        return f * np.float32(1 / 0.55)
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        b = np.float32(1 / 0.34)
        return np.minimum(np.maximum(au, av * b), np.maximum(au * b, av))
    if shape == "star":
        rho = np.sqrt(u * u + v * v)
        theta = np.arctan2(v, u) + np.float32(np.pi / 2)       # tip straight up
        sector = np.float32(2 * np.pi / _STAR_K)
        t = np.abs(np.mod(theta, sector) - sector / 2) - sector / 2   # in [-pi/5, 0]
        t = np.abs(t)
        return rho * (np.cos(t) * _STAR_N[0] + np.sin(t) * _STAR_N[1]) * np.float32(1 / 1.05)
    raise ValueError(f"unknown shape {shape!r}; expected one of {FACTORS['shape']}")


def _pattern_mask(pattern: str, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray | None:
    """Boolean mask of the second tone for a pattern (None for solid). yy, xx: pixel coords."""
    p = max(2.0, 4.0 * size / 64.0)    # period in pixels
    if pattern == "solid":
        return None
    if pattern == "striped":
        return np.mod(xx + yy, np.float32(p)) < np.float32(p / 2)
    if pattern == "dotted":
        dy = np.mod(yy, np.float32(p)) - np.float32(p / 2)
        dx = np.mod(xx, np.float32(p)) - np.float32(p / 2)
        return dy * dy + dx * dx < np.float32((0.3 * p) ** 2)
    if pattern == "checkered":
        q = np.float32(p * 0.75)
        return (np.floor(yy / q) + np.floor(xx / q)).astype(np.int32) % 2 == 0
    raise ValueError(f"unknown pattern {pattern!r}; expected one of {FACTORS['pattern']}")


# --------------------------------------------------------------------------- backgrounds


_BANK_KINDS = ("striped", "dotted", "sky", "grass", "water")


@lru_cache(maxsize=64)
def _background_bank(kind: str, size: int) -> np.ndarray:
    """Pre-drawn variants of a textured background: uint8 [K, S, S, 3] (read-only).

    Drawn once per (kind, size) from a fixed seed, so every process sees the same bank; a
    scene picks one variant with its own generator (K = 64 at <= 96 px, fewer above).
    """
    k = 64 if size <= 96 else 16
    rng = np.random.default_rng([7919, _BANK_KINDS.index(kind), size])
    bank = np.stack([_draw_background(kind, size, rng) for _ in range(k)])
    bank.setflags(write=False)
    return bank


def _background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Background image, uint8 [S, S, 3]: plain colours drawn, textures taken from the bank."""
    if kind in _BANK_KINDS:
        bank = _background_bank(kind, size)
        return bank[int(rng.integers(0, len(bank)))].copy()
    return _draw_background(kind, size, rng)


def _draw_background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw one background image, uint8 [S, S, 3]."""
    S = size
    yy, xx = _grid(S)
    img = np.empty((S, S, 3), dtype=np.uint8)
    j = rng.integers(-10, 11, size=3)
    if kind == "white":
        img[:] = 242 + int(j[0]) // 2
        return img
    if kind == "black":
        img[:] = 14 + int(j[0]) // 2
        return img
    if kind == "striped":
        period = np.float32(S * rng.uniform(0.11, 0.16))
        ang = rng.choice([0.0, np.pi / 2, np.pi / 4, -np.pi / 4])
        phase = np.float32(rng.uniform(0, period))
        proj = xx * np.float32(np.cos(ang)) + yy * np.float32(np.sin(ang)) + phase
        m = np.mod(proj, period) < period / 2
        a = 215 + int(j[0]) // 2
        b = 150 + int(j[1]) // 2
        img[:] = a
        img[m] = b
        return img
    if kind == "dotted":
        sp = np.float32(S * rng.uniform(0.12, 0.16))
        oy, ox = rng.uniform(0, sp, size=2).astype(np.float32)
        dy = np.mod(yy + oy, sp) - sp / 2
        dx = np.mod(xx + ox, sp) - sp / 2
        m = dy * dy + dx * dx < (sp * np.float32(0.22)) ** 2
        img[:] = 225 + int(j[0]) // 2
        img[m] = 105 + int(j[1]) // 2
        return img
    if kind == "sky":
        top = np.array([65, 125, 225], np.float32) + j
        bot = np.array([195, 222, 250], np.float32) + j // 2
        t = (yy[:, :1] / S)[..., None]                        # [S, 1, 1]
        g = top + (bot - top) * t                              # [S, 1, 3]
        img[:] = np.clip(g, 0, 255).astype(np.uint8)
        return img
    if kind == "grass":
        rows = max(1, S // 4)
        n = rng.random((rows, S), dtype=np.float32)
        n = np.repeat(n, -(-S // rows), axis=0)[:S]            # vertical blades
        off = int(rng.integers(0, 4))
        n = np.roll(n, off, axis=0)
        base = np.array([55, 115, 40], np.float32) + j // 2
        img[:] = np.clip(base * (np.float32(0.6) + np.float32(0.7) * n[..., None]), 0, 255)
        return img
    if kind == "water":
        ph = np.float32(rng.uniform(0, 2 * np.pi))
        f1 = np.float32(2 * np.pi / (S * 0.16))
        w = np.sin(yy * f1 + np.float32(2.0) * np.sin(xx * np.float32(2 * np.pi / (S * 0.45)) + ph))
        base = np.array([30, 85, 150], np.float32) + j // 2
        hi = np.array([90, 150, 200], np.float32)
        t = (np.float32(0.5) + np.float32(0.5) * w)[..., None] ** 3
        img[:] = np.clip(base + (hi - base) * t, 0, 255)
        return img
    raise ValueError(f"unknown background {kind!r}; expected one of {FACTORS['background']}")


# --------------------------------------------------------------------------- layout

# group offsets in units of the spacing d = 2 r + gap; (dy, dx)
_LAYOUTS = {
    1: [np.zeros((1, 2), np.float32)],
    2: [np.array([[0, -0.5], [0, 0.5]], np.float32), np.array([[-0.5, 0], [0.5, 0]], np.float32)],
    3: [np.array([[0.289, -0.5], [0.289, 0.5], [-0.577, 0]], np.float32),
        np.array([[-0.289, -0.5], [-0.289, 0.5], [0.577, 0]], np.float32)],
    4: [np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]], np.float32)],
}


def _cell_bounds(position: str, size: int) -> tuple[float, float, float, float]:
    """(y0, y1, x0, x1) of a 3x3 grid cell, in pixels."""
    k = FACTORS["position"].index(position)
    r, c = divmod(k, 3)
    w = size / 3.0
    return r * w, (r + 1) * w, c * w, (c + 1) * w


def cell_of(y: float, x: float, size: int) -> str:
    """Name of the grid cell that contains pixel coordinate (y, x)."""
    r = min(2, max(0, int(y * 3 // size)))
    c = min(2, max(0, int(x * 3 // size)))
    return FACTORS["position"][3 * r + c]


# --------------------------------------------------------------------------- captions

_BG_PHRASES = {
    "white": ["on a white background", "against a white background", "on white"],
    "black": ["on a black background", "against a black background", "on black"],
    "striped": ["on a striped background", "against a striped background", "on stripes"],
    "dotted": ["on a dotted background", "against a dotted background", "on a polka dot background"],
    "sky": ["in the sky", "against a blue sky", "on a sky background"],
    "grass": ["on grass", "on a grassy field", "on a grass background"],
    "water": ["on water", "over the water", "on a water background"],
}
_PATTERN_WORDS = {"solid": ["solid", "plain"], "striped": ["striped"],
                  "dotted": ["dotted", "spotted"], "checkered": ["checkered"]}
_FULL_TEMPLATES = [
    "{np} {loc} {bg}",
    "{np} {bg}, {loc}",
    "a photo of {np} {loc} {bg}",
    "{loc_cap}, {np} {bg}",
    "there {be} {np} {loc} {bg}",
    "an image of {np} {bg} {loc}",
    "a picture with {np} {loc} {bg}",
]
_PARTIAL_TEMPLATES = ["{np}{loc}{bg}", "a photo of {np}{loc}{bg}", "a picture of {np}{loc}{bg}",
                      "an image of {np}{loc}{bg}"]


def position_phrase(position: str, variant: int = 0) -> str:
    """'in the top left' / 'at the top left' / 'in the top left corner' (corners only)."""
    if variant % 3 == 1:
        return f"at the {position}"
    if variant % 3 == 2 and position in ("top left", "top right", "bottom left", "bottom right"):
        return f"in the {position} corner"
    return f"in the {position}"


def noun_phrase(f: dict[str, str | None], variant: int = 0) -> str:
    """Noun phrase naming the given factors; a factor mapped to None is left out.

    f: dict with keys count, size, pattern, color, shape (values or None).
    """
    count = f.get("count")
    plural = count is not None and count != "1"
    shape = f.get("shape")
    if shape is None:
        noun = ("objects" if variant % 2 else "shapes") if plural else ("object" if variant % 2 else "shape")
    else:
        noun = _PLURAL[shape] if plural else shape
    adj = []
    if f.get("size") is not None:
        adj.append(f["size"])
    if f.get("pattern") is not None:
        words = _PATTERN_WORDS[f["pattern"]]
        adj.append(words[variant % len(words)])
    if f.get("color") is not None:
        adj.append(f["color"])
    if variant % 4 == 3 and len(adj) >= 2:     # "small red striped circle" as well
        adj[-1], adj[-2] = adj[-2], adj[-1]
    words = " ".join(adj + [noun])
    if count is None:
        det = "an" if words[0] in "aeiou" else "a"
        return f"{det} {words}"
    if count == "1":
        if variant % 3 == 2:
            return f"one {words}"
        if variant % 3 == 1:
            return f"a single {words}"
        det = "an" if words[0] in "aeiou" else "a"
        return f"{det} {words}"
    return f"{_NUMBER_WORDS[count]} {words}"


def factor_caption(factor: str, value: str, variant: int = 0) -> str:
    """A caption that names one factor value only, in the style of the partial captions
    ("a red shape", "a photo of an object in the top left", "two objects", "a shape in the sky").

    variant (any int) picks the template and the wording.
    """
    if factor not in FACTORS:
        raise ValueError(f"unknown factor {factor!r}; expected one of {list(FACTORS)}")
    if value not in FACTORS[factor]:
        raise ValueError(f"bad value {value!r} for factor {factor!r}; expected one of {FACTORS[factor]}")
    f = {n: (value if n == factor else None) for n in FACTOR_NAMES}
    np_ = noun_phrase(f, variant)
    loc = " " + position_phrase(value, variant // 2) if factor == "position" else ""
    bg = " " + _BG_PHRASES[value][(variant // 3) % 3] if factor == "background" else ""
    t = _PARTIAL_TEMPLATES[(variant // 5) % len(_PARTIAL_TEMPLATES)]
    return t.format(np=np_, loc=loc, bg=bg)


def caption_parts(factors: dict[str, str], rng: np.random.Generator, partial_prob: float = 0.5
                  ) -> tuple[str, tuple[str, ...]]:
    """A caption for a factor record, drawn from varied templates with ``rng``, and the names of
    the factors it states (in FACTORS order).

    With probability ``1 - partial_prob`` it names every factor ("two small striped red circles
    in the top left on a grassy field"); otherwise a random non-empty subset of factors
    ("a photo of a blue star", "a red shape in the center").

    A caption that leaves a factor out is true of every scene that agrees on the named ones,
    which is what exact multi-positive contrastive targets need (see etl.world.recipe).
    """
    u = rng.random(12)
    variant = int(u[0] * 12)
    if u[1] >= partial_prob:
        np_ = noun_phrase(factors, variant)
        loc = position_phrase(factors["position"], int(u[2] * 3))
        bg = _BG_PHRASES[factors["background"]][int(u[3] * 3)]
        t = _FULL_TEMPLATES[int(u[4] * len(_FULL_TEMPLATES))]
        return t.format(np=np_, loc=loc, bg=bg, loc_cap=loc[0].upper() + loc[1:],
                        be="is" if factors["count"] == "1" else "are"), FACTOR_NAMES
    # partial: keep k of the 7 factors, k uniform in 1..6
    names = list(FACTOR_NAMES)
    k = 1 + int(u[5] * 6)
    order = rng.permutation(len(names))[:k]
    keep = {names[i] for i in order}
    f = {n: (factors[n] if n in keep else None) for n in names}
    np_ = noun_phrase(f, variant)
    loc = " " + position_phrase(factors["position"], int(u[2] * 3)) if "position" in keep else ""
    bg = " " + _BG_PHRASES[factors["background"]][int(u[3] * 3)] if "background" in keep else ""
    t = _PARTIAL_TEMPLATES[int(u[4] * len(_PARTIAL_TEMPLATES))]
    return t.format(np=np_, loc=loc, bg=bg), tuple(n for n in names if n in keep)


# --------------------------------------------------------------------------- scenes


def sample_factors(rng: np.random.Generator, **fixed: str) -> dict[str, str]:
    """Draw every factor uniformly; ``fixed`` overrides (e.g. count="1"), validated."""
    u = rng.random(len(FACTOR_NAMES))
    f = {n: FACTORS[n][int(u[i] * len(FACTORS[n]))] for i, n in enumerate(FACTOR_NAMES)}
    for k, v in fixed.items():
        if k not in FACTORS:
            raise ValueError(f"unknown factor {k!r}; expected one of {list(FACTORS)}")
        v = str(v)
        if v not in FACTORS[k]:
            raise ValueError(f"bad value {v!r} for factor {k!r}; expected one of {FACTORS[k]}")
        f[k] = v
    return f


# A single object's centre sits on the lattice of patch centres of an 8 x 8 patch grid
# (pitch S/8, i.e. the toy model's 8-pixel patches at 64 px), at the lattice point nearest to
# its jittered centre that keeps it inside its cell and the image. The object then meets the
# patch grid at one phase per size, which keeps shape learnable by a small ViT trained for
# minutes on a CPU. Groups are not snapped. 0 turns snapping off.
SNAP = 8


def _snap(c: float, a: float, b: float, lo: float, hi: float, size: int) -> float:
    """Nearest lattice point (k + 1/2) * size/SNAP to c within [max(a, lo), min(b, hi)];
    c itself when the interval holds none."""
    p = size / SNAP
    lo_, hi_ = max(a, lo), min(b, hi)
    k = round(c / p - 0.5)
    best = None
    for kk in (k, k - 1, k + 1, k - 2, k + 2):
        v = (kk + 0.5) * p
        if lo_ <= v <= hi_ and (best is None or abs(v - c) < abs(best - c)):
            best = v
    return c if best is None else best


def render(factors: dict[str, str], rng: np.random.Generator, size: int = 64
           ) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Draw a scene for a factor record. Returns (image uint8 [S, S, 3], object centres (y, x))."""
    S = int(size)
    img = _background(factors["background"], S, rng)
    u = rng.random(8)
    n = int(factors["count"])
    r = np.float32(SIZE_RADIUS[factors["size"]] * S * (0.94 + 0.12 * u[0]))
    gap = max(1.0, 2.0 * S / 64.0)
    d = 2 * r + gap
    layouts = _LAYOUTS[n]
    offs = layouts[int(u[1] * len(layouts))] * d                    # [n, 2]
    # group extent around its centre (for clamping inside the image)
    margin = r * 1.1 + max(1.0, S / 64.0)
    lo = -offs.min(0) + margin                                      # (y, x)
    hi = offs.max(0) + margin
    y0, y1, x0, x1 = _cell_bounds(factors["position"], S)
    w = S / 3.0
    cy = (y0 + y1) / 2 + (u[2] - 0.5) * 0.5 * w
    cx = (x0 + x1) / 2 + (u[3] - 0.5) * 0.5 * w
    cy = min(max(cy, float(lo[0])), S - float(hi[0]))
    cx = min(max(cx, float(lo[1])), S - float(hi[1]))
    inset = min(2.0, w / 4)
    cy = min(max(cy, y0 + inset), y1 - inset)
    cx = min(max(cx, x0 + inset), x1 - inset)
    if n == 1 and SNAP > 0:
        cy, cx = _snap(cy, y0 + inset, y1 - inset, lo[0], S - hi[0], S), \
                 _snap(cx, x0 + inset, x1 - inset, lo[1], S - hi[1], S)

    base = np.array(COLOR_RGB[factors["color"]], np.int32)
    base = np.clip(base + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3), 0, 255)
    palette = np.empty((4, 3), np.uint8)          # 0 unused, 1 outline, 2 fill, 3 pattern
    palette[1] = OUTLINE_RGB
    palette[2] = base
    palette[3] = (base * PATTERN_SHADE).astype(np.uint8)

    # One stamp for the whole group: object offsets are rounded to whole pixels, so every
    # object shares the sub-pixel phase of the group centre.
    offs = np.round(offs)
    fy, fx = cy - np.floor(cy), cx - np.floor(cx)
    ext = int(np.ceil(r * 1.15 + 2))
    E = 2 * ext + 1
    c = np.arange(E, dtype=np.float32) + np.float32(0.5) - np.float32(ext)
    sv = (c - np.float32(fy))[:, None] / r          # [E, 1]
    su = (c - np.float32(fx))[None, :] / r          # [1, E]
    su, sv = np.broadcast_arrays(su, sv)
    g = _gauge(factors["shape"], su, sv)
    t_out = np.float32(max(0.8, S / 64.0) / r)      # outline width in gauge units
    stamp = (g <= 1 + t_out).astype(np.uint8)       # 1 = outline ring (overwritten inside)
    inside = g <= 1
    stamp[inside] = 2
    pm = _pattern_mask(factors["pattern"], c[:, None] + np.zeros((1, E), np.float32),
                       c[None, :] + np.zeros((E, 1), np.float32), S)
    if pm is not None:
        stamp[inside & pm] = 3

    P = ext + 1
    lab = np.zeros((S + 2 * P, S + 2 * P), np.uint8)
    iy0, ix0 = int(np.floor(cy)), int(np.floor(cx))
    centers = []
    for k in range(n):
        dy, dx = int(offs[k, 0]), int(offs[k, 1])
        centers.append((cy + dy, cx + dx))
        y = iy0 + dy - ext + P
        x = ix0 + dx - ext + P
        sl = lab[y:y + E, x:x + E]
        np.maximum(sl, stamp, out=sl)
    lab = lab[P:P + S, P:P + S]
    np.copyto(img, palette[lab], where=(lab > 0)[..., None])
    return img, centers


def scene(index: int, seed: int = 0, size: int = 64, partial_prob: float = 0.5,
          fix: dict[str, str] | None = None, **fixed: str) -> Scene:
    """Scene number ``index`` of the world with ``seed``; the same (seed, index, size, fixed)
    always gives identical pixels, factors and caption.

    fixed: optional factor overrides, e.g. ``scene(3, 0, count="1")`` (used by evaluation);
    ``fix`` takes the same as a dict, which is the only way to fix the factor ``size``
    (the keyword ``size`` is the image side): ``scene(3, 0, fix={"size": "small"})``.
    """
    if int(size) < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    if int(index) < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFF, int(index)])
    f = sample_factors(rng, **{**(fix or {}), **fixed})
    img, centers = render(f, rng, size)
    cap, named = caption_parts(f, rng, partial_prob)
    return Scene(image=img, factors=f, caption=cap, seed=int(seed), index=int(index), centers=centers,
                 named=named)


def generate(n: int, seed: int = 0, size: int = 64, start: int = 0, **kw) -> Iterator[Scene]:
    """Lazily yield scenes ``start .. start + n - 1`` of the world with ``seed``.

    ``list(generate(2000, 0))`` is the dataset ``shapes:2000:seed=0``. Extra keyword
    arguments go to ``scene`` (``partial_prob``, factor overrides).
    """
    if int(n) < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    for i in range(int(start), int(start) + int(n)):
        yield scene(i, seed, size, **kw)


def batch(indices, seed: int = 0, size: int = 64, **kw) -> tuple[np.ndarray, list[dict], list[str]]:
    """Render several scenes at once: (images uint8 [B, S, S, 3], factor records, captions)."""
    scenes = [scene(int(i), seed, size, **kw) for i in indices]
    if not scenes:
        return np.zeros((0, size, size, 3), np.uint8), [], []
    return (np.stack([s.image for s in scenes]), [s.factors for s in scenes],
            [s.caption for s in scenes])


def bench_shapes(n: int = 2000, size: int = 64, seed: int = 0, clock: str = "cpu") -> float:
    """Images per second of ``scene`` (drawing + factors + caption) on one core.

    clock 'cpu' divides by the process CPU time (the generator is single-threaded), so the
    number means "per core" even on a machine shared with other work; 'wall' uses wall time.
    """
    if clock not in ("cpu", "wall"):
        raise ValueError(f"clock must be 'cpu' or 'wall', got {clock!r}")
    timer = time.process_time if clock == "cpu" else time.perf_counter
    for _ in generate(20, seed, size):       # warm the background banks and caches
        pass
    t0 = timer()
    for _ in generate(n, seed, size, start=1000):
        pass
    return n / max(timer() - t0, 1e-9)


if __name__ == "__main__":
    print(f"{bench_shapes():.0f} images/s per core (CPU time), "
          f"{bench_shapes(clock='wall'):.0f} images/s wall")
