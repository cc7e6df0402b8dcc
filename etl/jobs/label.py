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

from etl.common import (add_llm_args, add_warehouse_arg, make_llm, model_row_or_fail, non_negative_int, open_unit,
                        positive_int, probability, progress, warehouse_path)


def retag(heads: dict, text_ids: list[str], tags: list) -> dict:
    """``heads`` ({head: [(text_id, HeadText)]}) with each bank text's tag taken from ``tags``
    (aligned with ``text_ids``); texts outside the bank keep theirs."""
    from dataclasses import replace
    row_of = {t: i for i, t in enumerate(text_ids)}
    return {h: [(tid, replace(ht, tag=tags[row_of[tid]]) if tid in row_of else ht) for tid, ht in texts]
            for h, texts in heads.items()}


def with_model_agreement(path: str, model_id: str, heads_per_layer: int, heads: dict, todo: list,
                         text_ids: list[str], tag_sets: list[list], T, zeroshot: list | None = None,
                         vocabulary=None) -> list[dict]:
    """For each tag set (the bank's tags, or a shuffle of them; aligned with ``text_ids``): ``heads``
    with each text's tag taken from that set and ``HeadText.agreement`` set for the heads in ``todo``
    (etl.text.labelers.model_agreement): each tagged text against the mean of its property's texts,
    over the images TextSpan used. T [M, d]: the bank's texts embedded for the model. Reads each
    layer's head embeddings once, for every tag set.

    ``zeroshot`` (offline-v8): a list with one dict per tag set, filled with {head: {property: share
    of the head's variance explained by the model's zero-shot classes of the property}}
    (etl.text.labelers.zeroshot_variances; the classes from that tag set's texts of each property of
    ``vocabulary``; at most ``OFFLINE_ZEROSHOT_IMAGES`` images, evenly spaced)."""
    from dataclasses import replace

    import numpy as np

    from etl.text.labelers import (agreement_p_value, model_agreement, zeroshot_classes, zeroshot_groups,
                                   zeroshot_images, zeroshot_variances)
    from warehouse.queries import head_text_dataset, image_matrix, layer_head_matrix
    dataset = head_text_dataset(path, model_id)
    row_of = {t: i for i, t in enumerate(text_ids)}
    Z = image_matrix(path, model_id, dataset)                                        # [n, d]
    outs = []
    for tags in tag_sets:
        means = {p: T[[i for i, t in enumerate(tags) if t == p]].mean(0) for p in set(tags) if p is not None}
        outs.append((tags, means, retag(heads, text_ids, tags)))
    rows = zeroshot_images(len(Z))
    classes = ([zeroshot_classes(Z[rows], T, tags, vocabulary if vocabulary is not None else sorted(means))
                for tags in tag_sets] if zeroshot is not None else None)
    groups = zeroshot_groups(classes, len(rows)) if classes is not None else None     # the same for every head
    for layer in sorted({l for l, _ in todo}):
        C = layer_head_matrix(path, model_id, layer, heads_per_layer, dataset)        # [n, H, d]
        for head in sorted(h for l, h in todo if l == layer):
            for tags, means, out in outs:
                texts = out[(layer, head)]
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
            if classes is not None:
                for d, e in enumerate(zeroshot_variances(C[rows, head], classes, groups)):
                    zeroshot[d][(layer, head)] = e
    return [out for _, _, out in outs]


def add_parser(sub) -> None:
    p = sub.add_parser("label", help="label every analysed head with a property (head_labels)",
                       description="Give each head with TextSpan texts a property label: offline (offline-v8: "
                                   "the property whose zero-shot reading by the model explains the most of the "
                                   "head's variance, at least 0.35 and 1.5x any other property's, named by one "
                                   "of its TextSpan texts; else 'mixed'. Without image embeddings or with "
                                   "--no-agreement-check, the text votes decide: the majority of its texts' "
                                   "property tags, each weighed by its variance times how strongly the rest of "
                                   "the model shares the head's reading of it, 'mixed' below --threshold, "
                                   "--majority, --min-votes or --alpha; their decision is kept beside v8's) or by "
                                   "an LLM (few-shot prompt, JSON answer checked against the property vocabulary, "
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
                   help="offline: the winning property must also carry this share of the evidence (variance x "
                        "|agreement|) of all voting texts (default 0.6)")
    p.add_argument("--alpha", type=open_unit, default=None, metavar="P",
                   help="offline: also require the winning share to beat the same texts with tags shuffled over "
                        "the bank at this significance (default 1: the p-value is recorded, not required)")
    p.add_argument("--min-votes", type=positive_int, default=None, metavar="N",
                   help="offline: texts of the winning property that must vote (default 2)")
    p.add_argument("--no-agreement-check", action="store_true",
                   help="offline: no zero-shot reading and no agreement check: every tagged text votes (both "
                        "need the image embeddings; on by default)")
    p.add_argument("--force", action="store_true", help="relabel heads already labelled by this labeler")
    p.add_argument("--batch-size", type=positive_int, default=16, metavar="N", help="heads per write transaction (default 16)")
    p.add_argument("--baseline-draws", type=non_negative_int, default=None, metavar="N",
                   help="draws of the tag-shuffled baseline labeler stored beside the labels (`baseline_labels`; "
                        "default 20; 0: none): the offline rule on the bank's tags permuted over its texts")
    add_llm_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    print(json.dumps(label(warehouse_path(args), args.model, args.labeler, threshold=args.threshold,
                           majority=args.majority, alpha=args.alpha,
                           min_votes=args.min_votes, agreement_check=not args.no_agreement_check, force=args.force,
                           batch_size=args.batch_size, llm_model=args.llm_model, llm_timeout=args.llm_timeout,
                           llm_retries=args.llm_retries, baseline_draws=args.baseline_draws)))
    return 0


def label(path: str, model_id: str, labeler: str = "offline", *, threshold: float | None = None,
          majority: float | None = None, alpha: float | None = None, min_votes: int | None = None, agreement_check: bool = True,
          force: bool = False, batch_size: int = 16, llm_model: str | None = None, llm_timeout: float = 60.0,
          llm_retries: int = 5, baseline_draws: int | None = None) -> dict:
    """Label every head with TextSpan texts not yet labelled by this labeler and prompt; returns counts.

    Beside each label, the tag-shuffled labeler's (``baseline_draws`` draws, `baseline_labels`):
    the offline labeler with these constants and checks, on the bank's tags permuted over its texts
    (etl.text.labelers.shuffled_tags), for the heads whose baseline is missing or was made with
    other constants. Needs a tagged bank; skipped otherwise."""
    from etl.text.labelers import (BASELINE, BASELINE_DRAWS, OFFLINE_AGREEMENT, OFFLINE_AGREEMENT_P, OFFLINE_ALPHA,
                                   OFFLINE_MIN_VOTES, OFFLINE_MAJORITY, OFFLINE_THRESHOLD, OfflineLabeler,
                                   shuffled_tags, stored_head_texts, vocabulary)
    from warehouse.queries import bank_text_matrix, baseline_label_state, head_label_state, head_text_banks
    from warehouse.runs import run_record
    if batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    if min_votes is not None and min_votes < 1:
        raise ValueError("--min-votes must be at least 1")
    draws = BASELINE_DRAWS if baseline_draws is None else int(baseline_draws)
    if draws < 0:
        raise ValueError("--baseline-draws must be 0 or more")
    row = model_row_or_fail(path, model_id)
    vocab = vocabulary(path)
    heads = stored_head_texts(path, model_id)
    done = {h: (lab, ph) for h, (lab, ph, _) in head_label_state(path, model_id).items()}
    if not heads:
        raise ValueError(f"no heads of {model_id!r} have TextSpan texts: run `python -m etl textspan "
                         f"--model {model_id}` first")
    banks = head_text_banks(path, model_id)
    if labeler == "offline" and len(banks) > 1:
        raise ValueError(f"the TextSpan texts of {model_id!r} come from several banks ({', '.join(banks)}); "
                         f"recompute them from one with `python -m etl textspan --model {model_id} "
                         "--bank NAME --force`")
    bank = bank_text_matrix(path, model_id, banks[0]) if len(banks) == 1 else None     # (text_ids, tags, T)
    tagged = bank is not None and any(t in vocab for t in bank[1])

    def offline(bank_tags):
        return OfflineLabeler(vocab, OFFLINE_THRESHOLD if threshold is None else threshold,
                              bank_tags=bank_tags, alpha=OFFLINE_ALPHA if alpha is None else alpha,
                              min_votes=OFFLINE_MIN_VOTES if min_votes is None else min_votes,
                              agreement_min=OFFLINE_AGREEMENT if agreement_check else -1.0,
                              agreement_p_max=OFFLINE_AGREEMENT_P if agreement_check else 1.0,
                              majority=OFFLINE_MAJORITY if majority is None else majority)

    if labeler == "offline":
        chosen = offline(bank[1] if bank else None)
    else:
        chosen = make_llm(llm_model, vocab, llm_timeout, llm_retries)
    # the baseline: the same rule on shuffled tags (its p-value is only worked out when --alpha asks for it)
    base_rule = offline(None) if tagged and draws else None
    base_key = base_rule.prompt_hash if base_rule else None
    todo = [h for h in heads if force or done.get(h) != (chosen.name, chosen.prompt_hash)]
    have_base = baseline_label_state(path, model_id, BASELINE)
    todo_base = [h for h in heads if base_rule and (h in todo or have_base.get(h) != (draws, base_key))]
    tag_sets = [bank[1]] + [shuffled_tags(bank[1], d) for d in range(draws if base_rule else 0)] if bank else []
    agreed = [retag(heads, bank[0], tags) for tags in tag_sets]
    zeroshot = [{} for _ in tag_sets]        # offline-v8: per tag set, {head: {property: zero-shot variance}}
    if bank and agreement_check and (todo or todo_base):
        agreed = with_model_agreement(path, model_id, int(row["heads"]), heads, sorted(set(todo) | set(todo_base)),
                                      bank[0], tag_sets, bank[2],
                                      zeroshot=zeroshot if labeler == "offline" else None, vocabulary=list(vocab))
    if agreed:
        heads = agreed[0]
    params = {"model_id": model_id, "labeler": chosen.name, "prompt_hash": chosen.prompt_hash,
              "threshold": getattr(chosen, "threshold", None), "force": force, "heads": len(todo),
              "baseline": BASELINE if base_rule else None, "baseline_draws": draws if base_rule else 0,
              "baseline_heads": len(todo_base)}
    counts, failed, pending = Counter(), 0, []
    with run_record(path, "label", params) as run_id:
        run_id.skipped = not todo and not todo_base
        try:
            for layer, head in progress(sorted(set(todo) | set(todo_base)), desc=f"label {model_id}", unit="head"):
                texts = [ht for _, ht in heads[(layer, head)]]
                result = ((chosen.label(texts, zeroshot=zeroshot[0].get((layer, head)) if zeroshot else None) if labeler == "offline"
                           else chosen.label(texts)) if (layer, head) in todo else None)
                base = ([base_rule.label([ht for _, ht in agreed[1 + d][(layer, head)]],
                                         zeroshot=zeroshot[1 + d].get((layer, head))).property
                         for d in range(draws)] if (layer, head) in todo_base else None)
                pending.append((layer, head, result, base, base_key))
                if result is not None and result.error:
                    failed += 1
                elif result is not None:
                    counts[result.property] += 1
                if len(pending) >= batch_size:
                    _write(path, model_id, run_id, pending)
                    pending = []
        finally:
            _write(path, model_id, run_id, pending)      # keep what was answered, even on LLMError
    return {"model_id": model_id, "labeler": chosen.name, "heads_labelled": sum(counts.values()),
            "heads_failed": failed, "heads_skipped": len(heads) - len(todo), "labels": dict(counts.most_common()),
            "baseline_heads": len(todo_base)}


def _write(path: str, model_id: str, run_id: str, pending: list) -> None:
    from etl.text.labelers import BASELINE
    from warehouse import head_name, writer, writes
    from warehouse.runs import record_error
    if not pending:
        return
    with writer(path) as con:
        for layer, head, result, base, base_key in pending:
            if base is not None:
                writes.replace_baseline_labels(con, model_id, BASELINE, layer, head, base, base_key, run_id)
            if result is None:
                continue
            if result.error:
                raw = (result.raw or "")[:500]
                record_error(con, run_id, f"{model_id} {head_name(layer, head)}",
                             f"{result.labeler}: {result.error}" + (f" (raw answer: {raw!r})" if raw else ""))
                continue
            writes.replace_head_label(con, model_id, layer, head, property=result.property,
                                      confidence=result.confidence, labeler=result.labeler,
                                      prompt_hash=result.prompt_hash, raw=result.raw, run_id=run_id,
                                      p_value=result.p_value)
