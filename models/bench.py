"""Decomposition throughput, side by side in one process (issue 2 §5).

Variants run interleaved round by round so machine noise hits them alike; medians reported.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from models.decompose import decompose
from models.onnx import OnnxRunner, export_onnx
from models.registry import load_model


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@torch.no_grad()
def bench_decompose(arch: str = "ViT-B-16", batch: int = 32, rounds: int = 5, warmup: int = 1) -> dict:
    """images/s of encode_image, decompose (heads), decompose (+tokens, last 4), onnxruntime (heads)."""
    lm = load_model(arch, random_init=True, seed=0)
    x = torch.randn(batch, 3, lm.image_size, lm.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        runner = OnnxRunner(export_onnx(lm, Path(tmp) / "m.onnx", "last4", tokens=False))
        step = runner.micro_batch            # decompose and the runner work in CPU micro-batches: so does the baseline
        variants = {
            f"encode_image (torch, micro-batches of {step})": lambda: [lm.model.encode_image(c) for c in x.split(step)],
            "decompose heads (torch)": lambda: decompose(lm, x, "last4"),
            "decompose heads+tokens last4 (torch)": lambda: decompose(lm, x, "last4", tokens=True),
            f"decompose heads (onnxruntime {runner.provider})": lambda: runner(x),
        }
        for _ in range(warmup):
            for fn in variants.values():
                fn()
        times = {k: [] for k in variants}
        for _ in range(rounds):
            for k, fn in variants.items():
                times[k].append(_time(fn))
    rate = {k: batch / statistics.median(v) for k, v in times.items()}
    names = list(rate)
    return dict(
        arch=arch, batch=batch, rounds=rounds, threads=torch.get_num_threads(), images_per_s=rate,
        ratios=dict(
            decompose_vs_forward=rate[names[1]] / rate[names[0]],
            decompose_tokens_vs_forward=rate[names[2]] / rate[names[0]],
            onnx_vs_torch=rate[names[3]] / rate[names[1]],
        ),
    )


@torch.no_grad()
def bench_decompose_siglip(arch: str = "ViT-B-16-SigLIP", batch: int = 16, rounds: int = 5, warmup: int = 1) -> dict:
    """images/s of a MAP-pooled tower's encode_image (normalize=False) and of its decomposition
    (heads of the last 4 layers, as decompose_vs_forward; and of every layer, what the jobs' 'auto'
    analyses on a ViT-B), random weights, CPU, interleaved rounds. Only the image tower runs; no
    tokenizer is needed (open_clip.create_model, no weights)."""
    import open_clip
    from models.decompose import Decomposer, resolve_layers
    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None).eval()
    visual = model.visual
    n = len(visual.trunk.blocks)
    dec = Decomposer(visual, resolve_layers("last4", n)).eval()
    dec_all = Decomposer(visual, resolve_layers("all", n)).eval()
    x = torch.randn(batch, 3, *visual.image_size)
    step = dec.micro_batch
    variants = {
        f"encode_image (torch, micro-batches of {step})": lambda: [model.encode_image(c) for c in x.split(step)],
        "decompose heads, last4 (torch)": lambda: dec(x),
        f"decompose heads, all {n} layers (torch)": lambda: dec_all(x),
    }
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times = {k: [] for k in variants}
    for _ in range(rounds):
        for k, fn in variants.items():
            times[k].append(_time(fn))
    rate = {k: batch / statistics.median(v) for k, v in times.items()}
    names = list(rate)
    return dict(arch=arch, batch=batch, rounds=rounds, threads=torch.get_num_threads(), images_per_s=rate,
                ratios=dict(decompose_vs_forward_siglip=rate[names[1]] / rate[names[0]],
                            decompose_all_vs_forward_siglip=rate[names[2]] / rate[names[0]]))


@torch.no_grad()
def bench_text_encode(texts: list[str], arch: str = "ViT-B-32", batch_size: int = 256, rounds: int = 3,
                      warmup_texts: int = 16) -> dict:
    """Seconds to embed `texts`: `encode_texts` (sorted by tokenised length, each batch cut at its
    longest text) vs open_clip's `encode_text` on full-context batches of the same size, in the
    caller's order, normalised. Random weights, CPU; interleaved rounds, medians of wall and process
    CPU seconds. Tokenising is timed in both. Also the max abs difference of the two outputs."""
    from models.registry import encode_texts
    lm = load_model(arch, random_init=True, seed=0)

    def open_clip_path() -> torch.Tensor:                                    # [M, d]
        out = [torch.nn.functional.normalize(lm.model.encode_text(lm.tokenizer(texts[i:i + batch_size])).float(), dim=-1)
               for i in range(0, len(texts), batch_size)]                    # [B, d] each, B x L tokens
        return torch.cat(out)

    variants = {"open_clip": open_clip_path, "encode_texts": lambda: encode_texts(lm, texts, batch_size)}
    encode_texts(lm, texts[:warmup_texts], batch_size)                       # first-call allocations
    lm.model.encode_text(lm.tokenizer(texts[:warmup_texts]))
    wall = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    outs = {}
    for _ in range(rounds):
        for k, fn in variants.items():
            t, c = time.perf_counter(), time.process_time()
            outs[k] = fn()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    w = {k: statistics.median(v) for k, v in wall.items()}
    c = {k: statistics.median(v) for k, v in cpu.items()}
    tokens = lm.tokenizer(texts)
    return dict(
        arch=arch, texts=len(texts), batch_size=batch_size, rounds=rounds, threads=torch.get_num_threads(),
        context=tokens.shape[1], mean_tokens=float((tokens.argmax(-1) + 1).float().mean()),
        open_clip_s=w["open_clip"], encode_texts_s=w["encode_texts"],
        open_clip_cpu_s=c["open_clip"], encode_texts_cpu_s=c["encode_texts"],
        text_encode_vs_open_clip=w["open_clip"] / w["encode_texts"],
        text_encode_vs_open_clip_cpu=c["open_clip"] / c["encode_texts"],
        max_abs_diff=float((outs["open_clip"] - outs["encode_texts"]).abs().max()),
    )
