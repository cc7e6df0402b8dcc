"""The per-patch map (MATH.md §6, analyses 2-3), its upsampling, and the model's crop (models.maps,
models.model_view) on the bundled toy model (64 px) and a random-init ViT-B-32 (224 px)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import models
from models import maps

MODELS = {"toy-shapes": dict(), "ViT-B-32": dict(random_init=True, seed=0)}


@pytest.fixture(scope="module", params=list(MODELS))
def lm(request):
    return models.load_model(request.param, **MODELS[request.param])


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth, non-square test picture (so resize and crop both matter)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    f = rng.standard_normal((3, 3))
    img = np.stack([f[c, 0] * xx + f[c, 1] * yy + f[c, 2] * np.sin(7 * xx * yy) for c in range(3)], -1)
    img = (img - img.min()) / (img.max() - img.min()) * 255 + rng.normal(0, 8, img.shape)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def test_map_plus_class_token_term_is_the_heads_share_of_the_cosine(lm):
    """sum over patches of the map + sum_S c[l,h,0] . t == sum_S c[l,h] . t (MATH.md §6.2), to 1e-4."""
    x = torch.stack([lm.preprocess(_photo(97, 71, s)) for s in range(2)])
    dec = models.decompose(lm, x, "last4", tokens=True)
    t = models.encode_texts(lm, ["a red circle", "a photo of a dog"])   # unit [2, d]
    rng = np.random.default_rng(1)
    pairs = [(l, h) for l in dec.layers for h in range(lm.heads)]
    chosen = [pairs[i] for i in rng.choice(len(pairs), 5, replace=False)]
    for heads in (chosen, pairs):
        idx = maps.layer_index(dec.layers, heads)
        for image in range(2):
            for t_hat in t:
                m = maps.topic_map(dec, heads, t_hat.numpy(), lm.grid, image=image)
                assert m.shape == lm.grid and m.dtype == np.float64
                cls_term = sum(float(dec.head_tokens[image, j, h, 0] @ t_hat) for j, h in idx)
                share = sum(float(dec.head_cls[image, j, h] @ t_hat) for j, h in idx)
                assert m.sum() + cls_term == pytest.approx(share, abs=1e-4)
                assert np.abs(m).max() > 1e-6                      # a zero map would not be a map
    # the map is each patch's own value, in the patch grid's row-major order
    j, h = maps.layer_index(dec.layers, chosen[:1])[0]
    m = maps.topic_map(dec, chosen[:1], t[0].numpy(), lm.grid, image=1)
    per_patch = (dec.head_tokens[1, j, h, 1:] @ t[0]).double().numpy()
    np.testing.assert_allclose(m.ravel(), per_patch, rtol=1e-6, atol=1e-9)
    # the head embeddings and the identity of §1 hold beside it: heads + rest = the unit embedding
    total = dec.head_cls.sum((1, 2)) + dec.rest
    assert (total - dec.embedding).abs().max() < 1e-4


def test_component_split_sums_to_the_embedding(lm):
    x = torch.stack([lm.preprocess(_photo(80, 120, s)) for s in range(2)])
    dec = models.decompose(lm, x, "all", components=True)
    total = dec.head_cls.sum((1, 2)) + dec.mlp.sum(1) + dec.attn_bias.sum(1) + dec.embedding_term
    assert dec.mlp.shape == (2, lm.layers, lm.embed_dim)
    assert (total - dec.embedding).abs().max() < 1e-4
    assert dec.mlp.sum(1).norm(dim=-1).min() > 1e-3          # the MLPs carry a real share


def test_head_map_is_additive_over_heads_and_skips_the_class_token():
    tokens = torch.randn(2, 3, 1 + 4 * 4, 8)                    # [L', H, T, d], grid 4 x 4
    t = np.random.default_rng(0).standard_normal(8)
    heads = [(0, 1), (1, 2), (1, 0)]
    together = maps.head_map(tokens, heads, t, (4, 4))
    apart = sum(maps.head_map(tokens, [h], t, (4, 4)) for h in heads)
    np.testing.assert_allclose(together, apart, rtol=1e-5, atol=1e-6)
    shifted = tokens.clone()
    shifted[:, :, 0] += 100.0                                    # the class token is not on the map
    np.testing.assert_allclose(maps.head_map(shifted, heads, t, (4, 4)), together, rtol=1e-6)
    with pytest.raises(ValueError, match="1 \\+ 3 x 3"):
        maps.head_map(tokens, heads, t, (3, 3))


def test_layer_index_and_topic_map_refuse_what_was_not_decomposed():
    assert maps.layer_index([8, 9, 10, 11], [(11, 3), (8, 0)]) == [(3, 3), (0, 0)]
    with pytest.raises(ValueError, match=r"layers \[2\] were not analysed"):
        maps.layer_index([8, 9], [(2, 0), (9, 1)])
    dec = models.Decomposition(torch.zeros(1, 4), torch.zeros(1, 1, 2, 4), torch.zeros(1, 4), [3])
    with pytest.raises(ValueError, match="tokens=True"):
        maps.topic_map(dec, [(3, 0)], np.ones(4), (2, 2))


def test_upsample_keeps_the_grid_layout():
    m = np.arange(12, dtype=np.float64).reshape(3, 4)
    up = maps.upsample(m, 96)
    assert up.shape == (96, 96) and up.dtype == np.float64
    # with 33 x 33 pixel patches, each patch's centre pixel takes exactly the patch's value
    up = maps.upsample(m, (99, 132))
    assert up.shape == (99, 132)
    np.testing.assert_allclose(up[16::33, 16::33], m, atol=1e-5)
    assert up.max() == pytest.approx(m.max()) and np.unravel_index(up.argmax(), up.shape)[0] > 80
    assert maps.upsample(np.full((2, 2), 0.25), 10) == pytest.approx(np.full((10, 10), 0.25))


def test_batched_preprocess_equals_the_preprocess_bit_for_bit(lm):
    """The embed job's split preprocess (per image: the uint8 crop; per batch: to float, normalise)."""
    from models.images import BatchedPreprocess
    S = lm.image_size
    bp = BatchedPreprocess(lm.preprocess)
    imgs = [_photo(w, h, seed=w) for w, h in ((300, 200), (90, 160), (S, S))] + [_photo(120, 100).convert("L")]
    crops = [bp.image(i) for i in imgs]
    assert all(c.dtype == torch.uint8 and tuple(c.shape) == (S, S, 3) for c in crops)
    got = bp.batch(crops)
    assert got.dtype == torch.float32 and tuple(got.shape) == (len(imgs), 3, S, S)
    assert torch.equal(got, torch.stack([lm.preprocess(i) for i in imgs]))
    # a preprocess that is not a Compose ending in ToTensor + Normalize runs unsplit
    plain = BatchedPreprocess(lambda img: lm.preprocess(img) * 2)
    assert plain.pil_steps is None
    assert torch.equal(plain.batch([plain.image(i) for i in imgs[:2]]),
                       torch.stack([lm.preprocess(i) * 2 for i in imgs[:2]]))


def test_model_view_is_what_the_preprocess_crops(lm):
    S = lm.image_size
    mean = torch.tensor(lm.visual.preprocess_cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(lm.visual.preprocess_cfg["std"]).view(3, 1, 1)
    for w, h in ((300, 200), (90, 160), (S, S)):
        img = _photo(w, h, seed=w)
        view = models.model_view(lm, img)
        assert view.size == (S, S) and view.mode == "RGB"
        pixels = torch.from_numpy(np.asarray(view, dtype=np.float32)).permute(2, 0, 1) / 255.0
        assert torch.allclose((pixels - mean) / std, lm.preprocess(img), atol=1e-5), (w, h)
    assert {"toy-shapes": 64, "ViT-B-32": 224}[lm.spec["arch"]] == S
    # an RGBA or greyscale input comes back as the RGB crop the model sees
    assert models.model_view(lm, _photo(120, 100).convert("L")).mode == "RGB"


def test_model_view_box_is_the_region_the_model_crops(lm):
    """The crop's box in the original image: cutting it out and resizing it to S gives the model's crop
    (up to the resampling order), for wide, tall and square images; patches tile it row-major."""
    S = lm.image_size
    for w, h in ((300, 200), (90, 160), (S, S), (S + 1, 3 * S)):
        img = _photo(w, h, seed=w + h)
        view, box = models.model_view_box(lm, img)
        assert view.tobytes() == models.model_view(lm, img).tobytes()
        x0, y0, x1, y1 = box
        assert x1 - x0 == pytest.approx(y1 - y0, abs=1.0) and x1 - x0 == pytest.approx(min(w, h), abs=1.0)   # ~ the short side, squared
        assert x0 == pytest.approx((w - (x1 - x0)) / 2, abs=1.0) and y0 == pytest.approx((h - (y1 - y0)) / 2, abs=1.0)
        again = np.asarray(img.resize((S, S), Image.BICUBIC, box=box), dtype=np.float64)
        assert np.abs(again - np.asarray(view, dtype=np.float64)).mean() < 6, (w, h)
    boxes = maps.patch_boxes((10.0, 20.0, 110.0, 120.0), (4, 5))
    assert boxes.shape == (4, 5, 4)
    assert tuple(boxes[0, 0]) == (10.0, 20.0, 30.0, 45.0) and tuple(boxes[3, 4]) == (90.0, 95.0, 110.0, 120.0)
    assert np.allclose(boxes[:, 1:, 0], boxes[:, :-1, 2]) and np.allclose(boxes[1:, :, 1], boxes[:-1, :, 3])
