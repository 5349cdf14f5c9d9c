"""Fused-linear DeCE on AutoTP's vocab-parallel lm_head under ZeRO-3 (2 CPU ranks, TP=2, gloo): the loss
comes from the hidden states and this rank's weight shard (the logits are never built, not even a
shard of them), and the losses and updated parameters equal the unfused vocab-parallel path's."""

from __future__ import annotations

import os

import pytest
import torch

from tests.parallel.spawn import run_distributed

V, STEPS = 256, 3
DECE = {"alpha_base": 0.9, "label_smoothing": 0.05, "schedule": "epoch", "steps_per_epoch": 1}


def _train(rank, world, fused: bool, results):
    import deepspeed
    import transformers

    import dece_ds
    from dece_ds.integrations.transformers import current_dece_loss
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).float()
    ds_config = {"train_micro_batch_size_per_gpu": 2, "steps_per_print": 1000,
                 "optimizer": {"type": "SGD", "params": {"lr": 0.5}}, "zero_allow_untested_optimizer": True,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                 "tensor_parallel": {"autotp_size": 2, "vocab_parallel_lm_head": True},
                 "dece": {**DECE, "fused_linear": fused}}
    engine, *_ = dece_ds.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    hook = current_dece_loss(engine.module)
    assert hook.shard is not None and hook.shard.tp_world_size == 2
    assert hook.mode == ("hidden" if fused else "vocab_shard")
    g = torch.Generator().manual_seed(7)  # the same batch on both TP ranks
    losses, alphas = [], []
    for _ in range(STEPS):
        ids = torch.randint(0, V, (2, 10), generator=g)
        labels = ids.clone()
        labels[0, :3] = -100
        out = engine(input_ids=ids, labels=labels)
        if fused:
            assert out.logits is None
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.item())
        alphas.append(hook.last_alpha)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    torch.save({"losses": losses, "alphas": alphas, "params": params,
                "record": dece_ds.integrations.deepspeed.dece_client_state(engine)["dece"]}, f"{results}.rank{rank}")


@pytest.mark.slow
def test_fused_on_the_vocab_parallel_head_equals_the_unfused_path(tmp_path):
    run_distributed(_train, 2, False, str(tmp_path / "unfused"))
    run_distributed(_train, 2, True, str(tmp_path / "fused"))
    for rank in range(2):
        unfused = torch.load(tmp_path / f"unfused.rank{rank}", weights_only=False)
        fused = torch.load(tmp_path / f"fused.rank{rank}", weights_only=False)
        assert fused["record"]["mode"] == "hidden" and fused["record"]["vocab_parallel"] is True
        assert fused["alphas"] == pytest.approx([0.9, 0.81, 0.729])
        torch.testing.assert_close(torch.tensor(fused["losses"]), torch.tensor(unfused["losses"]),
                                   rtol=1e-5, atol=1e-6)
        assert fused["losses"][-1] < fused["losses"][0]
        for name, value in unfused["params"].items():
            assert fused["params"][name].numel() > 0
            torch.testing.assert_close(fused["params"][name], value, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, n=name: f"rank {rank} {n}: {m}")
