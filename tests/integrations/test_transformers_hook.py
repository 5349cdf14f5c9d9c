"""DeceCausalLMLoss as the HF loss hook (single device): ForCausalLMLoss semantics, and the patch rules
(opt-in, idempotent, reversible, loud, a clear error naming a missing symbol)."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.loss.loss_utils import ForCausalLMLoss

from dece_ds.config import DeceConfig
from dece_ds.integrations.transformers import (DeceCausalLMLoss, current_dece_loss, install_dece_loss,
                                               remove_dece_loss)
from tests.ops.formula64 import dece64

V = 40


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 7, V, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (3, 7), generator=g)
    labels[0, :3] = -100
    labels[2, -2:] = -100
    return logits, labels


def _tiny_model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))


@pytest.mark.parametrize("num_items", [None, 9])
def test_alpha_one_no_smoothing_no_floor_is_hf_for_causal_lm_loss(num_items):
    logits, labels = _batch()
    logits = logits.float()  # ForCausalLMLoss computes in fp32 whatever it gets
    cfg = DeceConfig(alpha_base=1.0, label_smoothing=0.0, prob_floor=0.0, schedule="constant")
    hook = DeceCausalLMLoss(cfg)
    got = hook(logits=logits, labels=labels, vocab_size=V, num_items_in_batch=num_items)
    want = ForCausalLMLoss(logits, labels, V, num_items_in_batch=num_items)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("num_items", [None, 11])
def test_shift_ignore_index_and_num_items_match_the_reference(num_items):
    logits, labels = _batch(1)
    cfg = DeceConfig(alpha_base=0.9, label_smoothing=0.1, schedule="epoch", steps_per_epoch=3)
    step = {"n": 7}  # epoch 3: alpha = 0.9 ** 3
    hook = DeceCausalLMLoss(cfg, step_source=lambda: step["n"])
    logits.requires_grad_(True)
    got = hook(logits=logits, labels=labels, vocab_size=V, num_items_in_batch=num_items)
    assert hook.last_alpha == pytest.approx(0.9 ** 3)
    ref_logits = logits.detach().clone().requires_grad_(True)
    want = dece64(ref_logits[:, :-1], labels[:, 1:], alpha=0.9 ** 3, eps=0.1, floor=1e-7, num_items=num_items)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    got.backward()
    want.backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-9, atol=1e-12)
    # shift_labels given directly: the same loss
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    torch.testing.assert_close(hook(logits=logits.detach(), shift_labels=shifted, num_items_in_batch=num_items),
                               got.detach())
    step["n"] = 0
    hook(logits=logits.detach(), labels=labels)
    assert hook.last_alpha == pytest.approx(0.9)


def test_sum_reduction_ignores_num_items():
    logits, labels = _batch(2)
    cfg = DeceConfig(reduction="sum", schedule="constant", alpha_base=0.95)
    got = DeceCausalLMLoss(cfg)(logits=logits, labels=labels, num_items_in_batch=5)
    want = dece64(logits[:, :-1], labels[:, 1:], alpha=0.95, eps=0.05, floor=1e-7, reduction="sum")
    torch.testing.assert_close(got, want)


def test_hook_errors_name_the_argument():
    logits, labels = _batch()
    hook = DeceCausalLMLoss(DeceConfig(schedule="constant"))
    with pytest.raises(ValueError, match="vocab_size"):
        hook(logits=logits, labels=labels, vocab_size=V + 1)
    with pytest.raises(ValueError, match="labels"):
        hook(logits=logits)
    with pytest.raises(ValueError, match="ignore_index"):
        hook(logits=logits, labels=labels, ignore_index=-1)


def test_install_is_loud_idempotent_and_reversible(caplog):
    model = _tiny_model()
    assert model.loss_function is ForCausalLMLoss and "_loss_function" not in vars(model)
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(3))
    ce = model(input_ids=ids, labels=ids).loss
    cfg = DeceConfig(alpha_base=0.8, schedule="constant")
    with caplog.at_level(logging.INFO, logger="dece_ds"):
        hook = install_dece_loss(model, cfg)
    assert "replaced transformers.loss.loss_utils.ForCausalLMLoss with DeCE" in caplog.text
    assert model.loss_function is hook and hook.__wrapped__ is ForCausalLMLoss and hook.shard is None
    out = model(input_ids=ids, labels=ids)
    want = dece64(out.logits[:, :-1].detach().double(), ids[:, 1:], alpha=0.8, eps=0.05, floor=1e-7)
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    assert model.lm_head.weight.grad is not None

    again = install_dece_loss(model, cfg.model_copy(update={"alpha_base": 0.7}))  # idempotent: no double wrap
    assert current_dece_loss(model) is again and again.__wrapped__ is ForCausalLMLoss

    with caplog.at_level(logging.INFO, logger="dece_ds"):
        assert remove_dece_loss(model) is True
    assert "restored" in caplog.text
    assert model.loss_function is ForCausalLMLoss and "_loss_function" not in vars(model)
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, ce)
    assert remove_dece_loss(model) is False


def test_install_over_an_instance_loss_restores_that_loss():
    model = _tiny_model()
    custom = lambda logits, labels, **kw: logits.sum() * 0  # noqa: E731
    model.loss_function = custom
    install_dece_loss(model, DeceConfig(schedule="constant"))
    remove_dece_loss(model)
    assert model.loss_function is custom


def test_missing_hook_is_named():
    class NoHook(torch.nn.Module):
        pass

    with pytest.raises(AttributeError, match=r"NoHook.loss_function: not found"):
        install_dece_loss(NoHook(), DeceConfig(schedule="constant"))


def test_missing_shard_attribute_is_named():
    from dece_ds.parallel.vocab_shard import find_vocab_parallel_head

    class Head(torch.nn.Module):
        is_vocab_parallel_lm_head = True
        vocab_start_index, vocab_end_index = 0, 8  # no mp_group, no vocab_size

    model = torch.nn.Sequential(Head())
    with pytest.raises(AttributeError, match=r"Head.mp_group: missing"):
        find_vocab_parallel_head(model)
