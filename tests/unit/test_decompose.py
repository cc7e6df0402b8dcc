"""The exact decomposition (MATH.md §1) and its component split for ablation (§2) against an
independent slow reference, on several configs."""
from __future__ import annotations

import math

import pytest
import torch

from models import Decomposer, decompose, load_model, resolve_layers
from tests.model_fixtures import perturb, register_tiny_configs

ARCHS = ["atlas-test-tiny", "atlas-test-ls", "atlas-test-noln", "ViT-S-32", "ViT-B-32-quickgelu"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return register_tiny_configs(tmp_path_factory.mktemp("configs"))


def _model(arch, seed=0):
    lm = load_model(arch, random_init=True, seed=seed)
    perturb(lm.model, seed)
    return lm


def _images(lm, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, lm.image_size, lm.image_size, generator=g)


@torch.no_grad()
def slow_reference(lm, x):
    """Block-by-block recomputation from the module weights with explicit attention matrices.

    Returns embedding [B, d] and per-head class-token contributions [B, L, H, d] computed
    literally: contrib(u) = (g * (u - mean_c u) / s) @ P / ||z||.
    """
    vis = lm.visual
    x = vis._embeds(x)
    B, T, W = x.shape
    per_head_resid = []                                           # L x [B, H, W]
    for blk in vis.transformer.resblocks:
        attn = blk.attn
        H = attn.num_heads
        dh = W // H
        h = blk.ln_1(x)
        Wq, Wk, Wv = attn.in_proj_weight.chunk(3)
        bq, bk, bv = attn.in_proj_bias.chunk(3)
        q = (h @ Wq.T + bq).view(B, T, H, dh)
        k = (h @ Wk.T + bk).view(B, T, H, dh)
        v = (h @ Wv.T + bv).view(B, T, H, dh)
        A = torch.softmax(torch.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(dh), dim=-1)   # [B, H, T, T]
        o = torch.einsum("bhqk,bkhe->bqhe", A, v)                 # [B, T, H, dh]
        gamma = blk.ls_1.gamma if hasattr(blk.ls_1, "gamma") else torch.ones(W)
        heads = []
        for hh in range(H):
            Wo_h = attn.out_proj.weight[:, hh * dh:(hh + 1) * dh]  # [W, dh]
            heads.append((o[:, :, hh] @ Wo_h.T) * gamma)           # [B, T, W]
        out = sum(heads) + attn.out_proj.bias * gamma
        per_head_resid.append(torch.stack([hd[:, 0] for hd in heads], 1))
        x = x + out
        x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
    cls = x[:, 0]
    z = vis.ln_post(cls) @ vis.proj
    zn = z.norm(dim=-1, keepdim=True)
    g, eps = vis.ln_post.weight, vis.ln_post.eps
    s = torch.sqrt(cls.var(-1, unbiased=False, keepdim=True) + eps)
    contribs = []
    for u in per_head_resid:                                      # [B, H, W]
        centred = u - u.mean(-1, keepdim=True)
        contribs.append((g * centred / s[:, None]) @ vis.proj / zn[:, None])
    return z / zn, torch.stack(contribs, 1)


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_and_slow_reference(tiny, arch):
    lm = _model(arch)
    x = _images(lm)
    dec = decompose(lm, x, "all")
    emb_ref, heads_ref = slow_reference(lm, x)
    with torch.no_grad():
        emb_model = torch.nn.functional.normalize(lm.model.encode_image(x), dim=-1)
    assert torch.allclose(dec.embedding, emb_model, atol=1e-5)
    assert torch.allclose(dec.embedding, emb_ref, atol=1e-5)
    assert torch.allclose(dec.head_cls, heads_ref, atol=1e-5), (dec.head_cls - heads_ref).abs().max()
    identity = (dec.head_cls.sum((1, 2)) + dec.rest - dec.embedding).norm(dim=-1)
    assert identity.max() < 1e-5
    # the heads must carry a real share of the embedding (a zero decomposition would pass the identity)
    assert dec.head_cls.sum((1, 2)).norm(dim=-1).min() > 1e-3


def test_identity_holds_for_subsets_of_layers(tiny):
    lm = _model("atlas-test-ls", seed=3)
    x = _images(lm)
    full = decompose(lm, x, "all")
    sub = decompose(lm, x, [0, 2])
    assert sub.layers == [0, 2] and sub.head_cls.shape == (3, 2, lm.heads, lm.embed_dim)
    assert torch.allclose(sub.head_cls, full.head_cls[:, [0, 2]], atol=1e-6)
    assert (sub.head_cls.sum((1, 2)) + sub.rest - sub.embedding).abs().max() < 1e-5
    # the rest of a subset differs from the full rest by exactly the missing layer's heads
    assert torch.allclose(sub.rest, full.rest + full.head_cls[:, 1].sum(1), atol=1e-5)
    # the last block runs on the class row only; leaving it out of the analysis moves its heads into rest
    early = decompose(lm, x, [0, 1])
    assert torch.allclose(early.head_cls, full.head_cls[:, :2], atol=1e-6)
    assert torch.allclose(early.embedding, full.embedding, atol=1e-6)
    assert torch.allclose(early.rest, full.rest + full.head_cls[:, 2].sum(1), atol=1e-5)


@pytest.mark.parametrize("arch", ["atlas-test-tiny", "atlas-test-noln"])
def test_token_contributions_sum_to_heads(tiny, arch):
    lm = _model(arch, seed=5)
    x = _images(lm, n=2)
    dec = decompose(lm, x, "all", tokens=True)
    T = 1 + lm.grid[0] * lm.grid[1]
    assert dec.head_tokens.shape == (2, lm.layers, lm.heads, T, lm.embed_dim)
    assert torch.allclose(dec.head_tokens.sum(3), dec.head_cls, atol=1e-6)
    # not all the mass sits on one token
    share = dec.head_tokens.norm(dim=-1)
    assert (share[:, :, :, 1:].sum(-1) > 0).all()


@pytest.mark.parametrize("layer, seed, n", [(1, 2, 1), (2, 4, 2)])   # a middle block; the class-row-only last block
def test_tokens_against_explicit_attention(tiny, layer, seed, n):
    """c[l,h,i] = a_{0,i} v_i W_O^h ... checked literally for every head of one block."""
    lm = _model("atlas-test-tiny", seed=seed)
    x = _images(lm, n=n)
    dec = decompose(lm, x, [layer], tokens=True)
    vis = lm.visual
    blocks = vis.transformer.resblocks
    with torch.no_grad():
        h = vis._embeds(x)
        for blk in blocks[:layer]:
            h = blk(h)
        blk = blocks[layer]
        W = h.shape[-1]
        H, dh = lm.heads, W // lm.heads
        q, k, v = (blk.ln_1(h) @ blk.attn.in_proj_weight.T + blk.attn.in_proj_bias).chunk(3, dim=-1)   # [B, T, W]
        A = torch.softmax(torch.einsum("bqhe,bkhe->bhqk", q.view(n, -1, H, dh), k.view(n, -1, H, dh)) / math.sqrt(dh), -1)
        out = blk(h)
        for later in blocks[layer + 1:]:
            out = later(out)
        cls = out[:, 0]                                                             # [B, W]
        s = torch.sqrt(cls.var(-1, unbiased=False, keepdim=True) + vis.ln_post.eps)
        zn = (vis.ln_post(cls) @ vis.proj).norm(dim=-1, keepdim=True)
        for head in range(H):
            sl = slice(head * dh, (head + 1) * dh)
            u = A[:, head, 0, :, None] * (v[:, :, sl] @ blk.attn.out_proj.weight[:, sl].T)   # [B, T, W]
            ref = (vis.ln_post.weight * (u - u.mean(-1, keepdim=True)) / s[:, None]) @ vis.proj / zn[:, None]
            assert torch.allclose(dec.head_tokens[:, 0, head], ref, atol=1e-6), head


@torch.no_grad()
def slow_components(lm, x):
    """Literal contrib(u) of every non-head summand of the class-token residual:
    mlp [B, L, d], attn_bias [B, L, d], embedding_term [B, d] (x_0[0] plus beta @ P / ||z||)."""
    vis = lm.visual
    h = vis._embeds(x)
    x0 = h[:, 0]
    mlps, biases = [], []
    for blk in vis.transformer.resblocks:
        h = h + blk.ls_1(blk.attn(blk.ln_1(h), blk.ln_1(h), blk.ln_1(h), need_weights=False)[0])
        m = blk.ls_2(blk.mlp(blk.ln_2(h)))
        mlps.append(m[:, 0])
        biases.append(blk.ls_1(blk.attn.out_proj.bias.expand_as(x0)))
        h = h + m
    cls = h[:, 0]
    zn = (vis.ln_post(cls) @ vis.proj).norm(dim=-1, keepdim=True)
    s = torch.sqrt(cls.var(-1, unbiased=False, keepdim=True) + vis.ln_post.eps)

    def contrib(u):                                               # [B, ..., W] -> [B, ..., d]
        return (vis.ln_post.weight * (u - u.mean(-1, keepdim=True)) / s.view(-1, *[1] * (u.dim() - 1))) @ vis.proj \
            / zn.view(-1, *[1] * (u.dim() - 1))
    return (contrib(torch.stack(mlps, 1)), contrib(torch.stack(biases, 1)),
            contrib(x0) + vis.ln_post.bias @ vis.proj / zn)


@pytest.mark.parametrize("arch", ["atlas-test-tiny", "atlas-test-ls"])
def test_component_split_sums_to_the_embedding_and_matches_the_literal_terms(tiny, arch):
    lm = _model(arch, seed=6)
    x = _images(lm)
    dec = decompose(lm, x, "all", components=True)
    L, d = lm.layers, lm.embed_dim
    assert dec.mlp.shape == dec.attn_bias.shape == (3, L, d) and dec.embedding_term.shape == (3, d)
    total = dec.head_cls.sum((1, 2)) + dec.mlp.sum(1) + dec.attn_bias.sum(1) + dec.embedding_term
    assert (total - dec.embedding).abs().max() < 1e-5
    # each part on its own, against the literal contrib(u) (a wrong split could still sum right)
    mlp, bias, emb_term = slow_components(lm, x)
    assert torch.allclose(dec.mlp, mlp, atol=1e-5), (dec.mlp - mlp).abs().max()
    assert torch.allclose(dec.attn_bias, bias, atol=1e-5)
    assert torch.allclose(dec.embedding_term, emb_term, atol=1e-5)
    assert min(t.norm(dim=-1).min() for t in (dec.mlp, dec.attn_bias, dec.embedding_term)) > 1e-4
    # the split is of `rest`; the heads and the embedding are those of the default mode
    plain = decompose(lm, x, "all")
    assert plain.mlp is None and plain.attn_bias is None and plain.embedding_term is None
    for name in ("embedding", "head_cls", "rest"):
        assert torch.allclose(getattr(dec, name), getattr(plain, name), atol=1e-6), name
    assert torch.allclose(dec.mlp.sum(1) + dec.attn_bias.sum(1) + dec.embedding_term, dec.rest, atol=1e-5)


def test_modes_are_fixed_at_construction(tiny):
    lm = _model("atlas-test-tiny", seed=7)
    x = _images(lm, n=2)
    with pytest.raises(ValueError, match="layers='all'"):
        decompose(lm, x, [1, 2], components=True)
    both = decompose(lm, x, "all", tokens=True, components=True)
    assert both.head_tokens is not None and both.mlp is not None
    assert Decomposer.for_model(lm, "all", tokens=True) is Decomposer.for_model(lm, [0, 1, 2], tokens=True)
    assert Decomposer.for_model(lm, "all") is not Decomposer.for_model(lm, "all", components=True)
    assert list(both.tensors()) == ["embedding", "head_cls", "rest", "head_tokens", "mlp", "attn_bias", "embedding_term"]
    dec = Decomposer(lm.visual, [0, 1, 2], tokens=True)
    assert dec.outputs == ("embedding", "head_cls", "rest", "head_tokens")
    with torch.no_grad():
        flat = dec.flat(x)
    assert len(flat) == 4 and torch.allclose(flat[3], both.head_tokens, atol=1e-6)


def test_resolve_layers():
    assert resolve_layers("last4", 12) == [8, 9, 10, 11]
    assert resolve_layers("all", 3) == [0, 1, 2]
    assert resolve_layers("8,9, 10", 12) == [8, 9, 10]
    with pytest.raises(ValueError, match="0..11"):
        resolve_layers("12", 12)
    with pytest.raises(ValueError, match="last4, all"):
        resolve_layers("top", 12)
