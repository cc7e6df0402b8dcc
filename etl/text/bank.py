"""The product's own text bank, user text files, and text ids.

The atlas bank is generated deterministically from curated vocabularies, one JSON file per
property under ``etl/text/banks/``::

    {"property": "colors",
     "description": "one line, shown in the dashboard and given to the LLM labeler",
     "texts":  ["a colorful image", ...],                       # written out in full
     "groups": [{"templates": ["a vivid {} color", "the color {}"],
                 "values":    ["red", "crimson", ...]}]}        # every template x every value

Each text expresses exactly one property and carries that property as its tag, so the
offline labeler (MATH.md §4) and the tag judge (§5) can read a head's property straight off
its TextSpan texts. "a photo of a red car" would mix colours and vehicles; the bank says
"a vivid red color" and "an image of a car" instead. The toy shapes world's vocabulary
(etl/world/shapes.py: its shapes, colours, sizes, grid positions, counts, patterns and backgrounds)
is written into the matching properties too.

The shapes-world bank (``world_bank``, bank name 'shapes') is generated from the world's own
caption code: every text names one value of one factor in the words the toy models were
trained on, tagged with that factor's one property (WORLD_FACTOR_PROPERTIES). It is the
default bank of the toy models (models.registry.default_bank).

    PROPERTIES                 property -> one-line description, in bank order
    atlas_bank()               [(text, property)], >= 3,000 distinct texts
    world_bank()               [(text, property)], the shapes world's own texts
    bank_texts(name)           either bank by name
    read_text_file(path)       [(text, tag or None)] from a user's file (text<TAB>tag per line)
    text_id(bank, text)        sha1(bank + "\\x00" + text)[:16], the warehouse key of a text
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections import Counter
from functools import lru_cache
from pathlib import Path

__all__ = [
    "ATLAS_BANK", "WORLD_BANK", "VOCABULARY_DIR", "PROPERTIES", "WORLD_FACTOR_PROPERTIES", "TextFileError",
    "UnknownTagWarning", "PRODUCT_BANKS", "atlas_bank", "world_bank", "world_texts", "bank_texts", "read_text_file",
    "text_id", "unknown_tags",
]

ATLAS_BANK = "atlas"                                  # bank name of the product's own texts
VOCABULARY_DIR = Path(__file__).with_name("banks")

# "a" before a vowel sound becomes "an"; these vowel-letter words start with a consonant sound.
_A_BEFORE_VOWEL = re.compile(r"\b([Aa]) (?=[aeiouAEIOU])(?!(?:uni|use|usu|eu|one\b|once)\w*)")


class TextFileError(ValueError):
    """A user's text file could not be used (missing, empty, binary or not UTF-8)."""


class UnknownTagWarning(UserWarning):
    """A user's text file tags texts with properties the atlas vocabulary does not know."""


# --------------------------------------------------------------------------- the atlas bank

def _fix_articles(text: str) -> str:
    return _A_BEFORE_VOWEL.sub(lambda m: m.group(1) + "n ", text)


def _expand(spec: dict, source: Path) -> list[str]:
    """The texts of one vocabulary file, in file order, duplicates within it dropped."""
    texts = list(spec.get("texts", []))
    for group in spec.get("groups", []):
        for template in group["templates"]:
            if template.count("{}") != 1:
                raise ValueError(f"{source}: template {template!r} must contain exactly one '{{}}'")
            texts.extend(template.format(value) for value in group["values"])
    return list(dict.fromkeys(_fix_articles(" ".join(t.split())) for t in texts))


@lru_cache(maxsize=1)
def _load() -> tuple[dict[str, str], tuple[tuple[str, str], ...]]:
    files = sorted(VOCABULARY_DIR.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"No vocabulary files (*.json) in {VOCABULARY_DIR}; the install is incomplete.")
    properties: dict[str, str] = {}
    owner: dict[str, str] = {}
    bank: list[tuple[str, str]] = []
    for f in files:
        spec = json.loads(f.read_text(encoding="utf-8"))
        prop = spec["property"]
        if prop in properties:
            raise ValueError(f"{f}: property {prop!r} is defined by two vocabulary files")
        properties[prop] = spec["description"]
        for text in _expand(spec, f):
            if text in owner:
                raise ValueError(f"{f}: text {text!r} is already tagged {owner[text]!r}; "
                                 "every text of the bank must carry exactly one property")
            owner[text] = prop
            bank.append((text, prop))
    return properties, tuple(bank)


PROPERTIES: dict[str, str] = dict(_load()[0])


def atlas_bank() -> list[tuple[str, str]]:
    """The product's text bank: ``[(text, property)]``, distinct texts, deterministic order
    (vocabulary files by name, then file order)."""
    return list(_load()[1])


# --------------------------------------------------------------------------- user files

def read_text_file(path: str | Path) -> list[tuple[str, str | None]]:
    """A user's bank: one text per line, optionally ``text<TAB>property``.

    Blank lines are skipped, surrounding whitespace is stripped, a repeated text keeps its
    first line. Tags are kept as given; tags that are not atlas properties are reported with
    an :class:`UnknownTagWarning` (the texts stay, the tag is stored as written).
    Raises :class:`TextFileError` for a missing, empty, binary or non-UTF-8 file.
    """
    p = Path(path)
    if not p.is_file():
        raise TextFileError(f"Text file {p} does not exist (or is not a file). Give the path of a "
                            "UTF-8 text file with one text per line (optionally text<TAB>property).")
    raw = p.read_bytes()
    if b"\x00" in raw:
        raise TextFileError(f"Text file {p} looks binary (it contains NUL bytes). Give a UTF-8 text "
                            "file with one text per line.")
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TextFileError(f"Text file {p} is not UTF-8 ({exc}). Re-save it as UTF-8, one text per line.") from exc
    items: dict[str, str | None] = {}
    for line in content.splitlines():
        text, _, tag = line.rpartition("\t") if "\t" in line else (line, "", "")
        text, tag = " ".join(text.split()), tag.strip()
        if text and text not in items:
            items[text] = tag or None
    if not items:
        raise TextFileError(f"Text file {p} has no texts (only blank lines). Put one text per line.")
    result = list(items.items())
    unknown = unknown_tags(result)
    if unknown:
        listed = ", ".join(f"{t!r} ({n})" for t, n in unknown.most_common(10))
        warnings.warn(f"{p}: {sum(unknown.values())} texts carry tags that are not atlas properties: "
                      f"{listed}. They are kept as given; known properties: {', '.join(PROPERTIES)}.",
                      UnknownTagWarning, stacklevel=2)
    return result


def unknown_tags(items: list[tuple[str, str | None]]) -> Counter:
    """How many texts carry each tag that is not an atlas property (untagged texts not counted)."""
    return Counter(tag for _, tag in items if tag is not None and tag not in PROPERTIES)


def text_id(bank: str, text: str) -> str:
    """The warehouse key of a text: ``sha1(bank + "\\x00" + text)``, first 16 hex characters."""
    return hashlib.sha1(f"{bank}\x00{text}".encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------- the shapes-world bank

WORLD_BANK = "shapes"                                 # bank name of the shapes world's own texts

# The one property of each factor of the shapes world (etl/world/shapes.py FACTORS): a head
# labelled with a property is checked against the matching known factor (MATH.md §7). Sizes
# and backgrounds are properties of their own: a background colour is a background, not a
# colour, and a size is not a shape.
WORLD_FACTOR_PROPERTIES: dict[str, str] = {
    "shape": "shapes",
    "color": "colors",
    "size": "sizes",
    "position": "positions",
    "count": "counting",
    "pattern": "textures",
    "background": "backgrounds",
}

_WORLD_TEMPLATES = ["{np}", "a photo of {np}", "a picture of {np}", "an image of {np}",
                    "there {be} {np}", "a picture with {np}"]


def world_texts(factor: str, value: str) -> list[str]:
    """Every text of the world bank that names one factor value, in the world's own caption
    vocabulary: the one-factor captions training used (``shapes.factor_caption``) plus the
    noun phrase in the full captions' templates. Deterministic order, no duplicates."""
    from etl.world import shapes
    texts = [shapes.factor_caption(factor, value, v) for v in range(120)]
    if factor not in ("position", "background"):
        f = {n: (value if n == factor else None) for n in shapes.FACTOR_NAMES}
        be = "are" if factor == "count" and value != "1" else "is"
        for v in range(12):
            np_ = shapes.noun_phrase(f, v)
            texts += [t.format(np=np_, be=be) for t in _WORLD_TEMPLATES]
    return list(dict.fromkeys(texts))


@lru_cache(maxsize=1)
def _world() -> tuple[tuple[str, str], ...]:
    from etl.world import shapes
    bank: dict[str, str] = {}
    for factor, values in shapes.FACTORS.items():
        for value in values:
            for text in world_texts(factor, value):
                if bank.setdefault(text, WORLD_FACTOR_PROPERTIES[factor]) != WORLD_FACTOR_PROPERTIES[factor]:
                    raise ValueError(f"world text {text!r} names two factors")
    return tuple(bank.items())


def world_bank() -> list[tuple[str, str]]:
    """The shapes world's bank: ``[(text, property)]``, every text naming exactly one value of
    one factor and tagged with that factor's property (WORLD_FACTOR_PROPERTIES)."""
    return list(_world())


PRODUCT_BANKS = (ATLAS_BANK, WORLD_BANK)              # the banks the product ships, by name


def bank_texts(bank: str) -> list[tuple[str, str]]:
    """A product bank by name: 'atlas' (general image descriptions) or 'shapes' (the world's)."""
    if bank not in PRODUCT_BANKS:
        raise ValueError(f"unknown product bank {bank!r}; the product ships {', '.join(PRODUCT_BANKS)} "
                         "(a text file of your own goes through --text-file)")
    return atlas_bank() if bank == ATLAS_BANK else world_bank()
