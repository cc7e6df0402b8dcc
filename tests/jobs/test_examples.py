"""Every SQL example the product shows (the README's, docs/*.md's, the console's) returns rows on a
warehouse built like the demo's (the toy model on shapes scenes, by the product's own jobs).
(tests/unit/test_docs.py parses them and every command of the docs without a warehouse.)"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from warehouse.console import EXAMPLE_QUERIES, run_console_query

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _clip_text(model_id: str, text: str) -> list[float]:
    from models import encode_texts, model_from_row
    from warehouse.queries import model_row
    lm = _clip_text.cache.get(model_id)
    if lm is None:
        lm = _clip_text.cache[model_id] = model_from_row(model_row(_clip_text.path, model_id))
    return encode_texts(lm, [text])[0].tolist()


_clip_text.cache = {}


def readme_sql() -> list[tuple[str, str]]:
    """(page, statement) for each statement of the ```sql blocks of the README and docs/*.md."""
    statements = []
    for page in PAGES:
        for block in re.findall(r"```sql\n(.*?)```", page.read_text(encoding="utf-8"), re.S):
            body = "\n".join(line for line in block.splitlines() if not line.strip().startswith("--"))
            statements += [(page.name, s.strip()) for s in body.split(";") if s.strip()]
    return statements


def test_readme_and_console_examples_return_rows(toy_warehouse):
    _clip_text.path = str(toy_warehouse)
    statements = readme_sql()
    assert len(statements) >= 6 and {"README.md", "warehouse.md"} <= {page for page, _ in statements}
    queries = {f"{page} #{i}": s for i, (page, s) in enumerate(statements)} | EXAMPLE_QUERIES
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
