"""`textspan`: TextSpan (MATH.md §3) for every analysed head of a model -> `head_texts`.

    python -m etl textspan --model toy-shapes/bundled                    # k = 10, r = 80, bank atlas

Reads the model's head embeddings one layer at a time ([n images, H heads, d]) and the
bank's text embeddings, runs the fast batched TextSpan (etl/text/textspan.py) and writes each
layer's heads in one transaction. Heads already done with the same bank, dataset and k are
skipped; heads done differently are only replaced with --force. Rewriting a head also drops
its label and judgments, which were derived from its old texts.
"""
from __future__ import annotations

import json

from etl.common import add_warehouse_arg, progress, warehouse_path


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
    p.add_argument("-k", "--k", type=int, default=10, help="texts per head (default 10; the paper uses 20)")
    p.add_argument("-r", "--r", type=int, default=80,
                   help="texts are projected on the head's top-r singular directions first (default 80, the "
                        "published value), capped per head at its numerical rank and head dimension (the r "
                        "used is stored in head_texts.r)")
    p.add_argument("--force", action="store_true",
                   help="recompute heads that already have texts (also those computed with another bank, "
                        "dataset or k)")
    p.set_defaults(func=run)


def _choose_bank(con, model_id: str, arch: str, bank: str | None) -> str:
    from models import default_bank
    banks = [r[0] for r in con.execute(
        "SELECT DISTINCT t.bank FROM text_embeddings e JOIN texts t USING (text_id) WHERE e.model_id = ? "
        "ORDER BY 1", [model_id]).fetchall()]
    if bank is None:
        bank = banks[0] if len(banks) == 1 else default_bank(arch)
    if bank not in banks:
        raise ValueError(f"no texts of bank {bank!r} are embedded for model {model_id!r} (embedded banks: "
                         f"{', '.join(banks) or 'none'}). Run `python -m etl texts --model {model_id}` "
                         f"(add --text-file for your own bank) first.")
    return bank


def run(args) -> int:
    from etl.jobs.texts import model_row_or_fail
    from etl.text.textspan import check_sizes, textspan_heads
    from warehouse import connect, writer
    from warehouse.queries import bank_text_matrix, layer_head_matrix
    from warehouse.runs import record_error, run_record
    path = warehouse_path(args)
    row = model_row_or_fail(path, args.model)
    layers, H = [int(x) for x in row["analysed_layers"]], int(row["heads"])
    head_dim = int(row["width"]) // H
    with connect(path) as con:
        bank = _choose_bank(con, args.model, row["arch"], args.bank)
        if args.dataset and not con.execute("SELECT 1 FROM datasets WHERE dataset_id = ?", [args.dataset]).fetchone():
            raise ValueError(f"dataset {args.dataset!r} is not in the warehouse; see `SELECT dataset_id FROM datasets`")
        existing = {(int(l), int(h)): (n, b, d) for l, h, n, b, d in con.execute(
            "SELECT layer, head, count(*), any_value(bank), any_value(dataset_id) FROM head_texts "
            "WHERE model_id = ? GROUP BY layer, head", [args.model]).fetchall()}
    text_ids, _, T = bank_text_matrix(path, args.model, bank)
    want = (args.k, bank, args.dataset)
    other = sorted(h for h, v in existing.items() if v != want)
    if other and not args.force:
        n, b, d = existing[other[0]]
        raise ValueError(f"{len(other)} heads of {args.model!r} already have TextSpan texts from bank {b!r}, k = {n}, "
                         f"dataset {d or 'all'}; pass --force to replace them with bank {bank!r}, k = {args.k}, "
                         f"dataset {args.dataset or 'all'}")
    todo = {l: [h for h in range(H) if args.force or existing.get((l, h)) != want] for l in layers}
    params = {"model_id": args.model, "bank": bank, "dataset": args.dataset, "k": args.k, "r": args.r,
              "force": args.force, "texts": len(text_ids)}
    written = failed = 0
    with run_record(path, "textspan", params) as run_id:
        for layer in progress([l for l in layers if todo[l]], desc=f"textspan {args.model}", unit="layer"):
            heads = todo[layer]
            C = layer_head_matrix(path, args.model, layer, H, args.dataset)[:, heads]   # [n, h, d]
            if C.shape[0] == 0:
                raise ValueError(f"no head embeddings of model {args.model!r} in layer {layer}"
                                 + (f" for dataset {args.dataset!r}" if args.dataset else "")
                                 + "; run `python -m etl embed` first")
            check_sizes(C.shape[0], T.shape[0], C.shape[2], T.shape[1], args.k, args.r)
            results, errors = _textspan_layer(textspan_heads, C, T, heads, args.k, args.r, head_dim)
            rows = [(args.model, layer, h, rank, text_ids[j], float(v), args.dataset, bank, run_id, r_used)
                    for h, (idx, var, r_used) in results.items() for rank, (j, v) in enumerate(zip(idx, var))]
            with writer(path) as con:
                for table in ("head_texts", "head_labels", "text_judgments"):
                    con.execute(f"DELETE FROM {table} WHERE model_id = ? AND layer = ? AND list_contains(?, head)",
                                [args.model, layer, heads])
                if rows:
                    con.executemany("INSERT INTO head_texts (model_id, layer, head, rank, text_id, variance_explained,"
                                    " dataset_id, bank, run_id, r) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
                for h, reason in errors.items():
                    record_error(con, run_id, f"{args.model} L{layer}.H{h}", reason)
            written += len(results)
            failed += len(errors)
    print(json.dumps({"model_id": args.model, "bank": bank, "k": args.k, "r": args.r, "heads_written": written,
                      "heads_failed": failed, "heads_skipped": sum(H - len(todo[l]) for l in layers)}))
    return 0


def _textspan_layer(textspan_heads, C, T, heads, k, r, head_dim):
    """Run the layer's heads together; if that fails, head by head so one bad head costs only itself.

    r is capped per head at its numerical rank and at ``head_dim`` (etl/text/textspan.py).
    Returns ({head: (idx [k], var [k], r used)}, {head: reason})."""
    try:
        idx, var, r_used = textspan_heads(C, T, k=k, r=r, max_rank=head_dim, with_rank=True)
        return {h: (idx[i], var[i], int(r_used[i])) for i, h in enumerate(heads)}, {}
    except ValueError:
        pass
    results, errors = {}, {}
    for i, h in enumerate(heads):
        try:
            idx, var, r_used = textspan_heads(C[:, i:i + 1], T, k=k, r=r, max_rank=head_dim, with_rank=True)
            results[h] = (idx[0], var[0], int(r_used[0]))
        except ValueError as exc:
            errors[h] = str(exc)
    return results, errors
