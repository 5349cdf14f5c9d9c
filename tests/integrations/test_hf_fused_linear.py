"""Fused-linear DeCE inside HF causal LMs equals the unfused DeCE on the model's own logits."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from dece_ds import DeceConfig
from dece_ds.integrations.hf_fused_linear import apply_fused_linear_dece
from tests.ops.formula64 import dece64

V = 300


def _tiny(family: str):
    common = dict(vocab_size=V)
    if family == "llama":
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, **common)
        return transformers.LlamaForCausalLM(cfg)
    if family == "qwen2":
        cfg = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, **common)
        return transformers.Qwen2ForCausalLM(cfg)
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **common)
        return transformers.GPT2LMHeadModel(cfg)
    if family == "starcoder2":
        cfg = transformers.Starcoder2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, **common)
        return transformers.Starcoder2ForCausalLM(cfg)
    raise ValueError(family)


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (3, 12), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    return ids, labels


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "starcoder2"])
def test_fused_equals_unfused_dece_on_model_logits(family):
    torch.manual_seed(0)
    model = _tiny(family).float().eval()  # no dropout: both passes see the same network
    ids, labels = _batch()
    cfg = DeceConfig(alpha_base=0.9, label_smoothing=0.05)

    # independent reference: the model's own logits, shifted by hand, float64 formula
    logits = model(ids).logits
    assert abs(torch.nn.functional.cross_entropy(logits.reshape(-1, V), ids.reshape(-1)).item()
               - math.log(V)) < 1.0, "fresh model should start near ln V"
    target = torch.cat([labels[:, 1:], torch.full((3, 1), -100)], dim=1)
    ref = dece64(logits.double().reshape(-1, V), target.reshape(-1), alpha=0.9, eps=0.05, floor=1e-7)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    handle = apply_fused_linear_dece(model, cfg)
    assert apply_fused_linear_dece(model, cfg) is handle  # idempotent
    out = model(ids, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    out.loss.backward()
    for name, p in model.named_parameters():
        if name in ref_grads:
            torch.testing.assert_close(p.grad.double(), ref_grads[name].double(), rtol=1e-4, atol=1e-6,
                                       msg=lambda m, n=name: f"{family} {n}: {m}")

    # without labels (generation): real logits again
    assert model(ids).logits.shape == (3, 12, V)
    handle.revert()
    assert not hasattr(model, "_dece_fused_linear")
    out = model(ids, labels=labels)
    assert out.logits is not None  # plain HF loss again
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(
        out.logits.reshape(-1, V), target.reshape(-1)), rtol=1e-5, atol=1e-6)


def test_schedule_drives_alpha():
    model = _tiny("llama")
    handle = apply_fused_linear_dece(model, DeceConfig(alpha_base=0.9, steps_per_epoch=2))
    assert handle.alpha == pytest.approx(0.9)
    handle.step(2)
    assert handle.alpha == pytest.approx(0.81)
    handle.revert()


def test_model_softcap_is_passed_to_the_fused_loss():
    """Gemma-2 soft-caps its logits (final_logit_softcapping): the fused loss takes the cap and equals the float64
    formula on the model's own (capped) logits; a different dece.logit_softcap is refused."""
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8, vocab_size=V, final_logit_softcapping=0.5)
    model = transformers.Gemma2ForCausalLM(cfg).float().eval()
    ids, labels = _batch()
    logits = model(ids).logits
    assert logits.abs().max() <= 0.5  # the model's logits are capped
    target = torch.cat([labels[:, 1:], torch.full((3, 1), -100)], dim=1)
    ref = dece64(logits.double().reshape(-1, V), target.reshape(-1), alpha=0.9, eps=0.05, floor=1e-7)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    handle = apply_fused_linear_dece(model, DeceConfig(alpha_base=0.9))
    out = model(ids, labels=labels)
    torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    out.loss.backward()
    for name, p in model.named_parameters():
        if name in ref_grads:
            torch.testing.assert_close(p.grad.double(), ref_grads[name].double(), rtol=1e-4, atol=1e-6)
    assert model.config.final_logit_softcapping == 0.5  # switched off only during the labelled forward
    torch.testing.assert_close(model(ids).logits, logits)  # generation: the model's own capped logits
    handle.revert()
    with pytest.raises(ValueError, match="logit_softcap"):
        apply_fused_linear_dece(model, DeceConfig(logit_softcap=30.0))


def test_logit_scaling_is_refused():
    model = _tiny("llama")
    model.config.logit_scale = 2.0
    with pytest.raises(ValueError, match="logit_scale"):
        apply_fused_linear_dece(model, DeceConfig())


@pytest.mark.parametrize("walk", ["rows", "vocab"])
def test_weight_grad_walk_from_the_section(walk, monkeypatch):
    """``fused_weight_grad_walk`` reaches the fused loss, whose head gradient equals the float64 formula's on the
    model's own logits with either walk."""
    import dece_ds.integrations.hook as hook_module
    seen = []
    real = hook_module.fused_linear_dece
    monkeypatch.setattr(hook_module, "fused_linear_dece",
                        lambda *a, **kw: seen.append(kw["weight_grad_walk"]) or real(*a, **kw))
    torch.manual_seed(0)
    model = _tiny("llama").float().eval()
    ids, labels = _batch()
    target = torch.cat([labels[:, 1:], torch.full((3, 1), -100)], dim=1)
    dece64(model(ids).logits.double().reshape(-1, V), target.reshape(-1), alpha=0.9, eps=0.05,
           floor=1e-7).backward()
    want = model.lm_head.weight.grad.clone()
    model.zero_grad()
    handle = apply_fused_linear_dece(model, DeceConfig(alpha_base=0.9, fused_weight_grad_walk=walk, chunk_size=5))
    model(ids, labels=labels).loss.backward()
    handle.revert()
    assert seen == [walk]
    torch.testing.assert_close(model.lm_head.weight.grad.double(), want.double(), rtol=1e-4, atol=1e-6)
