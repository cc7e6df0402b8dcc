"""Second-order effects of MLP neurons (MATH.md §10; Gandelsman, Efros, Steinhardt, ICLR 2025), exact and
cheap, on every tower the head decomposition covers (models/towers: class token, average, CoCa's pooler,
MAP; open_clip native, timm ViT and Eva with RoPE, layer scale, post-norm, SwiGLU).

Neuron n of MLP layer l writes p_n[j] w_n at token j (p: its hidden unit, divided by the frozen scale of
any norm between it and the residual; w_n its output row with layer scale and norm folds: the adapter's
`mlp_neurons` and `mlp_rows`). A later head (l', h) reads that through its value projection from the
residual (`value_in[h]`, norm1's gain and centring folded in) at norm1's frozen scale s1[j], then its
attention A^{l'h}[i, j] (frozen), and writes (o_h[i] / r[i]) @ head_out[h] at token i. The readout reads
the final residual at rows i with frozen weights K[m, i] through `mid` and `out` (models.decompose: M pool
heads in groups of mid's columns; M = 1 without an attention pool). So neuron n reaches the unit
embedding through head (l', h) and pool head m as one scalar per image times one image-independent vector:

    phi_n          = sum_{l' > l, h, m} alpha[n, (l',h,m)] u[n, (l',h,m)]
    u[n, (l',h,m)] = ((w_n @ value_in^{l'}[h]) @ Fh[l',h][:, group m]) @ out[group m]      [d], no image
    alpha[n, (l',h,m)] = sum_j rho^{l'}[m, h, j] p_n[j]                                      one scalar per image
    rho^{l'}[m, h, j]  = sum_i K[m, i] A^{l'h}[i, j] / r^{l'}[i] / s1^{l'}[j] / ||z||

with Fh[l', h] = head_out^{l'}[h] @ mid (models.decompose's fold; for M = 1 `out` is folded in and the
m axis has one entry). rho is the pool's read weights pulled back through the head's own attention,
exactly as the head decomposition's per-source weights, over the neuron's source tokens j. For a
class-token tower (R = 1, K = 1/s, M = 1) this is the issue's form: alpha = sum_j A[0, j] p_n[j] /
sigma[j] / (s ||z||). The P = K' M "paths" (K' = (L - 1 - l) H later heads, M pool heads; P = K' for
towers without an attention pool) are alpha's last axis, ordered (l', h, m) with m fastest.

Only alpha [B, N, P] depends on the image: it costs B T N P multiply-adds on top of a forward pass
(nothing of size [B, T, N, W] exists) and is what the warehouse stores. ||phi_n||^2 = alpha_n G_n alpha_n
with G_n = U_n U_n^T [P, P] (`gram`), so effect norms need no phi.

phi is on the unit-embedding scale of `Decomposition.head_cls`: summed over every earlier neuron, plus
the embedding, the earlier heads, the biases and the value projection's constant, it gives each head's
direct term (the source identity, tests/unit/test_neurons.py). A MAP tower's neuron also reaches the
pool directly (its first-order, direct effect) and through the pool's MLP: neither is second-order.

API:
    SecondOrderLens(visual, layers)            image-independent folds for the chosen MLP layers
    lens(images, phi=False) -> {layer: SecondOrder}
    lens.trace(images) -> Trace;  lens.alpha(trace, layer) -> [B, N, P]
    lens.heads(layer) [K'], lens.paths(layer) [P], lens.head_paths(layer, head) -> slice of P
    lens.head_vectors(layer, neurons) -> U [n, P, d];  lens.gram(layer) -> G [N, P, P]
    lens.token_alpha(trace, layer, neuron) -> [B, P, T];  lens.layer_effect(alpha, layer) -> [B, d]
    lens.token_effect(trace, layer, neuron, direction) -> [B, T]   (the per-patch map along a direction)
    lens.head_shares(trace, head, direction) -> {layer: [B, N]}    (the neurons behind a head's share)
    second_order(lm, images, layer, *, phi=False) -> SecondOrder   (lens cached on the LoadedModel)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from models.decompose import Decomposer, _attend, _weights


@dataclass
class Trace:
    """What one forward pass of B images fixes for the lens.

    acts:   {MLP layer l: [B, T, N]} the chosen layers' neurons p (hidden units over frozen norm scales);
    rho:    {block l': [B, H M, T]} each later block's read weights rho[(h, m), j] (m fastest), the
            1 / ||z|| included;
    embedding: [B, d] the unit image embedding.
    """
    acts: dict
    rho: dict
    embedding: torch.Tensor


@dataclass
class SecondOrder:
    """The second-order effects of MLP layer `layer`'s N neurons on B images.

    heads: the K' later heads (l', h); paths: the P = K' M (l', h, m) in the order of alpha's last axis
    (M pool heads; m = 0 only for towers without an attention pool); alpha: [B, N, P]; phi: [B, N, d] (on
    request) = sum_p alpha[..., p] u[:, p]; embedding: [B, d].
    """
    layer: int
    heads: list
    paths: list
    alpha: torch.Tensor
    embedding: torch.Tensor
    phi: Optional[torch.Tensor] = None

    def numpy(self) -> dict:
        out = {"second_order_alpha": self.alpha.detach().float().cpu().numpy()}
        if self.phi is not None:
            out["second_order_phi"] = self.phi.detach().float().cpu().numpy()
        return out


class SecondOrderLens:
    """The second-order lens of the chosen MLP layers of an image tower (`visual`, any tower
    models.towers adapts).

    Folds the image-independent parts once (the neurons' output rows, each later block's value
    projection from the residual, and the head decomposition's folds Fh, mid, out of every later block,
    from a models.decompose.Decomposer); `trace` runs a forward pass, `alpha` turns it into [B, N, P]."""

    @torch.no_grad()
    def __init__(self, visual, layers: Sequence[int]):
        from models.towers import tower as adapt
        self.visual = visual
        self.n_layers = adapt(visual).layers
        self.layers = sorted(set(int(l) for l in layers))
        if not self.layers:
            raise ValueError("choose at least one MLP layer for the second-order lens")
        bad = [l for l in self.layers if not 0 <= l < self.n_layers - 1]
        if bad:
            raise ValueError(f"MLP layer(s) {bad}: the second-order lens needs a later attention layer, so "
                             f"use layers 0..{self.n_layers - 2} (0-based) of this {self.n_layers}-layer tower")
        self.first = self.layers[0]
        self.later = list(range(self.first + 1, self.n_layers))
        self.dec = Decomposer(visual, self.later)                      # Fh [L'', H, dh, D], mid, out, groups
        self.tower = self.dec.tower
        self.cdtype = self.dec.cdtype
        self.n_heads = self.tower.heads
        self.groups = self.dec.groups                                  # M pool heads (1: no attention pool)
        blocks = self.tower.blocks
        self.value_in = {lp: blocks[lp].value_in.detach().to(self.cdtype) for lp in self.later}   # [H, W, dh]
        self.rows = {l: blocks[l].mlp_rows.detach().to(self.cdtype) for l in self.layers}       # [N, W]
        self.n_neurons = {l: self.rows[l].shape[0] for l in self.layers}

    def heads(self, layer: int) -> list[tuple[int, int]]:
        """The K' later heads of MLP layer `layer`: (l', h) for l' > layer, h = 0..H-1."""
        return [(lp, h) for lp in range(layer + 1, self.n_layers) for h in range(self.n_heads)]

    def paths(self, layer: int) -> list[tuple[int, int, int]]:
        """The P paths of alpha's last axis: (l', h, m) for each later head and pool head m (m fastest)."""
        return [(lp, h, m) for lp, h in self.heads(layer) for m in range(self.groups)]

    def head_paths(self, layer: int, head: tuple[int, int]) -> slice:
        """The slice of alpha's last axis holding head (l', h)'s M paths."""
        lp, h = head
        if not layer < lp < self.n_layers or not 0 <= h < self.n_heads:
            raise ValueError(f"head L{lp}.H{h} is not a head after MLP layer {layer}")
        k = self.heads(layer).index((lp, h))
        return slice(k * self.groups, (k + 1) * self.groups)

    # ------------------------------------------------------------------ the forward pass

    @torch.no_grad()
    def trace(self, images: torch.Tensor, layers: Optional[Sequence[int]] = None) -> Trace:
        """One forward pass of preprocessed images [B, 3, S, S] keeping what the lens reads for
        `layers` (default: the lens's layers). Blocks before the first layer run as the tower's own;
        a class-token readout's last block runs its query, out-projection and MLP for the class row."""
        layers = self.layers if layers is None else sorted(set(int(l) for l in layers))
        tower, cd = self.tower, self.cdtype
        p = next(self.visual.parameters())
        x, ctx = tower.embed(images.to(p.device, p.dtype))                     # [B, T, W]
        B, T, W = x.shape
        R = tower.readout.rows or T                                            # rows the readout reads
        last = self.n_layers - 1
        first = layers[0]
        acts, reads = {}, {}
        for l, blk in enumerate(tower.blocks):
            if l < first:
                x = blk.forward(x, ctx)
                continue
            rows = tower.readout.rows if l == last else None
            q, k, v = blk.qkv(x, ctx, rows)                                    # [B, S, H, dh], [B, T, H, dh] x 2
            if l > first:
                if rows or R == T:                                            # every row computed is read
                    A = _weights(q, k, blk.scale)                              # [B, H, S, T]
                    o = torch.einsum("bhst,bthk->bshk", A, v)
                else:
                    o = _attend(q, k, v, blk.heads, blk.scale)                 # fused, every row
                    A = _weights(q[:, :R], k, blk.scale)                       # [B, H, R, T]
                s1 = blk.norm1.scale(x)[..., 0] if blk.norm1 is not None else torch.ones(B, T).to(x)   # [B, T]
            else:
                o = _attend(q, k, v, blk.heads, blk.scale)
            delta, r, _ = blk.attn_out(o)                                      # [B, S, W], [B, S, 1] | None
            if l > first:
                A = A[:, :, :R].to(cd)
                if r is not None:
                    A = A / r[:, None, :R].to(cd)                              # rows over the post-attention scale
                reads[l] = (A, s1.to(cd))
            xs = x if rows is None else x[:, :rows]
            x_attn = xs + delta
            if l in layers:
                act, mlp, _ = blk.mlp_neurons(x_attn)                          # [B, T, N], [B, T, W]
                acts[l] = act.to(cd)
            else:
                mlp = blk.mlp(x_attn)
            x = x_attn + mlp
        read = tower.readout.read(x[:, :R])
        K = read.weights.to(cd)                                                # [B, M, R]
        znorm = read.z.to(cd).norm(dim=-1)                                     # [B]
        rho = {}
        for lp, (A, s1) in reads.items():
            w = torch.einsum("bmr,bhrt->bhmt", K, A) / s1[:, None, None, :]   # [B, H, M, T]
            rho[lp] = (w / znorm[:, None, None, None]).flatten(1, 2)           # [B, H M, T]
        return Trace(acts, rho, read.z.to(cd) / znorm[:, None])

    # ------------------------------------------------------------------ alpha and its relatives

    def _read_weights(self, trace: Trace, layer: int) -> torch.Tensor:
        """rho of every path of MLP layer `layer`: [B, P, T]."""
        return torch.cat([trace.rho[lp] for lp in range(layer + 1, self.n_layers)], 1)

    def alpha(self, trace: Trace, layer: int) -> torch.Tensor:
        """alpha [B, N, P] of MLP layer `layer` (MATH.md §10) from a trace that kept it."""
        return torch.einsum("bpt,btn->bnp", self._read_weights(trace, layer), trace.acts[layer])

    def token_alpha(self, trace: Trace, layer: int, neuron: int) -> torch.Tensor:
        """alpha of one neuron before the sum over source tokens: [B, P, T] (sums over T to alpha[:, neuron])."""
        return self._read_weights(trace, layer) * trace.acts[layer][:, None, :, neuron]

    def _block_vectors(self, lp: int, rows: torch.Tensor) -> torch.Tensor:
        """u of output rows [n, W] through every head and pool head of later block lp: [n, H M, d]."""
        F_l = self.dec.Fh[self.later.index(lp)]                                # [H, dh, D]
        v = torch.einsum("nw,hwe->nhe", rows, self.value_in[lp])              # [n, H, dh]
        if self.dec.out is None:                                               # M = 1, out folded in
            return torch.einsum("nhe,hed->nhd", v, F_l)
        H, dh, D = F_l.shape
        M = self.groups
        g = torch.einsum("nhe,hemg->nhmg", v, F_l.view(H, dh, M, D // M))      # [n, H, M, D/M]
        return torch.einsum("nhmg,mgd->nhmd", g, self.dec.out.view(M, D // M, -1)).flatten(1, 2)

    @torch.no_grad()
    def head_vectors(self, layer: int, neurons=None) -> torch.Tensor:
        """u[n, p] of MLP layer `layer` for `neurons` (a slice or index list; default all): [n, P, d]."""
        rows = self.rows[layer] if neurons is None else self.rows[layer][neurons]          # [n, W]
        return torch.cat([self._block_vectors(lp, rows) for lp in range(layer + 1, self.n_layers)], 1)

    @torch.no_grad()
    def gram(self, layer: int, chunk: int = 256) -> torch.Tensor:
        """G [N, P, P] = U_n U_n^T per neuron, so ||phi_n||^2 = alpha_n G_n alpha_n (float64)."""
        N = self.n_neurons[layer]
        parts = []
        for a in range(0, N, chunk):
            U = self.head_vectors(layer, slice(a, a + chunk)).double()                      # [c, P, d]
            parts.append(U @ U.transpose(1, 2))
        return torch.cat(parts)

    def phi(self, alpha: torch.Tensor, layer: int, neurons=None) -> torch.Tensor:
        """phi [B, n, d] = sum_p alpha[b, n, p] u[n, p] for `neurons` (alpha holds those neurons)."""
        U = self.head_vectors(layer, neurons).to(alpha.dtype)
        return torch.einsum("bnp,npd->bnd", alpha, U)

    @torch.no_grad()
    def layer_effect(self, alpha: torch.Tensor, layer: int) -> torch.Tensor:
        """sum over the layer's neurons of phi_n: [B, d], without forming phi (one [B, H, M, W] per later block)."""
        out = 0
        H, M = self.n_heads, self.groups
        rows = self.rows[layer]
        for j, lp in enumerate(range(layer + 1, self.n_layers)):
            a = alpha[:, :, j * H * M:(j + 1) * H * M].to(rows.dtype).unflatten(2, (H, M))   # [B, N, H, M]
            mixed = torch.einsum("bnhm,nw->bhmw", a, rows)                                  # [B, H, M, W]
            v = torch.einsum("bhmw,hwe->bhme", mixed, self.value_in[lp])                    # [B, H, M, dh]
            F_l = self.dec.Fh[self.later.index(lp)]                                         # [H, dh, D]
            if self.dec.out is None:                                                        # M = 1
                out = out + torch.einsum("bhe,hed->bd", v[:, :, 0], F_l)
            else:
                D = F_l.shape[-1]
                g = torch.einsum("bhme,hemg->bhmg", v, F_l.unflatten(2, (M, D // M)))       # [B, H, M, D/M]
                out = out + torch.einsum("bhmg,mgd->bd", g, self.dec.out.unflatten(0, (M, D // M)))
        return out

    @torch.no_grad()
    def writes_along(self, layer: int, head: tuple[int, int], direction: torch.Tensor) -> torch.Tensor:
        """u[n, p] . direction for every neuron n of `layer` and head (l', h)'s M paths p: [N, M] (a
        neuron's share of that head's share of cos(image, text) is sum_m alpha[n, p_m] times this, for
        the unit text `direction`)."""
        self.head_paths(layer, head)                                                        # checks the head
        lp, h = head
        U = self._block_vectors(lp, self.rows[layer])                                       # [N, H M, d]
        return U[:, h * self.groups:(h + 1) * self.groups] @ direction.to(U.dtype)          # [N, M]

    @torch.no_grad()
    def token_effect(self, trace: Trace, layer: int, neuron: int, direction: torch.Tensor) -> torch.Tensor:
        """phi_n . direction split over the source tokens j: [B, T] (sums over T to phi_n . direction).
        Token j's part is sum_p alpha[n, p, j] (u[n, p] . direction): the per-patch map of the neuron."""
        U = self.head_vectors(layer, [int(neuron)])[0]                                    # [P, d]
        w = U @ direction.to(U.dtype)                                                    # [P]
        return torch.einsum("bpt,p->bt", self.token_alpha(trace, layer, int(neuron)).to(U.dtype), w)

    @torch.no_grad()
    def head_shares(self, trace: Trace, head: tuple[int, int], direction: torch.Tensor) -> dict[int, torch.Tensor]:
        """Each neuron's share of head (l', h)'s direct share of cos(image, text) (MATH.md §10; the
        source identity): {MLP layer l < l' of the lens: [B, N] = sum_m alpha[:, n, (l',h,m)] (u . direction)}."""
        out = {}
        for l in self.layers:
            if l < head[0]:
                sl = self.head_paths(l, tuple(head))
                out[l] = torch.einsum("bnm,nm->bn", self.alpha(trace, l)[:, :, sl],
                                      self.writes_along(l, tuple(head), direction))
        return out

    def __call__(self, images: torch.Tensor, phi: bool = False) -> dict[int, SecondOrder]:
        """Preprocessed images [B, 3, S, S] -> {layer: SecondOrder} for every layer of the lens."""
        with torch.no_grad():
            tr = self.trace(images)
            out = {}
            for l in self.layers:
                a = self.alpha(tr, l)
                out[l] = SecondOrder(l, self.heads(l), self.paths(l), a, tr.embedding,
                                     self.phi(a, l) if phi else None)
            return out


def lens_for(lm, layers: Sequence[int]) -> SecondOrderLens:
    """The SecondOrderLens of a LoadedModel for these MLP layers, built once and cached on it."""
    key = ("second_order_lens", tuple(sorted(set(int(l) for l in layers))))
    if key not in lm._cache:
        lm._cache[key] = SecondOrderLens(lm.visual, key[1])
    return lm._cache[key]


def second_order(lm, images: torch.Tensor, layer: int, *, phi: bool = False) -> SecondOrder:
    """The second-order effects of MLP layer `layer` (0-based) of a LoadedModel on preprocessed
    images [B, 3, S, S]: alpha [B, N, P] and, with phi=True, phi [B, N, d] (MATH.md §10)."""
    return lens_for(lm, [layer])(images, phi=phi)[int(layer)]
