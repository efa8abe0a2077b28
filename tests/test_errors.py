"""The one error convention: cli_main turns the project's errors into one stderr line and the
documented exit code, lets bugs keep their traceback; iter_jsonl names file:line. About 5 s,
most of it the one `python -m megatron_apriel average` process of the last test."""

import json

import pytest
from conftest import run_python

from megatron_apriel.config import ConfigError
from megatron_apriel.errors import (
    EXIT_BAD_INPUT,
    EXIT_ERROR,
    AprielError,
    InputError,
    RunError,
    cli_main,
    error_message,
)
from megatron_apriel.jsonl import JsonlError, iter_jsonl


def raising(exc):
    def main(argv=None):
        raise exc
    return main


def test_cli_main_maps_each_kind_to_its_exit_code(capsys):
    assert cli_main()(raising(InputError("a.yaml: key 'lr': not a number")))([]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err == "error: a.yaml: key 'lr': not a number\n"
    assert cli_main()(raising(ConfigError("train.lr: expected a number")))([]) == 2
    assert capsys.readouterr().err == "error: train.lr: expected a number\n"
    assert cli_main()(raising(RunError("stage 3 died")))([]) == EXIT_ERROR
    assert capsys.readouterr().err == "error: stage 3 died\n"
    assert cli_main()(lambda argv: 3)([]) == 3 and cli_main()(lambda argv: None)([]) == 0


def test_foreign_errors_only_where_a_verb_names_them(capsys):
    main = raising(FileExistsError("out: not empty (pass --force)"))
    assert cli_main(bad_input=(FileExistsError,))(main)([]) == 2
    assert capsys.readouterr().err == "error: out: not empty (pass --force)\n"
    assert cli_main(bad_input=(KeyError,))(raising(KeyError("hidden_size")))([]) == 2
    assert capsys.readouterr().err == "error: hidden_size\n"  # without the quotes str(KeyError) adds
    with pytest.raises(FileExistsError):  # not named by this verb: a bug, traceback kept
        cli_main()(main)([])
    with pytest.raises(ZeroDivisionError):
        cli_main()(raising(ZeroDivisionError("bug")))([])
    # the Megatron-LM-named tools exit 1 on bad input
    assert cli_main(bad_input_exit=1)(raising(InputError("x")))([]) == 1


def test_error_classes_keep_their_old_bases():
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, AprielError)
    assert issubclass(RunError, RuntimeError) and not issubclass(RunError, ValueError)
    assert error_message(KeyError("k")) == "k" and error_message(ValueError("v")) == "v"


def test_iter_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"a": 1}\n\n[1, 2]\n{"a": 3}\n{oops\n', encoding="utf-8")
    skipped = []
    assert list(iter_jsonl(path, on_bad=lambda n, e: skipped.append((n, str(e))))) == [(1, {"a": 1}), (4, {"a": 3})]
    assert [n for n, _ in skipped] == [3, 5] and skipped[0][1] == "not a JSON object"
    with pytest.raises(JsonlError, match=r"p.jsonl:3: not a JSON object"):
        list(iter_jsonl(path))
    path.write_text('{"a": 1}\n{oops\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"p.jsonl:2: invalid JSON \(Expecting property name"):
        list(iter_jsonl(path, error=ConfigError))
    with pytest.raises(JsonlError, match="none.jsonl: no such file"):
        list(iter_jsonl(tmp_path / "none.jsonl"))
    assert json.loads(path.read_text().splitlines()[0]) == {"a": 1}


def test_a_verb_from_the_shell_prints_one_line_and_exits_2(tmp_path):
    proc = run_python(["-m", "megatron_apriel", "average", str(tmp_path / "a"), str(tmp_path / "b"),
                       "--out", str(tmp_path / "o")], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line
    assert proc.stderr.startswith("error: ") and str(tmp_path / "a") in proc.stderr
    assert not (tmp_path / "o").exists()
