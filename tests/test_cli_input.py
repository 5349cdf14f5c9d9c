"""Bad input on the ``dece-ds`` command line: one line ``dece-ds <command>: error: ...`` and exit 2, never a
traceback. A bad JSON file behaves the same in every command that reads one (``check-config``, ``plan``,
``backdoor run --config``, ``backdoor report``): they all go through ``dece_ds.config.read_json_object``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dece_ds.cli import main

from .test_config import BAD_FILES, bad_config_file

REPO = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(code: int, out: str, err: str, command: str, *parts: str) -> None:
    assert code == 2, (code, err)
    assert out == ""
    assert err.startswith(f"dece-ds {command}: error: "), err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in err, (part, err)


COMMANDS = {
    "check-config": lambda p: ["check-config", str(p)],
    "plan": lambda p: ["plan", str(p)],
    "backdoor run": lambda p: ["backdoor", "run", "--config", str(p), "--print-config"],
    "backdoor report": lambda p: ["backdoor", "report", str(p)],
}


@pytest.mark.parametrize("kind", BAD_FILES)
@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_reports_a_bad_json_file_in_one_line(tmp_path, capsys, command, kind):
    path, expected = bad_config_file(tmp_path, kind)
    if command == "plan" and kind == "directory":  # a folder is a model folder: its config.json is missing
        expected = "a folder without a config.json"
    code, out, err = run_cli(capsys, *COMMANDS[command](path))
    assert_one_line(code, out, err, command, str(path), expected)


def test_the_installed_entry_point_prints_no_traceback(tmp_path):
    """The same through ``python -m dece_ds.cli``, as a user runs it."""
    path = tmp_path / "cfg.json"
    path.write_text("[1, 2]")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for argv in (["check-config", str(path)], ["plan", str(path)], ["plan", "codellama-7b", "--world-size", "0"]):
        proc = subprocess.run([sys.executable, "-m", "dece_ds.cli", *argv], capture_output=True, text=True,
                              env=env, timeout=120)
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("dece-ds plan: error: argument --world-size: must be >= 1, got 0")


@pytest.mark.parametrize("argv,command,expected", [
    ([], "dece-ds", "the following arguments are required: command"),
    (["nope"], "dece-ds", "invalid choice: 'nope'"),
    (["backdoor"], "dece-ds backdoor", "required: {run,report}"),
    (["check-config"], "dece-ds check-config", "required: path"),
    (["plan", "codellama-7b", "--zero-stage", "5"], "dece-ds plan", "argument --zero-stage: invalid choice: 5"),
])
def test_argparse_errors_are_one_line(capsys, argv, command, expected):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith(f"{command}: error: ") and expected in err and err.count("\n") == 1, err
    assert f"(see {command} --help)" in err
