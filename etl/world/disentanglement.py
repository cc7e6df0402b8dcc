"""Ground-truth scores that need no labels (MATH.md §11): the heads as codes of the world's factors.

    information_matrix(probes)        m [G, F]: I(y_f; what head h's probe predicts of f), nats
    dci_disentanglement(R), dci_completeness(R)     Eastwood & Williams (ICLR 2018), as
                                      disentanglement_lib's dci.py computes them from an importance R
    mig(m, entropies)                 Chen et al. (NeurIPS 2018), as disentanglement_lib's mig.py
    code_scores(...)                  every score of one model with a bootstrap interval over images

A head is a d-dimensional code, not a scalar one, so the information a head carries about a
factor is measured through a linear probe (etl/world/probes.py): the plug-in mutual information
between the factor and the probe's held-out prediction. By the data-processing inequality it is
a lower bound on I(y_f; c_h); disentanglement_lib discretises a scalar code into histogram bins
instead, then uses the same plug-in estimate (sklearn's ``mutual_info_score``).

The model's scores (each in [0, 1], higher = more of that kind of interpretability):
- informativeness: mean over factors of max_h m[h, f] / H(f), the best head's share of the factor's
  entropy ("is each factor readable from one head?");
- dci_d, dci_c: DCI disentanglement and completeness with the importance matrix R = m;
- dci_i: DCI informativeness, the held-out accuracy of one probe on all heads together, corrected
  for chance: mean over factors of (accuracy - chance) / (1 - chance);
- mig: mean over factors of (m_top - m_second) / H(f).
A model with no information about the factors can still score high on D (the little it carries
is spread unevenly), so D and C are only read beside informativeness and I.

Pure numpy; shapes at every boundary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from etl.blas import blas_threads

SCORES = ("informativeness", "dci_d", "dci_c", "dci_i", "mig")


def _entropy_rows(p: np.ndarray, base: float) -> np.ndarray:
    """Shannon entropy (log base ``base``) of each row of a non-negative [r, c] array, each row
    normalised to sum 1 (0 log 0 = 0); a row of zeros has entropy 0."""
    p = np.asarray(p, np.float64)
    s = p.sum(1, keepdims=True)
    q = np.divide(p, s, out=np.zeros_like(p), where=s > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(q > 0, q * np.log(q), 0.0)
    return -t.sum(1) / np.log(base)


def dci_disentanglement(importance: np.ndarray) -> float:
    """D = sum_h rho_h (1 - H_F(P_h)): importance [codes, factors] >= 0, P_h its row h normalised,
    H_F the entropy in base F (the number of factors), rho_h = row sum / total. 1 when every code
    serves one factor, 0 when every code serves all alike. 0 for an all-zero matrix."""
    r = np.asarray(importance, np.float64)
    if r.ndim != 2 or r.shape[1] < 2:
        raise ValueError(f"importance must be [codes, factors] with at least 2 factors, got {r.shape}")
    if (r < 0).any():
        raise ValueError("importance must be non-negative")
    total = r.sum()
    if total <= 0:
        return 0.0
    return float(((1.0 - _entropy_rows(r, r.shape[1])) * r.sum(1) / total).sum())


def dci_completeness(importance: np.ndarray) -> float:
    """C = sum_f rho_f (1 - H_G(P~_f)): the same on columns (each factor captured by one code),
    entropy in base G (the number of codes), rho_f = column sum / total."""
    r = np.asarray(importance, np.float64)
    if r.ndim != 2 or r.shape[0] < 2:
        raise ValueError(f"importance must be [codes, factors] with at least 2 codes, got {r.shape}")
    return dci_disentanglement(r.T)


def mig(mutual_info: np.ndarray, entropies: np.ndarray) -> float:
    """MIG = mean over factors f of (m_(1)f - m_(2)f) / H(f), m_(1) >= m_(2) the two largest
    entries of column f of mutual_info [codes, factors]; entropies [factors] in the same unit.
    A factor with H(f) = 0 (one value) is left out; NaN when no factor is left."""
    m = np.asarray(mutual_info, np.float64)
    h = np.asarray(entropies, np.float64)
    if m.ndim != 2 or m.shape[0] < 2 or h.shape != (m.shape[1],):
        raise ValueError(f"need mutual_info [codes >= 2, factors] and entropies [factors], got {m.shape}, {h.shape}")
    top2 = -np.sort(-m, axis=0)[:2]                                                 # [2, F]
    keep = h > 0
    if not keep.any():
        return float("nan")
    return float(((top2[0] - top2[1])[keep] / h[keep]).mean())


def mutual_info_counts(counts: np.ndarray) -> np.ndarray:
    """Plug-in mutual information (nats) of joint count tables [..., V, W] -> [...]
    (sklearn's ``mutual_info_score`` on the same pairs; 0 for an empty table)."""
    c = np.asarray(counts, np.float64)
    n = c.sum((-2, -1), keepdims=True)
    p = np.divide(c, n, out=np.zeros_like(c), where=n > 0)
    pr, pc = p.sum(-1, keepdims=True), p.sum(-2, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(p > 0, p * (np.log(p) - np.log(pr) - np.log(pc)), 0.0)
    return np.maximum(t.sum((-2, -1)), 0.0)


def entropy_counts(counts: np.ndarray) -> np.ndarray:
    """Plug-in entropy (nats) of count vectors [..., V] -> [...]."""
    c = np.asarray(counts, np.float64)
    n = c.sum(-1, keepdims=True)
    p = np.divide(c, n, out=np.zeros_like(c), where=n > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(-1)


def _joint_counts(y: np.ndarray, pred: np.ndarray, n_classes: int, weights: np.ndarray) -> np.ndarray:
    """Weighted joint counts of (true, predicted) class: y [m], pred [G, m], weights [B, m]
    -> [B, G, V, V] (one matmul: weights [B, m] @ one-hot of the pair [m, G V V])."""
    G, m = pred.shape
    cell = (y[None, :] * n_classes + pred).T                                         # [m, G]: the pair's cell
    onehot = np.zeros((m, G, n_classes * n_classes))
    np.put_along_axis(onehot, cell[:, :, None], 1.0, axis=2)
    return (weights @ onehot.reshape(m, -1)).reshape(len(weights), G, n_classes, n_classes)


def basic_interval(value: float, boot: np.ndarray, level: float = 0.95, lower: float | None = 0.0,
                   upper: float | None = 1.0) -> tuple[float, float]:
    """The basic (reverse-percentile) bootstrap interval (2 v - q_hi, 2 v - q_lo) of an estimate
    ``value`` from its bootstrap replicates ``boot`` [B], clipped to [lower, upper]. It assumes
    value - truth behaves like replicate - value, so it corrects the plug-in information's upward
    bias (a resample holds fewer distinct images, and its plug-in information is larger still),
    where the plain percentile interval would inherit it. (NaN, NaN) without finite replicates."""
    b = np.asarray(boot, np.float64)
    b = b[np.isfinite(b)]
    if not len(b) or not np.isfinite(value):
        return float("nan"), float("nan")
    q_lo, q_hi = np.percentile(b, [50 * (1 - level), 50 * (1 + level)])
    lo, hi = 2 * value - q_hi, 2 * value - q_lo
    if lower is not None:
        lo, hi = max(lo, lower), max(hi, lower)
    if upper is not None:
        lo, hi = min(lo, upper), min(hi, upper)
    return float(lo), float(hi)


@dataclass(frozen=True)
class CodeScores:
    """The scores of one model (``SCORES``): ``value`` on the images as drawn, ``lo``/``hi`` its 95 %
    basic bootstrap interval over ``n_boot`` resamples of the images (``basic_interval``). ``info`` [G, F] is the
    information matrix m / H(f) (each head's share of each factor's entropy) on the images as drawn."""
    value: dict
    lo: dict
    hi: dict
    info: np.ndarray
    factors: list
    n_boot: int


def code_scores(head_probes: Sequence, joint_probes: Sequence, n_images: int, n_boot: int = 200,
                seed: int = 0) -> CodeScores:
    """Informativeness, DCI's D / C / I and MIG of one model, with bootstrap intervals over images.

    head_probes:  etl.world.probes.FactorProbe per factor, ``pred`` [G, m] (every head's probe);
    joint_probes: the same factors from ``joint_probe_predictions`` (``pred`` [1, m]);
    n_images:     n, the images the test splits index into. A bootstrap draw resamples the n
                  images with replacement (seeded) and weighs each test image by its count, so the
                  factors' test splits are resampled together, as the images they share are.
    """
    if [p.factor for p in head_probes] != [p.factor for p in joint_probes]:
        raise ValueError("head_probes and joint_probes must cover the same factors in the same order")
    if len(head_probes) < 2:
        raise ValueError("DCI and MIG need at least 2 factors")
    with blas_threads(1):
        return _code_scores(head_probes, joint_probes, n_images, n_boot, seed)


def _code_scores(head_probes, joint_probes, n_images, n_boot, seed) -> CodeScores:
    rng = np.random.default_rng(seed)
    draws = np.vstack([np.ones(n_images), rng.multinomial(n_images, np.full(n_images, 1 / n_images), size=n_boot)])
    F, G = len(head_probes), head_probes[0].pred.shape[0]
    B = len(draws)
    m = np.zeros((B, G, F))
    h = np.zeros((B, F))
    joint = np.zeros((B, F))
    for f, (hp, jp) in enumerate(zip(head_probes, joint_probes)):
        w = draws[:, hp.test]                                                          # [B, m]
        V = len(hp.classes)
        counts = _joint_counts(hp.y, hp.pred, V, w)                                    # [B, G, V, V]
        m[:, :, f] = mutual_info_counts(counts)
        h[:, f] = entropy_counts(counts[:, 0].sum(-1))
        wj = draws[:, jp.test]                                                         # [B, m']
        right = (jp.pred[0] == jp.y).astype(np.float64)                                # [m']
        acc = (wj * right).sum(1) / np.maximum(wj.sum(1), 1e-12)
        joint[:, f] = (acc - jp.chance) / (1 - jp.chance) if jp.chance < 1 else 0.0
    share = np.divide(m, h[:, None, :], out=np.zeros_like(m), where=h[:, None, :] > 0)  # [B, G, F]
    values = {s: np.zeros(B) for s in SCORES}
    for b in range(B):
        values["informativeness"][b] = share[b].max(0).mean()
        values["dci_d"][b] = dci_disentanglement(m[b])
        values["dci_c"][b] = dci_completeness(m[b]) if G > 1 else float("nan")
        values["dci_i"][b] = joint[b].mean()
        values["mig"][b] = mig(m[b], h[b]) if G > 1 else float("nan")
    point = {s: float(v[0]) for s, v in values.items()}
    lo, hi = {}, {}
    for s, v in values.items():
        lo[s], hi[s] = basic_interval(point[s], v[1:], upper=1.0, lower=None if s == "dci_i" else 0.0)
    return CodeScores(point, lo, hi, share[0],
                      [p.factor for p in head_probes], int(n_boot))
