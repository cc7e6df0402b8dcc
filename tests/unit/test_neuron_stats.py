"""The neurons job's streamed statistics (etl/neuron_stats.py), the sparse text decomposition
(etl/text/sparse.py) and the streamed eta2 (etl.world.probes.FactorVariance), each against a
direct computation on explicit effects phi = alpha U."""
from __future__ import annotations

import numpy as np
import pytest

from etl.neuron_stats import LayerAccumulator, histograms, share_matters
from etl.world.probes import FactorVariance, factor_variance


@pytest.fixture(scope="module")
def problem():
    """N neurons, K later heads, d dims, n images; a few images carry large effects."""
    rng = np.random.default_rng(3)
    N, K, d, n = 7, 5, 11, 240
    U = rng.normal(size=(N, K, d))
    U[2, 3] = U[2, 1]                                                  # a rank-deficient neuron
    alpha = rng.normal(size=(n, N, K)) * 0.1
    alpha[rng.choice(n, 6, replace=False)] += rng.normal(size=(6, N, K)) * 3
    colour = rng.integers(0, 3, n)
    alpha[:, 4, :3] += 2 * np.eye(3)[colour]                              # neuron 4's effect follows colour
    labels = {"color": [str(c) for c in colour], "size": [str(v) for v in rng.integers(0, 2, n)]}
    labels["size"][5] = None
    return U, alpha.astype(np.float32), labels


def _run(U, alpha, labels, batch, M=20):
    acc = LayerAccumulator(np.einsum("nkd,njd->nkj", U, U), pc_images=M, factors=True)
    for a in range(0, len(alpha), batch):
        acc.add(alpha[a:a + batch], {f: v[a:a + batch] for f, v in labels.items()})
    return acc.finish(lambda sl: U[sl], chunk=3)


def test_streamed_statistics_equal_the_direct_ones(problem):
    U, alpha, labels = problem
    phi = np.einsum("bnk,nkd->bnd", alpha.astype(np.float64), U)              # [n, N, d]
    norms = np.linalg.norm(phi, axis=-1)                                      # [n, N]
    res = _run(U, alpha, labels, batch=17)
    assert res.n_images == len(alpha)
    assert np.allclose(res.mean_norm, norms.mean(0), rtol=1e-5)
    assert np.allclose(res.q90, np.quantile(norms, 0.9, axis=0), rtol=1e-5)
    assert np.allclose(res.max_norm, norms.max(0), rtol=1e-5)
    assert np.allclose(res.mean_effect, phi.mean(0), atol=1e-5)
    assert np.allclose(res.head_effect, np.abs(alpha).mean(0) * np.linalg.norm(U, axis=-1), rtol=1e-5)
    for n in range(U.shape[0]):
        top = np.argsort(-norms[:, n], kind="stable")[:20]
        assert list(res.top_index[n]) == list(top)
        assert np.allclose(res.top_norm[n], norms[top, n], rtol=1e-5)
        # pc: the first right singular vector of the top images' phi, signed by their mean projection
        _, s, vt = np.linalg.svd(phi[top, n], full_matrices=False)
        ref = vt[0] * np.sign((phi[top, n] @ vt[0]).mean())
        assert np.allclose(res.pc[n], ref, atol=1e-5), n
        assert np.allclose(res.top_projection[n], phi[top, n] @ ref, atol=1e-4)
        assert res.pc_share[n] == pytest.approx(s[0] ** 2 / (s ** 2).sum(), abs=1e-6)
    # eta2 of the effects, as the heads' factor_variance computes it on explicit vectors
    direct = {(r["head"], r["factor"]): r["eta2"] for r in factor_variance(phi[:, None], labels)}
    for f, e in res.eta2.items():
        assert np.allclose(e, [direct[(n, f)] for n in range(U.shape[0])], atol=1e-6), f
    assert res.eta2["color"][4] > 0.5 > res.eta2["color"][0]
    # the batch size changes nothing
    other = _run(U, alpha, labels, batch=240)
    assert np.allclose(other.pc, res.pc, atol=1e-6) and np.allclose(other.share_matters, res.share_matters)


def test_head_effects_of_paths_through_pool_heads(problem):
    """With P = K heads x M pool heads (an attention-pooled tower), a head's effect is the norm of
    the sum over its M paths, per image, averaged: mean_I ||sum_m alpha[(k, m)] u[(k, m)]||."""
    U, alpha, labels = problem                                        # P = 5 paths: not 2 per head
    with pytest.raises(ValueError, match="5 paths do not split into heads of 2 pool heads"):
        LayerAccumulator(np.einsum("nkd,njd->nkj", U, U), groups=2)
    U4, a4 = U[:, :4], alpha[:, :, :4]                                # 2 heads x 2 pool heads
    acc = LayerAccumulator(np.einsum("nkd,njd->nkj", U4, U4), pc_images=10, groups=2)
    for a in range(0, len(a4), 50):
        acc.add(a4[a:a + 50])
    res = acc.finish(lambda sl: U4[sl], chunk=3)
    per_head = np.einsum("bnkm,nkmd->bnkd", a4.reshape(len(a4), -1, 2, 2).astype(np.float64),
                         U4.reshape(U4.shape[0], 2, 2, -1))           # [n, N, 2, d]
    assert res.head_effect.shape == (U.shape[0], 2)
    assert np.allclose(res.head_effect, np.linalg.norm(per_head, axis=-1).mean(0), rtol=1e-5)
    # not the sum of the paths' own norms (the paths interfere)
    paths = np.abs(a4).mean(0) * np.linalg.norm(U4, axis=-1)
    assert not np.allclose(res.head_effect, paths.reshape(-1, 2, 2).sum(-1), rtol=1e-2)


def test_share_matters_and_histograms():
    norms = np.zeros((100, 3))
    norms[:, 0] = 1.0                                   # uniform: 90 of 100 images hold 90 %
    norms[:2, 1] = 10.0                                 # two images hold everything
    assert np.allclose(share_matters(norms), [0.90, 0.02, 0.0])
    top, counts = histograms(np.array([[0.0, 1.0], [0.5, 1.0], [1.0, 1.0], [0.25, 3.0]]), bins=4)
    assert list(top) == [1.0, 3.0]
    assert counts.tolist() == [[1, 1, 1, 1], [0, 3, 0, 1]]


def test_factor_variance_accumulates_like_one_batch():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(90, 2, 3, 4)) + 50.0                        # a large common offset
    f = {"a": [str(v) for v in rng.integers(0, 3, 90)]}
    f["a"][7] = None
    acc = FactorVariance()
    for a in range(0, 90, 13):
        acc.add(x[a:a + 13], {"a": f["a"][a:a + 13]})
    one = {(r["layer"], r["head"]): r["eta2"] for r in factor_variance(x, f)}
    assert acc.known("a") == 89
    assert np.allclose(acc.eta2()["a"], [[one[(l, h)] for h in range(3)] for l in range(2)], atol=1e-10)


def test_sparse_texts_recover_a_planted_combination_and_report_r2():
    from etl.text.sparse import sparse_texts
    rng = np.random.default_rng(1)
    T = rng.normal(size=(300, 24))
    T /= np.linalg.norm(T, axis=1, keepdims=True)
    v = 0.7 * T[10] - 0.4 * T[200] + 0.2 * T[33]
    noisy = rng.normal(size=24)
    sp = sparse_texts(np.stack([v, noisy]), T, 3)
    assert set(sp.index[0]) == {10, 200, 33} and sp.r2[0] == pytest.approx(1.0, abs=1e-10)
    scale = np.linalg.norm(v)
    assert dict(zip(sp.index[0], sp.coef[0] * scale)) == pytest.approx({10: 0.7, 200: -0.4, 33: 0.2}, abs=1e-9)
    # r2 = cos^2 of the direction and its least-squares reconstruction on the chosen texts; gains sum to it
    u = noisy / np.linalg.norm(noisy)
    A = T[sp.index[1]]
    c, *_ = np.linalg.lstsq(A.T, u, rcond=None)
    assert sp.r2[1] == pytest.approx(1 - np.sum((u - c @ A) ** 2), abs=1e-10)
    assert sp.gain.sum(1) == pytest.approx(sp.r2, abs=1e-12)
    assert sp.gain[1][0] == pytest.approx(float(np.max(np.abs(T @ u))) ** 2, abs=1e-10)   # greedy first pick
    with pytest.raises(ValueError, match="k = 301: choose between 1 and the bank's 300 texts"):
        sparse_texts(v[None], T, 301)
