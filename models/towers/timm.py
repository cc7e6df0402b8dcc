"""The adapter of timm's VisionTransformer family inside open_clip's TimmModel (models/towers/base.py
says what an adapter gives).

Trunks: timm `VisionTransformer` (SigLIP, SigLIP 2, MobileCLIP-B, ViTamin, the zoo's MAP toy) and
`Eva` (EVA-CLIP, PE-Core). Blocks: `Block`, `EvaBlock` (pre-norm, layer scale as `ls1`/`gamma_1`) and
`EvaBlockPostNorm` (EVA02-E: the norm after attention and after the MLP). Attention: `Attention`,
`AttentionRope` and `EvaAttention`: fused or separate q/k/v, q/k-norm, RoPE (applied to q and k
after the prefix tokens), grouped k/v heads, and a norm inside the attention before its
out-projection (`scale_norm`, EVA02's sub-LN). None of these changes the decomposition: q/k-norm
and RoPE change only the attention weights, and every norm is linear once its per-token scale is
fixed. Readouts: the class token ('tok'), the mean of the tokens ('avg', with `fc_norm` after it),
and the MAP attention pool (`AttentionPoolLatent`: latent queries over the normed tokens, then the
pool's own MLP, kept as the named remainder `pool_mlp`); then timm's head and open_clip's
projection, both linear. A gated attention output (a sigmoid gate per channel and token) would
mix a source token's weight with its channels, so it is refused.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.towers.base import Block, NormFold, Read, Readout, Tower, UnsupportedTower, split_heads, widest_linear

VIT_BLOCKS = ("Block", "EvaBlock", "EvaBlockPostNorm")
ATTENTIONS = ("Attention", "AttentionRope", "EvaAttention")
TRUNKS = ("VisionTransformer", "Eva")


def _identity_or(module: Optional[nn.Module]) -> Optional[nn.Module]:
    return None if module is None or isinstance(module, nn.Identity) else module


class TimmBlock(Block):
    """A timm ViT/Eva block; `index` picks its RoPE table when the trunk has one per depth."""

    def __init__(self, block: nn.Module, index: int, mixed_rope: bool):
        super().__init__(block)
        kind = type(block).__name__
        attn = block.attn
        if kind not in VIT_BLOCKS:
            raise UnsupportedTower(f"its blocks are timm {kind}, not Block/EvaBlock")
        if type(attn).__name__ not in ATTENTIONS:
            raise UnsupportedTower(f"its attention is timm {type(attn).__name__}")
        if getattr(attn, "gate", None) is not None:
            raise UnsupportedTower("its attention output is gated per channel and token")
        self.index, self.mixed_rope = index, mixed_rope
        self.post = kind == "EvaBlockPostNorm"
        self.heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.kv_groups = getattr(attn, "num_kv_groups", 1)
        self.scale = float(attn.scale)
        self.inner = NormFold.of(attn.norm)                                   # norm before the out-projection
        self.norm1 = None if self.post else NormFold.of(block.norm1)
        self.norm_post = NormFold.of(block.norm1) if self.post else None     # norm after the attention

    @property
    def _gamma(self) -> Optional[torch.Tensor]:
        blk = self.block
        if hasattr(blk, "ls1"):
            return getattr(blk.ls1, "gamma", None)
        return getattr(blk, "gamma_1", None)

    def _proj_qkv(self, h, rows):
        """q [B, R, H*dh], k, v [B, T, Hkv*dh] from the normed input h [B, T, W]."""
        a = self.block.attn
        E = self.heads * self.head_dim
        if getattr(a, "qkv", None) is not None:
            w = a.qkv.weight
            b = a.qkv.bias
            if b is None and getattr(a, "q_bias", None) is not None:        # EvaAttention: q and v biases
                b = torch.cat((a.q_bias, a.k_bias, a.v_bias))
            if rows is None:
                return F.linear(h, w, b).split(E, dim=-1)
            q = F.linear(h[:, :rows], w[:E], b[:E] if b is not None else None)
            k, v = F.linear(h, w[E:], b[E:] if b is not None else None).split(E, dim=-1)
            return q, k, v
        hq = h if rows is None else h[:, :rows]
        return a.q_proj(hq), a.k_proj(h), a.v_proj(h)

    def qkv(self, x, ctx=None, rows=None):
        a = self.block.attn
        h = x if self.post else self.block.norm1(x)                           # [B, T, W]
        q, k, v = self._proj_qkv(h, rows)
        q, k, v = (split_heads(t, t.shape[-1] // self.head_dim) for t in (q, k, v))   # [B, *, H, dh]
        q, k = a.q_norm(q), a.k_norm(k)                                       # per head, over dh
        rope = ctx[self.index] if (ctx is not None and self.mixed_rope) else ctx
        if rope is not None:
            q, k = self._rope(q, rope), self._rope(k, rope)
        if self.kv_groups > 1:                                                # grouped k/v heads
            k = k.repeat_interleave(self.kv_groups, dim=2)
            v = v.repeat_interleave(self.kv_groups, dim=2)
        return q, k, v

    def _rope(self, t, rope):
        """RoPE on the tokens after the prefix, as timm applies it; t [B, n, H, dh] with n the
        number of tokens held (the query may hold only the first rows)."""
        from timm.layers import apply_rot_embed_cat
        a = self.block.attn
        npt = a.num_prefix_tokens
        n = t.shape[1] - npt
        if n <= 0:
            return t
        emb = rope if rope.shape[-2] == n else rope[..., :n, :]              # [N, 2 dh] or [.., H, N, 2 dh]
        body = t[:, npt:].transpose(1, 2)                                     # [B, H, n, dh]
        body = apply_rot_embed_cat(body, emb, half=getattr(a, "rotate_half", False)).type_as(t)
        return torch.cat([t[:, :npt], body.transpose(1, 2)], dim=1)

    @property
    def head_out(self):
        a = self.block.attn
        wo = a.proj.weight.T                                                  # [H*dh, W]
        if self.inner is not None:
            wo = self.inner.fold_in(wo)
        if self.norm_post is not None:
            wo = self.norm_post.fold_out(wo)
        gamma = self._gamma
        if gamma is not None:
            wo = wo * gamma
        return wo.reshape(self.heads, self.head_dim, -1)                      # [H, dh, W]

    def attn_out(self, o):
        B, R = o.shape[:2]
        a = self.block.attn
        y = o.reshape(B, R, -1)                                               # [B, R, H*dh]
        r = None
        if self.inner is not None:
            r = self.inner.scale(y)                                           # [B, R, 1]
        y = a.proj(a.norm(y))                                                 # [B, R, W]
        b = a.proj.bias if a.proj.bias is not None else torch.zeros(y.shape[-1]).to(y)
        if self.inner is not None:
            b = self.inner.beta(o) @ a.proj.weight.T + b                      # [W]
        if self.norm_post is not None:
            s = self.norm_post.scale(y)                                       # [B, R, 1]
            y = self.block.norm1(y)
            r = s if r is None else r * s
            b = self.norm_post.fold_out(b) / s + self.norm_post.beta(y)       # [B, R, W]
        gamma = self._gamma
        if gamma is not None:
            y, b = y * gamma, b * gamma
        return y, r, b

    def mlp_in(self, x):
        return x if self.post else self.block.norm2(x)

    def mlp(self, x):
        blk = self.block
        if self.post:
            return blk.norm2(blk.mlp(x))
        m = blk.mlp(blk.norm2(x))
        if hasattr(blk, "ls2"):
            return blk.ls2(m)
        return m * blk.gamma_2 if getattr(blk, "gamma_2", None) is not None else m

    @property
    def value_in(self):
        a = self.block.attn
        E = self.heads * self.head_dim
        wv = a.qkv.weight[2 * E:] if getattr(a, "qkv", None) is not None else a.v_proj.weight   # [Hkv*dh, W]
        wv = wv.T                                                             # [W, Hkv*dh]
        if self.norm1 is not None:
            wv = self.norm1.fold_in(wv)
        wv = wv.reshape(wv.shape[0], -1, self.head_dim).repeat_interleave(self.kv_groups, dim=1)   # [W, H, dh]
        return wv.permute(1, 0, 2)                                            # [H, W, dh]

    @property
    def _gamma2(self) -> Optional[torch.Tensor]:
        blk = self.block
        if hasattr(blk, "ls2"):
            return getattr(blk.ls2, "gamma", None)
        return getattr(blk, "gamma_2", None)

    def _neuron_mlp(self) -> nn.Module:
        """The block's MLP, when it is a class whose hidden units `_hidden` reads."""
        mlp = self.block.mlp
        if type(mlp).__name__ not in ("Mlp", "SwiGLU", "GluMlp"):
            raise UnsupportedTower(f"its MLP is timm {type(mlp).__name__}, not Mlp/GluMlp/SwiGLU: no adapter reads "
                                   "its neurons")
        return mlp

    def _hidden(self, h):
        """The MLP's hidden units before its inner norm, from its input h: [B, R, N]."""
        mlp = self._neuron_mlp()
        kind = type(mlp).__name__
        if kind == "Mlp":
            return mlp.act(mlp.fc1(h))
        if kind == "SwiGLU":
            return mlp.act(mlp.fc1_g(h)) * mlp.fc1_x(h)
        if kind == "GluMlp":
            x1, x2 = mlp.fc1(h).chunk(2, dim=-1)
            return x1 * mlp.act(x2) if mlp.gate_last else mlp.act(x1) * x2

    def mlp_neurons(self, x):
        mlp = self.block.mlp
        hid = self._hidden(self.mlp_in(x))                                    # [B, R, N]
        inner = NormFold.of(mlp.norm)
        p = hid / inner.scale(hid) if inner is not None else hid
        y = mlp.fc2(mlp.norm(hid))                                            # [B, R, W]
        b = mlp.fc2.bias if mlp.fc2.bias is not None else torch.zeros(y.shape[-1]).to(y)
        if inner is not None:
            b = inner.beta(hid) @ mlp.fc2.weight.T + b                        # [W]
        if self.post:                                                         # norm2 after the MLP
            post = NormFold.of(self.block.norm2)
            s = post.scale(y)                                                 # [B, R, 1]
            y = self.block.norm2(y)
            p = p / s
            b = post.fold_out(b) / s + post.beta(y)                           # [B, R, W]
        gamma = self._gamma2
        if gamma is not None:
            y, b = y * gamma, b * gamma
        return p, y, b

    @property
    def mlp_rows(self):
        mlp = self._neuron_mlp()
        rows = mlp.fc2.weight.T                                               # [N, W]
        inner = NormFold.of(mlp.norm)
        if inner is not None:
            rows = inner.fold_in(rows)
        if self.post:
            rows = NormFold.of(self.block.norm2).fold_out(rows)
        gamma = self._gamma2
        return rows * gamma if gamma is not None else rows

    def forward(self, x, ctx=None):
        if type(self.block).__name__ == "Block":
            return self.block(x)
        rope = ctx[self.index] if (ctx is not None and self.mixed_rope) else ctx
        return self.block(x, rope=rope)


def _head_chain(visual: nn.Module, width: int):
    """timm's head and open_clip's projection after the pool: a list of nn.Linear, each affine.
    UnsupportedTower for an MLP projection."""
    trunk = visual.trunk
    chain = []
    if isinstance(trunk.head, nn.Linear):
        chain.append(trunk.head)
    elif not isinstance(trunk.head, nn.Identity):
        raise UnsupportedTower(f"its timm head is {type(trunk.head).__name__}")
    for name, m in visual.head.named_children():
        if isinstance(m, nn.Linear):
            chain.append(m)
        elif not isinstance(m, (nn.Dropout, nn.Identity)):
            raise UnsupportedTower(f"its projection head '{name}' is a {type(m).__name__}, not linear")
    return chain


class TimmReadout(Readout):
    """trunk.norm per token, the pool ('token' | 'avg' | 'map'), fc_norm, timm's head, open_clip's proj.

    The pooled vector p [W] (MAP: the pool's output before its MLP, u, plus the MLP's term) reaches
    z through fc_norm (frozen per-image scale s_fc) and the linear chain A, c:
    z = (Pi G_fc p / s_fc + beta_fc) @ A + c."""

    def __init__(self, visual: nn.Module, pool: str, prefix: int):
        self.visual = visual
        trunk = visual.trunk
        self.pool = pool
        self.final = NormFold.of(trunk.norm)
        self.fc = NormFold.of(trunk.fc_norm)
        self.chain = _head_chain(visual, trunk.embed_dim)
        self.rows = 1 if pool == "token" else None
        self.attn_pool = trunk.attn_pool if pool == "map" else None
        # the tokens the pool reads: timm's VisionTransformer drops the prefix tokens before an
        # attention pool or an average unless pool_include_prefix; Eva's attention pool reads all
        include = bool(getattr(trunk, "pool_include_prefix", False))
        if pool == "map":
            self.first = 0 if (type(trunk).__name__ == "Eva" or include) else prefix
        else:
            self.first = 0 if include else prefix
        if self.attn_pool is not None:
            ap = self.attn_pool
            if ap.pos_embed is not None:
                raise UnsupportedTower("its attention pool adds its own position embedding")
            if ap.pool not in ("token", "avg"):
                raise UnsupportedTower(f"its attention pool reduces its latents with '{ap.pool}'")
            self.groups = ap.num_heads
            self.pool_mlp = ap.mlp is not None

    # ---- the linear maps
    def _chain(self, v, bias: bool = True):
        """v [..., W] through the chain after fc_norm (timm's head, open_clip's proj): [..., d]."""
        for lin in self.chain:
            v = F.linear(v, lin.weight, lin.bias if bias else None)
        return v

    def _affine(self, like):
        """A [W, d], c [d]: the chain after fc_norm as a matrix and a vector (identity when empty)."""
        W = self.visual.trunk.embed_dim
        return self._chain(torch.eye(W).to(like), bias=False), self._chain(torch.zeros(W).to(like))

    def _post(self, like):
        """Pi G_fc A: what the pooled vector meets after the pool ([W, d])."""
        A, _ = self._affine(like)
        return self.fc.fold_in(A) if self.fc is not None else A

    def _eye(self, like):
        return torch.eye(self.visual.trunk.embed_dim).to(like)

    def mid(self):
        like = next(self.visual.trunk.parameters())
        if self.attn_pool is not None:
            E = self.attn_pool.kv.out_features // 2
            wv = self.attn_pool.kv.weight[E:]                                 # [E, W]
            return self.final.fold_in(wv.T) if self.final is not None else wv.T   # [W, E]
        m = self.final.fold_in(self._eye(like)) if self.final is not None else self._eye(like)
        return m @ self._post(like)                                          # [W, d]

    def out(self):
        if self.attn_pool is None:
            return None
        like = self.attn_pool.proj.weight
        return self.attn_pool.proj.weight.T @ self._post(like)               # [E, d]

    # ---- one batch
    def read(self, x):
        B, T, W = x.shape
        trunk = self.visual.trunk
        xn = trunk.norm(x)                                                    # [B, T, W]
        s = self.final.scale(x)[..., 0] if self.final is not None else torch.ones(B, T).to(x)   # [B, T]
        beta = self.final.beta(x) if self.final is not None else torch.zeros(W).to(x)
        pool_mlp = None
        if self.pool == "token":
            K = (1 / s[:, :1])[:, None, :]                                    # [B, 1, 1]
            pooled = xn[:, 0]
            p_const = beta
        elif self.pool == "avg":
            n = T - self.first
            K = torch.zeros(B, 1, T).to(x)
            K[:, 0, self.first:] = 1 / (n * s[:, self.first:])
            pooled = xn[:, self.first:].mean(dim=1)
            p_const = beta
        else:
            K, pooled, p_const, pool_mlp = self._map(xn[:, self.first:], s[:, self.first:], beta)
            if self.first:
                K = torch.cat([torch.zeros(B, K.shape[1], self.first).to(K), K], dim=-1)
        if self.fc is not None:
            s_fc = self.fc.scale(pooled)                                      # [B, 1]
            z = self._chain(trunk.fc_norm(pooled))
            K = K / s_fc[:, :, None]
            const = self._chain(self.fc.fold_out(p_const) / s_fc + self.fc.beta(x))
            if pool_mlp is not None:
                pool_mlp = self._chain(self.fc.fold_out(pool_mlp) / s_fc, bias=False)
        else:
            z = self._chain(pooled)
            const = self._chain(p_const).expand_as(z)
            if pool_mlp is not None:
                pool_mlp = self._chain(pool_mlp, bias=False)
        return Read(weights=K, z=z, const=const, pool_mlp=pool_mlp)

    def _map(self, xn, s, beta):
        """AttentionPoolLatent over the normed tokens xn [B, N, W] (s: their norm scales [B, N]).
        Returns K [B, M, N], the pooled output [B, W], its constant part [W] or [B, W], and the
        pool MLP's term [B, W]."""
        ap = self.attn_pool
        B, N, _ = xn.shape
        M, dh = ap.num_heads, ap.head_dim
        Lq = ap.latent_len
        q = ap.q(ap.latent).reshape(1, Lq, M, dh).transpose(1, 2)             # [1, M, Lq, dh]
        k, v = ap.kv(xn).reshape(B, N, 2, M, dh).permute(2, 0, 3, 1, 4)       # 2 x [B, M, N, dh]
        q, k = ap.q_norm(q), ap.k_norm(k)
        a = torch.softmax((q * ap.scale) @ k.transpose(-2, -1), dim=-1)       # [B, M, Lq, N]
        o = (a @ v).transpose(1, 2).reshape(B, Lq, M * dh)                    # [B, Lq, E]
        u = ap.proj(o)                                                        # [B, Lq, W]
        mlp = ap.mlp(ap.norm(u))                                              # [B, Lq, W]
        E = M * dh
        o_const = beta @ ap.kv.weight[E:].T + (ap.kv.bias[E:] if ap.kv.bias is not None else 0)   # [E]
        u_const = ap.proj(o_const)                                            # [W]
        if ap.pool == "token":
            w, mlp_t, out = a[:, :, 0], mlp[:, 0], (u + mlp)[:, 0]
        else:
            w, mlp_t, out = a.mean(dim=2), mlp.mean(dim=1), (u + mlp).mean(dim=1)
        return w / s[:, None, :], out, u_const, mlp_t


class TimmTower(Tower):
    """open_clip's TimmModel around a timm VisionTransformer or Eva trunk."""
    family = "timm"

    def __init__(self, visual: nn.Module):
        super().__init__(visual)
        trunk = visual.trunk
        kind = type(trunk).__name__
        if kind not in TRUNKS:
            raise UnsupportedTower(f"its timm trunk is a {kind}, not a VisionTransformer or Eva")
        if getattr(trunk, "dynamic_img_size", False):
            raise UnsupportedTower("its timm trunk resizes position embeddings per image (dynamic_img_size)")
        pool = trunk.global_pool if getattr(trunk, "attn_pool", None) is None else "map"
        if pool not in ("token", "avg", "map"):
            raise UnsupportedTower(f"its timm trunk pools with '{pool or 'nothing'}'")
        self.eva = kind == "Eva"
        self.prefix = int(trunk.num_prefix_tokens)
        mixed = bool(getattr(trunk, "rope_mixed", False))
        self.blocks = [TimmBlock(b, i, mixed) for i, b in enumerate(trunk.blocks)]
        self.readout = TimmReadout(visual, pool, self.prefix)
        self.pooling = {"token": "tok", "avg": "avg", "map": "map"}[pool]
        self.width = int(trunk.embed_dim)
        self.grid = tuple(int(g) for g in trunk.patch_embed.grid_size)
        self.image_size = int(visual.image_size[0])
        self.patch_size = self.image_size // self.grid[0]
        self.mlp_width = widest_linear(trunk.blocks[0].mlp)
        chain = self.readout.chain
        self.embed_dim = int(chain[-1].out_features) if chain else (
            int(trunk.attn_pool.out_features) if self.readout.attn_pool is not None else self.width)

    def embed(self, images):
        trunk = self.visual.trunk
        x = trunk.patch_embed(images)
        if self.eva:
            x, rope = trunk._pos_embed(x)
        else:
            x, rope = trunk._pos_embed(x), None
            x = trunk.patch_drop(x)
        return trunk.norm_pre(x), rope                                        # [B, T, W]

    def position_embedding(self):
        return getattr(self.visual.trunk, "pos_embed", None)
