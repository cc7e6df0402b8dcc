"""The exact direct decomposition of a CLIP-ViT image embedding (MATH.md §1), fast form.

For the final LayerNorm `ln_post(r) = g * (r - mean_c r) / s + beta` and projection P, every
residual summand u of the class token contributes `(u @ C) / (s * ||z||)` to the unit
embedding, with C = diag(g) P - (1/W) 1 (g P)^T  (centering folded in; [W, d]).
A head's summand is `o_h @ W_O^h diag(ls_gamma)`, so per head we fold one matrix

    F[h] = (W_O^h * gamma) @ C                                   # [d_head, d]

and get  c[l,h] = o0_h @ F[h] / (s ||z||)  from the class-query attention output o0_h, and
c[l,h,i] = a_{0,i} v_i @ F[h] / (s ||z||) per source token. Nothing of size T x T x W exists.

Only the class row of the last block reaches the embedding, so that block computes keys and
values for every token but its query, out-projection and MLP for the class token alone
(a ViT-B/16 forward has about 7% fewer FLOPs; `encode_image` does the full last block).

`rest` is accumulated independently of the heads (embedding term, MLP terms, out-proj
biases, the un-analysed layers, beta @ P) so `head_cls.sum + rest == embedding` is a real check.
With components=True the parts of `rest` (MATH.md §2: MLP terms, out-proj biases, the embedding
term) are returned as well; the embedding term is accumulated apart from `rest`, so
`heads + mlp + attn_bias + embedding_term == embedding` is a real check too.

API (one verb, one class, one result):
    decompose(lm, images, layers="last4", *, tokens=False, components=False) -> Decomposition
    Decomposer(visual, layers, *, tokens, components, micro_batch, traceable)   # nn.Module
    Decomposer.for_model(lm, layers, *, tokens, components)   # cached on the LoadedModel
    Decomposition: embedding, head_cls, rest, layers[, head_tokens][, mlp, attn_bias, embedding_term]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

LayerSpec = Union[str, Sequence[int]]
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


AUTO_ALL_LAYERS = 12     # 'auto' analyses every layer of a model this deep or shallower


def resolve_layers(spec: LayerSpec, n_layers: int) -> list[int]:
    """'auto' | 'last4' | 'all' | 'lastN' | '8,9,10,11' | [8, 9] -> sorted unique 0-based layers.

    'auto' (the jobs' default): every layer when the model has at most AUTO_ALL_LAYERS layers
    (the toy zoo, ViT-B), the last 4 above (ViT-L/H/g, where the direct effects concentrate).
    """
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s == "auto":
            s = "all" if n_layers <= AUTO_ALL_LAYERS else "last4"
        if s == "all":
            return list(range(n_layers))
        if s.startswith("last") and s[4:].isdigit():
            n = int(s[4:])
            if not 1 <= n <= n_layers:
                raise ValueError(f"--layers {spec}: the model has {n_layers} layers")
            return list(range(n_layers - n, n_layers))
        try:
            spec = [int(p) for p in s.split(",") if p.strip()]
        except ValueError:
            raise ValueError(f"--layers '{spec}': use auto, last4, all, or comma-separated 0-based indices like 8,9,10,11") from None
    layers = sorted(set(int(i) for i in spec))
    bad = [i for i in layers if not 0 <= i < n_layers]
    if not layers or bad:
        raise ValueError(f"--layers {spec}: layers must be in 0..{n_layers - 1} (0-based)")
    return layers


OUTPUTS = ("embedding", "head_cls", "rest", "head_tokens", "mlp", "attn_bias", "embedding_term")
"""Every tensor a Decomposition can hold, in the one order used to flatten it (ONNX outputs, `Decomposer.flat`)."""


@dataclass
class Decomposition:
    """The decomposition of a batch of B images (MATH.md §1); one type for every mode.

    Always present (`layers` are the analysed layers L', 0-based, sorted):
        embedding [B, d] unit norm; head_cls [B, L', H, d] = c[l,h]; rest [B, d] (everything else);
        head_cls.sum((1, 2)) + rest == embedding.
    tokens=True adds head_tokens [B, L', H, T, d] = c[l,h,i], T = 1 + patches (i = 0: the class
        token); head_tokens.sum(3) == head_cls.
    components=True (every layer analysed) splits `rest` for mean ablation (MATH.md §2):
        mlp [B, L, d] (MLP terms), attn_bias [B, L, d] (out-proj biases), embedding_term [B, d]
        (x_0[0] and beta @ P); head_cls.sum((1, 2)) + mlp.sum(1) + attn_bias.sum(1)
        + embedding_term == embedding.
    """
    embedding: torch.Tensor                         # [B, d]
    head_cls: torch.Tensor                          # [B, L', H, d]
    rest: torch.Tensor                              # [B, d]
    layers: list[int]                               # [L']
    head_tokens: Optional[torch.Tensor] = None      # [B, L', H, T, d]
    mlp: Optional[torch.Tensor] = None              # [B, L, d]
    attn_bias: Optional[torch.Tensor] = None        # [B, L, d]
    embedding_term: Optional[torch.Tensor] = None   # [B, d]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors present, by name, in the order of OUTPUTS."""
        return {k: getattr(self, k) for k in OUTPUTS if getattr(self, k) is not None}

    def numpy(self) -> dict:
        out = {k: v.detach().float().cpu().numpy() for k, v in self.tensors().items()}
        out["layers"] = self.layers
        return out


class _MultiHeadAttention(torch.autograd.Function):
    """Softmax attention over [B, T, W] queries/keys/values with H heads -> [B, T, W].

    torch runs its fused kernel; the ONNX exporter writes onnxruntime's fused contrib op
    `com.microsoft::MultiHeadAttention` (CPU and CUDA providers) instead of a chain of
    MatMul/Softmax/Transpose nodes, so the exported graph is as fused as the eager one.
    """

    @staticmethod
    def forward(ctx, q, k, v, heads: int):
        B, T, W = q.shape
        split = lambda t: t.view(B, T, heads, W // heads).transpose(1, 2)     # [B, H, T, dh]
        return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(B, T, W)

    @staticmethod
    def symbolic(g, q, k, v, heads: int):
        out = g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=heads)
        out.setType(q.type())
        return out


def class_row_attention(q0: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """The class query's softmax attention over all tokens, per head.

    q0: [B, 1, W] (the class token's query), k: [B, T, W] -> a0 [B, H, T] (rows sum to 1)."""
    B, T, W = k.shape
    dh = W // heads
    q = q0.view(B, 1, heads, dh).transpose(1, 2)                                 # [B, H, 1, dh]
    kh = k.view(B, T, heads, dh).transpose(1, 2)                                 # [B, H, T, dh]
    return torch.softmax(q @ kh.transpose(-1, -2) * dh ** -0.5, dim=-1)[:, :, 0]


class Decomposer(nn.Module):
    """Wraps an open_clip VisionTransformer; `dec(images)` returns the Decomposition.

    Every mode is fixed at construction:
      layers      the analysed layers L' (0-based; see resolve_layers);
      tokens      also c[l,h,i] per source token (head_tokens);
      components  also the split of `rest` into MLP, out-proj bias and embedding terms
                  (mean ablation; needs every layer analysed);
      micro_batch images per CPU micro-batch (default: cpu_micro_batch of the model; 0: whole
                  batch); GPUs always take the whole batch;
      traceable   run the un-analysed blocks by hand instead of torch's fused block, so that
                  torch.onnx.export can trace them and their attention becomes onnxruntime's
                  fused op (_MultiHeadAttention); same numbers; what models/onnx.py exports.

    `flat(images)` is the computation on one batch, returning the Decomposition's tensors as a
    tuple in the order `self.outputs` (a subsequence of OUTPUTS): it is what the ONNX exporter
    traces, so torch and ONNX share one definition. `forward` adds the micro-batching and
    wraps the tensors into a Decomposition.
    """

    def __init__(self, visual: nn.Module, layers: Sequence[int], *, tokens: bool = False,
                 components: bool = False, micro_batch: Optional[int] = None, traceable: bool = False):
        super().__init__()
        blocks = visual.transformer.resblocks
        self.visual = visual
        self.layers = sorted(set(int(l) for l in layers))
        if components and self.layers != list(range(len(blocks))):
            raise ValueError(f"components=True splits every layer: pass layers='all' (got {self.layers})")
        self.tokens = bool(tokens)
        self.components = bool(components)
        self.traceable = bool(traceable)
        grid = visual.grid_size
        if micro_batch is None:
            micro_batch = cpu_micro_batch(1 + grid[0] * grid[1], blocks[0].mlp.c_fc.out_features)
        self.micro_batch = int(micro_batch)
        self.outputs = OUTPUTS[:3] + (("head_tokens",) if self.tokens else ()) + (OUTPUTS[4:] if self.components else ())
        attn = blocks[0].attn
        self.n_heads = attn.num_heads
        self.d_head = attn.head_dim
        W = visual.transformer.width
        with torch.no_grad():
            g = visual.ln_post.weight.float()                          # [W]
            P = visual.proj.float()                                    # [W, d]
            gP = g @ P                                                 # [d]
            C = g[:, None] * P - gP[None, :] / W                       # [W, d]
            self.register_buffer("C", C, persistent=False)
            self.register_buffer("betaP", visual.ln_post.bias.float() @ P, persistent=False)  # [d]
            ones = torch.ones(W, device=C.device)
            folds, biases = [], []
            for l in self.layers:
                blk = blocks[l]
                gamma = blk.ls_1.gamma.float() if hasattr(blk.ls_1, "gamma") else ones
                Wo = blk.attn.out_proj.weight.float().T * gamma[None, :]           # [W_in=H*dh, W]
                folds.append((Wo @ C).view(self.n_heads, self.d_head, -1))        # [H, dh, d]
                b = blk.attn.out_proj.bias
                biases.append(b.float() * gamma if b is not None else 0 * ones)
            self.register_buffer("Fh", torch.stack(folds), persistent=False)      # [L', H, dh, d]
            self.register_buffer("bias", torch.stack(biases), persistent=False)   # [L', W]

    @classmethod
    def for_model(cls, lm, layers: LayerSpec = "last4", *, tokens: bool = False,
                  components: bool = False) -> "Decomposer":
        """The Decomposer of a LoadedModel for one (layers, mode), built once and cached on it."""
        resolved = resolve_layers(layers, lm.layers)
        key = ("decomposer", tuple(resolved), bool(tokens), bool(components))
        if key not in lm._cache:
            lm._cache[key] = cls(lm.visual, resolved, tokens=tokens, components=components).to(lm.device).eval()
        return lm._cache[key]

    def _attention(self, blk: nn.Module, x: torch.Tensor, tokens: bool):
        """One attention block by hand. x: [B, T, W] -> (x_new, o0 [B,H,dh], v [B,H,T,dh], a0 [B,H,T] | None)."""
        B, T, W = x.shape
        H, dh = self.n_heads, self.d_head
        h = blk.ln_1(x)
        q, k, v = F.linear(h, blk.attn.in_proj_weight, blk.attn.in_proj_bias).split(W, dim=-1)  # 3 x [B, T, W]
        o = _MultiHeadAttention.apply(q, k, v, H)                              # [B, T, W]
        a0 = self._class_row(q[:, :1], k) if tokens else None
        out = F.linear(o, blk.attn.out_proj.weight, blk.attn.out_proj.bias)
        return x + blk.ls_1(out), o[:, 0].view(B, H, dh), self._heads(v), a0

    def _attention_cls(self, blk: nn.Module, x: torch.Tensor):
        """The last block's attention at the class query only: nothing after it reads other tokens.

        x: [B, T, W] -> (x_cls_new [B, 1, W], o0 [B, H, dh], v [B, H, T, dh], a0 [B, H, T]).
        Keys and values still come from every token; the query, out-proj and MLP run on one row.
        """
        B, T, W = x.shape
        h = blk.ln_1(x)
        w, b = blk.attn.in_proj_weight, blk.attn.in_proj_bias
        q = F.linear(h[:, :1], w[:W], b[:W] if b is not None else None)               # [B, 1, W]
        k, v = F.linear(h, w[W:], b[W:] if b is not None else None).split(W, dim=-1)   # 2 x [B, T, W]
        a0, v = self._class_row(q, k), self._heads(v)                                  # [B, H, T], [B, H, T, dh]
        o0 = (a0[:, :, None] @ v)[:, :, 0]                                              # [B, H, dh]
        out = F.linear(o0.reshape(B, 1, W), blk.attn.out_proj.weight, blk.attn.out_proj.bias)
        return x[:, :1] + blk.ls_1(out), o0, v, a0

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, T, W] -> [B, H, T, dh]."""
        B, T, _ = t.shape
        return t.view(B, T, self.n_heads, self.d_head).transpose(1, 2)

    def _class_row(self, q0: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The class query's attention over all tokens. q0: [B, 1, W], k: [B, T, W] -> a0 [B, H, T]."""
        return class_row_attention(q0, k, self.n_heads)

    def forward(self, images: torch.Tensor) -> Decomposition:
        """Preprocessed images [B, 3, S, S] -> Decomposition (CPU: in micro-batches, concatenated)."""
        p = next(self.visual.parameters())
        images = images.to(p.device, p.dtype)
        step = self.micro_batch if self.micro_batch and p.device.type == "cpu" else max(len(images), 1)
        parts = [self.flat(images[sl]) for sl in micro_batches(len(images), step)]
        tensors = [torch.cat(t) for t in zip(*parts)] if len(parts) > 1 else parts[0]
        return Decomposition(layers=list(self.layers), **dict(zip(self.outputs, tensors)))

    def flat(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One batch [B, 3, S, S] -> the Decomposition's tensors in the order `self.outputs`:
        embedding [B, d], head_cls [B, L', H, d], rest [B, d], then head_tokens [B, L', H, T, d]
        (tokens), then mlp [B, L, d], attn_bias [B, L, d], embedding_term [B, d] (components)."""
        vis = self.visual
        x = vis._embeds(images)                                   # [B, T, W]
        x0 = x[:, 0].float()                                      # the embedding term, [B, W]
        rest = x0                                                 # residual summands outside the heads, [B, W]
        o0s, vs, a0s, mlps = [], [], [], []
        j = 0
        last = len(vis.transformer.resblocks) - 1
        for l, blk in enumerate(vis.transformer.resblocks):
            analysed = j < len(self.layers) and self.layers[j] == l
            if l == last:      # nothing reads the other rows of the last block: x -> [B, 1, W]
                x_attn, o0, v, a0 = self._attention_cls(blk, x)
            elif analysed or self.traceable:
                x_attn, o0, v, a0 = self._attention(blk, x, self.tokens and analysed)
            else:              # torch's fused block
                x_new = blk(x)
                rest = rest + (x_new[:, 0] - x[:, 0]).float()
                x = x_new
                continue
            mlp = blk.ls_2(blk.mlp(blk.ln_2(x_attn)))             # [B, T or 1, W]
            if analysed:
                rest = rest + mlp[:, 0].float() + self.bias[j]
                if self.components:
                    mlps.append(mlp[:, 0].float())
                o0s.append(o0)
                vs.append(v)
                a0s.append(a0)
                j += 1
            else:
                rest = rest + (x_attn[:, 0] + mlp[:, 0] - x[:, 0]).float()
            x = x_attn + mlp
        cls = x[:, 0].float()                                     # [B, W]
        ln = vis.ln_post
        s = torch.sqrt(cls.var(dim=-1, unbiased=False, keepdim=True) + ln.eps)   # [B, 1]
        z = cls @ self.C / s + self.betaP                         # [B, d] == ln_post(cls) @ proj
        znorm = z.norm(dim=-1, keepdim=True)                      # [B, 1]
        scale = s * znorm                                         # [B, 1]
        embedding = z / znorm
        o0 = torch.stack(o0s, 1).float()                          # [B, L', H, dh]
        head_cls = torch.einsum("blhk,lhkd->blhd", o0, self.Fh) / scale[:, :, None, None]
        rest = (rest @ self.C) / scale + self.betaP / znorm
        out = (embedding, head_cls, rest)
        if self.tokens:
            v = torch.stack(vs, 1).float()                        # [B, L', H, T, dh]
            a0 = torch.stack(a0s, 1).float()                      # [B, L', H, T]
            weighted = v * (a0 / scale[:, :, None, None])[..., None]   # a_{0,i} v_i / (s ||z||), small: [B, L', H, T, dh]
            out += (torch.einsum("blhtk,lhkd->blhtd", weighted, self.Fh),)
        if self.components:
            mlp = torch.stack(mlps, 1) @ self.C / scale[:, :, None]          # [B, L, d]
            bias = (self.bias @ self.C)[None] / scale[:, :, None]           # [B, L, d]
            embedding_term = x0 @ self.C / scale + self.betaP / znorm       # [B, d], accumulated apart from rest
            out += (mlp, bias, embedding_term)
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
