"""Imports point one way: dashboard -> warehouse, models; etl -> warehouse, models; nothing imports
tests/. Read with `ast` from every product .py file (imports inside functions included), so a lazy
import cannot hide a wrong-way dependency. SQL lives in warehouse/: etl/ and dashboard/ hold no SQL
statement as a string literal.

Each test prints every file, line and import (or literal) that breaks its rule.
"""
from __future__ import annotations

import ast
import re
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("dashboard", "warehouse", "etl", "models")
FIRST_PARTY = PRODUCT + ("tests",)
# the layers a package may not import (tests/ is never importable from the product)
FORBIDDEN = {
    "models": {"etl", "warehouse", "dashboard", "tests"},
    "warehouse": {"etl", "models", "dashboard", "tests"},
    "etl": {"dashboard", "tests"},
    "dashboard": {"etl", "tests"},
}
# the pipeline composes the jobs, the size study runs the pipeline per world, and the benchmark runner times them end
# to end; every other job stands alone
JOBS_THAT_COMPOSE = {"etl/jobs/run.py", "etl/jobs/bench.py", "etl/jobs/study.py"}
SQL = re.compile(r"\b(INSERT\s+INTO|DELETE\s+FROM|CREATE\s+(?:OR\s+REPLACE\s+)?(?:TABLE|VIEW)|UPDATE\s+\w+\s+SET)\b"
                 r"|\bSELECT\b[\s\S]*\bFROM\b")


def product_files() -> list[Path]:
    files = sorted(p for pkg in PRODUCT for p in (ROOT / pkg).rglob("*.py")
                   if not {".venv", "__pycache__"} & set(p.relative_to(ROOT).parts))
    assert len(files) > 20, files           # the walk found the product
    return files


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(dotted: str) -> bool:
    """Whether `dotted` names a module or package of this repository."""
    p = ROOT.joinpath(*dotted.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


@lru_cache(maxsize=None)
def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def imports(path: Path) -> list[tuple[int, str, str]]:
    """(line, imported module, source text) for every import of the file, at any depth."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    return collect_imports(parse(path), package)


def collect_imports(tree: ast.AST, package: str) -> list[tuple[int, str, str]]:
    """Every import of `tree` (a module of `package`): `import a.b`, `from a import b` (a, and a.b
    when b is a module of this repository), relative imports resolved against `package`, and
    importlib.import_module / __import__ calls with a constant name; inside functions too."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, f"import {a.name}") for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            text = f"from {'.' * node.level}{node.module or ''} import {', '.join(a.name for a in node.names)}"
            out.append((node.lineno, mod, text))
            out += [(node.lineno, f"{mod}.{a.name}", text) for a in node.names if is_module(f"{mod}.{a.name}")]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name in ("import_module", "__import__"):
                out.append((node.lineno, node.args[0].value, ast.unparse(node)))
    return out


def sys_path_edits(path: Path) -> list[tuple[int, str]]:
    """sys.path.insert/append calls whose arguments name a tests folder (an import of tests/ in disguise)."""
    out = []
    for node in ast.walk(parse(path)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("insert", "append", "extend") and ast.unparse(node.func.value) == "sys.path"):
            names = [c.value for a in node.args for c in ast.walk(a)
                     if isinstance(c, ast.Constant) and isinstance(c.value, str)]
            if any(re.search(r"(^|/)tests(/|$)", n) for n in names):
                out.append((node.lineno, ast.unparse(node)))
    return out


def report(broken: list[str], rule: str) -> str:
    return f"{len(broken)} violation(s) of: {rule}\n  " + "\n  ".join(broken)


def test_the_walk_sees_lazy_relative_and_dynamic_imports():
    """The collector itself, on a module of etl.jobs: imports inside functions and methods, relative
    imports, submodules named in `from pkg import mod`, import_module, and tests/ on sys.path."""
    src = ("import os\n"
           "def f():\n"
           "    from etl.jobs import embed\n"
           "    import importlib; importlib.import_module('tests.x')\n"
           "class C:\n"
           "    def g(self):\n"
           "        from . import label\n"
           "        from ..common import progress\n")
    found = {m for _, m, _ in collect_imports(ast.parse(src), "etl.jobs")}
    assert {"os", "etl.jobs", "etl.jobs.embed", "tests.x", "etl.jobs.label", "etl.common"} <= found, found
    assert "etl.common.progress" not in found                   # a name, not a module


def test_modules_of_tests_folder():
    """Modules that live only in tests/ (e.g. a fixture module put on sys.path and imported bare)."""
    assert {"conftest", "model_fixtures"} <= modules_only_in_tests()


def modules_only_in_tests() -> set[str]:
    return {p.stem for p in (ROOT / "tests").rglob("*.py") if p.stem != "__init__"} - set(FIRST_PARTY)


def test_layers_import_one_way():
    broken = []
    only_in_tests = modules_only_in_tests()
    for path in product_files():
        layer = rel(path).split("/")[0]
        for line, mod, text in imports(path):
            top = mod.split(".")[0]
            if top in FORBIDDEN[layer]:
                broken.append(f"{rel(path)}:{line}: {layer} imports {top}: `{text}`")
            elif top in only_in_tests:
                broken.append(f"{rel(path)}:{line}: {layer} imports {top}, a module of tests/: `{text}`")
        for line, text in sys_path_edits(path):
            broken.append(f"{rel(path)}:{line}: {layer} puts tests/ on sys.path: `{text}`")
    print(report(broken, "dashboard -> warehouse, models; etl -> warehouse, models; nothing imports tests"))
    assert not broken, report(broken, "dashboard -> warehouse, models; etl -> warehouse, models; "
                                      "nothing imports tests")


def test_jobs_do_not_import_each_other_except_the_pipeline():
    broken = []
    for path in sorted((ROOT / "etl" / "jobs").glob("*.py")):
        if path.name == "__init__.py" or rel(path) in JOBS_THAT_COMPOSE:
            continue
        own = module_name(path)
        for line, mod, text in imports(path):
            if mod.startswith("etl.jobs.") and mod != own:
                broken.append(f"{rel(path)}:{line}: imports the job {mod}: `{text}`")
    print(report(broken, "a job under etl/jobs imports no other job (only etl/jobs/run.py, study.py and bench.py "
                         "compose them)"))
    assert not broken, report(broken, "a job under etl/jobs imports no other job (only etl/jobs/run.py, study.py and "
                                      "bench.py compose them; shared code belongs in etl/ outside jobs/, or below)")


def string_literals(path: Path) -> list[tuple[int, str]]:
    """Every string constant of the file (docstrings included; f-strings by their literal parts)."""
    return [(n.lineno, n.value) for n in ast.walk(parse(path)) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def test_sql_lives_in_the_warehouse():
    broken = []
    for path in product_files():
        if rel(path).split("/")[0] not in ("etl", "dashboard"):
            continue
        for line, s in string_literals(path):
            m = SQL.search(s)
            if m:
                broken.append(f"{rel(path)}:{line}: SQL in a string literal: {' '.join(m.group(0).split())[:80]!r}")
    print(report(broken, "no SQL statements (INSERT INTO, DELETE FROM, CREATE TABLE/VIEW, UPDATE .. SET, "
                         "SELECT .. FROM) in etl/ or dashboard/: named queries and writes live in warehouse/"))
    assert not broken, report(broken, "no SQL statements in etl/ or dashboard/ string literals: they belong "
                                      "in warehouse/ (queries.py, writes.py)")


@pytest.mark.parametrize("text, sql", [
    ("INSERT INTO runs VALUES (?)", True), ("DELETE FROM head_texts WHERE x", True),
    ("CREATE TABLE t (a INT)", True), ("UPDATE models SET seed = 1", True),
    ("SELECT model_id FROM models", True), ("SELECT\n  1\nFROM t", True),
    ("select the heads from the grid", False), ("Select a model from the list", False),
    ("UPDATE EXTENSIONS", False), ("the INSERT key", False),
])
def test_the_sql_pattern_matches_statements_not_prose(text, sql):
    assert bool(SQL.search(text)) is sql
