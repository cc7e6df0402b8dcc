"""Head labels (MATH.md §4) and the match judge (§5): offline by tags, or by an LLM.

    OfflineLabeler(vocabulary, bank_tags) label = the property whose zero-shot reading by the model
                                          explains the head's variance (offline-v8), else the
                                          evidence-weighted majority of the texts' tags (v7)
    LLMLabeler(model, vocabulary)         label = an OpenAI-compatible chat model's JSON answer
    labeler.label(head_texts) -> Label    head_texts: the head's TextSpan texts, rank order
    labeler.match(head_text, p) -> Judgment   does this text express property p?

The LLM side talks to any OpenAI-compatible endpoint through the ``openai`` client
(``OPENAI_API_KEY``, ``OPENAI_BASE_URL``). Every valid answer is cached on disk under
``$ATLAS_HOME/cache/llm/`` by the hash of (model, messages), so a re-run asks nothing twice.
Rate limits, 5xx answers, timeouts and dropped connections are retried with bounded
exponential backoff; an endpoint that keeps failing, a rejected key or an unknown model stops
the job (:class:`LLMError`). An answer that is not JSON or names no property of the
vocabulary is a per-head error (``Label.error``), never a crash. The API key is never written
anywhere: not to the cache, not into a raw answer or an error text.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import openai

from etl.deadline import DeadlineExceeded, call_with_deadline
from etl.text.bank import PROPERTIES

__all__ = [
    "MIXED", "BASELINE", "BASELINE_DRAWS", "shuffled_tags", "OFFLINE_THRESHOLD", "OFFLINE_MAJORITY", "OFFLINE_ALPHA", "OFFLINE_AGREEMENT", "model_agreement", "agreement_p_value", "zeroshot_classes", "zeroshot_variance", "zeroshot_variances", "zeroshot_groups", "group_classes",
    "OFFLINE_ZEROSHOT", "OFFLINE_ZEROSHOT_MIN", "OFFLINE_ZEROSHOT_RATIO", "zeroshot_images", "HeadText", "Label", "Judgment", "LLMError", "OfflineLabeler",
    "LLMLabeler", "normalise_property", "default_cache_dir",
]

MIXED = "mixed"
OFFLINE_AGREEMENT = 0.2          # a text votes when the rest of the model reads it as the head does
OFFLINE_AGREEMENT_P = 0.001      # ... beyond chance: one-sided p of that correlation (Fisher z)
OFFLINE_MIN_VOTES = 2            # a label needs this many voting texts of its property
OFFLINE_THRESHOLD = 0.15         # and this share of the head's TextSpan variance in them
OFFLINE_MAJORITY = 0.6           # and this share of the evidence of all voting texts
OFFLINE_ALPHA = 1.0              # optional: a shuffled-tag p-value at most this (1: recorded only)
OFFLINE_PERMUTATIONS = 4000      # draws of the shuffled-tag null (p resolution 1/4001)
OFFLINE_SYMMETRIC = True         # ... and beats the strongest disagreement of other properties' texts (v6, v7)
OFFLINE_INVERTED = True          # v7: a text read opposite to the head still backs a property that has votes
OFFLINE_WEIGHTED = True          # v7: evidence = variance x |agreement| (docs/text.md says why)
OFFLINE_ZEROSHOT = True          # v8: the model's own zero-shot reading of each property decides (docs/text.md)
OFFLINE_ZEROSHOT_MIN = 0.35      # v8: the head's variance explained by the model's zero-shot classes of the property
OFFLINE_ZEROSHOT_RATIO = 1.5     # v8: ... and at least this many times any other property's
OFFLINE_ZEROSHOT_IMAGES = 20_000  # v8: the zero-shot variances read at most this many images (evenly spaced)
OFFLINE_VERSION = "offline-v8"   # with zero-shot variances; a head without them is labelled by v7's rule
OFFLINE_VERSION_V7 = "offline-v7"
BASELINE = "tag-shuffled"        # the baseline labeler stored beside the labels (baseline_labels)
BASELINE_DRAWS = 20              # its draws: seeded permutations of the bank's tags
BASELINE_SEED = 0


@dataclass(frozen=True)
class HeadText:
    """One TextSpan text of a head: its text, its property tag (None if untagged), its
    variance_explained (fraction of the head's variance), and ``agreement``: how the rest of
    the model reads the text the way the head does (``model_agreement``; None: not checked),
    with ``agreement_p`` its one-sided p-value (``agreement_p_value``)."""
    text: str
    tag: str | None
    variance: float
    agreement: float | None = None
    agreement_p: float | None = None


def shuffled_tags(tags: list, draw: int, seed: int = BASELINE_SEED) -> list:
    """The bank's property tags permuted over its texts (draw ``draw`` of the tag-shuffled baseline,
    a seeded permutation): every property keeps its number of texts, but which texts carry it is
    random, so a labeler reading these tags carries no information about the heads."""
    perm = np.random.default_rng([seed, draw]).permutation(len(tags))
    return [tags[i] for i in perm]


def agreement_p_value(rho: float, n: int) -> float:
    """One-sided p-value of a Pearson correlation ``rho`` over ``n`` images against 0
    (Fisher z: atanh(rho) sqrt(n - 3) is standard normal under no correlation)."""
    import math
    if n <= 3:
        return 1.0
    z = math.atanh(max(min(float(rho), 1 - 1e-12), -1 + 1e-12)) * math.sqrt(n - 3)
    return 0.5 * math.erfc(z / math.sqrt(2))


def model_agreement(head: np.ndarray, image: np.ndarray, texts: np.ndarray, alternatives: np.ndarray) -> np.ndarray:
    """Does the rest of the model read each text the way the head does?

    head [n, d]: the head's embeddings c[l,h] of n images; image [n, d]: the unit image
    embeddings z (so z - c[l,h] is the rest of the model); texts [k, d]: the head's TextSpan
    texts; alternatives [k, d]: for each text, the mean embedding of its property's texts.
    With q = text - alternative (the text against the other values of its property), the
    head's preference is b = c q and the rest's r = (z - c) q; returns Pearson corr(b, r)
    over the images, float64 [k] (0 where either side is constant).
    A head that tracks a property's values moves with the model's own reading of them; a head
    whose variance merely lies along a text's direction for another reason does not.
    """
    q = np.asarray(texts, np.float64) - np.asarray(alternatives, np.float64)           # [k, d]
    b = np.asarray(head, np.float64) @ q.T                                             # [n, k]
    r = np.asarray(image, np.float64) @ q.T - b                                        # [n, k]
    b = b - b.mean(0)
    r = r - r.mean(0)
    den = np.sqrt((b * b).sum(0) * (r * r).sum(0))
    return np.where(den > 0, (b * r).sum(0) / np.where(den > 0, den, 1.0), 0.0)


def zeroshot_classes(image: np.ndarray, texts: np.ndarray, tags: list, vocabulary: Iterable[str]) -> dict[str, np.ndarray]:
    """The model's own zero-shot reading of each property: {property: int [n]}, for each image the
    index (within the property's texts) of the property's bank text it matches best (argmax z . t).

    image [n, d]: the unit image embeddings z; texts [M, d]: the bank's texts embedded for the
    model; tags [M]: their property tags. Properties of ``vocabulary`` without texts are left out."""
    Z = np.asarray(image, np.float32)
    T = np.asarray(texts, np.float32)
    out = {}
    for p in vocabulary:
        rows = [i for i, t in enumerate(tags) if t == p]
        if rows:
            out[p] = np.argmax(Z @ T[rows].T, axis=1).astype(np.int64)
    return out


def zeroshot_variance(head: np.ndarray, classes: Mapping[str, np.ndarray]) -> dict[str, float]:
    """How much of the head's variance each property's zero-shot reading explains (offline-v8).

    head [n, d]: the head's embeddings c[l,h]; classes: ``zeroshot_classes`` of the same n images.
    For each property, the images are grouped by the model's zero-shot class of it and the share of
    the head's total variance (over all d dimensions) between the groups is adjusted for the number
    of groups k (1 - (1 - eta2) (n - 1) / (n - k), so that k random groups explain about 0);
    returns {property: adjusted share} (0 for a constant head or a single group; may be slightly
    negative). With few images a property's texts can outnumber them (the shapes bank has 176
    position texts): groups are at most n // 3 (``group_classes``: the most frequent classes, the
    rest pooled into one group), so each holds 3 images on average and the adjustment stays below
    1.5; from 528 images on (176 x 3) no toy grouping is pooled. ``zeroshot_variances`` does the same
    for several groupings of one head."""
    return zeroshot_variances(head, [classes])[0]


def group_classes(classes: np.ndarray, most: int) -> np.ndarray:
    """Group ids 0..k-1 [n] for class labels [n]: one group per class when there are at most
    ``most`` classes; else the ``most`` - 1 most frequent classes (ties: the smaller label) keep a
    group each and the rest share the last one."""
    values, g, counts = np.unique(np.asarray(classes).ravel(), return_inverse=True, return_counts=True)
    g = g.ravel()
    if len(values) <= max(most, 1):
        return g
    keep = np.lexsort((values, -counts))[:max(most - 1, 1)]              # by count, then label
    new = np.full(len(values), len(keep), dtype=np.int64)
    new[keep] = np.arange(len(keep))
    return new[g]


def zeroshot_groups(class_sets: list[Mapping[str, np.ndarray]], n: int) -> list[dict[str, tuple]]:
    """The groupings ``zeroshot_variances`` reads, for each class set and property: (group ids [n] as
    a torch tensor, their count k, images per group [k]) after ``group_classes`` (at most n // 3).
    They depend on the images only, so the label job makes them once for every head."""
    import torch
    out = []
    for classes in class_sets:
        groups = {}
        for p, g in classes.items():
            g = group_classes(g, n // 3)
            k = int(g.max()) + 1 if len(g) else 0
            groups[p] = (torch.from_numpy(g), k, torch.from_numpy(np.bincount(g, minlength=k)))
        out.append(groups)
    return out


def zeroshot_variances(head: np.ndarray, class_sets: list[Mapping[str, np.ndarray]],
                       groups: list[dict[str, tuple]] | None = None) -> list[dict[str, float]]:
    """``zeroshot_variance`` of one head for each of several groupings (the bank's tags and the
    shuffled draws); ``groups``: their ``zeroshot_groups``, made here when not given. The centred
    head [n, d] is first written in the basis of its row space (a class-token head's outputs span at
    most d_head dimensions: eigenvectors of X^T X above 1e-12 of the largest eigenvalue), which
    keeps every group sum and the total and makes each grouping cost n x rank instead of n x d (a
    ViT-B head: 64 against 512)."""
    import torch
    X = torch.from_numpy(np.asarray(head, np.float64))
    X = X - X.mean(0)                                                         # [n, d]
    n = len(X)
    total = float((X * X).sum())
    if total > 0 and X.shape[1] > 16:
        w, V = torch.linalg.eigh(X.T @ X)                                     # ascending, [d], [d, d]
        X = X @ V[:, w > w[-1] * 1e-12]                                       # [n, rank]
    outs = []
    for grouping in (groups if groups is not None else zeroshot_groups(class_sets, n)):
        out = {}
        for p, (g, k, sizes) in grouping.items():
            if total <= 0 or k < 2:
                out[p] = 0.0
                continue
            sums = torch.zeros(k, X.shape[1], dtype=torch.float64).index_add_(0, g, X)   # [k, rank]
            between = float(((sums * sums).sum(1) / sizes).sum())
            out[p] = 1.0 - (1.0 - between / total) * (n - 1) / (n - k)
        outs.append(out)
    return outs


def zeroshot_images(n: int, limit: int = OFFLINE_ZEROSHOT_IMAGES) -> np.ndarray:
    """Rows of the n images the zero-shot variances read: all of them up to ``limit``, else ``limit``
    evenly spaced ones (the share is a ratio of variances, which a few thousand images estimate
    well; the group sums cost n x d per head, property and tag set)."""
    if n <= limit:
        return np.arange(n)
    return np.linspace(0, n - 1, limit).round().astype(np.int64)


@dataclass(frozen=True)
class Label:
    """A head's label. ``property`` is a property of the vocabulary or 'mixed'; None with
    ``error`` set when the labeler gave no usable answer."""
    property: str | None
    confidence: float | None
    labeler: str                 # 'offline' | 'llm:<model>'
    prompt_hash: str
    raw: str | None
    error: str | None = None
    p_value: float | None = None  # offline labeler: chance of the winning share under shuffled tags


@dataclass(frozen=True)
class Judgment:
    """match(text, property) of MATH.md §5; ``associated`` None with ``error`` set on failure."""
    associated: bool | None
    judge: str                   # 'tag' | 'llm:<model>'
    prompt_hash: str
    raw: str | None
    error: str | None = None


class LLMError(ValueError):
    """The endpoint cannot be used at all (no key, key rejected, unknown model, keeps failing).

    A ValueError so that the CLI prints its message (what was wrong, what to do) without a
    traceback."""


def _sha(text: str, n: int = 16) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:n]


# --------------------------------------------------------------------------- vocabulary

_SYNONYMS = {                     # common names an LLM uses -> atlas property
    "colour": "colors", "hue": "colors", "geography": "locations", "place": "locations",
    "city": "locations", "country": "locations", "landmark": "locations", "wildlife": "animals",
    "object": "objects", "item": "objects", "pattern": "textures", "material": "materials",
    "art": "art styles", "artistic style": "art styles", "style": "art styles", "art medium": "art styles",
    "photo": "photography", "photographic technique": "photography", "camera": "photography",
    "environment": "weather", "nature": "weather", "scenery": "weather", "climate": "weather",
    "time": "time of day", "season": "time of day", "number": "counting", "count": "counting",
    "quantity": "counting", "letter": "letters", "text": "letters", "written text": "letters",
    "writing": "letters", "typography": "letters", "person": "people", "clothing": "people",
    "clothes": "people", "human": "people", "emotion": "emotions", "feeling": "emotions",
    "facial expression": "emotions", "mood": "emotions", "drink": "food", "vehicle": "vehicles",
    "transport": "vehicles", "transportation": "vehicles", "shape": "shapes", "geometry": "shapes",
    "size": "shapes", "position": "positions", "location in the image": "positions",
    "spatial position": "positions", "layout": "positions", "spatial layout": "positions",
    "none": MIXED, "various": MIXED, "multiple": MIXED, "unclear": MIXED, "entangled": MIXED,
}


def _canon(word: str) -> str:
    """Lower case, '_'/'-' as spaces, British 'colour', each word crudely singular."""
    s = re.sub(r"[_\-]+", " ", word.strip().strip(".!\"'`").lower())
    s = s.replace("colour", "color")
    words = []
    for w in s.split():
        if w.endswith("ies") and len(w) > 4:
            w = w[:-3] + "y"
        elif w.endswith(("ches", "shes", "xes", "sses")):
            w = w[:-2]
        elif w.endswith("s") and not w.endswith("ss") and len(w) > 3:
            w = w[:-1]
        words.append(w)
    return " ".join(words)


def normalise_property(answer: str, vocabulary: Iterable[str]) -> str | None:
    """Map an answer ('Colour', 'ANIMAL', 'art_styles', 'geography') onto the vocabulary or
    'mixed'; None when it names nothing the vocabulary knows."""
    vocab = list(vocabulary)
    table = {_canon(p): p for p in vocab}
    table[_canon(MIXED)] = MIXED
    for synonym, target in _SYNONYMS.items():
        if target in vocab or target == MIXED:
            table.setdefault(_canon(synonym), target)
    return table.get(_canon(str(answer)))


# --------------------------------------------------------------------------- offline

class OfflineLabeler:
    """Label = the property tag carrying the largest share of the head's variance, when the
    evidence beats chance (MATH.md §4; docs/text.md says why).

    offline-v8 (``zeroshot``, when ``label`` gets the head's zero-shot variances). For each
    property p, the images are grouped by the model's zero-shot choice among p's bank texts
    (``zeroshot_classes``) and e_p is the share of the head's variance between the groups, adjusted
    for their number (``zeroshot_variance``). The head gets the property with the largest e_p when
    e_p >= ``zeroshot_min``, e_p >= ``zeroshot_ratio`` x every other property's e, and one of its
    TextSpan texts carries the tag; otherwise 'mixed' (``zeroshot_choice``). The property's texts
    are read jointly, through the model's own choice among them, so neither the sign of one text's
    agreement nor the share of z that one head makes up (the small toys) matters; a common driver
    (a random-init model: every property at 0.8-0.95) gives no property that stands out. The
    confidence is the share of the head's TextSpan variance in its texts of that property, with the
    shuffled-tag p-value below. Without zero-shot variances, the v7 rule that follows decides (its
    label is recorded in raw ``v7`` either way).

    v7's rule:

    Evidence. A text votes for its tag p only when the rest of the model reads it as the head
    does: ``HeadText.agreement`` a (``model_agreement``, a correlation over the images) >=
    ``agreement_min`` with one-sided p-value ``agreement_p`` <= ``agreement_p_max``; unchecked
    texts (agreement None) vote as they are. With ``symmetric`` (v6, v7), a must also beat the
    strongest disagreement among the head's texts of *other* properties: a text that the rest of
    the model reads opposite to the head with strength s makes agreements below s no evidence.
    Reading a text opposite is as surprising as reading it alike; where both happen strongly, the
    head and the rest follow a common driver with arbitrary sign (a random-init model's heads and
    the rest all follow the pixel statistics: its heads' texts reach -0.59 to -0.99, against -0.51
    at worst for trained CLS toys' heads on the tuning worlds), and an agreement there says
    nothing. (v6 took the floor over all texts, the property's own included.)
    With ``inverted`` (v7), a text read opposite (-a >= ``agreement_min``, p of -a within
    ``agreement_p_max``) also votes for its property when -a beats every other property's |a| and
    the property already has a vote read alike: a head may write a property's direction with the
    sign reversed (the SigLIP-style toy's background heads: "on white" at -0.56, "on grass" at
    +0.29), but a reversed reading alone creates no label (a random-init head reads all its
    counting texts at -0.5 to -0.97). Untagged texts, tags outside the vocabulary and texts that
    vote for nothing count in the total, so they pull a head towards 'mixed'.

    Decision. A voting text's evidence is its variance, times |a| with ``weighted`` (v7: how
    strongly the rest of the model shares the reading; unchecked texts count 1). The winning
    property has the most evidence (ties: the better-ranked text's). s* = its voting texts' share
    of the head's k TextSpan variances, the confidence; m = its share of the evidence of all
    voting texts (the majority among what the model agrees with). The head is labelled when at
    least ``min_votes`` texts vote for the property (one text is no agreement), s* >=
    ``threshold`` and m >= ``majority``; otherwise 'mixed'.

    Chance of the share. With ``bank_tags``, s* is also compared with a null in which the tags
    are shuffled over the bank: the head's k texts keep their variances and checks, but take
    the tags of k texts drawn without replacement from the bank, ``permutations`` times
    (seeded). p = (1 + #{null max share >= s*}) / (1 + N) is recorded; ``alpha`` < 1 also
    requires p <= alpha (default 1: recorded only).
    """

    name = "offline"
    judge_name = "tag"

    def __init__(self, vocabulary: Iterable[str] = tuple(PROPERTIES), threshold: float = OFFLINE_THRESHOLD,
                 bank_tags: Iterable[str | None] | None = None, alpha: float = OFFLINE_ALPHA,
                 permutations: int = OFFLINE_PERMUTATIONS, seed: int = 0,
                 agreement_min: float = OFFLINE_AGREEMENT, agreement_p_max: float = OFFLINE_AGREEMENT_P,
                 min_votes: int = OFFLINE_MIN_VOTES, majority: float = OFFLINE_MAJORITY,
                 symmetric: bool = OFFLINE_SYMMETRIC, inverted: bool = OFFLINE_INVERTED,
                 weighted: bool = OFFLINE_WEIGHTED, zeroshot: bool = OFFLINE_ZEROSHOT,
                 zeroshot_min: float = OFFLINE_ZEROSHOT_MIN, zeroshot_ratio: float = OFFLINE_ZEROSHOT_RATIO):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"the offline threshold is a share of variance in (0, 1], got {threshold}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"the significance level alpha must be in (0, 1], got {alpha}")
        if permutations < 1:
            raise ValueError(f"permutations must be at least 1, got {permutations}")
        if min_votes < 1:
            raise ValueError(f"min_votes must be at least 1, got {min_votes}")
        if not 0.0 <= majority <= 1.0:
            raise ValueError(f"the majority is a share of the voting texts' variance in [0, 1], got {majority}")
        if not 0.0 < zeroshot_min <= 1.0:
            raise ValueError(f"zeroshot_min is a share of the head's variance in (0, 1], got {zeroshot_min}")
        if zeroshot_ratio < 1.0:
            raise ValueError(f"zeroshot_ratio must be at least 1, got {zeroshot_ratio}")
        self.zeroshot = bool(zeroshot)
        self.zeroshot_min = float(zeroshot_min)
        self.zeroshot_ratio = float(zeroshot_ratio)
        self.majority = float(majority)
        self.vocabulary = list(vocabulary)
        self.threshold = float(threshold)
        self.alpha = float(alpha)
        self.permutations = int(permutations)
        self.seed = int(seed)
        self.agreement_min = float(agreement_min)
        self.agreement_p_max = float(agreement_p_max)
        self.min_votes = int(min_votes)
        self.symmetric = bool(symmetric)
        self.inverted = bool(inverted)
        self.weighted = bool(weighted)
        self._codes = {p: i for i, p in enumerate(self.vocabulary)}
        self._bank = None
        if bank_tags is not None:
            self._bank = np.array([self._codes.get(t, -1) for t in bank_tags], dtype=np.int64)   # [M]
            if len(self._bank) == 0:
                raise ValueError("bank_tags is empty: give the tags of the bank the head's texts come from")
        self._draws: dict[int, np.ndarray] = {}
        null = f";alpha={self.alpha};n={self.permutations};seed={self.seed}" if self._bank is not None else ""
        self.prompt_hash = _sha(f"{OFFLINE_VERSION};threshold={self.threshold};agreement={self.agreement_min};"
                                f"p={self.agreement_p_max};votes={self.min_votes};majority={self.majority}"
                                f"{';symmetric' if self.symmetric else ''}{';inverted' if self.inverted else ''}"
                                f"{';weighted' if self.weighted else ''}{null}"
                                + (f";zeroshot={self.zeroshot_min}x{self.zeroshot_ratio}" if self.zeroshot else ""))

    def _null_tags(self, k: int) -> np.ndarray:
        """int [N, k]: tag codes of k bank texts drawn without replacement, N times (cached)."""
        if k not in self._draws:
            rng = np.random.default_rng([self.seed, k])
            M = len(self._bank)
            if k > M:
                raise ValueError(f"the head has {k} texts but the bank only {M}")
            keys = rng.random((self.permutations, M))
            self._draws[k] = self._bank[np.argpartition(keys, k - 1, axis=1)[:, :k]]
        return self._draws[k]

    def disagreement(self, head_texts: list[HeadText], tag: str | None = None) -> float:
        """The strongest disagreement: max(0, -min agreement) over the checked texts whose tag is not
        ``tag`` (None: all texts); 0 when none is checked, or without ``symmetric``."""
        checked = [ht.agreement for ht in head_texts if ht.agreement is not None and (tag is None or ht.tag != tag)]
        return max(0.0, -min(checked)) if checked and self.symmetric else 0.0

    def votes(self, ht: HeadText, floor: float = 0.0) -> bool:
        """Does this text vote for its tag as read alike (passed the model-agreement check, or
        unchecked)? ``floor``: the strongest disagreement of the other properties' texts
        (``disagreement``), which a voting agreement must beat."""
        return ht.agreement is None or (ht.agreement >= self.agreement_min and ht.agreement > floor and
                                        (ht.agreement_p is None or ht.agreement_p <= self.agreement_p_max))

    def votes_inverted(self, ht: HeadText, reach: float) -> bool:
        """Is this text read opposite to the head strongly enough to back its tag (``inverted``)?
        ``reach``: the largest |agreement| of the other properties' texts, which -a must beat. The
        one-sided p of -a is 1 - p of a (Fisher z is odd in the correlation)."""
        return (self.inverted and ht.agreement is not None and -ht.agreement >= self.agreement_min
                and -ht.agreement > reach and (ht.agreement_p is None or 1.0 - ht.agreement_p <= self.agreement_p_max))

    def voting(self, head_texts: list[HeadText]) -> list[bool]:
        """Which of the head's texts vote for their tag (bool per text, in order): read alike above
        the other properties' strongest disagreement, or (``inverted``) read opposite above every
        other property's |agreement| when the property has a vote read alike."""
        out = [False] * len(head_texts)
        for tag in {ht.tag for ht in head_texts if ht.tag in self.vocabulary}:
            mine = [i for i, ht in enumerate(head_texts) if ht.tag == tag]
            floor = self.disagreement(head_texts, tag)
            alike = {i for i in mine if self.votes(head_texts[i], floor)}
            if not alike:
                continue
            others = [abs(ht.agreement) for ht in head_texts if ht.agreement is not None and ht.tag != tag]
            reach = max(others, default=0.0)
            for i in mine:
                out[i] = i in alike or self.votes_inverted(head_texts[i], reach)
        return out

    def evidence(self, ht: HeadText) -> float:
        """A voting text's evidence: its variance (>= 0), times |agreement| with ``weighted``."""
        w = max(float(ht.variance), 0.0)
        return w * abs(ht.agreement) if self.weighted and ht.agreement is not None else w

    def p_value(self, weights: np.ndarray, share: float, voting: np.ndarray | None = None) -> float:
        """P(null max share >= share) for texts of these variance weights [k], of which only
        ``voting`` (bool [k], default all) vote (see class doc)."""
        codes = self._null_tags(len(weights))                                       # [N, k]
        w = weights / weights.sum()
        if voting is not None:
            w = w * voting
        P = len(self.vocabulary)
        onehot = codes[:, :, None] == np.arange(P)[None, None, :]                   # [N, k, P]
        null = (onehot * w[None, :, None]).sum(1).max(1)                            # [N]
        return float((1 + np.count_nonzero(null >= share - 1e-12)) / (1 + len(null)))

    def zeroshot_choice(self, zeroshot: Mapping[str, float], head_texts: list[HeadText]) -> tuple[str, dict]:
        """offline-v8's decision from the zero-shot variances (``zeroshot_variance``): the property
        whose zero-shot reading explains the most of the head's variance, when that is at least
        ``zeroshot_min``, at least ``zeroshot_ratio`` times any other property's, and at least one of
        the head's TextSpan texts is tagged with it; else 'mixed'. Returns (label, details for raw)."""
        e = {p: float(v) for p, v in zeroshot.items() if p in self._codes}
        ranked = sorted(e, key=lambda p: (-e[p], self._codes[p]))
        if not ranked:
            return MIXED, {}
        best = ranked[0]
        second = e[ranked[1]] if len(ranked) > 1 else 0.0
        named = any(ht.tag == best for ht in head_texts)
        ok = e[best] >= self.zeroshot_min and e[best] >= self.zeroshot_ratio * max(second, 0.0) and named
        return (best if ok else MIXED), {"zeroshot": {p: round(e[p], 4) for p in ranked}, "zeroshot_best": best,
                                         "zeroshot_ratio": round(e[best] / second, 4) if second > 0 else None,
                                         "zeroshot_named": named}

    def label(self, head_texts: list[HeadText], zeroshot: Mapping[str, float] | None = None) -> Label:
        """The head's label from its TextSpan texts (rank order). ``zeroshot``: the head's
        ``zeroshot_variance`` ({property: share}); with it (and ``zeroshot`` on), offline-v8 decides
        (``zeroshot_choice``) and v7's votes are recorded beside; without it, v7's rule."""
        if not head_texts:
            return Label(None, None, self.name, self.prompt_hash, None, "the head has no TextSpan texts")
        if self.zeroshot and zeroshot:
            return self._label_zeroshot(head_texts, zeroshot)
        return self._label_votes(head_texts)

    def _label_votes(self, head_texts: list[HeadText]) -> Label:
        """v7's rule (the class doc): the evidence-weighted majority of the voting texts."""
        weight: dict[str, float] = defaultdict(float)      # voting variance per property (s*)
        proof: dict[str, float] = defaultdict(float)       # voting evidence per property (winner, m)
        n_votes: dict[str, int] = defaultdict(int)
        first_rank: dict[str, int] = {}
        variances = [max(float(ht.variance), 0.0) for ht in head_texts]
        total = sum(variances)
        voting = self.voting(head_texts)
        for rank, (ht, v) in enumerate(zip(head_texts, voting)):
            if v:
                weight[ht.tag] += variances[rank]
                proof[ht.tag] += self.evidence(ht)
                n_votes[ht.tag] += 1
                first_rank.setdefault(ht.tag, rank)
        shares = {p: (w / total if total > 0 else 0.0) for p, w in weight.items()}
        raw = {"version": OFFLINE_VERSION_V7, "threshold": self.threshold,
               "shares": dict(sorted(shares.items(), key=lambda kv: -kv[1]))}
        if any(ht.agreement is not None for ht in head_texts):
            raw.update(agreement_min=self.agreement_min, disagreement=round(self.disagreement(head_texts), 4),
                       agreement=[None if ht.agreement is None else round(float(ht.agreement), 4)
                                  for ht in head_texts],
                       voting=[bool(v) for v in voting])
        if not shares:                     # nothing votes: s* = 0, which every null draw reaches
            return Label(MIXED, 0.0, self.name, self.prompt_hash, json.dumps(raw),
                         p_value=1.0 if self._bank is not None else None)
        best = min(shares, key=lambda p: (-proof[p], first_rank[p]))
        share = shares[best]
        p = None
        if self._bank is not None and total > 0:
            p = self.p_value(np.array(variances), share, np.array(voting))
            raw.update(alpha=self.alpha, p_value=p)
        majority = proof[best] / sum(proof.values()) if sum(proof.values()) > 0 else 0.0
        raw.update(votes=n_votes[best], min_votes=self.min_votes, majority=round(majority, 4),
                   majority_min=self.majority)
        labelled = (n_votes[best] >= self.min_votes and share >= self.threshold and majority >= self.majority
                    and (p is None or p <= self.alpha))
        return Label(best if labelled else MIXED, share, self.name, self.prompt_hash, json.dumps(raw), p_value=p)

    def _label_zeroshot(self, head_texts: list[HeadText], zeroshot: Mapping[str, float]) -> Label:
        """offline-v8 (see the class doc): the label is ``zeroshot_choice``'s; the confidence s* is
        the share of the head's TextSpan variance in its texts tagged with the label (or, for
        'mixed', with the best zero-shot property), with the shuffled-tag p-value of that share
        (``alpha`` < 1 requires it); v7's votes are kept in raw (``v7``) for comparison."""
        choice, details = self.zeroshot_choice(zeroshot, head_texts)
        variances = [max(float(ht.variance), 0.0) for ht in head_texts]
        total = sum(variances)
        target = choice if choice != MIXED else details.get("zeroshot_best")
        mine = [ht.tag == target for ht in head_texts]
        share = sum(v for v, m in zip(variances, mine) if m) / total if total > 0 else 0.0
        v7 = self._label_votes(head_texts)
        raw = {"version": OFFLINE_VERSION, "zeroshot_min": self.zeroshot_min, "zeroshot_ratio_min": self.zeroshot_ratio,
               **details, "share": round(share, 4), "v7": {"property": v7.property, **json.loads(v7.raw or "{}")}}
        p = None
        if self._bank is not None and total > 0 and share > 0:
            p = self.p_value(np.array(variances), share, np.array(mine))
            raw.update(alpha=self.alpha, p_value=p)
        labelled = choice != MIXED and (p is None or p <= self.alpha)
        return Label(choice if labelled else MIXED, share, self.name, self.prompt_hash, json.dumps(raw), p_value=p)

    def match(self, head_text: HeadText, prop: str) -> Judgment:
        return Judgment(head_text.tag is not None and head_text.tag == prop, self.judge_name,
                        self.prompt_hash, head_text.tag)


# --------------------------------------------------------------------------- LLM

_LABEL_SYSTEM = """You label attention heads of a CLIP image model. Each head is described by \
the short image descriptions that explain most of its output, most important first. Answer \
with the one property most of them express, chosen from this list:
{properties}
Answer "mixed" when no single property covers most of the descriptions.
Reply with JSON only, no other text: {{"property": "<one property from the list or mixed>", \
"confidence": <a number from 0 to 1>}}"""

_LABEL_EXAMPLES = [
    (["a vivid red color", "shades of blue", "the color yellow", "a photo taken in Paris", "a lime green hue"],
     "colors", 0.9),
    (["an image of a tiger", "a parrot", "an image of a whale", "a kitten", "made of wood"], "animals", 0.85),
    (["five objects", "a group of three", "exactly seven of them", "a pair", "twelve items"], "counting", 0.95),
    (["the letter Q", "a snowy day", "an image of a chair", "at dusk", "a woven texture"], MIXED, 0.3),
]

_JUDGE_SYSTEM = """You check whether a short image description expresses a given property of \
images ({properties}). Reply with JSON only: {{"associated": 1}} if the description is \
associated with the property, {{"associated": 0}} if not."""

_JUDGE_EXAMPLES = [("a vivid red color", "colors", 1), ("an image of a tiger", "colors", 0),
                   ("a photo taken in Paris", "locations", 1), ("five objects", "animals", 0)]


def _texts_block(texts: list[str]) -> str:
    return "Descriptions:\n" + "\n".join(f"- {t}" for t in texts)


def _parse_json_object(raw: str) -> dict:
    """The first JSON object in an answer (code fences and chatter around it tolerated)."""
    text = re.sub(r"^```(?:json)?|```$", "", raw.strip(), flags=re.M).strip()
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        raise ValueError("the answer holds no JSON object")
    obj = json.loads(text[start:end + 1])
    if not isinstance(obj, dict):
        raise ValueError("the answer is JSON but not an object")
    return obj


def _confidence(value) -> float | None:
    """A confidence in [0, 1] from 0.8, "0.8" or 80 (percent); None when absent or not a number."""
    if value is None or isinstance(value, bool):
        return None
    try:
        c = float(value)
    except (TypeError, ValueError):
        return None
    if c != c:                                           # NaN
        return None
    return min(1.0, max(0.0, c / 100.0 if 1.0 < c <= 100.0 else c))


def default_cache_dir() -> Path:
    """``$ATLAS_HOME/cache/llm`` (ATLAS_HOME defaults to ./var)."""
    from warehouse import atlas_home
    return atlas_home() / "cache" / "llm"


MAX_ANSWER_BYTES = 4 * 2**20
KEY_PREFIX_MIN = 8          # any echo of 8 or more leading characters of the key is redacted


_SEP = r"[\W_]{0,3}"        # what a spaced echo puts between two characters of the key: spaces, dashes, dots


def _spaced(chars: str, min_len: int) -> str:
    """A pattern for ``chars`` with up to 3 separator characters between any two of them, matching
    its first ``min_len`` characters or more (as many as the text holds)."""
    parts = [re.escape(c) for c in chars]
    min_len = min(min_len, len(parts))
    tail = parts[min_len:]
    return _SEP.join(parts[:min_len]) + "".join(f"(?:{_SEP}{p}" for p in tail) + ")?" * len(tail)


def redact(text: str | None, key: str | None) -> str | None:
    """``text`` with every echo of ``key`` replaced by ``***``, in any letter case: the key itself,
    reversed, or in hex (of its UTF-8 bytes), each also spaced out (up to 3 spaces, dashes or other
    separators between characters) and each also truncated (a run of its first ``KEY_PREFIX_MIN`` or
    more characters; 2 x that many hex digits); and its base64 forms (plain, URL-safe, unpadded, and
    of ``:key`` as HTTP Basic auth would send it)."""
    import base64
    if not text or not key:
        return text
    forms = {key}
    for raw in (key.encode(), b":" + key.encode()):
        for enc in (base64.b64encode(raw), base64.urlsafe_b64encode(raw)):
            forms |= {enc.decode(), enc.decode().rstrip("=")}
    for form in sorted(forms, key=len, reverse=True):
        text = re.sub(re.escape(form), "***", text, flags=re.IGNORECASE)
    for chars, min_len in ((key, KEY_PREFIX_MIN), (key[::-1], KEY_PREFIX_MIN),
                           (key.encode().hex(), 2 * KEY_PREFIX_MIN)):
        text = re.sub(_spaced(chars, min_len), "***", text, flags=re.IGNORECASE)
    return text


class LLMLabeler:
    """Labels and judgments from an OpenAI-compatible chat model, cached on disk.

    model:      the model name the endpoint knows (``--llm-model``)
    api_key:    default ``$OPENAI_API_KEY``; base_url: default ``$OPENAI_BASE_URL`` (else OpenAI)
    timeout_s:  wall-clock seconds per attempt (connecting, headers and the whole answer), enforced
                outside the HTTP client (etl.deadline);
                max_retries: further attempts after a 429 / 5xx / timeout /
                dropped connection, waiting the server's Retry-After or else
                backoff_s * 2**attempt, at most max_backoff_s each time
    """

    def __init__(self, model: str, vocabulary: Mapping[str, str] | None = None, *, api_key: str | None = None,
                 base_url: str | None = None, cache_dir: str | os.PathLike | None = None,
                 timeout_s: float = 60.0, max_retries: int = 5, backoff_s: float = 1.0,
                 max_backoff_s: float = 30.0):
        if not model:
            raise ValueError("the LLM labeler needs a model name: pass --llm-model (e.g. gpt-4o-mini)")
        self.model = model
        self.name = self.judge_name = f"llm:{model}"
        self.vocabulary = dict(vocabulary if vocabulary is not None else PROPERTIES)
        self._api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.base_url = base_url if base_url is not None else (os.environ.get("OPENAI_BASE_URL") or None)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.timeout_s, self.max_retries = float(timeout_s), int(max_retries)
        self.backoff_s, self.max_backoff_s = float(backoff_s), float(max_backoff_s)
        self._client = None
        self.requests = 0                      # HTTP attempts made (cache hits make none)
        self._label_prefix = self._label_messages_prefix()
        self._judge_prefix = self._judge_messages_prefix()
        self.prompt_hash = _sha(json.dumps(self._label_prefix, sort_keys=True))
        self.judge_prompt_hash = _sha(json.dumps(self._judge_prefix, sort_keys=True))

    # ----- prompts

    def _properties_list(self) -> str:
        return "\n".join(f"- {p}: {d}" if d else f"- {p}" for p, d in self.vocabulary.items())

    def _label_messages_prefix(self) -> list[dict]:
        msgs = [{"role": "system", "content": _LABEL_SYSTEM.format(properties=self._properties_list())}]
        for texts, prop, conf in _LABEL_EXAMPLES:
            if prop == MIXED or prop in self.vocabulary:
                msgs.append({"role": "user", "content": _texts_block(texts)})
                msgs.append({"role": "assistant", "content": json.dumps({"property": prop, "confidence": conf})})
        return msgs

    def _judge_messages_prefix(self) -> list[dict]:
        msgs = [{"role": "system", "content": _JUDGE_SYSTEM.format(properties=", ".join(self.vocabulary))}]
        for text, prop, yes in _JUDGE_EXAMPLES:
            if prop in self.vocabulary:
                msgs.append({"role": "user", "content": f"Description: {text}\nProperty: {prop}"})
                msgs.append({"role": "assistant", "content": json.dumps({"associated": yes})})
        return msgs

    # ----- the two questions

    def label(self, head_texts: list[HeadText]) -> Label:
        if not head_texts:
            return Label(None, None, self.name, self.prompt_hash, None, "the head has no TextSpan texts")
        messages = self._label_prefix + [{"role": "user", "content": _texts_block([h.text for h in head_texts])}]
        raw = self._ask(messages)
        try:
            obj = _parse_json_object(raw)
            answer = obj.get("property")
            if not isinstance(answer, str) or not answer.strip():
                raise ValueError('the JSON has no "property" string')
            prop = normalise_property(answer, self.vocabulary)
            if prop is None:
                raise ValueError(f"property {answer!r} is not in the vocabulary "
                                 f"({', '.join(self.vocabulary)}, or {MIXED})")
            conf = _confidence(obj.get("confidence"))
        except ValueError as exc:                       # json.JSONDecodeError is a ValueError
            return Label(None, None, self.name, self.prompt_hash, raw, f"unusable LLM answer: {exc}")
        self._store(messages, raw)
        return Label(prop, conf, self.name, self.prompt_hash, raw)

    def match(self, head_text: HeadText, prop: str) -> Judgment:
        messages = self._judge_prefix + [{"role": "user", "content": f"Description: {head_text.text}\nProperty: {prop}"}]
        raw = self._ask(messages)
        try:
            value = _parse_json_object(raw).get("associated")
            if value in (1, 0, True, False, "1", "0"):
                associated = value in (1, True, "1")
            else:
                raise ValueError(f'"associated" must be 1 or 0, got {value!r}')
        except ValueError as exc:
            return Judgment(None, self.judge_name, self.judge_prompt_hash, raw, f"unusable LLM answer: {exc}")
        self._store(messages, raw)
        return Judgment(associated, self.judge_name, self.judge_prompt_hash, raw)

    # ----- transport: cache, retries, key hygiene

    def _cache_path(self, messages: list[dict]) -> Path:
        key = _sha(json.dumps({"model": self.model, "messages": messages}, sort_keys=True), 40)
        return self.cache_dir / f"{key}.json"

    def _ask(self, messages: list[dict]) -> str:
        """The raw answer to ``messages``: from the cache, else from the endpoint."""
        path = self._cache_path(messages)
        if path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8"))["raw"]
            except (OSError, ValueError, KeyError):
                pass                                         # a damaged entry is asked again
        return self._scrub(self._request(messages))

    def _store(self, messages: list[dict], raw: str) -> None:
        """Cache a valid answer (invalid ones are asked again on the next run)."""
        path = self._cache_path(messages)
        if path.is_file():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"model": self.model, "base_url": self.base_url, "messages": messages,
                                   "raw": raw}, indent=1), encoding="utf-8")
        os.replace(tmp, path)

    def _scrub(self, text: str) -> str:
        return redact(text, self._api_key)

    def _client_or_fail(self):
        if self._client is None:
            if not self._api_key:
                raise LLMError("The LLM labeler needs OPENAI_API_KEY (any non-empty value for a local endpoint "
                               "that takes none) and, for an endpoint other than OpenAI, OPENAI_BASE_URL; "
                               "or use --labeler offline.")
            self._client = openai.OpenAI(api_key=self._api_key, base_url=self.base_url,
                                         timeout=self.timeout_s, max_retries=0)
        return self._client

    def _request(self, messages: list[dict]) -> str:
        """The answer, in at most ``max_retries + 1`` attempts of at most ``timeout_s`` wall-clock seconds
        each (etl.deadline: enforced outside the HTTP client, so connecting, headers, body and the
        client's own logic all count), with waits of at most ``max_backoff_s`` between them."""
        where = self.base_url or "the OpenAI API"
        for attempt in range(self.max_retries + 1):
            client = self._client_or_fail()
            self.requests += 1
            try:
                return call_with_deadline(lambda: self._answer(client, messages, where), self.timeout_s)
            except (DeadlineExceeded, openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError,
                    openai.APIConnectionError) as exc:
                if isinstance(exc, DeadlineExceeded):
                    self._client = None          # cut mid-request: the next attempt gets a fresh connection
                    said = f"no complete answer within --llm-timeout {self.timeout_s:g} s"
                else:
                    said = f"{type(exc).__name__}: {self._scrub(str(exc))}"
                if attempt == self.max_retries:
                    raise LLMError(f"{where} kept failing after {attempt + 1} attempts "
                                   f"(last: {said}). Check the endpoint "
                                   f"and try again later; answers so far are cached.") from None
                time.sleep(self._wait(attempt, exc))
            except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
                raise LLMError(f"{where} rejected the API key ({self._scrub(str(exc))}). "
                               "Check OPENAI_API_KEY and OPENAI_BASE_URL.") from None
            except openai.NotFoundError as exc:
                raise LLMError(f"{where} does not know model {self.model!r} or the URL is wrong "
                               f"({self._scrub(str(exc))}). Check --llm-model and OPENAI_BASE_URL "
                               "(it usually ends in /v1).") from None
            except openai.APIStatusError as exc:
                raise LLMError(f"{where} refused the request with HTTP {exc.status_code}: "
                               f"{self._scrub(str(exc))}") from None
        raise AssertionError("unreachable")

    def _answer(self, client, messages: list[dict], where: str) -> str:
        """One request (the caller bounds its wall-clock time), its body parsed here so that a body
        that is not a chat completion gets a message instead of a JSON traceback."""
        with client.chat.completions.with_streaming_response.create(
                model=self.model, messages=messages, temperature=0) as response:
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > MAX_ANSWER_BYTES:
                    raise LLMError(f"{where} sent more than {MAX_ANSWER_BYTES // 2**20} MB for one answer; "
                                   "check OPENAI_BASE_URL")
        try:
            obj = json.loads(bytes(body))
            choices = obj["choices"]
            content = choices[0]["message"]["content"] if choices else None
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            head = self._scrub(bytes(body[:120]).decode("utf-8", "replace"))
            raise LLMError(f"{where} answered HTTP {response.status_code} with a body that is not a chat "
                           f"completion (it starts {head!r}); check OPENAI_BASE_URL (it usually ends in /v1) "
                           "and that the server speaks the OpenAI chat API") from None
        return content or ""

    def _wait(self, attempt: int, exc: Exception) -> float:
        """Seconds to wait before the next attempt: the server's Retry-After (seconds) when it
        sends one, else backoff_s * 2**attempt with jitter; never more than max_backoff_s."""
        response = getattr(exc, "response", None)
        try:
            wait = float(response.headers["retry-after"])
        except (AttributeError, KeyError, TypeError, ValueError):
            wait = self.backoff_s * 2 ** attempt * random.uniform(0.8, 1.0)
        return min(self.max_backoff_s, max(0.0, wait))


# --------------------------------------------------------------------------- inputs from the warehouse

def vocabulary(path: str) -> dict[str, str]:
    """The warehouse's property vocabulary {property: description}; a ValueError when it is empty."""
    from warehouse.queries import property_vocabulary
    vocab = property_vocabulary(path)
    if not vocab:
        raise ValueError("the warehouse has no properties yet: run `python -m etl texts` first")
    return vocab


def stored_head_texts(path: str, model_id: str) -> dict[tuple[int, int], list[tuple[str, HeadText]]]:
    """{(layer, head): [(text_id, HeadText)]} in TextSpan rank order, for the model's heads with texts."""
    from warehouse.queries import head_text_items
    return {head: [(tid, HeadText(text, tag, var)) for tid, text, tag, var in items]
            for head, items in head_text_items(path, model_id).items()}
