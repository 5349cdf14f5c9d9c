# .venv/bin/deepspeed --num_gpus 2 benchmarks/bench_step_time.py
"""Step time of one ZeRO-3 + AutoTP (TP=2) training run with CE and with DeCE, side by side, on this CPU.

One engine (dece_ds.initialize, ds_configs/cpu_demo.json's ZeRO-3 + TP=2 layout), one model, one batch
shape. Each measured iteration is one optimizer step (forward, backward, step) with the loss set to
DeepSpeed's own ``VocabParallelCausalLMLoss`` (CE: DeCE removed with ``remove_dece_from_engine``), to
DeCE on the vocab-parallel logits, or to fused-linear DeCE on the vocab-parallel head (``"fused_linear":
true``: hidden states and the rank's weight shard, the logits never built), in ABCCBA order so drift
and other load on the machine hit all alike. Also timed alone: the loss's forward
+ backward on a logits shard of the same shape (``vocab_parallel_cross_entropy`` vs
``vocab_parallel_dece``). Fixed iteration counts on every rank (collectives inside); medians per rank.
Prints a table; writes benchmarks/results/step_time.json with provenance.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]


def provenance(args, world, tp) -> dict:
    import deepspeed
    import transformers
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True,
                                    text=True).stdout.strip())
    except OSError:
        sha, dirty = None, None
    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
            "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "git_sha": sha, "git_dirty": dirty, "world_size": world, "tp": tp, "zero_stage": 3, "dtype": "float32",
            "loadavg_start": os.getloadavg()}


def median_ms(xs):
    return 1000 * statistics.median(xs)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2, help="iterations per loss before timing")
    p.add_argument("--iters", type=int, default=12, help="timed iterations per loss (even: ABBA order)")
    p.add_argument("--no-fused", action="store_true", help="leave out the fused-linear DeCE arm")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "step_time.json"))
    p.add_argument("--local_rank", "--local-rank", type=int)
    args = p.parse_args()

    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    import dece_ds
    from dece_ds.integrations.deepspeed import apply_dece_to_engine, remove_dece_from_engine
    from dece_ds.integrations.transformers import current_dece_loss
    from dece_ds.parallel.vocab_shard import find_vocab_parallel_head

    deepspeed.init_distributed(verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    ds_config = json.loads((REPO / "ds_configs" / "cpu_demo.json").read_text())
    ds_config.pop("scheduler", None)
    ds_config.update(train_micro_batch_size_per_gpu=args.batch, gradient_accumulation_steps=1)
    ds_config["optimizer"]["params"]["lr"] = 1e-4
    ds_config["dece"] = {"enabled": True, "label_smoothing": 0.05, "alpha_base": 0.99, "schedule": "epoch",
                         "steps_per_epoch": 1000}
    tp = ds_config["tensor_parallel"]["autotp_size"]
    info = provenance(args, world, tp)

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                      max_position_embeddings=args.seq, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    engine, *_ = dece_ds.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    arms = {"CE": None, "DeCE": ds_config["dece"], "DeCE fused": {**ds_config["dece"], "fused_linear": True}}
    if args.no_fused:
        del arms["DeCE fused"]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)

    def train_step(name):
        remove_dece_from_engine(engine)  # outside the timed span: back to DeepSpeed's loss and lm_head
        if arms[name] is not None:
            apply_dece_to_engine(engine, arms[name])
            mode = current_dece_loss(engine.module).mode
            assert mode == ("hidden" if arms[name].get("fused_linear") else "vocab_shard"), (name, mode)
        dist.barrier()
        t0 = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        return time.perf_counter() - t0

    names = list(arms)
    order = names + names[::-1]  # ABBA / ABCCBA
    for i in range(len(names) * args.warmup):
        train_step(order[i % len(order)])
    step_s = {name: [] for name in names}
    for i in range(len(names) * args.iters):
        name = order[i % len(order)]
        step_s[name].append(train_step(name))
    remove_dece_from_engine(engine)
    apply_dece_to_engine(engine, ds_config["dece"])
    dece = current_dece_loss(engine.module)

    # The loss alone, on a logits shard of the run's shape (same tp group and vocabulary range).
    from deepspeed.sequence.cross_entropy import vocab_parallel_cross_entropy
    head = find_vocab_parallel_head(engine.module)
    n_tok = args.batch * (args.seq - 1)
    shard = torch.randn(n_tok, head.partition_vocab_size, generator=g)
    target = torch.randint(0, args.vocab, (n_tok,), generator=g)

    def loss_only(name):
        z = shard.clone().requires_grad_(True)
        dist.barrier()
        t0 = time.perf_counter()
        if name == "CE":
            out = vocab_parallel_cross_entropy(z, target, tp_group=head.tp_group, vocab_start_index=head.vocab_start_index,
                                               vocab_end_index=head.vocab_end_index,
                                               global_vocab_size=head.global_vocab_size)
        else:
            out = dece_ds.vocab_parallel_dece(z, target, alpha=0.99, label_smoothing=0.05, tp_group=head.tp_group,
                                              vocab_start_index=head.vocab_start_index,
                                              global_vocab_size=head.global_vocab_size)
        out.backward()
        return time.perf_counter() - t0

    abba = ["CE", "DeCE", "DeCE", "CE"]
    for i in range(4):
        loss_only(abba[i % 4])
    loss_s = {"CE": [], "DeCE": []}
    for i in range(4 * args.iters):
        name = abba[i % 4]
        loss_s[name].append(loss_only(name))

    mine = {"rank": rank, "step_ms": {k: median_ms(v) for k, v in step_s.items()},
            "loss_ms": {k: median_ms(v) for k, v in loss_s.items()},
            "step_ms_all": {k: [1000 * x for x in v] for k, v in step_s.items()}}
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        info["loadavg_end"] = os.getloadavg()
        per_rank = sorted(gathered, key=lambda r: r["rank"])
        step = {k: max(r["step_ms"][k] for r in per_rank) for k in names}  # slowest rank sets the pace
        loss = {k: max(r["loss_ms"][k] for r in per_rank) for k in ("CE", "DeCE")}
        overhead = 100 * (step["DeCE"] / step["CE"] - 1)
        result = {"question": "step time of ZeRO-3 + TP=2 training with CE vs DeCE on CPU",
                  "provenance": info,
                  "shapes": {"batch": args.batch, "seq": args.seq, "hidden": args.hidden, "layers": args.layers,
                             "vocab": args.vocab, "vocab_per_rank": head.partition_vocab_size,
                             "params": n_params, "logits_shard": [n_tok, head.partition_vocab_size]},
                  "iterations": {"warmup_per_loss": args.warmup, "timed_per_loss": args.iters,
                                 "loss_only_timed_per_loss": 2 * args.iters,
                                 "order": "ABBA" if len(names) == 2 else "ABCCBA"},
                  "median_step_ms": step, "median_loss_fwd_bwd_ms": loss, "dece_step_overhead_pct": overhead,
                  **({"dece_fused_step_overhead_pct": 100 * (step["DeCE fused"] / step["CE"] - 1)}
                     if "DeCE fused" in step else {}),
                  "per_rank": per_rank}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"\nZeRO-3 + TP={tp}, {world} CPU ranks, Llama hidden {args.hidden} x {args.layers} layers, vocab "
              f"{args.vocab} ({head.partition_vocab_size}/rank), batch {args.batch} x seq {args.seq}, fp32, "
              f"medians of {args.iters} steps per loss, slowest rank")
        print(f"{'':24}{'CE (DeepSpeed)':>16}{'DeCE (dece_ds)':>16}{'DeCE / CE':>12}"
              + (f"{'DeCE fused':>12}{'fused / CE':>12}" if "DeCE fused" in step else ""))
        print(f"{'train step (ms)':24}{step['CE']:16.1f}{step['DeCE']:16.1f}{step['DeCE'] / step['CE']:12.3f}"
              + (f"{step['DeCE fused']:12.1f}{step['DeCE fused'] / step['CE']:12.3f}" if "DeCE fused" in step else ""))
        print(f"{'loss fwd+bwd alone (ms)':24}{loss['CE']:16.1f}{loss['DeCE']:16.1f}{loss['DeCE'] / loss['CE']:12.3f}")
        print(f"DeCE step overhead: {overhead:+.1f}%  (loss-only difference = "
              f"{100 * (loss['DeCE'] - loss['CE']) / step['CE']:+.1f}% of a CE step)")
        print(f"load average {info['loadavg_start']} -> {info['loadavg_end']}; wrote {args.out}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
