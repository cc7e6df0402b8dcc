"""Decomposition throughput, side by side in one process (issue 2 §5).

Variants run interleaved round by round, in reverse order every other round (so none always runs
right after another, in the same allocator and cache state), so machine noise hits them alike.
Rates are batch / median seconds; each ratio is the median over rounds of that round's paired
ratio (a slow stretch of the host slows both sides of one round, not one side of the median).
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


def _interleaved(variants: dict, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per round of each variant: warm-up rounds first, then ``rounds`` rounds, each running
    every variant once, in reverse order every other round."""
    names = list(variants)
    for _ in range(warmup):
        for k in names:
            variants[k]()
    times = {k: [] for k in names}
    for i in range(rounds):
        for k in (names if i % 2 == 0 else names[::-1]):
            times[k].append(_time(variants[k]))
    return times


def _paired(times: dict[str, list[float]], fast: str, base: str) -> float:
    """Rate of ``fast`` over rate of ``base``: the median over rounds of t_base / t_fast."""
    return statistics.median(b / f for b, f in zip(times[base], times[fast]))


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
        times = _interleaved(variants, rounds, warmup)
    rate = {k: batch / statistics.median(v) for k, v in times.items()}
    names = list(rate)
    return dict(
        arch=arch, batch=batch, rounds=rounds, threads=torch.get_num_threads(), images_per_s=rate,
        ratios=dict(
            decompose_vs_forward=_paired(times, names[1], names[0]),
            decompose_tokens_vs_forward=_paired(times, names[2], names[0]),
            onnx_vs_torch=_paired(times, names[3], names[1]),
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
    times = _interleaved(variants, rounds, warmup)
    rate = {k: batch / statistics.median(v) for k, v in times.items()}
    names = list(rate)
    return dict(arch=arch, batch=batch, rounds=rounds, threads=torch.get_num_threads(), images_per_s=rate,
                ratios=dict(decompose_vs_forward_siglip=_paired(times, names[1], names[0]),
                            decompose_all_vs_forward_siglip=_paired(times, names[2], names[0])))


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


@torch.no_grad()
def bench_second_order(arch: str = "ViT-B-16", layer: int = 9, batch: int = 8, rounds: int = 5, warmup: int = 1) -> dict:
    """The second-order lens (models.neurons, MATH.md §10) against one forward pass, random weights, CPU.

    Variants, interleaved round by round, each on the same images in the model's CPU micro-batches:
    `encode_image` (the forward pass), the lens's own forward pass (`trace`: blocks before `layer`
    fused, later blocks by hand keeping the class-row attention and ln_1 scales, the MLP's activations
    kept), and trace + alpha for the layer's N neurons x K later heads. Ratios (medians):
    second_order_vs_forward = (trace + alpha - forward) / forward, the extra cost of alpha per MLP
    layer; second_order_alpha_only_vs_forward = (trace + alpha - trace) / forward."""
    from models.decompose import cpu_micro_batch
    from models.neurons import SecondOrderLens
    lm = load_model(arch, random_init=True, seed=0)
    x = torch.randn(batch, 3, lm.image_size, lm.image_size)
    T = 1 + lm.grid[0] * lm.grid[1]
    step = cpu_micro_batch(T, lm.visual.transformer.resblocks[0].mlp.c_fc.out_features)
    lens = SecondOrderLens(lm.visual, [layer])
    chunks = x.split(step)
    variants = {
        "encode_image": lambda: [lm.model.encode_image(c) for c in chunks],
        "trace": lambda: [lens.trace(c) for c in chunks],
        "trace + alpha": lambda: [lens.alpha(lens.trace(c), layer) for c in chunks],
    }
    times = _interleaved(variants, rounds, warmup)
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(arch=arch, layer=layer, neurons=lens.n_neurons[layer], later_heads=len(lens.heads(layer)),
                batch=batch, micro_batch=step, rounds=rounds, threads=torch.get_num_threads(),
                seconds=med, images_per_s={k: batch / v for k, v in med.items()},
                second_order_vs_forward=(med["trace + alpha"] - med["encode_image"]) / med["encode_image"],
                second_order_alpha_only_vs_forward=(med["trace + alpha"] - med["trace"]) / med["encode_image"])
