"""`metrics`: print the scores of MATH.md §5 (SQL views over the warehouse) for a model."""
from __future__ import annotations

import json

from etl.common import add_warehouse_arg, warehouse_path


def add_parser(sub) -> None:
    p = sub.add_parser("metrics", help="print association/entanglement (the head_scores and model_scores views)",
                       description="The scores are SQL views (warehouse/migrations/002_scores.sql), always current: "
                                   "this job prints them as JSON lines (it writes nothing).")
    p.add_argument("--model", default=None, metavar="MODEL_ID", help="one model_id (default: every model)")
    add_warehouse_arg(p)
    p.add_argument("--heads", action="store_true", help="also print one line per head")
    p.add_argument("--study", action="store_true",
                   help="print the size study instead: per model, smallest image tower first, association and "
                        "entanglement with 95 %% intervals over heads and, on each shapes dataset, label agreement "
                        "and false-label rate with Wilson intervals (a Markdown table)")
    p.set_defaults(func=run)


def run(args) -> int:
    path = warehouse_path(args)
    if args.study:
        print(study_table(path))
        return 0
    models, heads = metrics(path, args.model, args.heads)
    for row in models + heads:
        print(json.dumps(row, default=float))
    return 0


def metrics(path: str, model_id: str | None = None, heads: bool = False) -> tuple[list[dict], list[dict]]:
    """The model_scores rows (and head_scores rows with ``heads``) of one model or all. The scores are
    views, always current: nothing is computed or written, so no run is recorded."""
    from warehouse.queries import score_rows
    models, head_rows = score_rows(path, model_id, heads)
    if not models:
        raise ValueError("no labelled heads yet: run `python -m etl textspan` and `python -m etl label` first")
    return models, head_rows


def study_table(path: str) -> str:
    """The size study (warehouse.queries.model_study) as a Markdown table."""
    from warehouse.queries import model_study
    df = model_study(path)
    if df.empty:
        raise ValueError("no labelled heads yet: run `python -m etl run` for the models to compare")

    def ci(v, lo, hi):
        return "–" if v != v or v is None else f"{v:.2f} [{max(lo, 0):.2f}, {min(hi, 1):.2f}]"

    lines = ["| model | layers x width, heads | labelled heads | association | entanglement | dataset | "
             "agreement (right / specialised) | false labels (false / unspecialised) |",
             "|---|---|---:|---|---|---|---|---|"]
    for r in df.itertuples():
        has_truth = isinstance(r.dataset_id, str)
        lines.append(
            f"| {r.model_id} | {r.layers} x {r.width}, {r.heads} | {r.n_heads} | "
            f"{ci(r.association, r.association_lo, r.association_hi)} | "
            f"{ci(r.entanglement, r.entanglement_lo, r.entanglement_hi)} | {r.dataset_id if has_truth else '–'} | "
            + (f"{ci(r.agreement, r.agreement_lo, r.agreement_hi)} ({r.n_right}/{r.n_specialised}) | "
               f"{ci(r.false_label_rate, r.false_lo, r.false_hi)} ({r.n_false}/{r.n_unspecialised}) |"
               if has_truth else "– | – |"))
    return "\n".join(lines)
