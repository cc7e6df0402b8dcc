"""The README and docs/ stay true (in the spirit of datasette's test_docs.py): every shell command of
their code blocks parses with the product's own parsers (each `python -m etl <job> ...` line with that
job's argparse, `python -m dashboard`, every `make` target exists, scripts and files named exist),
every SQL statement parses with DuckDB's parser (tests/jobs/test_examples.py runs them on a warehouse
the product's jobs build), every Python block compiles, every relative link and anchor resolves, every
topic page is listed in docs/README.md, and the README stays under 250 lines."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import duckdb
import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
# tools a page may show that are not the product's (their own documentation covers their flags)
EXTERNAL = {"duckdb", "ray", "apt-get", "sudo", "pip", "git"}


def blocks(path: Path, langs: tuple[str, ...]) -> list[tuple[int, str]]:
    """(first line number, body) of every fenced block of one of `langs` in a page."""
    text = path.read_text(encoding="utf-8")
    out = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        if m.group(1) in langs:
            out.append((text[:m.start()].count("\n") + 2, m.group(2)))
    return out


def commands(body: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        out.append(re.sub(r"\s+#\s.*$", "", line))
    return out


def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))


def check_command(cmd: str) -> None:
    """Raise AssertionError unless the command is one the product (or a known tool) accepts."""
    if cmd.startswith("export "):                                      # export NAME=$(python -c '...')
        m = re.fullmatch(r"export [A-Z_][A-Z0-9_]*=(?:\$\(python -c '(.*)'\)|\S+)", cmd)
        assert m, f"an export the docs test does not know: {cmd}"
        if m.group(1):
            compile(m.group(1), "<docs>", "exec")
        return
    words = shlex.split(cmd, comments=False)
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):        # VAR=value prefixes
        words = words[1:]
    assert words, cmd
    exe, rest = words[0], words[1:]
    if exe == "make":
        targets = [w for w in rest if "=" not in w and not w.startswith("-")]
        assert targets and set(targets) <= make_targets(), f"unknown make target in: {cmd}"
        return
    if exe.endswith("python") or exe.endswith("python3"):
        if rest[:2] == ["-m", "etl"]:
            from etl.cli import _requested_job, build_parser
            argv = rest[2:]
            try:
                build_parser(_requested_job(argv)).parse_args(argv)
            except SystemExit as exc:
                raise AssertionError(f"`python -m etl` refuses: {cmd}") from exc
            return
        if rest[:2] == ["-m", "dashboard"]:
            from dashboard.__main__ import build_parser
            try:
                build_parser().parse_args(rest[2:])
            except SystemExit as exc:
                raise AssertionError(f"`python -m dashboard` refuses: {cmd}") from exc
            return
        if rest[:1] == ["-m"] and rest[1].startswith("dashboard."):          # dashboard.bench, dashboard.warm
            assert (ROOT / (rest[1].replace(".", "/") + ".py")).is_file(), cmd
            return
        if rest[:3] == ["-m", "streamlit", "run"]:
            assert (ROOT / rest[3]).is_file(), cmd
            return
        if rest[:1] == ["-c"]:
            compile(rest[1], "<docs>", "exec")
            return
        raise AssertionError(f"a python command the docs test does not know: {cmd}")
    assert exe in EXTERNAL, f"a command the docs test does not know: {cmd}"


def test_the_readme_is_short():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 250


def test_every_shell_command_parses():
    checked = 0
    for page in PAGES:
        for line, body in blocks(page, ("bash", "sh", "shell")):
            for cmd in commands(body):
                try:
                    check_command(cmd)
                except AssertionError as exc:
                    raise AssertionError(f"{page.relative_to(ROOT)} (block at line {line}): {exc}") from None
                checked += 1
    assert checked >= 30, checked


def test_every_sql_statement_parses_and_every_python_block_compiles():
    n = 0
    for page in PAGES:
        for line, body in blocks(page, ("sql",)):
            statements = duckdb.extract_statements(body)
            assert statements, (page, line)
            n += len(statements)
        for line, body in blocks(page, ("python",)):
            compile(body, f"{page.name}:{line}", "exec")
    assert n >= 6, n


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    out = set()
    for h in re.findall(r"^#{1,6}\s+(.*)$", path.read_text(encoding="utf-8"), re.M):
        slug = re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


def test_every_relative_link_and_anchor_resolves():
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            assert dest.exists(), f"{page.relative_to(ROOT)}: broken link {target}"
            if anchor:
                assert anchor in _anchors(dest), f"{page.relative_to(ROOT)}: no heading for #{anchor} in {file or page.name}"


def test_every_topic_page_is_listed_in_the_docs_index():
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    for page in DOCS:
        if page.name != "README.md":
            assert f"]({page.name})" in index, f"docs/README.md does not list {page.name}"
    readme = README.read_text(encoding="utf-8")
    assert "](docs/README.md)" in readme


@pytest.mark.parametrize("bad", ["python -m etl run --model toy-shapes --datset shapes:10",
                                 "make dmeo", "python -m etl textspan --model x -k 0", "rm -rf var"])
def test_the_checker_refuses_what_is_wrong(bad):
    with pytest.raises(AssertionError):
        check_command(bad)
