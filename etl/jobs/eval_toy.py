"""`eval-toy`: zero-shot accuracy of a toy CLIP per shapes-world factor (etl/world/evaluate.py)."""
from __future__ import annotations

import argparse
import json

import models
from etl.common import non_negative_int, positive_int
from etl.world import evaluate
from etl.world.seeds import EVAL


def add_parser(sub) -> None:
    p = sub.add_parser("eval-toy", help="zero-shot accuracy of the toy CLIP per factor",
                       description=evaluate.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy-shapes", choices=models.toy_architectures(),
                   help="toy architecture (default toy-shapes)")
    p.add_argument("--seed", type=non_negative_int, default=EVAL,
                   help=f"shapes-world seed of the held-out scenes (training used 0-2, one per model seed; default "
                        f"{EVAL})")
    p.add_argument("--n", type=positive_int, default=2000, help="scenes per evaluation set (default 2000)")
    p.add_argument("--weights", default=None,
                   help="weights file to evaluate instead of the model's bundled weights")
    p.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads (default 2)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch
    torch.set_num_threads(args.threads)
    model, tok = evaluate.load_toy(args.weights, args.model)
    print(json.dumps({"model": args.model, **evaluate.evaluate(model, tok, seed=args.seed, n=args.n)}))
    return 0
