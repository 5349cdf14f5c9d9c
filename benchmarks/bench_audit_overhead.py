# .venv/bin/python benchmarks/bench_audit_overhead.py            (add --quick for a smoke run of seconds)
"""What the poison audit's recorder costs: DeCE with and without the ``log_p_out`` side output and the
per-row record, side by side, on this machine (CPU, or the first GPU when there is one).

Three timings, each in ABBA order (audit off, on, on, off) so drift and other load hit both alike, medians of a
fixed iteration count:
1. the loss alone, forward + backward on ``[N, V]`` logits: ``dece_loss`` vs ``dece_loss(..., log_p_out=buf)``;
2. the fused-linear loss on hidden states + head weight, the same pair;
3. one training step of a small HF Llama (forward, backward, AdamW step) through one ``DeceHook`` with a
   recorder, without row ids (nothing recorded) vs with them (every row's record written to a temporary folder).
Prints a table; writes benchmarks/results/audit_overhead.json with provenance (``dece_ds.provenance``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def abba(fn_off, fn_on, iters: int, warmup: int, device) -> dict[str, float]:
    order = [("off", fn_off), ("on", fn_on), ("on", fn_on), ("off", fn_off)]
    for i in range(2 * warmup):
        order[i % 4][1]()
    times = {"off": [], "on": []}
    for i in range(2 * iters):
        name, fn = order[i % 4]
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times[name].append(time.perf_counter() - t0)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096, help="N of the loss-only timings")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--iters", type=int, default=10, help="timed iterations per setting (ABBA)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny shapes, 2 iterations: checks that it runs")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "audit_overhead.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.vocab, args.hidden, args.layers, args.batch, args.seq = 256, 2000, 64, 1, 2, 32
        args.iters, args.warmup = 2, 1
        if args.out == p.get_default("out"):
            args.out = str(Path(tempfile.gettempdir()) / "audit_overhead_quick.json")

    from transformers import LlamaConfig, LlamaForCausalLM

    from dece_ds import DeceConfig, dece_loss, fused_linear_dece
    from dece_ds.integrations.hook import DeceHook
    from dece_ds.provenance import benchmark_provenance

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    results = {}

    # 1. the loss alone
    z = torch.randn(args.tokens, args.vocab, generator=g).to(device)
    t = torch.randint(0, args.vocab, (args.tokens,), generator=g).to(device)
    buf = torch.zeros(args.tokens, device=device)

    def loss_only(with_audit):
        x = z.clone().requires_grad_()
        dece_loss(x, t, alpha=0.97, log_p_out=buf if with_audit else None).backward()

    results["loss_fwd_bwd_ms"] = abba(lambda: loss_only(False), lambda: loss_only(True), args.iters, args.warmup,
                                      device)

    # 2. fused linear
    h = torch.randn(args.tokens, args.hidden, generator=g).to(device)
    w = (torch.randn(args.vocab, args.hidden, generator=g) * 0.02).to(device)

    def fused(with_audit):
        fused_linear_dece(h.clone().requires_grad_(), w.clone().requires_grad_(), t, alpha=0.97,
                          log_p_out=buf if with_audit else None).backward()

    results["fused_linear_fwd_bwd_ms"] = abba(lambda: fused(False), lambda: fused(True), args.iters, args.warmup,
                                              device)

    # 3. a training step through the hook
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                      max_position_embeddings=args.seq, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
    rows = torch.arange(args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        hook = DeceHook(DeceConfig(alpha_base=0.97, steps_per_epoch=1000, audit={"enabled": True, "out": tmp}))
        hook.install(model)

        def step(with_audit):
            kw = {"dece_row_ids": rows} if with_audit else {}   # no row ids: the hook records nothing
            loss = model(input_ids=ids, labels=ids, **kw).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        results["train_step_ms"] = abba(lambda: step(False), lambda: step(True), args.iters, args.warmup, device)
        hook.recorder.close()
        record_bytes = sum(f.stat().st_size for f in Path(tmp).glob("rank*.jsonl"))
        record_lines = hook.recorder.lines
        hook.remove()

    overhead = {k: 100 * (v["on"] / v["off"] - 1) for k, v in results.items()}
    out = {"question": "cost of the poison audit's recorder (log p_t side output + per-row record)",
           "provenance": {**benchmark_provenance(), "device": str(device)},
           "shapes": {"tokens": args.tokens, "vocab": args.vocab, "hidden": args.hidden, "layers": args.layers,
                      "batch": args.batch, "seq": args.seq},
           "iterations": {"warmup": args.warmup, "timed_per_setting": args.iters, "order": "ABBA"},
           "median_ms": results, "overhead_pct": overhead,
           "record_bytes_per_step": record_bytes / max(1, record_lines), "quick": args.quick}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(__import__("json").dumps(out, indent=1))
    print(f"\naudit overhead on {device}: N={args.tokens} V={args.vocab}; Llama {args.hidden} x {args.layers}, "
          f"batch {args.batch} x seq {args.seq}; medians of {args.iters} (ABBA)")
    print(f"{'':28}{'audit off (ms)':>16}{'audit on (ms)':>16}{'overhead':>10}")
    for k, v in results.items():
        print(f"{k:28}{v['off']:16.2f}{v['on']:16.2f}{overhead[k]:+9.1f}%")
    print(f"record: {out['record_bytes_per_step']:.0f} bytes per step; wrote {args.out}")


if __name__ == "__main__":
    main()
