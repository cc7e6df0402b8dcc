"""The per-patch map of a text over a set of heads (MATH.md §6, analyses 2 and 3), pure torch/numpy.

For a unit text embedding t_hat and heads S, patch i of the map is

    map[i] = sum_{(l,h) in S} c[l,h,i] . t_hat                   # i = 1..N patches

the additive share of cos(image, text) that reaches the embedding from patch i through those
heads (through the class token, or through the pool for towers without one: SigLIP). The prefix
tokens' own terms (the class token and register tokens, i < P = T - gh*gw; none for SigLIP) are
left out of the map, so

    map.sum() + sum_S sum_{i<P} c[l,h,i] . t_hat == sum_S c[l,h] . t_hat   # (tests/test_maps.py)

The map lives on the patch grid [gh, gw] (row-major, the order of the patch tokens);
`upsample` stretches it over the model's input crop (models.images.model_view).

    layer_index(layers, heads)                    # (layer, head) -> (position in layers, head)
    head_map(head_tokens, index, t_hat, grid, prefix=1)     # [L', H, T, d] -> [gh, gw]
    topic_map(dec, heads, t_hat, grid, image=0, prefix=1)   # a Decomposition with head_tokens -> [gh, gw]
    upsample(map, size)                           # [gh, gw] -> [S, S]
    patch_boxes(box, grid)                        # the crop's box in the original image -> [gh, gw, 4]
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

Head = tuple[int, int]


def layer_index(layers: Sequence[int], heads: Sequence[Head]) -> list[Head]:
    """(position in `layers`, head) for each (layer, head); ValueError for a layer not in `layers`.

    layers: the analysed layers of a Decomposition (dec.layers); heads: (layer, head), 0-based.
    """
    pos = {int(l): j for j, l in enumerate(layers)}
    bad = sorted({l for l, _ in heads if l not in pos})
    if bad:
        raise ValueError(f"layers {bad} were not analysed for this model (analysed: {list(layers)})")
    return [(pos[l], h) for l, h in heads]


def head_map(head_tokens: torch.Tensor, index: Sequence[Head], t_hat, grid: tuple[int, int],
             prefix: int = 1) -> np.ndarray:
    """Sum over the heads `index` of c[l,h,i] . t_hat for the patch tokens: float64 [gh, gw].

    head_tokens: c[l,h,i] of one image [L', H, T, d], T = P + gh*gw (the P = `prefix` prefix tokens,
    class and register tokens, come first and are left out: the tower's `prefix`, 1 for a class-token
    ViT, 0 for SigLIP); index: (position in the decomposition's layers, head), see layer_index;
    t_hat: unit text embedding [d] (array-like).
    """
    gh, gw = grid
    if head_tokens.shape[-2] != prefix + gh * gw:
        raise ValueError(f"head_tokens hold {head_tokens.shape[-2]} tokens, not {prefix} + {gh} x {gw} patches")
    t = torch.as_tensor(np.asarray(t_hat, dtype=np.float32).ravel()).to(head_tokens)   # [d]
    idx_l = torch.tensor([j for j, _ in index], dtype=torch.long)
    idx_h = torch.tensor([h for _, h in index], dtype=torch.long)
    per_head = head_tokens[idx_l, idx_h, prefix:] @ t              # [n_heads, gh*gw]
    return per_head.sum(0).reshape(gh, gw).double().cpu().numpy()


def topic_map(dec, heads: Sequence[Head], t_hat, grid: tuple[int, int], image: int = 0,
              prefix: int = 1) -> np.ndarray:
    """The map of text `t_hat` over `heads` ((layer, head), 0-based) for image `image` of a
    Decomposition computed with tokens=True: float64 [gh, gw]. prefix: the tower's prefix tokens
    (`lm.tower.prefix`: 1 for a class-token ViT, 0 for SigLIP)."""
    if dec.head_tokens is None:
        raise ValueError("the map needs per-token contributions: decompose(..., tokens=True)")
    return head_map(dec.head_tokens[image], layer_index(dec.layers, heads), t_hat, grid, prefix)


def upsample(m: np.ndarray, size: Union[int, tuple[int, int]]) -> np.ndarray:
    """[gh, gw] -> [S, S] (or [h, w] for size=(h, w)), bilinear, float64: the patch grid stretched
    over the model's input crop (each patch's value at its centre)."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    t = torch.as_tensor(np.asarray(m), dtype=torch.float32)[None, None]      # [1, 1, gh, gw]
    return F.interpolate(t, size=hw, mode="bilinear", align_corners=False)[0, 0].double().numpy()


def patch_boxes(box: Sequence[float], grid: tuple[int, int]) -> np.ndarray:
    """Where each patch of the grid lies in the original image: float64 [gh, gw, 4] of (x0, y0, x1, y1).

    box: the model's crop in the original image's pixel coordinates (models.images.model_view_box);
    the crop is S x S model pixels cut into gh x gw patches of equal size, row-major like the map."""
    gh, gw = grid
    x0, y0, x1, y1 = (float(v) for v in box)
    xs = x0 + (x1 - x0) * np.arange(gw + 1) / gw                  # [gw + 1] patch edges
    ys = y0 + (y1 - y0) * np.arange(gh + 1) / gh                  # [gh + 1]
    out = np.empty((gh, gw, 4))
    out[..., 0], out[..., 2] = xs[None, :-1], xs[None, 1:]
    out[..., 1], out[..., 3] = ys[:-1, None], ys[1:, None]
    return out
