"""The second-order lens (MATH.md §10, models/neurons.py) against literal implementations: the
materialised [B, T, N, W] form (float64, 1e-10) and the source identity of a head's direct term
(float32, 1e-5), on tiny configs with perturbed LayerNorms, biases and layer scales: first on open_clip's
class-token ViT written out from its own modules (no adapter), then on every tower family the head
decomposition covers, through the adapters' per-block pieces."""
from __future__ import annotations

import math

import pytest
import torch

from models import decompose, load_model
from models.neurons import SecondOrderLens, second_order
from tests.model_fixtures import TINY_CONFIGS, perturb, register_tiny_configs, register_tiny_timm
from tests.unit.test_towers import CASES as TOWER_CASES, build_visual

# the families of the head decomposition (tests/unit/test_towers.py) and a native class-token ViT
FAMILIES = {"native-tok-ls": {"embed_dim": 24, "vision_cfg": TINY_CONFIGS["atlas-test-ls"]["vision_cfg"]},
            **TOWER_CASES}


@pytest.fixture(scope="module")
def _timm_tiny():
    register_tiny_timm()


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


@pytest.mark.parametrize("arch, layer", [("atlas-test-ls", 1), ("atlas-test-noln", 0)])
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


@pytest.mark.parametrize("arch, target", [("atlas-test-tiny", (2, 1)), ("atlas-test-ls", (1, 3))])
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


@pytest.mark.parametrize("case", ["native-tok-ls", "timm-map", "native-coca"])
def test_lens_relatives_agree_with_phi(_timm_tiny, case):
    """gram gives ||phi||, layer_effect the sum over neurons, token_alpha sums to alpha, writes_along is
    u . t per path of a head, and the trace's embedding is the tower's (class token, MAP, CoCa's pooler)."""
    visual = build_visual(FAMILIES[case], seed=7)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(8)).double()
    lens = SecondOrderLens(visual, [0, 1])
    tr = lens.trace(x)
    with torch.no_grad():
        emb = torch.nn.functional.normalize(tower_output(visual, x), dim=-1)
    assert (tr.embedding - emb).abs().max() < 1e-12
    for layer in (0, 1):
        a = lens.alpha(tr, layer)
        P = len(lens.paths(layer))
        assert a.shape == (3, lens.n_neurons[layer], P) and P == len(lens.heads(layer)) * lens.groups
        phi = lens.phi(a, layer)                                              # [B, N, d]
        scale = phi.abs().max()
        G = lens.gram(layer, chunk=7)
        norms = torch.einsum("bnk,nkj,bnj->bn", a, G, a).sqrt()
        assert (norms - phi.norm(dim=-1)).abs().max() < 1e-10 * scale
        assert (lens.layer_effect(a, layer) - phi.sum(1)).abs().max() < 1e-10 * scale
        ta = lens.token_alpha(tr, layer, 5)
        assert ta.shape == (3, P, tr.acts[layer].shape[1])
        assert (ta.sum(-1) - a[:, 5]).abs().max() < 1e-10 * a.abs().max()
        t = torch.randn(emb.shape[-1], dtype=torch.float64)
        U = lens.head_vectors(layer)
        for head in lens.heads(layer):
            sl = lens.head_paths(layer, head)
            assert (lens.writes_along(layer, head, t) - U[:, sl] @ t).abs().max() < 1e-10 * (U @ t).abs().max()
    # phi of a subset of neurons is the same rows
    a = lens.alpha(tr, 1)
    assert (lens.phi(a[:, 3:9], 1, slice(3, 9)) - lens.phi(a, 1)[:, 3:9]).abs().max() < 1e-10 * a.abs().max()


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


# ----------------------------------------------------------------------------- every tower family
# The lens over the adapters (models/towers), on tiny towers of every family the head decomposition
# covers (tests/unit/test_towers.py's configs): class token (open_clip native, timm with register
# tokens and layer scale, EVA02 with RoPE, SwiGLU and sub-LN, EVA02-E post-norm), average (native,
# before and after ln_post; timm with fc_norm; grouped k/v), CoCa's attentional pooler and MAP (SigLIP,
# PE-Core). The references use the adapters' per-block pieces (qkv, attn_out, head_out, value_in,
# mlp_neurons) and the readout's linear map, never the lens's folds.

@torch.no_grad()
def adapter_forward(visual, x, layer):
    """The tower by hand through its adapter, every attention row explicit: per block the residual
    entering it, A [B, H, T, T], the post-attention scale r [B, T, 1] | None, and the neurons of MLP
    layer `layer` [B, T, N]; then the readout's weights K [B, M, R] and ||z|| [B]."""
    from models import tower
    tw = tower(visual)
    h, ctx = tw.embed(x)
    rec = []
    for l, blk in enumerate(tw.blocks):
        q, k, v = blk.qkv(h, ctx)
        A = torch.softmax(torch.einsum("bshk,bthk->bhst", q, k) * blk.scale, dim=-1)
        o = torch.einsum("bhst,bthk->bshk", A, v)
        delta, r, bias = blk.attn_out(o)
        mid = h + delta
        p, mdelta, mbias = blk.mlp_neurons(mid)
        rec.append(dict(x=h, A=A, o=o, v=v, r=r, bias=bias, p=p, mbias=mbias, mdelta=mdelta, mid=mid))
        h = mid + mdelta
    R = tw.readout.rows or h.shape[1]
    read = tw.readout.read(h[:, :R])
    return tw, rec, read.weights, read.z.norm(dim=-1)


def _head_term(dec, tw, rec, K, zn, lp, h, values):
    """What values [B, T, (n,) dh] at head (l', h)'s source tokens add to its direct term: through its
    attention (all rows read), its post-attention scale and head_out, then the readout's linear map:
    [B, (n,) d]."""
    R = K.shape[-1]
    A = rec[lp]["A"][:, h, :R]                                                   # [B, R, T]
    o = torch.einsum("brt,bt...e->br...e", A, values)                            # [B, R, (n,) dh]
    if rec[lp]["r"] is not None:
        r = rec[lp]["r"][:, :R, 0]
        o = o / r.view(*r.shape, *([1] * (o.dim() - 2)))
    out = o @ tw.blocks[lp].head_out[h]                                          # [B, R, (n,) W]
    if out.dim() == 4:
        out = out.transpose(1, 2)                                                # [B, n, R, W]
    return dec._lin(K, out) / zn.view(-1, *([1] * (out.dim() - 2)))


def _values_of(blk, u, s1):
    """A residual summand u [B, T, (n,) W] as head values [B, T, (n,) H, dh] (frozen scale s1 [B, T])."""
    v = torch.einsum("bt...w,hwe->bt...he", u, blk.value_in)
    return v / s1.view(*s1.shape, *([1] * (v.dim() - 2)))


def _s1(blk, x):
    return blk.norm1.scale(x)[..., 0] if blk.norm1 is not None else torch.ones(x.shape[:2]).to(x)


@pytest.mark.parametrize("case", list(FAMILIES))
@torch.no_grad()
def test_adapters_give_the_lens_what_the_blocks_compute(_timm_tiny, case):
    """value_in reads each head's values from the residual up to a constant (the norm's and the
    projection's biases); mlp_neurons' delta is the block's MLP and equals p @ mlp_rows + bias."""
    visual = build_visual(FAMILIES[case])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)).double()
    tw, rec, K, zn = adapter_forward(visual, x, 0)
    for blk, r in zip(tw.blocks, rec):
        pred = _values_of(blk, r["x"], _s1(blk, r["x"]))                          # [B, T, H, dh]
        const = r["v"] - pred
        assert (const - const[:1, :1]).abs().max() < 1e-10, case
        assert (r["mdelta"] - blk.mlp(r["mid"])).abs().max() < 1e-12, case
        recon = r["p"] @ blk.mlp_rows + r["mbias"]
        assert (recon - r["mdelta"]).abs().max() < 1e-10, case
        assert r["p"].shape[-1] == blk.mlp_rows.shape[0] and r["p"].abs().max() > 0


@pytest.mark.parametrize("case", list(FAMILIES))
@torch.no_grad()
def test_every_family_cheap_form_equals_the_materialised_form(_timm_tiny, case):
    """float64, <= 1e-10: per later head and pool head, alpha u equals the neuron writes [B, T, N, W]
    carried literally through the later block's values, attention, head_out and the readout."""
    from models import Decomposer
    visual = build_visual(FAMILIES[case], seed=3)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)).double()
    layer = 0
    tw, rec, K, zn = adapter_forward(visual, x, layer)
    dec = Decomposer(visual, range(tw.layers))
    lens = SecondOrderLens(visual, [layer])
    so = lens(x, phi=True)[layer]
    M = dec.groups
    assert lens.groups == M and so.paths == [(lp, h, m) for lp, h in so.heads for m in range(M)]
    writes = rec[layer]["p"][..., None] * tw.blocks[layer].mlp_rows              # [B, T, N, W]
    U = lens.head_vectors(layer)                                                  # [N, P, d]
    total = 0
    for lp in range(layer + 1, tw.layers):
        blk = tw.blocks[lp]
        vals = _values_of(blk, writes, _s1(blk, rec[lp]["x"]))                    # [B, T, N, H, dh]
        for h in range(tw.heads):
            ref = _head_term(dec, tw, rec, K, zn, lp, h, vals[..., h, :])          # [B, N, d]
            sl = lens.head_paths(layer, (lp, h))
            ours = torch.einsum("bnm,nmd->bnd", so.alpha[:, :, sl], U[:, sl])
            # absolute, and relative to the term (random PE-Core: second-order effects ~1e-9)
            err = (ours - ref).abs().max()
            assert err < 1e-10 and err <= 1e-9 * ref.abs().max(), (case, lp, h, err)
            total = total + ref
    err = (so.phi - total).abs().max()
    assert err < 1e-10 and err <= 1e-9 * total.abs().max(), case
    # the trace's embedding is the tower's own output
    ref_emb = torch.nn.functional.normalize(tower_output(visual, x), dim=-1)
    assert (so.embedding - ref_emb).abs().max() < 1e-10


def tower_output(visual, x):
    out = visual(x)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("case", list(FAMILIES))
@torch.no_grad()
def test_every_family_source_identity_of_a_later_heads_direct_term(_timm_tiny, case):
    """float32, <= 1e-5: head (L-1, 1)'s direct term from decompose equals its reading of the
    embedding, of every earlier head, of every earlier neuron (the lens), of the biases, and of the
    value projection's constant."""
    from models import Decomposer
    visual = build_visual(FAMILIES[case], seed=4, dtype=torch.float32)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    tw, rec, K, zn = adapter_forward(visual, x, 0)
    lp, h = tw.layers - 1, 1
    dec = Decomposer(visual, range(tw.layers))
    blk = tw.blocks[lp]
    s1 = _s1(blk, rec[lp]["x"])

    def read(u):                                                                  # [B, T, W] -> [B, d]
        return _head_term(dec, tw, rec, K, zn, lp, h, _values_of(blk, u, s1)[..., h, :])

    x0, _ = tw.embed(x)
    const = (rec[lp]["v"] - _values_of(blk, rec[lp]["x"], s1))[:, :, h]            # [B, T, dh], one row
    parts = {"embedding": read(x0), "value constant": _head_term(dec, tw, rec, K, zn, lp, h, const)}
    heads, biases = 0, 0
    ones = torch.ones_like(x0)
    for l in range(lp):
        b, r = tw.blocks[l], rec[l]
        for hh in range(tw.heads):
            o = r["o"][:, :, hh]
            if r["r"] is not None:
                o = o / r["r"]
            heads = heads + read(o @ b.head_out[hh])
        biases = biases + read(ones * r["bias"]) + read(ones * r["mbias"])
    parts["heads"], parts["biases"] = heads, biases
    lens = SecondOrderLens(visual, list(range(lp)))
    tr = lens.trace(x)
    neurons = 0
    for l in range(lp):
        sl = lens.head_paths(l, (lp, h))
        neurons = neurons + torch.einsum("bnm,nmd->bd", lens.alpha(tr, l)[:, :, sl], lens.head_vectors(l)[:, sl])
    parts["neurons"] = neurons
    target = dec(x).head_cls[:, lp, h]                                            # [B, d]
    total = sum(parts.values())
    err = (total - target).abs().max()
    # absolute, and relative to the largest part (random PE-Core's heads are ~1e-8; measured <= 8e-7)
    scale = max(float(v.abs().max()) for v in parts.values())
    assert err < 1e-5 and err <= 1e-5 * scale, (case, float(err), scale)
    assert parts["neurons"].abs().max() > 1e-3 * scale       # the neurons' part is 100 x the tolerance
    # head_shares is the neurons' part along a direction, layer by layer
    t = torch.nn.functional.normalize(torch.randn(target.shape[-1]), dim=0)
    shares = lens.head_shares(tr, (lp, h), t)
    assert (sum(v.sum(1) for v in shares.values()) - neurons @ t).abs().max() <= 1e-5 * scale
