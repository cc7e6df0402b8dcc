"""Per-head linear probes on cases where the answer is known."""
import numpy as np
import pytest

from etl.world.probes import format_matrix, probe_matrix, split_indices


def _synthetic(n=800, d=16, seed=0):
    """head (layer 1, head 2) encodes factor 'color' linearly; head (0, 1) encodes 'shape'
    through a random rotation; everything else is noise. Returns head_cls [n, 2, 3, d], factors."""
    rng = np.random.default_rng(seed)
    color = rng.integers(0, 4, n)
    shape = rng.integers(0, 3, n)
    x = rng.normal(size=(n, 2, 3, d)).astype(np.float32)
    means = rng.normal(size=(4, d)) * 3
    x[:, 1, 2] += means[color]
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    x[:, 0, 1] = (np.eye(d)[shape] * 4 + rng.normal(size=(n, d)) * 0.5) @ q
    names_c = np.array(["red", "green", "blue", "pink"])
    return x, {"color": list(names_c[color]), "shape": [int(v) for v in shape]}


def _acc(rows, layer, head, factor):
    (r,) = [r for r in rows if (r["layer"], r["head"], r["factor"]) == (layer, head, factor)]
    return r


def test_encoding_head_is_found_and_noise_heads_sit_at_chance():
    x, f = _synthetic()
    rows = probe_matrix(x, f, seed=0, layers=[10, 11])
    assert len(rows) == 2 * 3 * 2
    assert {r["layer"] for r in rows} == {10, 11}
    good = _acc(rows, 11, 2, "color")
    assert good["accuracy"] > 0.95
    assert _acc(rows, 10, 1, "shape")["accuracy"] > 0.95
    for r in rows:
        if (r["layer"], r["head"]) not in ((11, 2), (10, 1)) or \
                ((r["layer"], r["head"]) == (11, 2) and r["factor"] == "shape"):
            # noise: no better than chance plus sampling slack (200 test images)
            assert r["accuracy"] < r["chance"] + 0.12, r
    for r in rows:
        assert r["n_train"] + r["n_test"] == 800 and r["n_test"] == 200


def test_chance_is_the_majority_class_rate_on_the_test_split():
    x, f = _synthetic(n=400)
    labels = ["a"] * 300 + ["b"] * 100
    f = {"skewed": labels}
    rows = probe_matrix(x, f, seed=3)
    tr, te = split_indices(400, 3 + 0, 0.25)
    y = np.array(labels)
    assert rows[0]["chance"] == pytest.approx(float((y[te] == "a").mean()))
    assert all(r["chance"] == rows[0]["chance"] for r in rows)


def test_deterministic_by_seed_and_seed_changes_the_split():
    x, f = _synthetic(n=300)
    a = probe_matrix(x, f, seed=1)
    b = probe_matrix(x, f, seed=1)
    c = probe_matrix(x, f, seed=2)
    assert a == b
    assert [r["accuracy"] for r in a] != [r["accuracy"] for r in c]


def test_unknown_labels_are_skipped_and_single_class_is_trivial():
    x, f = _synthetic(n=200)
    col = list(f["color"])
    col[:50] = [None] * 50
    rows = probe_matrix(x, {"color": col, "const": ["x"] * 200}, seed=0)
    assert all(r["n_train"] + r["n_test"] == 150 for r in rows if r["factor"] == "color")
    assert all(r["accuracy"] == 1.0 and r["chance"] == 1.0 for r in rows if r["factor"] == "const")


def test_bad_input_is_refused_clearly():
    x, f = _synthetic(n=100)
    with pytest.raises(ValueError, match=r"\[n, layers, heads, d\]"):
        probe_matrix(x[:, 0], f, seed=0)
    with pytest.raises(ValueError, match="labels for 100 images"):
        probe_matrix(x, {"color": f["color"][:10]}, seed=0)
    with pytest.raises(ValueError, match="layers"):
        probe_matrix(x, f, seed=0, layers=[1, 2, 3])
    with pytest.raises(ValueError, match="empty"):
        probe_matrix(x, {}, seed=0)
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        probe_matrix(bad, f, seed=0)


def test_format_matrix_has_a_row_per_head_and_the_chance_row():
    x, f = _synthetic(n=200)
    text = format_matrix(probe_matrix(x, f, seed=0, layers=[4, 5]))
    lines = text.splitlines()
    assert lines[0].split() == ["head", "color", "shape"]
    assert [ln.split()[0] for ln in lines[1:-1]] == ["L4.H0", "L4.H1", "L4.H2", "L5.H0", "L5.H1", "L5.H2"]
    assert lines[-1].startswith("chance")


def test_cross_fitted_predictions_cover_every_known_image_once_and_find_the_encoding_head():
    from etl.world.probes import joint_probe_predictions, probe_predictions
    x, f = _synthetic(n=400)
    f["shape"][7] = None                                    # an unknown value is skipped
    for preds in (probe_predictions(x, f, seed=2, folds=4), joint_probe_predictions(x, f, seed=2, folds=4)):
        by = {p.factor: p for p in preds}
        assert sorted(by["color"].test) == list(range(400))
        assert sorted(by["shape"].test) == [i for i in range(400) if i != 7]
        assert by["color"].pred.shape[1] == 400 and by["color"].n_train == 300
    head = {p.factor: (p.pred == p.y[None]).mean(1) for p in probe_predictions(x, f, seed=2, folds=4)}
    assert head["color"][1 * 3 + 2] > 0.95 and head["shape"][0 * 3 + 1] > 0.95      # layer-major head order
    joint = {p.factor: float((p.pred[0] == p.y).mean()) for p in joint_probe_predictions(x, f, seed=2, folds=4)}
    assert joint["color"] > 0.95 and joint["shape"] > 0.95
    with pytest.raises(ValueError, match="folds must be in"):
        probe_predictions(x, f, folds=1)


def _einsum_ridge_predict(xf, yf, xs, lams):
    """The ridge fits as first written (numpy einsum, no BLAS): the reference the batched products replace."""
    gram = np.einsum("gnp,gnq->gpq", xf, xf)
    evals, evecs = np.linalg.eigh(gram)
    xty = np.einsum("gnp,nk->gpk", xf, yf)
    proj = np.einsum("gpq,gpk->gqk", evecs, xty)
    out = []
    for lam in lams:
        w = np.einsum("gpq,gqk->gpk", evecs, proj / (evals[..., None] + lam))
        out.append([np.einsum("gmp,gpk->gmk", x, w) for x in xs])
    return out


def test_batched_blas_probes_equal_the_einsum_reference(monkeypatch):
    """The probes run their ridge systems as batched BLAS products on one BLAS thread (etl/blas.py):
    every accuracy equals the einsum spelling's, on heads with signal and on noise heads alike."""
    from etl.threads import numpy_blas_threads_now
    from etl.world import probes
    x, f = _synthetic(n=600, d=24, seed=3)
    f["size"] = [i % 2 for i in range(600)]
    before = numpy_blas_threads_now()
    fast = probes.probe_matrix(x, f, seed=5)
    assert numpy_blas_threads_now() == before                 # the thread count is restored
    xf = np.random.default_rng(1).normal(size=(4, 50, 9))
    yf = np.eye(3)[np.arange(50) % 3]
    blas = probes._ridge_predict(xf, yf, [xf[:, :7]], [0.5, 5.0])
    ref = _einsum_ridge_predict(xf, yf, [xf[:, :7]], [0.5, 5.0])
    for b, r in zip(blas, ref):
        np.testing.assert_allclose(b[0], r[0], rtol=1e-10, atol=1e-12)
    monkeypatch.setattr(probes, "_ridge_predict", _einsum_ridge_predict)
    assert fast == probes.probe_matrix(x, f, seed=5)
