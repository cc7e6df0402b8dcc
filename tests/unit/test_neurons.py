"""The second-order lens (MATH.md §10, models/neurons.py) against literal implementations: the
materialised [B, T, N, W] form (float64, 1e-10) and the source identity of a head's direct term
(float32, 1e-5), on tiny configs with perturbed LayerNorms, biases and layer scales."""
from __future__ import annotations

import math

import pytest
import torch

from models import decompose, load_model
from models.neurons import SecondOrderLens, second_order
from tests.model_fixtures import perturb, register_tiny_configs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return register_tiny_configs(tmp_path_factory.mktemp("configs"))


def _model(arch, seed=0, double=False):
    lm = load_model(arch, random_init=True, seed=seed)
    perturb(lm.model, seed)
    if double:
        lm.model.double()
    return lm


def _images(lm, n=2, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, lm.image_size, lm.image_size, generator=g).to(dtype)


def _qkv(blk, h):
    """Per-head queries, keys, values of one block: 3 x [B, T, H, dh]."""
    B, T, W = h.shape
    H = blk.attn.num_heads
    q, k, v = (h @ blk.attn.in_proj_weight.T + blk.attn.in_proj_bias).chunk(3, dim=-1)
    return (t.view(B, T, H, W // H) for t in (q, k, v))


def _gamma(ls, W, like):
    return ls.gamma if hasattr(ls, "gamma") else torch.ones(W, dtype=like.dtype)


@torch.no_grad()
def literal_forward(lm, x):
    """Block by block with explicit attention matrices: per block the residual entering it
    (xs[l], [B, T, W]), its attention A [B, H, T, T], the post-activation values of its MLP
    [B, T, N], the residual after attention; and the final s, ||z||."""
    vis = lm.visual
    h = vis._embeds(x)
    rec = []
    for blk in vis.transformer.resblocks:
        B, T, W = h.shape
        q, k, v = _qkv(blk, blk.ln_1(h))
        A = torch.softmax(torch.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(W // blk.attn.num_heads), -1)
        o = torch.einsum("bhqk,bkhe->bqhe", A, v).reshape(B, T, W)
        mid = h + (o @ blk.attn.out_proj.weight.T + blk.attn.out_proj.bias) * _gamma(blk.ls_1, W, h)
        act = blk.mlp.gelu(blk.mlp.c_fc(blk.ln_2(mid)))
        rec.append(dict(x=h, A=A, v=v, act=act))
        h = mid + blk.ls_2(blk.mlp.c_proj(act))
    cls = h[:, 0]
    s = torch.sqrt(cls.var(-1, unbiased=False) + vis.ln_post.eps)
    zn = (vis.ln_post(cls) @ vis.proj).norm(dim=-1)
    return rec, s, zn


def _contrib(vis, u, s, zn):
    """contrib(u) = (g * (u - mean_c u) / s) @ P / ||z|| for u [B, ..., W] -> [B, ..., d]."""
    shape = (-1,) + (1,) * (u.dim() - 1)
    return (vis.ln_post.weight * (u - u.mean(-1, keepdim=True)) / s.view(shape)) @ vis.proj / zn.view(shape)


@torch.no_grad()
def materialised_phi(lm, x, layer):
    """The research code's form: per later head a [B, T, N, W] tensor of every neuron's write at
    every token, through ln_1 (centre, gain, scale), W_V, the class-row attention, W_O, ln_post and
    P. Returns phi [B, N, d] summed over the later heads, and per head [K, B, N, d]."""
    vis = lm.visual
    rec, s, zn = literal_forward(lm, x)
    blocks = vis.transformer.resblocks
    blk = blocks[layer]
    W = rec[0]["x"].shape[-1]
    w = blk.mlp.c_proj.weight.T * _gamma(blk.ls_2, W, x)                      # [N, W]
    writes = rec[layer]["act"][..., None] * w                                 # [B, T, N, W]
    per_head = []
    for lp in range(layer + 1, len(blocks)):
        b2 = blocks[lp]
        H = b2.attn.num_heads
        dh = W // H
        xin = rec[lp]["x"]
        sigma = torch.sqrt(xin.var(-1, unbiased=False) + b2.ln_1.eps)         # [B, T]
        normed = b2.ln_1.weight * (writes - writes.mean(-1, keepdim=True)) / sigma[:, :, None, None]
        Wv = b2.attn.in_proj_weight[2 * W:]
        for h in range(H):
            vh = normed @ Wv[h * dh:(h + 1) * dh].T                            # [B, T, N, dh]
            o = torch.einsum("bt,btne->bne", rec[lp]["A"][:, h, 0], vh)      # [B, N, dh]
            out = (o @ b2.attn.out_proj.weight[:, h * dh:(h + 1) * dh].T) * _gamma(b2.ls_1, W, x)
            per_head.append(_contrib(vis, out, s, zn))                        # [B, N, d]
    per_head = torch.stack(per_head)
    return per_head.sum(0), per_head


@pytest.mark.parametrize("arch, layer", [("atlas-test-tiny", 0), ("atlas-test-ls", 1), ("atlas-test-noln", 0)])
def test_cheap_form_equals_the_materialised_form(tiny, arch, layer):
    lm = _model(arch, seed=2, double=True)
    x = _images(lm, dtype=torch.float64)
    so = second_order(lm, x, layer, phi=True)
    ref, per_head = materialised_phi(lm, x, layer)
    K = (lm.layers - 1 - layer) * lm.heads
    assert so.alpha.shape == (2, so.alpha.shape[1], K) and so.alpha.dtype == torch.float64
    assert so.heads == [(lp, h) for lp in range(layer + 1, lm.layers) for h in range(lm.heads)]
    assert (so.phi - ref).abs().max() < 1e-10, (so.phi - ref).abs().max()
    # per head too: alpha[..., k] u[:, k] is the materialised term of head k alone
    lens = SecondOrderLens(lm.visual, [layer])
    U = lens.head_vectors(layer)                                              # [N, K, d]
    for k in range(K):
        assert (so.alpha[:, :, k, None] * U[None, :, k] - per_head[k]).abs().max() < 1e-10, k
    assert ref.norm(dim=-1).max() > 1e-3                                      # not a zero identity


@pytest.mark.parametrize("arch, target", [("atlas-test-tiny", (2, 1)), ("atlas-test-ls", (1, 3)),
                                          ("atlas-test-ls", (2, 0))])
def test_source_identity_of_a_later_heads_direct_term(tiny, arch, target):
    """Head (l', h)'s direct term = its reading of the embedding, of every earlier head, of every
    earlier neuron (the lens: sum_n alpha[n, k] u[n, k]) and of the biases."""
    lp, h = target
    lm = _model(arch, seed=4)
    x = _images(lm, n=3)
    vis = lm.visual
    blocks = vis.transformer.resblocks
    rec, s, zn = literal_forward(lm, x)
    W = rec[0]["x"].shape[-1]
    blk = blocks[lp]
    H = blk.attn.num_heads
    dh = W // H
    sigma = torch.sqrt(rec[lp]["x"].var(-1, unbiased=False) + blk.ln_1.eps)  # [B, T]
    A0 = rec[lp]["A"][:, h, 0]                                                 # [B, T]
    Wv = blk.attn.in_proj_weight[2 * W:][h * dh:(h + 1) * dh]                 # [dh, W]
    Wo = blk.attn.out_proj.weight[:, h * dh:(h + 1) * dh]                     # [W, dh]
    g1 = _gamma(blk.ls_1, W, x)

    def through(vh):                                                           # [B, dh] -> [B, d]
        return _contrib(vis, (vh @ Wo.T) * g1, s, zn)

    def read(u):                                                               # a summand of x [B, T, W] -> [B, d]
        normed = blk.ln_1.weight * (u - u.mean(-1, keepdim=True)) / sigma[..., None]
        return through(torch.einsum("bt,bte->be", A0, normed @ Wv.T))

    with torch.no_grad():
        parts = {"embedding": read(vis._embeds(x))}
        heads = torch.zeros_like(parts["embedding"])
        biases = through((blk.ln_1.bias @ Wv.T + blk.attn.in_proj_bias[2 * W:][h * dh:(h + 1) * dh]).expand(len(x), -1))
        for l in range(lp):
            b = blocks[l]
            gl = _gamma(b.ls_1, W, x)
            for hh in range(H):
                o = torch.einsum("bqk,bke->bqe", rec[l]["A"][:, hh], rec[l]["v"][:, :, hh])      # [B, T, dh]
                heads = heads + read((o @ b.attn.out_proj.weight[:, hh * dh:(hh + 1) * dh].T) * gl)
            ones = torch.ones_like(rec[0]["x"])
            biases = biases + read(ones * b.attn.out_proj.bias * gl) + read(ones * b.mlp.c_proj.bias * _gamma(b.ls_2, W, x))
        parts["heads"], parts["biases"] = heads, biases
        lens = SecondOrderLens(vis, list(range(lp)))
        tr = lens.trace(x)
        neurons = torch.zeros_like(heads)
        for l in range(lp):
            k = lens.heads(l).index((lp, h))
            neurons = neurons + lens.alpha(tr, l)[:, :, k] @ lens.head_vectors(l)[:, k]
        parts["neurons"] = neurons
    dec = decompose(lm, x, "all")
    target_term = dec.head_cls[:, lp, h]
    total = sum(parts.values())
    assert (total - target_term).abs().max() < 1e-5, (total - target_term).abs().max()
    assert parts["neurons"].norm(dim=-1).min() > 1e-3                         # the neurons carry a real share


def test_lens_relatives_agree_with_phi(tiny):
    """gram gives ||phi||, layer_effect the sum over neurons, token_alpha sums to alpha, writes_along is u . t,
    and the trace's embedding is the model's."""
    lm = _model("atlas-test-ls", seed=7, double=True)
    x = _images(lm, n=3, dtype=torch.float64)
    lens = SecondOrderLens(lm.visual, [0, 1])
    tr = lens.trace(x)
    with torch.no_grad():
        emb = torch.nn.functional.normalize(lm.model.encode_image(x), dim=-1)
    assert (tr.embedding - emb).abs().max() < 1e-12
    for layer in (0, 1):
        a = lens.alpha(tr, layer)
        phi = lens.phi(a, layer)                                              # [B, N, d]
        G = lens.gram(layer, chunk=7)
        norms = torch.einsum("bnk,nkj,bnj->bn", a, G, a).sqrt()
        assert (norms - phi.norm(dim=-1)).abs().max() < 1e-12
        assert (lens.layer_effect(a, layer) - phi.sum(1)).abs().max() < 1e-12
        ta = lens.token_alpha(tr, layer, 5)
        assert ta.shape == (3, len(lens.heads(layer)), tr.acts[layer].shape[1])
        assert (ta.sum(-1) - a[:, 5]).abs().max() < 1e-12
        t = torch.randn(lm.embed_dim, dtype=torch.float64)
        U = lens.head_vectors(layer)
        for k, head in enumerate(lens.heads(layer)):
            assert (lens.writes_along(layer, head, t) - U[:, k] @ t).abs().max() < 1e-12
    # phi of a subset of neurons is the same rows
    a = lens.alpha(tr, 1)
    assert (lens.phi(a[:, 3:9], 1, slice(3, 9)) - lens.phi(a, 1)[:, 3:9]).abs().max() < 1e-12


def test_the_last_layer_and_bad_layers_are_refused(tiny):
    lm = _model("atlas-test-tiny")
    with pytest.raises(ValueError, match=r"MLP layer\(s\) \[2\]: the second-order lens needs a later attention "
                                         r"layer, so use layers 0\.\.1 \(0-based\) of this 3-layer tower"):
        second_order(lm, _images(lm), 2)
    with pytest.raises(ValueError, match="choose at least one MLP layer"):
        SecondOrderLens(lm.visual, [])


def test_token_effect_and_head_shares_add_up(tiny):
    """token_effect sums over tokens to phi . t; head_shares are alpha[:, :, k] (u . t) per neuron."""
    lm = _model("atlas-test-tiny", seed=9, double=True)
    x = _images(lm, n=2, dtype=torch.float64)
    lens = SecondOrderLens(lm.visual, [0, 1])
    tr = lens.trace(x)
    t = torch.nn.functional.normalize(torch.randn(lm.embed_dim, dtype=torch.float64), dim=0)
    phi = lens.phi(lens.alpha(tr, 0), 0)                                       # [B, N, d]
    te = lens.token_effect(tr, 0, 4, t)
    assert te.shape == (2, 1 + lm.grid[0] * lm.grid[1])
    assert (te.sum(1) - phi[:, 4] @ t).abs().max() < 1e-12
    shares = lens.head_shares(tr, (2, 1), t)
    assert set(shares) == {0, 1}
    for l, sh in shares.items():
        k = lens.heads(l).index((2, 1))
        ref = lens.alpha(tr, l)[:, :, k] * (lens.head_vectors(l)[:, k] @ t)
        assert (sh - ref).abs().max() < 1e-12
    assert set(lens.head_shares(tr, (1, 0), t)) == {0}
