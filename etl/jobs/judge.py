"""`judge`: match(text, property) of MATH.md §5 for every labelled head's texts -> `text_judgments`.

    python -m etl judge --model toy-shapes/bundled                          # by tag (default)
    python -m etl judge --model ViT-B-16/laion2b_s34b_b88k --judge llm --llm-model gpt-4o-mini

For each head labelled with a property (not 'mixed') and each of its TextSpan texts, records
whether the text expresses the head's property: by the text's tag, or by asking an LLM
("1 if associated, 0 if not"; answers cached). The score views prefer these judgments over
tags. Judgments already made by the same judge are skipped (--force redoes them).
"""
from __future__ import annotations

import json

from etl.common import add_warehouse_arg, progress, warehouse_path
from etl.jobs.label import add_llm_args, head_texts, make_llm, vocabulary


def add_parser(sub) -> None:
    p = sub.add_parser("judge", help="judge whether each head text expresses the head's label (text_judgments)",
                       description="For every labelled head (not 'mixed') and each of its TextSpan texts, store "
                                   "match(text, label): by the text's property tag (default) or by an LLM. "
                                   "Resumable; unusable LLM answers go to `errors`.")
    add_warehouse_arg(p)
    p.add_argument("--model", metavar="MODEL_ID", required=True,
                   help="a model_id of the warehouse `models` table whose heads are labelled (run `label` first)")
    p.add_argument("--judge", choices=["tag", "llm"], default="tag",
                   help="tag (default: the text's property tag equals the label) or llm (needs OPENAI_API_KEY)")
    p.add_argument("--force", action="store_true", help="judge again texts this judge has already judged")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="heads per write transaction (default 16)")
    add_llm_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from etl.jobs.texts import model_row_or_fail
    from etl.text.labelers import MIXED, OfflineLabeler
    from warehouse import connect
    from warehouse.runs import run_record
    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    path = warehouse_path(args)
    model_row_or_fail(path, args.model)
    with connect(path) as con:
        vocab = vocabulary(con)
        all_labels = con.execute("SELECT layer, head, property FROM head_labels WHERE model_id = ?",
                                 [args.model]).fetchall()
        labels = {(int(l), int(h)): p for l, h, p in all_labels if p != MIXED}
        texts = head_texts(con, args.model)
        done = {(int(l), int(h), t, p) for l, h, t, p in con.execute(
            "SELECT layer, head, text_id, property FROM text_judgments WHERE model_id = ? AND judge = ?",
            [args.model, "tag" if args.judge == "tag" else f"llm:{args.llm_model}"]).fetchall()}
    if not all_labels:
        raise ValueError(f"no heads of {args.model!r} carry a property label: run `python -m etl label "
                         f"--model {args.model}` first")
    judge = OfflineLabeler(vocab) if args.judge == "tag" else make_llm(args, vocab)
    work = [(head, prop, [(tid, ht) for tid, ht in texts.get(head, []) if args.force or (*head, tid, prop) not in done])
            for head, prop in sorted(labels.items())]
    work = [w for w in work if w[2]]
    params = {"model_id": args.model, "judge": judge.judge_name, "force": args.force, "heads": len(work),
              "prompt_hash": getattr(judge, "judge_prompt_hash", judge.prompt_hash)}
    judged = associated = failed = 0
    pending = []
    with run_record(path, "judge", params) as run_id:
        try:
            for head, prop, items in progress(work, desc=f"judge {args.model}", unit="head"):
                for tid, ht in items:
                    j = judge.match(ht, prop)
                    pending.append((head, tid, prop, j))
                    if j.error:
                        failed += 1
                    else:
                        judged += 1
                        associated += bool(j.associated)
                if len({p[0] for p in pending}) >= args.batch_size:
                    _write(path, args.model, run_id, pending)
                    pending = []
        finally:
            _write(path, args.model, run_id, pending)
    print(json.dumps({"model_id": args.model, "judge": judge.judge_name, "judged": judged,
                      "associated": associated, "failed": failed, "mixed_heads": len(all_labels) - len(labels)}))
    return 0


def _write(path: str, model_id: str, run_id: str, pending: list) -> None:
    from warehouse import writer
    from warehouse.runs import record_error
    if not pending:
        return
    with writer(path) as con:
        for (layer, head), tid, prop, j in pending:
            if j.error:
                raw = (j.raw or "")[:500]
                record_error(con, run_id, f"{model_id} L{layer}.H{head} text {tid}",
                             f"{j.judge}: {j.error}" + (f" (raw answer: {raw!r})" if raw else ""))
                continue
            con.execute("DELETE FROM text_judgments WHERE model_id = ? AND layer = ? AND head = ? AND text_id = ? "
                        "AND property = ?", [model_id, layer, head, tid, prop])
            con.execute("INSERT INTO text_judgments (model_id, layer, head, text_id, property, associated, judge, "
                        "run_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        [model_id, layer, head, tid, prop, bool(j.associated), j.judge, run_id])
