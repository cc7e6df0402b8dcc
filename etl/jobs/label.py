"""`label`: a property label for every head with TextSpan texts (MATH.md §4) -> `head_labels`.

    python -m etl label --model toy-shapes/bundled                                    # offline
    OPENAI_API_KEY=... python -m etl label --model ViT-B-16/laion2b_s34b_b88k --labeler llm --llm-model gpt-4o-mini

Heads already labelled by the same labeler and prompt are skipped (--force relabels them);
labels are committed every --batch-size heads, so a killed run keeps what it wrote and a
re-run carries on. A head whose LLM answer is unusable gets no label and a row in `errors`.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict

from etl.common import add_warehouse_arg, progress, warehouse_path


def add_llm_args(p) -> None:
    """Flags of the LLM labeler and judge (shared by `label` and `judge`)."""
    g = p.add_argument_group("LLM (an OpenAI-compatible endpoint: OPENAI_API_KEY, OPENAI_BASE_URL)")
    g.add_argument("--llm-model", metavar="NAME", default=None,
                   help="chat model name, e.g. gpt-4o-mini, or whatever model your OPENAI_BASE_URL endpoint serves")
    g.add_argument("--llm-timeout", type=float, default=60.0, metavar="S", help="seconds per request (default 60)")
    g.add_argument("--llm-retries", type=int, default=5, metavar="N",
                   help="retries after a 429, 5xx, timeout or dropped connection, with exponential backoff "
                        "(default 5)")


def make_llm(args, vocabulary: dict[str, str]):
    from etl.text.labelers import LLMLabeler
    if not args.llm_model:
        raise ValueError("the LLM labeler needs --llm-model NAME (e.g. gpt-4o-mini)")
    return LLMLabeler(args.llm_model, vocabulary, timeout_s=args.llm_timeout, max_retries=args.llm_retries)


def vocabulary(con) -> dict[str, str]:
    """The `properties` table as {property: description}; a ValueError when it is empty."""
    vocab = dict(con.execute("SELECT property, coalesce(description, '') FROM properties ORDER BY property").fetchall())
    if not vocab:
        raise ValueError("the warehouse has no properties yet: run `python -m etl texts` first")
    return vocab


def head_texts(con, model_id: str, where: str = "", params: list | None = None) -> dict:
    """{(layer, head): [(text_id, HeadText)]} in rank order, for heads of the model with texts."""
    from etl.text.labelers import HeadText
    rows = con.execute(
        "SELECT ht.layer, ht.head, ht.text_id, coalesce(t.text, ht.text_id), t.property, ht.variance_explained "
        "FROM head_texts ht LEFT JOIN texts t USING (text_id) "
        f"WHERE ht.model_id = ? {where} ORDER BY ht.layer, ht.head, ht.rank", [model_id] + (params or [])).fetchall()
    heads = defaultdict(list)
    for layer, head, tid, text, tag, var in rows:
        heads[(int(layer), int(head))].append((tid, HeadText(text, tag, float(var))))
    return dict(heads)


def with_model_agreement(path: str, model_id: str, heads_per_layer: int, heads: dict, todo: list,
                         text_ids: list[str], tags: list, T) -> dict:
    """``heads`` with ``HeadText.agreement`` set for the heads in ``todo`` (etl.text.labelers.
    model_agreement): each tagged text against the mean of its property's texts, over the
    images TextSpan used. text_ids, tags, T [M, d]: the bank's texts embedded for the model.
    Reads one layer's head embeddings at a time."""
    from dataclasses import replace

    import numpy as np

    from etl.text.labelers import agreement_p_value, model_agreement
    from warehouse import connect
    from warehouse.queries import image_matrix, layer_head_matrix
    with connect(path) as con:
        (dataset,) = con.execute("SELECT any_value(dataset_id) FROM head_texts WHERE model_id = ?", [model_id]).fetchone()
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
    p.add_argument("--threshold", type=float, default=None, metavar="SHARE",
                   help="offline: below this share of the head's variance in voting texts the label is 'mixed' "
                        "(default 0.35)")
    p.add_argument("--alpha", type=float, default=None, metavar="P",
                   help="offline: also require the winning share to beat the same texts with tags shuffled over "
                        "the bank at this significance (default 1: the p-value is recorded, not required)")
    p.add_argument("--min-votes", type=int, default=None, metavar="N",
                   help="offline: texts of the winning property that must vote (default 2)")
    p.add_argument("--no-agreement-check", action="store_true",
                   help="offline: let every tagged text vote, without checking that the rest of the model reads "
                        "it as the head does (the check needs the image embeddings; it is on by default)")
    p.add_argument("--force", action="store_true", help="relabel heads already labelled by this labeler")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="heads per write transaction (default 16)")
    add_llm_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from etl.jobs.texts import model_row_or_fail
    from etl.text.labelers import (OFFLINE_AGREEMENT, OFFLINE_AGREEMENT_P, OFFLINE_ALPHA, OFFLINE_MIN_VOTES,
                              OFFLINE_THRESHOLD, OfflineLabeler)
    from warehouse import connect
    from warehouse.queries import bank_text_matrix
    from warehouse.runs import run_record
    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    if args.min_votes is not None and args.min_votes < 1:
        raise ValueError("--min-votes must be at least 1")
    path = warehouse_path(args)
    row = model_row_or_fail(path, args.model)
    with connect(path) as con:
        vocab = vocabulary(con)
        heads = head_texts(con, args.model)
        done = {(int(l), int(h)): (lab, ph) for l, h, lab, ph in con.execute(
            "SELECT layer, head, labeler, prompt_hash FROM head_labels WHERE model_id = ?", [args.model]).fetchall()}
    if not heads:
        raise ValueError(f"no heads of {args.model!r} have TextSpan texts: run `python -m etl textspan "
                         f"--model {args.model}` first")
    bank = None
    if args.labeler == "offline":
        with connect(path) as con:
            banks = [r[0] for r in con.execute("SELECT DISTINCT bank FROM head_texts WHERE model_id = ? "
                                               "AND bank IS NOT NULL ORDER BY 1", [args.model]).fetchall()]
        if len(banks) > 1:
            raise ValueError(f"the TextSpan texts of {args.model!r} come from several banks ({', '.join(banks)}); "
                             f"recompute them from one with `python -m etl textspan --model {args.model} "
                             "--bank NAME --force`")
        bank = bank_text_matrix(path, args.model, banks[0]) if banks else None     # (text_ids, tags, T)
        labeler = OfflineLabeler(vocab, OFFLINE_THRESHOLD if args.threshold is None else args.threshold,
                                 bank_tags=bank[1] if bank else None,
                                 alpha=OFFLINE_ALPHA if args.alpha is None else args.alpha,
                                 min_votes=OFFLINE_MIN_VOTES if args.min_votes is None else args.min_votes,
                                 agreement_min=-1.0 if args.no_agreement_check else OFFLINE_AGREEMENT,
                                 agreement_p_max=1.0 if args.no_agreement_check else OFFLINE_AGREEMENT_P)
    else:
        labeler = make_llm(args, vocab)
    todo = [h for h in heads if args.force or done.get(h) != (labeler.name, labeler.prompt_hash)]
    if bank and todo and not args.no_agreement_check:
        heads = with_model_agreement(path, args.model, int(row["heads"]), heads, todo, *bank)
    params = {"model_id": args.model, "labeler": labeler.name, "prompt_hash": labeler.prompt_hash,
              "threshold": getattr(labeler, "threshold", None), "force": args.force, "heads": len(todo)}
    counts, failed, pending = Counter(), 0, []
    with run_record(path, "label", params) as run_id:
        try:
            for layer, head in progress(todo, desc=f"label {args.model}", unit="head"):
                label = labeler.label([ht for _, ht in heads[(layer, head)]])
                pending.append((layer, head, label))
                if label.error:
                    failed += 1
                else:
                    counts[label.property] += 1
                if len(pending) >= args.batch_size:
                    _write(path, args.model, run_id, pending)
                    pending = []
        finally:
            _write(path, args.model, run_id, pending)      # keep what was answered, even on LLMError
    print(json.dumps({"model_id": args.model, "labeler": labeler.name, "heads_labelled": sum(counts.values()),
                      "heads_failed": failed, "heads_skipped": len(heads) - len(todo),
                      "labels": dict(counts.most_common())}))
    return 0


def _write(path: str, model_id: str, run_id: str, pending: list) -> None:
    from warehouse import writer
    from warehouse.runs import record_error
    if not pending:
        return
    with writer(path) as con:
        for layer, head, label in pending:
            if label.error:
                raw = (label.raw or "")[:500]
                record_error(con, run_id, f"{model_id} L{layer}.H{head}",
                             f"{label.labeler}: {label.error}" + (f" (raw answer: {raw!r})" if raw else ""))
                continue
            con.execute("DELETE FROM head_labels WHERE model_id = ? AND layer = ? AND head = ?", [model_id, layer, head])
            con.execute("INSERT INTO head_labels (model_id, layer, head, property, confidence, labeler, prompt_hash, "
                        "raw, run_id, p_value) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [model_id, layer, head, label.property, label.confidence, label.labeler,
                         label.prompt_hash, label.raw, run_id, label.p_value])
