"""The command line's contract in-process: flag types, one-line errors, exit codes."""
from __future__ import annotations

import argparse

import pytest

from etl import cli
from etl.common import (device_arg, non_negative_float, non_negative_int, open_unit, positive_float, positive_int,
                        probability)


@pytest.mark.parametrize("fn,good,bad", [
    (positive_int, {"1": 1, "64": 64}, ["0", "-3", "1.5", "abc", ""]),
    (non_negative_int, {"0": 0, "7": 7}, ["-1", "x"]),
    (positive_float, {"0.5": 0.5, "60": 60.0}, ["0", "-2", "nan", "inf", "x"]),
    (non_negative_float, {"0": 0.0, "0.1": 0.1}, ["-0.1", "nan"]),
    (probability, {"0": 0.0, "1": 1.0, "0.35": 0.35}, ["1.01", "-0.1"]),
    (open_unit, {"1": 1.0, "0.05": 0.05}, ["0", "1.5"]),
    (device_arg, {"cpu": "cpu", "cuda": "cuda", "CUDA:1": "cuda:1"}, ["tpu", "cuda:", "cuda:x", "gpu", "mps"]),
])
def test_flag_types_accept_and_refuse(fn, good, bad):
    for text, value in good.items():
        assert fn(text) == value
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            fn(text)


def test_every_numeric_flag_of_every_job_is_validated():
    """No job takes a bare int/float: each numeric flag refuses nonsense while the flags are parsed."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    loose = [f"{name} {'/'.join(a.option_strings)}" for name, p in sub.choices.items() for a in p._actions
             if a.type in (int, float)]
    assert loose == []




def test_an_unexpected_error_is_one_line_with_exit_code_1(capsys, monkeypatch):
    import etl.jobs.metrics as metrics

    def boom(args):
        raise KeyError("the bug\nspans lines")
    monkeypatch.setattr(metrics, "run", boom)
    code = cli.main(["metrics"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.splitlines() == ["error: unexpected KeyError: 'the bug\\nspans lines' "
                                "(run again with --debug for the traceback)"]
    code = cli.main(["metrics", "--debug"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("Traceback (most recent call last):") and "in boom" in err
    assert err.splitlines()[-1].startswith("error: unexpected KeyError")


def test_a_user_error_is_one_line_with_exit_code_2(capsys, monkeypatch):
    import etl.jobs.metrics as metrics

    def bad(args):
        raise ValueError("the model is not there;\n   embed it first")
    monkeypatch.setattr(metrics, "run", bad)
    monkeypatch.delenv("ATLAS_DEBUG", raising=False)
    assert cli.main(["metrics"]) == 2
    assert capsys.readouterr().err == "error: the model is not there; embed it first\n"
    monkeypatch.setenv("ATLAS_DEBUG", "1")
    assert cli.main(["metrics"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_an_os_error_says_the_file_and_what_to_check(capsys, monkeypatch):
    import etl.jobs.metrics as metrics

    def denied(args):
        raise PermissionError(13, "Permission denied", "/srv/atlas/w.duckdb")
    monkeypatch.setattr(metrics, "run", denied)
    assert cli.main(["metrics"]) == 2
    assert capsys.readouterr().err == ("error: Permission denied: /srv/atlas/w.duckdb; check the path and its "
                                       "permissions\n")


def test_each_command_parses_with_only_its_own_module_imported():
    """`python -m etl <job>` imports one job module (so a bad flag is refused in a fraction of a
    second); the naming rule must find the module of every command."""
    full = cli.build_parser()
    sub = next(a for a in full._actions if isinstance(a, argparse._SubParsersAction))
    names = cli._job_module_names()
    for command in sub.choices:
        module = cli._module_of(command, names)
        assert module is not None, command
        one = cli.build_parser(command)
        one_sub = next(a for a in one._actions if isinstance(a, argparse._SubParsersAction))
        assert command in one_sub.choices
    assert cli._requested_job(["--debug", "embed", "--model", "x"]) == "embed"
