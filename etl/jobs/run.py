"""`run`: every job in order for one model and its datasets (the main job of `make demo`)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from etl.common import add_model_args, add_warehouse_arg, load_model_from_args, warehouse_path


def add_parser(sub) -> None:
    from etl.text.bank import PRODUCT_BANKS
    p = sub.add_parser("run", help="all jobs in order: embed, texts, textspan, label, judge, metrics, ablate, probe",
                       description="Build (or complete: every step resumes) the warehouse for one model. "
                                   "Example: python -m etl run --model toy-shapes --dataset shapes:2000:seed=0 "
                                   "--dataset skimage --warehouse var/demo.duckdb")
    add_model_args(p)
    add_warehouse_arg(p)
    from etl.jobs.embed import add_embed_args
    add_embed_args(p)
    p.add_argument("--text-file", default=None, help="a user text bank (one text per line, optional TAB tag) "
                                                     "instead of the product's own bank")
    p.add_argument("--bank", default=None, choices=PRODUCT_BANKS,
                   help="the product's bank to name heads with (default: the model's own, 'shapes' for the toy "
                        "models, 'atlas' for other CLIPs)")
    p.add_argument("--labeler", default="offline", choices=["offline", "llm"],
                   help="head labeler (default offline; llm needs OPENAI_API_KEY / OPENAI_BASE_URL)")
    p.add_argument("--llm-model", default=None, help="model name for --labeler llm")
    p.add_argument("--skip", action="append", default=[], choices=["ablate", "probe"],
                   help="skip an optional step (repeatable)")
    p.set_defaults(func=run)


def run(args) -> int:
    from etl.cli import main
    from etl.datasets import open_dataset
    from etl.jobs.embed import embed, model_layers
    from warehouse.runs import run_record
    path = warehouse_path(args)
    lm = load_model_from_args(args)
    layers = model_layers(lm, args.layers)
    model_flags = ["--model", args.model] + (["--pretrained", args.pretrained] if args.pretrained else []) \
        + (["--checkpoint", args.checkpoint] if args.checkpoint else []) \
        + (["--random-init", "--seed", str(args.seed)] if args.random_init else []) + ["--device", args.device]
    wh = ["--warehouse", path]
    timings = {}

    def step(name, argv):
        t = time.perf_counter()
        code = main(argv)
        timings[name] = round(time.perf_counter() - t, 1)
        if code:
            raise SystemExit(code)

    datasets = [open_dataset(spec) for spec in args.dataset]  # fail early on a bad name
    t = time.perf_counter()
    for spec in args.dataset:
        params = {"model_id": lm.model_id, "dataset": spec, "layers": layers, "backend": args.backend}
        with run_record(path, "embed", params) as run_id:
            print(json.dumps({"model_id": lm.model_id, **embed(path, lm, spec, layers, args.backend,
                                                              args.providers, args.batch_size, run_id)}))
    timings["embed"] = round(time.perf_counter() - t, 1)
    from models import default_bank
    bank = args.bank or default_bank(lm.spec["arch"])
    step("texts", ["texts", "--model", lm.model_id, *wh,
                   *(["--text-file", args.text_file] if args.text_file else ["--bank", bank])])
    bank_name = ["--bank", Path(args.text_file).stem] if args.text_file else ["--bank", bank]
    step("textspan", ["textspan", "--model", lm.model_id, *wh, *bank_name])
    step("label", ["label", "--model", lm.model_id, *wh, "--labeler", args.labeler]
         + (["--llm-model", args.llm_model] if args.llm_model else []))
    step("judge", ["judge", "--model", lm.model_id, *wh]
         + (["--judge", "llm"] + (["--llm-model", args.llm_model] if args.llm_model else [])
            if args.labeler == "llm" else []))
    step("metrics", ["metrics", "--model", lm.model_id, *wh])
    labelled = [d for d in datasets if d.source == "shapes" or len(getattr(d, "classes", [])) >= 2]
    if labelled and "ablate" not in args.skip:
        step("ablate", ["ablate", *model_flags, *wh, "--dataset", args.dataset[datasets.index(labelled[0])],
                        "--layers", args.layers])
    for d in datasets:
        if d.source == "shapes" and "probe" not in args.skip:
            step(f"probe {d.dataset_id}", ["probe", "--model", lm.model_id, *wh, "--dataset", d.dataset_id])
    print(json.dumps({"model_id": lm.model_id, "warehouse": path, "seconds": timings}))
    return 0
