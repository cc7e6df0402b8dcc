"""Second-order effects of MLP neurons (MATH.md §10; Gandelsman, Efros, Steinhardt, ICLR 2025), exact and cheap.

Neuron n of MLP layer l writes p_n[i] w_n at token i (p: its post-activation value, w_n: its c_proj
column times the block's layer scale). A later head (l', h) reads that through ln_1 (centering, gain
g_{l'}, and the scale sigma_{l'}[i] the forward pass fixed), its value and output matrices and the class
row A^{l'h}[0, i] of its attention; the head's direct term then reaches the unit embedding through
ln_post and the projection exactly as in models.decompose (C, s ||z||). So the neuron's effect through
that head is one scalar per image times one image-independent vector:

    phi_n      = sum_k alpha[n, k] u[n, k]          over the K = (L - 1 - l) H later heads k = (l', h)
    u[n, k]    = ((g_{l'} * centre(w_n)) @ W_V^{l'h}T) @ F[l', h]                  [d], no image in it
    alpha[n, k] = sum_i A^{l'h}[0, i] p_n[i] / sigma_{l'}[i] / (s ||z||)            one scalar per image

with F[l', h] = (W_O^{l'h} * gamma_{l'}) @ C, the fold of models.decompose. Only alpha [B, N, K]
depends on the image: it costs B T N K multiply-adds on top of a forward pass (nothing of size
[B, T, N, W] exists), and it is what the warehouse stores. ||phi_n||^2 = alpha_n G_n alpha_n with
G_n = U_n U_n^T [K, K] (`gram`), so effect norms need no phi either; `coordinates` turns alpha into
K-vectors whose Euclidean geometry is phi's (for eta2, principal directions).

phi is on the unit-embedding scale of `Decomposition.head_cls`: summed over every earlier neuron, plus
the embedding, the earlier heads and the biases, it gives each head's direct term (the source
identity, tests/unit/test_neurons.py).

Tower access is one function, `trace`, over open_clip's native class-token ViT: it runs the forward pass
and keeps what the lens reads (per later block: class-row attention, ln_1 scales; per chosen MLP layer:
activations; the final scale). The weights the lens folds come from `_BlockWeights`. A tower adapter
that yields the same per-block quantities plugs in there.

API:
    SecondOrderLens(visual, layers)            image-independent folds for the chosen MLP layers
    lens(images, phi=False) -> {layer: SecondOrder}
    lens.trace(images) -> Trace;  lens.alpha(trace, layer) -> [B, N, K]
    lens.head_vectors(layer, neurons) -> U [n, K, d];  lens.gram(layer) -> G [N, K, K]
    lens.token_alpha(trace, layer, neuron) -> [B, K, T];  lens.layer_effect(alpha, layer) -> [B, d]
    lens.token_effect(trace, layer, neuron, direction) -> [B, T]   (the per-patch map along a direction)
    lens.head_shares(trace, head, direction) -> {layer: [B, N]}    (the neurons behind a head's share)
    second_order(lm, images, layer, *, phi=False) -> SecondOrder   (lens cached on the LoadedModel)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from models.decompose import _MultiHeadAttention, class_row_attention


@dataclass
class Trace:
    """What one forward pass of B images fixes for the lens.

    acts:   {MLP layer l: [B, T, N]} post-activation values p of the chosen layers' neurons;
    a0:     {block l': [B, H, T]} class-row attention of every block after the first chosen layer;
    sigma:  {block l': [B, T]} ln_1's scale sqrt(var_c(x) + eps) at every token of those blocks;
    scale:  [B] s ||z|| (ln_post's scale at the class token times the norm of the embedding);
    embedding: [B, d] the unit image embedding.
    """
    acts: dict
    a0: dict
    sigma: dict
    scale: torch.Tensor
    embedding: torch.Tensor


@dataclass
class SecondOrder:
    """The second-order effects of MLP layer `layer`'s N neurons on B images.

    heads: the K later heads (l', h) in the order of alpha's last axis (block by block, head by head);
    alpha: [B, N, K]; phi: [B, N, d] (on request) = sum_k alpha[..., k] u[:, k]; embedding: [B, d].
    """
    layer: int
    heads: list
    alpha: torch.Tensor
    embedding: torch.Tensor
    phi: Optional[torch.Tensor] = None

    def numpy(self) -> dict:
        out = {"second_order_alpha": self.alpha.detach().float().cpu().numpy()}
        if self.phi is not None:
            out["second_order_phi"] = self.phi.detach().float().cpu().numpy()
        return out


def _c_matrix(visual) -> torch.Tensor:
    """C = diag(g) P - (1/W) 1 (g P)^T [W, d]: ln_post's gain and centering folded into the projection
    (models.decompose), in the tower's dtype."""
    g, P = visual.ln_post.weight, visual.proj                     # [W], [W, d]
    return g[:, None] * P - (g @ P)[None, :] / g.shape[0]


class _BlockWeights:
    """What the lens folds from one later block l': ln_1's gain g [W], the value matrices
    Wv [H, dh, W] (W_V^h) and the per-head fold F [H, dh, d] = (W_O^h * gamma) @ C."""

    def __init__(self, blk, C: torch.Tensor, heads: int):
        W = C.shape[0]
        dh = W // heads
        ones = torch.ones(W, dtype=C.dtype, device=C.device)
        self.g = blk.ln_1.weight.detach() if blk.ln_1.weight is not None else ones
        self.Wv = blk.attn.in_proj_weight.detach()[2 * W:].view(heads, dh, W)
        gamma = blk.ls_1.gamma.detach() if hasattr(blk.ls_1, "gamma") else ones
        Wo = blk.attn.out_proj.weight.detach().T * gamma[None, :]              # [H*dh, W]
        self.F = (Wo @ C).view(heads, dh, -1)                                   # [H, dh, d]


class SecondOrderLens:
    """The second-order lens of the chosen MLP layers of an open_clip class-token ViT (`visual`).

    Folds the image-independent parts once (the neurons' centred output rows, each later block's
    value matrices and head folds); `trace` runs a forward pass, `alpha` turns it into [B, N, K]."""

    @torch.no_grad()
    def __init__(self, visual, layers: Sequence[int]):
        blocks = visual.transformer.resblocks
        self.visual = visual
        self.n_layers = len(blocks)
        self.layers = sorted(set(int(l) for l in layers))
        if not self.layers:
            raise ValueError("choose at least one MLP layer for the second-order lens")
        bad = [l for l in self.layers if not 0 <= l < self.n_layers - 1]
        if bad:
            raise ValueError(f"MLP layer(s) {bad}: the second-order lens needs a later attention layer, so "
                             f"use layers 0..{self.n_layers - 2} (0-based) of this {self.n_layers}-layer tower")
        self.n_heads = blocks[0].attn.num_heads
        C = _c_matrix(visual).detach()
        self.C = C
        self.first = self.layers[0]
        self.blocks = {lp: _BlockWeights(blocks[lp], C, self.n_heads) for lp in range(self.first + 1, self.n_layers)}
        self.rows = {}                                                           # layer -> centred w_n [N, W]
        for l in self.layers:
            blk = blocks[l]
            w = blk.mlp.c_proj.weight.detach().T                                 # [N, W]
            if hasattr(blk.ls_2, "gamma"):
                w = w * blk.ls_2.gamma.detach()[None, :]
            self.rows[l] = w - w.mean(1, keepdim=True)
        self.n_neurons = {l: self.rows[l].shape[0] for l in self.layers}

    def heads(self, layer: int) -> list[tuple[int, int]]:
        """The K later heads of MLP layer `layer`, in alpha's order: (l', h) for l' > layer, h = 0..H-1."""
        return [(lp, h) for lp in range(layer + 1, self.n_layers) for h in range(self.n_heads)]

    # ------------------------------------------------------------------ the forward pass

    @torch.no_grad()
    def trace(self, images: torch.Tensor, layers: Optional[Sequence[int]] = None) -> Trace:
        """One forward pass of preprocessed images [B, 3, S, S] keeping what the lens reads for
        `layers` (default: the lens's layers). Blocks before the first layer run fused; the last
        block runs for the class query only (nothing after it reads other tokens)."""
        layers = self.layers if layers is None else sorted(set(int(l) for l in layers))
        vis = self.visual
        p = next(vis.parameters())
        x = vis._embeds(images.to(p.device, p.dtype))                          # [B, T, W]
        blocks = vis.transformer.resblocks
        last = len(blocks) - 1
        first = layers[0]
        H = self.n_heads
        acts, a0s, sigmas = {}, {}, {}
        for l, blk in enumerate(blocks):
            if l < first:
                x = blk(x)
                continue
            B, T, W = x.shape
            h = blk.ln_1(x)
            if l > first:
                sigmas[l] = torch.sqrt(x.var(-1, unbiased=False) + blk.ln_1.eps)   # [B, T]
                w, b = blk.attn.in_proj_weight, blk.attn.in_proj_bias
                if l == last:
                    q = F.linear(h[:, :1], w[:W], b[:W] if b is not None else None)            # [B, 1, W]
                    k, v = F.linear(h, w[W:], b[W:] if b is not None else None).split(W, dim=-1)
                    a0 = class_row_attention(q, k, H)                                          # [B, H, T]
                    o = (a0[:, :, None] @ v.view(B, T, H, -1).transpose(1, 2))[:, :, 0]       # [B, H, dh]
                    o = o.reshape(B, 1, W)
                    x = x[:, :1]
                else:
                    q, k, v = F.linear(h, w, b).split(W, dim=-1)                               # 3 x [B, T, W]
                    a0 = class_row_attention(q[:, :1], k, H)
                    o = _MultiHeadAttention.apply(q, k, v, H)                                  # [B, T, W]
                a0s[l] = a0
                x = x + blk.ls_1(F.linear(o, blk.attn.out_proj.weight, blk.attn.out_proj.bias))
            else:
                x = x + blk.ls_1(blk.attn(h, h, h, need_weights=False)[0])
            h2 = blk.ln_2(x)
            if l in layers:
                act = blk.mlp.gelu(blk.mlp.c_fc(h2))                             # [B, T, N]
                acts[l] = act
                x = x + blk.ls_2(blk.mlp.c_proj(act))
            else:
                x = x + blk.ls_2(blk.mlp(h2))
        cls = x[:, 0]                                                            # [B, W]
        ln = vis.ln_post
        s = torch.sqrt(cls.var(-1, unbiased=False) + ln.eps)                    # [B]
        z = ln(cls) @ vis.proj                                                   # [B, d]
        zn = z.norm(dim=-1)
        return Trace(acts, a0s, sigmas, s * zn, z / zn[:, None])

    # ------------------------------------------------------------------ alpha and its relatives

    def _read_weights(self, trace: Trace, layer: int) -> torch.Tensor:
        """A^{l'h}[0, i] / sigma_{l'}[i] / (s ||z||) for every later head: [B, K, T]."""
        parts = [trace.a0[lp] / trace.sigma[lp][:, None, :] for lp in range(layer + 1, self.n_layers)]   # [B, H, T]
        return torch.cat(parts, 1) / trace.scale[:, None, None]

    def alpha(self, trace: Trace, layer: int) -> torch.Tensor:
        """alpha [B, N, K] of MLP layer `layer` (MATH.md §10) from a trace that kept it."""
        return torch.einsum("bkt,btn->bnk", self._read_weights(trace, layer), trace.acts[layer])

    def token_alpha(self, trace: Trace, layer: int, neuron: int) -> torch.Tensor:
        """alpha of one neuron before the sum over source tokens: [B, K, T] (sums over T to alpha[:, neuron])."""
        return self._read_weights(trace, layer) * trace.acts[layer][:, None, :, neuron]

    @torch.no_grad()
    def head_vectors(self, layer: int, neurons=None) -> torch.Tensor:
        """u[n, k] of MLP layer `layer` for `neurons` (a slice or index list; default all): [n, K, d]."""
        rows = self.rows[layer] if neurons is None else self.rows[layer][neurons]          # [n, W]
        out = []
        for lp in range(layer + 1, self.n_layers):
            bw = self.blocks[lp]
            v = torch.einsum("nw,hew->nhe", rows * bw.g[None, :], bw.Wv)                    # [n, H, dh]
            out.append(torch.einsum("nhe,hed->nhd", v, bw.F))                               # [n, H, d]
        return torch.cat(out, 1)

    @torch.no_grad()
    def gram(self, layer: int, chunk: int = 256) -> torch.Tensor:
        """G [N, K, K] = U_n U_n^T per neuron, so ||phi_n||^2 = alpha_n G_n alpha_n (float64)."""
        N = self.n_neurons[layer]
        parts = []
        for a in range(0, N, chunk):
            U = self.head_vectors(layer, slice(a, a + chunk)).double()                      # [c, K, d]
            parts.append(U @ U.transpose(1, 2))
        return torch.cat(parts)

    def phi(self, alpha: torch.Tensor, layer: int, neurons=None) -> torch.Tensor:
        """phi [B, n, d] = sum_k alpha[b, n, k] u[n, k] for `neurons` (alpha holds those neurons)."""
        U = self.head_vectors(layer, neurons).to(alpha.dtype)
        return torch.einsum("bnk,nkd->bnd", alpha, U)

    @torch.no_grad()
    def layer_effect(self, alpha: torch.Tensor, layer: int) -> torch.Tensor:
        """sum over the layer's neurons of phi_n: [B, d], without forming phi (one [B, W] per later head)."""
        out = 0
        H = self.n_heads
        for j, lp in enumerate(range(layer + 1, self.n_layers)):
            bw = self.blocks[lp]
            a = alpha[:, :, j * H:(j + 1) * H].to(self.rows[layer].dtype)                  # [B, N, H]
            mixed = torch.einsum("bnh,nw->bhw", a, self.rows[layer]) * bw.g                 # [B, H, W]
            v = torch.einsum("bhw,hew->bhe", mixed, bw.Wv)                                  # [B, H, dh]
            out = out + torch.einsum("bhe,hed->bd", v, bw.F)
        return out

    @torch.no_grad()
    def writes_along(self, layer: int, head: tuple[int, int], direction: torch.Tensor) -> torch.Tensor:
        """u[n, (l', h)] . direction for every neuron n of `layer`: [N] (a neuron's share of head
        (l', h)'s share of cos(image, text) is alpha[n, k] times this, for the unit text `direction`)."""
        lp, h = head
        if not layer < lp < self.n_layers:
            raise ValueError(f"head L{lp}.H{h} is not after MLP layer {layer}")
        bw = self.blocks[lp]
        r = bw.Wv[h].T @ (bw.F[h] @ direction.to(bw.F.dtype))                              # [W]
        return (self.rows[layer] * bw.g[None, :]) @ r

    @torch.no_grad()
    def token_effect(self, trace: Trace, layer: int, neuron: int, direction: torch.Tensor) -> torch.Tensor:
        """phi_n . direction split over the source tokens i: [B, T] (sums over T to phi_n . direction).
        Token i's part is sum_k alpha[n, k, i] (u[n, k] . direction): the per-patch map of the neuron."""
        U = self.head_vectors(layer, [int(neuron)])[0]                                    # [K, d]
        w = U @ direction.to(U.dtype)                                                    # [K]
        return torch.einsum("bkt,k->bt", self.token_alpha(trace, layer, int(neuron)).to(U.dtype), w)

    @torch.no_grad()
    def head_shares(self, trace: Trace, head: tuple[int, int], direction: torch.Tensor) -> dict[int, torch.Tensor]:
        """Each neuron's share of head (l', h)'s direct share of cos(image, text) (MATH.md §10; the
        source identity): {MLP layer l < l' of the lens: [B, N] = alpha[:, n, k] * (u[n, k] . direction)}."""
        out = {}
        for l in self.layers:
            if l < head[0]:
                k = self.heads(l).index(tuple(head))
                out[l] = self.alpha(trace, l)[:, :, k] * self.writes_along(l, head, direction)[None, :]
        return out

    def __call__(self, images: torch.Tensor, phi: bool = False) -> dict[int, SecondOrder]:
        """Preprocessed images [B, 3, S, S] -> {layer: SecondOrder} for every layer of the lens."""
        with torch.no_grad():
            tr = self.trace(images)
            out = {}
            for l in self.layers:
                a = self.alpha(tr, l)
                out[l] = SecondOrder(l, self.heads(l), a, tr.embedding, self.phi(a, l) if phi else None)
            return out


def lens_for(lm, layers: Sequence[int]) -> SecondOrderLens:
    """The SecondOrderLens of a LoadedModel for these MLP layers, built once and cached on it."""
    key = ("second_order_lens", tuple(sorted(set(int(l) for l in layers))))
    if key not in lm._cache:
        lm._cache[key] = SecondOrderLens(lm.visual, key[1])
    return lm._cache[key]


def second_order(lm, images: torch.Tensor, layer: int, *, phi: bool = False) -> SecondOrder:
    """The second-order effects of MLP layer `layer` (0-based) of a LoadedModel on preprocessed
    images [B, 3, S, S]: alpha [B, N, K] and, with phi=True, phi [B, N, d] (MATH.md §10)."""
    return lens_for(lm, [layer])(images, phi=phi)[int(layer)]
