"""The text side of the ETL end to end on a temporary warehouse with a tiny random-init model:
texts -> textspan -> label -> judge, resumability, user text files, the LLM labeler job."""
from __future__ import annotations

import json
import math
from collections import defaultdict

import duckdb
import numpy as np
import pytest

from etl.cli import main
from etl.text.labelers import MIXED
from etl.text.bank import PROPERTIES, atlas_bank, read_text_file
from etl.text.textspan import textspan_literal
from tests.model_fixtures import register_tiny_configs
from tests.unit.test_labelers import KEY, FakeEndpoint, TrickleHeaders

MODEL = "atlas-test-tiny/random-seed0"          # 3 layers x 4 heads, d = 24
N_HEADS = 12


def q(path, sql, params=()):
    from warehouse import release_readers
    release_readers()                  # the jobs ran in this process: close their warm read instance first
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute(sql, list(params)).fetchall()
    finally:
        con.close()


def one(path, sql, params=()):
    return q(path, sql, params)[0][0]


def job(capsys, *argv) -> dict:
    """Run `python -m etl <argv>` in this process (the tiny configs are registered here);
    return the job's JSON summary line."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def job_error(capsys, *argv) -> str:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    assert code == 2
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """A warehouse holding head embeddings of 30 shapes-world images for the tiny model."""
    tmp = tmp_path_factory.mktemp("textjobs")
    register_tiny_configs(tmp)
    path = tmp / "w.duckdb"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATLAS_HOME", str(tmp / "home"))
        mp.setenv("ATLAS_NO_PROGRESS", "1")
        assert main(["embed", "--model", "atlas-test-tiny", "--random-init", "--seed", "0", "--dataset",
                     "shapes:30:seed=0", "--backend", "torch", "--layers", "all", "--warehouse", str(path)]) == 0
    assert one(path, "SELECT count(*) FROM head_embeddings WHERE model_id = ?", [MODEL]) == 30 * N_HEADS
    return path


@pytest.fixture(scope="module")
def with_texts(embedded, tmp_path_factory):
    """The same, plus the atlas bank embedded for the model (the `texts` job)."""
    path = tmp_path_factory.mktemp("withtexts") / "w.duckdb"
    path.write_bytes(embedded.read_bytes())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATLAS_HOME", str(path.parent / "home"))
        mp.setenv("ATLAS_NO_PROGRESS", "1")
        assert main(["texts", "--model", MODEL, "--warehouse", str(path)]) == 0
    return path


def _private_copy(src, tmp_path, monkeypatch):
    path = tmp_path / "w.duckdb"
    path.write_bytes(src.read_bytes())
    monkeypatch.setenv("ATLAS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ATLAS_NO_PROGRESS", "1")
    return path


@pytest.fixture()
def wh(embedded, tmp_path, monkeypatch):
    """A private copy of the embedded warehouse per test; ATLAS_HOME in the test's folder."""
    return _private_copy(embedded, tmp_path, monkeypatch)


@pytest.fixture()
def wht(with_texts, tmp_path, monkeypatch):
    """A private copy of the warehouse with the atlas bank embedded."""
    return _private_copy(with_texts, tmp_path, monkeypatch)


def test_texts_job_loads_and_embeds_the_atlas_bank_once(wh, capsys):
    out = job(capsys, "texts", "--model", MODEL, "--warehouse", wh)
    n = len(atlas_bank())
    assert out == {"bank": "atlas", "texts": n, "model_id": MODEL, "embedded": n, "already_embedded": 0}
    assert one(wh, "SELECT count(*) FROM texts WHERE bank = 'atlas'") == n
    assert one(wh, "SELECT count(*) FROM texts WHERE property IS NULL") == 0
    assert dict(q(wh, "SELECT property, description FROM properties")) == PROPERTIES
    assert one(wh, "SELECT count(*) FROM text_embeddings WHERE model_id = ?", [MODEL]) == n
    norms = np.array([r[0] for r in q(wh, "SELECT sqrt(list_inner_product(vec, vec)) FROM text_embeddings")])
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    assert len(q(wh, "SELECT vec FROM text_embeddings LIMIT 1")[0][0]) == 24
    # a re-run embeds nothing and duplicates nothing
    again = job(capsys, "texts", "--model", MODEL, "--warehouse", wh)
    assert again["embedded"] == 0 and again["already_embedded"] == n
    assert one(wh, "SELECT count(*) FROM text_embeddings") == n
    assert q(wh, "SELECT status FROM runs WHERE job = 'texts' ORDER BY started_at") == [("ok",), ("skipped",)]


def test_texts_job_takes_a_users_text_file(wh, capsys, tmp_path, user_text_files):
    src = user_text_files["descriptions.txt"]
    expected = [t for t, _ in read_text_file(src)]
    out = job(capsys, "texts", "--model", MODEL, "--text-file", src, "--bank-name", "general", "--warehouse", wh)
    assert out["bank"] == "general" and out["texts"] == len(expected) == out["embedded"]
    assert sorted(r[0] for r in q(wh, "SELECT text FROM texts WHERE bank = 'general'")) == sorted(expected)
    assert one(wh, "SELECT count(*) FROM texts WHERE bank = 'general' AND property IS NOT NULL") == 0
    assert one(wh, "SELECT count(*) FROM text_embeddings") == len(expected)
    # a tagged file with a tag the vocabulary does not know: kept, reported in `errors`
    f = tmp_path / "mine.txt"
    f.write_text("a crimson sky\tcolors\na small dog\tanimals\na cat on a mat\tpets\n\n")
    out = job(capsys, "texts", "--model", MODEL, "--text-file", f, "--warehouse", wh)
    assert out["bank"] == "mine" and out["embedded"] == 3
    assert dict(q(wh, "SELECT text, property FROM texts WHERE bank = 'mine'")) == {
        "a crimson sky": "colors", "a small dog": "animals", "a cat on a mat": "pets"}
    item, reason = q(wh, "SELECT item, reason FROM errors")[0]
    assert item == "tag:pets" and "not a property" in reason
    # bad inputs: clear errors, a failed run row
    assert "does not exist" in job_error(capsys, "texts", "--text-file", tmp_path / "nope.txt", "--warehouse", wh)
    assert "not in the warehouse" in job_error(capsys, "texts", "--model", "nope/none", "--warehouse", wh)
    assert "bank of the product's own" in job_error(capsys, "texts", "--text-file", f, "--bank-name", "atlas",
                                             "--warehouse", wh)
    assert one(wh, "SELECT count(*) FROM runs WHERE job = 'texts' AND status = 'failed'") == 3   # each attempt


def _head_matrix(wh, layer, head):
    rows = q(wh, "SELECT vec FROM head_embeddings WHERE model_id = ? AND layer = ? AND head = ? ORDER BY image_id",
             [MODEL, layer, head])
    return np.array([r[0] for r in rows], dtype=np.float32)


def test_textspan_job_matches_the_literal_algorithm_and_resumes(wht, capsys):
    out = job(capsys, "textspan", "--model", MODEL, "--warehouse", wht)
    assert out["heads_written"] == N_HEADS and out["heads_failed"] == 0 and out["bank"] == "atlas"
    assert one(wht, "SELECT count(*) FROM head_texts") == N_HEADS * 10
    assert q(wht, "SELECT DISTINCT list_sort(list(rank)) FROM head_texts GROUP BY layer, head") == [(list(range(10)),)]
    # the stored texts are what the literal algorithm picks from the same warehouse data
    ids, T = zip(*q(wht, "SELECT e.text_id, e.vec FROM text_embeddings e JOIN texts USING (text_id) "
                        "WHERE bank = 'atlas' ORDER BY e.text_id"))
    T = np.array(T, dtype=np.float32)
    for layer, head in [(0, 0), (2, 3)]:
        lit_idx, lit_var = textspan_literal(_head_matrix(wht, layer, head), T, k=10, r=80)
        stored = q(wht, "SELECT text_id, variance_explained FROM head_texts WHERE model_id = ? AND layer = ? "
                       "AND head = ? ORDER BY rank", [MODEL, layer, head])
        assert [s[0] for s in stored] == [ids[j] for j in lit_idx]
        np.testing.assert_allclose([s[1] for s in stored], lit_var, atol=1e-4)
    # resume: a run that stopped after layer 0 left layers 1-2 unwritten; only those are redone
    first_run = one(wht, "SELECT any_value(run_id) FROM head_texts WHERE layer = 0")
    with duckdb.connect(str(wht)) as con:
        con.execute("DELETE FROM head_texts WHERE layer > 0")
    out = job(capsys, "textspan", "--model", MODEL, "--warehouse", wht)
    assert (out["heads_written"], out["heads_skipped"]) == (8, 4)
    assert q(wht, "SELECT DISTINCT run_id FROM head_texts WHERE layer = 0") == [(first_run,)]
    assert one(wht, "SELECT count(*) FROM head_texts") == N_HEADS * 10
    assert job(capsys, "textspan", "--model", MODEL, "--warehouse", wht)["heads_written"] == 0


def test_textspan_job_refuses_to_mix_banks_without_force(wht, capsys, user_text_files):
    job(capsys, "texts", "--model", MODEL, "--warehouse", wht, "--text-file", user_text_files["words.txt"],
        "--bank-name", "words")
    job(capsys, "textspan", "--model", MODEL, "--warehouse", wht, "-k", "5")
    job(capsys, "label", "--model", MODEL, "--warehouse", wht)
    assert one(wht, "SELECT count(*) FROM head_labels") == N_HEADS
    err = job_error(capsys, "textspan", "--model", MODEL, "--warehouse", wht, "--bank", "words", "-k", "5")
    assert "--force" in err and "'atlas'" in err
    out = job(capsys, "textspan", "--model", MODEL, "--warehouse", wht, "--bank", "words", "-k", "5", "--force")
    assert out["heads_written"] == N_HEADS
    assert q(wht, "SELECT DISTINCT bank FROM head_texts") == [("words",)]
    assert one(wht, "SELECT count(*) FROM head_texts h JOIN texts t USING (text_id) WHERE t.bank = 'words'") == 60
    assert one(wht, "SELECT count(*) FROM head_labels") == 0          # labels of the old texts are gone
    assert "no texts of bank 'nope'" in job_error(capsys, "textspan", "--model", MODEL, "--warehouse", wht,
                                                  "--bank", "nope")
    assert "not in the warehouse" in job_error(capsys, "textspan", "--model", MODEL, "--warehouse", wht,
                                               "--dataset", "shapes:1:seed=9", "--force")
    assert "k must be between" in job_error(capsys, "textspan", "--model", MODEL, "--warehouse", wht, "-k", "30",
                                            "--force")


def test_label_and_judge_offline_end_to_end(wht, capsys):
    job(capsys, "textspan", "--model", MODEL, "--warehouse", wht)
    out = job(capsys, "label", "--model", MODEL, "--warehouse", wht)
    assert out["heads_labelled"] == N_HEADS and out["heads_failed"] == 0
    # the label, recomputed here from the tables: a text votes for its tag when the rest of the
    # model reads it as the head does (corr over images of c.q and (z - c).q, q = the text minus
    # its property's mean text, >= 0.2 with a one-sided Fisher p <= 0.001) and more strongly than the
    # rest reads any text of another property opposite (v7: corr > -min corr of the other properties'
    # texts); a text read opposite (-corr >= 0.2, p of -corr <= 0.001, above every other property's
    # |corr|) votes too when its property has a vote read alike. Evidence = variance x |corr|; the
    # label is the property with the most evidence if at least 2 texts vote, its variance share s* >=
    # 0.15 and it holds >= 0.6 of the voting evidence (30 images: few texts pass p)
    texts = {tid: (np.array(v), p) for tid, v, p in q(wht, "SELECT e.text_id, e.vec, t.property FROM text_embeddings e "
                                                         "JOIN texts t USING (text_id) WHERE t.bank = 'atlas'")}
    means = {p: np.mean([v for v, pp in texts.values() if pp == p], axis=0) for p in PROPERTIES}
    Z = np.array([r[0] for r in q(wht, "SELECT vec FROM image_embeddings ORDER BY image_id")])
    totals = defaultdict(float)
    checked = defaultdict(list)
    for layer, head, tid, prop, var in q(wht, "SELECT h.layer, h.head, h.text_id, t.property, h.variance_explained "
                                              "FROM head_texts h JOIN texts t USING (text_id) ORDER BY h.rank"):
        C = _head_matrix(wht, layer, head).astype(np.float64)
        qv = texts[tid][0] - means[prop]
        rho = np.corrcoef(C @ qv, Z @ qv - C @ qv)[0, 1]
        checked[(layer, head)].append((rho, prop, var))
        totals[(layer, head)] += var

    def p_of(rho):
        return 0.5 * math.erfc(math.atanh(rho) * math.sqrt(len(Z) - 3) / math.sqrt(2))
    share, evidence, n_votes = defaultdict(dict), defaultdict(dict), defaultdict(dict)
    for key, rows in checked.items():
        for prop in {pr for _, pr, _ in rows}:
            others = [r for r, pr, _ in rows if pr != prop]
            floor, reach = max([0.0] + [-r for r in others]), max([0.0] + [abs(r) for r in others])
            alike = [(r, v) for r, pr, v in rows if pr == prop and r >= 0.2 and r > floor and p_of(r) <= 0.001]
            opposite = [(r, v) for r, pr, v in rows if pr == prop and -r >= 0.2 and -r > reach and p_of(-r) <= 0.001]
            voting = alike + opposite if alike else []
            if voting:
                share[key][prop] = sum(v for _, v in voting) / totals[key]
                evidence[key][prop] = sum(v * abs(r) for r, v in voting)
                n_votes[key][prop] = len(voting)
    # offline-v8 decides: group the images by the model's zero-shot choice among each property's bank
    # texts (argmax z . t); the head's variance between the groups, adjusted for their number k
    # (1 - (1 - eta2)(n - 1)/(n - k); 0 when k > n / 2), must be >= 0.35 and >= 1.5 x any other property's, and a
    # TextSpan text of the head must carry the tag; v7's label is kept in raw["v7"]
    by_prop = {p: [tid for tid in sorted(texts) if texts[tid][1] == p] for p in PROPERTIES}
    classes = {p: np.argmax(Z @ np.array([texts[t][0] for t in ids]).T, axis=1) for p, ids in by_prop.items() if ids}
    tags_of = defaultdict(list)
    for layer, head, prop, var in q(wht, "SELECT h.layer, h.head, t.property, h.variance_explained "
                                         "FROM head_texts h JOIN texts t USING (text_id) ORDER BY h.rank"):
        tags_of[(layer, head)].append((prop, var))

    def zeroshot_share(X, g):
        X = X - X.mean(0)
        groups = sorted(set(g.tolist()))
        if len(groups) < 2 or 2 * len(groups) > len(X):
            return 0.0
        between = sum((g == v).sum() * np.sum(X[g == v].mean(0) ** 2) for v in groups)
        return 1 - (1 - between / np.sum(X ** 2)) * (len(X) - 1) / (len(X) - len(groups))
    for layer, head, prop, conf, labeler, ph, p, raw in q(wht, "SELECT layer, head, property, confidence, labeler, "
                                                              "prompt_hash, p_value, raw FROM head_labels"):
        key = (layer, head)
        best = max(evidence[key], key=evidence[key].get) if evidence[key] else None
        raw = json.loads(raw)
        assert raw["version"] == "offline-v8" and len(raw["v7"]["agreement"]) == 10
        labelled = (best is not None and n_votes[key][best] >= 2 and share[key][best] >= 0.15
                    and evidence[key][best] >= 0.6 * sum(evidence[key].values()))
        assert raw["v7"]["property"] == (best if labelled else MIXED)
        C = _head_matrix(wht, layer, head).astype(np.float64)
        e = {pr: zeroshot_share(C, g) for pr, g in classes.items()}
        top = sorted(e, key=e.get, reverse=True)
        assert raw["zeroshot"] == pytest.approx({pr: round(v, 4) for pr, v in e.items()}, abs=2e-4)
        named = any(pr == top[0] for pr, _ in tags_of[key])
        v8 = top[0] if e[top[0]] >= 0.35 and e[top[0]] >= 1.5 * max(e[top[1]], 0) and named else MIXED
        assert prop == v8
        assert conf == pytest.approx(sum(v for pr, v in tags_of[key] if pr == top[0]) / sum(v for _, v in tags_of[key]))
        assert p is None or 0 < p <= 1
        assert labeler == "offline" and ph
    assert job(capsys, "label", "--model", MODEL, "--warehouse", wht)["heads_skipped"] == N_HEADS
    if one(wht, "SELECT count(*) FROM head_labels WHERE property = 'mixed'") == N_HEADS:
        out = job(capsys, "judge", "--model", MODEL, "--warehouse", wht)     # nothing to judge is no error
        assert (out["judged"], out["mixed_heads"]) == (0, N_HEADS)
    # a random model's heads are mostly 'mixed'; a low threshold, no majority, one vote and no agreement check
    # (a new prompt hash) relabel them all
    out = job(capsys, "label", "--model", MODEL, "--warehouse", wht, "--threshold", "0.01", "--majority", "0", "--min-votes", "1",
              "--no-agreement-check")
    assert out["heads_labelled"] == N_HEADS      # relabelled: a new prompt hash
    assert MIXED not in out["labels"]
    out = job(capsys, "judge", "--model", MODEL, "--warehouse", wht)
    n_labelled = one(wht, "SELECT count(*) FROM head_labels WHERE property <> 'mixed'")
    assert out["judged"] == one(wht, "SELECT count(*) FROM text_judgments") == 10 * n_labelled
    assert one(wht, "SELECT count(*) FROM text_judgments j JOIN texts t USING (text_id) "
                   "WHERE j.associated <> (t.property = j.property) OR j.judge <> 'tag'") == 0
    # the score views read the judgments: association = share of matching texts
    for layer, head, assoc in q(wht, "SELECT layer, head, association FROM head_scores WHERE property <> 'mixed'"):
        assert assoc == pytest.approx(one(wht, "SELECT avg(associated::INT) FROM text_judgments WHERE layer = ? "
                                              "AND head = ?", [layer, head]))
    assert job(capsys, "judge", "--model", MODEL, "--warehouse", wht)["judged"] == 0
    assert one(wht, "SELECT count(*) FROM runs WHERE status NOT IN ('ok', 'skipped')") == 0


@pytest.fixture()
def endpoint(monkeypatch):
    ep = FakeEndpoint()
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", ep.url)
    yield ep
    ep.server.shutdown()
    ep.server.server_close()


def test_llm_label_and_judge_jobs_record_errors_cache_and_resume(wht, capsys, endpoint, tmp_path):
    job(capsys, "textspan", "--model", MODEL, "--warehouse", wht)
    llm = ["--llm-model", "test-model", "--llm-retries", "1", "--llm-timeout", "5"]
    endpoint.answer('{"property": "Colour", "confidence": 0.7}')
    endpoint.answer('{"property": "furniture", "confidence": 0.9}')
    endpoint.answer("no idea")
    endpoint.answer('{"property": "animals", "confidence": 0.5}')
    out = job(capsys, "label", "--model", MODEL, "--warehouse", wht, "--labeler", "llm", *llm)
    assert (out["heads_labelled"], out["heads_failed"]) == (N_HEADS - 2, 2)
    assert len(endpoint.requests) == N_HEADS
    assert out["labels"] == {"animals": N_HEADS - 3, "colors": 1}
    rows = q(wht, "SELECT labeler, prompt_hash, raw FROM head_labels")
    assert {r[0] for r in rows} == {"llm:test-model"} and all(r[1] and r[2] for r in rows)
    reasons = " ".join(r[0] for r in q(wht, "SELECT reason FROM errors"))
    assert "'furniture' is not in the vocabulary" in reasons and "no JSON object" in reasons
    # re-run: the 10 labelled heads are skipped, only the 2 failed ones are asked again
    out = job(capsys, "label", "--model", MODEL, "--warehouse", wht, "--labeler", "llm", *llm)
    assert out["heads_skipped"] == N_HEADS - 2 and len(endpoint.requests) == N_HEADS + 2
    assert one(wht, "SELECT count(*) FROM head_labels") == N_HEADS
    # the LLM judge: one question per (text, property), cached across heads
    endpoint.script[:] = [(200, '{"associated": 1}', 0.0, {}, None, None)]
    before = len(endpoint.requests)
    out = job(capsys, "judge", "--model", MODEL, "--warehouse", wht, "--judge", "llm", *llm)
    pairs = one(wht, "SELECT count(DISTINCT (text_id, property)) FROM text_judgments")
    assert out["judged"] == one(wht, "SELECT count(*) FROM text_judgments WHERE judge = 'llm:test-model' "
                                    "AND associated") == 10 * N_HEADS
    assert len(endpoint.requests) - before == pairs
    assert one(wht, "SELECT min(association) FROM head_scores") == 1.0
    # the key is nowhere: not in the warehouse, not in the cache
    con = duckdb.connect(str(wht), read_only=True)
    for table, col in [("head_labels", "raw"), ("errors", "reason"), ("runs", "params"), ("runs", "error")]:
        assert con.execute(f"SELECT count(*) FROM {table} WHERE {col}::VARCHAR LIKE ?", [f"%{KEY}%"]).fetchone()[0] == 0
    con.close()
    cache = list((tmp_path / "home" / "cache" / "llm").glob("*.json"))
    assert len(cache) == N_HEADS + pairs                  # every valid answer once: 12 head prompts, the pairs
    assert all(KEY not in f.read_text() for f in cache)


def test_llm_label_job_stops_on_a_rejected_key_and_keeps_what_it_wrote(wht, capsys, endpoint):
    job(capsys, "textspan", "--model", MODEL, "--warehouse", wht)
    endpoint.answer('{"property": "colors", "confidence": 0.7}')
    endpoint.answer('{"property": "shapes", "confidence": 0.7}')
    endpoint.answer(f"bad key {KEY}", status=401)
    llm = ["--labeler", "llm", "--llm-model", "test-model", "--batch-size", "1"]
    assert "rejected the API key" in job_error(capsys, "label", "--model", MODEL, "--warehouse", wht, *llm)
    assert one(wht, "SELECT count(*) FROM head_labels") == 2                   # committed before the failure
    status, error = q(wht, "SELECT status, error FROM runs WHERE job = 'label'")[0]
    assert status == "failed" and "rejected the API key" in error and KEY not in error
    endpoint.script[:] = [(200, '{"property": "letters", "confidence": 0.6}', 0.0, {}, None, None)]
    before = len(endpoint.requests)
    out = job(capsys, "label", "--model", MODEL, "--warehouse", wht, *llm)
    assert out["heads_labelled"] == N_HEADS - 2 and len(endpoint.requests) - before == N_HEADS - 2


def test_llm_label_job_ends_at_its_deadline_when_the_headers_trickle(wht, capsys, monkeypatch):
    """Break 5 of issue 21: `label --labeler llm --llm-timeout 3 --llm-retries 1` against a server that
    sends one header line every 0.5 s ran past 400 s. Now: two attempts of 3 s, one short wait, one line."""
    import time
    job(capsys, "textspan", "--model", MODEL, "--warehouse", wht)
    server = TrickleHeaders(every=0.5)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    try:
        t0 = time.monotonic()
        err = job_error(capsys, "label", "--model", MODEL, "--warehouse", wht, "--labeler", "llm",
                        "--llm-model", "test-model", "--llm-timeout", "3", "--llm-retries", "1")
        took = time.monotonic() - t0
    finally:
        server.close()
    assert err.count("\n") == 1 and err.startswith("error: ") and "kept failing after 2 attempts" in err, err
    assert "no complete answer within --llm-timeout 3 s" in err
    assert 6.0 <= took < 6.0 + 1.0 + 2.0, took          # 2 x 3 s, a backoff of at most 1 s, a margin
    assert server.connections == 2


def _batched_picks(wh, layer, dataset=None):
    """The batched, in-memory TextSpan of a layer (textspan_heads on layer_head_matrix): idx [H, k], var, r."""
    from etl.text.textspan import textspan_heads
    from warehouse import release_readers
    from warehouse.queries import bank_text_matrix, layer_head_matrix
    release_readers()
    _, _, T = bank_text_matrix(str(wh), MODEL, "atlas")
    C = layer_head_matrix(str(wh), MODEL, layer, 4, dataset)                     # [n, 4, d]
    head_dim = one(wh, "SELECT width // heads FROM models WHERE model_id = ?", [MODEL])      # the job's max_rank
    return textspan_heads(C, T, k=10, r=80, max_rank=head_dim, with_rank=True), len(C)


def _stored(wh, layer):
    rows = q(wh, "SELECT head, rank, text_id, variance_explained, r FROM head_texts WHERE model_id = ? AND layer = ? "
                 "ORDER BY head, rank", [MODEL, layer])
    ids = [r[0] for r in q(wh, "SELECT e.text_id FROM text_embeddings e JOIN texts USING (text_id) "
                               "WHERE bank = 'atlas' ORDER BY e.text_id")]
    by_head = defaultdict(list)
    for head, _, tid, var, r in rows:
        by_head[head].append((ids.index(tid), var, r))
    return by_head


def test_textspan_job_streams_to_the_batched_result(wht, capsys):
    """The job's streamed moments (head_vector_batches -> HeadMoments -> textspan_from_moments) store
    what the batched in-memory form picks, for every head; --dataset streams only that dataset's images."""
    job(capsys, "textspan", "--model", MODEL, "--warehouse", wht)
    for layer in range(3):
        (idx, var, r_used), n = _batched_picks(wht, layer)
        stored = _stored(wht, layer)
        assert n == 30 and sorted(stored) == [0, 1, 2, 3]
        for h in range(4):
            assert [s[0] for s in stored[h]] == idx[h].tolist()
            # float32 Grams in another order (ssyrk, storage order): this model's heads (rank 16 of d = 24)
            # make the later variances sensitive; both forms are 1e-4 to 3e-4 from a float64 run here
            np.testing.assert_allclose([s[1] for s in stored[h]], var[h], atol=5e-4, rtol=0)
            assert {s[2] for s in stored[h]} == {int(r_used[h])}
    # a second dataset of 24 of the 30 images (more than the heads' rank, 16): the job with --dataset sees those only
    with duckdb.connect(str(wht)) as con:
        con.execute("INSERT INTO datasets (dataset_id, name, source, n_images) VALUES ('part:24', 'part', 'test', 24)")
        con.execute("UPDATE images SET dataset_id = 'part:24' WHERE image_id IN "
                    "(SELECT image_id FROM images ORDER BY image_id LIMIT 24)")
    out = job(capsys, "textspan", "--model", MODEL, "--warehouse", wht, "--dataset", "part:24", "--force")
    assert out["heads_written"] == N_HEADS
    (idx, var, _), n = _batched_picks(wht, 1, "part:24")
    assert n == 24
    stored = _stored(wht, 1)
    for h in range(4):
        assert [s[0] for s in stored[h]] == idx[h].tolist()
        np.testing.assert_allclose([s[1] for s in stored[h]], var[h], atol=5e-4, rtol=0)
    assert q(wht, "SELECT DISTINCT dataset_id FROM head_texts") == [("part:24",)]


def test_textspan_job_refuses_heads_with_differing_image_counts(wht, capsys):
    with duckdb.connect(str(wht)) as con:
        con.execute("DELETE FROM head_embeddings WHERE (image_id, layer, head) IN "
                    "(SELECT image_id, 1, 2 FROM head_embeddings WHERE layer = 1 AND head = 2 ORDER BY image_id LIMIT 1)")
    err = job_error(capsys, "textspan", "--model", MODEL, "--warehouse", wht)
    assert "not one row per image and head" in err and "layer 1" in err and "re-run `python -m etl embed`" in err
    with duckdb.connect(str(wht)) as con:
        con.execute("DELETE FROM head_texts")                       # layer 0 was written before layer 1 failed
        con.execute("DELETE FROM head_embeddings WHERE layer = 0")
    assert "no head embeddings of model" in job_error(capsys, "textspan", "--model", MODEL, "--warehouse", wht)


def test_textspan_job_keeps_the_other_heads_when_one_fails(wht, capsys):
    """A head without variance (every image the same vector) fails alone: its layer's other heads are
    written (the per-head fallback on the streamed moments) and the failure is recorded."""
    with duckdb.connect(str(wht)) as con:
        con.execute("UPDATE head_embeddings SET vec = [0.5 for x in vec] WHERE layer = 2 AND head = 1")
    out = job(capsys, "textspan", "--model", MODEL, "--warehouse", wht)
    assert (out["heads_written"], out["heads_failed"]) == (N_HEADS - 1, 1)
    assert q(wht, "SELECT DISTINCT head FROM head_texts WHERE layer = 2 ORDER BY head") == [(0,), (2,), (3,)]
    assert one(wht, "SELECT count(*) FROM errors WHERE item LIKE '%L2.H1%'") == 1
