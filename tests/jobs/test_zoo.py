"""The toy zoo: every shipped model loads, fits the size budget and meets its published
zero-shot targets; on a world seed that no training and no tuning used, the labels agree with the
known factors beyond chance and beyond both baselines, and invent nothing, not even on the
random-init control (slow: builds a warehouse for every zoo model)."""
from __future__ import annotations

import json

import duckdb
import pytest

from etl.world import seeds
from etl.world.evaluate import EVAL_TARGETS, evaluate, load_toy
from etl.world.seeds import EVAL
from models import toy_architectures
from models.registry import TOY_DIR, bundled_weights

ZOO = [m for m in toy_architectures() if bundled_weights(m)]
HELD_OUT = f"shapes:600:seed={seeds.STUDY[0]}"


def image_layers(arch: str) -> int:
    """The depth of a toy's image tower (sizes by architecture, not by name): its config's layers, or for
    a timm tower (named trunk, no `layers`) the blocks of the tower built from it."""
    cfg = json.loads((TOY_DIR / f"{arch}.json").read_text())["vision_cfg"]
    if "layers" in cfg:
        return int(cfg["layers"])
    from models import load_model, tower
    return len(tower(load_model(arch, random_init=True, seed=0).visual).blocks)


def map_pooled(arch: str) -> bool:
    return json.loads((TOY_DIR / f"{arch}.json").read_text())["vision_cfg"].get("timm_pool") == "map"


# Cohen's kappa of the labels over all heads (view label_kappa), every trained model, and invented labels per
# head: issue 19's targets, kappa >= 0.8 and invented <= 5 % for every model, checked on this held-out world
# (23, 600 scenes). Labeler v8 (the model's own zero-shot reading decides, docs/text.md) reaches 0.97-1.00 with
# nothing invented on the held-out worlds 1013 and 2029 for every zoo model (docs/study.md#results); v7 left
# the small and SigLIP-style toys at 0.54-0.84.
KAPPA_MIN = 0.8
INVENTED_MAX = 0.05


def test_the_zoo_has_three_sizes_and_every_model_fits_the_budget():
    from models import load_model
    assert {"toy-shapes-small", "toy-shapes", "toy-shapes-large"} <= set(ZOO)
    sizes = {}
    for m in ZOO:
        assert bundled_weights(m).stat().st_size <= 25 * 2 ** 20, m
        lm = load_model(m)
        sizes[m] = sum(p.numel() for p in lm.visual.parameters())
        assert lm.source == "bundled" and lm.model_id == f"{m}/bundled"
    assert sizes["toy-shapes-small"] * 3 < sizes["toy-shapes"] and sizes["toy-shapes"] * 2 < sizes["toy-shapes-large"]
    assert set(EVAL_TARGETS) == set(ZOO)


@pytest.mark.slow
@pytest.mark.parametrize("model", ZOO)
def test_zoo_model_meets_its_published_targets(model):
    net, tok = load_toy(name=model)
    res = evaluate(net, tok, seed=EVAL, n=400)      # held out for every seed
    missed = {f: (res[f], t) for f, t in EVAL_TARGETS[model].items() if res[f] < t}
    assert missed == {}


@pytest.fixture(scope="module")
def zoo_warehouse(tmp_path_factory):
    from etl.cli import main
    tmp = tmp_path_factory.mktemp("zoo")
    wh = tmp / "w.duckdb"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATLAS_HOME", str(tmp))
        mp.setenv("ATLAS_NO_PROGRESS", "1")
        for m in ZOO:
            assert main(["run", "--model", m, "--dataset", HELD_OUT, "--warehouse", str(wh), "--skip", "ablate",
                         "--skip", "neurons"]) == 0
        assert main(["run", "--model", "toy-shapes", "--random-init", "--seed", "0", "--dataset", HELD_OUT,
                     "--warehouse", str(wh), "--skip", "ablate", "--skip", "neurons"]) == 0
    return wh


@pytest.mark.slow
def test_labels_agree_beyond_chance_and_both_baselines_and_invent_nothing_on_a_held_out_world(zoo_warehouse):
    con = duckdb.connect(str(zoo_warehouse), read_only=True)
    rows = {r[0]: r[1:] for r in con.execute(
        "SELECT model_id, kappa, margin_shuffled_lo, shuffled_kappa, invented_rate, n_invented, n_heads, "
        "n_wrong, n_specialised FROM label_kappa").fetchall()}
    con.close()
    assert set(rows) == {f"{m}/bundled" for m in ZOO} | {"toy-shapes/random-seed0"}
    below = {m: rows[f"{m}/bundled"][0] for m in ZOO if rows[f"{m}/bundled"][0] < KAPPA_MIN}
    assert below == {}, below
    for m in ZOO:
        kappa, margin_lo, shuffled, invented, *_ = rows[f"{m}/bundled"]
        assert kappa > shuffled, (m, kappa, shuffled)                 # beats the tag-shuffled labeler ...
        assert margin_lo > 0, (m, margin_lo)                           # ... beyond its head-bootstrap interval
        assert invented <= INVENTED_MAX, (m, invented)
    # the random-init control: its heads' variance follows pixel statistics, which every property's zero-shot
    # reading explains alike (none stands out): the labeler invents at most one label
    kappa, _, _, invented, n_invented, n_heads, *_ = rows["toy-shapes/random-seed0"]
    assert invented <= INVENTED_MAX and n_invented <= 1, (n_invented, n_heads)
    assert kappa is None or kappa <= 0.1
