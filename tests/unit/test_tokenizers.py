"""Hugging Face tokenizers (SigLIP's and other towers' text side) load by name from a Hugging Face
cache, offline, the way weights do: a small sentencepiece tokenizer is built here, written into
the cache layout (models--org--name/refs/main, snapshots/<rev>/...) and loaded with HF_HUB_OFFLINE=1
in a fresh process, by open_clip's own name for it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
REV = "0123456789abcdef0123456789abcdef01234567"
CORPUS = ["a red circle on a white background", "two blue squares in the sky", "a photo of a dog",
          "three green triangles on grass", "a striped star on water", "one small yellow hexagon"] * 20


def _hf_cache_entry(hub: Path, repo_id: str, files: dict[str, Path | str], absent=("config.json",)) -> Path:
    """Write `files` (name -> source path or text) as one snapshot of `repo_id` in the cache `hub`,
    with the hub's record of the files the repo lacks (`.no_exist/<rev>/<name>`, what an online
    fetch leaves: transformers asks for a model config.json first, and a tokenizer repo has none)."""
    entry = hub / f"models--{repo_id.replace('/', '--')}"
    snap = entry / "snapshots" / REV
    snap.mkdir(parents=True)
    (entry / ".no_exist" / REV).mkdir(parents=True)
    for name in absent:
        (entry / ".no_exist" / REV / name).touch()
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(REV)
    for name, src in files.items():
        (snap / name).write_bytes(src.read_bytes() if isinstance(src, Path) else src.encode())
    return snap


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    import sentencepiece as spm
    tmp = tmp_path_factory.mktemp("tok")
    (tmp / "corpus.txt").write_text("\n".join(CORPUS))
    spm.SentencePieceTrainer.train(input=str(tmp / "corpus.txt"), model_prefix=str(tmp / "spiece"), vocab_size=40,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, minloglevel=2)
    hub = tmp / "hub"
    config = json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "model_max_length": 64})
    for repo_id in ("timm/ViT-B-16-SigLIP", "atlas-test/tiny-spm"):
        _hf_cache_entry(hub, repo_id, {"spiece.model": tmp / "spiece.model", "tokenizer_config.json": config})
    return hub


SCRIPT = r"""
import json, sys, torch, open_clip, sentencepiece as spm
from models.registry import ModelError, encode_texts, load_model, tokenizer_for
out = {}
tok = tokenizer_for("ViT-B-16-SigLIP")
out["type"] = type(tok).__name__
text = "A red circle, on a WHITE background!"
ids = tok([text])
sp = spm.SentencePieceProcessor(model_file=sys.argv[1])
clean = open_clip.tokenizer.get_clean_fn("canonicalize")(text)
want = sp.encode(clean) + [1]
out["ids_equal"] = ids.shape == (1, 64) and ids[0].tolist() == want + [0] * (64 - len(want))
# a tiny model whose text tower uses a Hugging Face tokenizer by name, end to end
open_clip.add_model_config(sys.argv[2])
lm = load_model("atlas-test-hftext", random_init=True, seed=0)
texts = ["a red circle", "two blue squares in the sky", "a dog"]
with torch.no_grad():
    ref = torch.nn.functional.normalize(lm.model.encode_text(lm.tokenizer(texts)), dim=-1)
out["encode_err"] = float((encode_texts(lm, texts) - ref).abs().max())
out["distinct"] = float((ref[0] - ref[1]).abs().max())
try:
    tokenizer_for("ViT-B-16-SigLIP2")             # gemma's tokenizer: not in this cache
    out["missing"] = None
except ModelError as exc:
    out["missing"] = str(exc)
print(json.dumps(out))
"""


def test_hf_tokenizer_loads_by_name_from_the_cache_offline(hub, tmp_path):
    cfg = {"embed_dim": 24, "custom_text": True,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "head_width": 12, "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 40, "hf_tokenizer_name": "atlas-test/tiny-spm",
                        "tokenizer_kwargs": {"clean": "canonicalize"}, "width": 32, "heads": 2, "layers": 1,
                        "no_causal_mask": True, "proj_bias": True, "pool_type": "last"}}
    (tmp_path / "atlas-test-hftext.json").write_text(json.dumps(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"), PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(hub.parent / "spiece.model"), str(tmp_path)],
                       capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["type"] == "HFTokenizer" and out["ids_equal"]
    assert out["encode_err"] < 1e-5 and out["distinct"] > 1e-3
    assert out["missing"] and "could not be loaded" in out["missing"] and "HF_HUB_CACHE" in out["missing"]
    assert "\n" not in out["missing"]
