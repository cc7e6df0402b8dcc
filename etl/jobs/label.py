"""`label`: a property label for every head with TextSpan texts (MATH.md §4) -> `head_labels`.

    python -m etl label --model toy-shapes/bundled                                    # offline
    OPENAI_API_KEY=... python -m etl label --model ViT-B-16/laion2b_s34b_b88k --labeler llm --llm-model gpt-4o-mini

Heads already labelled by the same labeler and prompt are skipped (--force relabels them);
labels are committed every --batch-size heads, so a killed run keeps what it wrote and a
re-run carries on. A head whose LLM answer is unusable gets no label and a row in `errors`.
"""
from __future__ import annotations

import json
from collections import Counter

from etl.common import (add_llm_args, add_warehouse_arg, make_llm, model_row_or_fail, open_unit, positive_int,
                        probability, progress, warehouse_path)


def with_model_agreement(path: str, model_id: str, heads_per_layer: int, heads: dict, todo: list,
                         text_ids: list[str], tags: list, T) -> dict:
    """``heads`` with ``HeadText.agreement`` set for the heads in ``todo`` (etl.text.labelers.
    model_agreement): each tagged text against the mean of its property's texts, over the
    images TextSpan used. text_ids, tags, T [M, d]: the bank's texts embedded for the model.
    Reads one layer's head embeddings at a time."""
    from dataclasses import replace

    import numpy as np

    from etl.text.labelers import agreement_p_value, model_agreement
    from warehouse.queries import head_text_dataset, image_matrix, layer_head_matrix
    dataset = head_text_dataset(path, model_id)
    row_of = {t: i for i, t in enumerate(text_ids)}
    means = {p: T[[i for i, t in enumerate(tags) if t == p]].mean(0) for p in set(tags) if p is not None}
    Z = image_matrix(path, model_id, dataset)                                        # [n, d]
    out = dict(heads)
    for layer in sorted({l for l, _ in todo}):
        C = layer_head_matrix(path, model_id, layer, heads_per_layer, dataset)        # [n, H, d]
        for head in sorted(h for l, h in todo if l == layer):
            texts = heads[(layer, head)]
            checked = [i for i, (tid, ht) in enumerate(texts) if tid in row_of and ht.tag in means]
            if not checked:
                continue
            rho = model_agreement(C[:, head], Z, T[[row_of[texts[i][0]] for i in checked]],
                                  np.stack([means[texts[i][1].tag] for i in checked]))
            new = list(texts)
            for i, r in zip(checked, rho):
                new[i] = (texts[i][0], replace(texts[i][1], agreement=float(r),
                                               agreement_p=agreement_p_value(r, len(Z))))
            out[(layer, head)] = new
    return out


def add_parser(sub) -> None:
    p = sub.add_parser("label", help="label every analysed head with a property (head_labels)",
                       description="Give each head with TextSpan texts a property label: offline (the "
                                   "variance-weighted majority of its texts' property tags, counting only texts "
                                   "that the rest of the model reads the way the head does; 'mixed' below "
                                   "--threshold or when shuffled tags reach the share too often, --alpha) or by an "
                                   "LLM (few-shot prompt, JSON answer checked against the property vocabulary, "
                                   "answers cached under $ATLAS_HOME/cache/llm). Resumable.")
    add_warehouse_arg(p)
    p.add_argument("--model", metavar="MODEL_ID", required=True,
                   help="a model_id of the warehouse `models` table whose heads have TextSpan texts")
    p.add_argument("--labeler", choices=["offline", "llm"], default="offline",
                   help="offline (default: needs property-tagged texts) or llm (needs OPENAI_API_KEY)")
    p.add_argument("--threshold", type=probability, default=None, metavar="SHARE",
                   help="offline: below this share of the head's variance in voting texts the label is 'mixed' "
                        "(default 0.15)")
    p.add_argument("--majority", type=probability, default=None, metavar="SHARE",
                   help="offline: the winning property must also carry this share of the variance of all voting "
                        "texts (default 0.6)")
    p.add_argument("--alpha", type=open_unit, default=None, metavar="P",
                   help="offline: also require the winning share to beat the same texts with tags shuffled over "
                        "the bank at this significance (default 1: the p-value is recorded, not required)")
    p.add_argument("--min-votes", type=positive_int, default=None, metavar="N",
                   help="offline: texts of the winning property that must vote (default 2)")
    p.add_argument("--no-agreement-check", action="store_true",
                   help="offline: let every tagged text vote, without checking that the rest of the model reads "
                        "it as the head does (the check needs the image embeddings; it is on by default)")
    p.add_argument("--force", action="store_true", help="relabel heads already labelled by this labeler")
    p.add_argument("--batch-size", type=positive_int, default=16, metavar="N", help="heads per write transaction (default 16)")
    add_llm_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    print(json.dumps(label(warehouse_path(args), args.model, args.labeler, threshold=args.threshold,
                           majority=args.majority, alpha=args.alpha,
                           min_votes=args.min_votes, agreement_check=not args.no_agreement_check, force=args.force,
                           batch_size=args.batch_size, llm_model=args.llm_model, llm_timeout=args.llm_timeout,
                           llm_retries=args.llm_retries)))
    return 0


def label(path: str, model_id: str, labeler: str = "offline", *, threshold: float | None = None,
          majority: float | None = None, alpha: float | None = None, min_votes: int | None = None, agreement_check: bool = True,
          force: bool = False, batch_size: int = 16, llm_model: str | None = None, llm_timeout: float = 60.0,
          llm_retries: int = 5) -> dict:
    """Label every head with TextSpan texts not yet labelled by this labeler and prompt; returns counts."""
    from etl.text.labelers import (OFFLINE_AGREEMENT, OFFLINE_AGREEMENT_P, OFFLINE_ALPHA, OFFLINE_MIN_VOTES,
                                   OFFLINE_MAJORITY, OFFLINE_THRESHOLD, OfflineLabeler, stored_head_texts, vocabulary)
    from warehouse.queries import bank_text_matrix, head_label_state, head_text_banks
    from warehouse.runs import run_record
    if batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    if min_votes is not None and min_votes < 1:
        raise ValueError("--min-votes must be at least 1")
    row = model_row_or_fail(path, model_id)
    vocab = vocabulary(path)
    heads = stored_head_texts(path, model_id)
    done = {h: (lab, ph) for h, (lab, ph, _) in head_label_state(path, model_id).items()}
    if not heads:
        raise ValueError(f"no heads of {model_id!r} have TextSpan texts: run `python -m etl textspan "
                         f"--model {model_id}` first")
    bank = None
    if labeler == "offline":
        banks = head_text_banks(path, model_id)
        if len(banks) > 1:
            raise ValueError(f"the TextSpan texts of {model_id!r} come from several banks ({', '.join(banks)}); "
                             f"recompute them from one with `python -m etl textspan --model {model_id} "
                             "--bank NAME --force`")
        bank = bank_text_matrix(path, model_id, banks[0]) if banks else None     # (text_ids, tags, T)
        chosen = OfflineLabeler(vocab, OFFLINE_THRESHOLD if threshold is None else threshold,
                                bank_tags=bank[1] if bank else None,
                                alpha=OFFLINE_ALPHA if alpha is None else alpha,
                                min_votes=OFFLINE_MIN_VOTES if min_votes is None else min_votes,
                                agreement_min=OFFLINE_AGREEMENT if agreement_check else -1.0,
                                agreement_p_max=OFFLINE_AGREEMENT_P if agreement_check else 1.0,
                                majority=OFFLINE_MAJORITY if majority is None else majority)
    else:
        chosen = make_llm(llm_model, vocab, llm_timeout, llm_retries)
    todo = [h for h in heads if force or done.get(h) != (chosen.name, chosen.prompt_hash)]
    if bank and todo and agreement_check:
        heads = with_model_agreement(path, model_id, int(row["heads"]), heads, todo, *bank)
    params = {"model_id": model_id, "labeler": chosen.name, "prompt_hash": chosen.prompt_hash,
              "threshold": getattr(chosen, "threshold", None), "force": force, "heads": len(todo)}
    counts, failed, pending = Counter(), 0, []
    with run_record(path, "label", params) as run_id:
        run_id.skipped = not todo
        try:
            for layer, head in progress(todo, desc=f"label {model_id}", unit="head"):
                result = chosen.label([ht for _, ht in heads[(layer, head)]])
                pending.append((layer, head, result))
                if result.error:
                    failed += 1
                else:
                    counts[result.property] += 1
                if len(pending) >= batch_size:
                    _write(path, model_id, run_id, pending)
                    pending = []
        finally:
            _write(path, model_id, run_id, pending)      # keep what was answered, even on LLMError
    return {"model_id": model_id, "labeler": chosen.name, "heads_labelled": sum(counts.values()),
            "heads_failed": failed, "heads_skipped": len(heads) - len(todo), "labels": dict(counts.most_common())}


def _write(path: str, model_id: str, run_id: str, pending: list) -> None:
    from warehouse import head_name, writer, writes
    from warehouse.runs import record_error
    if not pending:
        return
    with writer(path) as con:
        for layer, head, result in pending:
            if result.error:
                raw = (result.raw or "")[:500]
                record_error(con, run_id, f"{model_id} {head_name(layer, head)}",
                             f"{result.labeler}: {result.error}" + (f" (raw answer: {raw!r})" if raw else ""))
                continue
            writes.replace_head_label(con, model_id, layer, head, property=result.property,
                                      confidence=result.confidence, labeler=result.labeler,
                                      prompt_hash=result.prompt_hash, raw=result.raw, run_id=run_id,
                                      p_value=result.p_value)
