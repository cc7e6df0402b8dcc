"""Tiny open_clip configs made by the tests, and weight perturbation.

Random init leaves LayerNorm gains at 1 and biases at 0, which would hide bugs in the LN and
bias terms of the decomposition: `perturb` randomises them (and layer-scale gammas).
"""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch

_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
TINY_NATIVE_VISION = {
    # CLIPA: the mean of the patch tokens, ln_post after the mean, no ln_pre
    "avg-after": {"image_size": 32, "layers": 3, "width": 48, "head_width": 12, "patch_size": 8,
                  "no_ln_pre": True, "pool_type": "avg", "final_ln_after_pool": True},
    # the mean of ln_post of each patch token
    "avg-before": {"image_size": 32, "layers": 2, "width": 48, "head_width": 12, "patch_size": 8, "pool_type": "avg",
                   "ls_init_value": 0.5},
    # CoCa: attentional pooler (8 learnt queries, 4 heads), query 0 is the embedding
    "coca": {"image_size": 32, "layers": 3, "width": 48, "head_width": 12, "patch_size": 8,
             "attentional_pool": True, "attn_pooler_heads": 4, "attn_pooler_queries": 8, "output_tokens": True},
}
TINY_CONFIGS = {
    # plain class-token ViT
    "atlas-test-tiny": {"embed_dim": 24, "vision_cfg": {"image_size": 32, "layers": 3, "width": 64,
                                                         "head_width": 16, "patch_size": 8}, "text_cfg": _TEXT},
    # layer scale + quick-gelu
    "atlas-test-ls": {"embed_dim": 24, "quick_gelu": True,
                      "vision_cfg": {"image_size": 32, "layers": 3, "width": 48, "head_width": 12,
                                     "patch_size": 8, "ls_init_value": 0.5}, "text_cfg": _TEXT},
    # no ln_pre, non-square-friendly grid, 6 heads
    "atlas-test-noln": {"embed_dim": 16, "vision_cfg": {"image_size": 40, "layers": 2, "width": 48,
                                                         "head_width": 8, "patch_size": 10, "no_ln_pre": True},
                        "text_cfg": _TEXT},
    # SigLIP's class (timm VisionTransformer, MAP pool) with the CLIP text tower and tokenizer
    "atlas-test-map": {"embed_dim": 64, "init_logit_bias": -10, "text_cfg": _TEXT,
                       "vision_cfg": {"image_size": 32, "timm_model_name": "atlas_test_vit_map", "timm_pool": "map",
                                      "timm_proj": "none"}},
    # EVA02's class (timm Eva: RoPE, SwiGLU, sub-LN), timm's head as the projection
    "atlas-test-eva02": {"embed_dim": 24, "text_cfg": _TEXT,
                         "vision_cfg": {"image_size": 32, "timm_model_name": "atlas_test_eva02", "timm_pool": "token",
                                        "timm_proj": None}},
    # open_clip's attentional pooler (CoCa's image tower) in a plain CLIP
    "atlas-test-attnpool": {"embed_dim": 24, "text_cfg": _TEXT,
                            "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "head_width": 12, "patch_size": 8,
                                           "attentional_pool": True, "attn_pooler_heads": 4,
                                           "attn_pooler_queries": 4}},
}


def register_tiny_configs(tmpdir: Path) -> list[str]:
    register_tiny_timm()
    for name, cfg in TINY_CONFIGS.items():
        (tmpdir / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmpdir)
    return list(TINY_CONFIGS)


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every LayerNorm gain/bias, every bias and every layer-scale gamma random values."""
    g = torch.Generator().manual_seed(seed)
    norms = {n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    for name, p in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if owner in norms and leaf == "weight":
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
        elif leaf in ("bias", "in_proj_bias", "q_bias", "v_bias") or leaf in ("gamma", "gamma_1", "gamma_2"):
            p.copy_((0.5 if leaf.startswith("gamma") else 0.1) * torch.randn(p.shape, generator=g))


# Tiny timm towers of every class and option the timm adapter covers, registered under test names
# (open_clip builds a timm tower from a name only). `tiny_timm_config(name)` is an open_clip config.
TIMM_TINY = {
    # SigLIP's class: VisionTransformer, no class token, MAP pool
    "atlas_test_vit_map": ("vit", dict(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4,
                                       mlp_ratio=2.0, class_token=False, global_pool="map")),
    # class token, 2 register tokens, layer scale, q/k-norm, a norm inside attention, token pool
    "atlas_test_vit_cls": ("vit", dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4,
                                       mlp_ratio=2.0, reg_tokens=2, init_values=0.5, qk_norm=True,
                                       scale_attn_norm=True, global_pool="token", pre_norm=True)),
    # average pool with fc_norm after it (ViTamin's head), no class token
    "atlas_test_vit_avg": ("vit", dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                                       class_token=False, global_pool="avg")),
    # EVA02: RoPE, SwiGLU with its norm, separate q/k/v with q and v biases, sub-LN before out-proj
    "atlas_test_eva02": ("eva", dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4, qkv_fused=False,
                                     mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True,
                                     use_rot_pos_emb=True, ref_feat_shape=(4, 4), global_pool="token",
                                     init_values=0.3)),
    # EVA02-E: post-norm blocks (the norm after attention and after the MLP), fused qkv
    "atlas_test_eva_post": ("eva", dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4,
                                        use_post_norm=True, global_pool="token")),
    # PE-Core: AttentionRope, pre-transformer norm, class token read by a MAP pool of its own head count
    "atlas_test_pe": ("eva", dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4, mlp_ratio=4.0,
                                  global_pool="map", attn_type="rope", use_pre_transformer_norm=True,
                                  use_rot_pos_emb=True, ref_feat_shape=(4, 4), rope_grid_offset=1.,
                                  rope_grid_indexing="xy", attn_pool_num_heads=3, attn_pool_mlp_ratio=2.)),
    # grouped k/v heads (AttentionRope, separate projections)
    "atlas_test_gqa": ("eva", dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, num_kv_heads=2,
                                   qkv_fused=False, attn_type="rope", use_rot_pos_emb=True, ref_feat_shape=(4, 4),
                                   global_pool="avg")),
}
_timm_done = False


def register_tiny_timm() -> list[str]:
    """Make every TIMM_TINY name a timm model, once; returns the names."""
    global _timm_done
    if not _timm_done:
        import sys
        from timm.models import register_model
        from timm.models.eva import _create_eva
        from timm.models.vision_transformer import _create_vision_transformer
        for name, (kind, args) in TIMM_TINY.items():
            create = _create_eva if kind == "eva" else _create_vision_transformer

            def build(pretrained=False, _n=name, _a=args, _c=create, **kw):
                return _c(_n, pretrained=False, **dict(_a, **kw))
            build.__name__, build.__module__ = name, __name__
            register_model(build)
        _timm_done = True
    return list(TIMM_TINY)


def tiny_timm_config(name: str, pool: str | None = None, proj: str | None = "none", embed_dim: int = 40) -> dict:
    """An open_clip config (vision_cfg, embed_dim) of tiny timm tower `name`: proj 'none' reads the
    pooled width; 'linear' adds open_clip's projection to embed_dim."""
    kind, args = TIMM_TINY[name]
    pool = pool if pool is not None else {"token": "token", "avg": "avg", "map": "map"}[args["global_pool"]]
    return {"embed_dim": embed_dim if proj == "linear" else args["embed_dim"],
            "vision_cfg": {"image_size": args["img_size"], "timm_model_name": name, "timm_pool": pool,
                           "timm_proj": proj, "timm_proj_bias": proj == "linear"}}
