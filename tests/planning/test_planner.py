"""The planner's arithmetic: shapes against the model cards and real HF modules, model states against
DeepSpeed's own estimators and hand-computed numbers, activations / loss memory / collectives by hand."""

from __future__ import annotations

import contextlib
import io
import json
import re

import pytest
import torch

from dece_ds.planning import BUILTIN_SHAPES, PlanInput, plan, resolve_shape
from dece_ds.planning.estimate import activations, loss_collectives, loss_memory, model_states, params_per_tp_rank

# Parameter counts on the model cards (billions) and a relative tolerance for their rounding.
MODEL_CARDS = {"starcoder2-3b": 3.03, "starcoder2-7b": 7.17, "starcoder2-15b": 15.96, "codellama-7b": 6.74,
               "codellama-13b": 13.0, "codellama-34b": 33.7, "qwen2.5-coder-7b": 7.61, "qwen2.5-coder-32b": 32.8}


@pytest.mark.parametrize("name", sorted(MODEL_CARDS))
def test_builtin_shapes_match_the_model_cards(name):
    assert BUILTIN_SHAPES[name].total_params() / 1e9 == pytest.approx(MODEL_CARDS[name], rel=4e-3)


TINY_CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=6,
                  num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=777, tie_word_embeddings=False),
    "starcoder2": dict(model_type="starcoder2", hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=500, tie_word_embeddings=True),
}


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_config_json_counts_equal_the_real_module(tmp_path, arch):
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg_dict = TINY_CONFIGS[arch]
    cfg = AutoConfig.for_model(**cfg_dict)
    cfg.save_pretrained(tmp_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    real = sum({p.data_ptr() if p.device.type != "meta" else id(p): p.numel() for p in model.parameters()}.values())
    shape = resolve_shape(tmp_path / "config.json")
    assert shape.total_params() == real
    # DeepSpeed's own walk over the module agrees on the largest layer (tp = 1)
    from deepspeed.runtime.zero.stage3 import model_to_params
    _, largest = model_to_params(model)
    assert params_per_tp_rank(shape, 1) == (real, largest)


def test_resolve_shape_errors_name_the_choices(tmp_path):
    with pytest.raises(ValueError, match="codellama-7b"):
        resolve_shape("no-such-model")
    assert resolve_shape("Qwen/Qwen2.5-Coder-7B") is BUILTIN_SHAPES["qwen2.5-coder-7b"]


# ------------------------------------------------------------------------------------ model states

def test_codellama7b_zero3_by_hand():
    P, largest = 6_738_546_688, 32_016 * 4096  # untied, TP 1: every parameter; the embedding is the largest
    s = model_states(BUILTIN_SHAPES["codellama-7b"], PlanInput(world_size=8, zero_stage=3))
    assert (s["params_per_rank"], s["largest_layer_params"]) == (P, largest)
    assert s["parameters"] == 4 * largest + 2 * P // 8
    assert s["gradients"] == 6 * P // 8
    assert s["parameters"] + s["gradients"] + s["optimizer"] == 524_550_144 + 15_161_730_048  # 4 L + 18 P / 8


def _ds_printed_gpu_gib(fn, **kw) -> dict[str, float]:
    """DeepSpeed's *_all_cold estimator prints a table: options -> per-GPU GB."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fn(**kw)
    rows = {}
    for line in buf.getvalue().splitlines():
        m = re.match(r"\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.*)", line)
        if m:
            rows[m.group(3).replace(" ", "").replace("OffloadDeviceEnum.", "")] = float(m.group(2))
    return rows


@pytest.mark.parametrize("name", ["codellama-7b", "qwen2.5-coder-7b", "starcoder2-15b", "codellama-34b"])
@pytest.mark.parametrize("tp,world", [(1, 8), (2, 8), (4, 16)])
def test_zero3_and_zero2_equal_deepspeeds_printed_estimates(name, tp, world):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold
    shape = BUILTIN_SHAPES[name]
    P, largest = params_per_tp_rank(shape, tp)
    dp = world // tp
    z3 = _ds_printed_gpu_gib(estimate_zero3_model_states_mem_needs_all_cold, total_params=P,
                             largest_layer_params=largest, num_gpus_per_node=dp)
    z2 = _ds_printed_gpu_gib(estimate_zero2_model_states_mem_needs_all_cold, total_params=P, num_gpus_per_node=dp)
    cases = [(3, "none", z3["offload_param=none,offload_optimizer=none,zero_init=1"]),
             (3, "cpu", z3["offload_param=cpu,offload_optimizer=cpu,zero_init=1"]),
             (2, "none", z2["offload_optimizer=none"]), (2, "cpu", z2["offload_optimizer=cpu"])]
    for stage, offload, ds_gib in cases:
        pl = plan(shape, PlanInput(world_size=world, tp=tp, zero_stage=stage, offload=offload))
        assert round(pl.model_states / 2**30, 2) == pytest.approx(ds_gib, abs=0.011), (stage, offload)


def test_stages_0_1_and_fp32_by_hand():
    shape = BUILTIN_SHAPES["codellama-7b"]
    P = shape.total_params()
    s0 = model_states(shape, PlanInput(world_size=8, zero_stage=0))
    assert (s0["parameters"], s0["gradients"], s0["optimizer"]) == (2 * P, 6 * P, 12 * P)
    s1 = model_states(shape, PlanInput(world_size=8, zero_stage=1))
    assert (s1["parameters"], s1["gradients"], s1["optimizer"]) == (2 * P, 2 * P + 4 * P // 8, 12 * P // 8)
    f0 = model_states(shape, PlanInput(world_size=1, zero_stage=0, dtype="fp32"))
    assert f0["parameters"] + f0["gradients"] + f0["optimizer"] == 16 * P
    with pytest.raises(ValueError, match="tp: must divide"):
        PlanInput(world_size=8, tp=3)
    with pytest.raises(ValueError, match="offload"):
        PlanInput(zero_stage=1, offload="cpu")


def test_tp_splits_layers_and_untied_head_only():
    shape = BUILTIN_SHAPES["qwen2.5-coder-7b"]
    p = shape.params()
    per_rank, _ = params_per_tp_rank(shape, 4)
    assert per_rank == p["embedding"] + p["replicated"] + (p["layers_tp"] + p["lm_head"]) // 4
    tied = BUILTIN_SHAPES["starcoder2-7b"]
    assert tied.params()["lm_head"] == 0


# ------------------------------------------------------------------ activations, loss, collectives

def test_activations_by_hand():
    shape = BUILTIN_SHAPES["codellama-7b"]  # h = q = kv = 4096, I = 11008, 32 heads, RMSNorm, SwiGLU
    h, I, L = 4096, 11008, 32
    norm_bf16 = (4 + 2 * 2) * h
    attn_bf16 = 2 * (h + 2 * h) + 2 * 2 * h + 4 * 32
    mlp_bf16 = 4 * 2 * I
    N = 2 * 1024
    expect = N * (L * (2 * norm_bf16 + attn_bf16 + mlp_bf16) + norm_bf16)
    assert activations(shape, PlanInput(world_size=8, micro_batch=2, seq_len=1024)) == expect
    expect_tp2 = N * (L * (2 * norm_bf16 + (attn_bf16 + mlp_bf16) / 2) + norm_bf16)
    assert activations(shape, PlanInput(world_size=8, tp=2, micro_batch=2, seq_len=1024)) == int(expect_tp2)
    ckpt = activations(shape, PlanInput(world_size=8, micro_batch=2, seq_len=1024, activation_checkpointing=True))
    assert ckpt == N * (L * 2 * h + (2 * norm_bf16 + attn_bf16 + mlp_bf16) + norm_bf16)


def test_loss_memory_by_hand():
    shape = BUILTIN_SHAPES["codellama-7b"]
    N, V, h = 4096, 32016, 4096
    mem = loss_memory(shape, PlanInput(world_size=8, seq_len=N))
    assert mem["ce"] == N * V * 2 + 3 * 4 * N * V          # bf16 logits + 3 fp32 N x V
    c = 16 * 2**20 // (12 * V)                              # 43 rows: 16 MiB of p, q, r (fp32)
    assert mem["dece"] == 2 * N * V * 2 + 12 * c * V        # logits + bf16 gradient buffer + scratch
    cf = 128 * 2**20 // (6 * V)                             # 698 rows: 128 MiB of bf16 z and its fp32 dz
    # + one 43-row visit's p, q, r; an fp32 accumulator would hold 2 V h = 262 MB more than the bf16 gradient,
    # over the 128 MiB budget, so the vocabulary walk (tiles of every row: no block accumulator)
    assert mem["fused"] == (6 * cf + 12 * c) * V + 2 * V * h + 4 * N * h
    mem2 = loss_memory(shape, PlanInput(world_size=8, tp=2, seq_len=N))
    assert mem2["ce"] == N * (V // 2) * 2 + 3 * 4 * N * (V // 2)  # TP divides V
    fp32 = loss_memory(shape, PlanInput(world_size=1, seq_len=N, dtype="fp32"))
    assert fp32["ce"] == N * V * 4 + 2 * 4 * N * V          # the upcast is free in fp32


def test_loss_options_size_the_scratch_by_hand():
    """backend, chunk_budget_mib and logit_softcap change the rows per chunk and the scratch as the ops allocate."""
    shape = BUILTIN_SHAPES["codellama-7b"]
    N, V, h = 4096, 32016, 4096
    comp = loss_memory(shape, PlanInput(world_size=8, seq_len=N, backend="compile"))
    c = 16 * 2**20 // (2 * V)                               # 262 rows: only the bf16 chunk of logits
    assert comp["dece"] == 2 * N * V * 2 + 2 * c * V
    cf = 128 * 2**20 // ((2 + 4) * V)                       # 698 rows: bf16 z (then its bf16 cast), fp32 dz
    assert comp["fused"] == (6 * cf + 2 * c) * V + 2 * V * h + 4 * N * h   # + a 262-row visit (counted as z)
    small = loss_memory(shape, PlanInput(world_size=8, seq_len=N, chunk_budget_mib=16))
    cf = 16 * 2**20 // (6 * V)                              # 87 rows: under 128, so the vocabulary walk
    assert cf < 128 and cf * V // N >= 256                  # whose tiles hold every row (680 columns)
    visit = 16 * 2**20 // (12 * V)                          # 43 rows
    assert small["fused"] == (6 * cf + 12 * visit) * V + 2 * V * h + 4 * N * h   # the weight gradient in bf16
    capped = loss_memory(shape, PlanInput(world_size=8, seq_len=N, logit_softcap=True))
    c = 16 * 2**20 // (16 * V)                              # p, q, r and the capped logits, fp32
    assert capped["dece"] == 2 * N * V * 2 + 16 * c * V
    with pytest.raises(ValueError, match="backend"):
        PlanInput(backend="triton")
    with pytest.raises(ValueError, match="chunk_budget_mib"):
        PlanInput(chunk_budget_mib=0)


def test_loss_collectives_by_hand():
    shape = BUILTIN_SHAPES["qwen2.5-coder-7b"]
    N = 2 * 4096
    coll = loss_collectives(shape, PlanInput(world_size=8, tp=2, micro_batch=2, seq_len=4096))
    assert coll["dece"] == {"all_gather": 4 * (N + 2), "all_reduce": 8 * N, "calls": 2}
    assert coll["ce"] == {"all_gather": 0, "all_reduce": 12 * N, "calls": 3}
    # fused: 294-row chunks (128 MiB of bf16 z + fp32 dz over 76032 columns) in 18-row visits, two collectives each:
    # 27 full chunks of 17 visits, the last 254 rows in 15, + the all-reduce of grad_hidden
    visits = 27 * 17 + 15
    assert coll["fused"] == {"all_gather": 4 * (N + 2 * visits), "all_reduce": 8 * N + 2 * N * 3584,
                             "calls": 2 * visits + 1}
    none = loss_collectives(shape, PlanInput(world_size=8, tp=1))
    assert all(v["all_gather"] == v["all_reduce"] == 0 for v in none.values())


# ------------------------------------------------------------------------------------------ CLI

def _cli(*argv) -> tuple[int, str, str]:
    from dece_ds.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_cli_table_json_and_errors(tmp_path):
    code, out, _ = _cli("plan", "codellama-7b", "qwen2.5-coder-7b", "--world-size", "8", "--markdown")
    assert code == 0 and "| codellama-7b | 6.74 | 1x8 | 3 |" in out
    code, out, _ = _cli("plan", "starcoder2-7b", "--world-size", "16", "--tp", "2", "--zero-stage", "2",
                        "--offload", "cpu", "--micro-batch", "2", "--seq-len", "2048", "--dtype", "fp16", "--json")
    (d,) = json.loads(out)
    assert code == 0 and d["inputs"]["tp"] == 2 and d["total"]["dece"] < d["total"]["ce"]
    code, out, _ = _cli("plan", "qwen2.5-coder-7b", "--backend", "compile", "--chunk-budget-mib", "64", "--json")
    (d,) = json.loads(out)
    assert code == 0 and d["inputs"]["backend"] == "compile" and d["inputs"]["chunk_budget_mib"] == 64
    code, _, err = _cli("plan", "codellama-7b", "--world-size", "8", "--tp", "3")
    assert code == 2 and "tp: must divide" in err
    code, out, _ = _cli("plan", "--list")
    assert code == 0 and "qwen2.5-coder-32b" in out
