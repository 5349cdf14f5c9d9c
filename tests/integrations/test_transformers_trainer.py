"""HF Trainer + DeCE: ``apply_dece_to_trainer(trainer)`` is the one added line.

- single process, no DeepSpeed (in-process): the hook is installed when training starts, alpha follows the
  Trainer's epoch (schedule "epoch" without steps_per_epoch) and is logged as ``dece_alpha``;
- 2 ranks under torchrun, ``--deepspeed ds.json`` with AutoTP TP=2 + ZeRO-3 (this file is the worker):
  DeCE replaces DeepSpeed's vocab-parallel loss on the same shards, alpha follows state.global_step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

V = 256


def _model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                        tie_word_embeddings=False))


def _dataset(n=8, length=16):
    import torch
    from datasets import Dataset
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (n, length), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def _alpha_recorder():
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self):
            self.alphas = []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.alphas.append(model.loss_function.last_alpha)

    return Recorder()


def test_trainer_single_process_alpha_follows_trainer_epochs(tmp_path):
    from transformers import Trainer, TrainingArguments
    from transformers.loss.loss_utils import ForCausalLMLoss

    from dece_ds.integrations.transformers import DeceTrainerCallback, apply_dece_to_trainer

    model = _model()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, num_train_epochs=2,
                             learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_dataset())
    callback = apply_dece_to_trainer(trainer, config={"alpha_base": 0.5, "label_smoothing": 0.1})
    assert isinstance(callback, DeceTrainerCallback)
    assert apply_dece_to_trainer(trainer, config={"alpha_base": 0.5, "label_smoothing": 0.1}) is callback
    assert model.loss_function is ForCausalLMLoss  # nothing changes before training starts
    recorder = _alpha_recorder()
    trainer.add_callback(recorder)
    trainer.train()
    assert recorder.alphas == [0.5] * 4 + [0.25] * 4  # 4 steps per epoch: alpha = 0.5 ** epoch
    logged = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["dece_alpha"] for r in logged] == recorder.alphas
    assert model.loss_function.__wrapped__ is ForCausalLMLoss


def test_trainer_refuses_a_bad_section_at_apply_time(tmp_path):
    from transformers import Trainer, TrainingArguments

    from dece_ds.config import DeceConfigError
    from dece_ds.integrations.transformers import apply_dece_to_trainer

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = Trainer(model=_model(), args=args, train_dataset=_dataset())
    with pytest.raises(DeceConfigError, match="dece.label_smoothing"):
        apply_dece_to_trainer(trainer, config={"label_smoothing": 1.0})
    with pytest.raises(DeceConfigError, match="trainer.args.deepspeed"):
        apply_dece_to_trainer(trainer)


# -------------------------------------------------- 2 ranks, Trainer --deepspeed (TP=2 + ZeRO-3)

DECE = {"enabled": True, "label_smoothing": 0.05, "alpha_base": 0.8, "schedule": "epoch", "steps_per_epoch": 2}


def worker(out: str, ds_json: str) -> None:
    import torch.distributed as dist
    from transformers import Trainer, TrainingArguments

    from dece_ds.integrations.transformers import apply_dece_to_trainer

    args = TrainingArguments(output_dir=str(Path(out).parent / "trainer"), per_device_train_batch_size=2,
                             max_steps=6, learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[],
                             use_cpu=True, disable_tqdm=True, deepspeed=ds_json)
    model = _model()
    trainer = Trainer(model=model, args=args, train_dataset=_dataset(n=12))
    apply_dece_to_trainer(trainer)                      # <- the one added line
    recorder = _alpha_recorder()
    trainer.add_callback(recorder)
    trainer.train()
    hook = trainer.model.loss_function
    result = {"alphas": recorder.alphas, "hook": repr(hook), "wrapped": type(hook.__wrapped__).__name__,
              "losses": [r["loss"] for r in trainer.state.log_history if "loss" in r],
              "engine": type(trainer.model_wrapped).__name__}
    Path(f"{out}.rank{dist.get_rank()}").write_text(json.dumps(result))


@pytest.mark.slow
def test_trainer_deepspeed_tp2_zero3_replaces_the_vocab_parallel_loss(tmp_path):
    from . import ds_config, run_launcher, write_json
    cfg = ds_config(train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto",
                    gradient_clipping="auto", optimizer=None, scheduler=None, dece=DECE)
    ds_json = write_json(tmp_path / "ds.json", cfg)
    out = tmp_path / "result.json"
    run_launcher("torchrun", 2, Path(__file__), ["--out", str(out), "--ds", str(ds_json)], timeout=400)
    for rank in range(2):
        res = json.loads(Path(f"{out}.rank{rank}").read_text())
        assert res["engine"] == "DeepSpeedEngine"
        assert res["wrapped"] == "VocabParallelCausalLMLoss"
        assert "vocab-parallel over a tensor-parallel group of 2" in res["hook"]
        assert res["alphas"] == pytest.approx([0.8, 0.8, 0.64, 0.64, 0.512, 0.512])
    losses = res["losses"]
    assert len(losses) == 6 and losses[-1] < losses[0]


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--ds", required=True)
    p.add_argument("--local_rank", "--local-rank", type=int)
    a = p.parse_known_args(sys.argv[1:])[0]
    worker(a.out, a.ds)
    from dece_ds.parallel.shutdown import finish_process
    finish_process(0)   # skip interpreter teardown: gloo/DeepSpeed threads may std::terminate there
