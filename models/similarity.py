"""Heads across models (issue 10.5): how alike two heads of two *different* models are.

Two models have different joint spaces (their own image projection and their own text tower),
so a head embedding of model A and one of model B are never compared coordinate by coordinate:
a rotation of B's space would change any such number. Each measure below compares only what the
two models share, matched by id: the images both embedded (rows of head_embeddings joined on
image_id) and the texts both embedded (rows of text_embeddings joined on text_id).

(b) Outputs: linear CKA on the shared images (Kornblith et al., ICML 2019).

    X [n, d_A]: head a of model A on the n shared images, Y [n, d_B]: head b of model B, same rows
    Xc, Yc: each column centred over the images
    CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F * ||Yc^T Yc||_F)               in [0, 1]

  It is a similarity of the two n x n image-by-image Gram matrices, so it needs no map between
  the two spaces. Invariant to any orthogonal transform and any isotropic scale of either side
  (so to the arbitrary basis and norm of each joint space); deliberately not invariant to every
  invertible linear map (with that invariance, as in CCA, any two heads of rank >= n look
  identical, and a rank-32 head fits much by chance). 1 for a head with itself; for independent
  heads of isotropic rank r_A, r_B its expected value is only about sqrt(r_A r_B) / n (0.016 for
  r = 32 on n = 2,000 images), so no debiasing is needed at the warehouse's sizes. Caveat: CKA
  weighs directions by their variance, so two heads that both carry one dominant image factor
  (the toy world's background) score high whatever else they carry; the text measure and a
  random-init control (drawn beside it on the Metrics page) are the checks on that.

  Fast form, all heads of A against all heads of B at once. A head's embeddings have rank
  r <= d_head (MATH.md §3), so with Xc^T Xc = V diag(lam) V^T the features
      P = Xc V_r / ||lam||_2^(1/2)                                               [n, r]
  satisfy ||P^T P||_F = 1 and CKA(X, Y) = ||P_X^T P_Y||_F^2. Stacking the heads' features,
  G = [P_a1 .. P_aH]^T [P_b1 .. P_bH] ([H_A r, H_B r], one matrix product) and CKA[a, b] is the
  sum of squares of block (a, b) of G. Cost O(n H_A H_B r^2), no n x n matrix is ever formed.

(a) Texts: the rank correlation of the two heads' variance profiles over a shared text bank.

    v_h(t) = t^T Cov_h t = ||Xc t||^2 / (n - 1)      for each unit text embedding t of the bank,
                                                     embedded by the head's own model (its space)

  v_h is exactly what TextSpan's first step maximises over the bank (MATH.md §3), so it is a
  head's whole "text behaviour" of which the TextSpan list is the greedy top. Profiles of heads of
  A and B live on the same texts (by text_id), so they are compared by Spearman's rho (Pearson on
  ranks): a head that varies most along colour words in A and one that does so in B agree
  whatever the overall variance scale of each model. Before projecting, the bank's mean text
  embedding is removed from every text (per model, over the shared texts): real and toy text
  embeddings share one large common direction, and the variance along it lifts every pair's
  correlation (on the demo warehouse, centring lowers the random-init control's mean best match
  from about 0.2 to 0.14 while trained pairs stay at 0.5 to 0.7). Chosen over the overlap of
  the TextSpan sets because the sets are short (k = 10 of hundreds of texts), greedy (later texts
  depend on earlier deflations) and rarely share a text exactly across models; the profile uses
  every text.
  A random-init control has a random text tower too, so against it this measure tests both towers.

Everything here is numpy in, numpy out; heads are the rows of a stacked tensor [n, H, d] in the
order the caller gives (the caller keeps the (layer, head) names).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

RANK_TOL = 1e-5      # eigenvalues below this fraction of the largest are float noise (rank <= d_head)


# --------------------------------------------------------------------------- (b) linear CKA

def linear_cka(X: np.ndarray, Y: np.ndarray) -> float:
    """Linear CKA of X [n, d_x] and Y [n, d_y] (rows: the same n items), by the textbook formula
    on centred columns: ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F). 0 when either is constant."""
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"CKA needs the same rows on both sides: {X.shape[0]} vs {Y.shape[0]} items")
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    den = np.linalg.norm(Xc.T @ Xc) * np.linalg.norm(Yc.T @ Yc)
    return float(np.linalg.norm(Yc.T @ Xc) ** 2 / den) if den > 0 else 0.0


def _centred_heads(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Xh [H, n, d] float32 (each head's embeddings centred over the images) and the scatter
    matrices S [H, d, d] float64 = Xh^T Xh, from stacked head embeddings X [n, H, d]."""
    X = np.asarray(X, dtype=np.float32)
    Xh = X.transpose(1, 0, 2) - X.mean(0)[:, None, :]               # [H, n, d]
    S = np.matmul(Xh.transpose(0, 2, 1), Xh).astype(np.float64)     # [H, d, d]
    return Xh, S


def cka_features(X: np.ndarray, rank: Optional[int] = None, _centred=None) -> np.ndarray:
    """Per-head CKA features of stacked head embeddings X [n, H, d]: P [H, n, r] float32 with
    ||P_h^T P_h||_F = 1, so that CKA(head a, head b) = ||P_a^T P_b||_F^2 (module docstring).

    r = `rank` when given, else the largest numerical rank over the heads (eigenvalues of the
    d x d scatter above RANK_TOL x the largest); heads of lower rank are zero-padded. Dropped
    directions carry eigenvalues below RANK_TOL x the top, so they change CKA by less than that.
    A constant head gets all-zero features (CKA 0 with everything)."""
    Xh, S = _centred if _centred is not None else _centred_heads(X)
    H, n, d = Xh.shape
    lam, V = np.linalg.eigh(S)                                      # ascending: lam [H, d], V [H, d, d]
    lam, V = lam[:, ::-1], V[:, :, ::-1]                            # largest first
    keep = lam > RANK_TOL * np.maximum(lam[:, :1], 1e-300)
    r = int(rank) if rank is not None else max(int(keep.sum(1).max()), 1)
    r = min(r, d)
    V, lam, keep = V[:, :, :r], lam[:, :r], keep[:, :r]
    P = np.matmul(Xh, (V * keep[:, None, :]).astype(np.float32))     # [H, n, r]: Xc V_r
    norm = np.sqrt(np.sqrt(np.sum(np.where(keep, lam, 0.0) ** 2, axis=1)))   # ||lam||_2^(1/2), [H]
    return (P / np.where(norm > 0, norm, np.inf)[:, None, None]).astype(np.float32)


def cka_matrix(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Linear CKA of every head of X [n, H_A, d_A] with every head of Y [n, H_B, d_B] (rows: the
    same n images in the same order): [H_A, H_B] in [0, 1]."""
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"CKA needs the same images on both sides: {X.shape[0]} vs {Y.shape[0]} rows")
    return cka_from_features(cka_features(X), cka_features(Y))


def cka_from_features(PA: np.ndarray, PB: np.ndarray) -> np.ndarray:
    """CKA [H_A, H_B] from features PA [H_A, n, r_A] and PB [H_B, n, r_B] (cka_features)."""
    HA, n, rA = PA.shape
    HB, _, rB = PB.shape
    G = PA.transpose(0, 2, 1).reshape(HA * rA, n) @ PB.transpose(1, 0, 2).reshape(n, HB * rB)   # [HA rA, HB rB]
    return np.clip((G.reshape(HA, rA, HB, rB) ** 2).sum(axis=(1, 3)), 0.0, 1.0)


# --------------------------------------------------------------------------- (a) text behaviour

def variance_profiles(X: np.ndarray, T: np.ndarray, centre_texts: bool = True) -> np.ndarray:
    """Each head's variance along each text: V [H, M] float64 with V[h, t] = t^T Cov_h t.

    X [n, H, d]: head embeddings of one model; T [M, d]: that model's unit text embeddings of the
    bank (rows in the order the caller matches across models). centre_texts: subtract the mean of
    these M texts first (module docstring: the common direction every text shares); centre over the
    texts both models share, so that both profiles are taken against the same reference."""
    Xh, S = _centred_heads(X)
    return profiles_from_cov(S / max(Xh.shape[1] - 1, 1), T, centre_texts)


def profiles_from_cov(cov: np.ndarray, T: np.ndarray, centre_texts: bool = True) -> np.ndarray:
    """variance_profiles from the heads' covariances cov [H, d, d] and texts T [M, d]: [H, M]."""
    T = np.asarray(T, dtype=np.float64)
    if centre_texts and len(T):
        T = T - T.mean(0, keepdims=True)
    return ((T @ np.asarray(cov, dtype=np.float64)) * T).sum(-1)     # [H, M]: t^T Cov_h t


def _ranks(V: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank) along the last axis of V [H, M]."""
    order = np.argsort(V, axis=1, kind="stable")
    ranks = np.empty_like(V, dtype=np.float64)
    rows = np.arange(V.shape[0])[:, None]
    ranks[rows, order] = np.arange(V.shape[1], dtype=np.float64)[None, :]
    for h in range(V.shape[0]):                                      # ties (rare on real floats)
        vals, inv, counts = np.unique(V[h], return_inverse=True, return_counts=True)
        if len(vals) < V.shape[1]:
            sums = np.bincount(inv, weights=ranks[h])
            ranks[h] = (sums / counts)[inv]
    return ranks


def _standardise(V: np.ndarray) -> np.ndarray:
    Z = V - V.mean(1, keepdims=True)
    s = np.linalg.norm(Z, axis=1, keepdims=True)
    return Z / np.where(s > 0, s, np.inf)


def pearson_matrix(VA: np.ndarray, VB: np.ndarray) -> np.ndarray:
    """Pearson correlation of every row of VA [H_A, M] with every row of VB [H_B, M]: [H_A, H_B]."""
    if VA.shape[1] != VB.shape[1]:
        raise ValueError(f"profiles over different texts: {VA.shape[1]} vs {VB.shape[1]}")
    return np.clip(_standardise(np.asarray(VA, np.float64)) @ _standardise(np.asarray(VB, np.float64)).T, -1.0, 1.0)


def spearman_matrix(VA: np.ndarray, VB: np.ndarray) -> np.ndarray:
    """Spearman's rho of every row of VA [H_A, M] with every row of VB [H_B, M]: [H_A, H_B] in [-1, 1]."""
    return pearson_matrix(_ranks(np.asarray(VA, np.float64)), _ranks(np.asarray(VB, np.float64)))


def text_similarity(XA: np.ndarray, TA: np.ndarray, XB: np.ndarray, TB: np.ndarray) -> np.ndarray:
    """Measure (a): Spearman's rho of the variance profiles, every head of A x every head of B.

    XA [n_A, H_A, d_A], TA [M, d_A]: model A's head embeddings and its embeddings of the M shared
    texts; XB [n_B, H_B, d_B], TB [M, d_B]: the same for B, the same texts in the same order (the
    images need not be the same). Returns [H_A, H_B] in [-1, 1]."""
    if len(TA) != len(TB):
        raise ValueError(f"the two models' text matrices must hold the same texts: {len(TA)} vs {len(TB)} rows")
    return spearman_matrix(variance_profiles(XA, TA), variance_profiles(XB, TB))


# --------------------------------------------------------------------------- per model, then per pair

@dataclass
class HeadSummary:
    """What comparing a model's heads with another model's needs, computed once per model.

    image_ids [n] and heads [H] name the rows of `features` (cka_features: [H, n, r] float32);
    text_ids [M] name the rows of `texts` (the model's unit text embeddings, [M, d] float32);
    cov [H, d, d] float32: each head's covariance over the images (for the variance profiles)."""
    image_ids: list
    heads: list
    features: np.ndarray
    text_ids: list
    texts: np.ndarray
    cov: np.ndarray


def summarise(image_ids: Sequence, heads: Sequence, X: np.ndarray, text_ids: Sequence, T: np.ndarray) -> HeadSummary:
    """A model's HeadSummary from its head embeddings X [n, H, d] (rows: image_ids, heads) and its
    text embeddings T [M, d] (rows: text_ids). One pass over X for both measures."""
    X = np.asarray(X, dtype=np.float32)
    H, d = len(heads), (X.shape[2] if X.ndim == 3 else 0)
    if X.shape[0] == 0:
        return HeadSummary(list(image_ids), list(heads), np.zeros((H, 0, 0), np.float32), list(text_ids),
                           np.asarray(T, np.float32), np.zeros((H, d, d), np.float32))
    centred = _centred_heads(X)
    cov = (centred[1] / max(X.shape[0] - 1, 1)).astype(np.float32)
    return HeadSummary(list(image_ids), list(heads), cka_features(X, _centred=centred), list(text_ids),
                       np.asarray(T, np.float32), cov)


def compare(a: HeadSummary, b: HeadSummary) -> dict:
    """Both measures between every head of A and every head of B (rows: a.heads, columns: b.heads).

    cka [H_A, H_B] (None when the two were summarised on different images: re-summarise both on
    the shared images first), text [H_A, H_B]: Spearman's rho of the variance profiles over the
    texts both embedded, each model's texts centred over those shared texts (None below 3 shared
    texts); n_images and n_texts: what each was computed on."""
    cka = cka_from_features(a.features, b.features) if a.image_ids == b.image_ids and len(a.image_ids) > 1 else None
    shared = sorted(set(a.text_ids) & set(b.text_ids))
    text = None
    if len(shared) >= 3:
        ia, ib = ({t: k for k, t in enumerate(s.text_ids)} for s in (a, b))
        text = spearman_matrix(profiles_from_cov(a.cov, a.texts[[ia[t] for t in shared]]),
                               profiles_from_cov(b.cov, b.texts[[ib[t] for t in shared]]))
    return {"cka": cka, "text": text, "n_images": len(a.image_ids) if cka is not None else 0, "n_texts": len(shared)}


# --------------------------------------------------------------------------- summaries

def best_match(S: np.ndarray) -> np.ndarray:
    """For each head of A (row of S [H_A, H_B]), its best similarity over B's heads: [H_A]."""
    return np.asarray(S).max(axis=1)
