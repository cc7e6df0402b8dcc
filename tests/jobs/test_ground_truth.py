"""Ground truth on the shapes world (MATH.md §3, §4, §7): eta2, the world bank, the labeler's
shuffled-tag null, the truth views, and exact TextSpan on a warehouse built from the toy model."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from etl.world import shapes
from etl.text.labelers import MIXED, HeadText, OfflineLabeler
from etl.world.probes import factor_variance
from etl.text.bank import PROPERTIES, WORLD_FACTOR_PROPERTIES, world_bank, world_texts
from tests.jobs.test_text_jobs import q


# --------------------------------------------------------------------------- eta2

def _eta2_loop(x, labels):
    """MATH.md §7 written out: x [n, d], labels [n] -> eta2."""
    xc = x - x.mean(0)
    between = sum((np.asarray(labels) == v).sum() * np.sum(xc[np.asarray(labels) == v].mean(0) ** 2)
                  for v in set(labels))
    return between / np.sum(xc ** 2)


def test_eta2_matches_its_definition_and_finds_a_planted_factor():
    rng = np.random.default_rng(0)
    n, d = 900, 12
    color = rng.integers(0, 4, n)
    size = rng.integers(0, 2, n)
    x = rng.normal(size=(n, 2, 3, d))
    x[:, 1, 2] += rng.normal(size=(4, d))[color] * 3          # head (1, 2) carries colour
    factors = {"color": [str(c) for c in color], "size": [str(s) for s in size]}
    rows = factor_variance(x, factors, layers=[4, 5])
    assert len(rows) == 2 * 3 * 2
    got = {(r["layer"], r["head"], r["factor"]): r["eta2"] for r in rows}
    for (layer, head, factor), eta in got.items():
        li = [4, 5].index(layer)
        assert eta == pytest.approx(_eta2_loop(x[:, li, head], factors[factor]), abs=1e-12)
        assert 0.0 <= eta <= 1.0
    assert got[(5, 2, "color")] > 0.85 and got[(5, 2, "size")] < 0.01
    assert max(v for k, v in got.items() if k[:2] != (5, 2)) < 0.02


def test_eta2_leaves_out_unknown_labels_and_checks_shapes():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 1, 1, 5))
    labels = ["a", "b"] * 20
    labels[3] = None
    (row,) = factor_variance(x, {"f": labels})
    keep = [i for i, v in enumerate(labels) if v is not None]
    assert row["eta2"] == pytest.approx(_eta2_loop(x[keep, 0, 0], [labels[i] for i in keep]))
    with pytest.raises(ValueError, match=r"\[n, layers, heads, d\]"):
        factor_variance(x[:, 0], {"f": labels})
    with pytest.raises(ValueError, match="has 3 labels for 40 images"):
        factor_variance(x, {"f": ["a", "b", "a"]})


# --------------------------------------------------------------------------- the world bank

def test_world_bank_covers_every_factor_value_with_one_property_each():
    bank = world_bank()
    texts = [t for t, _ in bank]
    assert len(texts) == len(set(texts)) > 500
    assert set(WORLD_FACTOR_PROPERTIES) == set(shapes.FACTORS)
    assert len(set(WORLD_FACTOR_PROPERTIES.values())) == len(shapes.FACTORS)      # one property per factor
    assert set(WORLD_FACTOR_PROPERTIES.values()) <= set(PROPERTIES)
    tag = dict(bank)
    for factor, values in shapes.FACTORS.items():
        for value in values:
            own = world_texts(factor, value)
            assert len(own) >= 6, (factor, value)
            assert {tag[t] for t in own} == {WORLD_FACTOR_PROPERTIES[factor]}
    # a background colour is a background text, never a colour text
    assert all(tag[t] == "backgrounds" for t in texts if re.search(r"\b(white|black) background\b", t))
    assert all(tag[t] == "backgrounds" for t in texts if "sky" in t or "grass" in t or "water" in t)


def test_world_bank_speaks_the_training_vocabulary():
    """Every word of the bank occurs in the captions the toy models were trained on."""
    rng = np.random.default_rng(0)
    vocab = set()
    for i in range(4000):
        f = shapes.sample_factors(rng)
        vocab |= set(shapes.caption_parts(f, rng, 0.5)[0].replace(",", "").split())
        vocab |= set(shapes.caption_parts(f, rng, 0.0)[0].replace(",", "").split())
    words = {w for t, _ in world_bank() for w in t.replace(",", "").split()}
    assert words - vocab == set()


# --------------------------------------------------------------------------- the labeler's null

VOCAB = ["colors", "positions", "shapes", "backgrounds"]
BANK_TAGS = ["colors"] * 100 + ["positions"] * 150 + ["shapes"] * 50 + ["backgrounds"] * 150


def _texts(tags, var):
    return [HeadText(f"t{i}", t, v) for i, (t, v) in enumerate(zip(tags, var))]


def test_agreeing_texts_beat_shuffled_tags_and_one_heavy_text_does_not():
    lab = OfflineLabeler(VOCAB, threshold=0.5, bank_tags=BANK_TAGS, alpha=0.05, permutations=2000)
    even = [0.1] * 10
    agree = lab.label(_texts(["colors"] * 9 + ["shapes"], even))
    assert agree.property == "colors" and agree.confidence == pytest.approx(0.9) and agree.p_value < 0.001
    # one text with 60 % of the weight, the rest scattered: the share is 0.6, but shuffled tags reach it
    heavy = lab.label(_texts(["colors", "shapes", "positions", "backgrounds"] * 2 + ["shapes", "positions"],
                             [0.6] + [0.4 / 9] * 9))
    assert heavy.confidence >= 0.6 and heavy.p_value > 0.5 and heavy.property == MIXED
    raw = json.loads(agree.raw)
    assert raw["p_value"] == agree.p_value and raw["alpha"] == 0.05


def test_null_p_value_is_exact_for_a_one_property_bank_and_reproducible():
    one = OfflineLabeler(VOCAB, bank_tags=["colors"] * 40, permutations=500)
    assert one.label(_texts(["colors"] * 5, [0.2] * 5)).p_value == 1.0     # shuffling changes nothing
    a = OfflineLabeler(VOCAB, bank_tags=BANK_TAGS, permutations=3000, seed=4)
    b = OfflineLabeler(VOCAB, bank_tags=BANK_TAGS, permutations=3000, seed=4)
    texts = _texts(["colors"] * 6 + ["positions"] * 4, np.linspace(0.2, 0.05, 10))
    assert a.label(texts).p_value == b.label(texts).p_value
    # Monte Carlo against the exact hypergeometric tail for equal weights: P(>= 6 of 10 from one tag)
    from math import comb
    exact_colors = sum(comb(100, j) * comb(350, 10 - j) for j in range(6, 11)) / comb(450, 10)
    p = a.label(_texts(["colors"] * 6 + ["positions"] * 4, [0.1] * 10)).p_value
    assert p >= exact_colors                    # max over properties: at least the one-property tail
    assert p == pytest.approx(exact_colors + 2 * sum(comb(150, j) * comb(300, 10 - j) for j in range(6, 11))
                              / comb(450, 10) + sum(comb(50, j) * comb(400, 10 - j) for j in range(6, 11))
                              / comb(450, 10), abs=0.012)
    with pytest.raises(ValueError, match="alpha"):
        OfflineLabeler(VOCAB, bank_tags=BANK_TAGS, alpha=0)


# --------------------------------------------------------------------------- the truth views

def test_truth_views_count_right_and_false_labels(tmp_path):
    from warehouse import writer
    wh = tmp_path / "w.duckdb"
    eta = {  # (layer, head) -> {factor: eta2}
        (0, 0): {"color": 0.7, "shape": 0.1},              # specialised colour, labelled colors: right
        (0, 1): {"color": 0.5, "shape": 0.2},              # 0.5 < 3 x 0.2: unspecialised; 'shapes' has 0.2: not false
        (0, 2): {"background": 0.45, "color": 0.05},       # specialised background, labelled colors: wrong
        (1, 0): {"position": 0.3, "count": 0.1},           # unspecialised, labelled shapes (0 eta2): false
        (1, 1): {"position": 0.1, "count": 0.05},          # unspecialised, mixed: neither
    }
    labels = {(0, 0): "colors", (0, 1): "shapes", (0, 2): "colors", (1, 0): "shapes", (1, 1): MIXED}
    with writer(str(wh)) as con:
        con.executemany("INSERT INTO factor_properties VALUES (?, ?)", list(WORLD_FACTOR_PROPERTIES.items()))
        for (l, h), fs in eta.items():
            for f, e in fs.items():
                con.execute("INSERT INTO head_factor_variance (model_id, dataset_id, layer, head, factor, eta2) "
                            "VALUES ('m', 'shapes:9:seed=9', ?, ?, ?, ?)", [l, h, f, e])
        for (l, h), p in labels.items():
            con.execute("INSERT INTO head_labels (model_id, layer, head, property, labeler) VALUES ('m', ?, ?, ?, "
                        "'offline')", [l, h, p])
    truth = {(l, h): (tf, sp) for l, h, tf, sp in q(wh, "SELECT layer, head, true_factor, specialised FROM head_truth")}
    assert truth == {(0, 0): ("color", True), (0, 1): (None, False), (0, 2): ("background", True),
                     (1, 0): (None, False), (1, 1): (None, False)}
    (row,) = q(wh, "SELECT n_heads, n_specialised, n_right, n_unspecialised, n_false, agreement, false_label_rate "
                   "FROM label_agreement")
    assert row == (5, 2, 1, 3, 1, 0.5, pytest.approx(1 / 3))


# --------------------------------------------------------------------------- a real toy warehouse

def test_stored_textspan_is_what_a_float64_literal_picks(toy_warehouse):
    """MATH.md §3 literally, in float64 numpy, from the warehouse's own head and text embeddings
    (r capped at the stored r): the same first 5 texts in the same order for every head."""
    wh = toy_warehouse
    text_ids, T = zip(*q(wh, "SELECT e.text_id, e.vec FROM text_embeddings e JOIN texts t USING (text_id) "
                             "WHERE t.bank = 'shapes' ORDER BY e.text_id"))
    T = np.array(T, dtype=np.float64)
    heads = q(wh, "SELECT layer, head, list(text_id ORDER BY rank), any_value(r) FROM head_texts "
                  "GROUP BY layer, head ORDER BY layer, head")
    assert len(heads) == 24
    slots = same = 0
    for layer, head, stored, r in heads:
        assert r == 32                                   # the toy's head dimension: its numerical rank
        C = np.array([v for (v,) in q(wh, "SELECT vec FROM head_embeddings WHERE layer = ? AND head = ? "
                                          "ORDER BY image_id", [layer, head])], dtype=np.float64)
        Vr = np.linalg.svd(C, full_matrices=False)[2][:r]
        Tp = T @ Vr.T @ Vr
        Cc = C - C.mean(0)
        for slot in range(5):
            j = int(np.argmax(((Cc @ Tp.T) ** 2).sum(0)))
            u = Tp[j] / np.linalg.norm(Tp[j])
            Cc = Cc - np.outer(Cc @ u, u)
            Tp = Tp - np.outer(Tp @ u, u)
            slots += 1
            same += text_ids[j] == stored[slot]
    assert same / slots >= 0.95, f"{same} of {slots} slots agree"


def test_stored_eta2_and_agreement_recompute_from_the_tables(toy_warehouse):
    wh = toy_warehouse
    images = [i for (i,) in q(wh, "SELECT image_id FROM images ORDER BY image_id")]
    factors = {f: [v for (v,) in q(wh, "SELECT value FROM image_factors WHERE factor = ? ORDER BY image_id", [f])]
               for f in shapes.FACTORS}
    assert all(len(v) == len(images) == 300 for v in factors.values())
    stored = {(l, h, f): e for l, h, f, e in q(wh, "SELECT layer, head, factor, eta2 FROM head_factor_variance")}
    assert len(stored) == 24 * 7
    for layer, head in [(0, 0), (3, 2), (5, 3)]:
        C = np.array([v for (v,) in q(wh, "SELECT vec FROM head_embeddings WHERE layer = ? AND head = ? "
                                          "ORDER BY image_id", [layer, head])], dtype=np.float64)
        for f, labels in factors.items():
            assert stored[(layer, head, f)] == pytest.approx(_eta2_loop(C, labels), abs=1e-9)
    (n_spec, n_right, n_unspec, n_false) = q(wh, "SELECT n_specialised, n_right, n_unspecialised, n_false "
                                                 "FROM label_agreement")[0]
    right = false = spec = 0
    labels = dict(((l, h), p) for l, h, p in q(wh, "SELECT layer, head, property FROM head_labels"))
    for (l, h), label in labels.items():
        e = sorted(((stored[(l, h, f)], f) for f in shapes.FACTORS), reverse=True)
        if e[0][0] >= 0.4 and e[0][0] >= 3 * e[1][0]:
            spec += 1
            right += label == WORLD_FACTOR_PROPERTIES[e[0][1]]
        else:
            false += label != MIXED and not any(v >= 0.2 and WORLD_FACTOR_PROPERTIES[f] == label for v, f in e)
    assert (n_spec, n_right, n_unspec, n_false) == (spec, right, 24 - spec, false)
