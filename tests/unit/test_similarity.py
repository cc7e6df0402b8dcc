"""Heads across models (models/similarity.py): linear CKA on shared images and Spearman's rho of
variance profiles over shared texts. Identities to a tolerance, a value worked out by hand, the
invariances each measure claims (and one it deliberately lacks), the fast all-pairs form against
the textbook formula, and unrelated heads scoring low."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from models import similarity as sim


def rotation(d: int, rng) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return q


def low_rank_heads(n: int, H: int, d: int, r: int, rng) -> np.ndarray:
    """Stacked head embeddings [n, H, d], each head of rank r (c = o_h F_h, o_h in R^r), like a real head."""
    return np.stack([rng.standard_normal((n, r)) @ rng.standard_normal((r, d)) for _ in range(H)], axis=1) \
        + rng.standard_normal((1, H, d))                                    # plus a per-head offset


def test_cka_by_hand():
    # Xc^T Xc = diag(2, 2) (norm 2 sqrt 2); Yc^T Yc = 2; Yc^T Xc = [2, 0] (squared norm 4): 4 / (4 sqrt 2)
    X = np.array([[1.0, 0], [0, 1], [-1, 0], [0, -1]])
    Y = X[:, :1]
    assert sim.linear_cka(X, Y) == pytest.approx(1 / np.sqrt(2), abs=1e-12)
    assert sim.cka_matrix(X[:, None, :], Y[:, None, :])[0, 0] == pytest.approx(1 / np.sqrt(2), abs=1e-6)
    # orthogonal signals: the second column alone shares nothing with the first
    assert sim.linear_cka(X[:, :1], X[:, 1:]) == pytest.approx(0.0, abs=1e-12)


def test_cka_of_a_head_with_itself_is_one_and_invariant_to_rotation_scale_and_shift():
    rng = np.random.default_rng(0)
    X = low_rank_heads(400, 3, 24, 6, rng)                                  # [n, H, d]
    Q = rotation(24, rng)
    Y = 7.5 * X @ Q + 3.0                                                   # another basis, scale and offset
    S = sim.cka_matrix(X, Y)
    np.testing.assert_allclose(np.diag(S), 1.0, atol=1e-5)
    assert (S[~np.eye(3, dtype=bool)] < 0.2).all(), S                       # the other heads are unrelated
    for h in range(3):
        assert sim.linear_cka(X[:, h], Y[:, h]) == pytest.approx(1.0, abs=1e-10)
        assert sim.linear_cka(X[:, h], X[:, h]) == pytest.approx(1.0, abs=1e-10)
    # and into a space of another dimension (model B with d_B != d_A): an isometric embedding
    E = rotation(40, rng)[:, :24].T                                         # [24, 40], E E^T = I
    np.testing.assert_allclose(np.diag(sim.cka_matrix(X, X @ E)), 1.0, atol=1e-5)


def test_cka_is_not_invariant_to_anisotropic_scaling():
    """Deliberately: a head that stretches one direction 10x is a different head for CKA."""
    rng = np.random.default_rng(1)
    X = rng.standard_normal((500, 8))
    stretch = np.diag([10.0] + [1.0] * 7)
    assert sim.linear_cka(X, X @ stretch) < 0.9


def test_fast_all_pairs_form_equals_the_textbook_formula():
    rng = np.random.default_rng(2)
    XA = low_rank_heads(300, 4, 16, 5, rng)
    XB = np.concatenate([XA[:, :2] @ rotation(16, rng) @ rng.standard_normal((16, 20)),   # related to A's
                         low_rank_heads(300, 3, 20, 7, rng)], axis=1)                     # and unrelated
    fast = sim.cka_matrix(XA, XB)
    slow = np.array([[sim.linear_cka(XA[:, a], XB[:, b]) for b in range(XB.shape[1])] for a in range(4)])
    assert fast.shape == (4, 5)
    np.testing.assert_allclose(fast, slow, atol=1e-5)
    assert fast[0, 0] > 0.5 and fast[1, 1] > 0.5                            # the planted relations show


def test_unrelated_heads_score_low():
    """Independent heads of rank 32 on 2,000 images: E[CKA] ~ sqrt(r_A r_B) / n = 0.016."""
    rng = np.random.default_rng(3)
    XA = low_rank_heads(2000, 4, 64, 32, rng)
    XB = low_rank_heads(2000, 4, 48, 32, rng)
    S = sim.cka_matrix(XA, XB)
    assert S.max() < 0.04, S
    assert S.mean() == pytest.approx(32 / 2000, rel=0.5)


def test_constant_heads_and_mismatched_rows():
    X = np.ones((50, 2, 8))
    X[:, 1] = np.random.default_rng(4).standard_normal((50, 8))
    S = sim.cka_matrix(X, X)
    assert S[0, 0] == 0.0 and S[0, 1] == 0.0 and S[1, 1] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="same images"):
        sim.cka_matrix(X, X[:40])


# --------------------------------------------------------------------------- text behaviour

def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(5)
    VA = rng.standard_normal((3, 30))
    VB = rng.standard_normal((2, 30))
    VA[1, :10] = 0.5                                                        # ties share their mean rank
    VB[0] = VA[0] ** 3                                                      # monotone: rho 1
    VB[1] = -VA[2]                                                          # reversed: rho -1
    S = sim.spearman_matrix(VA, VB)
    for a in range(3):
        for b in range(2):
            assert S[a, b] == pytest.approx(stats.spearmanr(VA[a], VB[b]).statistic, abs=1e-12)
    assert S[0, 0] == pytest.approx(1.0) and S[2, 1] == pytest.approx(-1.0)


def test_variance_profile_is_the_variance_along_each_centred_text():
    rng = np.random.default_rng(6)
    X = low_rank_heads(200, 2, 12, 4, rng)
    T = rng.standard_normal((9, 12))
    T /= np.linalg.norm(T, axis=1, keepdims=True)
    V = sim.variance_profiles(X, T)
    Tc = T - T.mean(0)
    for h in range(2):
        np.testing.assert_allclose(V[h], np.var(X[:, h] @ Tc.T, axis=0, ddof=1), rtol=1e-5)
    np.testing.assert_allclose(sim.variance_profiles(X, T, centre_texts=False)[1], np.var(X[:, 1] @ T.T, axis=0, ddof=1),
                               rtol=1e-5)


def test_text_similarity_across_two_spaces():
    """Model B = model A in a rotated joint space (its own text tower embeds the same texts rotated
    too), with its heads in another order and on other images: each head's match is its twin, rho 1."""
    rng = np.random.default_rng(7)
    d, M = 16, 60
    T = rng.standard_normal((M, d))
    T /= np.linalg.norm(T, axis=1, keepdims=True)
    # head h varies along texts h (strongly) and h + 3 (weakly), plus small isotropic noise
    n = 500
    XA = np.stack([np.outer(rng.standard_normal(n), 3 * T[h]) + np.outer(rng.standard_normal(n), T[h + 3])
                   + 0.05 * rng.standard_normal((n, d)) for h in range(3)], axis=1)
    Q = rotation(d, rng)
    perm = [2, 0, 1]
    XB = np.stack([np.outer(rng.standard_normal(n), 3 * T[h]) + np.outer(rng.standard_normal(n), T[h + 3])
                   + 0.05 * rng.standard_normal((n, d)) for h in perm], axis=1) @ Q
    S = sim.text_similarity(XA, T, XB, T @ Q)
    assert [int(j) for j in S.argmax(1)] == [perm.index(h) for h in range(3)]
    assert (S.max(1) > 0.9).all() and (np.sort(S, 1)[:, -2] < S.max(1) - 0.2).all(), S
    with pytest.raises(ValueError, match="same texts"):
        sim.text_similarity(XA, T, XB, T[:10] @ Q)


def test_compare_matches_texts_by_id_and_needs_the_same_images():
    rng = np.random.default_rng(8)
    X = low_rank_heads(100, 2, 10, 3, rng)
    T = rng.standard_normal((20, 10))
    ids = [f"t{i:02d}" for i in range(20)]
    images = [f"i{i}" for i in range(100)]
    heads = [(0, 0), (0, 1)]
    a = sim.summarise(images, heads, X, ids, T)
    order = rng.permutation(20)[:15]                                        # B embedded 15 texts, in another order
    b = sim.summarise(images, heads, X, [ids[i] for i in order], T[order])
    r = sim.compare(a, b)
    assert r["n_texts"] == 15 and r["n_images"] == 100
    np.testing.assert_allclose(np.diag(r["cka"]), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.diag(r["text"]), 1.0, atol=1e-9)          # the same texts, matched by id
    c = sim.summarise(images[::-1], heads, X[::-1], ids, T)                 # same images, other row order
    assert sim.compare(a, c)["cka"] is None                                 # rows must be aligned by the caller
