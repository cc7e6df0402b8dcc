"""Sparse text decompositions of directions (a neuron's principal effect direction, MATH.md §10):
orthogonal matching pursuit over a text bank (scikit-learn's `orthogonal_mp_gram`).

    sparse_texts(directions [N, d], T [M, d], k) -> SparseTexts

Each unit direction v is approximated by at most k texts of the bank, v ~ sum_j coef_j t_j, chosen
greedily (the text most correlated with the residual, then a least-squares refit on every text chosen
so far). The reconstruction is the orthogonal projection of v on the chosen texts' span, so its
quality is r2 = 1 - ||v - v_hat||^2 / ||v||^2 = cos(v, v_hat)^2, and the gain of the j-th text is
how much r2 grew when it was added (gains sum to r2; they are the "variance" the offline labeler
weighs texts by). Ties and linear dependence: scikit-learn stops a target early when the next atom
would be dependent on those chosen; such a direction simply has fewer than k texts.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np


@dataclass
class SparseTexts:
    """For N directions: text rows `index` [N, k] (-1 past the texts chosen), `coef` [N, k] (0 there),
    `gain` [N, k] (increase of r2 per text, in the order chosen) and `r2` [N] (= cos^2 of v and v_hat)."""
    index: np.ndarray
    coef: np.ndarray
    gain: np.ndarray
    r2: np.ndarray


def sparse_texts(directions: np.ndarray, T: np.ndarray, k: int) -> SparseTexts:
    """Orthogonal matching pursuit of each row of `directions` [N, d] over the texts T [M, d] (unit
    rows), with at most `k` texts each. Rows of `directions` are normalised first."""
    from sklearn.linear_model import orthogonal_mp_gram
    V = np.asarray(directions, dtype=np.float64)
    T = np.asarray(T, dtype=np.float64)
    if V.ndim != 2 or T.ndim != 2 or V.shape[1] != T.shape[1]:
        raise ValueError(f"directions [N, d] and texts [M, d] must share d, got {V.shape} and {T.shape}")
    if not 1 <= k <= len(T):
        raise ValueError(f"k = {k}: choose between 1 and the bank's {len(T)} texts")
    N = len(V)
    V = V / np.maximum(np.linalg.norm(V, axis=1, keepdims=True), 1e-300)
    index = np.full((N, k), -1, np.int64)
    coef = np.zeros((N, k))
    gain = np.zeros((N, k))
    r2 = np.zeros(N)
    if N == 0:
        return SparseTexts(index, coef, gain, r2)
    gram = T @ T.T                                                            # [M, M]
    xy = T @ V.T                                                              # [M, N]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)                       # early stops are per target
        C = np.asarray(orthogonal_mp_gram(gram, xy, n_nonzero_coefs=k, copy_Gram=False)).reshape(len(T), N)
    for n in range(N):
        chosen = np.flatnonzero(C[:, n])
        order, fit = _replay(V[n], T[chosen])
        index[n, :len(chosen)] = chosen[order]
        coef[n, :len(chosen)] = C[chosen[order], n]
        gain[n, :len(chosen)] = np.diff(np.concatenate([[0.0], fit]))
        r2[n] = fit[-1] if len(fit) else 0.0
    return SparseTexts(index, coef, gain, r2)


def _replay(v: np.ndarray, A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The order in which OMP chose the rows of A [j, d] for the unit vector v, and r2 after each step.

    OMP took, at each step, the text most correlated with the residual among all texts; that text is
    one of A's rows, so replaying the greedy step over A's rows alone finds the same order."""
    left = list(range(len(A)))
    order: list[int] = []
    fit = []
    r = v
    while left:
        best = max(left, key=lambda i: abs(float(A[i] @ r)))
        order.append(best)
        left.remove(best)
        S = A[order]
        c, *_ = np.linalg.lstsq(S.T, v, rcond=None)
        r = v - c @ S
        fit.append(1.0 - float(r @ r))
    return np.asarray(order, dtype=np.int64), np.asarray(fit)
