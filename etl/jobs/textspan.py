"""`textspan`: TextSpan (MATH.md §3) for every analysed head of a model -> `head_texts`.

    python -m etl textspan --model toy-shapes/bundled                    # k = 10, r = 80, bank atlas

Streams the model's head embeddings one head at a time (warehouse.queries.head_vector_batches:
batches of [m images, d], shard files attached in place read straight from their pages) into each
head's moments (count, mean, centred Gram: etl.text.textspan.HeadMoments), so the number of images
never has to fit in memory, then runs TextSpan on the layer's moments with the bank's text
embeddings (textspan_from_moments, the same picks as the batched form) and writes each layer's
heads in one transaction. Heads already done with the same bank, dataset and k are
skipped; heads done differently are only replaced with --force. Rewriting a head also drops
its label and judgments, which were derived from its old texts.
"""
from __future__ import annotations

import json

from etl.common import add_warehouse_arg, choose_bank, model_row_or_fail, positive_int, progress, warehouse_path


def add_parser(sub) -> None:
    p = sub.add_parser("textspan", help="TextSpan texts for every analysed head of a model (head_texts)",
                       description="For each analysed head, choose the k texts of the bank that explain the "
                                   "most variance of its head embeddings (MATH.md §3, fast covariance form) and "
                                   "store them with the variance each explains. Resumable.")
    add_warehouse_arg(p)
    p.add_argument("--model", metavar="MODEL_ID", required=True,
                   help="a model_id of the warehouse `models` table, with head embeddings (from `embed`) and "
                        "text embeddings (from `texts`)")
    p.add_argument("--bank", metavar="NAME", default=None,
                   help="text bank to draw from (default: the only bank embedded for the model, else the model's "
                        "default: 'shapes' for the toy models, 'atlas' for other CLIPs)")
    p.add_argument("--dataset", metavar="DATASET_ID", default=None,
                   help="use only this dataset's images (a dataset_id of the `datasets` table; default: every "
                        "image embedded for the model)")
    p.add_argument("-k", "--k", type=positive_int, default=10, help="texts per head (default 10; the paper uses 20)")
    p.add_argument("-r", "--r", type=positive_int, default=80,
                   help="texts are projected on the head's top-r singular directions first (default 80, the "
                        "published value), capped per head at its numerical rank and head dimension (the r "
                        "used is stored in head_texts.r)")
    p.add_argument("--force", action="store_true",
                   help="recompute heads that already have texts (also those computed with another bank, "
                        "dataset or k)")
    p.set_defaults(func=run)


def run(args) -> int:
    print(json.dumps(textspan(warehouse_path(args), args.model, args.bank, args.dataset, args.k, args.r, args.force)))
    return 0


def textspan(path: str, model_id: str, bank: str | None = None, dataset: str | None = None, k: int = 10,
             r: int = 80, force: bool = False) -> dict:
    """TextSpan texts for every analysed head of the model that has none with these settings; returns counts."""
    from etl.text.textspan import check_sizes
    from warehouse import head_name, writer, writes
    from warehouse.queries import bank_text_matrix, dataset_exists, head_text_state
    from warehouse.runs import record_error, run_record
    row = model_row_or_fail(path, model_id)
    layers, H = [int(x) for x in row["analysed_layers"]], int(row["heads"])
    head_dim = int(row["width"]) // H
    bank = choose_bank(path, model_id, row["arch"], bank)
    if dataset and not dataset_exists(path, dataset):
        raise ValueError(f"dataset {dataset!r} is not in the warehouse; the `datasets` table lists the dataset_ids (SQL console)")
    existing = head_text_state(path, model_id)
    text_ids, _, T = bank_text_matrix(path, model_id, bank)
    want = (k, bank, dataset)
    other = sorted(h for h, v in existing.items() if v != want)
    if other and not force:
        n, b, d = existing[other[0]]
        raise ValueError(f"{len(other)} heads of {model_id!r} already have TextSpan texts from bank {b!r}, k = {n}, "
                         f"dataset {d or 'all'}; pass --force to replace them with bank {bank!r}, k = {k}, "
                         f"dataset {dataset or 'all'}")
    todo = {l: [h for h in range(H) if force or existing.get((l, h)) != want] for l in layers}
    params = {"model_id": model_id, "bank": bank, "dataset": dataset, "k": k, "r": r,
              "force": force, "texts": len(text_ids)}
    written = failed = 0
    with run_record(path, "textspan", params) as run_id:
        for layer in progress([l for l in layers if todo[l]], desc=f"textspan {model_id}", unit="layer"):
            heads = todo[layer]
            moments = _layer_moments(path, model_id, layer, heads, H, dataset)
            check_sizes(int(moments.n[0]), T.shape[0], moments.mu.shape[1], T.shape[1], k, r)
            results, errors = _textspan_layer(moments, T, heads, k, r, head_dim)
            rows = [dict(head=h, rank=rank, text_id=text_ids[j], variance_explained=float(v), dataset_id=dataset,
                         bank=bank, run_id=run_id, r=r_used)
                    for h, (idx, var, r_used) in results.items() for rank, (j, v) in enumerate(zip(idx, var))]
            with writer(path) as con:
                writes.replace_head_texts(con, model_id, layer, heads, rows)
                for h, reason in errors.items():
                    record_error(con, run_id, f"{model_id} {head_name(layer, h)}", reason)
            written += len(results)
            failed += len(errors)
        run_id.skipped = not any(todo.values())
    return {"model_id": model_id, "bank": bank, "k": k, "r": r, "heads_written": written,
            "heads_failed": failed, "heads_skipped": sum(H - len(todo[l]) for l in layers)}


def _layer_moments(path: str, model_id: str, layer: int, heads: list[int], H: int, dataset: str | None):
    """The streamed moments (etl.text.textspan.HeadMoments) of the layer's ``heads``, read batch by batch
    (warehouse.queries.head_vector_batches), so the number of images never has to fit in memory.
    A ValueError when the layer has no head embeddings (of the dataset), or when the heads do not
    all have the same number of images (not one row per image and head)."""
    from etl.text.textspan import HeadMoments
    from warehouse.queries import head_vector_batches
    moments = None
    for i, h in enumerate(heads):
        for X in head_vector_batches(path, model_id, layer, h, dataset=dataset, reuse=True):   # [m, d] float32
            if moments is None:
                moments = HeadMoments(len(heads), X.shape[1])
            moments.add(i, X)
    if moments is None:
        raise ValueError(f"no head embeddings of model {model_id!r} in layer {layer}"
                         + (f" for dataset {dataset!r}" if dataset else "")
                         + "; run `python -m etl embed` first")
    counts = moments.n.numpy().astype(int)
    if (counts != counts[0]).any():
        raise ValueError(f"head_embeddings of model {model_id!r}, layer {layer} are not one row per image and "
                         f"head (expected {H} heads per image; images per head: "
                         f"{dict(zip(heads, counts.tolist()))}); re-run `python -m etl embed` for the model")
    return moments


def _textspan_layer(moments, T, heads, k, r, head_dim):
    """Run the layer's heads together; if that fails, head by head so one bad head costs only itself.

    r is capped per head at its numerical rank and at ``head_dim`` (etl/text/textspan.py).
    Returns ({head: (idx [k], var [k], r used)}, {head: reason})."""
    from etl.text.textspan import textspan_from_moments
    try:
        idx, var, r_used = textspan_from_moments(moments, T, k=k, r=r, max_rank=head_dim, with_rank=True)
        return {h: (idx[i], var[i], int(r_used[i])) for i, h in enumerate(heads)}, {}
    except ValueError:
        pass
    results, errors = {}, {}
    for i, h in enumerate(heads):
        try:
            idx, var, r_used = textspan_from_moments(moments.head(i), T, k=k, r=r, max_rank=head_dim, with_rank=True)
            results[h] = (idx[0], var[0], int(r_used[0]))
        except ValueError as exc:
            errors[h] = str(exc)
    return results, errors
