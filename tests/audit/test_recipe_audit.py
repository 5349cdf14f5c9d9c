"""The recorder inside launch/train.py under the DeepSpeed launcher: 2 ranks of AutoTP TP=2 with the
vocab-parallel head + ZeRO-3 (the target's log p_t arrives through the loss's own all-reduce; TP rank 0 writes),
a kill and a resume that ends with the uninterrupted run's record, ``dece-ds audit`` on the run folder, and
``--drop-rows`` that removes exactly the flagged rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dece_ds.audit import read_record
from dece_ds.cli import main as cli_main
from tests.integrations import ds_config, read_jsonl, run_launcher, write_json, write_prompt_completion_data

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "launch" / "train.py"
pytestmark = pytest.mark.slow


def _dece(out: Path) -> dict:
    return {"enabled": True, "alpha_base": 0.9, "schedule": "epoch", "steps_per_epoch": 3,
            "audit": {"enabled": True, "out": str(out)}}


def _train(root: Path, name: str, *extra, check=True):
    out = root / name
    config = write_json(root / f"{name}.json", ds_config(dece=_dece(out / "audit")))
    args = ["--deepspeed_config", str(config), "--data", str(root / "train.jsonl"), "--prompt-field", "src",
            "--completion-field", "tgt", "--seq-len", "64", "--max-steps", "4", "--save-every", "2",
            "--no-progress", "--no-export", "--out", str(out), *extra]
    return out, run_launcher("deepspeed", 2, TRAIN, args, check=check)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe_audit")
    write_prompt_completion_data(root / "train.jsonl", n=48)
    return root


def test_tp2_record_kill_resume_audit_and_drop(root):
    whole, proc = _train(root, "whole")
    assert "vocab-parallel over a tensor-parallel group of 2" in proc.stdout + proc.stderr   # the AutoTP head
    files = sorted(p.name for p in (whole / "audit").glob("rank*.jsonl"))
    assert files == ["rank00000.jsonl"], f"only TP rank 0 writes, got {files}"
    rec = read_record(whole / "audit")
    steps = sorted({v.step for r in rec.rows for v in rec.visits[r].values()})
    assert steps == [0, 1, 2, 3]

    killed, proc = _train(root, "killed", "--simulate-crash-after-step", "3", check=False)
    assert proc.returncode != 0
    # same folder, same config: the resumed run redoes step 3 (index 2) from the checkpoint of step 2
    config = root / "killed.json"
    args = ["--deepspeed_config", str(config), "--data", str(root / "train.jsonl"), "--prompt-field", "src",
            "--completion-field", "tgt", "--seq-len", "64", "--max-steps", "4", "--save-every", "2",
            "--no-progress", "--no-export", "--out", str(killed), "--resume"]
    run_launcher("deepspeed", 2, TRAIN, args)
    a, b = read_record(whole / "audit"), read_record(killed / "audit")
    assert a.rows == b.rows
    for r in a.rows:
        assert {e: (v.step, v.tok) for e, v in a.visits[r].items()} == \
               {e: (v.step, v.tok) for e, v in b.visits[r].items()}
        for e in a.visits[r]:   # the same numbers as the uninterrupted run (same batches, same weights)
            assert max(abs(x - y) for x, y in zip(a.visits[r][e].logp, b.visits[r][e].logp)) < 1e-3
    lines = [json.loads(x) for x in (killed / "audit" / "rank00000.jsonl").read_text().splitlines()]
    assert sorted(x["step"] for x in lines if "step" in x) == sorted(
        x["step"] for x in read_jsonl(whole / "audit" / "rank00000.jsonl") if "step" in x)

    assert cli_main(["audit", str(whole)]) == 0
    audit_rows = read_jsonl(whole / "audit.jsonl")
    assert {r["row"] for r in audit_rows} == set(a.rows)
    assert all(r["instruction"].startswith("select ") for r in audit_rows)   # decoded from the data file

    # --drop-rows: hand-flag two rows that the record holds; the retrain never sees them
    flag = sorted(a.rows)[:2]
    drop_file = root / "flagged.jsonl"
    drop_file.write_text("".join(json.dumps({"row": r, "flagged": r in flag}) + "\n" for r in a.rows))
    dropped, proc = _train(root, "dropped", "--drop-rows", str(drop_file))
    assert "dropped 2 flagged row(s), 46 left" in proc.stdout + proc.stderr
    rec = read_record(dropped / "audit")
    assert not set(flag) & set(rec.rows)
