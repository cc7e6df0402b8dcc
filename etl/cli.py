"""The `python -m etl` entry point: discovers every job module and routes to it.

A job module exposes `add_parser(subparsers)`, which registers its sub-command(s) with
`set_defaults(func=...)`; the func takes the parsed args and returns an exit code (or None).

Errors are for people: every error the user can fix (a bad flag value, a missing or unusable
file, a model or warehouse problem) ends the command with one line on stderr,
``error: <what was wrong>; <what to do>``, and exit code 2; anything else with one line
``error: unexpected <Type>: <message> (run again with --debug for the traceback)`` and exit
code 1. ``--debug`` (before or after the job name) or ``ATLAS_DEBUG=1`` also prints the traceback.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import pkgutil
import sys
import traceback
import warnings

import etl.jobs

EXIT_USER_ERROR = 2
EXIT_UNEXPECTED = 1


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``error: ...; see `prog --help```), exit code 2."""

    def error(self, message: str):  # noqa: D401 (argparse's signature)
        sys.stderr.write(f"error: {one_line(message)}; see `{self.prog} --help`\n")
        sys.exit(EXIT_USER_ERROR)


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) turned into one space."""
    return " ".join(str(text).split())


# Commands whose module is not named after them (every other command `a-b` lives in etl/jobs/a_b.py
# or etl/jobs/a.py). Only a speed-up: an unlisted command is found by importing every job module.
_COMMAND_MODULES = {"verify": "decompose", "export": "embed", "pack-zoo": "train"}


def _job_module_names() -> list[str]:
    return [m.name for m in pkgutil.iter_modules(etl.jobs.__path__)]


def _module_of(command: str | None, names: list[str]) -> str | None:
    """The etl/jobs module that registers ``command`` (by the naming rule), or None."""
    if not command:
        return None
    for candidate in (_COMMAND_MODULES.get(command), command.replace("-", "_"), command.split("-")[0]):
        if candidate in names:
            return candidate
    return None


def _requested_job(argv: list[str]) -> str | None:
    """The job name of ``argv`` (its first non-flag word), if any."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(job: str | None = None) -> argparse.ArgumentParser:
    """The parser of every job; with ``job``, only that job's module is imported (its flags are
    checked at once, without loading the libraries other jobs need at import)."""
    parser = OneLineParser(
        prog="python -m etl",
        description="CLIP Atlas batch jobs: decompose CLIP vision transformers head by head into a DuckDB warehouse.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `python -m etl <job> --help` for the flags of each job.\n"
               "Example: python -m etl run --model toy-shapes --dataset shapes:2000:seed=0\n"
               "Errors are one line (exit code 2 for a fixable error, 1 for an unexpected one); add --debug "
               "(or set ATLAS_DEBUG=1) for the traceback.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of an error (also: ATLAS_DEBUG=1)")
    sub = parser.add_subparsers(dest="job", metavar="<job>", required=True)
    names = _job_module_names()
    only = _module_of(job, names)
    loaded: set[str] = set()

    def load(names_to_load):
        for name in names_to_load:
            if name in loaded:
                continue
            loaded.add(name)
            full = f"etl.jobs.{name}"
            try:
                module = importlib.import_module(full)
            except ModuleNotFoundError as exc:
                if exc.name == full:
                    continue
                raise
            if hasattr(module, "add_parser"):
                module.add_parser(sub)

    load([only] if only else names)
    if job not in sub.choices:          # help, a typo, or a command off the naming rule: every job
        load(names)
    for command in sub.choices.values():     # --debug also after the job name
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="print the traceback of an error (also: ATLAS_DEBUG=1)")
    return parser


def describe(exc: BaseException) -> str:
    """One line that says what went wrong (an OSError as '<reason>: <file>; what to do')."""
    if isinstance(exc, OSError) and type(exc).__str__ is OSError.__str__ and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        todo = ("free disk space or choose another location" if exc.errno == errno.ENOSPC
                else "check the path and its permissions")
        return one_line(f"{exc.strerror}{where}; {todo}")
    return one_line(str(exc)) or type(exc).__name__


def report(exc: BaseException, debug: bool) -> int:
    """Print ``exc`` for people (and its traceback when debugging); return the exit code."""
    from etl.common import user_error_types
    if debug:
        traceback.print_exception(exc)
    if isinstance(exc, user_error_types()):
        print(f"error: {describe(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"error: unexpected {type(exc).__name__}: {describe(exc)} (run again with --debug for the traceback)",
          file=sys.stderr)
    return EXIT_UNEXPECTED


def main(argv=None) -> int:
    logging.getLogger().setLevel(logging.ERROR)  # open_clip's "initialized randomly" notices
    warnings.filterwarnings("ignore", message=".*No pretrained weights.*")
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = bool(os.environ.get("ATLAS_DEBUG")) or "--debug" in argv
    try:
        args = build_parser(_requested_job(argv)).parse_args(argv)
        debug = bool(os.environ.get("ATLAS_DEBUG")) or bool(getattr(args, "debug", False))
        code = args.func(args)
    except KeyboardInterrupt:
        print("interrupted: work committed so far is kept; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # errors for people: one line, no traceback unless asked
        return report(exc, debug)
    return int(code or 0)
