"""The decompose/verify commands and their errors, end to end (subprocesses)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from PIL import Image




def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "etl", *args], capture_output=True, text=True, timeout=600, **kw)


def test_cli_decompose_and_verify(tmp_path):
    img = tmp_path / "a.png"
    Image.new("RGB", (300, 200), (10, 120, 200)).save(img)
    Image.new("RGB", (50, 80), (250, 120, 0)).save(tmp_path / "b.jpg")
    out = tmp_path / "d.npz"
    r = _cli("decompose", "--model", "ViT-S-32", "--random-init", "--image", str(img),
             "--image", str(tmp_path / "b.jpg"), "--out", str(out), "--second-order", "10")
    assert r.returncode == 0, r.stderr
    z = np.load(out)
    # MLP layer 10's 1,536 neurons through the 6 heads of layer 11 (MATH.md §10)
    assert z["second_order_alpha"].shape == (2, 1536, 6) and z["second_order_phi"].shape == (2, 1536, 384)
    assert z["second_order_heads"].tolist() == [[11, h] for h in range(6)] and int(z["second_order_layer"]) == 10
    assert np.isfinite(z["second_order_phi"]).all() and (np.linalg.norm(z["second_order_phi"], axis=-1) > 0).mean() > 0.99
    assert z["embedding"].shape == (2, 384) and z["head_cls"].shape == (2, 4, 6, 384)
    assert z["head_tokens"].shape == (2, 4, 6, 50, 384) and list(z["layers"]) == [8, 9, 10, 11]
    assert np.allclose(np.linalg.norm(z["embedding"], axis=1), 1, atol=1e-5)
    assert np.abs(z["head_cls"].sum((1, 2)) + z["rest"] - z["embedding"]).max() < 1e-5
    assert np.abs(z["head_tokens"].sum(3) - z["head_cls"]).max() < 1e-5

    r = _cli("verify", "--model", "ViT-S-32", "--random-init", "--seed", "2")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["identity_max_rel_err"] < 1e-4 and report["onnx_max_abs_err"] < 1e-3
    assert report["onnx_provider"] == "CPUExecutionProvider"


def test_cli_errors_are_one_line(tmp_path):
    r = _cli("decompose", "--model", "ViT-B-61", "--random-init", "--image", "x.png", "--out", str(tmp_path / "o.npz"))
    assert r.returncode == 2 and "unknown model architecture" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "notes.txt").write_text("not an image")
    r = _cli("decompose", "--model", "ViT-S-32", "--random-init", "--image", str(tmp_path / "notes.txt"),
             "--out", str(tmp_path / "o.npz"))
    assert r.returncode == 2 and "not an image" in r.stderr and not (tmp_path / "o.npz").exists()
    r = _cli("decompose", "--model", "ViT-S-32", "--random-init", "--image", str(tmp_path / "notes.txt"),
             "--out", str(tmp_path / "o.npz"), "--second-order", "11")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "error: --second-order 11: the effects run through later attention heads, so choose an MLP layer 0..10 "
        "of this 12-layer model (0-based)")
    r = _cli("--help")
    assert r.returncode == 0 and "decompose" in r.stdout and "verify" in r.stdout


def test_models_lists_every_architecture_and_tag_with_the_refusals_explained():
    import open_clip
    r = _cli("models", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    rows = {a["arch"]: a for a in out["architectures"]}
    assert set(open_clip.list_models()) <= set(rows) and "toy-shapes-map" in rows
    listed = {(a, t) for a, row in rows.items() for t in row["tags"]}
    assert listed == set(open_clip.list_pretrained())                     # every tag, once
    c = out["counts"]
    assert c["pretrained_tags"] == len(open_clip.list_pretrained()) and c["pretrained_tags_supported"] >= 140
    refused_tags = [(a, row["reason"]) for a, row in rows.items() if not row["supported"] for _ in row["tags"]]
    assert len(refused_tags) == c["pretrained_tags"] - c["pretrained_tags_supported"]
    # every refused pretrained tag is a convolutional tower (ResNet, ConvNeXt, FastViT), said so in one line
    assert all(("ResNet" in why or "ConvNeXt" in why or "FastViT" in why) and "convolutions" in why
               for _, why in refused_tags), refused_tags
    for arch in ("ViT-B-16-SigLIP", "ViT-SO400M-14-SigLIP2", "PE-Core-L-14-336", "EVA02-E-14", "ViT-H-14-CLIPA",
                 "coca_ViT-L-14", "MobileCLIP-B", "ViTamin-XL-384", "ViT-B-32"):
        assert rows[arch]["supported"], arch
    table = _cli("models", "--refused")
    assert table.returncode == 0 and "refused: its image tower is a ResNet" in table.stdout
    assert table.stdout.strip().splitlines()[-1] == (
        f"{c['architectures_supported']} of {c['architectures']} architectures and "
        f"{c['pretrained_tags_supported']} of {c['pretrained_tags']} pretrained tags are supported.")
