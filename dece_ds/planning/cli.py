"""``dece-ds plan``: per-GPU memory and loss collectives of a DeepSpeed run, before renting the GPUs.

    dece-ds plan qwen2.5-coder-7b --world-size 8 --tp 1 --zero-stage 3 --micro-batch 1 --seq-len 4096
    dece-ds plan path/to/config.json --world-size 16 --tp 2 --zero-stage 3 --offload cpu
    dece-ds plan codellama-7b starcoder2-7b --world-size 8 --markdown      (several models, one table)
    dece-ds plan --list                                                       (the built-in shapes)
"""

from __future__ import annotations

import argparse
import json
import sys

GIB = 2**30


def _at_least_one(text: str) -> int:
    """argparse type of the count flags: argparse names the flag (``argument --world-size: ...``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("plan", help="per-GPU memory (params, grads, optimizer, activations, CE/DeCE/"
                                           "fused logits) and loss collectives of a DeepSpeed run")
    p.add_argument("models", nargs="*", help="built-in shape name, or a local HF config.json (or its folder)")
    p.add_argument("--list", action="store_true", help="list the built-in model shapes and exit")
    p.add_argument("--world-size", type=_at_least_one, default=8, help="GPUs in the run (default 8)")
    p.add_argument("--tp", type=_at_least_one, default=1, help="tensor-parallel size (AutoTP, vocab-parallel head)")
    p.add_argument("--zero-stage", type=int, default=3, choices=[0, 1, 2, 3])
    p.add_argument("--offload", choices=["none", "cpu"], default="none",
                   help="cpu: optimizer (and at stage 3 the parameters) on the host")
    p.add_argument("--micro-batch", type=_at_least_one, default=1, help="sequences per GPU per micro-step")
    p.add_argument("--seq-len", type=_at_least_one, default=4096)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--activation-checkpointing", action="store_true", help="keep only each layer's input")
    p.add_argument("--backend", choices=["eager", "compile"], default="eager",
                   help="the dece section's backend (the loss's scratch per chunk differs)")
    p.add_argument("--chunk-budget-mib", type=float, default=None,
                   help="the dece section's chunk_budget_mib (default: 16 unfused, 128 fused)")
    p.add_argument("--logit-softcap", action="store_true", help="the model soft-caps its logits (Gemma 2 style)")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument("--json", action="store_true", help="print the plans as JSON")
    p.set_defaults(func=run)


def _gib(n) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def _kib(n) -> str:
    return f"{n / 2**10:.1f}"


def table_rows(plans) -> tuple[list[str], list[list[str]]]:
    header = ["model", "params (B)", "tp x dp", "ZeRO", "params", "grads", "optim", "activ.",
              "CE logits+loss", "DeCE logits+loss", "fused DeCE", "total CE", "total DeCE", "total fused",
              "CE coll. KiB", "DeCE coll. KiB"]
    rows = []
    for pl in plans:
        i = pl.inputs
        coll = pl.loss_collectives
        rows.append([pl.model, f"{pl.params_total / 1e9:.2f}", f"{i['tp']}x{i['world_size'] // i['tp']}",
                     f"{i['zero_stage']}{'+off' if i['offload'] == 'cpu' else ''}",
                     _gib(pl.parameters), _gib(pl.gradients), _gib(pl.optimizer), _gib(pl.activations),
                     _gib(pl.loss_memory["ce"]), _gib(pl.loss_memory["dece"]), _gib(pl.loss_memory["fused"]),
                     _gib(pl.total("ce")), _gib(pl.total("dece")), _gib(pl.total("fused")),
                     _kib(coll["ce"]["all_gather"] + coll["ce"]["all_reduce"]),
                     _kib(coll["dece"]["all_gather"] + coll["dece"]["all_reduce"])])
    return header, rows


def format_table(plans, markdown: bool = False) -> str:
    header, rows = table_rows(plans)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[k]) for r in rows)) for k, h in enumerate(header)]
    fmt = lambda r: "  ".join(c.rjust(w) if k else c.ljust(w) for k, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])


def run(args: argparse.Namespace) -> int:
    from .estimate import PlanInput, plan
    from .shapes import BUILTIN_SHAPES, resolve_shape
    if args.list:
        for name, s in BUILTIN_SHAPES.items():
            print(f"{name:20s} {s.total_params() / 1e9:6.2f}B  h={s.hidden_size} layers={s.num_layers} "
                  f"heads={s.num_heads}/{s.num_kv_heads} I={s.intermediate_size} V={s.vocab_size} "
                  f"tied={s.tie_embeddings}")
        return 0
    if not args.models:
        print("dece-ds plan: error: give a model (built-in name or config.json); --list shows the names",
              file=sys.stderr)
        return 2
    if args.world_size % args.tp:
        print(f"dece-ds plan: error: --tp: must divide --world-size ({args.world_size}), got {args.tp}",
              file=sys.stderr)
        return 2
    if args.offload == "cpu" and args.zero_stage < 2:
        print(f"dece-ds plan: error: --offload cpu: needs --zero-stage 2 or 3, got {args.zero_stage}", file=sys.stderr)
        return 2
    try:
        inp = PlanInput(world_size=args.world_size, tp=args.tp, zero_stage=args.zero_stage, offload=args.offload,
                        micro_batch=args.micro_batch, seq_len=args.seq_len, dtype=args.dtype,
                        activation_checkpointing=args.activation_checkpointing, backend=args.backend,
                        chunk_budget_mib=args.chunk_budget_mib, logit_softcap=args.logit_softcap)
        plans = [plan(resolve_shape(m), inp) for m in args.models]
    except ValueError as e:  # DeceConfigError (an unreadable config.json) is one
        print(f"dece-ds plan: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([p.as_dict() for p in plans], indent=2))
        return 0
    print(f"Per-GPU memory in GiB; world {inp.world_size}, micro-batch {inp.micro_batch} x seq {inp.seq_len} "
          f"= {inp.tokens} tokens, {inp.dtype}, offload {inp.offload}"
          f"{', activation checkpointing' if inp.activation_checkpointing else ''}"
          f"{'' if inp.backend == 'eager' else ', backend ' + inp.backend}"
          f"{'' if inp.chunk_budget_mib is None else f', chunk budget {inp.chunk_budget_mib:g} MiB'}"
          f"{', logit soft-cap' if inp.logit_softcap else ''}. "
          "Loss collectives: bytes per rank per micro-batch.")
    print(format_table(plans, markdown=args.markdown))
    print(f"model states: {plans[0].estimator}")
    return 0
