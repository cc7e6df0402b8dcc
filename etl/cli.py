"""The `python -m etl` entry point: discovers every job module and routes to it.

A job module exposes `add_parser(subparsers)`, which registers its sub-command(s) with
`set_defaults(func=...)`; the func takes the parsed args and returns an exit code (or None).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys
import warnings

import etl.jobs





def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m etl",
        description="CLIP Atlas batch jobs: decompose CLIP vision transformers head by head into a DuckDB warehouse.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `python -m etl <job> --help` for the flags of each job.\n"
               "Example: python -m etl run --model toy-shapes --dataset shapes:2000:seed=0",
    )
    sub = parser.add_subparsers(dest="job", metavar="<job>", required=True)
    names = [f"etl.jobs.{m.name}" for m in pkgutil.iter_modules(etl.jobs.__path__)]
    for name in names:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        if hasattr(module, "add_parser"):
            module.add_parser(sub)
    return parser


def main(argv=None) -> int:
    logging.getLogger().setLevel(logging.ERROR)  # open_clip's "initialized randomly" notices
    warnings.filterwarnings("ignore", message=".*No pretrained weights.*")
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        print("interrupted: work committed so far is kept; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # errors for people: one line, no traceback unless asked
        if os.environ.get("ATLAS_DEBUG"):
            raise
        from etl.common import user_error_types
        if isinstance(exc, user_error_types()):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
    return int(code or 0)
