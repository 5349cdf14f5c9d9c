# .venv/bin/deepspeed --num_gpus 2 launch/train.py --deepspeed_config ds_configs/cpu_demo.json --data ../shared/data/lyra/train.csv --prompt-field src --completion-field tgt --model tiny-llama --out runs/train
"""Causal-LM fine-tuning / continued pretraining through the DeepSpeed engine, with DeCE from the config.

The same script runs under every launcher (2 ranks here; N anywhere):
    .venv/bin/deepspeed --num_gpus 2 launch/train.py ARGS          (CPU too: --num_gpus is the rank count)
    .venv/bin/torchrun --nproc-per-node 2 launch/train.py ARGS
    .venv/bin/mpiexec -n 2 .venv/bin/python launch/train.py ARGS   (ranks from mpi4py; MASTER_PORT honoured)

Data: local json / jsonl / csv / parquet read with HF ``datasets``. With ``--prompt-field`` and
``--completion-field`` each row is ``prompt \\n completion <eos>`` and only the completion is
trained on (prompt positions get label -100); otherwise ``--text-field`` rows are concatenated and
packed into ``--seq-len`` blocks. Model: a local HF folder, or a named tiny config (``tiny-llama``:
Llama, hidden 64, 2 layers; ``tiny-llama-128``: hidden 128, 4 layers) with a byte-level BPE
tokenizer trained on the training text (no downloads anywhere). Under ZeRO-3 the model is built
through HF's zero.Init path (``HfDeepSpeedConfig``), which initialises the partitioned weights; the
first step's loss is checked against ln V to catch weights that were never initialised.

Output (``--out``): ``log.jsonl`` (one JSON line per optimizer step: loss, alpha, lr, tokens/s),
``tokenizer/``, ``checkpoints/`` (DeepSpeed's, every ``--save-every`` steps and at the end, with the
dece section and data position in ``client_state``), ``export/`` (model.safetensors + config +
tokenizer, loadable with ``AutoModelForCausalLM.from_pretrained``). ``--resume`` continues from the
latest checkpoint: global_steps, optimizer, alpha (a function of global_steps) and the data position
are restored, so the losses match an uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: local files and tiny configs only
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
import torch.distributed as dist

from dece_ds.parallel.shutdown import finish_process

TINY_MODELS = {
    "tiny-llama": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2),
    "tiny-llama-128": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2),
}
EOS, PAD = "<|endoftext|>", "<|pad|>"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
    p.add_argument("--resume", nargs="?", const="auto", help="resume from OUT/checkpoints (or this folder)")
    p.add_argument("--no-export", action="store_true", help="skip the safetensors export")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--simulate-crash-after-step", type=int, help="testing: SIGKILL every rank after step N")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # set by launchers
    return p.parse_args(argv)


def is_main() -> bool:
    return dist.get_rank() == 0


def log0(*msg):
    if not dist.is_initialized() or is_main():
        print("[train]", *msg, flush=True)


# ------------------------------------------------------------------------------------ config + dist

def load_ds_config(path):
    """The DeepSpeed config dict, its dece section validated before any process-group work."""
    from dece_ds.config import DeceConfigError
    from dece_ds.integrations.deepspeed import dece_config_for_engine
    with open(path) as f:
        ds_config = json.load(f)
    try:
        dece = dece_config_for_engine(ds_config)
    except DeceConfigError as e:
        sys.exit(f"error: {path}: {e}")
    return ds_config, dece


def init_distributed():
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    # auto_mpi_discovery: under mpiexec, ranks come from mpi4py; it sets MASTER_PORT from this argument.
    deepspeed.init_distributed(auto_mpi_discovery=True, distributed_port=int(os.environ.get("MASTER_PORT", 29500)),
                               verbose=False)
    if get_accelerator().device_name() == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks on one host share its cores; more threads than cores per rank only adds contention.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or dist.get_world_size())
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))


# -------------------------------------------------------------------------------------------- data

def read_rows(args):
    import datasets
    fmt = args.data_format or {".jsonl": "json", ".json": "json", ".csv": "csv",
                               ".parquet": "parquet"}.get(Path(args.data[0]).suffix.lower())
    if fmt is None:
        sys.exit(f"error: --data-format: cannot tell the format of {args.data[0]}")
    ds = datasets.load_dataset(fmt, data_files=[str(Path(p).resolve()) for p in args.data], split="train",
                               cache_dir=str(Path(args.out) / ".hf_datasets"))
    if args.max_samples:
        ds = ds.select(range(min(args.max_samples, len(ds))))
    fields = [f for f in (args.prompt_field, args.completion_field) if f] or [args.text_field]
    missing = [f for f in fields if f not in ds.column_names]
    if missing:
        sys.exit(f"error: --data: column(s) {missing} not in {ds.column_names}")
    return ds


def build_tokenizer(args, rows, out: Path):
    """Rank 0 makes (or copies) the tokenizer into OUT/tokenizer; every rank loads that copy."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    tok_dir = out / "tokenizer"
    if is_main() and not (tok_dir / "tokenizer.json").exists():
        source = args.tokenizer or (args.model if args.model not in TINY_MODELS else None)
        if source:
            tok = AutoTokenizer.from_pretrained(source, local_files_only=True)
        else:
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
            bpe = Tokenizer(models.BPE())
            bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            bpe.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(vocab_size=args.vocab_size, special_tokens=[EOS, PAD], show_progress=False,
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
            cols = [c for c in (args.prompt_field, args.completion_field) if c] or [args.text_field]
            bpe.train_from_iterator((str(r[c]) for r in rows for c in cols), trainer)
            tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=PAD)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.save_pretrained(tok_dir)
    dist.barrier()
    return AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)


def tokenize(args, rows, tok):
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
            sys.exit(f"error: --data: {len(stream)} tokens, fewer than one --seq-len block of {L}")
        ids = [stream[i * L:(i + 1) * L] for i in range(n)]
        labels, mask = ids, [[1] * L] * n
    return (torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long),
            torch.tensor(mask, dtype=torch.long))


def micro_batch(data, epoch, index, micro_bs, dp_rank, dp_world, seed):
    """Micro-batch ``index`` of ``epoch`` for this data-parallel rank: a deterministic function of its
    arguments, so a resumed run reads exactly the batches an uninterrupted one would."""
    order = np.random.default_rng(seed + epoch).permutation(len(data[0]))[dp_rank::dp_world]
    rows = torch.as_tensor(order[index * micro_bs:(index + 1) * micro_bs])
    return tuple(t[rows] for t in data)


# ------------------------------------------------------------------------------------------- model

def build_model(args, ds_config, vocab_size):
    """A local checkpoint or a named tiny config; under ZeRO-3 through HF's zero.Init path."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig
    from transformers.integrations import HfDeepSpeedConfig
    hf_ds = None
    if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        # Keeps HF's ZeRO-3 mode on while the model is built: weights are created partitioned and then
        # initialised gathered (transformers.integrations.deepspeed.initialize_weights_zero3). A bare
        # `with deepspeed.zero.Init(): from_config(...)` skips HF's _init_weights (torch defaults remain).
        hf_ds = HfDeepSpeedConfig(ds_config)
    torch.manual_seed(args.seed)
    if args.model in TINY_MODELS:
        padded = 64 * math.ceil(vocab_size / 64)  # even vocabulary shards for TP
        cfg = LlamaConfig(vocab_size=padded, max_position_embeddings=args.seq_len, tie_word_embeddings=False,
                          **TINY_MODELS[args.model])
        model = AutoModelForCausalLM.from_config(cfg)
    else:
        cfg = AutoConfig.from_pretrained(args.model, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True)
    return model, hf_ds, args.model in TINY_MODELS


def build_engine(args, ds_config, vocab_size):
    """The model (``build_model``) wrapped by ``dece_ds.initialize``: (engine, HF ZeRO-3 config to keep
    alive while training, whether the model was built from scratch)."""
    import dece_ds
    model, hf_ds, from_scratch = build_model(args, ds_config, vocab_size)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    optimizer = None if "optimizer" in ds_config else torch.optim.AdamW(model.parameters(), lr=args.lr)
    engine, _, _, _ = dece_ds.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                        if p.requires_grad],
                                         optimizer=optimizer, config=ds_config)
    return engine, hf_ds, from_scratch


def export_safetensors(engine, tok, out: Path):
    """Full weights (ZeRO-3 partitions and TP shards gathered) as OUT/export/model.safetensors."""
    from safetensors.torch import save_file
    partitioned = engine.zero_optimization_partition_weights() or engine.autotp_size() > 1
    state = engine._consolidated_16bit_state_dict() if partitioned else engine.module.state_dict()
    if is_main():
        path = out / "export"
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()},
                  str(path / "model.safetensors"), metadata={"format": "pt"})
        engine.module.config.save_pretrained(path)
        tok.save_pretrained(path)
        return path
    return None


# -------------------------------------------------------------------------------------------- main

def resume(engine, args, out: Path, ckpt_dir: Path):
    """``--resume``: load the latest checkpoint (``auto``: in ``ckpt_dir``, if any) and drop log lines of
    the steps that will be redone. Returns the checkpoint's ``client_state`` (None: nothing resumed)."""
    if not args.resume:
        return None
    load_from = ckpt_dir if args.resume == "auto" else Path(args.resume)
    if not (load_from / "latest").exists():
        if args.resume != "auto":
            sys.exit(f"error: --resume: no checkpoint in {load_from}")
        return None
    from dece_ds.integrations.deepspeed import check_dece_client_state
    path, client_state = engine.load_checkpoint(str(load_from))
    if path is None:
        sys.exit(f"error: --resume: could not load a checkpoint from {load_from}")
    check_dece_client_state(engine, client_state)
    log0(f"resumed from {path} at step {engine.global_steps}")
    if is_main() and (out / "log.jsonl").exists():  # steps after the checkpoint are redone: drop them
        kept = [line for line in (out / "log.jsonl").read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= engine.global_steps]
        (out / "log.jsonl").write_text("".join(line + "\n" for line in kept))
    return client_state or {}


def main(argv=None):
    args = parse_args(argv)
    ds_config, dece = load_ds_config(args.deepspeed_config)  # a bad dece section stops here
    init_distributed()
    from dece_ds.integrations.deepspeed import dece_client_state
    from dece_ds.integrations.transformers import current_dece_loss

    out = Path(args.out)
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    torch.manual_seed(args.seed)

    rows = read_rows(args) if is_main() else None  # rank 0 fills the datasets cache first
    dist.barrier()
    rows = rows if rows is not None else read_rows(args)
    tok = build_tokenizer(args, rows, out)
    data = tokenize(args, rows, tok)

    engine, _hf_ds, from_scratch = build_engine(args, ds_config, len(tok))
    dp_world = engine.dp_world_size
    dp_rank = dist.get_rank(group=engine.data_parallel_group) if dp_world > 1 else 0
    micro_bs, ga = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    steps_per_epoch = len(data[0]) // (micro_bs * dp_world * ga)
    if steps_per_epoch == 0:
        sys.exit(f"error: --data: {len(data[0])} rows, fewer than one optimizer step of "
                 f"{micro_bs * dp_world * ga}")
    total_steps = args.max_steps or int(args.epochs * steps_per_epoch)
    if dece.enabled and dece.steps_per_epoch not in (None, steps_per_epoch):
        log0(f"note: dece.steps_per_epoch={dece.steps_per_epoch}, but this data gives {steps_per_epoch} "
             "optimizer steps per epoch; alpha follows dece.steps_per_epoch")

    ckpt_dir = out / "checkpoints"
    resume(engine, args, out, ckpt_dir)

    world = dist.get_world_size()
    bar = None
    if is_main() and not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=total_steps, initial=engine.global_steps, desc="train", dynamic_ncols=True)
    log_file = open(out / "log.jsonl", "a") if is_main() else None
    log0(f"world={world} dp={dp_world} tp={engine.autotp_size()} micro_bs={micro_bs} ga={ga} "
         f"steps/epoch={steps_per_epoch} total_steps={total_steps} loss={engine.module.loss_function!r}")

    hook = current_dece_loss(engine.module)
    checked_init = engine.global_steps > 0 or not from_scratch
    while engine.global_steps < total_steps:
        step = engine.global_steps
        t0 = time.perf_counter()
        stats = torch.zeros(3, dtype=torch.float64)  # loss sum, micro-batches, tokens
        for m in range(ga):
            ids, labels, mask = micro_batch(data, step // steps_per_epoch, (step % steps_per_epoch) * ga + m,
                                            micro_bs, dp_rank, dp_world, args.seed)
            loss = engine(input_ids=ids, attention_mask=mask, labels=labels).loss
            engine.backward(loss)
            engine.step()
            stats += torch.tensor([loss.item(), 1.0, float(mask.sum())], dtype=torch.float64)
        dist.all_reduce(stats)  # TP ranks repeat their DP group's numbers: the ratio is the DP mean
        tp = world // dp_world
        dt = time.perf_counter() - t0
        record = {"step": engine.global_steps, "epoch": step // steps_per_epoch + 1,
                  "loss": stats[0].item() / stats[1].item(),
                  "alpha": hook.last_alpha if hook is not None else None,
                  "lr": engine.get_lr()[0] if engine.get_lr() else None,
                  "tokens": int(stats[2].item() / tp), "tokens_per_s": stats[2].item() / tp / dt,
                  "step_time_s": dt}
        if not checked_init:
            checked_init = True
            bound = math.log(engine.module.config.vocab_size) + 1.0
            if record["loss"] > bound:
                log0(f"WARNING: first loss {record['loss']:.3f} > ln V + 1 = {bound:.3f}: the weights look "
                     "uninitialised (check how the model was built under zero.Init)")
        if log_file:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
        if bar:
            bar.set_postfix(loss=f"{record['loss']:.4f}", alpha=record["alpha"],
                            tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
        done = engine.global_steps >= total_steps
        if done or (args.save_every and engine.global_steps % args.save_every == 0):
            engine.save_checkpoint(str(ckpt_dir), tag=f"step{engine.global_steps}",
                                   client_state={**dece_client_state(engine),
                                                 "train": {"steps_per_epoch": steps_per_epoch, "seed": args.seed,
                                                           "data": [str(p) for p in args.data]}})
        if args.simulate_crash_after_step == engine.global_steps:
            if log_file:
                log_file.close()
            os.kill(os.getpid(), signal.SIGKILL)

    if bar:
        bar.close()
    if log_file:
        log_file.close()
    exported = None if args.no_export else export_safetensors(engine, tok, out)
    log0(f"done: {engine.global_steps} steps; log {out / 'log.jsonl'}; checkpoints {ckpt_dir}"
         + (f"; model {exported}" if exported else ""))
    dist.barrier()
    dist.destroy_process_group()  # without it, ranks can abort at interpreter shutdown


if __name__ == "__main__":
    main()
    finish_process()  # no interpreter teardown: native comm threads can abort a finished run
