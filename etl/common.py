"""Flags and helpers shared by the jobs: model selection, warehouse path, progress bars, LLM flags."""
from __future__ import annotations

import argparse
import os
from typing import Iterable

from tqdm import tqdm


def user_error_types() -> tuple:
    """Exceptions whose message is meant for the user (printed without a traceback)."""
    from models import ImageError, ModelError
    from warehouse import WarehouseError
    return (ModelError, ImageError, FileNotFoundError, ValueError, WarehouseError)


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("model (one open_clip ViT with class-token pooling)")
    g.add_argument("--model", required=required, metavar="ARCH",
                   help="open_clip architecture name, e.g. ViT-B-16, or the bundled 'toy-shapes'")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--pretrained", metavar="TAG",
                     help="open_clip pretrained tag as open_clip.list_pretrained() prints it, e.g. laion2b_s34b_b88k")
    src.add_argument("--checkpoint", metavar="FILE", help="local checkpoint (.pt, .bin or .safetensors state dict)")
    src.add_argument("--random-init", action="store_true", help="random weights (tests, benchmarks)")
    g.add_argument("--seed", type=int, default=0, help="seed for --random-init (default 0)")
    g.add_argument("--device", default="cpu", help="torch device: cpu (default) or cuda")
    g.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="weights precision; fp16/bf16 need a GPU (default fp32)")


def load_model_from_args(args):
    from models import load_model
    return load_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint,
                      random_init=args.random_init, seed=args.seed, device=args.device,
                      precision=getattr(args, "precision", "fp32"))


def add_warehouse_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--warehouse", metavar="PATH", default=None,
                   help="DuckDB warehouse file (default: $ATLAS_HOME/warehouse.duckdb, ATLAS_HOME defaults to ./var)")


def warehouse_path(args) -> str:
    from warehouse import default_warehouse_path
    return str(args.warehouse or default_warehouse_path())


def progress(it: Iterable, **kw):
    """tqdm on stderr; quiet when ATLAS_NO_PROGRESS is set (tests)."""
    return tqdm(it, disable=bool(os.environ.get("ATLAS_NO_PROGRESS")), dynamic_ncols=True, **kw)


def add_embed_args(p) -> None:
    p.add_argument("--dataset", action="append", required=True, metavar="SPEC",
                   help="shapes:N:seed=S, skimage, an image folder (ImageFolder or flat), or a CSV manifest "
                        "(columns path[,label][,caption]); repeat for several")
    p.add_argument("--layers", default="auto", help="analysed layers: auto (default: every layer of a model with at most 12 layers, the last 4 of deeper ones), all, last4, lastN, or 0-based indices")
    p.add_argument("--backend", default="onnx", choices=["onnx", "torch"], help="onnxruntime (default) or torch")
    p.add_argument("--providers", default=None, choices=["cpu", "cuda"], help="onnxruntime provider (default: CUDA if usable)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch and per write transaction (default 64)")


def model_row_or_fail(path: str, model_id: str) -> dict:
    """The `models` row of ``model_id``; a ValueError naming the known models when absent."""
    from warehouse.queries import model_ids, model_row
    try:
        return model_row(path, model_id)
    except KeyError:
        raise ValueError(f"model {model_id!r} is not in the warehouse {path} (models there: "
                         f"{', '.join(model_ids(path)) or 'none'}). Embed images with it first, e.g. "
                         f"`python -m etl embed --model <arch> ... --warehouse {path}`, and pass the model_id "
                         f"that job prints.") from None


def add_llm_args(p) -> None:
    """Flags of the LLM labeler and judge (shared by `label` and `judge`)."""
    g = p.add_argument_group("LLM (an OpenAI-compatible endpoint: OPENAI_API_KEY, OPENAI_BASE_URL)")
    g.add_argument("--llm-model", metavar="NAME", default=None,
                   help="chat model name, e.g. gpt-4o-mini, or whatever model your OPENAI_BASE_URL endpoint serves")
    g.add_argument("--llm-timeout", type=float, default=60.0, metavar="S", help="total seconds per request, answer included (default 60)")
    g.add_argument("--llm-retries", type=int, default=5, metavar="N",
                   help="retries after a 429, 5xx, timeout or dropped connection, with exponential backoff "
                        "(default 5)")


def make_llm(llm_model: str | None, vocabulary: dict[str, str], timeout: float = 60.0, retries: int = 5):
    """The LLM labeler/judge for an OpenAI-compatible endpoint."""
    from etl.text.labelers import LLMLabeler
    if not llm_model:
        raise ValueError("the LLM labeler needs --llm-model NAME (e.g. gpt-4o-mini)")
    return LLMLabeler(llm_model, vocabulary, timeout_s=timeout, max_retries=retries)
