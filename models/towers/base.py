"""The tower adapter API: what the exact decomposition (MATH.md §1, §9) needs of an image tower.

An image tower is an embedding, a stack of attention blocks and a readout. With every
LayerNorm's per-token scale and every attention weight fixed by the forward pass, everything
after them is linear in the residual summands, so one decomposition (models/decompose.py) serves
every tower that can say, per block and for its readout, the few things below. One adapter per
tower family says them (models/towers/native.py: open_clip's VisionTransformer; timm.py: timm's
VisionTransformer and Eva); nothing outside models/ learns a tower's class.

    Tower                                 one image tower, built once per model (`towers.tower(visual)`)
      .embed(images)  -> x0 [B, T, W], ctx    the residual stream's first summand (patches, class and
                                              register tokens, positions, pre-norm); ctx: per-batch extras
                                              (the RoPE table) that blocks take back
      .blocks[l]      -> Block                one per transformer block, in order
      .readout        -> Readout              final norm, pooling, projection
      .layers .heads .head_dim .width .embed_dim .image_size .patch_size .grid .prefix .pooling

    Block (pre-norm `x + A(n1(x)); x + M(n2(x))`, or post-norm `x + n1(A(x)); x + n2(M(x))`)
      .norm1                                  NormFold of the norm before attention (None: post-norm)
      .qkv(x, ctx, rows) -> q [B,R,H,dh], k, v [B,T,H,dh]   from the residual x [B, T, W]: after the
                                              input norm, q/k-norm and RoPE, ready for softmax(q k^T * scale)
      .scale                                  the softmax scale (head_dim ** -0.5 in every tower here)
      .head_out   [H, dh, W]                  head h's summand at token i is (o_h[i] / r[i]) @ head_out[h]
                                              (out-projection with layer scale and the gain and centring
                                              of any norm between attention and residual folded in)
      .attn_out(o) -> delta, r, bias          o [B, R, H, dh] (per-head attention outputs) -> the
                                              attention's summand delta [B, R, W] (what the block adds),
                                              the per-token scale r [B, R, 1] (or None: 1) of the norms
                                              after attention, and the bias summand ([W] or [B, R, W]):
                                              delta == sum_h (o_h / r) @ head_out[h] + bias
      .mlp_in(x) -> [B, R, hidden_in]         the MLP's input (the normalised residual; post-norm: x)
      .mlp(x)    -> [B, R, W]                 the MLP's summand (layer scale and post-norm included)
      .value_in   [H, W, dh]                  head h's value projection read from the residual: a summand
                                              u of x reaches head h's values as (u[j] @ value_in[h]) / s1[j]
                                              (s1: norm1's per-token scale, 1 for post-norm), the input norm's
                                              gain and centring folded in (grouped k/v heads: repeated)
      .mlp_neurons(x) -> p, delta, bias       the MLP's neurons (its hidden units, what enters the output
                                              projection) from the residual x [B, R, W]: p [B, R, N] divided by
                                              the frozen scale of any norm between them and the residual (an
                                              inner MLP norm, a post-norm); the MLP's summand delta [B, R, W]
                                              (== mlp(x)) and its bias summand ([W] or [B, R, W]):
                                              delta == p @ mlp_rows + bias
      .mlp_rows   [N, W]                      neuron n's output row: the output projection with any norm's
                                              gain and centring and the layer scale folded in
      (value_in, mlp_neurons and mlp_rows are what the second-order lens of models/neurons.py reads)
      .forward(x, ctx) -> x                   the block's own forward (the fast path for blocks no
                                              analysis reads)

    Readout: pooled = sum_m (K[m] @ x_L) @ mid[:, group m] @ out  + const  (+ pool_mlp)
      .rows                                   1: reads token 0 only (class-token pooling; the last block
                                              then computes that row only); None: every token
      .groups M, .mid [W, D], .out [D, d] | None   the read matrices; D splits into M equal groups
                                              (one per pool head for attention pools; M = 1 otherwise)
      .read(x_L) -> Read(weights K [B, M, R], z [B, d], const [B, d], pool_mlp [B, d] | None)
                                              K: per-image read weights of each token (attention-pool
                                              weights, 1/N for averages) divided by the frozen norm
                                              scales; z: the tower's own output (what encode_image
                                              returns, unnormalised); const: the biases' share of z;
                                              pool_mlp: the attention pool's MLP term (not linear: a
                                              named remainder), so that lin(x_L) + const + pool_mlp == z

What a head is for a MAP-pooled tower (SigLIP, SigLIP 2, PE-Core; MATH.md §9).
A class-token ViT reads its embedding at one token, so head (l, h)'s share is what it writes into
that token's residual. A MAP-pooled tower has no such token. After the last block the final
LayerNorm normalises every token (scale sigma_i at token i), and an attention pool with a learnt
latent query and M heads of its own reads all of them: pool head m weighs token i by a[m, i] and
outputs sum_i a[m, i] (W_V^m LN(x_i) + b_V^m); W_P projects the M outputs to u, and the pool adds
its MLP: out = u + W2 GELU(W1 LN(u) + b1) + b2. So a trunk head reaches the embedding through
everything it writes, at every token, weighted by how much the pool reads that token. With
rho[m, i] = a[m, i] / sigma_i and o^{lh}_i the head's attention output at token i,

    c[l,h] = sum_m W_P^m W_V^m G Pi sum_i rho[m, i] (o^{lh}_i W_O^h)        (then the projection, / ||z||)

(G = diag of the final LayerNorm's gain, Pi = centring). Per source patch j, o^{lh}_i =
sum_j A^{lh}[i, j] v_j gives the weight w[m, j] = sum_i rho[m, i] A^{lh}[i, j]: the pool's read
weights pulled back through the head's own attention. A "head" is the trunk's head, not the
pool's: the pool's M heads are readers whose weights are held at their forward values, as every
attention weight is, and their mixing is folded into each trunk head's share. Two parts belong to
no trunk head: the pool's constants (sum_m W_P^m (W_V^m beta + b_V^m) + b_P, in the embedding term)
and the pool's MLP, which is not linear in the summands of u and is reported whole as the named
remainder `pool_mlp` (inside `rest`), so heads + rest == embedding exactly. A head's share is thus
its direct path through the pool's attention; what the pool MLP makes of it is not split (on
random weights the MLP term is most of the output's norm; on a trained SigLIP, measure it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn


class UnsupportedTower(ValueError):
    """A tower the decomposition cannot cover exactly; the message says why."""


@dataclass
class NormFold:
    """A LayerNorm (centred) or RMSNorm (not centred) with its per-token scale frozen:

        n(x) = g * centre(x) / s(x) + beta,   s(x) = sqrt(var_c(x) + eps)   (RMS: mean_c(x^2))

    so that n is linear in x given s: n(sum_k u_k) = sum_k g * centre(u_k) / s + beta.
    """
    weight: Optional[torch.Tensor]      # g [W] (None: 1)
    bias: Optional[torch.Tensor]        # beta [W] (None: 0)
    eps: float
    centred: bool = True

    @classmethod
    def of(cls, module: nn.Module) -> Optional["NormFold"]:
        """The NormFold of a norm module; None for nn.Identity; UnsupportedTower otherwise."""
        if isinstance(module, nn.Identity):
            return None
        if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
            return cls(module.weight, module.bias, float(module.eps), True)
        name = type(module).__name__
        if name in ("RmsNorm", "RMSNorm") and hasattr(module, "eps"):
            return cls(getattr(module, "weight", None), None, float(module.eps), False)
        raise UnsupportedTower(f"its norm layer {name} is neither a LayerNorm nor an RMSNorm")

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen per-token scale s(x): x [..., W] -> [..., 1]."""
        if self.centred:
            return torch.sqrt(x.var(dim=-1, unbiased=False, keepdim=True) + self.eps)
        return torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)

    def fold_out(self, m: torch.Tensor) -> torch.Tensor:
        """m @ (Pi diag(g)) for m [..., W] whose rows are summands the norm then normalises:
        centre each row (LayerNorm) and multiply it by the gain."""
        if self.centred:
            m = m - m.mean(dim=-1, keepdim=True)
        return m * self.weight.to(m) if self.weight is not None else m

    def fold_in(self, m: torch.Tensor) -> torch.Tensor:
        """(Pi diag(g)) @ m for m [W, k] read after the norm: the norm's linear part, then m."""
        if self.weight is not None:
            m = self.weight.to(m)[:, None] * m
        return m - m.mean(dim=0, keepdim=True) if self.centred else m

    def beta(self, like: torch.Tensor) -> torch.Tensor:
        """beta as a [W] tensor like `like` (zeros when the norm has no bias)."""
        return self.bias.to(like) if self.bias is not None else torch.zeros(like.shape[-1]).to(like)


@dataclass
class Read:
    """What a readout gives for one batch (see the module docstring)."""
    weights: torch.Tensor               # K [B, M, R]
    z: torch.Tensor                     # [B, d] the tower's output, unnormalised
    const: torch.Tensor                 # [B, d] the biases' share of z
    pool_mlp: Optional[torch.Tensor]    # [B, d] the attention pool's MLP term, or None


class Readout:
    """Final norm + pooling + projection of a tower (see the module docstring). `mid()` and `out()`
    are computed from the tower's current parameters (the Decomposer folds them once)."""
    rows: Optional[int] = None
    groups: int = 1
    pool_mlp: bool = False              # whether read() gives a pool_mlp term

    def mid(self) -> torch.Tensor:
        """[W, D]."""
        raise NotImplementedError

    def out(self) -> Optional[torch.Tensor]:
        """[D, d], or None when mid already ends in the output space (D = d)."""
        raise NotImplementedError

    def read(self, x: torch.Tensor) -> Read:
        raise NotImplementedError


class Block:
    """One transformer block of a tower (see the module docstring). Not an nn.Module: it reads the
    wrapped block's own parameters, so it follows the model across devices and dtypes."""
    heads: int
    head_dim: int
    scale: float
    norm1: Optional[NormFold]

    def __init__(self, block: nn.Module):
        self.block = block

    def qkv(self, x: torch.Tensor, ctx: Any, rows: Optional[int] = None):
        raise NotImplementedError

    @property
    def head_out(self) -> torch.Tensor:
        raise NotImplementedError

    def attn_out(self, o: torch.Tensor):
        raise NotImplementedError

    def mlp_in(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def value_in(self) -> torch.Tensor:
        raise NotImplementedError

    def mlp_neurons(self, x: torch.Tensor):
        raise NotImplementedError

    @property
    def mlp_rows(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, ctx: Any) -> torch.Tensor:
        raise NotImplementedError


class Tower:
    """An image tower seen through its adapter (see the module docstring)."""
    family: str
    pooling: str                        # 'tok' | 'avg' | 'map' | 'attn' (the warehouse's `pooling`)
    blocks: list
    readout: Readout
    prefix: int                         # tokens before the patches (class, register tokens)
    width: int                          # W, the residual width
    embed_dim: int                      # d, the embedding's size
    image_size: int
    patch_size: int                     # image_size // grid (a conv stem's total stride)
    grid: tuple                         # (gh, gw) patch grid; T = prefix + gh * gw
    mlp_width: int                      # the widest MLP activation per token (micro-batch sizing)

    def __init__(self, visual: nn.Module):
        self.visual = visual

    @property
    def layers(self) -> int:
        return len(self.blocks)

    @property
    def heads(self) -> int:
        return self.blocks[0].heads

    @property
    def head_dim(self) -> int:
        return self.blocks[0].head_dim

    def embed(self, images: torch.Tensor):
        raise NotImplementedError

    def position_embedding(self) -> Optional[nn.Parameter]:
        raise NotImplementedError


def widest_linear(module: nn.Module) -> int:
    """The largest out_features of the nn.Linear layers inside `module` (an MLP's hidden width)."""
    return max((m.out_features for m in module.modules() if isinstance(m, nn.Linear)), default=0)


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, H*dh] -> [B, T, H, dh] (a view)."""
    B, T, _ = t.shape
    return t.view(B, T, heads, -1)
