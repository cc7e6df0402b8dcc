"""Flags and helpers shared by the jobs: model selection, warehouse path, progress bars."""
from __future__ import annotations

import argparse
import os
from typing import Iterable

import numpy as np
import pyarrow as pa
from tqdm import tqdm


def user_error_types() -> tuple:
    """Exceptions whose message is meant for the user (printed without a traceback)."""
    from models import ImageError, ModelError
    types = [ModelError, ImageError, FileNotFoundError, ValueError]
    try:
        from warehouse.db import WarehouseError  # type: ignore
        types.append(WarehouseError)
    except ImportError:
        pass
    return tuple(types)


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


def atlas_home() -> str:
    home = os.environ.get("ATLAS_HOME", "var")
    os.makedirs(home, exist_ok=True)
    return home


def progress(it: Iterable, **kw):
    """tqdm on stderr; quiet when ATLAS_NO_PROGRESS is set (tests)."""
    return tqdm(it, disable=bool(os.environ.get("ATLAS_NO_PROGRESS")), dynamic_ncols=True, **kw)


def vector_column(a: np.ndarray) -> pa.Array:
    """[n, d] float32 -> an Arrow list<float> column for a FLOAT[] warehouse column (no Python loop)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])
    return fixed.cast(pa.list_(pa.float32()))
