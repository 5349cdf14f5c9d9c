"""The run log survives kills: a torn last line is skipped, the rewrite on resume is atomic."""

from __future__ import annotations

import json
import os

import pytest

from dece_ds.recipes.run_log import RunLog, RunLogError, keep_steps_up_to, read_records


def _write(path, steps, torn=None):
    with open(path, "w") as f:
        for s in steps:
            f.write(json.dumps({"step": s, "loss": 1.0 / s}) + "\n")
        if torn:
            f.write(torn)


def test_torn_last_line_is_skipped_and_dropped_on_resume(tmp_path):
    path = tmp_path / "log.jsonl"
    _write(path, [1, 2, 3], torn='{"step": 4, "lo')
    records, torn = read_records(path)
    assert [r["step"] for r in records] == [1, 2, 3] and torn
    kept, was_torn = keep_steps_up_to(path, 2)
    assert (kept, was_torn) == (2, True)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    assert not [p for p in os.listdir(tmp_path) if p != "log.jsonl"]  # no temporary file left behind


def test_a_corrupt_line_before_the_last_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "log.jsonl"
    _write(path, [1], torn='{"step": 2, "lo\n' + json.dumps({"step": 3}) + "\n")
    with pytest.raises(RunLogError, match=r"log.jsonl: line 2 is not a JSON record"):
        read_records(path)


def test_keep_is_a_no_op_when_nothing_is_dropped(tmp_path):
    path = tmp_path / "log.jsonl"
    _write(path, [1, 2])
    before = os.stat(path).st_ino
    assert keep_steps_up_to(path, 5) == (2, False)
    assert os.stat(path).st_ino == before  # not rewritten
    assert keep_steps_up_to(tmp_path / "missing.jsonl", 3) == (0, False)


def test_rewrite_is_a_rename_a_kill_mid_write_leaves_the_old_log(tmp_path, monkeypatch):
    path = tmp_path / "log.jsonl"
    _write(path, [1, 2, 3])
    original = path.read_text()

    def killed(src, dst):  # the process dies after writing the temporary file, before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        keep_steps_up_to(path, 1)
    assert path.read_text() == original


def test_run_log_appends_flushed_lines_and_other_ranks_write_nothing(tmp_path):
    path = tmp_path / "log.jsonl"
    log = RunLog(path)
    log.write({"step": 1})
    assert path.read_text() == '{"step": 1}\n'  # flushed at once: a kill loses at most the line being written
    log.close()
    silent = RunLog(None)
    silent.write({"step": 1})
    silent.close()
