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

from etl.common import (add_llm_args, add_warehouse_arg, make_llm, model_row_or_fail, positive_int, progress,
                        warehouse_path)


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
    p.add_argument("--batch-size", type=positive_int, default=16, metavar="N", help="heads per write transaction (default 16)")
    add_llm_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    print(json.dumps(judge(warehouse_path(args), args.model, args.judge, force=args.force, batch_size=args.batch_size,
                           llm_model=args.llm_model, llm_timeout=args.llm_timeout, llm_retries=args.llm_retries)))
    return 0


def judge(path: str, model_id: str, judge_kind: str = "tag", *, force: bool = False, batch_size: int = 16,
          llm_model: str | None = None, llm_timeout: float = 60.0, llm_retries: int = 5) -> dict:
    """Judge the texts of every labelled head not yet judged by this judge; returns counts."""
    from etl.text.labelers import MIXED, OfflineLabeler, stored_head_texts, vocabulary
    from warehouse.queries import head_label_state, judged_texts
    from warehouse.runs import run_record
    if batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    model_row_or_fail(path, model_id)
    vocab = vocabulary(path)
    all_labels = {h: p for h, (_, _, p) in head_label_state(path, model_id).items()}
    labels = {h: p for h, p in all_labels.items() if p != MIXED}
    texts = stored_head_texts(path, model_id)
    done = judged_texts(path, model_id, "tag" if judge_kind == "tag" else f"llm:{llm_model}")
    if not all_labels:
        raise ValueError(f"no heads of {model_id!r} carry a property label: run `python -m etl label "
                         f"--model {model_id}` first")
    chosen = OfflineLabeler(vocab) if judge_kind == "tag" else make_llm(llm_model, vocab, llm_timeout, llm_retries)
    work = [(head, prop, [(tid, ht) for tid, ht in texts.get(head, []) if force or (*head, tid, prop) not in done])
            for head, prop in sorted(labels.items())]
    work = [w for w in work if w[2]]
    params = {"model_id": model_id, "judge": chosen.judge_name, "force": force, "heads": len(work),
              "prompt_hash": getattr(chosen, "judge_prompt_hash", chosen.prompt_hash)}
    judged = associated = failed = 0
    pending = []
    with run_record(path, "judge", params) as run_id:
        run_id.skipped = not work
        try:
            for head, prop, items in progress(work, desc=f"judge {model_id}", unit="head"):
                for tid, ht in items:
                    j = chosen.match(ht, prop)
                    pending.append((head, tid, prop, j))
                    if j.error:
                        failed += 1
                    else:
                        judged += 1
                        associated += bool(j.associated)
                if len({p[0] for p in pending}) >= batch_size:
                    _write(path, model_id, run_id, pending)
                    pending = []
        finally:
            _write(path, model_id, run_id, pending)
    return {"model_id": model_id, "judge": chosen.judge_name, "judged": judged, "associated": associated,
            "failed": failed, "mixed_heads": len(all_labels) - len(labels)}


def _write(path: str, model_id: str, run_id: str, pending: list) -> None:
    from warehouse import head_name, writer, writes
    from warehouse.runs import record_error
    if not pending:
        return
    with writer(path) as con:
        for (layer, head), tid, prop, j in pending:
            if j.error:
                raw = (j.raw or "")[:500]
                record_error(con, run_id, f"{model_id} {head_name(layer, head)} text {tid}",
                             f"{j.judge}: {j.error}" + (f" (raw answer: {raw!r})" if raw else ""))
                continue
            writes.replace_text_judgment(con, model_id, layer, head, tid, prop, bool(j.associated), j.judge, run_id)
