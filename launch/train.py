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

The recipe lives in ``dece_ds.recipes.finetune``; this file parses the flags and calls it.

Output (``--out``): ``log.jsonl`` (one JSON line per optimizer step: loss, alpha, lr, tokens/s),
``tokenizer/``, ``checkpoints/`` (DeepSpeed's, every ``--save-every`` steps and at the end, with the
dece section and data position in ``client_state``), ``export/`` (model.safetensors + config +
tokenizer, loadable with ``AutoModelForCausalLM.from_pretrained``). ``--resume`` continues from the
latest checkpoint: global_steps, optimizer, alpha (a function of global_steps) and the data position
are restored, so the losses match an uninterrupted run; a checkpoint of a different run (seed, data,
batch layout, world size, dece section) is refused unless ``--allow-resume-mismatch``. Checkpoints are
unpickled by DeepSpeed's loader: resume only from checkpoints you trust.

Poison audit (docs/audit.md): with ``"audit": {"enabled": true, "out": DIR}`` in the ``dece`` section each
row's per-token ``log p_t`` is recorded under its row index (``audit_record.json`` in ``--out`` points at
DIR; ``dece-ds audit OUT`` scores it); ``--drop-rows OUT/audit.jsonl`` retrains without the flagged rows.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: local files and tiny configs only
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dece_ds.parallel.shutdown import finish_process
from dece_ds.recipes.checkpoint import RecipeError
from dece_ds.recipes.model import TINY_MODELS


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
    p.add_argument("--resume", nargs="?", const="auto",
                   help="resume from OUT/checkpoints (or this folder); checkpoints are unpickled: trusted files only")
    p.add_argument("--allow-resume-mismatch", action="store_true",
                   help="resume even if the checkpoint was made with another seed, data, batch layout or dece "
                        "section (the run then trains on other batches than an uninterrupted one)")
    p.add_argument("--drop-rows", metavar="AUDIT.jsonl",
                   help="drop the rows a `dece-ds audit` file flagged (its 'flagged' rows; ids = row indices of --data)")
    p.add_argument("--no-export", action="store_true", help="skip the safetensors export")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--simulate-crash-after-step", type=int, help="testing: SIGKILL every rank after step N")
    p.add_argument("--simulate-crash-during-save", type=int, help="testing: SIGKILL every rank in the middle of "
                                                                 "the checkpoint save of step N")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # set by launchers
    return p.parse_args(argv)


def main(argv=None):
    from dece_ds.recipes.finetune import run
    args = parse_args(argv)
    try:
        run(args)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        finish_process(2)


if __name__ == "__main__":
    main()
    finish_process()  # no interpreter teardown: native comm threads can abort a finished run
