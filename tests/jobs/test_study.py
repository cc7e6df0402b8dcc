"""`python -m etl study` end to end on a tiny world: the pipeline per world, the scores, the stored
study, a second run that only scores, the in-place study of the same warehouse, and refusals."""
from __future__ import annotations

import duckdb
import pytest

from etl.cli import main
from etl.world.study import DEFINITIONS

pytestmark = pytest.mark.slow          # builds two toy models on 80 scenes (about 1-2 min on 2 busy cores)


def _ro(path):
    """A plain read-only DuckDB connection: the product's cached readers of the same file (another
    configuration) are released first, or DuckDB refuses the second configuration."""
    from warehouse.db import release_readers
    release_readers()
    return duckdb.connect(str(path), read_only=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    argv = ["study", "--world", "5", "--n", "80", "--model", "toy-shapes-small", "--control", "toy-shapes-small",
            "--study-dir", str(tmp / "worlds"), "--warehouse", str(tmp / "main.duckdb"), "--bootstrap", "20"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATLAS_HOME", str(tmp))
        mp.setenv("ATLAS_NO_PROGRESS", "1")
        yield tmp, argv, mp


def test_the_study_builds_scores_stores_and_reports(built, capsys):
    tmp, argv, _ = built
    assert main(argv) == 0
    out = capsys.readouterr().out
    progress = [line for line in out.splitlines() if line.startswith("[")]
    assert len(progress) == 2 and progress[0].startswith("[1/2] world 5 · toy-shapes-small/bundled (4 x 64): kappa ")
    assert "toy-shapes-small/random-seed0 (random init)" in progress[1]
    assert "## Size study 'zoo' on world seed(s) 5" in out and out.count("- If interpretable means that") == len(DEFINITIONS)
    con = _ro(str(tmp / "main.duckdb"))
    scores = con.execute("SELECT model_id, world_seed, dataset_id, size, score, value FROM study_scores "
                         "WHERE study = 'zoo'").fetchall()
    sizes = dict(con.execute("SELECT size, n_models FROM study_sizes WHERE score = 'kappa'").fetchall())
    verdicts = con.execute("SELECT score, n_models, verdict FROM study_verdicts ORDER BY score").fetchall()
    seeds = con.execute("SELECT seed, role FROM world_seeds").fetchall()
    con.close()
    got = {(m, s): v for m, _, _, _, s, v in scores}
    assert {m for m, *_ in scores} == {"toy-shapes-small/bundled", "toy-shapes-small/random-seed0"}
    assert {(w, d) for _, w, d, *_ in scores} == {(5, "shapes:80:seed=5")}
    assert {s for _, s in got} >= {"kappa", "kappa_texts", "kappa_margin_shuffled", "invented_rate", "paper_association",
                                   "informativeness", "dci_d", "dci_c", "dci_i", "mig"}
    assert sizes == {"4 x 64": 1, "random init": 1}
    # one trained model: every definition cannot tell (the paper's two scores need labelled heads, which the
    # 80-scene world may not give: offline-v8 reads a property through at most n / 3 zero-shot groups)
    assert len(verdicts) == len(DEFINITIONS) == 9 and all(
        n == (1 if not s.startswith("paper_") else n) and n in (0, 1) and "cannot tell" in v for s, n, v in verdicts), verdicts
    assert (1013, "study") in seeds and (0, "training") in seeds and (41, "demo") in seeds
    # the stored scores are the world warehouse's views, exactly
    w = _ro(str(tmp / "worlds" / "world-5-n80.duckdb"))
    kappa = w.execute("SELECT kappa FROM label_kappa WHERE model_id = 'toy-shapes-small/bundled'").fetchall()[0][0]
    runs = w.execute("SELECT job, count(*) FROM runs GROUP BY job").fetchall()
    w.close()
    assert got[("toy-shapes-small/bundled", "kappa")] == pytest.approx(kappa)
    # the text-vote labelling is v7's decision kept in each label's raw, scored by the same views
    w = _ro(str(tmp / "worlds" / "world-5-n80.duckdb"))
    v7 = w.execute("SELECT count(*), count(*) FILTER (WHERE l.property = json_extract_string(h.raw, '$.v7.property')) "
                   "FROM head_labelings l JOIN head_labels h USING (model_id, layer, head) "
                   "WHERE l.labeling = 'text-votes'").fetchone()
    texts = w.execute("SELECT kappa FROM labeling_agreement WHERE labeling = 'text-votes' "
                      "AND model_id = 'toy-shapes-small/bundled'").fetchall()
    w.close()
    assert v7[0] == v7[1] == 2 * 8                      # both models' 8 heads
    assert got.get(("toy-shapes-small/bundled", "kappa_texts")) == pytest.approx(texts[0][0]) if texts[0][0] is not None \
        else ("toy-shapes-small/bundled", "kappa_texts") not in got
    assert dict(runs) == {"embed": 2, "texts": 2, "textspan": 2, "label": 2, "judge": 2, "probe": 2}


def test_a_second_run_only_scores_and_in_place_gives_the_same_scores(built, capsys):
    tmp, argv, _ = built
    assert main(argv) == 0
    w = _ro(str(tmp / "worlds" / "world-5-n80.duckdb"))
    statuses = dict(w.execute("SELECT job, list(status ORDER BY started_at)[-1] FROM runs GROUP BY job").fetchall())
    embeds = w.execute("SELECT count(*) FROM runs WHERE job = 'embed'").fetchone()[0]
    w.close()
    # every image embedded: embed is not even called again (one run per model, the first); the rest skip
    assert embeds == 2 and statuses == {"embed": "ok"} | {j: "skipped" for j in ("texts", "textspan", "label", "judge",
                                                                                 "probe")}
    world = str(tmp / "worlds" / "world-5-n80.duckdb")
    assert main(["study", "--in-place", "--warehouse", world]) == 0
    con = _ro(world)
    demo = dict(con.execute("SELECT model_id || ' ' || score, value FROM study_scores WHERE study = 'demo'").fetchall())
    con.close()
    con = _ro(str(tmp / "main.duckdb"))
    zoo = dict(con.execute("SELECT model_id || ' ' || score, value FROM study_scores WHERE study = 'zoo'").fetchall())
    con.close()
    assert demo.keys() == zoo.keys() and all(demo[k] == pytest.approx(zoo[k], nan_ok=True) for k in zoo)


def test_an_in_place_study_of_an_unchanged_warehouse_is_skipped_and_redone_after_a_change(built, capsys):
    """A second `make etl` that adds nothing must not re-score: the in-place study is skipped when no other
    job did work since it; after one does (labels recomputed), it scores again."""
    import json
    from warehouse.db import release_readers
    tmp, argv, _ = built
    world = str(tmp / "worlds" / "world-5-n80.duckdb")
    assert main(["study", "--in-place", "--warehouse", world]) == 0        # up to date after the test above, or now
    capsys.readouterr()

    def again() -> tuple[dict, list]:
        assert main(["study", "--in-place", "--warehouse", world]) == 0
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        release_readers()                     # the product's cached readers hold their own configuration
        con = _ro(world)
        stored = con.execute("SELECT run_id FROM study_scores WHERE study = 'demo'").fetchall()
        con.close()
        return out, stored

    release_readers()
    before = _ro(world)
    stored0 = before.execute("SELECT run_id FROM study_scores WHERE study = 'demo'").fetchall()
    before.close()
    out, stored = again()
    assert out.get("skipped") is True and stored == stored0
    assert main(["label", "--model", "toy-shapes-small/bundled", "--force", "--warehouse", world]) == 0
    capsys.readouterr()
    out, stored = again()
    assert "skipped" not in out and stored and stored != stored0


def test_worlds_used_in_training_or_tuning_are_refused(built, capsys):
    tmp, argv, _ = built
    for seed in ("0", "7"):
        bad = [a if a != "5" else seed for a in argv]
        assert main(bad) == 2
        err = capsys.readouterr().err
        assert f"error: world seed {seed} was used for training or tuning (etl/world/seeds.py)" in err
    assert main(["study", "--in-place", "--world", "5", "--warehouse", str(tmp / "main.duckdb")]) == 2
    assert "--in-place scores what --warehouse holds" in capsys.readouterr().err
    assert main(["study", "--model", "toy-shapes-nope", "--warehouse", str(tmp / "main.duckdb")]) == 2
    assert "no shipped weights for 'toy-shapes-nope'" in capsys.readouterr().err
