"""Megatron drop-in: signature, parity with megatron-core where the losses agree, exactness at TP > 1
where megatron's label smoothing is wrong (NVIDIA/Megatron-LM#737), and the patch life cycle."""

from __future__ import annotations

import inspect

import pytest
import torch

megatron_core = pytest.importorskip("megatron.core")

from dece_ds import DeceConfig  # noqa: E402
from dece_ds.integrations import megatron as dm  # noqa: E402
from tests.ops.formula64 import dece64  # noqa: E402
from tests.parallel.spawn import run_distributed  # noqa: E402

S, B, V = 6, 3, 1000


def _inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(S, B, V, generator=g) * 2, torch.randint(0, V, (S, B), generator=g)


def test_signature_matches_megatron():
    from megatron.core.tensor_parallel import cross_entropy as mce
    assert (inspect.signature(dm.dece_vocab_parallel_cross_entropy).parameters.keys()
            == inspect.signature(mce.vocab_parallel_cross_entropy).parameters.keys())


def _compare_with_megatron(rank, world, config_kw, expect_equal_to_megatron):
    from megatron.core import parallel_state, tensor_parallel
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    try:
        logits, target = _inputs()
        part = V // world
        local = logits[..., rank * part:(rank + 1) * part]
        eps = config_kw.get("label_smoothing", 0.0)

        theirs_in = local.clone().requires_grad_()
        theirs = tensor_parallel.vocab_parallel_cross_entropy(theirs_in, target, eps)
        theirs.sum().backward()

        handle = dm.apply_dece_to_megatron(DeceConfig(**config_kw))
        try:
            ours_in = local.clone().requires_grad_()
            ours = tensor_parallel.vocab_parallel_cross_entropy(ours_in, target)  # the patched symbol
            ours.sum().backward()
        finally:
            dm.revert_dece_from_megatron()
        assert handle is not None and ours.shape == (S, B)

        full = logits.double().requires_grad_()
        ref = dece64(full.reshape(-1, V), target.reshape(-1), reduction="none", alpha=handle.alpha, eps=eps,
                     floor=config_kw.get("prob_floor", 1e-7)).reshape(S, B)
        ref.sum().backward()
        torch.testing.assert_close(ours.double(), ref.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours_in.grad.double(), full.grad[..., rank * part:(rank + 1) * part],
                                   rtol=1e-5, atol=1e-6)
        if expect_equal_to_megatron:
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=1e-5, atol=1e-6)
        else:
            assert not torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    finally:
        parallel_state.destroy_model_parallel()


CE_LIKE = dict(alpha_base=1.0, schedule="constant", label_smoothing=0.0, prob_floor=0.0)


@pytest.mark.slow
def test_equals_megatron_cross_entropy_when_dece_is_plain_ce_tp2():
    run_distributed(_compare_with_megatron, 2, CE_LIKE, True)


@pytest.mark.slow
def test_exact_label_smoothing_at_tp2_where_megatron_is_not():
    cfg = dict(CE_LIKE, label_smoothing=0.1)
    run_distributed(_compare_with_megatron, 2, cfg, False)


@pytest.mark.slow
def test_dece_matches_full_logit_reference_tp2():
    run_distributed(_compare_with_megatron, 2, dict(alpha_base=0.9, label_smoothing=0.05), False)


def test_patch_is_idempotent_reversible_and_marked(caplog):
    from megatron.core import tensor_parallel
    from megatron.core.models.common.language_module import language_module
    original = tensor_parallel.vocab_parallel_cross_entropy
    original_fused = language_module.fused_vocab_parallel_cross_entropy
    caplog.set_level("INFO", logger="dece_ds.megatron")
    try:
        first = dm.apply_dece_to_megatron(DeceConfig(alpha_base=0.9))
        patched = tensor_parallel.vocab_parallel_cross_entropy
        assert patched._dece_patched and patched.__wrapped__ is original
        assert language_module.fused_vocab_parallel_cross_entropy.__wrapped__ is original_fused
        assert "patched megatron.core.tensor_parallel.vocab_parallel_cross_entropy" in caplog.text
        second = dm.apply_dece_to_megatron({"alpha_base": 0.8})
        assert tensor_parallel.vocab_parallel_cross_entropy is patched  # not wrapped twice
        assert second.config.alpha_base == 0.8 and first is not second
    finally:
        assert dm.revert_dece_from_megatron()
    assert tensor_parallel.vocab_parallel_cross_entropy is original
    assert language_module.fused_vocab_parallel_cross_entropy is original_fused
    assert not dm.revert_dece_from_megatron()


def test_disabled_config_patches_nothing():
    from megatron.core import tensor_parallel
    original = tensor_parallel.vocab_parallel_cross_entropy
    assert dm.apply_dece_to_megatron(DeceConfig(enabled=False)) is None
    assert tensor_parallel.vocab_parallel_cross_entropy is original


def test_language_module_uses_the_patched_loss():
    from types import SimpleNamespace

    from megatron.core.models.common.language_module.language_module import LanguageModule
    logits, target = _inputs()
    labels = target.transpose(0, 1).contiguous()  # [b, s]
    stub = SimpleNamespace(config=SimpleNamespace(cross_entropy_loss_fusion=False))
    handle = dm.apply_dece_to_megatron(DeceConfig(alpha_base=0.9))
    try:
        import megatron.core.parallel_state as ps
        with pytest.MonkeyPatch.context() as mp:  # TP = 1 without initialising megatron's groups
            mp.setattr(ps, "get_tensor_model_parallel_group", lambda *a, **k: None)
            mp.setattr(ps, "get_tensor_model_parallel_rank", lambda *a, **k: 0)
            mp.setattr(ps, "get_tensor_model_parallel_world_size", lambda *a, **k: 1)
            loss = LanguageModule.compute_language_model_loss(stub, labels, logits)
    finally:
        dm.revert_dece_from_megatron()
    ref = dece64(logits.double(), target, alpha=handle.alpha, eps=0.05, floor=1e-7, reduction="none")
    torch.testing.assert_close(loss.double(), ref.transpose(0, 1), rtol=1e-5, atol=1e-5)
