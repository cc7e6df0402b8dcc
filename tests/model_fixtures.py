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
}


def register_tiny_configs(tmpdir: Path) -> list[str]:
    for name, cfg in TINY_CONFIGS.items():
        (tmpdir / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmpdir)
    return list(TINY_CONFIGS)


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every LayerNorm gain/bias, every bias and every layer-scale gamma random values."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if "ln" in name and leaf == "weight":
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
        elif leaf in ("bias", "in_proj_bias") or leaf == "gamma":
            p.copy_((0.5 if leaf == "gamma" else 0.1) * torch.randn(p.shape, generator=g))
