"""`run`: every job in order for one model and its datasets (the main job of `make demo`)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from etl.common import add_embed_args, add_model_args, add_warehouse_arg, load_model_from_args, warehouse_path

# The neurons step of the pipeline: one layer (auto), over at most this many images of the first
# dataset, and its zero-shot check on this many toy-eval scenes per set (kept cheap for `make etl`;
# `python -m etl neurons` runs the full job).
NEURON_IMAGES = 500
NEURON_EVAL_N = 200


def add_parser(sub) -> None:
    from etl.text.bank import PRODUCT_BANKS
    p = sub.add_parser("run", help="all jobs in order: embed, texts, textspan, label, judge, metrics, ablate, probe, "
                                   "neurons",
                       description="Build (or complete: every step resumes) the warehouse for one model. "
                                   "Example: python -m etl run --model toy-shapes --dataset shapes:2000:seed=0 "
                                   "--dataset skimage --warehouse var/demo.duckdb")
    add_model_args(p)
    add_warehouse_arg(p)
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
    p.set_defaults(func=run)


def run(args) -> int:
    """The pipeline: every job in order, called as functions; each resumes or skips what is stored."""
    from etl.datasets import open_dataset
    from etl.jobs import ablate, embed, judge, label, metrics, neurons, probe, texts, textspan
    from models import default_bank
    path = warehouse_path(args)
    lm = load_model_from_args(args)
    layers = embed.model_layers(lm, args.layers)
    datasets = [open_dataset(spec) for spec in args.dataset]  # fail early on a bad name
    timings = {}

    def step(name, fn, *a, **kw):
        t = time.perf_counter()
        out = fn(*a, **kw)
        timings[name] = round(time.perf_counter() - t, 1)
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
            step(f"probe {d.dataset_id}", probe.probe, path, lm.model_id, d.dataset_id, force=args.force)
    if "neurons" not in args.skip:
        # the layer whose neurons reach the later heads most, over the first dataset's first images
        step("neurons", neurons.neurons, path, lm.model_id, args.dataset[0], bank=bank, max_images=NEURON_IMAGES,
             eval_n=NEURON_EVAL_N, force=args.force, lm=lm)
    print(json.dumps({"model_id": lm.model_id, "warehouse": path, "seconds": timings}))
    return 0
