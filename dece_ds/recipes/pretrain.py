"""Continued pretraining on a streaming packed corpus through the DeepSpeed engine, DeCE from the config.

``run(args)`` takes the flags of ``launch/continue_pretraining.py``.

- Data: local json / jsonl / parquet / text shards read with HF ``datasets`` in streaming mode,
  tokenized on the fly and packed into ``seq_len`` sequences (``dece_ds.data.StreamingPackedDataset``),
  split across data-parallel ranks without overlap (TP ranks of one DP group read the same rows). The run
  stops at ``max_steps``, after ``epochs`` of the corpus, or when the first rank runs out of data.
- Alpha: the ``continuous`` schedule is the default here (when the section names none):
  ``e = 1 + step / steps_per_epoch`` = ``1 + tokens_seen / tokens_per_epoch``. ``steps_per_epoch`` is
  filled in from ``tokens_per_epoch`` (default: one counting pass over the corpus by rank 0) unless the
  section sets it. The section is validated once, before any process-group work.
- Checkpoints: ``client_state`` holds the dece record, the run identity and every rank's data position
  (gathered to the writer, since only one rank's ``client_state`` is saved). ``resume`` restores
  global_steps, optimizer, alpha and each rank's position: the resumed run trains on exactly the tokens
  the uninterrupted one would.
- Log: ``OUT/log.jsonl`` per optimizer step; ``OUT/summary.json`` at the end.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ..parallel.shutdown import destroy_process_group
from .checkpoint import RUN_KEY, RecipeError, resume, save_checkpoint
from .cli import add_resume_and_testing_flags, run_command
from .config_io import load_ds_config
from .loop import train_steps
from .model import TINY_MODELS, build_engine, build_tokenizer, export_safetensors
from .run_log import RunLog, write_atomically
from .runtime import init_distributed, is_main, make_log0, peak_mem_mib

log0 = make_log0("cpt")


def tokenizer_texts(args):
    """The first ``tokenizer_rows`` texts of the corpus, for training a tiny model's BPE (rank 0 only)."""
    import datasets
    from ..data import infer_format
    fmt = args.data_format or infer_format(args.data)
    ds = datasets.load_dataset(fmt, data_files=[str(Path(p).resolve()) for p in args.data], split="train",
                               streaming=True)
    field = "text" if fmt == "text" else args.text_field
    return [str(r[field]) for r, _ in zip(ds, range(args.tokenizer_rows))]


def run_identity(args, *, world: int, dp_world: int, tokens_per_step: int, steps_per_epoch: int) -> dict[str, Any]:
    return {"seed": args.seed, "data": [str(Path(p).resolve()) for p in args.data], "world_size": world,
            "dp_world_size": dp_world, "seq_len": args.seq_len, "tokens_per_step": tokens_per_step,
            "steps_per_epoch": steps_per_epoch, "shard_strategy": args.shard_strategy}


def run(args) -> dict[str, Any]:
    """Continue pretraining as the flags say; returns the summary. Raises ``RecipeError`` for bad input."""
    from ..data import StreamingPackedDataset, count_tokens
    from ..integrations.deepspeed import dece_client_state
    from ..integrations.transformers import current_dece_loss
    missing = [p for p in args.data if not Path(p).is_file()]
    if missing:
        raise RecipeError(f"--data: no such file(s): {missing}")
    ds_config, dece = load_ds_config(args.deepspeed_config, steps_per_epoch_later=True,
                                     default_schedule="continuous")
    init_distributed()
    out = Path(args.out)
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    tok = build_tokenizer(args.model, args.tokenizer, args.vocab_size, lambda: tokenizer_texts(args), out)

    # steps per epoch from the corpus size, before the engine reads the dece section
    world = dist.get_world_size()
    tp = int(ds_config.get("tensor_parallel", {}).get("autotp_size", 1) or 1)
    dp_world = world // tp
    micro_bs = int(ds_config.get("train_micro_batch_size_per_gpu", 1))
    ga = int(ds_config.get("gradient_accumulation_steps", 1))
    tokens_per_step = args.seq_len * micro_bs * dp_world * ga
    tokens_per_epoch = args.tokens_per_epoch
    if tokens_per_epoch is None:
        box = [count_tokens(args.data, tok, text_field=args.text_field, data_format=args.data_format)
               if is_main() else None]
        dist.broadcast_object_list(box, src=0)
        tokens_per_epoch = box[0]
    steps_per_epoch = max(1, tokens_per_epoch // tokens_per_step)
    if dece.enabled and dece.steps_per_epoch is None:
        dece = dece.model_copy(update={"steps_per_epoch": steps_per_epoch})

    engine, _hf_ds, _ = build_engine(args.model, ds_config, dece, vocab_size=len(tok), seq_len=args.seq_len,
                                     seed=args.seed, lr=args.lr, gradient_checkpointing=args.gradient_checkpointing)
    if engine.dp_world_size != dp_world or engine.train_micro_batch_size_per_gpu() != micro_bs:
        raise RecipeError(f"{args.deepspeed_config}: the engine has dp={engine.dp_world_size}, micro batch "
                          f"{engine.train_micro_batch_size_per_gpu()}; the config gave dp={dp_world}, {micro_bs}")
    dp_rank = dist.get_rank(group=engine.data_parallel_group) if dp_world > 1 else 0
    stream = StreamingPackedDataset(args.data, tok, args.seq_len, text_field=args.text_field,
                                    data_format=args.data_format, dp_rank=dp_rank, dp_world=dp_world,
                                    strategy=args.shard_strategy)
    total_steps = args.max_steps or int(args.epochs * steps_per_epoch)
    log0(f"tokens/epoch={tokens_per_epoch} tokens/step={tokens_per_step} steps/epoch={steps_per_epoch} "
         f"total_steps={total_steps} dece={dece.to_ds_section() if dece.enabled else 'off'}")

    ckpt_dir = out / "checkpoints"
    identity = run_identity(args, world=world, dp_world=dp_world, tokens_per_step=tokens_per_step,
                            steps_per_epoch=steps_per_epoch)
    client_state = resume(engine, args.resume, ckpt_dir, identity=identity, allow_mismatch=args.allow_resume_mismatch,
                          log_path=out / "log.jsonl", log0=log0)
    if client_state is not None:
        positions = client_state.get("data", {}).get("positions")
        if not positions or len(positions) != world:
            raise RecipeError(f"--resume: the checkpoint holds no data position for {world} ranks")
        stream.load_state_dict(positions[dist.get_rank()])
        log0(f"data position restored: {stream.sequences} sequences read on rank 0")

    def save(crash_mid_save: bool = False):
        positions = [None] * world
        dist.all_gather_object(positions, stream.state_dict())
        save_checkpoint(engine, ckpt_dir, {**dece_client_state(engine), RUN_KEY: identity,
                                           "data": {"positions": positions, "tokens_per_epoch": tokens_per_epoch,
                                                    "seq_len": args.seq_len}},
                        crash_mid_save=crash_mid_save)

    def micro_batches(step: int):
        batches = [stream.next_batch(micro_bs) for _ in range(ga)]
        return None if any(b is None for b in batches) else batches

    def extra(record, step):
        return {"tokens_per_s_per_rank": record["tokens"] / dp_world / record["step_time_s"],
                "tokens_seen": engine.global_steps * tokens_per_step,
                "epoch_progress": engine.global_steps / steps_per_epoch, "peak_mem_mib": peak_mem_mib()}

    run_log = RunLog(out / "log.jsonl" if is_main() else None)
    t_start = time.perf_counter()
    try:
        result = train_steps(engine, micro_batches, total_steps=total_steps, run_log=run_log, save=save,
                             save_every=args.save_every, tp=tp, can_run_dry=True, extra=extra,
                             crash_after_step=args.simulate_crash_after_step,
                             crash_mid_save_step=args.simulate_crash_during_save)
    finally:
        run_log.close()
    if result.end_of_data:
        log0(f"end of data at step {engine.global_steps}")
        save()  # under a fresh tag: the checkpoint 'latest' names is never rewritten
    elapsed = time.perf_counter() - t_start
    hook = current_dece_loss(engine.module)
    summary = {"steps": engine.global_steps, "steps_this_run": result.steps, "tokens_this_run": result.tokens,
               "tokens_per_s_per_rank": result.tokens / dp_world / elapsed if elapsed > 0 else None,
               "first_loss": result.first_loss, "last_loss": result.last_loss,
               "final_alpha": hook.last_alpha if hook is not None else None, "end_of_data": result.end_of_data,
               "tokens_per_epoch": tokens_per_epoch, "steps_per_epoch": steps_per_epoch,
               "peak_mem_mib_rank0": peak_mem_mib(), "world": world, "tp": tp, "dp": dp_world}
    if is_main():
        write_atomically(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    log0("summary: " + json.dumps(summary))
    exported = None if args.no_export else export_safetensors(engine, tok, out)
    log0(f"done; log {out / 'log.jsonl'}" + (f"; model {exported}" if exported else ""))
    dist.barrier()
    destroy_process_group()
    return summary


def parse_args(argv=None, prog: str | None = None, description: str | None = None):
    """The command-line flags of the launcher (its ``--help``)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--deepspeed_config", "--deepspeed-config", required=True, help="DeepSpeed JSON with a 'dece' section")
    p.add_argument("--data", nargs="+", required=True, help="json/jsonl/parquet/txt shards, in reading order")
    p.add_argument("--data-format", choices=["json", "parquet", "text"], help="default: from the file extension")
    p.add_argument("--text-field", default="text", help="text column (json/parquet)")
    p.add_argument("--shard-strategy", choices=["examples", "shards"], default="examples",
                   help="rows round-robin over DP ranks (balanced) or whole files per rank (cheaper IO)")
    p.add_argument("--tokens-per-epoch", type=int, help="corpus size in tokens (default: counted in one pass)")
    p.add_argument("--model", default="tiny-llama", help=f"local HF folder or one of {sorted(TINY_MODELS)}")
    p.add_argument("--tokenizer", help="local tokenizer folder (default: the model's, or a BPE trained here)")
    p.add_argument("--tokenizer-rows", type=int, default=5000, help="rows a tiny model's BPE is trained on")
    p.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary size for tiny models")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the corpus (one for continuation)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW lr if the config has no optimizer section")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/continue_pretraining")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N optimizer steps (0: at the end)")
    p.add_argument("--no-export", action="store_true")
    add_resume_and_testing_flags(p, trains_on="tokens")
    return p.parse_args(argv)


def main(argv=None, prog: str | None = None, description: str | None = None) -> int:
    """Parse the flags and run; bad input prints one ``error:`` line. Returns the exit code (0 or 2)."""
    return run_command(run, parse_args(argv, prog, description))
