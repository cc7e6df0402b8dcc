"""`metrics`: print the scores (SQL views of migrations 002 and 007) for a model, or the size study."""
from __future__ import annotations

import json

from etl.common import add_warehouse_arg, warehouse_path


def add_parser(sub) -> None:
    p = sub.add_parser("metrics", help="print every score of the models (association, tag entropy, kappa beside its "
                                       "baselines, the paper's scores as read, the label-free scores)",
                       description="The scores are SQL views (warehouse/migrations/002_scores.sql, 007_measures.sql), "
                                   "always current: this job prints them as JSON lines (it writes nothing).")
    p.add_argument("--model", default=None, metavar="MODEL_ID", help="one model_id (default: every model)")
    add_warehouse_arg(p)
    p.add_argument("--heads", action="store_true", help="also print one line per head")
    p.add_argument("--study", action="store_true",
                   help="print the size study instead (Markdown): the one `python -m etl study` stored last in this "
                        "warehouse, else the scores of the models in it, per model and dataset")
    p.set_defaults(func=run)


def run(args) -> int:
    path = warehouse_path(args)
    if args.study:
        print(study_report(path))
        return 0
    models, heads = metrics(path, args.model, args.heads)
    for row in models + heads:
        print(json.dumps(row, default=float))
    return 0


def metrics(path: str, model_id: str | None = None, heads: bool = False) -> tuple[list[dict], list[dict]]:
    """The model_scores rows (and head_scores rows with ``heads``) of one model or all, each with the
    paper's scores as read (`paper_scores`) and, per shapes dataset, every score of `model_measures`
    as [value, lo, hi]. The scores are views, always current: nothing is written, no run recorded."""
    from warehouse.queries import model_measures, paper_scores, score_rows
    models, head_rows = score_rows(path, model_id, heads)
    if not models:
        raise ValueError("no labelled heads yet: run `python -m etl textspan` and `python -m etl label` first")
    paper = paper_scores(path).set_index("model_id")
    measures = model_measures(path)
    for row in models:
        m = row["model_id"]
        if m in paper.index:
            row["paper_association"] = _num(paper.at[m, "association"])
            row["paper_entanglement"] = _num(paper.at[m, "entanglement"])
        mine = measures[measures.model_id == m]
        if len(mine):
            row["measures"] = {d: {r.score: [_num(r.value), _num(r.lo), _num(r.hi)] for r in g.itertuples()}
                               for d, g in mine.groupby("dataset_id")}
    return models, head_rows


def _num(v):
    return None if v is None or v != v else float(v)


def study_report(path: str) -> str:
    """The stored size study as Markdown (etl/world/study.py), else the per-model scores of this warehouse."""
    from etl.world import study as S
    from warehouse.queries import model_measures, study_tables
    t = study_tables(path)
    if len(t["verdicts"]):
        name = t["verdicts"].study.iloc[0]
        worlds = sorted(set(t["scores"].world_seed))
        seeds = t["seeds"]
        roles = "; ".join(f"{role}: {', '.join(map(str, sorted(g.seed)))}" for role, g in seeds.groupby("role"))
        return "\n".join([f"## Size study '{name}' on world seed(s) {', '.join(map(str, worlds))}",
                          f"(world seeds by role: {roles})", "", S.model_table(t["scores"].to_dict("records")), "",
                          S.markdown_table(t["sizes"].to_dict("records")), "", "Verdicts:"]
                         + [f"- {v}" for v in t["verdicts"].verdict])
    df = model_measures(path)
    if df.empty:
        raise ValueError("no scores on a shapes dataset yet: run `python -m etl run --model ... --dataset "
                         "shapes:N:seed=S` (or `python -m etl study`) first")
    rows = [dict(model_id=r.model_id, world_seed=r.dataset_id, size=f"{r.layers} x {r.width}"
                 if r.source != "random" else S.RANDOM, image_params=r.layers * r.width * r.width,
                 score=r.score, value=r.value, lo=r.lo, hi=r.hi) for r in df.itertuples()]
    return "Scores per model and shapes dataset (no stored study: `python -m etl study` makes one):\n\n" \
        + S.model_table(rows)
