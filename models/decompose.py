"""The exact direct decomposition of a ViT image embedding (MATH.md §1, §9), fast form, over
tower adapters (models/towers: open_clip's native ViT, timm's ViT and Eva; one decomposition).

Fix every LayerNorm's per-token scale and every attention weight at their forward-pass values:
then the tower's output z is linear in the residual summands (the embedding, each head at each
token, the MLPs, the biases), apart from an attention pool's MLP (SigLIP, PE-Core), which is
kept as one named remainder `pool_mlp`. The readout (final norm, pooling, projection) reads the
final residual x_L at R rows (R = 1 for the class token, every token otherwise) with per-image
weights K [B, M, R] (M pool heads; M = 1 without an attention pool) through fixed matrices
mid [W, D] (in M groups of columns) and out [D, d]. A head's summand at token i is
(o_h[i] / r[i]) @ head_out[h] (its attention output, divided by the frozen scale of any norm
between attention and residual), so per head we fold one matrix, once per model,

    Fh[l,h] = head_out[l,h] @ mid                                 # [d_head, D]   (M = 1: @ out too)

and get  c[l,h] = concat_m ((sum_i K[m,i] o_h[i] / r[i]) @ Fh[l,h][:, m]) @ out / ||z||.
Per source token j (o_h[i] = sum_j A[i,j] v_j) the weight of v_j @ Fh[l,h] is
w[m,h,j] = sum_i K[m,i] A[i,j] / r[i]. For a class-token tower this is MATH.md §1 exactly:
K = 1/s, mid = diag(g) P centred, c[l,h] = o0_h @ F[h] / (s ||z||). Nothing of size T x T x W
is ever built.

When the readout reads only the class row, the last block computes keys and values for every
token but its query, out-projection and MLP for the class token alone (a ViT-B/16 forward has
about 7% fewer FLOPs; `encode_image` does the full last block).

`rest` is accumulated independently of the heads (embedding term, MLP terms, out-proj biases,
the un-analysed layers, the readout's constant, pool_mlp) so `head_cls.sum + rest == embedding`
is a real check. With components=True the parts of `rest` (MATH.md §2: MLP terms, out-proj
biases, the embedding term) are returned as well; the embedding term is accumulated apart from
`rest`, so `heads + mlp + attn_bias + embedding_term (+ pool_mlp) == embedding` is a real check too.

API (one verb, one class, one result):
    decompose(lm, images, layers="last4", *, tokens=False, components=False) -> Decomposition
    Decomposer(visual, layers, *, tokens, components, micro_batch, traceable)   # nn.Module
    Decomposer.for_model(lm, layers, *, tokens, components)   # cached on the LoadedModel
    Decomposition: embedding, head_cls, rest, layers[, head_tokens][, mlp, attn_bias, embedding_term][, pool_mlp]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import AUTO_ALL_LAYERS, LayerSpec, resolve_layers  # noqa: F401  (re-exported)

MICRO_BATCH_BYTES = 10_000_000


def cpu_micro_batch(tokens: int, hidden: int) -> int:
    """Images per CPU micro-batch, so the widest activation (the MLP's float32 [b, T, hidden])
    stays near 10 MB: in the L3 cache and below malloc's mmap threshold, so the buffers are reused
    instead of page-faulted in anew. ViT-B-16 (4 images) measured 1.17x faster in torch and 1.12x
    in onnxruntime than one batch of 32 on a 2-core CPU. GPUs take the whole batch."""
    return max(1, MICRO_BATCH_BYTES // (tokens * hidden * 4))


def micro_batches(n: int, step: int) -> list[slice]:
    """Slices covering range(n) in steps of `step` (one empty slice when n == 0)."""
    return [slice(i, i + step) for i in range(0, max(n, 1), step)]


OUTPUTS = ("embedding", "head_cls", "rest", "head_tokens", "mlp", "attn_bias", "embedding_term", "pool_mlp")
"""Every tensor a Decomposition can hold, in the one order used to flatten it (ONNX outputs, `Decomposer.flat`)."""


@dataclass
class Decomposition:
    """The decomposition of a batch of B images (MATH.md §1, §9); one type for every mode and tower.

    Always present (`layers` are the analysed layers L', 0-based, sorted):
        embedding [B, d] unit norm; head_cls [B, L', H, d] = c[l,h]; rest [B, d] (everything else);
        head_cls.sum((1, 2)) + rest == embedding.
    tokens=True adds head_tokens [B, L', H, T, d] = c[l,h,j] per source token j (T = prefix tokens,
        i.e. the class token (none for SigLIP), then the patches); head_tokens.sum(3) == head_cls.
    components=True (every layer analysed) splits `rest` for mean ablation (MATH.md §2):
        mlp [B, L, d] (MLP terms), attn_bias [B, L, d] (out-proj biases), embedding_term [B, d]
        (the embedding x_0 and every bias after the blocks); head_cls.sum((1, 2)) + mlp.sum(1)
        + attn_bias.sum(1) + embedding_term (+ pool_mlp) == embedding.
    Towers with an attention pool that ends in an MLP (SigLIP, PE-Core: MAP) add pool_mlp [B, d],
        the pool MLP's term (not linear in the summands: a named remainder, part of `rest`).
    """
    embedding: torch.Tensor                         # [B, d]
    head_cls: torch.Tensor                          # [B, L', H, d]
    rest: torch.Tensor                              # [B, d]
    layers: list[int]                               # [L']
    head_tokens: Optional[torch.Tensor] = None      # [B, L', H, T, d]
    mlp: Optional[torch.Tensor] = None              # [B, L, d]
    attn_bias: Optional[torch.Tensor] = None        # [B, L, d]
    embedding_term: Optional[torch.Tensor] = None   # [B, d]
    pool_mlp: Optional[torch.Tensor] = None         # [B, d]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors present, by name, in the order of OUTPUTS."""
        return {k: getattr(self, k) for k in OUTPUTS if getattr(self, k) is not None}

    def numpy(self) -> dict:
        out = {k: v.detach().float().cpu().numpy() for k, v in self.tensors().items()}
        out["layers"] = self.layers
        return out


class _MultiHeadAttention(torch.autograd.Function):
    """Softmax attention of packed queries [B, S, H*dh] over keys and values [B, T, H*dh] with H
    heads and softmax scale `scale` -> [B, S, H*dh].

    torch runs its fused kernel; the ONNX exporter writes onnxruntime's fused contrib op
    `com.microsoft::MultiHeadAttention` (CPU and CUDA providers) instead of a chain of
    MatMul/Softmax/Transpose nodes, so the exported graph is as fused as the eager one.
    """

    @staticmethod
    def forward(ctx, q, k, v, heads: int, scale: float):
        B, S, W = q.shape
        split = lambda t: t.view(B, t.shape[1], heads, W // heads).transpose(1, 2)   # [B, H, n, dh]
        out = F.scaled_dot_product_attention(split(q), split(k), split(v), scale=scale)
        return out.transpose(1, 2).reshape(B, S, W)

    @staticmethod
    def symbolic(g, q, k, v, heads: int, scale: float):
        out = g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=heads, scale_f=scale)
        out.setType(q.type())
        return out


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """q [B, S, H, dh], k and v [B, T, H, dh] -> attention output [B, S, H, dh] (fused). `heads` is
    the block's own int (a traced shape would not do as the ONNX op's attribute)."""
    B, S = q.shape[:2]
    o = _MultiHeadAttention.apply(q.flatten(2), k.flatten(2), v.flatten(2), heads, scale)
    return o.view(B, S, heads, -1)


def _weights(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Explicit attention weights: q [B, S, H, dh], k [B, T, H, dh] -> A [B, H, S, T]."""
    return torch.softmax(torch.einsum("bshk,bthk->bhst", q, k) * scale, dim=-1)


class Decomposer(nn.Module):
    """Wraps an image tower (`model.visual`, any family models.towers adapts); `dec(images)`
    returns the Decomposition.

    Every mode is fixed at construction:
      layers      the analysed layers L' (0-based; see resolve_layers);
      tokens      also c[l,h,j] per source token (head_tokens);
      components  also the split of `rest` into MLP, out-proj bias and embedding terms
                  (mean ablation; needs every layer analysed);
      micro_batch images per CPU micro-batch (default: cpu_micro_batch of the model; 0: whole
                  batch); GPUs always take the whole batch;
      traceable   run the un-analysed blocks by hand instead of the tower's own (fused) block, so
                  that torch.onnx.export can trace them and their attention becomes onnxruntime's
                  fused op (_MultiHeadAttention); same numbers; what models/onnx.py exports.

    How it reads the tower (MATH.md §9). The readout reads the final residual x_L at R rows (the
    class token, R = 1, or every token, R = T) with per-image weights K [B, M, R] (M pool heads,
    1 without an attention pool) through fixed matrices `mid` [W, D] (D in M groups) and `out`
    [D, d]. Head (l, h) writes (o_h[i] / r[i]) @ head_out[h] at token i, so its share is

        c[l,h] = concat_m ( (sum_i K[m,i] o_h[i] / r[i]) @ Fh[l,h][:, group m] ) @ out / ||z||

    with Fh[l,h] = head_out[h] @ mid folded once per model ([dh, D]; for M = 1, `out` is folded
    in too). Per source token j, o_h[i] = sum_j A[h,i,j] v_j gives the weight
    w[m,h,j] = sum_i K[m,i] A[h,i,j] / r[i] of v_j @ Fh[l,h]. Nothing of size T x T x W exists.

    `flat(images)` is the computation on one batch, returning the Decomposition's tensors as a
    tuple in the order `self.outputs` (a subsequence of OUTPUTS): it is what the ONNX exporter
    traces, so torch and ONNX share one definition. `forward` adds the micro-batching and
    wraps the tensors into a Decomposition.
    """

    def __init__(self, visual: nn.Module, layers: Sequence[int], *, tokens: bool = False,
                 components: bool = False, micro_batch: Optional[int] = None, traceable: bool = False):
        super().__init__()
        from models.towers import tower as adapt
        self.visual = visual
        self.tower = adapt(visual)
        blocks = self.tower.blocks
        self.layers = sorted(set(int(l) for l in layers))
        if components and self.layers != list(range(len(blocks))):
            raise ValueError(f"components=True splits every layer: pass layers='all' (got {self.layers})")
        self.tokens = bool(tokens)
        self.components = bool(components)
        self.traceable = bool(traceable)
        readout = self.tower.readout
        gh, gw = self.tower.grid
        if micro_batch is None:
            micro_batch = cpu_micro_batch(self.tower.prefix + gh * gw, max(self.tower.mlp_width, self.tower.width))
        self.micro_batch = int(micro_batch)
        self.outputs = OUTPUTS[:3] + (("head_tokens",) if self.tokens else ()) \
            + (OUTPUTS[4:7] if self.components else ()) + (("pool_mlp",) if readout.pool_mlp else ())
        self.n_heads = self.tower.heads
        self.d_head = self.tower.head_dim
        self.groups = readout.groups
        p = next(visual.parameters())
        self.cdtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            mid = readout.mid().to(self.cdtype)                                   # [W, D]
            out = readout.out()
            if out is not None and self.groups == 1:                              # fold `out` in
                mid, out = mid @ out.to(self.cdtype), None
            self.register_buffer("mid", mid, persistent=False)
            self.register_buffer("out", out.to(self.cdtype) if out is not None else None, persistent=False)
            folds = [blocks[l].head_out.to(self.cdtype) @ mid for l in self.layers]    # L' x [H, dh, D]
            self.register_buffer("Fh", torch.stack(folds), persistent=False)      # [L', H, dh, D]

    @classmethod
    def for_model(cls, lm, layers: LayerSpec = "last4", *, tokens: bool = False,
                  components: bool = False) -> "Decomposer":
        """The Decomposer of a LoadedModel for one (layers, mode), built once and cached on it."""
        resolved = resolve_layers(layers, lm.layers)
        key = ("decomposer", tuple(resolved), bool(tokens), bool(components))
        if key not in lm._cache:
            lm._cache[key] = cls(lm.visual, resolved, tokens=tokens, components=components).to(lm.device).eval()
        return lm._cache[key]

    def forward(self, images: torch.Tensor) -> Decomposition:
        """Preprocessed images [B, 3, S, S] -> Decomposition (CPU: in micro-batches, concatenated)."""
        p = next(self.visual.parameters())
        images = images.to(p.device, p.dtype)
        step = self.micro_batch if self.micro_batch and p.device.type == "cpu" else max(len(images), 1)
        parts = [self.flat(images[sl]) for sl in micro_batches(len(images), step)]
        tensors = [torch.cat(t) for t in zip(*parts)] if len(parts) > 1 else parts[0]
        return Decomposition(layers=list(self.layers), **dict(zip(self.outputs, tensors)))

    # ------------------------------------------------------------------ the readout's linear map
    def _lin(self, K: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """What summands u [B, R, W] (or [B, n, R, W]) add to the readout's linear part: [B, d] (or [B, n, d])."""
        y = torch.einsum("bmr,b...rw->b...mw", K, u)                          # [B, (n,) M, W]
        if self.out is None:
            return y[..., 0, :] @ self.mid
        W, M = self.mid.shape[0], self.groups
        g = torch.einsum("b...mw,wmg->b...mg", y, self.mid.view(W, M, -1))   # [B, (n,) M, D/M]
        return g.flatten(-2) @ self.out

    def _heads(self, K: torch.Tensor, o: torch.Tensor, F_l: torch.Tensor) -> torch.Tensor:
        """One analysed layer's c[l,h] (before / ||z||): K [B, M, R], o [B, R, H, dh] (divided by
        r), F_l [H, dh, D] -> [B, H, d]."""
        y = torch.einsum("bmr,brhk->bmhk", K, o)                              # [B, M, H, dh]
        if self.out is None:
            return torch.einsum("bhk,hkd->bhd", y[:, 0], F_l)
        H, dh, D = F_l.shape
        g = torch.einsum("bmhk,hkmg->bhmg", y, F_l.view(H, dh, self.groups, -1))   # [B, H, M, D/M]
        return g.flatten(-2) @ self.out

    def _tokens(self, K: torch.Tensor, A: torch.Tensor, v: torch.Tensor, F_l: torch.Tensor) -> torch.Tensor:
        """One analysed layer's c[l,h,j] (before / ||z||): K [B, M, R], A [B, H, R, T] (rows divided
        by r), v [B, T, H, dh], F_l [H, dh, D] -> [B, H, T, d]."""
        w = torch.einsum("bmr,bhrt->bhtm", K, A)                              # [B, H, T, M] source weights
        if self.out is None:
            return torch.einsum("bthk,hkd->bhtd", v * w.permute(0, 2, 1, 3), F_l)   # M = 1
        H, dh, D = F_l.shape
        P = torch.einsum("bthk,hkD->bhtD", v, F_l)                            # [B, H, T, D]
        P = P.view(*P.shape[:3], self.groups, -1) * w[..., None]              # [B, H, T, M, D/M]
        return P.flatten(-2) @ self.out

    # ------------------------------------------------------------------ one batch
    def flat(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One batch [B, 3, S, S] -> the Decomposition's tensors in the order `self.outputs`:
        embedding [B, d], head_cls [B, L', H, d], rest [B, d], then head_tokens [B, L', H, T, d]
        (tokens), then mlp [B, L, d], attn_bias [B, L, d], embedding_term [B, d] (components),
        then pool_mlp [B, d] (towers whose attention pool ends in an MLP)."""
        cd = self.cdtype
        tower = self.tower
        x, ctx = tower.embed(images)                              # [B, T, W]
        B, T, W = x.shape
        R = tower.readout.rows or T                               # rows the readout reads
        x0 = x[:, :R].to(cd)                                      # the embedding term, [B, R, W]
        rest = x0.clone()                                         # residual summands outside the heads (added in place)
        bias_sum = torch.zeros(W, dtype=cd, device=x.device)      # the analysed layers' out-proj biases, [W]
        os_, vs, As, mlps, biases = [], [], [], [], []
        j = 0
        last = len(tower.blocks) - 1
        start = None                                              # x's read rows where a run of fused blocks began
        for l, blk in enumerate(tower.blocks):
            analysed = j < len(self.layers) and self.layers[j] == l
            rows = tower.readout.rows if l == last else None      # the last block: the read rows only
            if not (analysed or self.traceable or rows):          # the tower's own (fused) block
                start = x[:, :R] if start is None else start
                x = blk.forward(x, ctx)
                continue
            if start is not None:                                 # a run of fused blocks adds x_end - x_start
                rest += (x[:, :R] - start).to(cd)
                start = None
            q, k, v = blk.qkv(x, ctx, rows)                       # [B, S, H, dh], [B, T, H, dh] x 2
            A = None
            if rows or (analysed and self.tokens and R == T):     # every query row is read: explicit weights
                A = _weights(q, k, blk.scale)                     # [B, H, S, T]
                o = torch.einsum("bhst,bthk->bshk", A, v)         # [B, S, H, dh]
            else:
                o = _attend(q, k, v, blk.heads, blk.scale)        # [B, S, H, dh], fused
                if analysed and self.tokens:
                    A = _weights(q[:, :R], k, blk.scale)          # [B, H, R, T]
            delta, r, bias = blk.attn_out(o)                      # [B, S, W], [B, S, 1] | None, [W] | [B, S, W]
            xs = x if rows is None else x[:, :rows]
            x_attn = xs + delta
            mlp = blk.mlp(x_attn)                                 # [B, S, W]
            if analysed:
                rest += mlp[:, :R].to(cd)
                if bias.dim() == 3:                               # per token (a norm after attention)
                    rest += bias[:, :R].to(cd)
                else:                                             # one vector: summed, added once at the end
                    bias_sum = bias_sum + bias.to(cd)
                o_r = o[:, :R].to(cd)
                if r is not None:
                    o_r = o_r / r[:, :R, :, None].to(cd)          # head h writes (o_h / r) @ head_out[h]
                os_.append(o_r)
                if self.tokens:
                    A = A.to(cd)
                    As.append(A / r[:, None, :R].to(cd) if r is not None else A)
                    vs.append(v.to(cd))
                if self.components:
                    mlps.append(mlp[:, :R].to(cd))
                    biases.append((bias[:, :R] if bias.dim() == 3 else bias.expand(B, R, W)).to(cd))
                j += 1
            else:
                rest += (x_attn[:, :R] + mlp[:, :R] - xs[:, :R]).to(cd)
            x = x_attn + mlp
        if start is not None:
            rest += (x[:, :R] - start).to(cd)
        rest += bias_sum
        read = tower.readout.read(x[:, :R])
        K = read.weights.to(cd)                                   # [B, M, R]
        z = read.z.to(cd)                                         # [B, d]
        znorm = z.norm(dim=-1, keepdim=True)                      # [B, 1]
        embedding = z / znorm
        const = read.const.to(cd)                                 # [B, d]
        pool_mlp = read.pool_mlp.to(cd) if read.pool_mlp is not None else None
        head_cls = torch.stack([self._heads(K, o, self.Fh[i]) for i, o in enumerate(os_)], 1) / znorm[:, :, None, None]
        rest = self._lin(K, rest) + const
        if pool_mlp is not None:
            rest = rest + pool_mlp
        out = (embedding, head_cls, rest / znorm)
        if self.tokens:
            out += (torch.stack([self._tokens(K, A, v, self.Fh[i]) for i, (A, v) in enumerate(zip(As, vs))], 1)
                    / znorm[:, :, None, None, None],)
        if self.components:
            mlp = self._lin(K, torch.stack(mlps, 1)) / znorm[:, :, None]               # [B, L, d]
            bias = self._lin(K, torch.stack(biases, 1)) / znorm[:, :, None]            # [B, L, d]
            embedding_term = (self._lin(K, x0) + const) / znorm                        # [B, d]
            out += (mlp, bias, embedding_term)
        if "pool_mlp" in self.outputs:
            out += (pool_mlp / znorm,)
        return out


@torch.no_grad()
def decompose(lm, images: torch.Tensor, layers: LayerSpec = "last4", *, tokens: bool = False,
              components: bool = False) -> Decomposition:
    """Decompose preprocessed images [B, 3, S, S] of a LoadedModel (MATH.md §1; §2 with components).

    layers: 'auto' | 'last4' | 'all' | 'lastN' | '8,9' | [8, 9] (see resolve_layers); tokens: add
    head_tokens; components: add mlp, attn_bias, embedding_term (needs layers='all').
    Runs the model's cached Decomposer for that (layers, mode).
    """
    return Decomposer.for_model(lm, layers, tokens=tokens, components=components)(images)
