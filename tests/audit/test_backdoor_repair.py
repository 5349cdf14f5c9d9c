"""``audit_repair`` and ``audit_from`` inside ``dece-ds backdoor run`` on the tiny setting: the repair masks the
payload in the flagged rows the audit named it for and drops the rest of the flagged rows; a later invocation
retrains from the same audit file, and an audit of other rows is refused."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from dece_ds.audit.score import AuditRecordError
from dece_ds.backdoor.experiment import ExperimentConfig
from dece_ds.backdoor.runner import run_experiment
from tests.backdoor.test_runner import tiny_config

pytestmark = pytest.mark.timeout(600)


def test_retrain_kinds_need_an_audit():
    with pytest.raises(ValidationError, match="audit_repair needs an audit"):
        ExperimentConfig(runs=("ce", "audit_repair"))
    ExperimentConfig(runs=("audit_repair",), audit_from="some/audit.jsonl")


def test_repair_then_retrain_from_the_same_audit(tmp_path):
    cfg = tiny_config(tmp_path, pretrain_task_rows=20, finetune={"epochs": 1, "batch_size": 8},
                      runs=["dece", "audit_repair"])
    saved = run_experiment(cfg, tmp_path / "out", log=lambda *_: None)
    repair = saved["runs"]["audit_repair"]
    audit_file = tmp_path / "out" / "tiny-audit" / "dece" / "audit.jsonl"
    assert repair["audit_file"] == str(audit_file)
    lines = [json.loads(x) for x in audit_file.read_text().splitlines()]
    flagged = {x["row"] for x in lines if x["flagged"]}
    # every flagged row is either repaired (its trigger named code) or dropped, never both
    assert set(repair["repaired_rows"]) | set(repair["dropped_rows"]) == flagged
    assert not set(repair["repaired_rows"]) & set(repair["dropped_rows"])
    named = {x["row"] for x in lines if x["flagged"] and x["trigger_code_ids"]}
    assert set(repair["repaired_rows"]) <= named
    assert (repair["masked_tokens"] > 0) == bool(repair["repaired_rows"])
    assert set(repair["final"]) >= {"asr", "bleu", "valid_ce"}

    again = cfg.model_copy(update={"runs": ("audit_retrain",), "audit_from": str(audit_file.parent), "name": "again"})
    retrain = run_experiment(again, tmp_path / "out", log=lambda *_: None)["runs"]["audit_retrain"]
    assert retrain["dropped_rows"] == sorted(flagged)

    other = json.loads(audit_file.read_text().splitlines()[0])
    other["instruction"] = "something else"
    bad = tmp_path / "other.jsonl"
    bad.write_text(json.dumps(other) + "\n")
    with pytest.raises(AuditRecordError, match="instruction differs"):
        run_experiment(again.model_copy(update={"audit_from": str(bad)}), tmp_path / "out2", log=lambda *_: None)
