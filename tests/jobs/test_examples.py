"""Every SQL example the product shows (the README's, the console's) returns rows on a warehouse
built like the demo's (the toy model on shapes scenes, by the product's own jobs)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from warehouse.console import EXAMPLE_QUERIES, run_console_query

README = Path(__file__).resolve().parents[2] / "README.md"


def _clip_text(model_id: str, text: str) -> list[float]:
    from models import encode_texts, model_from_row
    from warehouse.queries import model_row
    lm = _clip_text.cache.get(model_id)
    if lm is None:
        lm = _clip_text.cache[model_id] = model_from_row(model_row(_clip_text.path, model_id))
    return encode_texts(lm, [text])[0].tolist()


_clip_text.cache = {}


def readme_sql() -> list[str]:
    """Each statement of the README's ```sql blocks."""
    blocks = re.findall(r"```sql\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    statements = []
    for block in blocks:
        body = "\n".join(line for line in block.splitlines() if not line.strip().startswith("--"))
        statements += [s.strip() for s in body.split(";") if s.strip()]
    return statements


def test_readme_and_console_examples_return_rows(toy_warehouse):
    _clip_text.path = str(toy_warehouse)
    statements = readme_sql()
    assert len(statements) >= 4
    queries = {f"README #{i}": s for i, s in enumerate(statements)} | EXAMPLE_QUERIES
    empty = []
    for title, sql in queries.items():
        df, _ = run_console_query(toy_warehouse, sql, clip_text=_clip_text)
        if df.empty:
            empty.append(title)
    assert empty == []
    # the clip_text example ranks by the head's share of the text, largest first
    top, _ = run_console_query(toy_warehouse, EXAMPLE_QUERIES["Top images of a head for a text (clip_text)"],
                               clip_text=_clip_text)
    assert len(top) == 8 and np.all(np.diff(top["share"].to_numpy()) <= 0)
