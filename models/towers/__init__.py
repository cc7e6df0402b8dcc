"""Image towers: what the decomposition and training need to know of a tower, by family."""
from __future__ import annotations

from typing import Optional

import torch


def position_embedding(visual: torch.nn.Module) -> Optional[torch.nn.Parameter]:
    """The image tower's learnt absolute position embedding ([T, W] open_clip native, [1, T, W]
    timm), or None when it has none (e.g. RoPE-only towers)."""
    trunk = getattr(visual, "trunk", None)
    if trunk is not None:
        return getattr(trunk, "pos_embed", None)
    return getattr(visual, "positional_embedding", None)
