"""Every shell command quoted in README.md and docs/*.md points at things that exist.

Commands are taken from code blocks (fenced or indented) and from inline code spans that start with
``.venv/bin/``, ``dece-ds``, ``bash launch/``, ``python`` or an environment assignment. For each:
scripts and repository files it names exist; a ``dece-ds`` command parses with the real CLI parser
(subcommands and flags exist; a bare name in prose only needs its ``--help``); every ``launch/`` script
quoted with flags is run with ``--help`` (all in one interpreter, a few seconds) and each flag quoted
must be in its help; a benchmark script's flags must be in its source. Nothing is trained or benchmarked.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest

from dece_ds.cli import build_parser
from dece_ds.docs_tables import REPO, doc_files

PREFIXES = (".venv/bin/", "dece-ds", "bash launch/", "python")
REPO_DIRS = ("launch/", "benchmarks/", "ds_configs/", "tests/", "docs/", "dece_ds/")
ENV_RE = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*$")


@dataclass(frozen=True)
class Command:
    source: str  # file:line
    text: str
    inline: bool = False  # an inline code span in prose: may name a command without its arguments

    @property
    def argv(self) -> list[str]:
        argv = shlex.split(self.text)
        while argv and ENV_RE.match(argv[0]):
            argv = argv[1:]
        return argv


def _code_lines(text: str) -> list[tuple[int, str, bool]]:
    """(line number, line, inline?) of fenced shell blocks, indented blocks, and inline code spans."""
    out: list[tuple[int, str, bool]] = []
    fence: str | None = None
    prev_blank = True
    in_indented = False
    for n, line in enumerate(text.splitlines(), 1):
        if fence is not None:
            if line.startswith("```"):
                fence = None
            elif fence in ("", "bash", "sh", "shell", "console"):
                out.append((n, line, False))
            continue
        if line.startswith("```"):
            fence = line[3:].strip()
            continue
        if line.startswith("    ") and (prev_blank or in_indented) and not line.lstrip().startswith(("-", "*")):
            in_indented = True
            out.append((n, line.strip(), False))
        else:
            in_indented = False
            for span in re.findall(r"`([^`]+)`", line):
                out.append((n, span, True))
        prev_blank = not line.strip()
    return out


def _commands(path: Path) -> list[Command]:
    cmds: list[Command] = []
    pending, start = "", 0
    for n, line, inline in _code_lines(path.read_text()):
        line = line.strip()
        if not pending:
            start = n
        if line.startswith("#"):
            continue
        line = re.sub(r"\s+#\s.*$", "", line)  # trailing comment
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full, pending = (pending + line).strip(), ""
        for part in full.split("&&"):
            part = part.strip()
            head = part.split()[0] if part.split() else ""
            bare = part
            while bare.split() and ENV_RE.match(bare.split()[0]):
                bare = bare.split(None, 1)[1] if len(bare.split()) > 1 else ""
            if bare.startswith(PREFIXES) or (head and ENV_RE.match(head) and bare.startswith(PREFIXES)):
                cmds.append(Command(f"{path.relative_to(REPO)}:{start}", bare, inline))
    return cmds


ALL = [c for p in doc_files(REPO) for c in _commands(p)]


def test_commands_are_found():
    texts = [c.text for c in ALL]
    assert "bash launch/setup.sh" in texts
    assert any(t.startswith(".venv/bin/deepspeed --num_gpus 1 launch/backdoor_demo.py") for t in texts)
    assert any(t.startswith("dece-ds backdoor run") for t in texts)
    assert len(ALL) >= 20


def _script_and_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """The Python script a launcher/python command runs, and its arguments."""
    for i, tok in enumerate(argv):
        if tok.endswith(".py"):
            return tok, argv[i + 1:]
    return None, []


def _repo_paths(argv: list[str]) -> list[str]:
    paths = []
    for tok in argv:
        value = tok.split("=", 1)[1] if tok.startswith("--") and "=" in tok else tok
        if value.startswith(REPO_DIRS):
            paths.append(value.split("::")[0])
    return paths


def _exists(rel: str) -> bool:
    if any(ch in rel for ch in "*?[{"):
        pattern = re.sub(r"\{([^}]*)\}", "*", rel)
        return bool(glob.glob(str(REPO / pattern)))
    return (REPO / rel).exists()


def _dece_ds_argv(argv: list[str]) -> list[str] | None:
    if argv and argv[0] == "dece-ds":
        return argv[1:]
    if len(argv) > 2 and argv[1:3] == ["-m", "dece_ds.cli"]:
        return argv[3:]
    return None


@lru_cache(maxsize=None)
def _parser():
    return build_parser()


def _parse(argv: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            _parser().parse_args(argv)
        except SystemExit as e:
            return int(e.code or 0), out.getvalue() + err.getvalue()
    return 0, out.getvalue()


@pytest.mark.parametrize("cmd", ALL, ids=[f"{c.source} {c.text[:60]}" for c in ALL])
def test_command_targets_exist(cmd: Command):
    argv = cmd.argv
    assert argv, cmd
    missing = [p for p in _repo_paths(argv) if not _exists(p)]
    assert not missing, f"{cmd.source}: `{cmd.text}` names missing files {missing}"
    if argv[0] == "bash":
        assert (REPO / argv[1]).is_file(), f"{cmd.source}: {argv[1]} does not exist"
        return
    sub = _dece_ds_argv(argv)
    if sub is not None:
        if cmd.inline and "..." in sub or cmd.inline and len(sub) <= 2 and not any(a.startswith("-") for a in sub):
            sub = [w for w in sub if w != "..." and not w.startswith("-")] + ["--help"]  # a name in prose
        rc, msg = _parse(sub)
        assert rc == 0, f"{cmd.source}: `{cmd.text}` does not parse with the dece-ds CLI: {msg.strip()[-400:]}"
        return
    if argv[:3] == [".venv/bin/python", "-m", "pytest"]:
        return  # paths checked above
    script, _ = _script_and_args(argv)
    assert script, f"{cmd.source}: `{cmd.text}` runs no known script"
    assert (REPO / script).is_file(), f"{cmd.source}: {script} does not exist"
    assert Path(argv[0]).name in {"python", "deepspeed", "torchrun", "mpiexec"}, argv[0]


def _flags(args: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in args if a.startswith("--")}


SCRIPT_FLAGS: dict[str, set[str]] = {}
for _c in ALL:
    _script, _args = _script_and_args(_c.argv)
    if _script and _dece_ds_argv(_c.argv) is None and _c.argv[1:3] != ["-m", "pytest"]:
        SCRIPT_FLAGS.setdefault(_script, set()).update(_flags(_args))


HELP_RUNNER = """
import contextlib, io, runpy, sys
for script in sys.argv[1:]:
    buf = io.StringIO()
    sys.argv = [script, "--help"]
    with contextlib.redirect_stdout(buf):
        try:
            runpy.run_path(script, run_name="__main__")
            code = "no-exit"
        except SystemExit as e:
            code = e.code or 0
    print(f"@@@ {script} {code}")
    print(buf.getvalue())
"""


@pytest.fixture(scope="module")
def launch_help() -> dict[str, str]:
    """``--help`` of every launch/ script quoted with flags, all in one interpreter (imports paid once)."""
    scripts = sorted(s for s, f in SCRIPT_FLAGS.items() if s.startswith("launch/") and f)
    if not scripts:
        return {}
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", HELP_RUNNER, *scripts], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = {}
    for chunk in proc.stdout.split("@@@ ")[1:]:
        head, _, text = chunk.partition("\n")
        script, code = head.rsplit(" ", 1)
        assert code == "0", f"{script} --help exited with {code}:\n{text[-1000:]}"
        out[script] = text
    assert sorted(out) == scripts, proc.stderr[-2000:]
    return out


@pytest.mark.parametrize("script", sorted(SCRIPT_FLAGS))
def test_quoted_script_flags_exist(script, launch_help):
    flags = SCRIPT_FLAGS[script]
    if not flags:
        return
    if script.startswith("launch/"):
        known = launch_help[script]
    else:  # benchmarks: argparse literals in the source (importing them costs seconds each)
        known = (REPO / script).read_text()
    missing = sorted(f for f in flags if not re.search(re.escape(f) + r"(?![\w-])", known))
    assert not missing, f"{script}: flags quoted in the docs but unknown to the script: {missing}"


def test_every_quoted_dece_ds_subcommand_has_help():
    paths = set()
    for c in ALL:
        sub = _dece_ds_argv(c.argv)
        if sub:
            words = [w for w in sub if not w.startswith("-")][:2]
            paths.add(tuple(words[:1]))
            if words[0] in {"backdoor", "docs"} and len(words) > 1:
                paths.add(tuple(words[:2]))
    assert ("backdoor", "run") in paths and ("config-schema",) in paths and ("docs", "tables") in paths
    for words in sorted(paths):
        rc, text = _parse([*words, "--help"])
        assert rc == 0 and "usage: dece-ds" in text, f"dece-ds {' '.join(words)} --help: {text[-300:]}"


def test_the_checker_catches_bad_commands():
    text = ("```bash\ndece-ds backdoor run --no-such-flag 1\n.venv/bin/python launch/no_such_script.py \\\n"
            "    --out x   # a comment\n```\nSee `dece-ds no-such-command`.\n")
    assert [inline for _, _, inline in _code_lines(text)] == [False, False, False, True]
    assert _parse(["backdoor", "run", "--no-such-flag", "1"])[0] != 0
    assert _parse(["no-such-command", "--help"])[0] != 0
    assert not _exists("launch/no_such_script.py")
    assert _exists("benchmarks/results/backdoor/lyra-badpre-{1,2}-C-x3.json")
    assert _script_and_args(shlex.split(".venv/bin/deepspeed --num_gpus 2 launch/train.py --out x")) == \
        ("launch/train.py", ["--out", "x"])
