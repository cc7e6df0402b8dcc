"""`python -m etl neurons` end to end (in process) on the toy warehouse of tests/conftest.py (toy-shapes,
300 scenes; `run` already stored its auto layer): what it stores equals what the lens computes, the
zero-shot check's baseline is the toy eval's, it skips what is stored and resumes a killed pass."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from etl.world.seeds import EVAL
from etl.cli import main
from warehouse import queries
from warehouse.db import connect

MODEL = "toy-shapes/bundled"
DATA = "shapes:300:seed=13"


@pytest.fixture
def wh(toy_warehouse, tmp_path, monkeypatch):
    path = tmp_path / "w.duckdb"
    shutil.copy(toy_warehouse, path)
    monkeypatch.setenv("ATLAS_HOME", str(tmp_path))
    monkeypatch.setenv("ATLAS_NO_PROGRESS", "1")
    return path


def count(path, sql, params=()):
    with connect(path, read_only=True) as con:
        return con.execute(sql, list(params)).fetchone()[0]


def _run(path, *flags):
    return main(["neurons", "--model", MODEL, "--dataset", DATA, "--warehouse", str(path), *flags])


def test_run_stored_the_layer_that_reaches_most(wh):
    from etl.jobs.neurons import PROBE_IMAGES, _batches, _items, reach
    from etl.datasets import open_dataset
    from models import model_from_row
    layers = queries.neuron_layers(wh, MODEL)
    assert len(layers) == 1 and layers.n_images.iloc[0] == 300
    lm = model_from_row(queries.model_row(wh, MODEL))
    items = list(_items(str(wh), MODEL, open_dataset(DATA), None))[:PROBE_IMAGES]
    r = reach(lm, next(_batches(lm, items, PROBE_IMAGES))[1], list(range(lm.layers - 1)))
    assert int(layers.layer.iloc[0]) == max(r, key=r.get)
    assert layers.reach.iloc[0] == pytest.approx(r[int(layers.layer.iloc[0])], rel=1e-4)


def test_neurons_job_stores_what_the_lens_computes(wh):
    from etl.world import evaluate
    from models import model_from_row
    from models.neurons import SecondOrderLens
    assert _run(wh, "--layers", "3", "--store-alpha", "--max-images", "120", "--eval-n", "40",
                "--shuffled-draws", "3", "--texts", "5", "--top-k", "4", "--pc-images", "10") == 0
    lm = model_from_row(queries.model_row(wh, MODEL))
    N, K = lm.visual.transformer.resblocks[3].mlp.c_fc.out_features, 2 * lm.heads
    info = queries.neuron_layers(wh, MODEL).set_index("layer").loc[3]
    assert (info.n_neurons, info.later_heads, info.n_images, info.texts_k, bool(info.alpha_stored)) == (N, K, 120, 5, True)
    where = "WHERE model_id = ? AND layer = 3"
    for table, rows in [("neuron_stats", N), ("neuron_top_images", 4 * N), ("neuron_labels", 4 * N),
                        ("neuron_head_effects", K * N), ("neuron_factor_variance", 7 * N),
                        ("neuron_ablations", 5 * 7), ("neuron_alpha", 120)]:
        assert count(wh, f"SELECT count(*) FROM {table} {where}", [MODEL]) == rows, table
    assert count(wh, f"SELECT max(rank) FROM neuron_texts {where}", [MODEL]) == 4
    # the stored alpha is the lens's, and the statistics are those of its norms
    lens = SecondOrderLens(lm.visual, [3])
    G = lens.gram(3).numpy()
    for n in (0, 17, N - 1):
        ids, alpha = queries.neuron_alpha_rows(wh, MODEL, 3, n, K)
        assert len(ids) == 120 and alpha.shape == (120, K)
        norms = np.sqrt(np.einsum("ik,kj,ij->i", alpha, G[n], alpha))
        rec = queries.neuron_record(wh, MODEL, 3, n)
        assert rec["mean_norm"] == pytest.approx(norms.mean(), rel=1e-4)
        assert rec["max_norm"] == pytest.approx(norms.max(), rel=1e-4)
        assert sum(rec["hist_counts"]) == 120 and np.linalg.norm(rec["pc"]) == pytest.approx(1.0, abs=1e-5)
        top = queries.neuron_top_images(wh, MODEL, 3, n, 4)
        assert list(top.image_id) == [ids[i] for i in np.argsort(-norms, kind="stable")[:4]]
    with torch.no_grad():
        from etl.jobs.neurons import _batches, _items
        from etl.datasets import open_dataset
        first = next(_batches(lm, _items(str(wh), MODEL, open_dataset(DATA), 2), 2))
        direct = lens.alpha(lens.trace(first[1]), 3).numpy()
    ids, alpha = queries.neuron_alpha_rows(wh, MODEL, 3, 17, K)
    assert np.allclose(alpha[ids.index(first[0][1])], direct[1, 17], atol=1e-6)
    # the zero-shot check: its baseline is the toy eval's plain accuracy on the same scenes (to one scene
    # of 40: the lens's forward pass and the trimmed text encoder agree with open_clip's to float rounding)
    abl = queries.neuron_ablations(wh, MODEL)
    abl = abl[abl.layer == 3]
    plain = evaluate.evaluate(lm.model, lm.tokenizer, seed=EVAL, n=40, size=lm.image_size)   # the job's default world
    base = abl[abl.variant == "baseline"].set_index("factor").accuracy
    assert {f: base[f] for f in base.index} == pytest.approx({f: plain[f] for f in base.index}, abs=1 / 40 + 1e-9)
    assert set(abl.variant) == {"baseline", "zero", "mean", "rank1", "sparse"}
    # a second run with the same settings stores nothing new
    before = count(wh, "SELECT count(*) FROM runs WHERE job = 'neurons' AND status = 'skipped'")
    assert _run(wh, "--layers", "3", "--store-alpha", "--max-images", "120", "--eval-n", "40",
                "--shuffled-draws", "3", "--texts", "5", "--top-k", "4", "--pc-images", "10") == 0
    assert count(wh, "SELECT count(*) FROM runs WHERE job = 'neurons' AND status = 'skipped'") == before + 1


def test_a_killed_run_resumes_from_its_checkpoint(wh, monkeypatch):
    from etl.jobs import neurons as job
    flags = ["--layers", "1", "--max-images", "60", "--eval-n", "0", "--shuffled-draws", "0", "--batch-size", "16"]
    seen = []
    real = job._finish_layer

    def killed(*a, **kw):
        raise KeyboardInterrupt("killed after the pass")
    monkeypatch.setattr(job, "CHECKPOINT_S", 0.0)
    monkeypatch.setattr(job, "_finish_layer", killed)
    assert _run(wh, *flags) == 130                          # interrupted: the checkpoint is kept
    assert count(wh, "SELECT count(*) FROM neuron_stats WHERE layer = 1") == 0

    def counting(*a, **kw):
        seen.append(a[4].n)                                  # the accumulator's images when the layer finishes
        return real(*a, **kw)
    monkeypatch.setattr(job, "_finish_layer", counting)
    real_batches = job._batches
    skipped = []
    monkeypatch.setattr(job, "_batches", lambda lm, items, bs, skip=0: (skipped.append(skip), real_batches(lm, items, bs, skip))[1])
    assert _run(wh, *flags) == 0
    assert skipped[-1] == 60 and seen == [60]                # nothing recomputed: the checkpoint held all 60 images
    resumed = queries.neuron_atlas(wh, MODEL, 1)
    assert _run(wh, *flags, "--force") == 0
    fresh = queries.neuron_atlas(wh, MODEL, 1)
    np.testing.assert_allclose(resumed.mean_norm, fresh.mean_norm, rtol=1e-6)
    assert list(resumed.label) == list(fresh.label)


@pytest.mark.parametrize("flags, message", [
    (["--layers", "5"], "error: --layers 5: MLP layer 5 is the last one and reaches no later attention head; "
                        "choose among 0..4"),
    (["--top-k", "20", "--pc-images", "10"], "error: --top-k 20 is more than --pc-images 10: the top images are "
                                              "taken from the images kept for the principal direction; raise --pc-images"),
    (["--dataset", "shapes:50:seed=99"], "error: no image of shapes:50:seed=99 is embedded for toy-shapes/bundled: run "
                                         "`python -m etl embed --model ... --dataset shapes:50:seed=99` first"),
])
def test_mistakes_are_one_line(wh, capsys, flags, message):
    argv = ["neurons", "--model", MODEL, "--warehouse", str(wh)]
    argv += flags if "--dataset" in flags else ["--dataset", DATA] + flags
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().startswith(message)
