"""dece_ds.initialize on 2 CPU ranks: DeepSpeed AutoTP TP=2 + ZeRO-3, tiny Llama, gloo.

One launch of this file (``deepspeed --num_gpus 2 tests/integrations/test_deepspeed_engine.py --out F``)
runs three engines on the same model and batches and writes what it saw to F; the tests assert on it:
- DeCE: per step, the engine's loss equals the float64 formula (``tests/ops/formula64.py``) on the logits gathered
  from both vocabulary shards, the logits' gradient slice equals the reference gradient's slice,
  alpha follows ``alpha_base ** (1 + global_steps // steps_per_epoch)``, and the loss goes down;
- ``dece.enabled: false`` through dece_ds.initialize and plain deepspeed.initialize without the section:
  the same DeepSpeed loss object type and identical losses, step after step.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

STEPS = 6
DECE = {"enabled": True, "label_smoothing": 0.1, "alpha_base": 0.8, "schedule": "epoch", "steps_per_epoch": 2}
VOCAB = 1000


# ------------------------------------------------------------------------------------ the worker

def _model(seed=0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def _batches():
    import torch
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(2):
        ids = torch.randint(0, VOCAB, (2, 24), generator=g)
        labels = ids.clone()
        labels[:, :5] = -100          # a prompt that is not trained on
        labels[1, -3:] = -100         # padding
        out.append((ids, labels))
    return out


def _ds_config(dece):
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 6,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
           "zero_optimization": {"stage": 3},
           "tensor_parallel": {"autotp_size": 2, "vocab_parallel_lm_head": True}}
    if dece is not None:
        cfg["dece"] = dece
    return cfg


def _gather_vocab(shard, group):
    import torch
    import torch.distributed as dist
    parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, shard.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _formula64():
    """tests/ops/formula64.py, loaded by path: this file runs as a launcher script, without the repo on sys.path."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "ops" / "formula64.py"
    spec = importlib.util.spec_from_file_location("formula64", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def worker(out_path: str) -> None:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import groups

    import dece_ds
    dece64 = _formula64().dece64

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank = dist.get_rank()
    result = {"rank": rank}
    batches = _batches()

    # 1. DeCE through dece_ds.initialize, checked against the reference on gathered logits.
    model = _model()
    engine, *_ = dece_ds.initialize(model=model, model_parameters=model.parameters(), config=_ds_config(DECE))
    hook = engine.module.loss_function
    seen = {}

    def spy(logits, **kwargs):  # the logits the loss sees (ZeRO-3 hooks hand the caller other tensor objects)
        seen["logits"] = logits
        logits.retain_grad()
        return hook(logits=logits, **kwargs)

    engine.module.loss_function = spy
    tp_group = groups.get_tensor_model_parallel_group()
    steps = []
    for step in range(STEPS):
        ids, labels = batches[step % 2]
        out = engine(input_ids=ids, labels=labels)
        logits = seen["logits"]
        full = _gather_vocab(logits.detach(), tp_group).double().requires_grad_(True)
        alpha = DECE["alpha_base"] ** (1 + engine.global_steps // DECE["steps_per_epoch"])
        ref = dece64(full[:, :-1], labels[:, 1:], alpha=alpha, eps=DECE["label_smoothing"], floor=1e-7)
        ref.backward()
        engine.backward(out.loss)
        v_local = logits.shape[-1]
        ref_grad = full.grad[..., rank * v_local:(rank + 1) * v_local]
        steps.append({"loss": out.loss.item(), "ref": ref.item(), "alpha": hook.last_alpha, "expected_alpha": alpha,
                      "grad_err": (logits.grad.double() - ref_grad).abs().max().item(),
                      "grad_scale": ref_grad.abs().max().item(), "v_local": v_local,
                      "global_steps": engine.global_steps})
        engine.step()
    engine.module.loss_function = hook
    from dece_ds.integrations.deepspeed import dece_client_state, remove_dece_from_engine
    record = dece_client_state(engine)["dece"]
    removed = remove_dece_from_engine(engine)  # DeepSpeed's own vocab-parallel loss comes back and trains
    ids, labels = batches[0]
    after = engine(input_ids=ids, labels=labels).loss
    engine.backward(after)
    engine.step()
    result["dece"] = {"steps": steps, "hook": repr(hook), "wrapped": type(hook.__wrapped__).__name__,
                      "record_mode": record["mode"], "record_alpha": record["alpha"], "removed": removed,
                      "after_removal": type(engine.module.loss_function).__name__, "loss_after_removal": after.item()}
    engine.destroy()

    # 2. enabled: false through dece_ds.initialize vs. plain deepspeed.initialize without the section.
    for name, init, dece in (("disabled", dece_ds.initialize, {**DECE, "enabled": False}),
                             ("deepspeed", deepspeed.initialize, None)):
        model = _model()
        engine, *_ = init(model=model, model_parameters=model.parameters(), config=_ds_config(dece))
        losses = []
        for step in range(3):
            ids, labels = batches[step % 2]
            loss = engine(input_ids=ids, labels=labels).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        result[name] = {"losses": losses, "loss_function": type(engine.module.loss_function).__name__}
        engine.destroy()

    Path(f"{out_path}.rank{rank}").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------- the tests

@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from . import run_launcher
    out = tmp_path_factory.mktemp("engine") / "result.json"
    run_launcher("deepspeed", 2, Path(__file__), ["--out", str(out)], timeout=400)
    return [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(2)]


@pytest.mark.slow
def test_tp2_zero3_dece_loss_matches_reference_on_gathered_logits(results):
    for res in results:
        steps = res["dece"]["steps"]
        assert len(steps) == STEPS
        assert res["dece"]["wrapped"] == "VocabParallelCausalLMLoss"  # DeepSpeed's loss was the one replaced
        assert "vocab-parallel over a tensor-parallel group of 2" in res["dece"]["hook"]
        for s in steps:
            assert s["v_local"] == VOCAB // 2  # the logits really are a shard: never gathered by the engine
            assert s["loss"] == pytest.approx(s["ref"], rel=2e-6, abs=1e-6)
            assert s["grad_err"] <= 1e-6 * max(s["grad_scale"], 1e-3)
    assert [s["loss"] for s in results[0]["dece"]["steps"]] == [s["loss"] for s in results[1]["dece"]["steps"]]


@pytest.mark.slow
def test_tp2_zero3_alpha_follows_engine_steps_and_loss_goes_down(results):
    steps = results[0]["dece"]["steps"]
    assert [s["global_steps"] for s in steps] == list(range(STEPS))
    for s in steps:
        assert s["alpha"] == pytest.approx(s["expected_alpha"], rel=1e-12)
    assert len({round(s["alpha"], 12) for s in steps}) == STEPS // DECE["steps_per_epoch"]  # alpha did change
    # Same batch (steps 0, 2, 4 and 1, 3, 5) under a smaller alpha and trained weights: lower loss.
    losses = [s["loss"] for s in steps]
    assert losses[4] < losses[2] < losses[0] and losses[5] < losses[3] < losses[1]
    assert losses[0] < math.log(VOCAB)  # freshly initialised: DeCE starts below ln V (alpha < 1, eps > 0)


@pytest.mark.slow
def test_tp2_zero3_hook_records_its_mode_and_removal_gives_deepspeeds_loss_back(results):
    for res in results:
        dece = res["dece"]
        assert dece["record_mode"] == "vocab_shard"
        assert dece["record_alpha"] == pytest.approx(DECE["alpha_base"] ** (1 + STEPS // DECE["steps_per_epoch"]))
        assert dece["removed"] is True and dece["after_removal"] == "VocabParallelCausalLMLoss"
        assert math.isfinite(dece["loss_after_removal"])
    # DeepSpeed's plain CE on the same batch is above DeCE's (alpha < 1 lowers the loss)
    assert results[0]["dece"]["loss_after_removal"] > results[0]["dece"]["steps"][-2]["loss"]


@pytest.mark.slow
def test_enabled_false_is_exactly_deepspeeds_own_loss(results):
    for res in results:
        assert res["disabled"]["loss_function"] == res["deepspeed"]["loss_function"] == "VocabParallelCausalLMLoss"
        assert res["disabled"]["losses"] == res["deepspeed"]["losses"]
        assert res["disabled"]["losses"][0] == pytest.approx(math.log(VOCAB), abs=0.1)  # initialised weights


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", "--local-rank", type=int)
    worker(p.parse_known_args(sys.argv[1:])[0].out)
    from dece_ds.parallel.shutdown import finish_process
    finish_process(0)   # skip interpreter teardown: gloo/DeepSpeed threads may std::terminate there
