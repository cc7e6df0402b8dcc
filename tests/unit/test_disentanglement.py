"""Heads as codes (etl/world/disentanglement.py): DCI and MIG on constructed importance matrices,
against the published formulas (disentanglement_lib's dci.py and mig.py, written out here from
their definitions), and the whole pipeline on heads whose answer is known."""
from collections import Counter

import numpy as np
import pytest
from scipy.stats import entropy as scipy_entropy

from etl.world.disentanglement import (basic_interval, code_scores, dci_completeness, dci_disentanglement, entropy_counts, mig,
                                       mutual_info_counts)
from etl.world.probes import joint_probe_predictions, probe_predictions


def published_d(r):
    """disentanglement_lib dci.disentanglement: per-code 1 - entropy (base F, +1e-11), weighted by row mass."""
    per_code = 1.0 - scipy_entropy(r.T + 1e-11, base=r.shape[1])
    if r.sum() == 0.0:
        r = np.ones_like(r)
    return float(np.sum(per_code * r.sum(axis=1) / r.sum()))


def published_c(r):
    per_factor = 1.0 - scipy_entropy(r + 1e-11, base=r.shape[0])
    if r.sum() == 0.0:
        r = np.ones_like(r)
    return float(np.sum(per_factor * r.sum(axis=0) / r.sum()))


def published_mig(m, h):
    s = np.sort(m, axis=0)[::-1]
    return float(np.mean((s[0, :] - s[1, :]) / h))


@pytest.mark.parametrize("n", [2, 5, 7])
def test_a_permutation_matrix_is_perfectly_disentangled_and_complete(n):
    r = np.eye(n)[np.random.default_rng(n).permutation(n)] * 0.7
    assert dci_disentanglement(r) == pytest.approx(1.0, abs=1e-12)
    assert dci_completeness(r) == pytest.approx(1.0, abs=1e-12)
    assert mig(r, np.full(n, 0.7)) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("shape", [(4, 3), (48, 7), (8, 8)])
def test_a_uniform_matrix_scores_zero(shape):
    r = np.full(shape, 0.3)
    assert dci_disentanglement(r) == pytest.approx(0.0, abs=1e-12)
    assert dci_completeness(r) == pytest.approx(0.0, abs=1e-12)
    assert mig(r, np.ones(shape[1])) == 0.0
    assert dci_disentanglement(np.zeros(shape)) == 0.0


def test_the_values_match_the_published_formulas_on_random_matrices():
    rng = np.random.default_rng(0)
    for trial in range(50):
        codes, factors = rng.integers(2, 50), rng.integers(2, 10)
        r = rng.random((codes, factors)) ** rng.uniform(0.5, 6)          # from flat to very peaked
        if trial % 7 == 0:
            r[rng.integers(codes)] = 0.0                                  # a code that serves nothing
        assert dci_disentanglement(r) == pytest.approx(published_d(r), abs=1e-8)
        assert dci_completeness(r) == pytest.approx(published_c(r), abs=1e-8)
        h = r.max(0) + rng.random(factors)
        assert mig(r, h) == pytest.approx(published_mig(r, h), abs=1e-12)


def test_plug_in_information_matches_the_definition_on_random_labels():
    rng = np.random.default_rng(1)
    for _ in range(20):
        n, V = rng.integers(5, 300), rng.integers(1, 9)
        y = rng.integers(0, V, n)
        yhat = np.where(rng.random(n) < 0.5, y, rng.integers(0, V, n))
        joint, py, pp = Counter(zip(y, yhat)), Counter(y), Counter(yhat)
        want = sum(c / n * np.log((c / n) / (py[a] / n * pp[b] / n)) for (a, b), c in joint.items())
        counts = np.zeros((V, V))
        np.add.at(counts, (y, yhat), 1)
        assert mutual_info_counts(counts) == pytest.approx(max(want, 0.0), abs=1e-12)
        assert entropy_counts(counts.sum(1)) == pytest.approx(scipy_entropy(np.bincount(y, minlength=V)), abs=1e-12)


def _heads(n=1200, d=12, seed=0):
    """Three factors; head (0, 0) carries colour, (0, 1) shape, (1, 0) both, (1, 1) nothing.
    Returns head_cls [n, 2, 2, d], factors."""
    rng = np.random.default_rng(seed)
    f = {"color": rng.integers(0, 4, n), "shape": rng.integers(0, 3, n), "count": rng.integers(0, 2, n)}
    x = rng.normal(size=(n, 2, 2, d)) * 0.3
    mc, ms = rng.normal(size=(4, d)) * 3, rng.normal(size=(3, d)) * 3
    x[:, 0, 0] += mc[f["color"]]
    x[:, 0, 1] += ms[f["shape"]]
    x[:, 1, 0] += mc[f["color"]] + ms[f["shape"]]
    return x, {k: v.tolist() for k, v in f.items()}


def test_known_heads_give_the_expected_scores_with_intervals_around_them():
    x, f = _heads()
    hp, jp = probe_predictions(x, f, seed=0), joint_probe_predictions(x, f, seed=0)
    s = code_scores(hp, jp, len(x), n_boot=100, seed=0)
    # colour and shape are each read from one head perfectly; count from none
    assert s.info[0, 0] == pytest.approx(1.0, abs=0.02) and s.info[1, 1] == pytest.approx(1.0, abs=0.02)
    assert s.info[:, 2].max() < 0.02 and s.info[3].max() < 0.02
    assert s.value["informativeness"] == pytest.approx(2 / 3, abs=0.02)
    assert s.value["dci_i"] == pytest.approx(2 / 3, abs=0.03)          # the joint probe: colour, shape, not count
    # head (1, 0) carries colour and shape alike: MIG of both is ~0, of count ~0
    assert abs(s.value["mig"]) < 0.05
    for k in s.value:
        assert s.lo[k] <= s.hi[k] and s.hi[k] - s.lo[k] < 0.1, (k, s.lo[k], s.hi[k])
    assert s.lo["informativeness"] <= 2 / 3 <= s.hi["informativeness"] + 0.01     # covers the true value
    again = code_scores(hp, jp, len(x), n_boot=100, seed=0)
    assert again.lo == s.lo and again.hi == s.hi


def test_a_model_without_information_is_uninformative():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(800, 2, 3, 8))
    f = {"a": rng.integers(0, 3, 800).tolist(), "b": rng.integers(0, 4, 800).tolist()}
    s = code_scores(probe_predictions(x, f), joint_probe_predictions(x, f), 800, n_boot=50)
    assert s.value["informativeness"] < 0.05 and abs(s.value["dci_i"]) < 0.1


def test_the_basic_interval_reflects_the_replicates_around_the_estimate():
    boot = np.array([0.50, 0.52, 0.54, 0.56, 0.58] * 40)
    lo, hi = basic_interval(0.50, boot, level=0.8)
    q10, q90 = np.percentile(boot, [10, 90])
    assert (lo, hi) == pytest.approx((1.0 - q90, 1.0 - q10))         # shifted down: the replicates ran high
    assert basic_interval(0.99, boot + 0.45) == (pytest.approx(1.98 - np.percentile(boot + 0.45, 97.5)), 1.0)
    assert basic_interval(0.0, np.array([0.2, 0.3]))[0] == 0.0               # clipped at the lower bound
    assert np.isnan(basic_interval(0.5, np.array([np.nan]))[0])
