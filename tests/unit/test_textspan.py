"""TextSpan (MATH.md §3): the fast covariance form against the literal n x d algorithm."""

import numpy as np
import pytest

from etl.text.textspan import bench_textspan, textspan, textspan_heads, textspan_literal


def literal_textspan(C, T, k, r):
    """MATH.md §3 written out on the n x d data, float64 numpy: the oracle of these tests.

    C [n, d], T [M, d] -> idx [k], variance [k], residual ||C||_F after each step [k].
    """
    C = np.asarray(C, dtype=np.float64)
    T = np.asarray(T, dtype=np.float64)
    Vr = np.linalg.svd(C, full_matrices=False)[2][:r]          # top-r right singular vectors
    T = T @ Vr.T @ Vr
    C = C - C.mean(axis=0)
    total = (C ** 2).sum()
    idx, var, residual = [], [], []
    for _ in range(k):
        j = int(np.argmax(((C @ T.T) ** 2).sum(axis=0)))
        u = T[j] / np.linalg.norm(T[j])
        Cu = C @ u
        idx.append(j)
        var.append((Cu ** 2).sum() / total)
        C = C - np.outer(Cu, u)
        T = T - np.outer(T @ u, u)
        residual.append(np.linalg.norm(C))
    return np.array(idx), np.array(var), np.array(residual)


def make_heads(n=400, H=3, d=48, seed=0):
    """Head embeddings [n, H, d] with a decaying spectrum and a non-zero mean (like real heads)."""
    rng = np.random.default_rng(seed)
    C = np.empty((n, H, d))
    for h in range(H):
        Q = np.linalg.qr(rng.normal(size=(d, d)))[0]
        scales = np.geomspace(1.0, 0.02, d) * rng.uniform(0.8, 1.2, d)
        C[:, h] = (rng.normal(size=(n, d)) * scales) @ Q.T + rng.normal(size=d) * 0.5
    return C


def make_texts(M=250, d=48, seed=1):
    rng = np.random.default_rng(seed)
    T = rng.normal(size=(M, d))
    return T / np.linalg.norm(T, axis=1, keepdims=True)


def test_same_texts_and_variances_as_the_literal_algorithm():
    C, T = make_heads(), make_texts()
    k, r = 8, 24
    idx, var = textspan_heads(C, T, k=k, r=r)
    assert idx.shape == (3, k) and var.shape == (3, k)
    for h in range(C.shape[1]):
        lit_idx, lit_var, _ = literal_textspan(C[:, h], T, k, r)
        np.testing.assert_array_equal(idx[h], lit_idx)
        np.testing.assert_allclose(var[h], lit_var, atol=1e-9, rtol=0)


def test_float32_input_gives_the_same_texts_as_the_float64_literal():
    C, T = make_heads(seed=3), make_texts(seed=4)
    idx, var = textspan_heads(C.astype(np.float32), T.astype(np.float32), k=10, r=24)
    for h in range(C.shape[1]):
        lit_idx, lit_var, _ = literal_textspan(C[:, h], T, 10, 24)
        np.testing.assert_array_equal(idx[h], lit_idx)
        np.testing.assert_allclose(var[h], lit_var, atol=1e-5, rtol=0)


def test_one_head_chunks_and_the_benchmark_reference_agree():
    C, T = make_heads(H=5, seed=5), make_texts(seed=6)
    idx, var = textspan_heads(C, T, k=6, r=20, chunk=2)
    idx1, var1 = textspan_heads(C, T, k=6, r=20, chunk=5)
    np.testing.assert_array_equal(idx, idx1)
    np.testing.assert_allclose(var, var1, atol=1e-12)
    one_idx, one_var = textspan(C[:, 4], T, k=6, r=20)
    np.testing.assert_array_equal(one_idx, idx[4])
    np.testing.assert_allclose(one_var, var[4], atol=1e-12)
    ref_idx, ref_var = textspan_literal(C[:, 4], T, k=6, r=20)      # the benchmark's reference
    np.testing.assert_array_equal(ref_idx, idx[4])
    np.testing.assert_allclose(ref_var, var[4], atol=1e-9)


def test_directions_are_orthonormal_and_the_residual_falls_monotonically():
    C, T = make_heads(H=2, seed=7), make_texts(seed=8)
    k = 12
    idx, var, dirs = textspan_heads(C, T, k=k, r=30, with_directions=True)
    assert dirs.shape == (2, k, C.shape[2])
    for h in range(2):
        U = dirs[h]
        np.testing.assert_allclose(U @ U.T, np.eye(k), atol=1e-10)
        # remove the returned directions from the real centred data, one by one
        X = C[:, h] - C[:, h].mean(axis=0)
        total = (X ** 2).sum()
        norms = [np.linalg.norm(X)]
        for i, u in enumerate(U):
            Xu = X @ u
            assert (Xu ** 2).sum() / total == pytest.approx(var[h, i], abs=1e-10)
            X = X - np.outer(Xu, u)
            norms.append(np.linalg.norm(X))
        assert all(b < a for a, b in zip(norms, norms[1:])), norms
        # and the literal algorithm's residual falls the same way
        _, _, lit_residual = literal_textspan(C[:, h], T, k, 30)
        np.testing.assert_allclose(norms[1:], lit_residual, rtol=1e-9)


def test_planted_head_picks_its_two_texts_first():
    rng = np.random.default_rng(11)
    n, d, M = 500, 40, 300
    T = make_texts(M, d, seed=12)
    a, b = 37, 211                                    # the two texts the head varies along
    C = (rng.normal(size=(n, 1)) * 1.0 * T[a] + rng.normal(size=(n, 1)) * 0.6 * T[b]
         + rng.normal(size=d) + 1e-4 * rng.normal(size=(n, d)))
    idx, var = textspan(C, T, k=4, r=20)
    assert list(idx[:2]) == [a, b]
    assert var[:2].sum() > 0.999
    assert var[0] > var[1] > 100 * var[2]


def test_r_beyond_d_means_no_projection():
    C, T = make_heads(H=1, d=20, seed=13), make_texts(d=20, seed=14)
    idx, var = textspan_heads(C, T, k=5, r=80)
    lit_idx, lit_var, _ = literal_textspan(C[:, 0], T, 5, 20)
    np.testing.assert_array_equal(idx[0], lit_idx)
    np.testing.assert_allclose(var[0], lit_var, atol=1e-9)


def test_bad_arguments_say_what_to_do():
    C, T = make_heads(H=1), make_texts()
    with pytest.raises(ValueError, match="k must be between 1 and min"):
        textspan_heads(C, T, k=30, r=24)
    with pytest.raises(ValueError, match="r must be at least 1"):
        textspan_heads(C, T, k=3, r=0)
    with pytest.raises(ValueError, match="same model"):
        textspan_heads(C, T[:, :40], k=3, r=10)
    with pytest.raises(ValueError, match="3 dimensions"):
        textspan_heads(C[:, 0], T, k=3, r=10)
    with pytest.raises(ValueError, match="at least 2 images"):
        textspan_heads(C[:1], T, k=3, r=10)
    # six texts along three directions: a fourth step has nothing left to pick
    three_directions = np.concatenate([T[:3], -T[:3]])
    assert textspan_heads(C, three_directions, k=3, r=24)[0].shape == (1, 3)
    with pytest.raises(ValueError, match="after 3 texts"):
        textspan_heads(C, three_directions, k=4, r=24)


def test_benchmark_runs_and_agrees_with_the_literal_on_a_small_size():
    out = bench_textspan(heads=3, k=5, texts=200, images=300, d=64, r=16, literal_heads=1)
    assert out["same_texts_as_literal"] is True
    assert out["speedup"] > 0 and out["textspan_s"] > 0
    assert out["literal_heads_timed"] == 1


def test_rank_deficient_heads_are_capped_at_their_rank():
    """A head of rank 12 in d = 48 (like a head of dimension d_head < d): r = 80 is capped at 12,
    and the picks then match the float64 literal algorithm capped the same way."""
    rng = np.random.default_rng(21)
    n, d, q = 600, 48, 12
    F = rng.normal(size=(q, d))
    C = (rng.normal(size=(n, q)) * np.geomspace(1, 0.05, q) + rng.normal(size=q)) @ F   # mean in the row space
    C = C.astype(np.float32)                     # stored as float32: the tail is rounding noise
    T = make_texts(M=300, d=d, seed=22).astype(np.float32)
    idx, var, r_used = textspan_heads(C[:, None], T, k=8, r=80, with_rank=True)
    assert r_used.tolist() == [q]
    lit_idx, lit_var, _ = literal_textspan(C.astype(np.float64), T, 8, q)
    np.testing.assert_array_equal(idx[0], lit_idx)
    np.testing.assert_allclose(var[0], lit_var, atol=1e-6, rtol=0)   # the Gram accumulates in float32
    # max_rank (the head dimension) caps it further, and k may not exceed it
    assert textspan_heads(C[:, None], T, k=4, r=80, max_rank=6, with_rank=True)[2].tolist() == [6]
    with pytest.raises(ValueError, match="numerical rank 6 < k = 8"):
        textspan_heads(C[:, None], T, k=8, r=80, max_rank=6)


def test_exact_ties_go_to_the_lowest_text_row():
    C, T = make_heads(H=1, seed=31), make_texts(seed=32)
    best = textspan_heads(C, T, k=1, r=24)[0][0, 0]
    dup = np.concatenate([T[:2], T[best:best + 1], T])     # the winner at row 2 and again at row best + 3
    assert textspan_heads(C, dup, k=1, r=24)[0][0, 0] == 2


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_streamed_moments_give_the_same_texts(dtype):
    """HeadMoments fed in batches (the 1M-image path: warehouse.queries.head_vector_batches) picks
    what textspan_heads picks on the whole C; one float64 batch per head gives the same moments bit
    for bit (float32: to the rounding of the float32 Gram, whose kernel layout differs)."""
    from etl.text.textspan import HeadMoments, textspan_from_moments
    C, T = make_heads(seed=5).astype(dtype), make_texts(seed=6).astype(dtype)
    n, H, d = C.shape
    idx, var, dirs = textspan_heads(C, T, k=10, r=24, with_directions=True)
    whole = HeadMoments(H, d)
    for h in range(H):
        whole.add(h, C[:, h])
    i1, v1, d1 = textspan_from_moments(whole, T, k=10, r=24, with_directions=True)
    np.testing.assert_array_equal(i1, idx)
    np.testing.assert_allclose(v1, var, atol=1e-12 if dtype == np.float64 else 1e-6, rtol=0)
    if dtype == np.float64:
        np.testing.assert_array_equal(v1, var)
        np.testing.assert_array_equal(d1, dirs)
    parts = HeadMoments(H, d)
    for h in range(H):
        for a in range(0, n, 37):                          # uneven batches, heads interleaved by batch
            parts.add(h, C[a:a + 37, h])
    np.testing.assert_array_equal(parts.n.numpy(), np.full(H, n))
    np.testing.assert_allclose(parts.mu.numpy(), C.astype(np.float64).mean(0), atol=1e-6 if dtype == np.float32 else 1e-12)
    i2, v2 = textspan_from_moments(parts, T, k=10, r=24)
    np.testing.assert_array_equal(i2, idx)
    np.testing.assert_allclose(v2, var, atol=1e-5 if dtype == np.float32 else 1e-10, rtol=0)


def test_float32_gram_is_the_symmetric_half_flop_product(monkeypatch):
    """HeadMoments' float32 Gram (BLAS ssyrk on row parts in threads, one triangle mirrored) is
    (X - mu)^T (X - mu): exactly symmetric, equal to the float64 product up to float32 rounding, the
    same whether one part or several, and its centring buffer is reused."""
    from etl.text import textspan as ts
    X = np.random.default_rng(3).standard_normal((10_000, 48)).astype(np.float32) + 3
    mu = X.mean(0)
    G, buf = ts._centred_gram(X, mu)
    assert G.dtype == np.float64 and G.shape == (48, 48) and buf.shape == X.shape and buf.dtype == np.float32
    np.testing.assert_array_equal(G, G.T)
    Xc = X.astype(np.float64) - mu.astype(np.float64)
    ref = Xc.T @ Xc
    np.testing.assert_allclose(G, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    G2, buf2 = ts._centred_gram(X[:6000], mu, buf)                      # the buffer is used again, not grown
    assert buf2 is buf
    np.testing.assert_allclose(G2, Xc[:6000].T @ Xc[:6000], rtol=0, atol=1e-5 * np.abs(ref).max())
    monkeypatch.setattr(ts, "_gram_workers", lambda: 1)
    G1, _ = ts._centred_gram(X, mu)
    np.testing.assert_allclose(G1, G, rtol=0, atol=1e-5 * np.abs(ref).max())
    if ts._scipy_blas_threads(None) is not None:                        # the BLAS thread count is given back
        before = ts._scipy_blas_threads(None)
        monkeypatch.setattr(ts, "_gram_workers", lambda: 2)
        ts._centred_gram(X, mu)
        assert ts._scipy_blas_threads(None) == before
