"""`run`: every job in order for one model and its datasets; `run-zoo`: the same for several models in
one process (what `make etl` and `make demo` run).

Both print, on stderr, one line per step as it starts and ends (``[2/5] toy-shapes/bundled: embed ...``,
``... done in 12.3 s``), and `run-zoo` ends with a table of the seconds per model and phase. Every
step resumes or skips what is stored, so a second run adds nothing and costs little: `run-zoo`
imports torch and open_clip once for all models (a process each cost about 5 CPU-s of imports
alone), and a model none of whose steps has anything left to do is not even loaded.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable

from etl.common import (UsageError, add_embed_args, add_model_args, add_warehouse_arg, device_arg,
                        load_model_from_args, warehouse_path)

STEPS = ("embed", "texts", "textspan", "label", "judge", "metrics", "ablate", "probe", "neurons")   # timed, in order

# The neurons step of the pipeline: one layer (auto), over at most this many images of the first
# dataset, and its zero-shot check on this many toy-eval scenes per set (kept cheap for `make etl`;
# `python -m etl neurons` runs the full job).
NEURON_IMAGES = 500
NEURON_EVAL_N = 200


def _pipeline_args(p) -> None:
    """The flags `run` and `run-zoo` share (besides the model and the warehouse)."""
    from etl.text.bank import PRODUCT_BANKS
    add_embed_args(p)
    p.add_argument("--text-file", default=None, help="a user text bank (one text per line, optional TAB tag) "
                                                     "instead of the product's own bank")
    p.add_argument("--bank", default=None, choices=PRODUCT_BANKS,
                   help="the product's bank to name heads with (default: the model's own, 'shapes' for the toy "
                        "models, 'atlas' for other CLIPs)")
    p.add_argument("--labeler", default="offline", choices=["offline", "llm"],
                   help="head labeler (default offline; llm needs OPENAI_API_KEY / OPENAI_BASE_URL)")
    p.add_argument("--llm-model", default=None, help="model name for --labeler llm")
    p.add_argument("--skip", action="append", default=[], choices=["ablate", "probe", "neurons"],
                   help="skip an optional step (repeatable)")
    p.add_argument("--force", action="store_true",
                   help="recompute the ablation, probes and neurons even when they are already stored (every "
                        "other step only does what is missing)")


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="all jobs in order: embed, texts, textspan, label, judge, metrics, ablate, probe, "
                                   "neurons",
                       description="Build (or complete: every step resumes) the warehouse for one model. "
                                   "Example: python -m etl run --model toy-shapes --dataset shapes:2000:seed=0 "
                                   "--dataset skimage --warehouse var/demo.duckdb")
    add_model_args(p)
    add_warehouse_arg(p)
    _pipeline_args(p)
    p.set_defaults(func=run)

    z = sub.add_parser("run-zoo", help="`run` for several models in one process, with a header per model and a "
                                       "summary of the time per phase (what `make etl` runs)",
                       description="Every job of `run`, for each --model in turn, in one process (torch and "
                                   "open_clip are imported once). A model is named as the warehouse names it: "
                                   "ARCH or ARCH/bundled (its shipped weights, e.g. toy-shapes), "
                                   "ARCH/random-seedN (random weights, seed N: a control), or ARCH/TAG (an "
                                   "open_clip pretrained tag, e.g. ViT-B-16/laion2b_s34b_b88k). A model whose "
                                   "steps have nothing left to do is not loaded. Example: python -m etl run-zoo "
                                   "--model toy-shapes-small --model toy-shapes --model toy-shapes/random-seed0 "
                                   "--dataset shapes:2000:seed=0 --dataset skimage")
    z.add_argument("--model", action="append", required=True, metavar="MODEL",
                   help="a model: ARCH, ARCH/bundled, ARCH/random-seedN or ARCH/TAG (repeat for several; built in "
                        "this order)")
    z.add_argument("--device", type=device_arg, default="cpu",
                   help="torch device: cpu (default), cuda or cuda:N (needs a GPU torch can use)")
    add_warehouse_arg(z)
    _pipeline_args(z)
    z.set_defaults(func=run_zoo)


def parse_model_spec(spec: str) -> dict:
    """A model as `run-zoo` takes it -> load_model's keyword arguments (arch, pretrained, random_init, seed).

    'toy-shapes' and 'toy-shapes/bundled': shipped weights; 'toy-shapes/random-seed3': random weights,
    seed 3; 'ViT-B-16/laion2b_s34b_b88k': an open_clip pretrained tag. Checkpoints need `run --checkpoint`.
    """
    import re
    spec = spec.strip()
    arch, _, tag = spec.partition("/")
    if not arch or spec.count("/") > 1:
        raise UsageError(f"model {spec!r} is not ARCH, ARCH/bundled, ARCH/random-seedN or ARCH/TAG "
                         "(e.g. toy-shapes, toy-shapes/random-seed0, ViT-B-16/laion2b_s34b_b88k)")
    if tag in ("", "bundled"):
        return {"arch": arch}
    m = re.fullmatch(r"random-seed(\d+)", tag)
    if m:
        return {"arch": arch, "random_init": True, "seed": int(m.group(1))}
    if tag.startswith("ckpt-"):
        raise UsageError(f"model {spec!r} was built from a checkpoint file; rebuild it with "
                         f"`python -m etl run --model {arch} --checkpoint FILE ...`")
    return {"arch": arch, "pretrained": tag}


def model_id_of(spec: dict) -> str:
    """The model_id a loaded spec gets (models.load_model's naming), without loading it."""
    if spec.get("random_init"):
        return f"{spec['arch']}/random-seed{spec.get('seed', 0)}"
    return f"{spec['arch']}/{spec.get('pretrained') or 'bundled'}"


class Progress:
    """One line per step on stderr, ``[k/n] model: step ...`` then ``... done in s``, and the seconds
    of every step kept for the summary (``timings[model][step]``)."""

    def __init__(self, n: int, out=None):
        self.n, self.k, self.model = n, 0, ""
        self.out = out or sys.stderr
        self.timings: dict[str, dict[str, float]] = {}

    def start_model(self, model_id: str) -> None:
        self.k += 1
        self.model = model_id
        self.timings[model_id] = {}

    def say(self, text: str) -> None:
        print(f"[{self.k}/{self.n}] {self.model}: {text}", file=self.out, flush=True)

    def step(self, name: str, fn: Callable, *a, **kw):
        self.say(f"{name} ...")
        t = time.perf_counter()
        out = fn(*a, **kw)
        took = round(time.perf_counter() - t, 1)
        self.timings[self.model][name] = round(self.timings[self.model].get(name, 0.0) + took, 1)
        skipped = isinstance(out, dict) and out.get("skipped") or (isinstance(out, list) and out and all(
            isinstance(o, dict) and o.get("embedded") == 0 and not o.get("errors") for o in out))
        self.say(f"{name} {'(nothing new) ' if skipped else ''}done in {took:.1f} s")
        return out


def pipeline(path: str, lm, args, progress: Progress) -> None:
    """Every job in order for one loaded model (the body of `run`), each resuming or skipping what is
    stored; JSON lines of each job's counts on stdout, progress lines on stderr."""
    from etl.datasets import open_dataset
    from etl.jobs import ablate, embed, judge, label, metrics, neurons, probe, texts, textspan
    from models import default_bank
    layers = embed.model_layers(lm, args.layers)
    embed.check_batch_fits(lm, args.batch_size, len(layers))
    datasets = [open_dataset(spec) for spec in args.dataset]  # fail early on a bad name

    def step(name, fn, *a, **kw):
        out = progress.step(name, fn, *a, **kw)
        if isinstance(out, dict):
            print(json.dumps(out))
        return out

    step("embed", embed.embed_datasets, path, lm, args.dataset, layers, args.backend, args.providers,
         args.batch_size, args.loader_workers)
    bank = args.bank or default_bank(lm.spec["arch"])
    if args.text_file:
        step("texts", texts.load_texts, path, lm.model_id, text_file=args.text_file)
        bank = Path(args.text_file).stem
    else:
        step("texts", texts.load_texts, path, lm.model_id, bank=bank)
    step("textspan", textspan.textspan, path, lm.model_id, bank=bank)
    llm = dict(llm_model=args.llm_model)
    step("label", label.label, path, lm.model_id, args.labeler, **llm)
    step("judge", judge.judge, path, lm.model_id, "llm" if args.labeler == "llm" else "tag", **llm)
    models_scores, _ = step("metrics", metrics.metrics, path, lm.model_id)
    for row in models_scores:
        print(json.dumps(row, default=float))
    labelled = [d for d in datasets if d.source == "shapes" or len(getattr(d, "classes", [])) >= 2]
    if labelled and "ablate" not in args.skip:
        step("ablate", ablate.ablate, path, lm, args.dataset[datasets.index(labelled[0])], args.layers,
             force=args.force)
    for d in datasets:
        if d.source == "shapes" and "probe" not in args.skip:
            step("probe", probe.probe, path, lm.model_id, d.dataset_id, force=args.force)

    if "neurons" not in args.skip:
        # the layer whose neurons reach the later heads most, over the first dataset's first images
        step("neurons", neurons.neurons, path, lm.model_id, args.dataset[0], bank=bank, max_images=NEURON_IMAGES,
             eval_n=NEURON_EVAL_N, force=args.force, lm=lm)

def run(args) -> int:
    """The pipeline for one model: every job in order, called as functions; each resumes or skips what is stored."""
    from warehouse.runs import changed_since_start, run_record
    path = warehouse_path(args)
    lm = load_model_from_args(args)
    progress = Progress(1)
    progress.start_model(lm.model_id)
    with run_record(path, "run", pipeline_params(lm.model_id, args)) as run_id:
        pipeline(path, lm, args, progress)
        run_id.skipped = not changed_since_start(path, run_id)      # every step skipped: so did `run`
    print(json.dumps({"model_id": lm.model_id, "warehouse": path, "seconds": progress.timings[lm.model_id]}))
    return 0


def code_fingerprint() -> str:
    """sha256 (16 hex) of the product's ETL and model code (every .py under etl/ and models/): part of a
    pipeline's run record, so a changed labeler, world or decomposition makes the next run do its steps."""
    import hashlib
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for f in sorted(p for d in ("etl", "models") for p in (root / d).rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def pipeline_params(model_id: str, args) -> dict:
    """What a pipeline's run record says it did: the model, its datasets and every setting of `run`."""
    return {"model_id": model_id, "datasets": list(args.dataset), "layers": args.layers, "backend": args.backend,
            "bank": args.bank, "text_file": args.text_file, "labeler": args.labeler, "llm_model": args.llm_model,
            "skip": sorted(set(args.skip)), "code": code_fingerprint()}


def run_zoo(args) -> int:
    """`run` for each --model in one process; a summary table of the seconds per model and phase. A model
    whose pipeline completed with the same settings and code, and which no job touched since
    (warehouse.runs.up_to_date), is not loaded at all."""
    from warehouse.runs import changed_since_start, run_record, up_to_date
    path = warehouse_path(args)
    specs = [parse_model_spec(m) for m in args.model]           # every name is checked before any work
    progress = Progress(len(specs))
    started = time.perf_counter()
    for spec in specs:
        model_id = model_id_of(spec)
        progress.start_model(model_id)
        t = time.perf_counter()
        params = pipeline_params(model_id, args)
        if not args.force and up_to_date(path, "run", params):
            with run_record(path, "run", params) as run_id:
                run_id.skipped = True
            progress.timings[model_id]["load"] = round(time.perf_counter() - t, 1)
            progress.say("its pipeline completed with these settings and nothing changed since: nothing to do")
            continue
        progress.say("loading the model ...")
        from models import load_model
        lm = load_model(spec["arch"], pretrained=spec.get("pretrained"), random_init=spec.get("random_init", False),
                        seed=spec.get("seed", 0), device=args.device)
        progress.timings[model_id]["load"] = round(time.perf_counter() - t, 1)
        with run_record(path, "run", pipeline_params(lm.model_id, args)) as run_id:
            pipeline(path, lm, args, progress)
            run_id.skipped = not changed_since_start(path, run_id)
    total = round(time.perf_counter() - started, 1)
    print(summary(progress.timings, total), file=sys.stderr, flush=True)
    print(json.dumps({"warehouse": path, "seconds": progress.timings, "total_s": total}))
    return 0


def summary(timings: dict[str, dict[str, float]], total: float) -> str:
    """A plain-text table: one row per model, one column per phase (seconds), totals last."""
    phases = [p for p in ("load", *STEPS) if any(p in t for t in timings.values())]
    phases += sorted({p for t in timings.values() for p in t} - set(phases))     # a step added later shows too
    width = max([len("total")] + [len(m) for m in timings])
    head = f"{'model':<{width}}" + "".join(f"{p:>10}" for p in phases) + f"{'sum':>10}"
    lines = ["", "Time per phase (seconds):", head, "-" * len(head)]
    for m, t in timings.items():
        lines.append(f"{m:<{width}}" + "".join(f"{t.get(p, 0.0):>10.1f}" for p in phases)
                     + f"{sum(t.values()):>10.1f}")
    col = {p: sum(t.get(p, 0.0) for t in timings.values()) for p in phases}
    lines.append(f"{'total':<{width}}" + "".join(f"{col[p]:>10.1f}" for p in phases) + f"{sum(col.values()):>10.1f}")
    lines.append(f"{len(timings)} model(s) in {total:.1f} s ({int(total // 60)} min {total % 60:.0f} s)")
    return "\n".join(lines)
