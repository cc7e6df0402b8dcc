"""The bundled toy CLIP: config, exact decomposition, shipped weights, zero-shot targets,
training (checkpoint + resume), evaluation prompts and the commands' --help."""
import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import models
from etl.world import evaluate as eval_toy, recipe as train_toy, shapes

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "models" / "toy" / "toy-shapes.json"
WEIGHTS = REPO / "models" / "toy" / "toy-shapes.safetensors"
TARGETS = {"color": 0.90, "shape": 0.90, "position": 0.80, "background": 0.80, "count": 0.70}


@pytest.fixture(scope="module")
def toy():
    from models import load_model
    torch.set_num_threads(2)
    return load_model("toy-shapes")


def _images(n, seed, **fixed):
    return np.stack([s.image for s in shapes.generate(n, seed, **fixed)])


# ----------------------------------------------------------------------------- config

def test_config_is_a_class_token_vit_with_the_standard_tokenizer():
    cfg = json.loads(CONFIG.read_text())
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    assert v["layers"] >= 6 and v["width"] // v["head_width"] >= 4
    assert v.get("pool_type", "tok") == "tok" and not v.get("attentional_pool")
    assert v["image_size"] == 64 and v["image_size"] % v["patch_size"] == 0
    assert t["context_length"] == 32 and t["vocab_size"] == 49408
    model, tok = train_toy.toy_model(seed=0)
    assert tok(["a red circle"]).shape == (1, 32)
    assert model.visual.transformer.resblocks[0].attn.num_heads == v["width"] // v["head_width"]


@pytest.mark.parametrize("weights", ["random", "shipped"])
def test_registered_config_loads_and_decomposes_exactly(weights, toy):
    from models import decompose, load_model
    lm = load_model("toy-shapes", random_init=True, seed=3) if weights == "random" else toy
    assert lm.layers >= 6 and lm.heads >= 4 and lm.image_size in (64, (64, 64))
    scenes = list(shapes.generate(6, seed=31))
    x = torch.stack([lm.preprocess(s.to_pil()) for s in scenes])          # [6, 3, 64, 64]
    dec = decompose(lm, x, layers="all")
    assert dec.head_cls.shape == (6, lm.layers, lm.heads, lm.embed_dim)
    recon = dec.head_cls.sum((1, 2)) + dec.rest
    assert torch.allclose(recon, dec.embedding, atol=1e-4)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(lm.model.encode_image(x), dim=-1)
    assert torch.allclose(dec.embedding, ref, atol=1e-4)
    assert dec.head_cls.abs().sum() > 0


def test_training_tensor_matches_the_eval_transform(toy):
    imgs = _images(4, seed=32)
    a = models.pixels_to_tensor(toy, imgs)                                # [4, 3, 64, 64]
    b = torch.stack([toy.preprocess(shapes.Scene(im, {}, "").to_pil()) for im in imgs])
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=1e-5)


# ----------------------------------------------------------------------------- shipped weights

def test_shipped_weights_are_small_fp16_safetensors_loaded_as_fp32(toy):
    from safetensors import safe_open
    assert WEIGHTS.is_file() and WEIGHTS.stat().st_size <= 25 * 2**20
    with safe_open(str(WEIGHTS), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        keys = set(f.keys())
    assert dtypes == {"F16"}
    assert keys == set(toy.model.state_dict())
    assert all(p.dtype == torch.float32 for p in toy.model.parameters())
    assert toy.model_id == "toy-shapes/bundled"
    # loading the same file as a checkpoint gives the same model
    model, _ = eval_toy.load_toy(WEIGHTS)
    sd = toy.model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


def test_shipped_weights_reach_the_zero_shot_targets(toy):
    # a small fixed held-out sample (world seed 7, never used in training): targets - 0.05
    res = eval_toy.evaluate(toy.model, toy.tokenizer, seed=7, n=300)
    for factor, target in TARGETS.items():
        assert res[factor] >= target - 0.05, (factor, res)
    # the factors without a target are still learnt well above chance
    assert res["size"] > 0.5 + 0.2 and res["pattern"] > 0.25 + 0.2, res


def test_zero_shot_is_not_a_constant_guess(toy):
    # a model that ignores the image scores chance; the shipped model must not be that
    from models import load_model
    rnd = load_model("toy-shapes", random_init=True, seed=0)
    lm_rand_res = eval_toy.evaluate(rnd.model, rnd.tokenizer, seed=7, n=100)
    assert lm_rand_res["color"] < 0.5 and lm_rand_res["shape"] < 0.5


def test_heads_carry_factors_by_probe(toy):
    from etl.world.probes import head_embeddings_for_scenes, probe_matrix
    scenes = list(shapes.generate(300, seed=33))
    head_cls, layers = head_embeddings_for_scenes(toy, scenes, "all")
    assert head_cls.shape[:3] == (300, toy.layers, toy.heads) and layers == list(range(toy.layers))
    rows = probe_matrix(head_cls, {f: [s.factors[f] for s in scenes] for f in ("color", "position")}, seed=0)
    for f in ("color", "position"):
        best = max(r["accuracy"] - r["chance"] for r in rows if r["factor"] == f)
        assert best > 0.4, f


# ----------------------------------------------------------------------------- evaluation prompts

def test_prompt_ensembles_name_their_value_only():
    for factor, values in shapes.FACTORS.items():
        for v in values:
            ps = eval_toy.prompts_for(factor, v)
            assert len(ps) >= 4 and len(set(ps)) == len(ps)
            phrases = eval_toy.value_phrase(factor, v)
            assert all(any(ph in p for ph in phrases) for p in ps), (factor, v)
            others = [ph for o in values if o != v for ph in eval_toy.value_phrase(factor, o)]
            for p in ps:
                assert not any(f" {ph} " in f" {p} " for ph in others), (p, factor)


def test_evaluate_rejects_bad_n(toy):
    with pytest.raises(ValueError):
        eval_toy.evaluate(toy.model, toy.tokenizer, seed=1, n=0)


# ----------------------------------------------------------------------------- training

def _train_args(tmp_path, **kw):
    return train_toy.TrainConfig(**{**dict(steps=4, batch_size=6, checkpoint_every=2, threads=1, no_progress=True,
                                         warmup=1, log_every=1, checkpoint_dir=str(tmp_path / "ckpt"),
                                         out=str(tmp_path / "out.safetensors")), **kw})


@pytest.mark.slow
def test_training_resumes_to_identical_weights(tmp_path):
    from safetensors.torch import load_file
    full = _train_args(tmp_path / "a")
    train_toy.train(full)
    split = _train_args(tmp_path / "b", stop_at=2)
    assert train_toy.train(split) is None                 # stopped early, checkpoint only
    assert not Path(split.out).exists() and (tmp_path / "b" / "ckpt" / "last.pt").exists()
    resumed = _train_args(tmp_path / "b", resume=True)
    train_toy.train(resumed)
    a, b = load_file(full.out), load_file(resumed.out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(v.dtype == torch.float16 for v in a.values() if v.is_floating_point())
    log = [json.loads(ln) for ln in (tmp_path / "b" / "ckpt" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    # the weights changed from the initialisation
    init, _ = train_toy.toy_model(seed=0)
    assert not torch.equal(init.state_dict()["visual.proj"].half(), a["visual.proj"])


@pytest.mark.slow
def test_resume_refuses_a_mismatched_run(tmp_path):
    train_toy.train(_train_args(tmp_path, stop_at=2))
    with pytest.raises(SystemExit, match="--steps"):
        train_toy.train(_train_args(tmp_path, resume=True, steps=8))
    with pytest.raises(SystemExit, match="no checkpoint"):
        train_toy.train(_train_args(tmp_path / "none", resume=True))


def test_trimmed_text_encoding_equals_the_full_one():
    model, tok = train_toy.toy_model(seed=1)
    model.eval()
    t = tok(["a red circle", "four small striped blue stars in the top left corner on a grassy field"])
    with torch.no_grad():
        assert torch.allclose(model.encode_text(t), models.encode_tokens(model, t), atol=1e-5)


def test_lr_schedule_warms_up_and_decays():
    lrs = [train_toy.lr_at(s, 100, 1e-3, 10) for s in range(100)]
    assert lrs[0] < lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] < 0.05e-3


# ----------------------------------------------------------------------------- commands

@pytest.mark.parametrize("job", ["train-toy", "eval-toy", "probe-heads"])
def test_every_flag_has_help(job, capsys):
    from etl.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    p = sub.choices[job]
    for action in p._actions:
        assert action.help, (job, action.dest)
    with pytest.raises(SystemExit) as e:
        parser.parse_args([job, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage" in out and job in out


def test_training_groups_are_minimal_variants_and_targets_are_exact():
    scenes = train_toy.training_scenes(5, seed=0, batch_size=16, group_size=4)
    assert len(scenes) == 16
    again = train_toy.training_scenes(5, seed=0, batch_size=16, group_size=4)
    assert all(np.array_equal(a.image, b.image) and a.caption == b.caption for a, b in zip(scenes, again))
    for g in range(4):
        base = scenes[4 * g].factors
        for s in scenes[4 * g + 1:4 * g + 4]:
            diff = [k for k in base if base[k] != s.factors[k]]
            assert len(diff) == 1, (base, s.factors)
    m = train_toy.consistency(scenes)                      # [text, image]
    assert m.shape == (16, 16) and m.diagonal().all()
    for j, s in enumerate(scenes):
        for i, t in enumerate(scenes):
            assert m[j, i] == all(s.factors[k] == t.factors[k] for k in s.named)
    plain = train_toy.training_scenes(2, seed=0, batch_size=3, group_size=1)
    assert [s.index for s in plain] == [6, 7, 8]


def test_exact_targets_reduce_to_the_clip_loss_without_collisions():
    logits = torch.randn(5, 5)
    eye = np.eye(5, dtype=bool)
    a = train_toy.contrastive_loss(logits, "exact", eye)
    b = train_toy.contrastive_loss(logits, "diagonal")
    assert torch.allclose(a, b, atol=1e-6)
    # caption 0 is also true of image 1: matching it to image 1 is no error for 'exact'
    m = eye.copy()
    m[0, 1] = True                                           # [text, image]
    lg = torch.full((5, 5), -5.0)                            # [image, text]
    lg.fill_diagonal_(5.0)
    lg[0, 0], lg[1, 0] = -5.0, 5.0
    exact = train_toy.contrastive_loss(lg, "exact", m)
    diag = train_toy.contrastive_loss(lg, "diagonal")
    assert exact < diag - 0.4      # half of caption 0's text->image error (10 nats) is gone


def test_factor_captions_cover_every_value_once():
    texts, spans = train_toy.factor_captions(0)
    assert len(texts) == sum(len(v) for v in shapes.FACTORS.values())
    assert [f for f, _, _ in spans] == list(shapes.FACTORS)
    for f, a, n in spans:
        assert n == len(shapes.FACTORS[f]) and len(set(texts[a:a + n])) == n


def test_factor_weights_parse_and_refuse_bad_entries():
    assert train_toy.parse_factor_weights("shape=2, count=1.5") == {"shape": 2.0, "count": 1.5}
    assert train_toy.parse_factor_weights("") == {}
    for bad in ("shape", "colour=2", "shape=x", "shape=-1"):
        with pytest.raises(ValueError, match="--factor-weights"):
            train_toy.parse_factor_weights(bad)


def test_factor_loss_weights_change_the_mean():
    torch.manual_seed(0)
    scenes = list(shapes.generate(8, seed=40))
    texts, spans = train_toy.factor_captions(0)
    img = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(len(texts), 16), dim=-1)
    flat = train_toy.factor_loss(10.0, img, txt, spans, scenes, {})
    only_shape = train_toy.factor_loss(10.0, img, txt, spans, scenes,
                                       {f: (1.0 if f == "shape" else 0.0) for f in shapes.FACTORS})
    a, n = spans[0][1], spans[0][2]
    target = torch.tensor([shapes.FACTORS["shape"].index(s.factors["shape"]) for s in scenes])
    ref = torch.nn.functional.cross_entropy(10.0 * img @ txt[a:a + n].T, target)
    assert torch.allclose(only_shape, ref) and not torch.allclose(flat, ref)
