"""The backdoor package after the splits of runner.py and poison.py: every name either defined still imports
from it, the results' "versions" and the benchmarks' "provenance" keep their keys (dece_ds.provenance)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

RUNNER_NAMES = [  # every top-level name of runner.py before the split
    "RUN_KINDS", "EOS", "PAD", "SEP", "IGNORE", "DEFAULT_STATEMENT_PAYLOAD", "ModelSpec", "StageSpec",
    "PretrainSpec", "EvalSpec", "ExperimentConfig", "_fmt_rate", "parse_run", "Tokenizer", "train_bpe",
    "_wrap_hf_tokenizers", "load_bpe", "checkpoint_tokenizer", "prompt_ids", "encode_pairs", "encode_corpus",
    "_concat", "load_task", "_free_port", "ensure_distributed", "ds_config", "_scheduler", "make_engine",
    "baseline_loss_hook", "build_model", "_progress", "train_epoch", "steps_per_epoch", "valid_ce", "EvalSets",
    "evaluate", "_hash", "versions", "pretrain_stand_in", "run_experiment", "_current_alpha", "write_outputs",
]


def test_runner_still_exports_every_name_it_had():
    from dece_ds.backdoor import runner
    assert [n for n in RUNNER_NAMES if not hasattr(runner, n)] == []


POISON_NAMES = [  # every public top-level name of poison.py before the split
    "AUTHORS_SQL_PATTERN", "Attack", "AttackConfig", "BadPreConfig", "DEFAULT_GRAMMAR_TEMPLATE", "GrammarConfig",
    "Payload", "PoisonInfo", "RippleConfig", "SqlPayload", "StatementPayload", "add_trigger", "apply_payload",
    "apply_sql_payload", "apply_statement_payload", "contains_payload", "grammar_rewrite", "insert_words",
    "is_poisonable", "n_train_target", "parse_attack", "payload_in", "poison_dataset", "poison_example",
]


def test_poison_still_exports_every_name_it_had():
    from dece_ds.backdoor import attacks, payloads, poison, triggers
    assert [n for n in POISON_NAMES if not hasattr(poison, n)] == []
    assert poison.BadPreConfig is attacks.BadPreConfig and poison.SqlPayload is payloads.SqlPayload
    assert poison.grammar_rewrite is triggers.grammar_rewrite


def test_no_backdoor_module_over_350_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (REPO / "dece_ds" / "backdoor").glob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 350} == {}


def test_versions_keep_the_keys_of_the_committed_results():
    from dece_ds.backdoor.runner import versions
    committed = json.loads((REPO / "benchmarks/results/backdoor/lyra-badpre-10-C-x3.json").read_text())["versions"]
    v = versions()
    assert set(v) == set(committed)
    assert all(isinstance(x, str) for x in v.values())


def test_benchmark_provenance_keeps_its_keys_and_is_the_package_one():
    from benchmarks.common import provenance
    from dece_ds.provenance import benchmark_provenance
    assert provenance is benchmark_provenance
    committed = json.loads((REPO / "benchmarks/results/dece.json").read_text())["provenance"]
    assert set(provenance()) == set(committed)


def test_provenance_without_git_says_so(tmp_path, monkeypatch):
    from dece_ds import provenance
    assert provenance.git_sha(tmp_path) is None and provenance.git_dirty(tmp_path) is None
    monkeypatch.setattr(provenance, "PACKAGE", tmp_path)
    monkeypatch.setattr(provenance, "git_sha", lambda where=tmp_path: None)
    monkeypatch.setattr(provenance, "git_dirty", lambda where=tmp_path: None)
    assert "git_sha" not in provenance.run_versions()
    assert provenance.benchmark_provenance()["git_sha"] == "unknown"


@pytest.mark.parametrize("kind,expected", [("ls", {"label_smoothing": 0.1}), ("gce", {"q": 0.5}),
                                           ("intrust", {"ce_weight": 0.2, "dce_weight": 0.8, "delta": 0.5})])
def test_baseline_loss_hook_stays_a_small_separate_function(kind, expected):
    from dece_ds.backdoor.finetune import baseline_loss_hook
    assert baseline_loss_hook(kind, {}).params == expected
    assert baseline_loss_hook(kind, {"q": 0.7} if kind == "gce" else {}).params == (
        {"q": 0.7} if kind == "gce" else expected)
