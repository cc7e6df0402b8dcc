"""The size study (MATH.md §11): are larger models more interpretable, and by which definition?

Pure functions over the per-model scores (`model_measures`, one value per model and world):

    size_of(source, layers, width, pooling)   a model's size group, from its image tower (not its name)
    summarise_sizes(rows)              per size: mean over model seeds, 95 % t interval over them
    trend(log_params, values)          least-squares slope per tenfold of image-tower parameters,
                                       its 95 % t interval, and a two-sided permutation p
    verdict(definition, fit)           one sentence, stated whichever way it goes
    markdown_table(...)                the table `python -m etl study` prints

Each model's value is the mean of its values on the study's worlds, so a model counts once; the
random-init control is shown beside the sizes but kept out of the trend (it is no size of a
trained model). So is a trained model whose tower pools otherwise than the zoo's class token (the
SigLIP-style toy: '6 x 128, map pool'): it is the study's architecture axis, compared with the
class-token models of its size, not a point on their size trend.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Definition:
    score: str          # a score of model_measures
    direction: int      # +1: higher is more interpretable; -1: lower is
    meaning: str        # what "more interpretable" means by this score


DEFINITIONS = (
    Definition("kappa", +1, "labels agree with the known factors beyond chance (Cohen's kappa over all heads)"),
    Definition("kappa_texts", +1, "a head's TextSpan texts alone name its factor (kappa of the text-vote "
                                  "labeler, offline-v7: the paper's route from texts to a label)"),
    Definition("paper_association", +1, "a head's texts agree with its label (the paper's association, as read)"),
    Definition("paper_entanglement", -1, "few heads repeat another head's property (the paper's entanglement, "
                                         "as read)"),
    Definition("informativeness", +1, "each factor can be read from one head (the best head's information)"),
    Definition("dci_d", +1, "each head serves one factor (DCI disentanglement)"),
    Definition("dci_c", +1, "each factor lives in one head (DCI completeness)"),
    Definition("dci_i", +1, "the heads together predict the factors (DCI informativeness)"),
    Definition("mig", +1, "each factor's best head stands out from the next (MIG)"),
)
# reported beside the definitions: how the labels fare against their baselines
REPORTED = ("kappa_margin_shuffled", "kappa_margin_constant", "wrong_rate", "invented_rate")
SCORES = tuple(d.score for d in DEFINITIONS) + REPORTED
RANDOM = "random init"
PERMUTATIONS = 20_000          # random permutations when n! is larger than this
EXACT_UP_TO = 8                # n <= 8 models: every permutation (8! = 40,320)

# two-sided 95 % quantiles of Student's t, df = 1..30 (then the normal's)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom (1.96 past 30); NaN for df < 1."""
    return float("nan") if df < 1 else (_T975[df - 1] if df <= len(_T975) else 1.96)


def size_of(source: str, layers: int, width: int, pooling: str = "tok") -> str:
    """The size group of a model: '<layers> x <width>' of its image tower, with ', <pooling> pool' when
    it does not pool by class token (models.pooling: 'map', 'avg', ...); RANDOM for a random-init one."""
    if source == "random":
        return RANDOM
    return f"{int(layers)} x {int(width)}" + ("" if pooling in (None, "tok") else f", {pooling} pool")


def in_trend(size: str) -> bool:
    """Does a size group count in the size trend? The class-token sizes of trained models do; the
    random control and other architectures are shown beside them."""
    return size != RANDOM and "pool" not in size


def mean_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean of ``values`` and its 95 % t interval; lo = hi = NaN for one value."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    if not len(v):
        return float("nan"), float("nan"), float("nan")
    m = float(v.mean())
    if len(v) < 2:
        return m, float("nan"), float("nan")
    half = t975(len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return m, m - half, m + half


def per_model(rows: Sequence[dict]) -> dict[tuple[str, str], dict]:
    """rows (model_id, size, image_params, score, value) over worlds -> {(model_id, score): {size,
    image_params, value = the mean over the model's worlds, worlds = how many}}."""
    acc: dict[tuple[str, str], dict] = {}
    for r in rows:
        if r["value"] is None or not np.isfinite(r["value"]):
            continue
        a = acc.setdefault((r["model_id"], r["score"]), dict(size=r["size"], image_params=r["image_params"], v=[]))
        a["v"].append(float(r["value"]))
    return {k: dict(size=a["size"], image_params=a["image_params"], value=float(np.mean(a["v"])), worlds=len(a["v"]))
            for k, a in acc.items()}


# the range each score can take (the t interval is clipped to it); every other score lies in [0, 1]
RANGES = {"kappa": (-1.0, 1.0), "kappa_texts": (-1.0, 1.0), "kappa_margin_shuffled": (-2.0, 2.0), "kappa_margin_constant": (-1.0, 1.0),
          "dci_i": (-1.0, 1.0)}


def summarise_sizes(models: dict[tuple[str, str], dict]) -> list[dict]:
    """Per (size, score): n_models, mean, lo, hi over the model seeds (``per_model``'s output; the
    interval clipped to the score's range, RANGES); image_params is the size's parameter count (None
    if its models differ)."""
    groups: dict[tuple[str, str], list] = {}
    for (model_id, score), m in models.items():
        groups.setdefault((m["size"], score), []).append(m)
    out = []
    for (size, score), ms in sorted(groups.items()):
        mean, lo, hi = mean_interval([m["value"] for m in ms])
        a, b = RANGES.get(score, (0.0, 1.0))
        lo, hi = (max(lo, a), min(hi, b)) if np.isfinite(lo) else (lo, hi)
        params = {m["image_params"] for m in ms}
        out.append(dict(size=size, score=score, n_models=len(ms), mean=mean, lo=lo, hi=hi,
                        image_params=params.pop() if len(params) == 1 else None))
    return out


@dataclass(frozen=True)
class Fit:
    n: int              # models
    n_sizes: int        # distinct sizes among them
    slope: float        # per tenfold of image-tower parameters
    lo: float
    hi: float
    p_value: float      # two-sided permutation p
    p_min: float = float("nan")   # the smallest p any ordering of these values could give (few models: large)


def trend(params: Sequence[float], values: Sequence[float], seed: int = 0) -> Fit:
    """Least-squares slope of ``values`` on log10(``params``) (one point per model), its 95 % t
    interval (n - 2 degrees of freedom) and a two-sided permutation p: the share of permutations of
    the values over the models whose |slope| reaches the observed one (every permutation for
    n <= EXACT_UP_TO, else PERMUTATIONS seeded draws, the observed one counted). NaN where it cannot
    be estimated (fewer than 3 models, or one size)."""
    x = np.log10(np.asarray(params, np.float64))
    y = np.asarray(values, np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n, n_sizes = len(x), len(set(np.round(x, 9)))
    nan = float("nan")
    if n < 3 or n_sizes < 2:
        return Fit(n, n_sizes, nan, nan, nan, nan, nan)
    xc = x - x.mean()
    sxx = float(xc @ xc)
    slope = float(xc @ (y - y.mean()) / sxx)
    resid = y - y.mean() - slope * xc
    se = math.sqrt(float(resid @ resid) / (n - 2) / sxx)
    half = t975(n - 2) * se
    if n <= EXACT_UP_TO:
        perms = np.array(list(itertools.permutations(range(n))))
        slopes = np.abs((y[perms] - y.mean()) @ xc / sxx)
        p = float(np.mean(slopes >= abs(slope) - 1e-12))
        p_min = float(np.mean(slopes >= slopes.max() - 1e-12))
    else:
        rng = np.random.default_rng(seed)
        perms = np.argsort(rng.random((PERMUTATIONS, n)), axis=1)
        slopes = np.abs((y[perms] - y.mean()) @ xc / sxx)
        p = float((1 + np.count_nonzero(slopes >= abs(slope) - 1e-12)) / (1 + PERMUTATIONS))
        p_min = 1.0 / (1 + PERMUTATIONS)
    return Fit(n, n_sizes, slope, slope - half, slope + half, p, p_min)


def verdict(d: Definition, fit: Fit, alpha: float = 0.05) -> str:
    """One sentence: are larger models more interpretable by definition ``d``? 'More' (or 'less')
    only when the slope's 95 % interval excludes 0 on that side and the permutation p < alpha."""
    head = f"If interpretable means that {d.meaning}, "
    if not np.isfinite(fit.slope):
        why = "fewer than 3 trained models" if fit.n < 3 else "models of one size only"
        return head + f"the study cannot tell ({why} with this score)."
    stats = (f"(slope {fit.slope:+.3f} per tenfold of image-tower parameters, 95 % interval "
             f"[{fit.lo:+.3f}, {fit.hi:+.3f}], permutation p = {fit.p_value:.3f}; {fit.n} trained models "
             f"of {fit.n_sizes} sizes)")
    signed = (fit.lo > 0 or fit.hi < 0) and fit.p_value < alpha
    way = "more" if fit.slope * d.direction > 0 else "less"
    if signed:
        return head + f"larger models are {way} interpretable {stats}."
    if fit.p_min >= alpha:
        return head + (f"the study cannot tell yet: with {fit.n} models no ordering of the scores reaches "
                       f"p < {alpha:g} (the smallest possible p is {fit.p_min:.3f}); the estimate points to larger "
                       f"models being {way} interpretable {stats}.")
    return head + f"the study finds no trend with size that model seeds and worlds do not swamp {stats}."


def study_fits(models: dict[tuple[str, str], dict], seed: int = 0) -> list[dict]:
    """Per definition: the trend over the trained models and its verdict (rows of study_verdicts)."""
    out = []
    for d in DEFINITIONS:
        pts = [(m["image_params"], m["value"]) for (model_id, score), m in sorted(models.items())
               if score == d.score and in_trend(m["size"])]
        fit = trend([p for p, _ in pts], [v for _, v in pts], seed=seed)
        out.append(dict(score=d.score, definition=d.meaning, direction=d.direction, n_models=fit.n,
                        slope=fit.slope, slope_lo=fit.lo, slope_hi=fit.hi, p_value=fit.p_value,
                        verdict=verdict(d, fit)))
    return out


def _cell(mean, lo, hi) -> str:
    if mean is None or not np.isfinite(mean):
        return "–"
    if lo is None or not np.isfinite(lo):
        return f"{mean:.2f}"
    return f"{mean:.2f} [{lo:.2f}, {hi:.2f}]"


LABELS = {"kappa": "kappa", "kappa_texts": "kappa (texts only)", "kappa_margin_shuffled": "kappa - shuffled", "kappa_margin_constant": "kappa - constant",
          "wrong_rate": "wrong", "invented_rate": "invented", "paper_association": "association (paper)",
          "paper_entanglement": "entanglement (paper)", "informativeness": "informativeness", "dci_d": "DCI D",
          "dci_c": "DCI C", "dci_i": "DCI I", "mig": "MIG"}


TABLE_SCORES = ("kappa", "kappa_texts", "kappa_margin_shuffled", "wrong_rate", "invented_rate", "paper_association",
                "paper_entanglement", "informativeness", "dci_d", "dci_c", "dci_i", "mig")


def model_table(rows: Sequence[dict]) -> str:
    """Per model and world (rows of study_scores): the labels against the truth beside both
    baselines: kappa, its margins over the tag-shuffled and the best constant labeler (95 %
    head-bootstrap intervals), wrong and invented labels (Wilson intervals)."""
    cols = ("kappa", "kappa_margin_shuffled", "kappa_margin_constant", "wrong_rate", "invented_rate", "kappa_texts")
    by: dict[tuple, dict] = {}
    for r in rows:
        by.setdefault((r["image_params"], r["size"] == RANDOM, r["model_id"], r["world_seed"], r["size"]), {})[r["score"]] = r
    lines = ["| model | size | world | " + " | ".join(LABELS[c] for c in cols) + " |", "|" + "---|" * (3 + len(cols))]
    for (params, _, model_id, world, size), got in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2], kv[0][3])):
        cells = [_cell(*(got[c]["value"], got[c]["lo"], got[c]["hi"])) if c in got else "–" for c in cols]
        lines.append(f"| {model_id} | {size} | {world} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_table(sizes: Sequence[dict], scores: Sequence[str] = TABLE_SCORES) -> str:
    """Per size (rows, smallest first, the random control last): mean [95 % interval over model seeds]
    of each score (columns)."""
    by = {(r["size"], r["score"]): r for r in sizes}
    order = sorted({r["size"] for r in sizes},
                   key=lambda s: (s == RANDOM, min((r["image_params"] or 0) for r in sizes if r["size"] == s), s))
    head = "| size (layers x width) | image-tower parameters | models | " + " | ".join(LABELS[s] for s in scores) + " |"
    lines = [head, "|" + "---|" * (3 + len(scores))]
    for size in order:
        rows = [by.get((size, s)) for s in scores]
        n = max((r["n_models"] for r in rows if r), default=0)
        params = next((r["image_params"] for r in rows if r and r["image_params"]), None)
        lines.append(f"| {size} | {params / 1e6:.2f} M |" if params else f"| {size} | – |")
        lines[-1] += f" {n} | " + " | ".join(_cell(r["mean"], r["lo"], r["hi"]) if r else "–" for r in rows) + " |"
    return "\n".join(lines)
