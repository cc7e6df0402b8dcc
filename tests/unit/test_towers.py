"""Every transformer tower family decomposes exactly (MATH.md §9): tiny towers of each class and
option the adapters cover (open_clip native: avg, CoCa's pooler; timm: MAP, class token with
register tokens, layer scale, q/k-norm and a norm inside attention, avg + fc_norm, EVA02 with RoPE,
SwiGLU and sub-LN, EVA02-E post-norm, PE-Core, grouped k/v) against the tower's own output in
float64 (<= 1e-10) and float32 (<= 1e-5), the per-source terms against the per-head terms, the
component split, and a literal per-head reference through the MAP pool and CoCa's pooler.
Full-size random-init models of the issue's list run in the slow test."""
from __future__ import annotations

import math

import open_clip
import pytest
import torch
from open_clip.model import _build_vision_tower

from models import Decomposer, load_model, tower
from models.towers import config_support, tower_support
from tests.model_fixtures import TINY_NATIVE_VISION, perturb, register_tiny_timm, tiny_timm_config

# (case id, open_clip config of the image tower); timm configs need register_tiny_timm() first
CASES = {
    **{f"native-{k}": {"embed_dim": 24, "vision_cfg": v} for k, v in TINY_NATIVE_VISION.items()},
    "timm-map": tiny_timm_config("atlas_test_vit_map"),                               # SigLIP's class
    "timm-map-linear": tiny_timm_config("atlas_test_vit_map", proj="linear"),
    "timm-cls-reg-ls-qknorm": tiny_timm_config("atlas_test_vit_cls", proj="linear"),
    "timm-avg-fcnorm": tiny_timm_config("atlas_test_vit_avg"),
    "eva02-rope-swiglu-subln": tiny_timm_config("atlas_test_eva02", proj=None, embed_dim=40),   # timm head
    "eva-postnorm": tiny_timm_config("atlas_test_eva_post"),
    "pe-core": tiny_timm_config("atlas_test_pe", proj=None, embed_dim=40),
    "gqa-rope-avg": tiny_timm_config("atlas_test_gqa"),
}
POOLING = {"native-avg-after": "avg", "native-avg-before": "avg", "native-coca": "attn", "timm-map": "map",
           "timm-map-linear": "map", "timm-cls-reg-ls-qknorm": "tok", "timm-avg-fcnorm": "avg",
           "eva02-rope-swiglu-subln": "tok", "eva-postnorm": "tok", "pe-core": "map", "gqa-rope-avg": "avg"}


@pytest.fixture(scope="module", autouse=True)
def _timm_tiny():
    register_tiny_timm()


def build_visual(cfg: dict, seed: int = 0, dtype=torch.float64) -> torch.nn.Module:
    torch.manual_seed(seed)
    visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"]).eval()
    perturb(visual, seed)
    return visual.to(dtype)


def tower_output(visual, x):
    """What CLIP.encode_image(x, normalize=False) returns: the tower's output (CoCa's: its first)."""
    out = visual(x)
    return out[0] if isinstance(out, tuple) else out


def _images(visual, n=3, seed=1, dtype=torch.float64):
    S = tower(visual).image_size
    return torch.randn(n, 3, S, S, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"])
@torch.no_grad()
def test_identity_against_the_towers_own_output(case, dtype, tol):
    visual = build_visual(CASES[case], dtype=dtype)
    adapter = tower(visual)
    assert adapter.pooling == POOLING[case]
    x = _images(visual, dtype=dtype)
    dec = Decomposer(visual, range(adapter.layers), tokens=True, components=True).eval()(x)
    ref = torch.nn.functional.normalize(tower_output(visual, x), dim=-1)
    B, d = ref.shape
    assert dec.embedding.dtype == dtype and dec.head_cls.shape == (B, adapter.layers, adapter.heads, d)
    assert (dec.embedding - ref).abs().max() <= tol
    assert (dec.head_cls.sum((1, 2)) + dec.rest - dec.embedding).abs().max() <= tol
    T = adapter.prefix + adapter.grid[0] * adapter.grid[1]
    assert dec.head_tokens.shape == (B, adapter.layers, adapter.heads, T, d)
    assert (dec.head_tokens.sum(3) - dec.head_cls).abs().max() <= tol / 10
    parts = dec.head_cls.sum((1, 2)) + dec.mlp.sum(1) + dec.attn_bias.sum(1) + dec.embedding_term
    assert (dec.pool_mlp is not None) == (POOLING[case] == "map")
    if dec.pool_mlp is not None:
        parts = parts + dec.pool_mlp
        assert dec.pool_mlp.norm(dim=-1).min() > 1e-8            # a real term, not a zero placeholder
    assert (parts - dec.embedding).abs().max() <= tol
    # every head says something, and the heads are not all alike
    norms = dec.head_cls.norm(dim=-1)
    assert norms.min() > 0 and (dec.head_cls[:, 0, 0] - dec.head_cls[:, -1, -1]).norm(dim=-1).min() > 1e-3 * norms.max()


@pytest.mark.parametrize("case", ["timm-map", "eva02-rope-swiglu-subln", "native-coca"])
@torch.no_grad()
def test_subsets_of_layers_and_the_fused_path_agree_with_all_layers(case):
    visual = build_visual(CASES[case])
    x = _images(visual)
    full = Decomposer(visual, range(tower(visual).layers)).eval()(x)
    part = Decomposer(visual, [1]).eval()(x)                 # layers 0 and 2 run the tower's own block
    assert torch.allclose(part.head_cls[:, 0], full.head_cls[:, 1], atol=1e-12)
    assert (part.head_cls.sum((1, 2)) + part.rest - part.embedding).abs().max() < 1e-12
    traced = Decomposer(visual, [1], traceable=True).eval()(x)
    assert torch.allclose(traced.head_cls, part.head_cls, atol=1e-12)


def _ln(x, norm):
    """norm's per-token scale and the centred, gained, scaled x (no bias): float64 literal."""
    s = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + norm.eps)
    return s, norm.weight * (x - x.mean(-1, keepdim=True)) / s


@torch.no_grad()
def test_map_heads_match_a_literal_reference_through_the_pool():
    """SigLIP's class, literally: every head's output at every token, carried through the final
    LayerNorm (its scale frozen) and the pool's attention (its weights frozen) and out-projection."""
    visual = build_visual(CASES["timm-map"])
    trunk = visual.trunk
    x = _images(visual)
    h_in = trunk.norm_pre(trunk._pos_embed(trunk.patch_embed(x)))
    B, T, W = h_in.shape
    r = h_in
    per_head = []                                                   # L x [B, H, T, W]
    for blk in trunk.blocks:
        a = blk.attn
        H, dh = a.num_heads, a.head_dim
        q, k, v = a.qkv(blk.norm1(r)).reshape(B, T, 3, H, dh).permute(2, 0, 3, 1, 4)
        A = torch.softmax(q @ k.transpose(-1, -2) * dh ** -0.5, dim=-1)            # [B, H, T, T]
        o = A @ v                                                                  # [B, H, T, dh]
        heads = torch.stack([o[:, h] @ a.proj.weight[:, h * dh:(h + 1) * dh].T for h in range(H)], 1)
        per_head.append(heads)
        r = r + heads.sum(1) + a.proj.bias
        r = r + blk.mlp(blk.norm2(r))
    ap = trunk.attn_pool
    s, _ = _ln(r, trunk.norm)
    xn = trunk.norm(r)
    M, dp = ap.num_heads, ap.head_dim
    qp = ap.q(ap.latent)[0, 0].view(M, dp)                                         # [M, dp]
    kp = ap.kv(xn)[..., :M * dp].view(B, T, M, dp)
    a = torch.softmax(torch.einsum("md,btmd->bmt", qp, kp) * dp ** -0.5, dim=-1)   # [B, M, T]
    z = tower_output(visual, x)
    wv = ap.kv.weight[M * dp:].view(M, dp, W)

    def through_pool(c):                                                           # c [B, T, W] -> [B, d]
        cn = trunk.norm.weight * (c - c.mean(-1, keepdim=True)) / s               # frozen scale, no bias
        o = torch.einsum("bmt,btw,mdw->bmd", a, cn, wv).reshape(B, -1)
        return o @ ap.proj.weight.T

    ref = torch.stack([torch.stack([through_pool(ph[:, h]) for h in range(ph.shape[1])], 1) for ph in per_head], 1)
    ref = ref / z.norm(dim=-1)[:, None, None, None]
    dec = Decomposer(visual, range(len(trunk.blocks)), tokens=True).eval()(x)
    assert (dec.head_cls - ref).abs().max() < 1e-12
    # the pool MLP term, literally
    u = ap.proj((a[:, :, None] @ ap.kv(xn)[..., M * dp:].view(B, T, M, dp).transpose(1, 2))[:, :, 0].reshape(B, -1))
    assert torch.allclose(dec.pool_mlp, ap.mlp(ap.norm(u)) / z.norm(dim=-1, keepdim=True), atol=1e-12)


@torch.no_grad()
def test_coca_heads_match_a_literal_reference_through_the_attentional_pooler():
    visual = build_visual(CASES["native-coca"])
    x = _images(visual)
    h_in = visual._embeds(x)
    B, T, W = h_in.shape
    r, per_head = h_in, []
    for blk in visual.transformer.resblocks:
        at = blk.attn
        H, dh = at.num_heads, at.head_dim
        q, k, v = (t.view(B, T, H, dh).transpose(1, 2) for t in
                   torch.nn.functional.linear(blk.ln_1(r), at.in_proj_weight, at.in_proj_bias).split(W, -1))
        o = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1) @ v
        heads = torch.stack([o[:, h] @ at.out_proj.weight[:, h * dh:(h + 1) * dh].T for h in range(H)], 1)
        per_head.append(heads)
        r = r + heads.sum(1) + at.out_proj.bias
        r = r + blk.mlp(blk.ln_2(r))
    pool = visual.attn_pool
    pa = pool.attn
    E, M = pa.embed_dim, pa.num_heads
    s_k, _ = _ln(r, pool.ln_k)
    xk = pool.ln_k(r)
    assert not pa._qkv_same_embed_dim                     # keys and values come from the tower's width
    qq = torch.nn.functional.linear(pool.ln_q(pool.query[:1]), pa.q_proj_weight, pa.in_proj_bias[:E])
    kk = torch.nn.functional.linear(xk, pa.k_proj_weight, pa.in_proj_bias[E:2 * E])
    a = torch.softmax(torch.einsum("md,btmd->bmt", qq.view(M, -1), kk.view(B, T, M, -1)) / math.sqrt(E // M), -1)
    u = pa(pool.ln_q(pool.query[:1]).expand(B, -1, -1), xk, xk, need_weights=False)[0][:, 0]   # [B, E]
    s_post, _ = _ln(u, visual.ln_post)
    z = tower_output(visual, x)
    wv = pa.v_proj_weight.view(M, E // M, W)

    def through_pool(c):
        cn = pool.ln_k.weight * (c - c.mean(-1, keepdim=True)) / s_k
        o = torch.einsum("bmt,btw,mdw->bmd", a, cn, wv).reshape(B, -1) @ pa.out_proj.weight.T
        return (visual.ln_post.weight * (o - o.mean(-1, keepdim=True)) / s_post) @ visual.proj

    ref = torch.stack([torch.stack([through_pool(ph[:, h]) for h in range(ph.shape[1])], 1) for ph in per_head], 1)
    dec = Decomposer(visual, range(len(per_head))).eval()(x)
    assert (dec.head_cls - ref / z.norm(dim=-1)[:, None, None, None]).abs().max() < 1e-12


def test_loaded_map_toy_describes_itself_and_decomposes():
    lm = load_model("toy-shapes-map", random_init=True, seed=0)
    assert (lm.layers, lm.heads, lm.width, lm.embed_dim, lm.image_size, lm.patch_size, lm.grid, lm.pooling) == \
        (6, 4, 128, 128, 64, (8), (8, 8), "map")
    row = lm.row()
    assert row["pooling"] == "map" and row["layers"] == 6 and row["heads"] == 4 and row["patch_size"] == 8
    from models import decompose
    x = torch.randn(2, 3, 64, 64)
    dec = decompose(lm, x, "last2", tokens=True)
    assert dec.head_tokens.shape == (2, 2, 4, 64, 128) and dec.pool_mlp.shape == (2, 128)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(lm.model.encode_image(x), dim=-1)
    assert (dec.embedding - ref).abs().max() < 1e-5
    assert (dec.head_cls.sum((1, 2)) + dec.rest - dec.embedding).abs().max() < 1e-5


@pytest.mark.parametrize("arch, words", [
    ("RN50", "ResNet: convolutions, no attention heads"),
    ("convnext_base", "ConvNeXt: convolutions, no attention heads"),
    ("MobileCLIP-S1", "FastViT"),
])
def test_towers_without_heads_are_refused_in_one_line(arch, words):
    why = config_support(arch, open_clip.get_model_config(arch))
    assert words in why and "\n" not in why


@pytest.mark.parametrize("arch", ["ViT-B-16-SigLIP", "ViT-B-16-SigLIP2", "PE-Core-S-16-384", "EVA02-B-16",
                                  "EVA02-E-14", "ViT-L-14-CLIPA", "coca_ViT-B-32", "MobileCLIP-B", "ViTamin-S",
                                  "ViT-B-16"])
def test_transformer_towers_are_accepted(arch):
    assert config_support(arch, open_clip.get_model_config(arch)) is None


@pytest.mark.slow
def test_config_check_agrees_with_the_built_tower_on_every_architecture():
    """The registry's quick check (from the config) says what building the tower says, for every
    open_clip architecture (built on the meta device: no memory, no weights)."""
    import logging
    logging.getLogger().setLevel(logging.ERROR)
    disagree = []
    for arch in open_clip.list_models():
        cfg = open_clip.get_model_config(arch)
        with torch.device("meta"):
            visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=cfg.get("quick_gelu", False))
        if config_support(arch, cfg) != tower_support(visual):
            disagree.append((arch, config_support(arch, cfg), tower_support(visual)))
    assert not disagree, disagree


FULL = ["ViT-B-16-SigLIP", "ViT-B-32-SigLIP2-256", "PE-Core-T-16-384", "EVA02-B-16", "ViT-L-14-CLIPA",
        "coca_ViT-B-32", "MobileCLIP-B"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", FULL)
@torch.no_grad()
def test_full_size_random_towers_decompose_exactly(arch):
    """The issue's list at full size, random init (image tower only; its output is what
    encode_image(normalize=False) returns), float64 and float32, two images."""
    cfg = open_clip.get_model_config(arch)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        visual = build_visual(cfg, dtype=dtype)
        adapter = tower(visual)
        x = _images(visual, n=2, dtype=dtype)
        dec = Decomposer(visual, [0, adapter.layers - 1], tokens=True).eval()(x)
        ref = torch.nn.functional.normalize(tower_output(visual, x), dim=-1)
        assert (dec.embedding - ref).abs().max() <= tol, (arch, dtype)
        assert (dec.head_cls.sum((1, 2)) + dec.rest - dec.embedding).abs().max() <= tol, (arch, dtype)
        assert (dec.head_tokens.sum(3) - dec.head_cls).abs().max() <= tol, (arch, dtype)
        del visual


# ----------------------------------------------------------------------------- ONNX

@pytest.fixture(scope="module")
def tiny_configs(tmp_path_factory):
    from tests.model_fixtures import register_tiny_configs
    return register_tiny_configs(tmp_path_factory.mktemp("configs"))


@pytest.mark.parametrize("arch", ["atlas-test-map", pytest.param("atlas-test-eva02", marks=pytest.mark.slow),
                                  "atlas-test-attnpool"])
def test_onnx_parity_for_the_new_towers(tiny_configs, tmp_path, arch):
    """The exported graph (per-head and per-token outputs, pool_mlp for MAP) equals torch's
    decomposition within 1e-4, for a dynamic batch."""
    from models import decompose
    from models.onnx import OnnxRunner, export_onnx
    lm = load_model(arch, random_init=True, seed=2)
    perturb(lm.model, 2)
    lm._cache.clear()
    path = export_onnx(lm, tmp_path / "m.onnx", "all", tokens=True)
    runner = OnnxRunner(path, providers=["CPUExecutionProvider"])
    expected = ["embedding", "head_cls", "rest", "head_tokens"] + (["pool_mlp"] if lm.pooling == "map" else [])
    assert runner.outputs == expected
    for batch in (1, 3):
        x = torch.randn(batch, 3, lm.image_size, lm.image_size)
        ref, got = decompose(lm, x, "all", tokens=True), runner(x)
        for name in expected:
            a, b = getattr(ref, name), getattr(got, name)
            assert a.shape == b.shape and (a - b).abs().max() < 1e-4, (arch, name)
