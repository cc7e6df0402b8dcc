"""The size study's statistics (etl/world/study.py) on constructed numbers."""
import itertools
import math

import numpy as np
import pytest

from etl.world import study as S


def _rows(values: dict[str, tuple[str, int, list[float]]], score="kappa"):
    return [dict(model_id=m, size=size, image_params=p, score=score, value=v)
            for m, (size, p, vs) in values.items() for v in vs]


def test_per_model_means_worlds_and_sizes_get_t_intervals_over_seeds():
    models = S.per_model(_rows({"a": ("4 x 64", 1e5, [0.5, 0.7]), "b": ("4 x 64", 1e5, [0.8, 0.8]),
                                "c": ("4 x 64", 1e5, [0.9, 0.7]), "d": ("8 x 192", 2e6, [0.9, float("nan")])}))
    assert models[("a", "kappa")]["value"] == pytest.approx(0.6) and models[("d", "kappa")]["worlds"] == 1
    sizes = {r["size"]: r for r in S.summarise_sizes(models)}
    v = np.array([0.6, 0.8, 0.8])
    half = 4.303 * v.std(ddof=1) / math.sqrt(3)                   # t(0.975, 2 df)
    assert sizes["4 x 64"]["n_models"] == 3 and sizes["4 x 64"]["mean"] == pytest.approx(v.mean())
    assert (sizes["4 x 64"]["lo"], sizes["4 x 64"]["hi"]) == (pytest.approx(v.mean() - half), 1.0)   # kappa <= 1
    assert v.mean() + half > 1
    assert sizes["8 x 192"]["n_models"] == 1 and math.isnan(sizes["8 x 192"]["lo"])     # one seed: no interval
    rates = {r["size"]: r for r in S.summarise_sizes(S.per_model(_rows(
        {"a": ("4 x 64", 1e5, [0.0]), "b": ("4 x 64", 1e5, [0.0]), "c": ("4 x 64", 1e5, [0.125])}, "invented_rate")))}
    assert rates["4 x 64"]["lo"] == 0.0 and rates["4 x 64"]["hi"] < 1           # clipped to the rate's range
    assert S.size_of("random", 6, 128) == S.RANDOM and S.size_of("bundled", 6, 128) == "6 x 128"


def test_the_trend_is_least_squares_on_log10_params_with_an_exact_permutation_p():
    params = [1e5, 1e5, 1e6, 1e6, 1e7, 1e7]
    y = [0.1, 0.2, 0.4, 0.5, 0.7, 0.8]
    fit = S.trend(params, y)
    x = np.log10(params)
    slope, icept = np.polyfit(x, y, 1)
    resid = np.array(y) - (slope * x + icept)
    se = math.sqrt(resid @ resid / 4 / ((x - x.mean()) @ (x - x.mean())))
    assert fit.slope == pytest.approx(slope) and (fit.lo, fit.hi) == (pytest.approx(slope - 2.776 * se),
                                                                      pytest.approx(slope + 2.776 * se))
    perms = [np.polyfit(x, np.array(y)[list(p)], 1)[0] for p in itertools.permutations(range(6))]
    assert fit.p_value == pytest.approx(np.mean(np.abs(perms) >= abs(slope) - 1e-12))
    assert fit.n == 6 and fit.n_sizes == 3
    assert fit.p_min == pytest.approx(np.mean(np.abs(perms) >= np.max(np.abs(perms)) - 1e-12))
    assert math.isnan(S.trend([1e5, 1e6], [0.1, 0.2]).slope)                 # fewer than 3 models
    assert math.isnan(S.trend([1e5] * 4, [0.1, 0.2, 0.3, 0.4]).slope)        # one size


def test_verdicts_are_stated_whichever_way_they_go():
    up = S.Definition("mig", +1, "each factor's best head stands out")
    down = S.Definition("paper_entanglement", -1, "few heads repeat a property")
    rising = S.trend([1e5, 1e5, 1e6, 1e6, 1e7, 1e7, 1e7], [0.1, 0.15, 0.4, 0.45, 0.7, 0.8, 0.75])
    assert "larger models are more interpretable" in S.verdict(up, rising)
    assert "larger models are less interpretable" in S.verdict(down, rising)
    flat = S.trend([1e5, 1e5, 1e6, 1e6, 1e7, 1e7], [0.5, 0.2, 0.4, 0.1, 0.3, 0.45])
    assert "no trend with size" in S.verdict(up, flat)
    few = S.trend([1e5, 1e5, 1e6, 1e7], [0.1, 0.15, 0.5, 0.9])             # 4 models: p cannot fall below 2/24
    assert few.p_min == pytest.approx(2 / 24) and few.p_value == pytest.approx(2 / 24)
    assert "cannot tell yet: with 4 models no ordering of the scores reaches p < 0.05 (the smallest possible p is " \
           "0.083); the estimate points to larger models being more interpretable" in S.verdict(up, few)
    assert S.verdict(up, S.trend([1e5, 1e6], [0.1, 0.2])).endswith("the study cannot tell (fewer than 3 trained "
                                                                      "models with this score).")
    fits = S.study_fits(S.per_model(_rows({"a": ("4 x 64", 1e5, [0.1]), "b": ("6 x 128", 1e6, [0.5]),
                                           "c": ("8 x 192", 1e7, [0.9]), "r": (S.RANDOM, 1e6, [0.0])}, "mig")))
    mig = next(f for f in fits if f["score"] == "mig")
    assert mig["n_models"] == 3 and mig["slope"] == pytest.approx(0.4)      # the random control stays out
    pooled = S.size_of("bundled", 6, 128, "map")
    assert pooled == "6 x 128, map pool" and S.size_of("bundled", 6, 128, "tok") == "6 x 128"
    assert not S.in_trend(pooled) and not S.in_trend(S.RANDOM) and S.in_trend("6 x 128")
    fits = S.study_fits(S.per_model(_rows({"a": ("4 x 64", 1e5, [0.1]), "b": ("6 x 128", 1e6, [0.5]),
                                           "c": ("8 x 192", 1e7, [0.9]), "m": (pooled, 1e6, [0.0])}, "mig")))
    mig = next(f for f in fits if f["score"] == "mig")
    assert mig["n_models"] == 3 and mig["slope"] == pytest.approx(0.4)      # another architecture stays out too
    assert len(fits) == len(S.DEFINITIONS) and all(f["verdict"] for f in fits)
