# .venv/bin/deepspeed --num_gpus 2 launch/continue_pretraining.py --deepspeed_config ds_configs/cpu_demo.json --data corpus/*.jsonl --model tiny-llama --out runs/cpt --max-steps 20
"""Continued pretraining on a streaming packed corpus through the DeepSpeed engine, DeCE from the config.

Runs under the same launchers as ``launch/train.py`` (deepspeed / torchrun / mpiexec) and reuses its
config check, process-group start, tokenizer, model builder and export; only the data and the loop are
new:

- Data: local json / jsonl / parquet / text shards read with HF ``datasets`` in streaming mode,
  tokenized on the fly and packed into ``--seq-len`` sequences (``dece_ds.data.StreamingPackedDataset``),
  split across data-parallel ranks without overlap (TP ranks of one DP group read the same rows). The run
  stops at ``--max-steps``, after ``--epochs`` of the corpus, or when the first rank runs out of data.
- Alpha: the ``continuous`` schedule is the default here: ``e = 1 + step / steps_per_epoch``, which is
  ``1 + tokens_seen / tokens_per_epoch`` because every optimizer step trains on the same number of
  tokens. ``steps_per_epoch`` is filled in from ``--tokens-per-epoch`` (default: one counting pass over
  the corpus by rank 0) unless the config's ``dece`` section sets it.
- Checkpoints: DeepSpeed's, with ``client_state`` holding the dece record and every rank's data
  position (gathered to the writer, since only one rank's ``client_state`` is saved). ``--resume``
  restores global_steps, optimizer, alpha and each rank's position: the resumed run trains on exactly the
  tokens the uninterrupted one would.
- Log: ``OUT/log.jsonl`` per optimizer step (loss, alpha, lr, tokens, tokens/s per rank, tokens seen,
  peak memory MiB); ``OUT/summary.json`` at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train as base  # noqa: E402  (launch/train.py: its helpers, not its loop)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from dece_ds.parallel.shutdown import finish_process  # noqa: E402

log0 = base.log0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--deepspeed_config", "--deepspeed-config", required=True, help="DeepSpeed JSON with a 'dece' section")
    p.add_argument("--data", nargs="+", required=True, help="json/jsonl/parquet/txt shards, in reading order")
    p.add_argument("--data-format", choices=["json", "parquet", "text"], help="default: from the file extension")
    p.add_argument("--text-field", default="text", help="text column (json/parquet)")
    p.add_argument("--shard-strategy", choices=["examples", "shards"], default="examples",
                   help="rows round-robin over DP ranks (balanced) or whole files per rank (cheaper IO)")
    p.add_argument("--tokens-per-epoch", type=int, help="corpus size in tokens (default: counted in one pass)")
    p.add_argument("--model", default="tiny-llama", help=f"local HF folder or one of {sorted(base.TINY_MODELS)}")
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
    p.add_argument("--resume", nargs="?", const="auto", help="resume from OUT/checkpoints (or this folder)")
    p.add_argument("--no-export", action="store_true")
    p.add_argument("--simulate-crash-after-step", type=int, help="testing: SIGKILL every rank after step N")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.prompt_field = args.completion_field = None  # what train.py's tokenizer helper reads
    return args


def read_json(path):
    with open(path) as f:
        return json.load(f)


def tokenizer_rows(args):
    """The first rows of the corpus, as dicts, for training a tiny model's BPE (rank 0 only)."""
    import datasets
    from dece_ds.data import infer_format
    fmt = args.data_format or infer_format(args.data)
    ds = datasets.load_dataset(fmt, data_files=[str(Path(p).resolve()) for p in args.data], split="train",
                               streaming=True)
    field = "text" if fmt == "text" else args.text_field
    return [{args.text_field: r[field]} for r, _ in zip(ds, range(args.tokenizer_rows))]


def peak_mem_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None):  # noqa: C901 - a launch script reads top to bottom
    args = parse_args(argv)
    from dece_ds.config import DeceConfig, DeceConfigError
    ds_config = read_json(args.deepspeed_config)
    section = dict(ds_config.get("dece") or {"enabled": False})
    section.setdefault("schedule", "continuous")  # this mode's default
    try:  # every other field is checked before any process-group work
        DeceConfig.from_dict({**section, "steps_per_epoch": section.get("steps_per_epoch") or 1})
    except DeceConfigError as e:
        sys.exit(f"error: {args.deepspeed_config}: {e}")
    base.init_distributed()
    from dece_ds.data import StreamingPackedDataset, count_tokens
    from dece_ds.integrations.deepspeed import dece_client_state
    from dece_ds.integrations.transformers import current_dece_loss

    out = Path(args.out)
    if base.is_main():
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    tok = base.build_tokenizer(args, tokenizer_rows(args) if base.is_main() else None, out)

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
               if base.is_main() else None]
        dist.broadcast_object_list(box, src=0)
        tokens_per_epoch = box[0]
    steps_per_epoch = max(1, tokens_per_epoch // tokens_per_step)
    if section.get("steps_per_epoch") is None:
        section["steps_per_epoch"] = steps_per_epoch
    ds_config = {**ds_config, "dece": section}
    from dece_ds.integrations.deepspeed import dece_config_for_engine
    try:
        dece = dece_config_for_engine(ds_config)
    except DeceConfigError as e:
        sys.exit(f"error: {args.deepspeed_config}: {e}")

    engine, _hf_ds, _ = base.build_engine(args, ds_config, len(tok))
    assert engine.dp_world_size == dp_world and engine.train_micro_batch_size_per_gpu() == micro_bs
    dp_rank = dist.get_rank(group=engine.data_parallel_group) if dp_world > 1 else 0
    stream = StreamingPackedDataset(args.data, tok, args.seq_len, text_field=args.text_field,
                                    data_format=args.data_format, dp_rank=dp_rank, dp_world=dp_world,
                                    strategy=args.shard_strategy)
    total_steps = args.max_steps or int(args.epochs * steps_per_epoch)
    log0(f"tokens/epoch={tokens_per_epoch} tokens/step={tokens_per_step} steps/epoch={steps_per_epoch} "
         f"total_steps={total_steps} dece={dece.to_ds_section() if dece.enabled else 'off'}")

    ckpt_dir = out / "checkpoints"
    client_state = base.resume(engine, args, out, ckpt_dir)
    if client_state is not None:
        positions = client_state.get("data", {}).get("positions")
        if not positions or len(positions) != world:
            sys.exit(f"error: --resume: the checkpoint holds no data position for {world} ranks")
        stream.load_state_dict(positions[dist.get_rank()])
        log0(f"data position restored: {stream.sequences} sequences read on rank 0")

    def save():
        positions = [None] * world
        dist.all_gather_object(positions, stream.state_dict())
        engine.save_checkpoint(str(ckpt_dir), tag=f"step{engine.global_steps}",
                               client_state={**dece_client_state(engine),
                                             "data": {"positions": positions, "tokens_per_epoch": tokens_per_epoch,
                                                      "seq_len": args.seq_len}})

    hook = current_dece_loss(engine.module)
    log_file = open(out / "log.jsonl", "a") if base.is_main() else None
    t_start, steps_done, tokens_done, end_of_data = time.perf_counter(), 0, 0, False
    first_loss = last_loss = None
    while engine.global_steps < total_steps:
        t0 = time.perf_counter()
        batches = [stream.next_batch(micro_bs) for _ in range(ga)]
        have = torch.tensor([0.0 if any(b is None for b in batches) else 1.0])
        dist.all_reduce(have, op=dist.ReduceOp.MIN)  # one rank out of data: every rank stops here
        if have.item() == 0:
            end_of_data = True
            log0(f"end of data at step {engine.global_steps}")
            break
        stats = torch.zeros(3, dtype=torch.float64)  # loss sum, micro-batches, tokens
        for b in batches:
            loss = engine(**b).loss
            engine.backward(loss)
            engine.step()
            stats += torch.tensor([loss.item(), 1.0, float(b["attention_mask"].sum())], dtype=torch.float64)
        dist.all_reduce(stats)
        dt = time.perf_counter() - t0
        step_tokens = int(stats[2].item() / tp)
        record = {"step": engine.global_steps, "loss": stats[0].item() / stats[1].item(),
                  "alpha": hook.last_alpha if hook is not None else None,
                  "lr": engine.get_lr()[0] if engine.get_lr() else None, "tokens": step_tokens,
                  "tokens_per_s_per_rank": step_tokens / dp_world / dt,
                  "tokens_seen": engine.global_steps * tokens_per_step,
                  "epoch_progress": engine.global_steps / steps_per_epoch,
                  "peak_mem_mib": peak_mem_mib(), "step_time_s": dt}
        steps_done, tokens_done = steps_done + 1, tokens_done + step_tokens
        first_loss = record["loss"] if first_loss is None else first_loss
        last_loss = record["loss"]
        if log_file:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
        if engine.global_steps >= total_steps or (args.save_every and engine.global_steps % args.save_every == 0):
            save()
        if args.simulate_crash_after_step == engine.global_steps:
            if log_file:
                log_file.close()
            os.kill(os.getpid(), signal.SIGKILL)
    if end_of_data:
        save()

    elapsed = time.perf_counter() - t_start
    summary = {"steps": engine.global_steps, "steps_this_run": steps_done, "tokens_this_run": tokens_done,
               "tokens_per_s_per_rank": tokens_done / dp_world / elapsed if elapsed > 0 else None,
               "first_loss": first_loss, "last_loss": last_loss,
               "final_alpha": hook.last_alpha if hook is not None else None, "end_of_data": end_of_data,
               "tokens_per_epoch": tokens_per_epoch, "steps_per_epoch": steps_per_epoch,
               "peak_mem_mib_rank0": peak_mem_mib(), "world": world, "tp": tp, "dp": dp_world}
    if log_file:
        log_file.close()
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log0("summary: " + json.dumps(summary))
    exported = None if args.no_export else base.export_safetensors(engine, tok, out)
    log0(f"done; log {out / 'log.jsonl'}" + (f"; model {exported}" if exported else ""))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    finish_process()  # no interpreter teardown: native comm threads can abort a finished run
