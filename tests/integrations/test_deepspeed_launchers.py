"""launch/train.py under deepspeed, torchrun and mpiexec (2 CPU ranks, AutoTP TP=2 + ZeRO-3 + DeCE),
and kill-and-resume.

Five launches, shared by the assertions: the same 6-step run under each launcher (checkpoints every 2
steps), then a run SIGKILLed after step 5 (last checkpoint: step 4) and its ``--resume``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from . import REPO, ds_config, read_jsonl, run_launcher, write_json, write_prompt_completion_data

TRAIN = REPO / "launch" / "train.py"
STEPS = 6
DECE = {"enabled": True, "label_smoothing": 0.05, "alpha_base": 0.9, "schedule": "epoch", "steps_per_epoch": 2}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("launchers")
    data = write_prompt_completion_data(root / "train.jsonl")
    config = write_json(root / "ds.json", ds_config(train_micro_batch_size_per_gpu=4, dece=DECE))
    return root, data, config


def _train(setup, launcher, name, *extra, check=True):
    root, data, config = setup
    out = root / name
    args = ["--deepspeed_config", str(config), "--data", str(data), "--prompt-field", "src",
            "--completion-field", "tgt", "--seq-len", "64", "--max-steps", str(STEPS), "--save-every", "2",
            "--no-progress", "--out", str(out), *extra]
    proc = run_launcher(launcher, 2, TRAIN, args, check=check)
    return out, proc


@pytest.fixture(scope="module")
def runs(setup):
    return {launcher: _train(setup, launcher, launcher)[0] for launcher in ("deepspeed", "torchrun", "mpiexec")}


def _losses(out: Path):
    return [(r["step"], r["loss"], r["alpha"]) for r in read_jsonl(out / "log.jsonl")]


def _assert_same_run(got, expected, what):
    assert [s for s, _, _ in got] == [s for s, _, _ in expected], what
    assert [a for _, _, a in got] == pytest.approx([a for _, _, a in expected], rel=1e-12), what
    assert [loss for _, loss, _ in got] == pytest.approx([loss for _, loss, _ in expected], rel=1e-6, abs=1e-7), what


def test_same_run_under_deepspeed_torchrun_and_mpiexec(runs):
    reference = _losses(runs["deepspeed"])
    assert [step for step, _, _ in reference] == list(range(1, STEPS + 1))
    for launcher in ("torchrun", "mpiexec"):
        _assert_same_run(_losses(runs[launcher]), reference, launcher)


def test_log_follows_the_schedule_and_the_loss_goes_down(runs):
    records = read_jsonl(runs["deepspeed"] / "log.jsonl")
    for r in records:  # alpha in step s (1-based) was computed with global_steps = s - 1 at its forward
        assert r["alpha"] == pytest.approx(DECE["alpha_base"] ** (1 + (r["step"] - 1) // DECE["steps_per_epoch"]))
        assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["step_time_s"] > 0
    losses = [r["loss"] for r in records]
    assert losses[-1] < losses[0]


def test_first_loss_shows_initialised_weights_under_zero_init(runs):
    """The model was built under ZeRO-3 (zero.Init): HF's init must have run, so the first logits are
    near zero and the first loss is DeCE of a uniform prediction (uninitialised or torch-default weights
    give visibly larger values)."""
    from transformers import AutoConfig
    vocab = AutoConfig.from_pretrained(runs["deepspeed"] / "export").vocab_size
    alpha, eps = DECE["alpha_base"], DECE["label_smoothing"]
    uniform = (-(1 - eps) * math.log(alpha / vocab + (1 - alpha) * (1 - eps))
               - eps * math.log(alpha / vocab + (1 - alpha) * eps / (vocab - 1)))
    assert read_jsonl(runs["deepspeed"] / "log.jsonl")[0]["loss"] == pytest.approx(uniform, abs=0.02)


def test_checkpoints_and_safetensors_export(runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = runs["deepspeed"]
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step{STEPS}"
    for tag in ("step2", "step4", "step6"):
        assert (out / "checkpoints" / tag).is_dir()
    model = AutoModelForCausalLM.from_pretrained(out / "export", local_files_only=True)
    tok = AutoTokenizer.from_pretrained(out / "export", local_files_only=True)
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= len(tok)
    x = tok("select alpha from beta where id is 3\n", return_tensors="pt")
    loss = model(**x, labels=x["input_ids"]).loss.item()
    assert math.isfinite(loss) and loss < math.log(model.config.vocab_size) + 1.0


def test_kill_and_resume_matches_the_uninterrupted_run(setup, runs):
    out, proc = _train(setup, "deepspeed", "killed", "--simulate-crash-after-step", "5", check=False)
    assert proc.returncode != 0  # really died
    assert (out / "checkpoints" / "latest").read_text().strip() == "step4"
    assert [r["step"] for r in read_jsonl(out / "log.jsonl")] == [1, 2, 3, 4, 5]
    out, proc = _train(setup, "deepspeed", "killed", "--resume")
    assert "resumed from" in proc.stdout + proc.stderr
    resumed = _losses(out)
    assert [step for step, _, _ in resumed] == list(range(1, STEPS + 1))  # step 5 redone, not duplicated
    _assert_same_run(resumed, _losses(runs["deepspeed"]), "resumed")


def test_kill_in_the_middle_of_a_checkpoint_save_loses_nothing(setup, runs):
    """Every rank dies right after writing its first file of the step-4 save: 'latest' still names the
    complete step-2 checkpoint, and the resumed run has the losses and alpha of the uninterrupted one."""
    out, proc = _train(setup, "deepspeed", "killed_mid_save", "--simulate-crash-during-save", "4", check=False)
    assert proc.returncode != 0  # really died
    assert (out / "checkpoints" / "step4").is_dir()  # the save had begun
    assert (out / "checkpoints" / "latest").read_text().strip() == "step2"
    out, proc = _train(setup, "deepspeed", "killed_mid_save", "--resume")
    resumed = _losses(out)
    assert [step for step, _, _ in resumed] == list(range(1, STEPS + 1))
    _assert_same_run(resumed, _losses(runs["deepspeed"]), "resumed after a kill mid-save")
