"""The `retinanet` command line: every command is reachable, every tools/*.py script is a
three-line call into it, and errors end the same way everywhere."""

import argparse
import ast
import subprocess
import sys
from pathlib import Path

import pytest

import retinanet
from retinanet import cli
from retinanet.engine.signals import TrainingInterrupted

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "-h"])
    assert exit_info.value.code == 0
    assert f"usage: retinanet {command}" in capsys.readouterr().out


def test_every_tool_script_is_a_call_into_the_command_line():
    scripts = {p.stem: p for p in (REPO / "tools").glob("*.py")}
    assert {name.replace("-", "_") for name in cli.COMMANDS} == set(scripts)
    for stem, path in scripts.items():
        tree = ast.parse(path.read_text())
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
        commands = [
            c.args[0].elts[0].value
            for c in calls
            if isinstance(c.func, ast.Name) and c.func.id == "main"
        ]
        assert commands == [stem.replace("_", "-")], path
        assert "sys.path" not in path.read_text(), path


def test_no_module_edits_sys_path():
    offenders = [
        str(p) for p in [*(REPO / "retinanet").rglob("*.py"), *(REPO / "tools").glob("*.py")]
        if "sys.path.insert" in p.read_text() or "sys.path.append" in p.read_text()
    ]  # fmt: skip
    assert offenders == []


def test_a_tool_script_runs_from_anywhere_without_path_edits(tmp_path):
    run = subprocess.run(
        [sys.executable, str(REPO / "tools" / "eval.py"), "-h"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "usage: retinanet eval" in run.stdout


def test_version_and_unknown_command(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == retinanet.__version__
    assert cli.main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and "train" in err


def _fake_command(monkeypatch, raised: BaseException):
    class Command:
        __doc__ = "A command that fails."

        @staticmethod
        def add_arguments(parser: argparse.ArgumentParser) -> None:
            pass

        @staticmethod
        def run(args: argparse.Namespace) -> int:
            raise raised

    monkeypatch.setitem(cli.COMMANDS, "fails", "fails")
    monkeypatch.setattr(cli.importlib, "import_module", lambda name: Command)


def test_user_errors_end_in_one_line_and_status_1(monkeypatch, capsys):
    _fake_command(monkeypatch, FileNotFoundError("config file not found: x.yaml"))
    assert cli.main(["fails"]) == 1
    assert capsys.readouterr().err == "error: config file not found: x.yaml\n"
    _fake_command(monkeypatch, KeyError("model.head.cls_score.weight missing"))
    assert cli.main(["fails"]) == 1
    assert capsys.readouterr().err == "error: model.head.cls_score.weight missing\n"


def test_debug_shows_the_traceback(monkeypatch):
    _fake_command(monkeypatch, ValueError("bad value"))
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(ValueError, match="bad value"):
        cli.main(["fails"])


def test_an_interrupted_training_exits_with_its_signal(monkeypatch, capsys):
    _fake_command(monkeypatch, TrainingInterrupted("stopped by SIGTERM after iteration 7", 15))
    assert cli.main(["fails"]) == 128 + 15
    assert "stopped by SIGTERM after iteration 7" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback(monkeypatch):
    _fake_command(monkeypatch, ZeroDivisionError("division by zero"))
    with pytest.raises(ZeroDivisionError):
        cli.main(["fails"])
