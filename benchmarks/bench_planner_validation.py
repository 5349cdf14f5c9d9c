# MALLOC_MMAP_THRESHOLD_=65536 .venv/bin/python benchmarks/bench_planner_validation.py
"""How close is ``dece-ds plan`` to the memory a training step really takes? Tiny CPU runs.

Each case builds a tiny HF Llama in a forked child (fp32, one thread), then runs three optimizer steps
(forward + backward + AdamW step) with CE (the model's own HF loss), DeCE on the logits
(``dece_loss``) or fused-linear DeCE (``fused_linear_dece`` from the last hidden states and
``lm_head.weight``). Measured: the child's peak resident set (``ru_maxrss``) minus its resident set
before the model was built, with glibc's mmap threshold pinned low so freed buffers leave the process
(``benchmarks/common.py``). Gradients are zeroed in place (``set_to_none=False``), as DeepSpeed keeps
its gradient buffers for the whole run. Planned: ``dece_ds.planning.estimate.plan`` for the same shape,
world size 1, ZeRO stage 0, fp32 (4 + 4 + 8 bytes per parameter), the same micro-batch and sequence.

Cases cover the three regimes: model states dominate, activations dominate, the logits dominate. Also
reported: the activation term alone (resident-set growth over one forward with the graph kept, minus
the logits) against the plan's activation estimate, in fp32 and bf16.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, ensure_mmap_threshold, print_table, provenance, write_json  # noqa: E402

CASES = [  # name, model shape, micro-batch, seq, losses
    ("states", dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=4, vocab_size=8192), 1, 256, ("ce", "dece", "fused")),
    ("activations", dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=2048), 4, 512, ("ce", "dece", "fused")),
    ("logits", dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=32000), 2, 1024, ("ce", "dece", "fused")),
]
STEPS = 3


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _in_child(fn):
    """Run ``fn() -> dict`` in a forked child; its result as a dict."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - reported in the table
            out = {"error": f"{type(e).__name__}: {e}"}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data) if data else {"error": "child died"}


def _hf_shape(cfg: dict, name: str):
    from dece_ds.planning.shapes import ModelShape
    return ModelShape(name, cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
                      cfg["num_key_value_heads"], cfg["intermediate_size"], cfg["vocab_size"], False)


def _build(cfg, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg, tie_word_embeddings=False, max_position_embeddings=4096,
                                         attn_implementation="sdpa"))
    return model.to(dtype)


def _loss(model, ids, labels, loss: str):
    from dece_ds import dece_loss, fused_linear_dece
    shifted = labels.new_full(labels.shape, -100)
    shifted[:, :-1] = labels[:, 1:]
    if loss == "ce":
        return model(input_ids=ids, labels=labels).loss
    if loss == "dece":
        logits = model(input_ids=ids).logits
        return dece_loss(logits.view(-1, logits.shape[-1]), shifted.view(-1), alpha=0.99)
    hidden = model.model(input_ids=ids).last_hidden_state
    return fused_linear_dece(hidden.view(-1, hidden.shape[-1]), model.lm_head.weight, shifted.view(-1), alpha=0.99)


WARMUP_CFG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128)


def _warm_up(loss, dtype):
    """One step of a micro model first: the code it pages in (about 100 MiB of libraries and Python
    modules on first use) is a fixed cost of the process, not memory the plan is about."""
    import gc
    import torch
    model = _build(WARMUP_CFG, dtype)
    ids = torch.randint(0, 128, (1, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    if loss:
        _loss(model, ids, ids, loss).backward()
        opt.step()
    else:
        model.model(input_ids=ids).last_hidden_state.sum().backward()
    del model, opt
    gc.collect()


def measure_step(cfg, micro_batch, seq_len, loss):
    import torch
    torch.set_num_threads(1)
    _warm_up(loss, torch.float32)
    ids = torch.randint(0, cfg["vocab_size"], (micro_batch, seq_len))
    base = _rss_bytes()
    model = _build(cfg, torch.float32)
    # foreach=False: the update runs parameter by parameter, in place, like DeepSpeed's fused Adam; the
    # default foreach path adds parameter-sized temporaries (the denominators of every tensor at once).
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=False)
        _loss(model, ids, ids, loss).backward()
        opt.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"measured_bytes": peak - base}


def measure_activations(cfg, micro_batch, seq_len, dtype_name):
    """Resident-set growth over one forward (graph kept) of the decoder body, logits excluded."""
    import torch
    torch.set_num_threads(1)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    _warm_up(None, dtype)
    model = _build(cfg, dtype)
    ids = torch.randint(0, cfg["vocab_size"], (micro_batch, seq_len))
    before = _rss_bytes()
    hidden = model.model(input_ids=ids).last_hidden_state  # saved tensors stay alive with `hidden`
    after = _rss_bytes()
    assert hidden.requires_grad
    return {"measured_bytes": after - before - hidden.numel() * hidden.element_size()}


def main() -> int:
    ensure_mmap_threshold()
    from dece_ds.planning.estimate import PlanInput, activations, plan
    rows = []
    for name, cfg, mb, seq, losses in CASES:
        shape = _hf_shape(cfg, f"tiny-llama-{name}")
        inp = PlanInput(world_size=1, tp=1, zero_stage=0, micro_batch=mb, seq_len=seq, dtype="fp32")
        pl = plan(shape, inp)
        for loss in losses:
            got = _in_child(lambda: measure_step(cfg, mb, seq, loss))
            est = pl.total(loss)
            row = {"case": name, "what": f"step {loss}", "params_M": shape.total_params() / 1e6, "tokens": mb * seq,
                   "dtype": "fp32", "planned_mib": est / 2**20,
                   "states_mib": pl.model_states / 2**20, "activ_mib": pl.activations / 2**20,
                   "loss_mib": pl.loss_memory[loss] / 2**20, **got}
            if "measured_bytes" in got:
                row["measured_mib"] = got["measured_bytes"] / 2**20
                row["error_pct"] = 100 * (est - got["measured_bytes"]) / got["measured_bytes"]
            rows.append(row)
            print(json.dumps(row), flush=True)
        for dt in ("fp32", "bf16"):
            got = _in_child(lambda: measure_activations(cfg, mb, seq, dt))
            est = activations(shape, PlanInput(world_size=1, micro_batch=mb, seq_len=seq, dtype=dt)) \
                - mb * seq * shape.hidden_size * (4 if dt == "fp32" else 2)  # the final output is not saved state
            row = {"case": name, "what": "activations", "params_M": shape.total_params() / 1e6, "tokens": mb * seq,
                   "dtype": dt, "planned_mib": est / 2**20, **got}
            if "measured_bytes" in got:
                row["measured_mib"] = got["measured_bytes"] / 2**20
                row["error_pct"] = 100 * (est - got["measured_bytes"]) / got["measured_bytes"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    text = print_table(rows, ["case", "what", "dtype", "params_M", "tokens", "states_mib", "activ_mib", "loss_mib",
                              "planned_mib", "measured_mib", "error_pct"])
    ok = [abs(r["error_pct"]) for r in rows if "error_pct" in r]
    summary = {"max_abs_error_pct": max(ok) if ok else None, "cases": len(rows), "measured": len(ok),
               "within_20pct": sum(e <= 20 for e in ok)}
    print(json.dumps(summary))
    write_json(REPO / "benchmarks/results/planner_validation.json",
               {"provenance": provenance(), "method": __doc__, "steps": STEPS, "rows": rows, "summary": summary,
                "table": text})
    return 0


if __name__ == "__main__":
    sys.exit(main())
