"""`metrics`: print the scores of MATH.md §5 (SQL views over the warehouse) for a model."""
from __future__ import annotations

import json

from etl.common import add_warehouse_arg, warehouse_path


def add_parser(sub) -> None:
    p = sub.add_parser("metrics", help="print association/entanglement (the head_scores and model_scores views)",
                       description="The scores are SQL views (warehouse/migrations/002_scores.sql), always current: "
                                   "this job prints them as JSON lines and records a run.")
    p.add_argument("--model", default=None, metavar="MODEL_ID", help="one model_id (default: every model)")
    add_warehouse_arg(p)
    p.add_argument("--heads", action="store_true", help="also print one line per head")
    p.set_defaults(func=run)


def run(args) -> int:
    from warehouse import connect
    from warehouse.runs import run_record
    path = warehouse_path(args)
    where, params = ("WHERE model_id = ?", [args.model]) if args.model else ("", [])
    with run_record(path, "metrics", {"model_id": args.model}):
        with connect(path) as con:
            models = con.execute(f"SELECT model_id, association, entanglement, n_heads FROM model_scores {where} "
                                 "ORDER BY model_id", params).fetchall()
            heads = con.execute(f"SELECT model_id, layer, head, property, association, entanglement FROM head_scores "
                                f"{where} ORDER BY model_id, layer, head", params).fetchall() if args.heads else []
    if not models:
        raise ValueError("no labelled heads yet: run `python -m etl textspan` and `python -m etl label` first")
    for m in models:
        print(json.dumps(dict(zip(["model_id", "association", "entanglement", "n_heads"], m))))
    for h in heads:
        print(json.dumps(dict(zip(["model_id", "layer", "head", "property", "association", "entanglement"], h))))
    return 0
