"""Bad input gets a clear error: a missing, empty, truncated or corrupt record, mixed runs in one folder,
empty rows, a data file that does not match the record, a bad audit file for --drop-rows; the CLI says it in
one line and exits 2. And the retrain's filter drops exactly the flagged rows."""

from __future__ import annotations

import json

import pytest
import torch

from dece_ds.audit import AuditRecorder, AuditRecordError, read_record
from dece_ds.audit.cli import check_data_matches
from dece_ds.audit.report import flagged_rows
from dece_ds.audit.score import run_audit
from dece_ds.backdoor.audit_run import keep_rows
from dece_ds.cli import main as cli_main

KW = dict(vocab_size=16, label_smoothing=0.05, prob_floor=1e-7)


def _record(path, rows=((0, [3, 4, 5]), (1, [6, 7])), **kw):
    rec = AuditRecorder(path, **{**KW, **kw})
    for r, toks in rows:
        t = torch.tensor([toks + [-100] * (4 - len(toks))])
        rec.observe([r], t, torch.full(t.shape, -1.0), ignore_index=-100, alpha=0.9, step=r, epoch=1)
    rec.close()
    return path


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(AuditRecordError, match="no audit record folder"):
        read_record(tmp_path / "nope")
    with pytest.raises(AuditRecordError, match="no rank"):
        read_record(tmp_path)
    (tmp_path / "rank00000.jsonl").write_text("")
    with pytest.raises(AuditRecordError, match="holds no step"):
        read_record(tmp_path)


def test_torn_last_line_is_skipped_corrupt_middle_line_is_an_error(tmp_path):
    path = _record(tmp_path)
    f = path / "rank00000.jsonl"
    f.write_text(f.read_text() + '{"step": 9, "ro')
    assert read_record(path).torn == 1
    lines = f.read_text().splitlines()
    f.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    with pytest.raises(AuditRecordError, match="line 2 is not JSON"):
        read_record(path)


def test_records_of_two_runs_in_one_folder(tmp_path):
    _record(tmp_path)
    _record(tmp_path, label_smoothing=0.1, rank=1)
    with pytest.raises(AuditRecordError, match="differs"):
        read_record(tmp_path)


def test_a_step_record_with_mismatched_lengths(tmp_path):
    path = _record(tmp_path)
    with open(path / "rank00000.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "epoch": 1, "alpha": 0.9, "rows": [1, 2], "pos": [[1]], "tok": [[1]],
                            "logp": [[0.0]]}) + "\n\n")
    with pytest.raises(AuditRecordError, match="line 4: not an audit step record"):
        read_record(path)


def test_rows_without_trained_tokens(tmp_path):
    path = _record(tmp_path, rows=((0, []), (1, [])))
    with pytest.raises(AuditRecordError, match="no trained token"):
        run_audit(read_record(path))


def test_row_ids_that_do_not_fit_the_batch(tmp_path):
    rec = AuditRecorder(tmp_path, **KW)
    with pytest.raises(ValueError, match="2 row id"):
        rec.observe([0, 1], torch.zeros(3, 4, dtype=torch.long), torch.zeros(12), ignore_index=-100, alpha=0.9,
                    step=0, epoch=1)


def test_data_that_does_not_match_the_record(tmp_path):
    record = read_record(_record(tmp_path))
    good = [{"src": "a", "tgt": "x"}, {"src": "b", "tgt": "y"}]
    enc = {"x": [3, 4, 5], "y": [6, 7], "z": [9]}
    check_data_matches(record, good, "src", "tgt", lambda s: enc[s])
    with pytest.raises(AuditRecordError, match="names row 1"):
        check_data_matches(record, good[:1], "src", "tgt", lambda s: enc[s])
    with pytest.raises(AuditRecordError, match="differ from the data"):
        check_data_matches(record, [good[0], {"src": "b", "tgt": "z"}], "src", "tgt", lambda s: enc[s])


def test_bad_audit_file_for_drop_rows(tmp_path):
    with pytest.raises(AuditRecordError, match="no such audit file"):
        flagged_rows(tmp_path / "audit.jsonl")
    (tmp_path / "audit.jsonl").write_text('{"row": 1, "flagged": true}\n{"score": 2}\n')
    with pytest.raises(AuditRecordError, match="line 2 is not an audit row"):
        flagged_rows(tmp_path / "audit.jsonl")
    (tmp_path / "audit.jsonl").write_text('{"row": 1, "flagged": true}\n{"row": 4, "flagged": false}\n'
                                          '{"row": 7, "flagged": true}\n')
    assert flagged_rows(tmp_path / "audit.jsonl") == [1, 7]


def test_keep_rows_drops_exactly_the_flagged():
    data = {"input_ids": torch.arange(10)[:, None], "labels": torch.arange(10)[:, None] + 100}
    kept, idx = keep_rows(data, [2, 5, 9])
    assert idx == [0, 1, 3, 4, 6, 7, 8]
    assert kept["input_ids"].flatten().tolist() == idx and kept["labels"].flatten().tolist() == [i + 100 for i in idx]


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert cli_main(["audit", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dece-ds audit: error:") and "no such folder" in err and "\n" not in err
    assert cli_main(["audit"]) == 2
    assert "give RUN_OUT" in capsys.readouterr().err
    assert cli_main(["audit", str(tmp_path)]) == 2
    assert "no audit record" in capsys.readouterr().err


def test_cli_on_a_record_folder(tmp_path, capsys):
    _record(tmp_path / "rec")
    (tmp_path / "labels.json").write_text("[1]")
    assert cli_main(["audit", str(tmp_path / "rec"), "--out", str(tmp_path / "o"), "--labels",
                     str(tmp_path / "labels.json")]) == 0
    summary = json.loads((tmp_path / "o" / "audit_summary.json").read_text())
    assert summary["metrics"]["recurrence"]["true_poisoned"] == 1
    assert (tmp_path / "o" / "audit.md").is_file() and (tmp_path / "o" / "audit.png").is_file()


def test_experiment_needs_a_dece_run_before_audit_retrain():
    from pydantic import ValidationError

    from dece_ds.backdoor.experiment import ExperimentConfig
    with pytest.raises(ValidationError, match="put a dece run before it"):
        ExperimentConfig(runs=("ce", "audit_retrain"))
    ExperimentConfig(runs=("ce", "dece", "audit_retrain"))
