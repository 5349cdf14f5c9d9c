"""Fine-tuning (or packed pretraining) on a local data file through the DeepSpeed engine, DeCE from the config.

``run(args)`` takes the flags of ``launch/train.py``. Data: local json / jsonl / csv / parquet read with
HF ``datasets``. With ``prompt_field`` and ``completion_field`` each row is ``prompt \\n completion <eos>``
and only the completion is trained on (prompt positions get label -100); otherwise ``text_field`` rows
are concatenated and packed into ``seq_len`` blocks. The batch of every step is a deterministic function
of (seed, epoch, step, data-parallel rank), so a resumed run reads exactly the batches an uninterrupted
one would.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..audit.recorder import ROW_IDS_KWARG
from .checkpoint import RUN_KEY, RecipeError, resume, save_checkpoint
from .cli import add_resume_and_testing_flags, run_command
from .config_io import load_ds_config
from .loop import train_steps
from .model import TINY_MODELS, build_engine, build_tokenizer, export_safetensors
from .run_log import RunLog
from .runtime import init_distributed, is_main, make_log0

log0 = make_log0("train")


def read_rows(args):
    import datasets
    fmt = args.data_format or {".jsonl": "json", ".json": "json", ".csv": "csv",
                               ".parquet": "parquet"}.get(Path(args.data[0]).suffix.lower())
    if fmt is None:
        raise RecipeError(f"--data-format: cannot tell the format of {args.data[0]}")
    missing = [p for p in args.data if not Path(p).is_file()]
    if missing:
        raise RecipeError(f"--data: no such file(s): {missing}")
    ds = datasets.load_dataset(fmt, data_files=[str(Path(p).resolve()) for p in args.data], split="train",
                               cache_dir=str(Path(args.out) / ".hf_datasets"))
    if args.max_samples:
        ds = ds.select(range(min(args.max_samples, len(ds))))
    fields = [f for f in (args.prompt_field, args.completion_field) if f] or [args.text_field]
    missing = [f for f in fields if f not in ds.column_names]
    if missing:
        raise RecipeError(f"--data: column(s) {missing} not in {ds.column_names}")
    return ds


def tokenize(args, rows, tok) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[n, seq_len] input_ids, labels (-100 where not trained), attention_mask."""
    L, eos, pad = args.seq_len, tok.eos_token_id, tok.pad_token_id
    ids, labels, mask = [], [], []
    if args.prompt_field and args.completion_field:
        for r in rows:
            p = tok(str(r[args.prompt_field]) + "\n", add_special_tokens=False)["input_ids"]
            c = tok(str(r[args.completion_field]), add_special_tokens=False)["input_ids"] + [eos]
            x = (p + c)[:L]
            y = ([-100] * len(p) + c)[:L]
            ids.append(x + [pad] * (L - len(x)))
            labels.append(y + [-100] * (L - len(y)))
            mask.append([1] * len(x) + [0] * (L - len(x)))
    else:
        stream = []
        for r in rows:
            stream += tok(str(r[args.text_field]), add_special_tokens=False)["input_ids"] + [eos]
        n = len(stream) // L
        if n == 0:
            raise RecipeError(f"--data: {len(stream)} tokens, fewer than one --seq-len block of {L}")
        ids = [stream[i * L:(i + 1) * L] for i in range(n)]
        labels, mask = ids, [[1] * L] * n
    return (torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long),
            torch.tensor(mask, dtype=torch.long))


def micro_batch_rows(n_rows, epoch, index, micro_bs, dp_rank, dp_world, seed) -> torch.Tensor:
    """Positions (into the tokenized data) of micro-batch ``index`` of ``epoch`` for this data-parallel rank."""
    order = np.random.default_rng(seed + epoch).permutation(n_rows)[dp_rank::dp_world]
    return torch.as_tensor(order[index * micro_bs:(index + 1) * micro_bs])


def micro_batch(data, epoch, index, micro_bs, dp_rank, dp_world, seed):
    """Micro-batch ``index`` of ``epoch`` for this data-parallel rank (a deterministic function of its
    arguments): ``(input_ids, labels, attention_mask)``."""
    rows = micro_batch_rows(len(data[0]), epoch, index, micro_bs, dp_rank, dp_world, seed)
    return tuple(t[rows] for t in data)


def drop_rows(data, row_ids: torch.Tensor, audit_file) -> tuple[tuple, torch.Tensor, list[int]]:
    """``--drop-rows AUDIT.jsonl``: remove the rows the audit flagged (ids = row indices of the data as read)."""
    from ..audit.report import flagged_rows
    flagged = set(flagged_rows(audit_file))
    keep = torch.as_tensor([i for i, r in enumerate(row_ids.tolist()) if r not in flagged], dtype=torch.long)
    dropped = sorted(flagged & set(row_ids.tolist()))
    return tuple(t[keep] for t in data), row_ids[keep], dropped


def repair_rows(data, row_ids: torch.Tensor, audit_file) -> tuple[tuple, torch.Tensor, dict[str, Any]]:
    """``--repair-rows AUDIT.jsonl``: keep the flagged rows but mask the payload their trigger shares
    (``dece_ds.audit.repair``); flagged rows without a named payload are dropped -> (data, row ids, a summary:
    ``repaired``, ``dropped``, ``masked_tokens``)."""
    from ..audit.repair import repair_from_file
    keys = ("input_ids", "labels", "attention_mask")   # tokenize's order
    fixed, kept, plan, masked = repair_from_file(dict(zip(keys, data)), audit_file, row_ids.tolist())
    summary = {"repaired": sorted(plan.payloads), "dropped": plan.drop, "masked_tokens": masked}
    return tuple(fixed[k] for k in keys), torch.as_tensor(kept, dtype=torch.long), summary


def run_identity(args, *, steps_per_epoch: int, world: int, dp_world: int, micro_bs: int, ga: int) -> dict[str, Any]:
    """What decides the batches of every step: a resume must see the same values."""
    return {"seed": args.seed, "data": [str(Path(p).resolve()) for p in args.data], "steps_per_epoch": steps_per_epoch,
            "world_size": world, "dp_world_size": dp_world, "micro_batch_size": micro_bs,
            "gradient_accumulation_steps": ga, "seq_len": args.seq_len, "max_samples": args.max_samples,
            "fields": [args.prompt_field, args.completion_field, args.text_field],
            **({"drop_rows": str(Path(args.drop_rows).resolve())} if getattr(args, "drop_rows", None) else {}),
            **({"repair_rows": str(Path(args.repair_rows).resolve())} if getattr(args, "repair_rows", None) else {})}


def run(args) -> Path:
    """Train as the flags say; returns the output folder. Raises ``RecipeError`` for bad input."""
    from ..integrations.deepspeed import dece_client_state
    ds_config, dece = load_ds_config(args.deepspeed_config)  # a bad dece section stops here, once
    init_distributed()
    out = Path(args.out)
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    torch.manual_seed(args.seed)

    rows = read_rows(args) if is_main() else None  # rank 0 fills the datasets cache first
    dist.barrier()
    rows = rows if rows is not None else read_rows(args)
    cols = [c for c in (args.prompt_field, args.completion_field) if c] or [args.text_field]
    tok = build_tokenizer(args.model, args.tokenizer, args.vocab_size,
                          lambda: (str(r[c]) for r in rows for c in cols), out)
    data = tokenize(args, rows, tok)
    audit = dece.audit if dece.enabled and dece.audit is not None and dece.audit.enabled else None
    if audit is not None and not (args.prompt_field and args.completion_field):
        raise RecipeError("dece.audit: needs one row per sequence (--prompt-field and --completion-field); "
                          "packed --text-field blocks mix rows")
    row_ids = torch.arange(len(data[0]))   # stable ids: the row index of the data as read
    if getattr(args, "drop_rows", None):
        data, row_ids, dropped = drop_rows(data, row_ids, args.drop_rows)
        log0(f"--drop-rows {args.drop_rows}: dropped {len(dropped)} flagged row(s), {len(row_ids)} left")
    elif getattr(args, "repair_rows", None):
        data, row_ids, fixed = repair_rows(data, row_ids, args.repair_rows)
        log0(f"--repair-rows {args.repair_rows}: masked the payload of {len(fixed['repaired'])} flagged row(s) "
             f"({fixed['masked_tokens']} tokens), dropped {len(fixed['dropped'])}, {len(row_ids)} left")

    engine, _hf_ds, from_scratch = build_engine(args.model, ds_config, dece, vocab_size=len(tok),
                                                seq_len=args.seq_len, seed=args.seed, lr=args.lr,
                                                gradient_checkpointing=args.gradient_checkpointing)
    world, dp_world = dist.get_world_size(), engine.dp_world_size
    dp_rank = dist.get_rank(group=engine.data_parallel_group) if dp_world > 1 else 0
    micro_bs, ga = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    steps_per_epoch = len(data[0]) // (micro_bs * dp_world * ga)
    if steps_per_epoch == 0:
        raise RecipeError(f"--data: {len(data[0])} rows, fewer than one optimizer step of {micro_bs * dp_world * ga}")
    total_steps = args.max_steps or int(args.epochs * steps_per_epoch)
    if dece.enabled and dece.steps_per_epoch not in (None, steps_per_epoch):
        log0(f"note: dece.steps_per_epoch={dece.steps_per_epoch}, but this data gives {steps_per_epoch} "
             "optimizer steps per epoch; alpha follows dece.steps_per_epoch")

    ckpt_dir = out / "checkpoints"
    identity = run_identity(args, steps_per_epoch=steps_per_epoch, world=world, dp_world=dp_world,
                            micro_bs=micro_bs, ga=ga)
    resume(engine, args.resume, ckpt_dir, identity=identity, allow_mismatch=args.allow_resume_mismatch,
           log_path=out / "log.jsonl", log0=log0)
    if audit is not None:
        from ..audit.recorder import keep_steps_before, write_meta
        if is_main():
            dropped = keep_steps_before(audit.out, engine.global_steps)
            if dropped:
                log0(f"{audit.out}: dropped {dropped} audit record(s) of steps >= {engine.global_steps} (redone)")
            write_meta(audit.out, out, {"tokenizer": str((out / "tokenizer").resolve()),
                                        "data": [str(Path(p).resolve()) for p in args.data],
                                        "data_format": args.data_format, "max_samples": args.max_samples,
                                        "prompt_field": args.prompt_field,
                                        "completion_field": args.completion_field, "seq_len": args.seq_len})
        dist.barrier()
    log0(f"world={world} dp={dp_world} tp={engine.autotp_size()} micro_bs={micro_bs} ga={ga} "
         f"steps/epoch={steps_per_epoch} total_steps={total_steps} loss={engine.module.loss_function!r}")

    def micro_batches(step: int):
        batches = []
        for m in range(ga):
            rows = micro_batch_rows(len(data[0]), step // steps_per_epoch, (step % steps_per_epoch) * ga + m,
                                    micro_bs, dp_rank, dp_world, args.seed)
            ids, labels, mask = (t[rows] for t in data)
            batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
            if audit is not None:  # popped by the DeCE hook before the model's forward (dece_ds.audit)
                batch[ROW_IDS_KWARG] = row_ids[rows]
            batches.append(batch)
        return batches

    checked_init = [engine.global_steps > 0 or not from_scratch]

    def extra(record, step):
        if not checked_init[0]:
            checked_init[0] = True
            bound = math.log(engine.module.config.vocab_size) + 1.0
            if record["loss"] > bound:
                log0(f"WARNING: first loss {record['loss']:.3f} > ln V + 1 = {bound:.3f}: the weights look "
                     "uninitialised (check how the model was built under zero.Init)")
        return {"epoch": step // steps_per_epoch + 1, "tokens_per_s": record["tokens"] / record["step_time_s"]}

    def save(crash_mid_save: bool = False):
        save_checkpoint(engine, ckpt_dir, {**dece_client_state(engine), RUN_KEY: identity}, crash_mid_save=crash_mid_save)

    bar = None
    if is_main() and not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=total_steps, initial=engine.global_steps, desc="train", dynamic_ncols=True)
    run_log = RunLog(out / "log.jsonl" if is_main() else None)
    try:
        train_steps(engine, micro_batches, total_steps=total_steps, run_log=run_log, save=save,
                    save_every=args.save_every, tp=world // dp_world, extra=extra,
                    crash_after_step=args.simulate_crash_after_step,
                    crash_mid_save_step=args.simulate_crash_during_save, progress=bar)
    finally:
        run_log.close()
        if bar:
            bar.close()
    exported = None if args.no_export else export_safetensors(engine, tok, out)
    log0(f"done: {engine.global_steps} steps; log {out / 'log.jsonl'}; checkpoints {ckpt_dir}"
         + (f"; model {exported}" if exported else ""))
    dist.barrier()
    dist.destroy_process_group()  # without it, ranks can abort at interpreter shutdown
    return out


def parse_args(argv=None, prog: str | None = None, description: str | None = None):
    """The command-line flags of the launcher (its ``--help``)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--deepspeed_config", "--deepspeed-config", required=True, help="DeepSpeed JSON with a 'dece' section")
    p.add_argument("--data", nargs="+", required=True, help="json/jsonl/csv/parquet files")
    p.add_argument("--data-format", choices=["json", "csv", "parquet"], help="default: from the file extension")
    p.add_argument("--prompt-field", help="prompt column (with --completion-field: train on completions only)")
    p.add_argument("--completion-field", help="completion column")
    p.add_argument("--text-field", default="text", help="text column for packed pretraining (default: text)")
    p.add_argument("--max-samples", type=int, help="use the first N rows only")
    p.add_argument("--model", default="tiny-llama", help=f"local HF folder or one of {sorted(TINY_MODELS)}")
    p.add_argument("--tokenizer", help="local tokenizer folder (default: the model's, or a BPE trained here)")
    p.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary size for tiny models")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (overrides --epochs)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW lr if the config has no optimizer section")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (large models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/train")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N optimizer steps (0: at the end)")
    flagged = p.add_mutually_exclusive_group()
    flagged.add_argument("--drop-rows", metavar="AUDIT.jsonl",
                         help="drop the rows a `dece-ds audit` file flagged (its 'flagged' rows; ids = row indices "
                              "of --data)")
    flagged.add_argument("--repair-rows", metavar="AUDIT.jsonl",
                         help="keep the rows a `dece-ds audit` file flagged but never train on the payload their "
                              "trigger shares (masked); flagged rows without a named payload are dropped")
    p.add_argument("--no-export", action="store_true", help="skip the safetensors export")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    add_resume_and_testing_flags(p, trains_on="batches")
    return p.parse_args(argv)


def main(argv=None, prog: str | None = None, description: str | None = None) -> int:
    """Parse the flags and run; bad input prints one ``error:`` line. Returns the exit code (0 or 2)."""
    return run_command(run, parse_args(argv, prog, description))
