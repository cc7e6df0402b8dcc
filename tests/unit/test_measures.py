"""Migration 007's views recomputed exactly on small constructed warehouses: Cohen's kappa of the
labels and of both baselines (constant, tag-shuffled), wrong and invented labels, the bootstrap
over heads, the paper's two scores as read, and the upgrade of a 006 warehouse."""
from __future__ import annotations

from collections import Counter

import duckdb
import numpy as np
import pytest

from etl.text.bank import WORLD_FACTOR_PROPERTIES
from tests.warehouse_reads import distinct_reads
from warehouse import connect, writer
from warehouse.db import available_migrations, migrate

FACTORS = sorted(WORLD_FACTOR_PROPERTIES)
PROPERTY_FACTOR = {p: f for f, p in WORLD_FACTOR_PROPERTIES.items()}


def _random_world(seed: int, n_heads: int = 12, draws: int = 5):
    """{model: {head: eta2 per factor}}, labels, shuffled labels: some heads specialised, some not."""
    rng = np.random.default_rng(seed)
    eta, labels, shuffled = {}, {}, {}
    choices = list(WORLD_FACTOR_PROPERTIES.values()) + ["mixed", "mixed", "animals"]
    for model in ("a/bundled", "b/bundled"):
        for h in range(n_heads):
            head = (h // 4, h % 4)
            e = rng.random(len(FACTORS)) * 0.15
            kind = rng.integers(4)
            if kind == 0:                                    # specialised
                e[rng.integers(len(FACTORS))] = rng.uniform(0.45, 0.9)
            elif kind == 1:                                  # two factors >= 0.2, not specialised
                i, j = rng.choice(len(FACTORS), 2, replace=False)
                e[i], e[j] = rng.uniform(0.2, 0.4), rng.uniform(0.2, 0.4)
            eta[(model, head)] = dict(zip(FACTORS, e))
            top = FACTORS[int(np.argmax(e))]
            labels[(model, head)] = (WORLD_FACTOR_PROPERTIES[top] if rng.random() < 0.6
                                     else choices[rng.integers(len(choices))])
            for d in range(draws):
                shuffled[(model, head, d)] = choices[rng.integers(len(choices))]
    return eta, labels, shuffled


def _build(p, eta, labels, shuffled, dataset="shapes:10:seed=1"):
    with writer(p) as con:
        con.executemany("INSERT INTO factor_properties VALUES (?, ?)", list(WORLD_FACTOR_PROPERTIES.items()))
        con.executemany("INSERT INTO head_factor_variance VALUES (?, ?, ?, ?, ?, ?, NULL)",
                        [[m, dataset, l, h, f, v] for (m, (l, h)), e in eta.items() for f, v in e.items()])
        con.executemany("INSERT INTO head_labels (model_id, layer, head, property, confidence, labeler) "
                        "VALUES (?, ?, ?, ?, 0.5, 'offline')", [[m, l, h, pr] for (m, (l, h)), pr in labels.items()])
        con.executemany("INSERT INTO baseline_labels VALUES (?, 'tag-shuffled', ?, ?, ?, ?, NULL, NULL)",
                        [[m, d, l, h, pr] for (m, (l, h), d), pr in shuffled.items()])


def _truth(e: dict) -> tuple[bool, str | None]:
    top, second = sorted(e.values(), reverse=True)[:2]
    spec = top >= 0.4 and top >= 3 * second
    return spec, (max(e, key=e.get) if spec else None)


def _categories(e: dict, label: str):
    """(label category, true category, wrong, invented) by MATH.md §11, literally."""
    spec, tf = _truth(e)
    lf = PROPERTY_FACTOR.get(label)
    lcat = "none" if label == "mixed" else (lf if lf else "other")
    eta_l = e[lf] if lf else 0.0
    tcat = tf if spec else (lf if lf and eta_l >= 0.2 else "none")
    return lcat, tcat, bool(spec and lf is not None and lf != tf), label != "mixed" and eta_l < 0.2


def _kappa(pairs):
    n = len(pairs)
    po = sum(a == b for a, b in pairs) / n
    la, ta = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    pe = sum(la[c] * ta[c] for c in la) / n / n
    return None if pe == 1 else (po - pe) / (1 - pe)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    p = tmp_path_factory.mktemp("measures") / "w.duckdb"
    eta, labels, shuffled = _random_world(0)
    _build(p, eta, labels, shuffled)
    return p, eta, labels, shuffled


def test_categories_wrong_and_invented_follow_the_definitions(world):
    p, eta, labels, _ = world
    with connect(p) as con:
        rows = con.execute("SELECT model_id, layer, head, label_category, true_category, wrong, invented "
                           "FROM labeling_truth WHERE labeling = 'labeler'").fetchall()
    assert len(rows) == len(labels)
    for m, l, h, lcat, tcat, wrong, invented in rows:
        assert (lcat, tcat, wrong, invented) == _categories(eta[(m, (l, h))], labels[(m, (l, h))]), (m, l, h)


def test_kappa_of_the_labels_and_of_every_baseline_is_cohens(world):
    p, eta, labels, shuffled = world
    with connect(p) as con:
        rows = con.execute("SELECT model_id, labeling, draw, n_heads, n_agree, n_wrong, n_invented, accuracy, kappa "
                           "FROM labeling_agreement").fetchall()
    got = {(m, lab, d): r for m, lab, d, *r in rows}
    constants = list(WORLD_FACTOR_PROPERTIES.values()) + ["mixed"]
    assert len(got) == 2 * (1 + 5 + len(constants))
    for model in ("a/bundled", "b/bundled"):
        heads = [h for (m, h) in labels if m == model]
        runs = {("labeler", 0): {h: labels[(model, h)] for h in heads}}
        runs.update({("tag-shuffled", d): {h: shuffled[(model, h, d)] for h in heads} for d in range(5)})
        runs.update({(f"constant:{c}", 0): {h: c for h in heads} for c in constants})
        for (lab, d), lab_of in runs.items():
            cats = [_categories(eta[(model, h)], lab_of[h]) for h in heads]
            pairs = [(c[0], c[1]) for c in cats]
            n, n_agree, n_wrong, n_inv, acc, kappa = got[(model, lab, d)]
            assert n == len(heads) and n_agree == sum(a == b for a, b in pairs)
            assert n_wrong == sum(c[2] for c in cats) and n_inv == sum(c[3] for c in cats)
            assert acc == pytest.approx(n_agree / n)
            want = _kappa(pairs)
            assert (kappa is None) == (want is None), (model, lab)
            if want is not None:
                assert kappa == pytest.approx(want, abs=1e-12), (model, lab, d)
            if lab.startswith("constant:") and kappa is not None:
                assert kappa == pytest.approx(0.0, abs=1e-12)        # a constant labeller has no skill


def test_label_kappa_reports_the_margin_over_both_baselines(world):
    p, eta, labels, shuffled = world
    with connect(p) as con:
        df = con.execute("SELECT * FROM label_kappa ORDER BY model_id").df()
        boot = con.execute("SELECT model_id, kappa, margin_shuffled FROM label_kappa_bootstrap").df()
        la = con.execute("SELECT model_id, labeling, draw, kappa, accuracy, n_invented, n_wrong, n_specialised "
                         "FROM labeling_agreement").df()
    assert list(df.model_id) == ["a/bundled", "b/bundled"]
    for r in df.itertuples():
        mine = la[la.model_id == r.model_id]
        sh = mine[mine.labeling == "tag-shuffled"].kappa.dropna()
        assert r.shuffled_draws == 5
        assert r.shuffled_kappa == pytest.approx(sh.mean()) and r.shuffled_kappa_sd == pytest.approx(sh.std(ddof=1))
        assert (r.shuffled_kappa_min, r.shuffled_kappa_max) == (pytest.approx(sh.min()), pytest.approx(sh.max()))
        assert r.margin_shuffled == pytest.approx(r.kappa - sh.mean())
        const = mine[mine.labeling.str.startswith("constant:")]
        best = const.loc[const.accuracy.idxmax()]
        assert r.constant_label == best.labeling[len("constant:"):]
        assert r.constant_accuracy == pytest.approx(best.accuracy) and r.constant_kappa == 0.0
        assert r.constant_invented_rate == pytest.approx(best.n_invented / r.n_heads)
        assert r.invented_rate == pytest.approx(r.n_invented / r.n_heads)
        assert r.wrong_rate == pytest.approx(r.n_wrong / r.n_specialised)
        assert r.wrong_lo <= r.wrong_rate <= r.wrong_hi
        assert r.invented_lo <= r.invented_rate <= r.invented_hi
        b = boot[boot.model_id == r.model_id]
        assert len(b) == 1000
        assert r.kappa_lo == pytest.approx(np.percentile(b.kappa.dropna(), 2.5))
        assert r.margin_shuffled_hi == pytest.approx(np.percentile(b.margin_shuffled.dropna(), 97.5))
        assert r.kappa_lo <= r.kappa <= r.kappa_hi
        assert (r.margin_constant, r.margin_constant_lo) == (pytest.approx(r.kappa), pytest.approx(r.kappa_lo))


def test_a_perfect_labeller_has_kappa_one_and_its_bootstrap_too(tmp_path):
    eta, _, _ = _random_world(1)
    labels = {}
    for key, e in eta.items():
        spec, tf = _truth(e)
        labels[key] = WORLD_FACTOR_PROPERTIES[tf] if spec else "mixed"
    shuffled = {(m, h, 0): "mixed" for (m, h) in eta}
    p = tmp_path / "w.duckdb"
    _build(p, eta, labels, shuffled)
    with connect(p) as con:
        rows = con.execute("SELECT kappa, kappa_lo, kappa_hi, n_wrong, n_invented FROM label_kappa").fetchall()
    assert rows == [(pytest.approx(1.0), pytest.approx(1.0), pytest.approx(1.0), 0, 0)] * 2


def test_the_papers_scores_as_read(tmp_path):
    p = tmp_path / "w.duckdb"
    heads = {(0, 0): ("colors", ["c1", "c2"]), (0, 1): ("colors", ["c1", "a1"]), (1, 0): ("colors", ["a1", "a2"]),
             (1, 1): ("animals", ["a1", "c1"]), (1, 2): ("mixed", ["a1", "c2"]), (1, 3): (None, ["c1"])}
    tags = {"c1": "colors", "c2": "colors", "a1": "animals", "a2": "animals"}
    with writer(p) as con:
        con.executemany("INSERT INTO properties VALUES (?, NULL)", [["colors"], ["animals"]])
        con.executemany("INSERT INTO texts VALUES (?, 'b', ?, ?)", [[t, t, pr] for t, pr in tags.items()])
        con.executemany("INSERT INTO head_texts (model_id, layer, head, rank, text_id, variance_explained) "
                        "VALUES ('m', ?, ?, ?, ?, 0.1)",
                        [[l, h, r, t] for (l, h), (_, ts) in heads.items() for r, t in enumerate(ts)])
        con.executemany("INSERT INTO head_labels (model_id, layer, head, property, labeler) VALUES ('m', ?, ?, ?, 'offline')",
                        [[l, h, lab] for (l, h), (lab, _) in heads.items() if lab])
    with connect(p) as con:
        (row,) = con.execute("SELECT n_property_heads, n_properties, association, entanglement FROM paper_scores").fetchall()
        tag_entropy = dict(con.execute("SELECT head, tag_entropy FROM head_scores WHERE layer = 0").fetchall())
    # four heads carry a property (colors x3, animals x1): 2 of them repeat one -> 2 / 4
    # association over those four: 1, 1/2, 0, 1/2
    assert row == (4, 2, pytest.approx(0.5), pytest.approx(0.5))
    assert tag_entropy == {0: 0.0, 1: pytest.approx(1.0)}


def test_007_upgrades_a_006_warehouse_in_place(tmp_path):
    d = tmp_path / "upto6"
    d.mkdir()
    for v, _, f in available_migrations():
        if v <= 6:
            (d / f.name).write_text(f.read_text())
    con = duckdb.connect(str(tmp_path / "old.duckdb"))
    assert migrate(con, d) == [1, 2, 3, 4, 5, 6]
    con.execute("INSERT INTO properties VALUES ('colors', NULL)")
    con.execute("INSERT INTO texts VALUES ('t', 'b', 'red', 'colors')")
    con.execute("INSERT INTO head_texts (model_id, layer, head, rank, text_id, variance_explained) "
                "VALUES ('m', 0, 0, 0, 't', 0.5)")
    con.execute("INSERT INTO head_labels (model_id, layer, head, property, labeler) VALUES ('m', 0, 0, 'colors', 'offline')")
    assert "entanglement" in [r[0] for r in con.execute("DESCRIBE head_scores").fetchall()]
    from warehouse.db import MIGRATIONS_DIR
    assert migrate(con, MIGRATIONS_DIR)[0] == 7                     # 007 first, then any later ones
    cols = [r[0] for r in con.execute("DESCRIBE head_scores").fetchall()]
    assert "tag_entropy" in cols and "entanglement" not in cols
    assert con.execute("SELECT association, tag_entropy FROM head_scores").fetchall() == [(1.0, 0.0)]
    assert con.execute("SELECT association, tag_entropy FROM model_scores").fetchall() == [(1.0, 0.0)]
    assert con.execute("SELECT n_property_heads, entanglement FROM paper_scores").fetchall() == [(1, 0.0)]
    for table in ("world_seeds", "baseline_labels", "code_scores", "study_scores", "study_sizes", "study_verdicts"):
        assert con.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
    con.close()


def test_world_seeds_live_in_one_place_and_the_demo_and_the_study_are_held_out():
    import re
    from pathlib import Path

    from etl.world import seeds
    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    (demo,) = re.findall(r"^DATASET \?= shapes:\d+:seed=(\d+)$", makefile, re.M)
    assert int(demo) == seeds.DEMO                                     # the Makefile's demo world is the one named
    used = set(seeds.TRAINING) | set(seeds.TUNING)
    assert seeds.held_out(seeds.DEMO) and all(seeds.held_out(s) for s in seeds.STUDY)
    assert not {seeds.DEMO, *seeds.STUDY} & (used | set(seeds.EARLIER)) and seeds.DEMO not in seeds.STUDY
    assert len(set(seeds.STUDY)) == 2 and not seeds.held_out(0) and not seeds.held_out(7)
    rows = seeds.provenance()
    assert len({(r["seed"], r["role"]) for r in rows}) == len(rows)
    assert {r["role"] for r in rows} == {"training", "tuning", "eval", "study", "demo", "earlier"}
    assert seeds.held_out(seeds.EVAL) and seeds.EVAL not in {seeds.DEMO, *seeds.STUDY}


def test_label_kappa_gives_the_same_bits_on_every_read(tmp_path):
    """Migration 010: the means over the tag-shuffled draws in draw order (before it, the shuffled
    kappa's sd could differ in the last bit between two reads of one warehouse)."""
    p = tmp_path / "w.duckdb"
    eta, labels, shuffled = _random_world(3, n_heads=24, draws=20)
    _build(p, eta, labels, shuffled)
    assert distinct_reads(p, ["label_kappa"], reads=10) == {"label_kappa": 1}
