"""`texts`: a text bank into the warehouse (properties, texts) and its embeddings for a model.

    python -m etl texts --model toy-shapes/bundled                       # the product's bank
    python -m etl texts --model ViT-B-16/laion2b_s34b_b88k --text-file my_texts.txt --bank-name mine

Texts are keyed by ``text_id(bank, text)``; a re-run inserts nothing twice and embeds only
the texts the model has no embedding for yet, one write transaction per batch.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from etl.common import add_warehouse_arg, model_row_or_fail, progress, text_batch, warehouse_path


def add_parser(sub) -> None:
    from etl.text.bank import PRODUCT_BANKS
    p = sub.add_parser("texts", help="load a text bank (the product's own, or a text file) and embed it for a model",
                       description="Write the bank's texts (with property tags) and the property vocabulary to "
                                   "the warehouse, then the model's unit text embeddings of every text not yet "
                                   "embedded (resumable). The product's bank has 3,600+ short image descriptions "
                                   "over 18 properties; a text file has one text per line, optionally "
                                   "'text<TAB>property'.")
    add_warehouse_arg(p)
    p.add_argument("--model", metavar="MODEL_ID", default=None,
                   help="a model_id of the warehouse `models` table (e.g. toy-shapes/bundled, written by "
                        "`embed`); without it only the texts are stored, nothing is embedded")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--bank", default=None, choices=PRODUCT_BANKS,
                     help="one of the product's banks: 'atlas' (3,600+ general image descriptions) or 'shapes' "
                          "(the shapes world's own texts); default: the model's default bank ('shapes' for the "
                          "toy models, 'atlas' otherwise), 'atlas' without --model")
    src.add_argument("--text-file", metavar="PATH", default=None,
                     help="a UTF-8 file, one text per line, optionally followed by TAB and a property tag")
    p.add_argument("--bank-name", metavar="NAME", default=None,
                   help="bank name for --text-file (default: the file name without extension)")
    p.add_argument("--batch-size", type=text_batch, default=256,
                   help="texts per encoder batch and write (default 256; checked against the machine's memory)")
    p.set_defaults(func=run)


def read_bank(bank: str | None, text_file: str | None, bank_name: str | None, arch: str | None = None
              ) -> tuple[str, list[tuple[str, str | None]], dict[str, int]]:
    """(bank name, [(text, tag)], {unknown tag: count}) from a product bank or a text file; with
    neither, the default bank of the model's architecture ``arch`` (the atlas bank if None)."""
    from etl.text.bank import ATLAS_BANK, PRODUCT_BANKS, UnknownTagWarning, bank_texts, read_text_file, unknown_tags
    from models import default_bank
    if text_file is None:
        bank = bank or (default_bank(arch) if arch else ATLAS_BANK)
        return bank, list(bank_texts(bank)), {}
    bank = bank_name or Path(text_file).stem
    if bank in PRODUCT_BANKS:
        raise ValueError(f"'{bank}' is a bank of the product's own; give your file another --bank-name")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownTagWarning)          # reported below, per tag
        items = read_text_file(text_file)
    return bank, items, dict(unknown_tags(items))


def run(args) -> int:
    print(json.dumps(load_texts(warehouse_path(args), args.model, args.bank, args.text_file, args.bank_name,
                                args.batch_size)))
    return 0


def load_texts(path: str, model_id: str | None = None, bank: str | None = None, text_file: str | None = None,
               bank_name: str | None = None, batch_size: int = 256) -> dict:
    """Store a bank's texts and embed those the model has no embedding for yet; returns counts.
    A run that finds every text stored and embedded ends 'skipped'."""
    from etl.text.bank import PROPERTIES, text_id
    from warehouse import writer, writes
    from warehouse.queries import embedded_text_ids
    from warehouse.runs import record_error, run_record
    if batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    params = {"bank": bank, "text_file": text_file, "model_id": model_id}
    with run_record(path, "texts", params) as run_id:
        row = model_row_or_fail(path, model_id) if model_id else None
        bank, items, unknown = read_bank(bank, text_file, bank_name, row["arch"] if row else None)
        ids = [text_id(bank, t) for t, _ in items]
        with writer(path) as con:
            writes.upsert_properties(con, dict(PROPERTIES))
            writes.upsert_texts(con, bank, ids, [t for t, _ in items], [tag for _, tag in items])
            for tag, n in sorted(unknown.items()):
                record_error(con, run_id, f"tag:{tag}",
                             f"{n} texts of {text_file} carry tag {tag!r}, which is not a property of the "
                             f"vocabulary; kept as given (the offline labeler ignores it)")
        for tag, n in sorted(unknown.items()):
            print(f"warning: {n} texts carry tag {tag!r}, not an atlas property (kept as given)")
        embedded = 0
        if row is not None:
            done = embedded_text_ids(path, model_id, bank)
            todo = [(i, t) for i, (t, _) in zip(ids, items) if i not in done]
            todo.sort(key=lambda it: len(it[1]))       # similar lengths per batch: tight trimmed batches
            if todo:
                embedded = _embed(path, row, todo, batch_size)
        run_id.skipped = row is not None and embedded == 0
    return {"bank": bank, "texts": len(items), "model_id": model_id, "embedded": embedded,
            "already_embedded": len(items) - embedded if model_id else 0}


def _embed(path: str, row: dict, todo: list[tuple[str, str]], batch_size: int) -> int:
    """Encode ``todo`` [(text_id, text)] with the row's model; one write per batch."""
    from models import encode_texts, model_from_row
    from warehouse import writer, writes
    lm = model_from_row(row)
    bar = progress(range(0, len(todo), batch_size), desc=f"texts -> {row['model_id']}", unit="batch")
    for start in bar:
        batch = todo[start:start + batch_size]
        vecs = encode_texts(lm, [t for _, t in batch], batch_size=batch_size).numpy()     # [B, d] unit
        with writer(path) as con:
            writes.insert_text_embeddings(con, row["model_id"], [i for i, _ in batch], vecs)
    return len(todo)
