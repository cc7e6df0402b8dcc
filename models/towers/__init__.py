"""Image towers seen through one adapter per family (the API: models/towers/base.py).

    tower(visual) -> Tower            the adapter of an image tower (open_clip native or timm)
    position_embedding(visual)        its learnt absolute position embedding, or None
    UnsupportedTower                  raised with the reason a tower cannot be decomposed exactly

Families: `native` (open_clip's VisionTransformer: class token, average, CoCa's attentional
pooler) and `timm` (timm's VisionTransformer and Eva trunks: class token, average, MAP pool).
"""
from __future__ import annotations

from typing import Optional

import torch

from models.towers.base import Block, NormFold, Read, Readout, Tower, UnsupportedTower

__all__ = ["Block", "NormFold", "Read", "Readout", "Tower", "UnsupportedTower", "tower", "tower_support",
           "config_support", "position_embedding"]


# towers with no residual stream of attention heads, by class name: why each is refused
NO_HEADS = {
    "ModifiedResNet": "its image tower is a ResNet: convolutions, no attention heads (its one attention pool "
                      "reads a convolutional feature map)",
    "ConvNeXt": "its image tower is a timm ConvNeXt: convolutions, no attention heads",
    "FastVit": "its image tower is a timm FastViT: convolutions (RepMixer), and its one attention stage is "
               "followed by a nonlinear convolution before the pool, so no head reaches the embedding linearly",
    "SwinTransformer": "its image tower is a timm Swin Transformer: windowed attention in stages joined by patch "
                       "merging, not one residual stream of tokens",
    "VisionTransformerRelPos": "its image tower is a timm VisionTransformerRelPos (relative-position attention "
                               "bias), which no adapter covers yet",
}


def tower(visual: torch.nn.Module) -> Tower:
    """The adapter of an image tower (`model.visual`); UnsupportedTower saying why there is none."""
    inner = getattr(visual, "trunk", visual)
    if type(inner).__name__ in NO_HEADS:
        raise UnsupportedTower(NO_HEADS[type(inner).__name__])
    if hasattr(visual, "trunk"):
        from models.towers.timm import TimmTower
        return TimmTower(visual)
    if hasattr(visual, "transformer") and hasattr(visual.transformer, "resblocks"):
        from models.towers.native import NativeTower
        return NativeTower(visual)
    raise UnsupportedTower(f"its image tower is a {type(visual).__name__}, which no adapter covers")


# the class a timm model name builds, by the timm module that registers it
TIMM_MODULES = {"vision_transformer": "VisionTransformer", "vision_transformer_hybrid": "VisionTransformer",
                "vitamin": "VisionTransformer", "eva": "Eva", "convnext": "ConvNeXt", "fastvit": "FastVit",
                "swin_transformer": "SwinTransformer", "vision_transformer_relpos": "VisionTransformerRelPos",
                "toys": "VisionTransformer"}   # models/towers/toys.py
# open_clip native ViT options that replace torch's MultiheadAttention with open_clip's custom block
_CUSTOM_BLOCK = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc",
                 "block_type")


def config_support(arch: str, cfg: dict) -> Optional[str]:
    """Why the image tower of open_clip config `cfg` (architecture `arch`) cannot be decomposed,
    or None when it can: read from the config (and, for timm towers, the timm module that
    registers the model name), without building anything. `tower` checks the built model again;
    tests/unit/test_towers.py checks that both agree on every open_clip architecture."""
    v = cfg.get("vision_cfg", {})
    name = v.get("timm_model_name")
    if name:
        from timm.models._registry import _model_to_module
        module = _model_to_module.get(name)
        kind = TIMM_MODULES.get(module or "")
        if kind in NO_HEADS:
            return NO_HEADS[kind]
        if kind is None:                    # a timm model of another module: build it and look
            return _built_support(cfg)
        if v.get("timm_pool") in ("abs_attn", "rot_attn"):
            return f"open_clip pools its timm trunk with a '{v['timm_pool']}' attention pool over a feature map"
        if v.get("timm_proj") == "mlp":
            return "its projection head is an MLP, not linear"
        return None
    if isinstance(v.get("layers"), (list, tuple)):
        return NO_HEADS["ModifiedResNet"]
    custom = [k for k in _CUSTOM_BLOCK if v.get(k)]
    if custom:
        return f"its blocks use open_clip's custom attention ({', '.join(custom)}), which no adapter covers"
    if isinstance(v.get("attentional_pool"), str):
        return f"it pools with a second ('{v['attentional_pool']}') attentional pooler"
    if v.get("pool_type", "tok") not in ("tok", "avg"):
        return f"it pools with '{v.get('pool_type')}'"
    return None


def _built_support(cfg: dict) -> Optional[str]:
    """tower_support of the config's image tower built on the meta device (no memory, no weights)."""
    import logging
    from open_clip.model import _build_vision_tower
    log = logging.getLogger()
    level = log.level
    log.setLevel(logging.ERROR)                                      # timm's "no pretrained config" note
    try:
        with torch.device("meta"):
            visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=cfg.get("quick_gelu", False))
    except Exception as exc:                                         # timm cannot build it at all
        return f"its image tower could not be built ({type(exc).__name__}: {exc})"
    finally:
        log.setLevel(level)
    return tower_support(visual)


def tower_support(visual: torch.nn.Module) -> Optional[str]:
    """Why a built image tower cannot be decomposed, or None (the check `tower` makes)."""
    try:
        tower(visual)
    except UnsupportedTower as exc:
        return str(exc)
    return None


def position_embedding(visual: torch.nn.Module) -> Optional[torch.nn.Parameter]:
    """The image tower's learnt absolute position embedding ([T, W] open_clip native, [1, T, W]
    timm), or None when it has none (e.g. RoPE-only towers)."""
    trunk = getattr(visual, "trunk", None)
    if trunk is not None:
        return getattr(trunk, "pos_embed", None)
    return getattr(visual, "positional_embedding", None)
