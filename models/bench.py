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
