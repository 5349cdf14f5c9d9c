"""The recipes through their launchers (1 CPU rank, ZeRO-3, deepspeed launcher):

- launch/train.py with ``"fused_linear": true``: a numeric alpha in every log line, the checkpoint's dece
  record says enabled and the fused mode; a kill, a torn log line and a resume that asks for another seed
  (refused, naming the seed and the override) and then the right resume, which equals the uninterrupted run;
- launch/continue_pretraining.py: kill-and-resume equals the uninterrupted run, and the end-of-data save
  never rewrites the checkpoint that ``latest`` names.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

import pytest
import torch

from . import REPO, ds_config, read_jsonl, run_launcher, write_json, write_prompt_completion_data

TRAIN = REPO / "launch" / "train.py"
CPT = REPO / "launch" / "continue_pretraining.py"
FUSED = {"enabled": True, "label_smoothing": 0.05, "alpha_base": 0.9, "schedule": "epoch", "steps_per_epoch": 2,
         "fused_linear": True}

pytestmark = pytest.mark.slow


def _checkpoint_client_state(tag_dir: Path) -> dict:
    """The client_state our own run wrote (a trusted file: the test made it)."""
    path = glob.glob(str(tag_dir / "*model_states.pt"))[0]
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def fused_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe_fused")
    data = write_prompt_completion_data(root / "train.jsonl")
    config = write_json(root / "ds.json", ds_config(tensor_parallel=None, dece=FUSED))
    return root, data, config


def _train(setup, name, *extra, check=True):
    root, data, config = setup
    out = root / name
    args = ["--deepspeed_config", str(config), "--data", str(data), "--prompt-field", "src", "--completion-field",
            "tgt", "--seq-len", "64", "--max-steps", "4", "--save-every", "2", "--no-progress", "--no-export",
            "--out", str(out), *extra]
    return out, run_launcher("deepspeed", 1, TRAIN, args, check=check)


@pytest.fixture(scope="module")
def fused_run(fused_setup):
    return _train(fused_setup, "uninterrupted")[0]


def test_fused_linear_run_logs_alpha_and_records_the_fused_mode(fused_run):
    records = read_jsonl(fused_run / "log.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert r["alpha"] == pytest.approx(0.9 ** (1 + (r["step"] - 1) // 2))
    state = _checkpoint_client_state(fused_run / "checkpoints" / "step4")
    assert state["dece"]["enabled"] is True and state["dece"]["mode"] == "hidden"
    assert state["dece"]["config"]["fused_linear"] is True
    assert state["run"]["seed"] == 0 and state["run"]["world_size"] == 1


def test_kill_torn_log_and_resume_checks_the_run(fused_setup, fused_run):
    out, proc = _train(fused_setup, "killed", "--simulate-crash-after-step", "3", check=False)
    assert proc.returncode != 0
    assert (out / "checkpoints" / "latest").read_text().strip() == "step2"
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 1.2')  # a record torn by the kill
    out, proc = _train(fused_setup, "killed", "--resume", "--seed", "1", check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "seed: 0 in the checkpoint, 1 now" in proc.stderr and "--allow-resume-mismatch" in proc.stderr
    out, proc = _train(fused_setup, "killed", "--resume")
    assert "dropped a torn last line" in proc.stdout + proc.stderr
    resumed = read_jsonl(out / "log.jsonl")
    reference = read_jsonl(fused_run / "log.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["alpha"] for r in resumed] == pytest.approx([r["alpha"] for r in reference], rel=1e-12)
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in reference], rel=1e-6, abs=1e-7)


# ------------------------------------------------------------------------------- continued pretraining

def _write_corpus(path: Path, n: int = 40) -> Path:
    words = ["def", "return", "import", "class", "for", "while", "yield", "lambda"]
    with open(path, "w") as f:
        for i in range(n):
            text = " ".join(words[(i * 3 + k) % len(words)] for k in range(12)) + f" value_{i % 5}"
            f.write(json.dumps({"text": text}) + "\n")
    return path


@pytest.fixture(scope="module")
def cpt_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe_cpt")
    corpus = _write_corpus(root / "corpus.jsonl")
    config = write_json(root / "ds.json", ds_config(tensor_parallel=None, train_micro_batch_size_per_gpu=2,
                                                    dece={"alpha_base": 0.9}))
    return root, corpus, config


def _cpt(setup, name, *extra, check=True):
    root, corpus, config = setup
    out = root / name
    args = ["--deepspeed_config", str(config), "--data", str(corpus), "--seq-len", "32", "--epochs", "3",
            "--save-every", "2", "--vocab-size", "300", "--no-export", "--out", str(out), *extra]
    return out, run_launcher("deepspeed", 1, CPT, args, check=check)


@pytest.fixture(scope="module")
def cpt_run(cpt_setup):
    return _cpt(cpt_setup, "uninterrupted")[0]


def test_cpt_end_of_data_save_never_rewrites_latest(cpt_run):
    summary = json.loads((cpt_run / "summary.json").read_text())
    assert summary["end_of_data"] is True
    steps = summary["steps"]
    latest = (cpt_run / "checkpoints" / "latest").read_text().strip()
    if steps % 2 == 0:  # a periodic save at this step came first: the end-of-data save took a new tag
        assert latest == f"step{steps}.1" and (cpt_run / "checkpoints" / f"step{steps}").is_dir()
    else:
        assert latest == f"step{steps}"
    records = read_jsonl(cpt_run / "log.jsonl")
    assert all(isinstance(r["alpha"], float) for r in records)  # "dece": {...} without a schedule: continuous
    assert records[-1]["alpha"] < records[0]["alpha"]


def test_cpt_kill_and_resume_matches_the_uninterrupted_run(cpt_setup, cpt_run):
    out, proc = _cpt(cpt_setup, "killed", "--simulate-crash-after-step", "3", check=False)
    assert proc.returncode != 0
    out, proc = _cpt(cpt_setup, "killed", "--resume")
    resumed, reference = read_jsonl(out / "log.jsonl"), read_jsonl(cpt_run / "log.jsonl")
    assert [r["step"] for r in resumed] == [r["step"] for r in reference]
    assert [r["alpha"] for r in resumed] == pytest.approx([r["alpha"] for r in reference], rel=1e-12)
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in reference], rel=1e-6, abs=1e-7)
