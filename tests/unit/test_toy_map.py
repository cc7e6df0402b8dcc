"""The SigLIP-style toy (toy-shapes-map): a timm MAP-pooled tower on the middle toy's trunk, built
offline under its own timm name, trained by the zoo recipe with SigLIP's sigmoid loss."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from etl.world import recipe
from models.towers import position_embedding

REPO = Path(__file__).resolve().parents[2]
TOY = REPO / "models" / "toy"


def test_config_is_the_middle_trunk_with_a_map_pool_and_the_zoo_tokenizer(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import open_clip
    from models import load_model
    cfg = json.loads((TOY / "toy-shapes-map.json").read_text())
    mid = json.loads((TOY / "toy-shapes.json").read_text())
    assert "siglip" not in "toy-shapes-map" + cfg["vision_cfg"]["timm_model_name"]
    assert cfg["text_cfg"] == mid["text_cfg"] and cfg["embed_dim"] == mid["embed_dim"]
    assert cfg["vision_cfg"]["timm_pool"] == "map"
    lm = load_model("toy-shapes-map", random_init=True, seed=0)
    trunk = lm.visual.trunk
    v = mid["vision_cfg"]
    assert type(trunk).__name__ == "VisionTransformer" and trunk.global_pool == "map"
    assert trunk.cls_token is None and type(trunk.attn_pool).__name__ == "AttentionPoolLatent"
    assert len(trunk.blocks) == v["layers"] and trunk.embed_dim == v["width"]
    assert trunk.blocks[0].attn.head_dim == v["head_width"]
    assert trunk.blocks[0].mlp.fc1.out_features == v["width"] * v["mlp_ratio"]
    assert trunk.patch_embed.patch_size == (v["patch_size"],) * 2 and lm.visual.image_size == (64, 64)
    assert isinstance(lm.tokenizer, open_clip.tokenizer.SimpleTokenizer)
    assert lm.tokenizer(["a red circle"]).shape == (1, 32)
    assert math.isclose(float(lm.model.logit_bias.detach()), cfg["init_logit_bias"], rel_tol=1e-6) and math.isclose(float(lm.model.logit_scale.detach().exp()), 10, rel_tol=1e-6)
    # the position embedding is drawn as open_clip's native one (std width**-0.5), not timm's 0.02
    assert 0.8 < float(position_embedding(lm.visual).std()) * v["width"] ** 0.5 < 1.2
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert lm.model.encode_image(x).shape == (2, cfg["embed_dim"])
    again = load_model("toy-shapes-map", random_init=True, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(lm.model.state_dict().values(), again.model.state_dict().values()))


def test_the_loss_follows_from_the_config():
    from models import load_model
    assert recipe.uses_sigmoid_loss(load_model("toy-shapes-map", random_init=True, seed=0).model)
    assert not recipe.uses_sigmoid_loss(load_model("toy-shapes", random_init=True, seed=0).model)


def test_sigmoid_loss_is_siglips_with_exact_multi_positive_targets():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.3, 1.5, -2.0], [-0.7, 0.2, 3.0]])    # [image, text]
    ls = torch.nn.functional.logsigmoid
    by_hand = -(sum(ls(logits[i, i]) for i in range(3))
                + sum(ls(-logits[i, j]) for i in range(3) for j in range(3) if i != j)) / 3
    assert torch.allclose(recipe.sigmoid_loss(logits, "diagonal"), by_hand, atol=1e-6)
    assert torch.allclose(recipe.sigmoid_loss(logits, "exact", np.eye(3, dtype=bool)), by_hand, atol=1e-6)
    # caption 0 is also true of image 1 ([text, image]): the pair (image 1, text 0) turns positive
    m = np.eye(3, dtype=bool)
    m[0, 1] = True
    exact = recipe.sigmoid_loss(logits, "exact", m)
    assert torch.allclose(exact, by_hand + (ls(-logits[1, 0]) - ls(logits[1, 0])) / 3, atol=1e-6)


def test_training_steps_run_with_the_sigmoid_loss_and_scale_the_timm_position_embedding(tmp_path):
    from safetensors.torch import load_file
    from models import load_model
    cfg = recipe.TrainConfig(model="toy-shapes-map", steps=2, batch_size=4, checkpoint_every=2, threads=1,
                             no_progress=True, warmup=1, log_every=1, checkpoint_dir=str(tmp_path / "ckpt"),
                             out=str(tmp_path / "out.safetensors"), pos_init_scale=10.0)
    out = recipe.train(cfg)
    log = [json.loads(ln) for ln in (tmp_path / "ckpt" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all("bias" in r for r in log)
    weights = load_file(str(out))
    init = position_embedding(load_model("toy-shapes-map", random_init=True, seed=0).visual).detach()
    trained = weights["visual.trunk.pos_embed"].float()
    # two small steps move the scaled draw little: it is 10x the seed's draw, not the draw itself
    assert torch.allclose(trained, 10 * init, atol=0.05) and not torch.allclose(trained, init, atol=0.05)
    state = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)["model"]      # float32
    assert float(state["logit_bias"]) != json.loads((TOY / "toy-shapes-map.json").read_text())["init_logit_bias"]   # it learns


def test_the_timm_trunk_is_drawn_as_its_class_token_siblings_native_trunk():
    # timm draws every Linear with std 0.02: the trunk's and the pool's attention start uniform and
    # the recipe never taught the toy position or shape. The toy must start as open_clip's native
    # tower of the same trunk (toy-shapes) starts: layer for layer the same weight spread.
    from models import load_model
    timm_trunk = load_model("toy-shapes-map", random_init=True, seed=0).visual.trunk
    native = load_model("toy-shapes", random_init=True, seed=0).visual.transformer.resblocks
    pairs = []
    for t, n in zip(timm_trunk.blocks, native):
        pairs += [(t.attn.qkv, n.attn.in_proj_weight, n.attn.in_proj_bias), (t.attn.proj, n.attn.out_proj.weight, n.attn.out_proj.bias),
                  (t.mlp.fc1, n.mlp.c_fc.weight, n.mlp.c_fc.bias), (t.mlp.fc2, n.mlp.c_proj.weight, n.mlp.c_proj.bias)]
    assert len(pairs) == 24
    for lin, w, b in pairs:
        assert lin.weight.shape == w.shape
        assert abs(float(lin.weight.detach().std()) / float(w.detach().std()) - 1) < 0.05, lin
        assert float(lin.bias.detach().abs().max()) == 0.0 if float(b.detach().abs().max()) == 0.0 else \
            abs(float(lin.bias.detach().std()) / float(b.detach().std()) - 1) < 0.3
    pool = timm_trunk.attn_pool
    for lin in (pool.q, pool.kv, pool.proj, pool.mlp.fc1, pool.mlp.fc2):   # the pool alike (~1/sqrt(fan_in), not 0.02)
        assert 0.5 < float(lin.weight.detach().std()) * lin.in_features ** 0.5 < 1.2, lin


def test_the_logit_bias_starts_at_the_prior_log_odds_of_a_true_pair_in_the_recipes_batches():
    # SigLIP's -10 is the log odds of one true caption among its 32k-caption batches. The recipe's
    # batches (B 128, exact multi-positive targets) hold ~4.6 true captions per image: at -10 every
    # true pair starts as a confident negative, and toy-shapes-map's embeddings collapsed together
    # (mean pairwise cosine 0.87 after 150 steps, 0.28 at the prior's log odds).
    cfg = json.loads((TOY / "toy-shapes-map.json").read_text())
    base = recipe.TrainConfig()
    rates = []
    for _, flags in recipe.RECIPE_PHASES:
        run = recipe.TrainConfig(**{**vars(base), **flags})
        scenes = recipe.training_scenes(0, 0, run.batch_size, run.group_size, run.image_size, run.partial_prob,
                                        run.start_index, run.single_prob)
        rates.append(float(recipe.consistency(scenes).mean()))
    p = float(np.mean(rates))
    assert 0.02 < p < 0.06
    assert abs(cfg["init_logit_bias"] - math.log(p / (1 - p))) < 0.3, (cfg["init_logit_bias"], math.log(p / (1 - p)))


def test_the_sigmoid_loss_is_weighed_to_the_softmax_losss_gradient(tmp_path):
    # the weight is the recipe's default, recorded in the checkpoint and checked on resume
    assert 0 < recipe.SIGMOID_WEIGHT < 1 and recipe.TrainConfig().sigmoid_weight == recipe.SIGMOID_WEIGHT
    ck = tmp_path / "ckpt"
    cfg = recipe.TrainConfig(model="toy-shapes-map", steps=2, batch_size=4, checkpoint_every=1, threads=1, no_progress=True,
                             warmup=1, log_every=1, checkpoint_dir=str(ck), out=str(tmp_path / "o.safetensors"), stop_at=1)
    assert recipe.train(cfg) is None
    assert torch.load(ck / "last.pt", weights_only=True)["args"]["sigmoid_weight"] == recipe.SIGMOID_WEIGHT
    other = recipe.TrainConfig(**{**vars(cfg), "resume": True, "sigmoid_weight": 1.0, "stop_at": 0})
    with pytest.raises(SystemExit, match="--sigmoid-weight 0.2, this run asks for 1.0"):
        recipe.train(other)
