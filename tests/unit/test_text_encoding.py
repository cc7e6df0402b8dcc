"""models.encode_texts: exact trimmed text encoding (issue 13, item 1).

A causal text tower with end-of-text pooling is run on each batch's longest text only; every
other tower on the full context. Either way the result is `model.encode_text` on the full
context, normalised, row for row in the caller's order.
"""
from __future__ import annotations

import pytest
import torch

from models import encode_texts, load_model
from models.registry import text_trim_lengths

# mixed lengths: one word, short, medium, and one far longer than any context (truncated)
LONG = "a photo of " + " and ".join(f"a {c} square" for c in ["red", "green", "blue", "pale", "dark"] * 12)
TEXTS = ["a red circle", "cat", LONG, "a small blue triangle in the upper left corner of the image",
         "a photo of a dog", "", "two green squares on a striped background", "a"]


@pytest.fixture(scope="module")
def vit():
    return load_model("ViT-B-32", random_init=True, seed=0)


@pytest.fixture(scope="module")
def toy():
    return load_model("toy-shapes")


def reference(lm, texts) -> torch.Tensor:
    """open_clip itself: encode_text on the full context, normalised.            [M, d]"""
    with torch.no_grad():
        return torch.nn.functional.normalize(lm.model.encode_text(lm.tokenizer(texts)).float(), dim=-1)


def seen_lengths(lm, monkeypatch) -> list[int]:
    """Record the sequence length of every batch the text transformer runs on."""
    seen: list[int] = []
    forward = lm.model.transformer.forward
    monkeypatch.setattr(lm.model.transformer, "forward",
                        lambda x, attn_mask=None: (seen.append(x.shape[1]), forward(x, attn_mask=attn_mask))[1])
    return seen


@pytest.mark.parametrize("name", ["vit", "toy"])
@pytest.mark.parametrize("batch_size", [3, 256])
def test_trimmed_equals_open_clip(name, batch_size, request):
    lm = request.getfixturevalue(name)
    tokens = lm.tokenizer(TEXTS)
    context = tokens.shape[1]
    assert (tokens[TEXTS.index(LONG)] != 0).all()              # the long text fills (is cut at) the context
    got = encode_texts(lm, TEXTS, batch_size=batch_size)
    ref = reference(lm, TEXTS)
    assert got.shape == ref.shape == (len(TEXTS), lm.embed_dim) and got.dtype == torch.float32
    assert (got - ref).abs().max().item() < 1e-5
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)
    lengths = text_trim_lengths(lm.model, tokens)
    assert lengths is not None and int(lengths.max()) == context and int(lengths.min()) == 2   # "" is sot + eot


@pytest.mark.parametrize("name", ["vit", "toy"])
def test_batches_are_sorted_and_trimmed(name, request, monkeypatch):
    """Batches run in order of tokenised length, each cut at its longest text."""
    lm = request.getfixturevalue(name)
    lengths = sorted(int(n) for n in lm.tokenizer(TEXTS).argmax(-1) + 1)
    seen = seen_lengths(lm, monkeypatch)
    encode_texts(lm, TEXTS, batch_size=3)
    assert seen == [lengths[min(i + 2, len(lengths) - 1)] for i in range(0, len(TEXTS), 3)]
    assert seen[0] < 10 < lm.tokenizer(["x"]).shape[1]


def test_original_order_preserved(toy):
    """Row i is texts[i]'s embedding whatever the input order (the sort is undone)."""
    perm = [5, 2, 7, 0, 3, 6, 1, 4]
    texts = [TEXTS[i] for i in perm]
    a = encode_texts(toy, TEXTS, batch_size=3)
    b = encode_texts(toy, texts, batch_size=3)
    assert (b - a[perm]).abs().max().item() < 1e-5
    singles = torch.cat([encode_texts(toy, [t]) for t in texts])   # each alone, no batch to sort
    assert (b - singles).abs().max().item() < 1e-5
    # distinct texts give distinct rows, so a wrong permutation could not pass the checks above
    assert (a[:, None] - a[None]).abs().amax(-1).add(torch.eye(len(TEXTS))).min() > 1e-3


def test_empty_input(vit):
    assert encode_texts(vit, []).shape == (0, vit.embed_dim)


@pytest.mark.parametrize("attr,value", [
    ("text_pool_type", "last"),       # the context's last slot: trimming would move it
    ("text_pool_type", "first"),      # cls-style pooling
    ("attn_mask", None),              # bidirectional tower
    ("attn_mask", "zeros"),           # a mask that hides nothing
])
def test_untrimmable_towers_run_on_the_full_context(toy, monkeypatch, attr, value):
    """Detected from the model, not its name: the same toy with its pooling or mask changed falls
    back to the full context and still equals encode_text (trimmed, these would differ)."""
    model = toy.model
    context = toy.tokenizer(["x"]).shape[1]
    if value == "zeros":
        value = torch.zeros(context, context)
    if attr == "attn_mask":                 # a buffer: monkeypatch.setattr's undo would delete it
        monkeypatch.setitem(model._buffers, attr, value)
    else:
        monkeypatch.setattr(model, attr, value)
    assert getattr(model, attr) is value
    assert text_trim_lengths(model, toy.tokenizer(TEXTS)) is None
    seen = seen_lengths(toy, monkeypatch)
    got = encode_texts(toy, TEXTS, batch_size=3)
    assert seen == [context] * 3
    assert (got - reference(toy, TEXTS)).abs().max().item() < 1e-5


def test_eos_pooling_needs_an_eos_id(toy, monkeypatch):
    monkeypatch.setattr(toy.model, "text_pool_type", "eos")
    monkeypatch.setattr(toy.model, "text_eos_id", None)
    assert text_trim_lengths(toy.model, toy.tokenizer(TEXTS)) is None


def test_eos_pooling_is_trimmed(toy, monkeypatch):
    """'eos' pooling (the first eos token) is trimmable too; the end-of-text id of the CLIP tokenizer."""
    eot = toy.tokenizer.eot_token_id
    monkeypatch.setattr(toy.model, "text_pool_type", "eos")
    monkeypatch.setattr(toy.model, "text_eos_id", eot)
    lengths = text_trim_lengths(toy.model, toy.tokenizer(TEXTS))
    assert lengths is not None and int(lengths.min()) == 2
    seen = seen_lengths(toy, monkeypatch)
    got = encode_texts(toy, TEXTS, batch_size=3)
    assert max(seen[:2]) < toy.tokenizer(["x"]).shape[1]
    assert (got - reference(toy, TEXTS)).abs().max().item() < 1e-5


def test_custom_text_clip_runs_unchanged(monkeypatch):
    """A CustomTextCLIP (the class of Hugging Face text towers) is not trimmed, even with a causal
    TextTransformer inside: only open_clip's CLIP.encode_text is mirrored."""
    import open_clip
    from models.registry import LoadedModel
    toy = load_model("toy-shapes", random_init=True, seed=1)
    torch.manual_seed(1)
    model = open_clip.create_model("toy-shapes", force_custom_text=True).eval()
    assert type(model).__name__ == "CustomTextCLIP"
    lm = LoadedModel(model, toy.preprocess, toy.tokenizer, "custom", {}, "random", torch.device("cpu"))
    assert text_trim_lengths(model, lm.tokenizer(TEXTS)) is None
    got = encode_texts(lm, TEXTS, batch_size=3)
    assert (got - reference(lm, TEXTS)).abs().max().item() < 1e-5


def test_subclass_overriding_encode_text_runs_unchanged():
    """A CLIP subclass with its own encode_text keeps it: the trimmed path mirrors CLIP.encode_text
    only (here the override shifts every embedding, which trimming would drop)."""
    from open_clip.model import CLIP

    class Shifted(CLIP):
        def encode_text(self, text, normalize=False):
            return CLIP.encode_text(self, text, normalize) + 0.5

    lm = load_model("toy-shapes", random_init=True, seed=2)
    lm.model.__class__ = Shifted
    assert text_trim_lengths(lm.model, lm.tokenizer(TEXTS)) is None
    got = encode_texts(lm, TEXTS, batch_size=3)
    assert (got - reference(lm, TEXTS)).abs().max().item() < 1e-5


def test_benchmark_reports_both_paths_on_the_same_texts():
    """models.bench.bench_text_encode (make bench's text_encode_vs_open_clip), on the toy, tiny."""
    from models.bench import bench_text_encode
    r = bench_text_encode(TEXTS, arch="toy-shapes", batch_size=3, rounds=1)
    assert r["texts"] == len(TEXTS) and r["context"] == 32 and r["rounds"] == 1
    assert r["max_abs_diff"] < 1e-5
    assert r["open_clip_s"] > 0 and r["encode_texts_s"] > 0
    assert r["text_encode_vs_open_clip"] == pytest.approx(r["open_clip_s"] / r["encode_texts_s"])
    assert 2 < r["mean_tokens"] < 32
