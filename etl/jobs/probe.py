"""`probe` (per-head ground truth from stored embeddings: probes and eta2, stored) and
`probe-heads` (the same probes on freshly generated scenes, printed). The math is etl/world/probes.py."""
from __future__ import annotations

import argparse
import json

import numpy as np

from etl.common import add_warehouse_arg, warehouse_path
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
    q.add_argument("--seed", type=int, default=0, help="train/test split seed (default 0)")
    q.set_defaults(func=run_probe)



    p = sub.add_parser("probe-heads", help="per-head linear probes against the shapes factors, on fresh scenes",
                       description=probes.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy-shapes",
                   help="open_clip architecture with bundled weights (default toy-shapes)")
    p.add_argument("--checkpoint", default=None, help="weights file instead of the bundled weights")
    p.add_argument("--n", type=int, default=2000, help="number of shapes scenes (default 2000)")
    p.add_argument("--seed", type=int, default=2,
                   help="shapes-world seed of the scenes and of the train/test split (default 2)")
    p.add_argument("--layers", default="all", help="layers to probe: all | lastN | 0,1,2 (default all)")
    p.add_argument("--format", choices=["table", "json"], default="table",
                   help="table (one row per head) or json (one line per head x factor)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.set_defaults(func=run_probe_heads)


def run_probe(args) -> int:
    from etl.text.bank import WORLD_FACTOR_PROPERTIES
    from warehouse import connect, writer
    from warehouse.runs import run_record
    path = warehouse_path(args)
    with connect(path) as con:
        rows = con.execute(
            "SELECT h.image_id, h.layer, h.head, h.vec FROM head_embeddings h JOIN images i USING (image_id) "
            "WHERE h.model_id = ? AND i.dataset_id = ? ORDER BY h.image_id, h.layer, h.head",
            [args.model, args.dataset]).fetchall()
        facts = con.execute(
            "SELECT f.image_id, f.factor, f.value FROM image_factors f JOIN images i USING (image_id) "
            "WHERE i.dataset_id = ?", [args.dataset]).fetchall()
    if not rows or not facts:
        raise ValueError(f"no head embeddings with factor labels for model {args.model} on {args.dataset}: "
                         f"run `python -m etl embed --model ... --dataset {args.dataset}` first (a shapes dataset)")
    ids = sorted({r[0] for r in rows})
    layers = sorted({r[1] for r in rows})
    heads = sorted({r[2] for r in rows})
    index = {i: k for k, i in enumerate(ids)}
    d = len(rows[0][3])
    X = np.zeros((len(ids), len(layers), len(heads), d), np.float32)            # [n, L', H, d]
    for image_id, l, h, vec in rows:
        X[index[image_id], layers.index(l), heads.index(h)] = vec
    by_factor: dict[str, list] = {}
    for image_id, factor, value in facts:
        by_factor.setdefault(factor, [None] * len(ids))
        if image_id in index:
            by_factor[factor][index[image_id]] = value
    with run_record(path, "probe", {"model_id": args.model, "dataset": args.dataset}) as run_id:
        result = probes.probe_matrix(X, by_factor, seed=args.seed, layers=layers)
        eta2 = probes.factor_variance(X, by_factor, layers=layers)
        with writer(path) as con:
            con.executemany("INSERT INTO factor_properties (factor, property) VALUES (?, ?) "
                            "ON CONFLICT (factor) DO UPDATE SET property = excluded.property",
                            list(WORLD_FACTOR_PROPERTIES.items()))
            con.execute("DELETE FROM head_factor_variance WHERE model_id = ? AND dataset_id = ?",
                        [args.model, args.dataset])
            con.executemany("INSERT INTO head_factor_variance (model_id, dataset_id, layer, head, factor, eta2, "
                            "run_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
                            [[args.model, args.dataset, r["layer"], r["head"], r["factor"], r["eta2"], run_id]
                             for r in eta2])
            con.execute("DELETE FROM probes WHERE model_id = ? AND dataset_id = ?", [args.model, args.dataset])
            con.executemany("INSERT INTO probes VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            [[args.model, args.dataset, r["layer"], r["head"], r["factor"], r["accuracy"],
                              r["chance"], run_id] for r in result])
    print(json.dumps({"model_id": args.model, "dataset": args.dataset, "rows": len(result),
                      "eta2_rows": len(eta2)}))
    return 0


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
