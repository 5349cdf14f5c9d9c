"""The audit's baselines inside ``dece-ds backdoor run`` on the tiny setting (seconds per run): every ``ce`` run
gets an ``"audit_baselines"`` block with the audit block's metric keys, with ``--audit-baselines`` or with
``audit_retrain`` in the runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dece_ds.backdoor.runner import run_experiment
from tests.backdoor.test_runner import tiny_config

pytestmark = pytest.mark.timeout(600)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("baselines_cache")   # one stand-in for both tests


def _tiny(tmp_path, cache, **over):
    return tiny_config(tmp_path, pretrain_task_rows=20, finetune={"epochs": 1, "batch_size": 8},
                       cache_dir=str(cache), **over)


def _check_block(block: dict, poisoned: int, fit_on: str) -> None:
    assert set(block) == {"ce_loss", "spectral", "ngram"}
    for name, m in block.items():
        assert m["true_poisoned"] == poisoned, name
        assert 0.0 <= m["auroc"] <= 1.0 and 0.0 <= m["precision_at_k"] <= 1.0, name
        assert set(m["recall_at_fpr"]) == {"0.01", "0.05"}, name
        assert all(0.0 <= v <= 1.0 for v in m["recall_at_fpr"].values()), name
        assert 0 <= m["flagged_poisoned"] <= m["flagged"] <= 40 and "rule" in m["cut"], name
    # continuous losses: no ties, so the other direction's AUROC is the complement
    assert block["ce_loss"]["auroc_low"] == pytest.approx(1.0 - block["ce_loss"]["auroc"])
    assert block["ngram"]["fit_on"] == fit_on


def test_cli_flag_adds_the_block_to_ce_runs(tmp_path, cache):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(_tiny(tmp_path, cache).model_dump(mode="json")))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "dece_ds.cli", "backdoor", "run", "--config", str(config),
                          "--runs", "ce,gce", "--audit-baselines", "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=540)
    assert out.returncode == 0, out.stderr[-2000:]
    saved = json.loads((tmp_path / "out" / "tiny.json").read_text())
    assert saved["config"]["audit_baselines"] is True
    _check_block(saved["runs"]["ce"]["audit_baselines"], saved["data"]["poisoned_rows"], "held_apart_clean")
    assert "audit_baselines" not in saved["runs"]["gce"]
    assert "[ce] audit baselines: ce_loss AUROC" in out.stdout


def test_audit_retrain_turns_the_baselines_on(tmp_path, cache):
    cfg = _tiny(tmp_path, cache, runs=["ce", "dece", "audit_retrain"])
    assert cfg.audit_baselines is False
    saved = run_experiment(cfg, tmp_path / "out", log=lambda *_: None)
    ce, dece = saved["runs"]["ce"], saved["runs"]["dece"]
    _check_block(ce["audit_baselines"], 4, "held_apart_clean")
    assert "audit_baselines" not in dece and "audit_baselines" not in saved["runs"]["audit_retrain"]
    assert set(dece["audit"]) >= {"auroc", "precision_at_k", "recall_at_fpr", "true_poisoned"}
    meta = json.loads((tmp_path / "out" / "tiny-audit" / "dece" / "meta.json").read_text())
    assert len(meta["instructions"]) == 40 and meta["poisoned"] == sorted(meta["poisoned"])
