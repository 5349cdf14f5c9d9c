"""ZeRO-3 (2 ranks, CPU, gloo): fused-linear DeCE gathers the partitioned lm_head weight outside the
module's forward (Liger-Kernel issue 767) and its gradient reaches ZeRO's partitioned gradients:
losses and updated parameters equal the unfused path's."""

from __future__ import annotations

import os

import pytest
import torch

from tests.parallel.spawn import run_distributed

V, STEPS = 257, 3


def _ds_config():
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "SGD", "params": {"lr": 0.5}},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 1000,
        "zero_allow_untested_optimizer": True,
    }


def _train(rank, world, mode: str, results):
    """mode: "unfused" (dece_loss on the logits), "inside" (HF hook, lm_head forward running),
    "outside" (fused_linear_dece called on the hidden states after the model's forward returned),
    "config" (dece_ds.initialize with ``"fused_linear": true`` in the dece section)."""
    import deepspeed
    import transformers
    from dece_ds import DeceConfig
    from dece_ds.integrations.hf_fused_linear import apply_fused_linear_dece
    from dece_ds.ops.dece import dece_loss

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).float()
    dece = DeceConfig(alpha_base=0.9, label_smoothing=0.05)
    seen_status = []
    if mode == "inside":
        import dece_ds.integrations.hook as hf  # the hook calls fused_linear_dece in "hidden" mode
        real = hf.fused_linear_dece

        def recording(hidden, weight, *a, **k):  # the Liger-767 situation: called with an empty weight
            seen_status.append((weight.ds_status.name, weight.numel()))
            return real(hidden, weight, *a, **k)
        hf.fused_linear_dece = recording
        apply_fused_linear_dece(model, dece)
    elif mode == "unfused":
        def unfused(logits, labels, vocab_size=None, num_items_in_batch=None, **kw):
            target = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
            return dece_loss(logits, target, alpha=0.9, label_smoothing=0.05)
        model.loss_function = unfused
    if mode == "config":
        import dece_ds
        ds_config = dict(_ds_config(), dece={"alpha_base": 0.9, "label_smoothing": 0.05, "schedule": "constant",
                                             "fused_linear": True})
        engine, *_ = dece_ds.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
        assert engine.module._dece_fused_linear is not None
    else:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=_ds_config())
    assert getattr(engine.module.lm_head.weight, "ds_id", None) is not None, "lm_head must be ZeRO-3 partitioned"
    g = torch.Generator().manual_seed(100 + rank)
    losses = []
    for _ in range(STEPS):
        ids = torch.randint(0, V, (2, 10), generator=g)
        if mode == "outside":
            from dece_ds import fused_linear_dece
            hidden = engine.module.model(input_ids=ids).last_hidden_state
            weight = engine.module.lm_head.weight
            seen_status.append((weight.ds_status.name, weight.numel()))
            target = torch.nn.functional.pad(ids, (0, 1), value=-100)[..., 1:]
            loss = fused_linear_dece(hidden, weight, target, alpha=0.9, label_smoothing=0.05)
        else:
            out = engine(input_ids=ids, labels=ids)
            loss = out.loss
            if mode == "config":
                assert out.logits is None
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    if mode == "outside":  # the Liger-767 situation: the weight is an empty partition at call time
        assert seen_status and all(st == "NOT_AVAILABLE" and n == 0 for st, n in seen_status), seen_status
    if mode == "inside":
        assert seen_status and all(st == "AVAILABLE" for st, _ in seen_status), seen_status
    if rank == 0:
        torch.save({"losses": losses, "params": params}, results)


@pytest.fixture(scope="module")
def unfused_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("zero3") / "unfused.pt"
    run_distributed(_train, 2, "unfused", str(path))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["inside", "outside", "config"])
def test_zero3_fused_equals_unfused(tmp_path, unfused_run, mode):
    fused_out, unfused_out = tmp_path / "fused.pt", unfused_run
    run_distributed(_train, 2, mode, str(fused_out))
    fused, unfused = torch.load(fused_out), torch.load(unfused_out)
    torch.testing.assert_close(torch.tensor(fused["losses"]), torch.tensor(unfused["losses"]), rtol=1e-5, atol=1e-5)
    assert fused["losses"][-1] < fused["losses"][0]
    assert fused["params"].keys() == unfused["params"].keys()
    for name in fused["params"]:
        assert fused["params"][name].numel() > 0, f"{name} came back empty"
        torch.testing.assert_close(fused["params"][name], unfused["params"][name], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")
    # the head moved: its gradient reached ZeRO's partitions
    w0 = torch.load(fused_out)["params"]["lm_head.weight"]
    assert w0.shape == (V, 32)
