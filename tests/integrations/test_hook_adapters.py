"""Every adapter over the one DeCE hook: install, train a step, report alpha, remove, get the model's own
loss back. Single process (the AutoTP head and the 2-rank paths are in test_deepspeed_engine.py and
test_zero3_fused_linear.py). The loss is checked against the float64 formula of tests/ops/formula64.py.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.loss.loss_utils import ForCausalLMLoss

from dece_ds.config import DeceConfig
from dece_ds.integrations.transformers import current_dece_loss, install_dece_loss, remove_dece_loss
from tests.ops.formula64 import dece64

V = 64


def _model(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                        tie_word_embeddings=False))


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (2, 10), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    return ids, labels


def _expected_loss(model, ids, labels, alpha, eps=0.05, floor=1e-7):
    """The formula on the model's own logits, shifted by hand (float64)."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
    target = torch.cat([labels[:, 1:], torch.full((labels.shape[0], 1), -100)], dim=1)
    return dece64(logits, target, alpha=alpha, eps=eps, floor=floor)


def _ensure_single_rank_group():
    import deepspeed
    import torch.distributed as dist
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)


# ------------------------------------------------------------------------------------ HF loss hook

@pytest.mark.parametrize("fused", [False, True])
def test_hf_hook_installs_reports_alpha_and_removes(fused):
    model = _model().eval()
    ids, labels = _batch()
    ce_before = model(input_ids=ids, labels=labels).loss.detach()
    cfg = DeceConfig(alpha_base=0.9, schedule="epoch", steps_per_epoch=2, fused_linear=fused)
    steps = {"n": 2}  # epoch 2: alpha = 0.81
    want = _expected_loss(model, ids, labels, alpha=0.81)
    hook = install_dece_loss(model, cfg, step_source=lambda: steps["n"])
    assert current_dece_loss(model) is hook and hook.mode == ("hidden" if fused else "logits")
    out = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-5, atol=1e-6)
    assert hook.last_alpha == pytest.approx(0.81)
    assert (out.logits is None) == fused
    out.loss.backward()
    assert model.lm_head.weight.grad is not None and torch.isfinite(model.lm_head.weight.grad).all()
    assert hook.record()["mode"] == hook.mode and hook.record()["enabled"] is True
    assert remove_dece_loss(model) is True
    assert model.loss_function is ForCausalLMLoss and "forward" not in vars(model.lm_head)
    assert not hasattr(model, "_dece_fused_linear")
    torch.testing.assert_close(model(input_ids=ids, labels=labels).loss.detach(), ce_before)
    assert model(input_ids=ids).logits.shape == (2, 10, V)


def test_fused_hook_checks_the_models_ignore_index():
    model = _model()
    hook = install_dece_loss(model, DeceConfig(schedule="constant", fused_linear=True))
    ids, labels = _batch()
    hidden = torch.randn(2, 10, 16)
    hook.active = True
    with pytest.raises(ValueError, match="ignore_index"):
        hook(logits=hidden, labels=labels, ignore_index=-1)
    hook.active = False
    remove_dece_loss(model)


def test_an_exception_inside_a_labelled_forward_leaves_the_head_intact():
    model = _model().eval()
    install_dece_loss(model, DeceConfig(schedule="constant", fused_linear=True))
    ids, labels = _batch()
    with pytest.raises(ValueError):
        model(input_ids=ids, labels=labels[:, :4])  # labels of the wrong shape: the loss raises
    hidden = torch.randn(3, 16)
    # the pass-through is off again: the head computes logits
    assert model.lm_head(hidden).shape == (3, V)
    torch.testing.assert_close(model.lm_head(hidden), F.linear(hidden, model.lm_head.weight))
    assert model(input_ids=ids).logits.shape == (2, 10, V)
    remove_dece_loss(model)


def test_fused_and_unfused_reinstall_swap_cleanly():
    model = _model()
    install_dece_loss(model, DeceConfig(schedule="constant", fused_linear=True))
    hook = install_dece_loss(model, DeceConfig(schedule="constant", fused_linear=False))
    assert hook.mode == "logits" and "forward" not in vars(model.lm_head)
    assert hook.__wrapped__ is ForCausalLMLoss
    remove_dece_loss(model)
    assert model.loss_function is ForCausalLMLoss


# ------------------------------------------------------------------------------------ DeepSpeed engine

@pytest.mark.parametrize("fused", [False, True])
def test_deepspeed_engine_trains_reports_alpha_and_removes(fused):
    import dece_ds
    from dece_ds.integrations.deepspeed import dece_client_state, remove_dece_from_engine
    _ensure_single_rank_group()
    model = _model()
    ds_config = {"train_micro_batch_size_per_gpu": 2, "steps_per_print": 10 ** 9,
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
                 "zero_optimization": {"stage": 0},
                 "dece": {"alpha_base": 0.9, "schedule": "epoch", "steps_per_epoch": 1, "fused_linear": fused}}
    engine, *_ = dece_ds.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    hook = current_dece_loss(engine.module)
    assert hook is not None and hook.mode == ("hidden" if fused else "logits")
    ids, labels = _batch()
    alphas = []
    for _ in range(2):
        out = engine(input_ids=ids, labels=labels)
        engine.backward(out.loss)
        engine.step()
        alphas.append(hook.last_alpha)
    assert alphas == pytest.approx([0.9, 0.81])  # alpha follows engine.global_steps
    record = dece_client_state(engine)["dece"]
    assert record["enabled"] is True and record["mode"] == hook.mode
    assert record["config"]["fused_linear"] is fused and record["schedule"]["step"] == 2
    assert remove_dece_from_engine(engine) is True
    assert engine.module.loss_function is ForCausalLMLoss and "forward" not in vars(engine.module.lm_head)
    assert dece_client_state(engine)["dece"] == {"enabled": False}
    out = engine(input_ids=ids, labels=labels)
    assert out.logits is not None
    torch.testing.assert_close(out.loss, ForCausalLMLoss(out.logits, labels, V))


# ------------------------------------------------------------------------------------ HF Trainer

def test_trainer_honours_fused_linear(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from dece_ds.integrations.transformers import apply_dece_to_trainer, remove_dece_from_trainer
    model = _model()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (8, 12), generator=g).tolist()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=2,
                             learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}))
    apply_dece_to_trainer(trainer, config={"alpha_base": 0.9, "fused_linear": True})
    seen = []
    from dece_ds.integrations import hook as hook_module
    original_fused = hook_module.fused_linear_dece

    def recording(*a, **k):
        seen.append(k["alpha"])
        return original_fused(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hook_module, "fused_linear_dece", recording)
        trainer.train()
    assert seen == pytest.approx([0.9, 0.9, 0.81, 0.81])  # the fused path ran, alpha by the Trainer's epoch
    logged = [r["dece_alpha"] for r in trainer.state.log_history if "dece_alpha" in r]
    assert logged == pytest.approx([0.9, 0.9, 0.81, 0.81])
    assert current_dece_loss(model).mode == "hidden"
    assert remove_dece_from_trainer(trainer) is True
    assert model.loss_function is ForCausalLMLoss and "forward" not in vars(model.lm_head)


# ------------------------------------------------------------------------------------ Megatron

def test_megatron_adapter_reports_alpha_and_removes():
    pytest.importorskip("megatron.core")
    from megatron.core import tensor_parallel

    from dece_ds.integrations import megatron as dm
    original = tensor_parallel.vocab_parallel_cross_entropy
    logits = torch.randn(5, 2, V, generator=torch.Generator().manual_seed(2))
    target = torch.randint(0, V, (5, 2), generator=torch.Generator().manual_seed(3))
    loss_module = dm.apply_dece_to_megatron(DeceConfig(alpha_base=0.9, schedule="epoch", steps_per_epoch=1))
    try:
        import megatron.core.parallel_state as ps
        with pytest.MonkeyPatch.context() as mp:  # TP = 1 without initialising megatron's groups
            mp.setattr(ps, "get_tensor_model_parallel_group", lambda *a, **k: None)
            mp.setattr(ps, "get_tensor_model_parallel_rank", lambda *a, **k: 0)
            mp.setattr(ps, "get_tensor_model_parallel_world_size", lambda *a, **k: 1)
            loss_module.step()  # Megatron's loop counts optimizer steps by hand: epoch 2
            got = tensor_parallel.vocab_parallel_cross_entropy(logits.clone().requires_grad_(), target)
        hook = dm.current_megatron_hook()
        assert hook.last_alpha == pytest.approx(0.81) and hook.record()["alpha"] == pytest.approx(0.81)
        want = dece64(logits.double(), target, alpha=0.81, eps=0.05, floor=1e-7, reduction="none")
        torch.testing.assert_close(got.double(), want.reshape(5, 2), rtol=1e-5, atol=1e-6)
    finally:
        assert dm.revert_dece_from_megatron()
    assert tensor_parallel.vocab_parallel_cross_entropy is original and dm.current_megatron_hook() is None
