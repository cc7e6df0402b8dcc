"""`probe` (per-head ground truth from stored embeddings: probes and eta2, stored) and
`probe-heads` (the same probes on freshly generated scenes, printed). The math is etl/world/probes.py."""
from __future__ import annotations

import argparse
import json

from etl.common import add_warehouse_arg, non_negative_int, positive_int, warehouse_path
from etl.world import probes


def add_parser(sub) -> None:
    q = sub.add_parser("probe", help="per-head ground truth for every shapes-world factor: linear probes (`probes`) "
                            "and variance shares eta2 (`head_factor_variance`)",
                       description="Reads head_embeddings and image_factors of a shapes dataset from the warehouse "
                                   "(run `embed` first) and stores, per head and factor, held-out probe accuracy "
                                   "and chance, and eta2: the share of the head's variance the factor's class "
                                   "means explain (MATH.md §7; views head_truth, label_agreement).")
    q.add_argument("--model", required=True, metavar="MODEL_ID", help="a model_id of the warehouse, e.g. toy-shapes/bundled")
    add_warehouse_arg(q)
    q.add_argument("--dataset", required=True, help="a shapes dataset already embedded, e.g. shapes:2000:seed=0")
    q.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of the cross-fitting folds and of the bootstrap (default 0)")
    q.add_argument("--force", action="store_true",
                   help="recompute even when this model, dataset and seed are already stored")
    q.add_argument("--bootstrap", type=non_negative_int, default=CODE_SCORE_BOOTSTRAP, metavar="B",
                   help="bootstrap resamples of the images behind the intervals of the label-free scores "
                        f"(`code_scores`: informativeness, DCI, MIG; default {CODE_SCORE_BOOTSTRAP}; 0: no interval)")
    q.set_defaults(func=run_probe)



    p = sub.add_parser("probe-heads", help="per-head linear probes against the shapes factors, on fresh scenes",
                       description=probes.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy-shapes",
                   help="open_clip architecture with bundled weights (default toy-shapes)")
    p.add_argument("--checkpoint", default=None, help="weights file instead of the bundled weights")
    p.add_argument("--n", type=positive_int, default=2000, help="number of shapes scenes (default 2000)")
    p.add_argument("--seed", type=non_negative_int, default=2,
                   help="shapes-world seed of the scenes and of the train/test split (default 2)")
    p.add_argument("--layers", default="all", help="layers to probe: all | lastN | 0,1,2 (default all)")
    p.add_argument("--format", choices=["table", "json"], default="table",
                   help="table (one row per head) or json (one line per head x factor)")
    p.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads (default 2)")
    p.set_defaults(func=run_probe_heads)


def run_probe(args) -> int:
    print(json.dumps(probe(warehouse_path(args), args.model, args.dataset, args.seed, args.force, args.bootstrap)))
    return 0


CODE_SCORE_BOOTSTRAP = 200
PROBE_FOLDS = 4                  # cross-fitting folds of the probes behind `probes` and `code_scores`
CODE_SCORES_VERSION = 1          # in the run's params: a warehouse probed before code_scores existed is re-probed


def probe(path: str, model_id: str, dataset_id: str, seed: int = 0, force: bool = False,
          bootstrap: int = CODE_SCORE_BOOTSTRAP) -> dict:
    """Per-head probes and eta2 of every factor from the stored head embeddings, and the label-free
    scores of the heads as codes (etl/world/disentanglement.py), stored; skipped (run 'skipped')
    when the same model, dataset, seed and bootstrap are already stored, unless ``force``."""
    from etl.text.bank import WORLD_FACTOR_PROPERTIES
    from etl.world import disentanglement
    from warehouse import writer, writes
    from warehouse.queries import factor_head_embeddings
    from warehouse.runs import completed_run, run_record
    params = {"model_id": model_id, "dataset": dataset_id, "seed": seed, "bootstrap": bootstrap,
              "folds": PROBE_FOLDS, "code_scores": CODE_SCORES_VERSION}
    if not force and completed_run(path, "probe", params):
        with run_record(path, "probe", params) as run_id:
            run_id.skipped = True
        return {"model_id": model_id, "dataset": dataset_id, "skipped": "already stored (--force recomputes)"}
    X, layers, by_factor = factor_head_embeddings(path, model_id, dataset_id)      # X: [n, L', H, d]
    if not len(X):
        raise ValueError(f"no head embeddings with factor labels for model {model_id} on {dataset_id}: "
                         f"run `python -m etl embed --model ... --dataset {dataset_id}` first (a shapes dataset)")
    with run_record(path, "probe", params) as run_id:
        # cross-fitted predictions (4 folds): every image is a test image once, for the probe accuracies and
        # the code scores' information alike (the plug-in information's upward bias grows with classes^2 /
        # test images: 4x smaller than on a 25 % test split)
        predictions = probes.probe_predictions(X, by_factor, seed=seed, layers=layers, folds=PROBE_FOLDS)
        result = probes.probe_rows(predictions, layers, X.shape[2])
        eta2 = probes.factor_variance(X, by_factor, layers=layers)
        joint = probes.joint_probe_predictions(X, by_factor, seed=seed, folds=PROBE_FOLDS)
        codes = disentanglement.code_scores(predictions, joint, len(X), n_boot=bootstrap, seed=seed)
        scores = [dict(score=k, value=codes.value[k], lo=codes.lo[k], hi=codes.hi[k], n_boot=bootstrap)
                  for k in disentanglement.SCORES]
        with writer(path) as con:
            writes.upsert_factor_properties(con, WORLD_FACTOR_PROPERTIES)
            writes.replace_probes(con, model_id, dataset_id, result, eta2, run_id)
            writes.replace_code_scores(con, model_id, dataset_id, scores, run_id)
    return {"model_id": model_id, "dataset": dataset_id, "rows": len(result), "eta2_rows": len(eta2),
            "code_scores": {k: round(codes.value[k], 4) for k in disentanglement.SCORES}}


def run_probe_heads(args) -> int:
    import torch
    from models import load_model
    from etl.world import shapes
    torch.set_num_threads(args.threads)
    lm = load_model(args.model) if args.checkpoint is None else load_model(args.model, checkpoint=args.checkpoint)
    size = lm.image_size if isinstance(lm.image_size, int) else lm.image_size[0]
    scenes = list(shapes.generate(args.n, args.seed, size))
    head_cls, layers = probes.head_embeddings_for_scenes(lm, scenes, args.layers)
    factors = {f: [s.factors[f] for s in scenes] for f in shapes.FACTORS}
    rows = probes.probe_matrix(head_cls, factors, seed=args.seed, layers=layers)
    if args.format == "json":
        for r in rows:
            print(json.dumps(r))
    else:
        print(f"# linear-probe test accuracy per head and factor; {lm.model_id}, "
              f"{shapes.dataset_name(args.n, args.seed)}, split seed {args.seed}")
        print(probes.format_matrix(rows))
    return 0
