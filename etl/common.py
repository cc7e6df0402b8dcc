"""Flags and helpers shared by the jobs: model selection, warehouse path, progress bars, LLM flags."""
from __future__ import annotations

import argparse
import math
import os
import re
from typing import Callable, Iterable

from tqdm import tqdm


class UsageError(ValueError):
    """A flag or input the user can fix; the message says what was wrong and what to do."""


def user_error_types() -> tuple:
    """Exceptions whose message is meant for the user (printed as one line, without a traceback):
    the product's own errors, bad values, and files that are missing, unreadable or unwritable."""
    import sys
    from warehouse import WarehouseError
    found = [UsageError, WarehouseError, ValueError, OSError]
    # the models' errors only when `models` was imported (an error cannot come from a module that
    # never loaded, and importing it here would load torch just to print a line)
    for module, names in (("models.registry", ["ModelError"]), ("models.images", ["ImageError"])):
        if module in sys.modules:
            found += [getattr(sys.modules[module], n) for n in names]
    return tuple(found)


# --------------------------------------------------------------------------- flag types
# argparse `type=` functions: a bad value is refused while the flags are parsed, with a message
# that names the value and what is accepted (argparse adds the flag's name).

def _number(kind: Callable, text: str) -> int | float:
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (batch sizes, counts, steps, threads)."""
    value = _number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer (use 1 or more)")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (seeds, retries, start indices)."""
    value = _number(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative (use 0 or more)")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (timeouts, learning rates, scales)."""
    value = _number(float, text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number (use a value above 0)")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (loss weights, weight decay, warm-up)."""
    value = _number(float, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative (use 0 or more)")
    return value


def probability(text: str) -> float:
    """A number in [0, 1]."""
    value = _number(float, text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a probability (use a value from 0 to 1)")
    return value


def open_unit(text: str) -> float:
    """A number in (0, 1] (shares, significance levels)."""
    value = _number(float, text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1] (use a value above 0, at most 1)")
    return value


# --------------------------------------------------------------------------- the machine
# Flags that set parallelism or the size of what is held at once are checked against the machine
# while the flags are parsed: a value it cannot hold is one error line (exit 2), not a fork bomb,
# a swap storm or a job that dies hours in. The per-item figures are floors (the least one item
# costs); the embed job checks its batch again against the model's own size once it is loaded.

LOADER_WORKER_BYTES = 300 * 2**20   # a loader process: one image decoded (models.images caps it at 200 MB) + its batches
IMAGE_BYTES_MIN = 2**20             # one image in a model batch, at the least (a 64 px toy: ~0.7 MB of activations)
TEXT_BYTES_MIN = 2**18              # one text in a text-encoder batch, at the least (77 tokens x 512 x 4 B, a few buffers)
DATASET_IMAGE_BYTES = 256           # one image of a dataset in a job's memory, at the least (its id in the set of those done)
MAX_DATASET_IMAGES = 2**31 - 1      # the warehouse counts images in INTEGER columns


def machine_cores() -> int:
    """CPU cores this process may use: its affinity mask, or a cgroup (v2) CPU quota when lower."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def machine_memory() -> int:
    """Bytes of memory this process may use: physical memory, or a cgroup (v2) limit when lower."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        total = 8 * 2**30
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit != "max":
            total = min(total, int(limit))
    except (OSError, ValueError):
        pass
    return int(total)


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GB"


def _size(n: float) -> str:
    return f"{n / 2**20:,.2f} MB" if n >= 2**20 else f"{n / 2**10:,.2f} KB" if n >= 2**10 else f"{n:,.0f} B"


def fits_in_memory(count: int, each: int, what: str, share: float = 0.5) -> None:
    """ArgumentTypeError unless ``count`` items of ``each`` bytes fit in ``share`` of the machine's memory."""
    budget = int(machine_memory() * share)
    if count * each > budget:
        raise argparse.ArgumentTypeError(
            f"{count:,} {what} need at least {_gib(count * each)} ({_size(each)} each) but this machine "
            f"has {_gib(machine_memory())} of memory (use at most {max(1, budget // each):,})")


def loader_workers(text: str) -> int:
    """Loader processes: 0 (a thread) up to one per CPU core, as many as the memory holds."""
    value = non_negative_int(text)
    cores = machine_cores()
    if value > cores:
        raise argparse.ArgumentTypeError(f"{value:,} is more than this machine's {cores} CPU core(s) (use at most "
                                         f"{cores}; 0: one thread in the job's process)")
    fits_in_memory(value, LOADER_WORKER_BYTES, "loader processes")
    return value


def image_batch(text: str) -> int:
    """Images per model batch (at least 1; as many as half the memory holds at IMAGE_BYTES_MIN each)."""
    value = positive_int(text)
    fits_in_memory(value, IMAGE_BYTES_MIN, "images in one batch")
    return value


def text_batch(text: str) -> int:
    """Texts per text-encoder batch (at least 1; as many as half the memory holds at TEXT_BYTES_MIN each)."""
    value = positive_int(text)
    fits_in_memory(value, TEXT_BYTES_MIN, "texts in one batch")
    return value


def dataset_spec(text: str) -> str:
    """A --dataset: ``shapes:N[:seed=S]`` is checked here (N at most MAX_DATASET_IMAGES and what the
    memory holds at DATASET_IMAGE_BYTES an image); folders, manifests and 'skimage' when opened."""
    if text.strip().startswith("shapes"):
        from etl.world.shapes import parse_dataset_name
        try:
            n, _ = parse_dataset_name(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if n > MAX_DATASET_IMAGES:
            raise argparse.ArgumentTypeError(f"{text}: {n:,} scenes is more than a warehouse counts "
                                             f"(at most {MAX_DATASET_IMAGES:,})")
        fits_in_memory(n, DATASET_IMAGE_BYTES, f"scenes of {text}")
    return text


_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def device_arg(text: str) -> str:
    """A torch device this product runs on: cpu, cuda or cuda:N (whether the GPU exists is
    checked when the model loads)."""
    value = text.strip().lower()
    if not _DEVICE_RE.match(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device this product runs on (use cpu, cuda or cuda:N)")
    return value


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("model (one open_clip ViT with class-token pooling)")
    g.add_argument("--model", required=required, metavar="ARCH",
                   help="open_clip architecture name, e.g. ViT-B-16, or the bundled 'toy-shapes'")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--pretrained", metavar="TAG",
                     help="open_clip pretrained tag as open_clip.list_pretrained() prints it, e.g. laion2b_s34b_b88k")
    src.add_argument("--checkpoint", metavar="FILE", help="local checkpoint (.pt, .bin or .safetensors state dict)")
    src.add_argument("--random-init", action="store_true", help="random weights (tests, benchmarks)")
    g.add_argument("--seed", type=non_negative_int, default=0, help="seed for --random-init (default 0)")
    g.add_argument("--device", type=device_arg, default="cpu",
                   help="torch device: cpu (default), cuda or cuda:N (needs a GPU torch can use)")
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
    """--warehouse, else $ATLAS_HOME/warehouse.duckdb, checked (a folder, a path under a file or a
    file that is not DuckDB is a WarehouseError at once). Nothing is created here: a writer creates
    the file and its folder, a reader of a missing warehouse gets WarehouseMissingError."""
    from warehouse import check_location, default_warehouse_path
    return str(check_location(args.warehouse or default_warehouse_path(create=False)))


def progress(it: Iterable, **kw):
    """tqdm on stderr; quiet when ATLAS_NO_PROGRESS is set (tests)."""
    return tqdm(it, disable=bool(os.environ.get("ATLAS_NO_PROGRESS")), dynamic_ncols=True, **kw)


def add_embed_args(p) -> None:
    p.add_argument("--dataset", action="append", required=True, metavar="SPEC", type=dataset_spec,
                   help="shapes:N:seed=S, skimage, an image folder (ImageFolder or flat), or a CSV manifest "
                        "(columns path[,label][,caption]); repeat for several")
    p.add_argument("--layers", default="auto", help="analysed layers: auto (default: every layer of a model with at most 12 layers, the last 4 of deeper ones), all, last4, lastN, or 0-based indices")
    p.add_argument("--backend", default="onnx", choices=["onnx", "torch"], help="onnxruntime (default) or torch")
    p.add_argument("--providers", default=None, choices=["cpu", "cuda"], help="onnxruntime provider (default: CUDA if usable)")
    p.add_argument("--batch-size", type=image_batch, default=64,
                   help="images per model batch (default 64; the writer coalesces batches into transactions; "
                        "checked against the machine's memory)")
    p.add_argument("--loader-workers", type=loader_workers, default=None, metavar="N",
                   help="processes that read, decode and preprocess images ahead of the model "
                        "(default: with the model on a GPU one per spare core, at most 8; on the CPU one per "
                        "8 cores; 0: one thread in the job's process; at most one per CPU core)")


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


def choose_bank(path: str, model_id: str, arch: str, bank: str | None) -> str:
    """The text bank a job draws from: ``bank`` when given, else the only bank embedded for the
    model, else the model's default ('shapes' for the toy models, 'atlas' for other CLIPs); a
    ValueError naming the embedded banks when its texts are not embedded for the model."""
    from models import default_bank
    from warehouse.queries import embedded_banks
    banks = embedded_banks(path, model_id)
    if bank is None:
        bank = banks[0] if len(banks) == 1 else default_bank(arch)
    if bank not in banks:
        raise ValueError(f"no texts of bank {bank!r} are embedded for model {model_id!r} (embedded banks: "
                         f"{', '.join(banks) or 'none'}). Run `python -m etl texts --model {model_id}` "
                         f"(add --text-file for your own bank) first.")
    return bank


def add_llm_args(p) -> None:
    """Flags of the LLM labeler and judge (shared by `label` and `judge`)."""
    g = p.add_argument_group("LLM (an OpenAI-compatible endpoint: OPENAI_API_KEY, OPENAI_BASE_URL)")
    g.add_argument("--llm-model", metavar="NAME", default=None,
                   help="chat model name, e.g. gpt-4o-mini, or whatever model your OPENAI_BASE_URL endpoint serves")
    g.add_argument("--llm-timeout", type=positive_float, default=60.0, metavar="S",
                   help="wall-clock seconds per attempt, enforced outside the HTTP client: connecting, headers "
                        "and the whole answer (default 60); a call takes at most (retries + 1) x S plus the "
                        "waits between attempts (each at most 30 s)")
    g.add_argument("--llm-retries", type=non_negative_int, default=5, metavar="N",
                   help="retries after a 429, 5xx, timeout or dropped connection, with exponential backoff "
                        "(default 5)")


def make_llm(llm_model: str | None, vocabulary: dict[str, str], timeout: float = 60.0, retries: int = 5):
    """The LLM labeler/judge for an OpenAI-compatible endpoint."""
    from etl.text.labelers import LLMLabeler
    if not llm_model:
        raise ValueError("the LLM labeler needs --llm-model NAME (e.g. gpt-4o-mini)")
    return LLMLabeler(llm_model, vocabulary, timeout_s=timeout, max_retries=retries)
