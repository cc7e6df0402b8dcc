"""The adapter of open_clip's own VisionTransformer (models/towers/base.py says what an adapter gives).

Blocks are open_clip's `ResidualAttentionBlock` (torch's nn.MultiheadAttention, optional layer
scale). Readouts: the class token ('tok': CLIP, OpenCLIP), the mean of the patch tokens ('avg',
before or after `ln_post`: CLIPA), and CoCa's attentional pooler (256 learnt queries over the
`ln_k`-normalised tokens; the embedding is query 0's output after `ln_post`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.towers.base import Block, NormFold, Read, Readout, Tower, UnsupportedTower, split_heads, widest_linear


def _gamma(ls: nn.Module) -> Optional[torch.Tensor]:
    """A LayerScale's gamma [W], or None for nn.Identity."""
    return ls.gamma if hasattr(ls, "gamma") else None


class NativeBlock(Block):
    """open_clip's ResidualAttentionBlock: x + ls_1(attn(ln_1(x))); x + ls_2(mlp(ln_2(x)))."""

    def __init__(self, block: nn.Module):
        super().__init__(block)
        attn = block.attn
        if type(attn) is not nn.MultiheadAttention or not getattr(attn, "_qkv_same_embed_dim", True):
            raise UnsupportedTower(f"its blocks use {type(attn).__name__} attention, not torch's MultiheadAttention")
        self.heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.scale = self.head_dim ** -0.5
        self.width = attn.embed_dim
        self.norm1 = NormFold.of(block.ln_1)

    def qkv(self, x, ctx=None, rows=None):
        blk, W = self.block, self.width
        h = blk.ln_1(x)                                                       # [B, T, W]
        w, b = blk.attn.in_proj_weight, blk.attn.in_proj_bias
        if rows is None:
            q, k, v = F.linear(h, w, b).split(W, dim=-1)                      # 3 x [B, T, W]
        else:                                                                 # the query of `rows` tokens only
            q = F.linear(h[:, :rows], w[:W], b[:W] if b is not None else None)
            k, v = F.linear(h, w[W:], b[W:] if b is not None else None).split(W, dim=-1)
        return split_heads(q, self.heads), split_heads(k, self.heads), split_heads(v, self.heads)

    @property
    def head_out(self):
        attn = self.block.attn
        wo = attn.out_proj.weight.T                                           # [H*dh, W]
        gamma = _gamma(self.block.ls_1)
        if gamma is not None:
            wo = wo * gamma
        return wo.reshape(self.heads, self.head_dim, -1)                      # [H, dh, W]

    def attn_out(self, o):
        B, R = o.shape[:2]
        out = self.block.attn.out_proj
        delta = self.block.ls_1(F.linear(o.reshape(B, R, -1), out.weight, out.bias))   # [B, R, W]
        bias = out.bias if out.bias is not None else torch.zeros(self.width).to(delta)
        gamma = _gamma(self.block.ls_1)
        return delta, None, bias * gamma if gamma is not None else bias

    def mlp_in(self, x):
        return self.block.ln_2(x)

    def mlp(self, x):
        return self.block.ls_2(self.block.mlp(self.block.ln_2(x)))

    @property
    def value_in(self):
        W = self.width
        wv = self.block.attn.in_proj_weight[2 * W:].T                         # [W, H*dh]
        if self.norm1 is not None:
            wv = self.norm1.fold_in(wv)
        return wv.reshape(W, self.heads, self.head_dim).permute(1, 0, 2)      # [H, W, dh]

    def _mlp(self) -> nn.Module:
        mlp = self.block.mlp
        names = [n for n, _ in mlp.named_children()]
        if names != ["c_fc", "gelu", "c_proj"]:
            raise UnsupportedTower(f"its MLP is ({', '.join(names)}), not (c_fc, gelu, c_proj): no adapter reads "
                                   "its neurons")
        return mlp

    def mlp_neurons(self, x):
        mlp = self._mlp()
        p = mlp.gelu(mlp.c_fc(self.block.ln_2(x)))                            # [B, R, N]
        delta = self.block.ls_2(mlp.c_proj(p))                                # [B, R, W]
        bias = mlp.c_proj.bias if mlp.c_proj.bias is not None else torch.zeros(self.width).to(delta)
        gamma = _gamma(self.block.ls_2)
        return p, delta, bias * gamma if gamma is not None else bias

    @property
    def mlp_rows(self):
        rows = self._mlp().c_proj.weight.T                                    # [N, W]
        gamma = _gamma(self.block.ls_2)
        return rows * gamma if gamma is not None else rows

    def forward(self, x, ctx=None):
        return self.block(x)


class TokReadout(Readout):
    """ln_post at the class token, then proj: z = ln_post(x_L[0]) @ P."""
    rows = 1

    def __init__(self, visual: nn.Module):
        self.visual = visual
        self.norm = NormFold.of(visual.ln_post)

    def mid(self):
        P = self.visual.proj
        return self.norm.fold_in(torch.eye(P.shape[0]).to(P)) @ P             # [W, d] = Pi G P

    def out(self):
        return None

    def read(self, x):
        cls = x[:, 0]                                                         # [B, W]
        s = self.norm.scale(cls)                                              # [B, 1]
        z = self.visual.ln_post(cls) @ self.visual.proj                       # [B, d]
        const = (self.norm.beta(cls) @ self.visual.proj).expand_as(z)
        return Read(weights=(1 / s)[:, :, None], z=z, const=const, pool_mlp=None)


class AvgReadout(Readout):
    """The mean of the patch tokens (the class token left out), with ln_post on each token
    before it or on the mean after it (`final_ln_after_pool`, CLIPA), then proj."""
    rows = None

    def __init__(self, visual: nn.Module):
        self.visual = visual
        self.norm = NormFold.of(visual.ln_post)
        self.after = bool(visual.final_ln_after_pool)

    def mid(self):
        P = self.visual.proj
        return self.norm.fold_in(torch.eye(P.shape[0]).to(P)) @ P

    def out(self):
        return None

    def read(self, x):
        B, T, _ = x.shape
        vis = self.visual
        K = torch.zeros(B, 1, T).to(x)
        if self.after:
            pooled = x[:, 1:].mean(dim=1)                                     # [B, W]
            K[:, 0, 1:] = 1 / ((T - 1) * self.norm.scale(pooled))             # one scale per image
            z = vis.ln_post(pooled) @ vis.proj
        else:
            K[:, 0, 1:] = 1 / ((T - 1) * self.norm.scale(x[:, 1:])[..., 0])   # one scale per token
            z = vis.ln_post(x)[:, 1:].mean(dim=1) @ vis.proj
        const = (self.norm.beta(x) @ vis.proj).expand_as(z)
        return Read(weights=K, z=z, const=const, pool_mlp=None)


class AttnPoolReadout(Readout):
    """CoCa's attentional pooler (open_clip's original setup): n learnt queries attend over the
    tokens normalised by `ln_k`; the embedding is query 0's output after `ln_post`, then proj.

        u = W_O concat_m sum_i a[m, i] (W_V^m ln_k(x_i) + b_V^m) + b_O;   z = ln_post(u) @ P
    """
    rows = None

    def __init__(self, visual: nn.Module):
        self.visual = visual
        pool = visual.attn_pool
        if getattr(visual, "attn_pool_contrastive", None) is not None:
            raise UnsupportedTower("it pools with a second ('parallel'/'cascade') attentional pooler")
        if visual.pool_type != "tok":
            raise UnsupportedTower(f"its attentional pooler is read with pool_type '{visual.pool_type}'")
        self.pool = pool
        self.attn = pool.attn
        self.groups = self.attn.num_heads
        self.norm_k = NormFold.of(pool.ln_k)
        self.norm_post = NormFold.of(visual.ln_post)

    def _wv(self):
        a = self.attn
        E = a.embed_dim
        if a._qkv_same_embed_dim:
            return a.in_proj_weight[2 * E:], a.in_proj_weight[E:2 * E], a.in_proj_weight[:E]
        return a.v_proj_weight, a.k_proj_weight, a.q_proj_weight                # [E, W] each (q: [E, E])

    def _bias(self, i: int, like):
        b = self.attn.in_proj_bias
        E = self.attn.embed_dim
        return b[i * E:(i + 1) * E] if b is not None else torch.zeros(E).to(like)

    def mid(self):
        wv, _, _ = self._wv()
        return self.norm_k.fold_in(wv.T)                                      # [W, E]

    def out(self):
        wo = self.attn.out_proj.weight.T                                      # [E, E]
        P = self.visual.proj
        return wo @ self.norm_post.fold_in(torch.eye(P.shape[0]).to(P)) @ P    # [E, d]

    def read(self, x):
        B, T, _ = x.shape
        a, M = self.attn, self.groups
        wv, wk, wq = self._wv()
        xk = self.pool.ln_k(x)                                                # [B, T, W]
        s_k = self.norm_k.scale(x)[..., 0]                                    # [B, T]
        q = F.linear(self.pool.ln_q(self.pool.query[:1]), wq, self._bias(0, x))   # [1, E], query 0
        k = F.linear(xk, wk, self._bias(1, x))                                # [B, T, E]
        v = F.linear(xk, wv, self._bias(2, x))                                # [B, T, E]
        dq = q.shape[-1] // M
        scores = torch.einsum("md,btmd->bmt", q.view(M, dq), k.view(B, T, M, dq)) * dq ** -0.5
        attn = scores.softmax(dim=-1)                                         # [B, M, T]
        o = torch.einsum("bmt,btmd->bmd", attn, v.view(B, T, M, dq)).reshape(B, -1)   # [B, E]
        u = a.out_proj(o)                                                     # [B, E]
        z = self.visual.ln_post(u) @ self.visual.proj                         # [B, d]
        s_post = self.norm_post.scale(u)                                      # [B, 1]
        u_const = a.out_proj(self.norm_k.beta(x) @ wv.T + self._bias(2, x))   # [E]
        const = (self.norm_post.fold_out(u_const) / s_post + self.norm_post.beta(u)) @ self.visual.proj
        K = attn / s_k[:, None, :] / s_post[:, :, None]                       # [B, M, T]
        return Read(weights=K, z=z, const=const, pool_mlp=None)


class NativeTower(Tower):
    """open_clip's VisionTransformer (CLIP, OpenCLIP, CLIPA, CoCa's image tower)."""
    family = "open_clip"

    def __init__(self, visual: nn.Module):
        super().__init__(visual)
        if getattr(visual, "attn_pool", None) is not None:
            self.readout, self.pooling = AttnPoolReadout(visual), "attn"
        elif visual.pool_type == "tok":
            self.readout, self.pooling = TokReadout(visual), "tok"
        elif visual.pool_type == "avg":
            self.readout, self.pooling = AvgReadout(visual), "avg"
        else:
            raise UnsupportedTower(f"it pools with '{visual.pool_type}'")
        self.blocks = [NativeBlock(b) for b in visual.transformer.resblocks]
        self.prefix = 1
        self.width = visual.transformer.width
        self.embed_dim = int(visual.proj.shape[1])
        self.image_size = int(visual.image_size[0])
        self.patch_size = int(visual.patch_size[0])
        self.grid = tuple(int(g) for g in visual.grid_size)
        self.mlp_width = widest_linear(visual.transformer.resblocks[0].mlp)

    def embed(self, images):
        return self.visual._embeds(images), None                             # [B, 1 + N, W]

    def position_embedding(self):
        return self.visual.positional_embedding
