"""ONNX parity, checkpoint round trip, the command line, and every bad input's clear error."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from models import Decomposer, ImageError, ModelError, decompose, load_image, load_model
from models.hashing import sha256_file, sha256_file_cached
from models.onnx import OnnxRunner, export_onnx
from tests.model_fixtures import perturb, register_tiny_configs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return register_tiny_configs(tmp_path_factory.mktemp("configs"))


@pytest.fixture(scope="module")
def lm(tiny):
    m = load_model("atlas-test-ls", random_init=True, seed=4)
    perturb(m.model, 4)
    return m


@pytest.mark.parametrize("tokens", [False, True])
def test_onnx_parity_dynamic_batch(lm, tmp_path, tokens):
    path = export_onnx(lm, tmp_path / "m.onnx", "all", tokens=tokens)
    runner = OnnxRunner(path, providers=["CPUExecutionProvider"])
    assert runner.layers == [0, 1, 2] and runner.provider == "CPUExecutionProvider"
    for batch in (1, 5):  # the batch axis is dynamic
        x = torch.randn(batch, 3, lm.image_size, lm.image_size)
        ref, got = decompose(lm, x, "all", tokens=tokens), runner(x)
        for name in ("embedding", "head_cls", "rest") + (("head_tokens",) if tokens else ()):
            a, b = getattr(ref, name), getattr(got, name)
            assert a.shape == b.shape
            assert (a - b).abs().max() < 1e-4, name
    assert len(sha256_file(path)) == 64
    # attention is onnxruntime's fused op in every block but the last (which runs on the class row only)
    import onnx
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("MultiHeadAttention") == lm.layers - 1


def test_runner_without_spinning_threads_gives_the_same_outputs(lm, tmp_path):
    """embed runs onnxruntime with spin=False (its loader and writer share the cores): the session
    is configured so, and its outputs are those of the default session, bit for bit."""
    path = export_onnx(lm, tmp_path / "m.onnx", "all")
    x = torch.randn(3, 3, lm.image_size, lm.image_size)
    calm, spinning = OnnxRunner(path, spin=False), OnnxRunner(path)
    assert calm.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    a, b = calm(x), spinning(x)
    assert torch.equal(a.head_cls, b.head_cls) and torch.equal(a.embedding, b.embedding)


def test_cached_file_digest_is_reused_only_while_the_file_is_unchanged(tmp_path):
    f = tmp_path / "graph.onnx"
    f.write_bytes(b"first version")
    side = tmp_path / ".graph.onnx.sha256.json"
    assert sha256_file_cached(f) == sha256_file(f) and side.is_file()
    import json
    saved = json.loads(side.read_text())
    side.write_text(json.dumps({**saved, "sha256": "f" * 64}))     # a planted digest is returned: it was reused
    assert sha256_file_cached(f) == "f" * 64
    f.write_bytes(b"second, longer version")                          # size and mtime change: hashed again
    assert sha256_file_cached(f) == sha256_file(f) != "f" * 64
    side.write_text("{not json")                                      # a damaged sidecar is ignored and rewritten
    assert sha256_file_cached(f) == sha256_file(f)
    assert json.loads(side.read_text())["sha256"] == sha256_file(f)
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "w.bin").write_bytes(b"x")
    ro.chmod(0o555)                                                   # no sidecar can be written: still the digest
    try:
        assert sha256_file_cached(ro / "w.bin") == sha256_file(ro / "w.bin")
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("tokens", [False, True])
def test_cpu_micro_batches_change_nothing(lm, tmp_path, tokens):
    """torch and onnxruntime split CPU batches into micro-batches; the outputs are those of one batch."""
    runner = OnnxRunner(export_onnx(lm, tmp_path / "m.onnx", "all", tokens=tokens), providers=["CPUExecutionProvider"])
    dec = Decomposer.for_model(lm, "all", tokens=tokens)
    assert runner.micro_batch == dec.micro_batch >= 5       # a 32 px model: one micro-batch holds them all
    x = torch.randn(5, 3, lm.image_size, lm.image_size)
    whole_torch, whole_onnx = decompose(lm, x, "all", tokens=tokens), runner(x)
    small = Decomposer(lm.visual, dec.layers, tokens=tokens, micro_batch=2).eval()   # 2 + 2 + 1
    calls = []
    flat, small.flat = small.flat, lambda images: calls.append(len(images)) or flat(images)
    runner2 = OnnxRunner(runner.path, providers=["CPUExecutionProvider"], micro_batch=2)
    with torch.no_grad():
        parts_torch, parts_onnx = small(x), runner2(x)
    assert calls == [2, 2, 1] and runner2.micro_batch == 2  # the micro-batches really ran
    for name in ("embedding", "head_cls", "rest") + (("head_tokens",) if tokens else ()):
        assert getattr(parts_torch, name).shape == getattr(whole_torch, name).shape
        assert torch.allclose(getattr(parts_torch, name), getattr(whole_torch, name), atol=1e-6), name
        assert torch.allclose(getattr(parts_onnx, name), getattr(whole_onnx, name), atol=1e-6), name
    assert (parts_torch.head_tokens is None) == (not tokens) and parts_torch.mlp is None


def test_checkpoint_round_trip(lm, tmp_path):
    from safetensors.torch import save_file
    x = torch.randn(2, 3, lm.image_size, lm.image_size)
    ref = decompose(lm, x, "last4" if lm.layers >= 4 else "all")
    state = {k: v.contiguous() for k, v in lm.model.state_dict().items()}
    pt, st = tmp_path / "w.pt", tmp_path / "w.safetensors"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, pt)
    save_file(state, str(st))
    for path in (pt, st):
        back = load_model("atlas-test-ls", checkpoint=path)
        assert back.source == "checkpoint" and back.model_id.startswith("atlas-test-ls/ckpt-")
        got = decompose(back, x, "all")
        assert torch.allclose(got.embedding, ref.embedding, atol=1e-6)
    assert load_model("atlas-test-ls", checkpoint=pt).model_id != load_model("atlas-test-ls", checkpoint=st).model_id


def test_random_init_is_seeded(tiny):
    a = load_model("atlas-test-tiny", random_init=True, seed=7)
    b = load_model("atlas-test-tiny", random_init=True, seed=7)
    c = load_model("atlas-test-tiny", random_init=True, seed=8)
    pa, pb, pc = (m.visual.proj for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert a.model_id == "atlas-test-tiny/random-seed7"
    assert a.row()["heads"] == 4 and a.row()["layers"] == 3 and a.grid == (4, 4)


def test_unknown_architecture_suggests_close_names():
    with pytest.raises(ModelError, match=r"unknown model architecture 'ViT-B-61'.*Did you mean: .*ViT-B-16"):
        load_model("ViT-B-61", random_init=True)


def test_unknown_tag_lists_known_tags():
    with pytest.raises(ModelError, match=r"unknown pretrained tag 'nope'.*laion2b_s34b_b88k"):
        load_model("ViT-B-16", pretrained="nope")


def test_unfetchable_weights_point_to_checkpoint(monkeypatch):
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-atlas-cache")
    with pytest.raises(ModelError, match=r"could not be fetched.*--checkpoint FILE"):
        load_model("ViT-B-32", pretrained="openai")


@pytest.mark.parametrize("arch,reason", [
    ("RN50", "model 'RN50' is not supported: its image tower is a ResNet: convolutions, no attention heads"),
    ("convnext_base", "is not supported: its image tower is a timm ConvNeXt: convolutions, no attention heads"),
])
def test_unsupported_towers_refused_with_reason(arch, reason):
    with pytest.raises(ModelError, match=reason) as err:
        load_model(arch, random_init=True)
    assert "python -m etl models" in str(err.value) and "\n" not in str(err.value)


def test_missing_and_mismatched_checkpoints(tiny, tmp_path):
    with pytest.raises(ModelError, match="checkpoint file not found"):
        load_model("atlas-test-tiny", checkpoint=tmp_path / "missing.pt")
    other = load_model("atlas-test-noln", random_init=True)
    torch.save(other.model.state_dict(), tmp_path / "other.pt")
    with pytest.raises(ModelError, match="does not match architecture 'atlas-test-tiny'"):
        load_model("atlas-test-tiny", checkpoint=tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read checkpoint"):
        load_model("atlas-test-tiny", checkpoint=tmp_path / "junk.pt")


class _RunsCode:
    def __reduce__(self):
        return (print, ("unpickling ran code",))


def test_a_checkpoint_that_would_run_code_is_refused_in_one_line(tiny, tmp_path, capsys):
    torch.save({"visual.proj": _RunsCode()}, tmp_path / "evil.pt")
    torch.save(load_model("atlas-test-tiny", random_init=True).model, tmp_path / "module.pt")   # a whole nn.Module
    for name in ("evil.pt", "module.pt"):
        with pytest.raises(ModelError) as err:
            load_model("atlas-test-tiny", checkpoint=tmp_path / name)
        assert str(err.value) == (f"checkpoint {tmp_path / name} is not a plain state dict (it would run code when "
                                  f"unpickled); save it with torch.save(model.state_dict()) or as .safetensors")
    assert "unpickling ran code" not in capsys.readouterr().out


def test_weight_source_rules(tiny):
    with pytest.raises(ModelError, match="only one of"):
        load_model("atlas-test-tiny", pretrained="x", random_init=True)
    with pytest.raises(ModelError, match="no weights given.*--random-init"):
        load_model("atlas-test-tiny")
    with pytest.raises(ModelError, match="needs a GPU"):
        load_model("atlas-test-tiny", random_init=True, precision="fp16")


# ---- images ---------------------------------------------------------------------------------

def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A PNG whose header declares width x height pixels but holds almost no data."""
    import struct
    import zlib
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b"")


def test_image_errors_are_clear():
    with pytest.raises(ImageError, match="not an image"):
        load_image(b"hello, I am text")
    good = _png(Image.new("RGB", (64, 64), (200, 10, 10)))
    with pytest.raises(ImageError, match="damaged or truncated"):
        load_image(good[: len(good) // 2])
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(bomb_png())
    with pytest.raises(ImageError, match="over the .* MB limit"):
        load_image(good, max_bytes=100)


def test_image_modes_are_converted_to_rgb():
    cmyk = load_image(_png(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), format="JPEG"))
    assert cmyk.mode == "RGB" and cmyk.getpixel((4, 4))[0] > 200
    a16 = np.full((8, 8), 40000, dtype=np.uint16)
    a16[0, 0] = 65535
    g16 = load_image(_png(Image.fromarray(a16)))
    assert g16.mode == "RGB" and abs(g16.getpixel((4, 4))[0] - round(40000 / 65535 * 255)) <= 1
    pal = Image.new("P", (8, 8))
    pal.putpalette([0, 0, 255] * 256)
    assert load_image(_png(pal)).getpixel((1, 1)) == (0, 0, 255)
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 255, 0)]]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    first = load_image(buf.getvalue())
    assert first.mode == "RGB" and first.getpixel((2, 2))[0] > 200
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert load_image(_png(rgba)).getpixel((0, 0)) == (255, 255, 255)


# ---- command line ---------------------------------------------------------------------------
