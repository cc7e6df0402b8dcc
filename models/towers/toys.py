"""timm image towers of the toy zoo, registered under their own timm model names.

open_clip's `TimmModel` builds a timm tower from a model *name* only (`timm.create_model(name,
num_classes=..., global_pool=...)`), so a toy whose image tower is a timm `VisionTransformer`
needs that name known to timm before open_clip builds it. `register()` does that, once; the
registry calls it before it reads any config.

The names hold no "siglip": open_clip picks a SigLIP tokenizer (downloaded) for any config whose
name contains it, and the toys keep the zoo's own CLIP tokenizer.
"""
from __future__ import annotations

__all__ = ["TIMM_TOYS", "native_init", "register"]

TIMM_TOYS: dict[str, dict] = {
    # toy-shapes-map: the middle toy's trunk (6 x 128, head dim 32, MLP x2, patch 8 at 64 px) built as
    # timm builds vit_base_patch16_siglip_224: no class token, MAP attention pool (AttentionPoolLatent)
    "vit_atlas_toy_map_p8_64": dict(img_size=64, patch_size=8, embed_dim=128, depth=6, num_heads=4,
                                    mlp_ratio=2.0, class_token=False, global_pool="map"),
}

_done = False


def _default_cfgs() -> dict:
    """timm's pretrained-config entries for the toy names (no weights; silences timm's warning)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from timm.models import generate_default_cfgs
    return generate_default_cfgs({
        name: dict(url="", num_classes=0, input_size=(3, a["img_size"], a["img_size"]), pool_size=None,
                   crop_pct=1.0, interpolation="bicubic", fixed_input_size=True, mean=OPENAI_DATASET_MEAN,
                   std=OPENAI_DATASET_STD, first_conv="patch_embed.proj", classifier="head")
        for name, a in TIMM_TOYS.items()})


def register() -> None:
    """Make every TIMM_TOYS name a timm model (`timm.create_model(name, **overrides)`), once.

    The tower is drawn as open_clip draws its native ViT (`native_init`), not as timm does, so a
    toy and its class-token sibling of the same trunk start alike and the zoo recipe's
    `--pos-init-scale` means the same for both.
    """
    global _done
    if _done:
        return
    import torch
    from timm.models import register_model
    from timm.models.vision_transformer import _create_vision_transformer

    globals()["default_cfgs"] = _default_cfgs()      # read by timm's register_model from this module
    for name, args in TIMM_TOYS.items():
        def build(pretrained: bool = False, _name: str = name, _args: dict = args, **kwargs):
            if pretrained:
                raise ValueError(f"timm model {_name} is a CLIP Atlas toy tower without pretrained weights")
            model = _create_vision_transformer(_name, pretrained=False, **dict(_args, **kwargs))
            native_init(model)
            return model
        build.__name__ = name
        build.__module__ = __name__
        register_model(build)
    _done = True


def native_init(model) -> None:
    """Redraw a timm VisionTransformer's weights as open_clip draws its native ViT's, in place.

    open_clip's native image tower keeps PyTorch's default draws: every nn.Linear uniform with
    std (3 fan_in)**-0.5 (0.05 at width 128), attention input projections xavier-uniform with zero
    bias (nn.MultiheadAttention's in_proj; 0.06), and the position embedding normal with std
    width**-0.5. timm draws every Linear with std 0.02 and zero bias. At std 0.02 the attention
    logits of the toy's trunk and of its MAP pool are ~10x smaller: every attention map is
    uniform, the MAP pool is a plain token mean, and the image embedding of a fresh tower carries
    no position (a ridge probe at chance, against 0.4 for the class-token sibling). Trained by
    the zoo recipe from there, toy-shapes-map learnt colour, size and background but never
    position or shape (zero-shot 0.13 and 0.23; ridge probe 0.28 and 0.24). Here: every Linear
    of the trunk and of the pool gets PyTorch's default draw; qkv (trunk) and q, kv (pool)
    xavier-uniform with zero bias, as nn.MultiheadAttention draws in_proj; the attention output
    projections zero bias, as nn.MultiheadAttention's out_proj; the MAP pool's latent query
    keeps timm's draw (std latent_dim**-0.5), as open_clip's AttentionalPooler draws its query.
    """
    import torch
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            leaf = name.rsplit(".", 1)[-1]
            module.reset_parameters()
            if leaf in ("qkv", "q", "kv"):
                torch.nn.init.xavier_uniform_(module.weight)
            if leaf in ("qkv", "q", "kv", "proj") and module.bias is not None:
                module.bias.zero_()
        model.pos_embed.normal_(0.0, model.embed_dim ** -0.5)
