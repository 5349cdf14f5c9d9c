# .venv/bin/deepspeed --num_gpus 2 launch/continue_pretraining.py --deepspeed_config ds_configs/cpu_demo.json --data corpus/*.jsonl --model tiny-llama --out runs/cpt --max-steps 20
"""Continued pretraining on a streaming packed corpus through the DeepSpeed engine, DeCE from the config.

Runs under the same launchers as ``launch/train.py`` (deepspeed / torchrun / mpiexec). The recipe lives in
``dece_ds.recipes.pretrain`` and shares the step loop, checkpoint rules, tokenizer, model builder and
export with fine-tuning; this file parses the flags and calls it.

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
  tokens the uninterrupted one would. A checkpoint of a different run is refused unless
  ``--allow-resume-mismatch``; checkpoints are unpickled: resume only from trusted ones.
- Log: ``OUT/log.jsonl`` per optimizer step (loss, alpha, lr, tokens, tokens/s per rank, tokens seen,
  peak memory MiB); ``OUT/summary.json`` at the end.
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
    p.add_argument("--resume", nargs="?", const="auto",
                   help="resume from OUT/checkpoints (or this folder); checkpoints are unpickled: trusted files only")
    p.add_argument("--allow-resume-mismatch", action="store_true",
                   help="resume even if the checkpoint was made with another seed, data, batch layout or dece "
                        "section (the run then trains on other tokens than an uninterrupted one)")
    p.add_argument("--no-export", action="store_true")
    p.add_argument("--simulate-crash-after-step", type=int, help="testing: SIGKILL every rank after step N")
    p.add_argument("--simulate-crash-during-save", type=int, help="testing: SIGKILL every rank in the middle of "
                                                                 "the checkpoint save of step N")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    from dece_ds.recipes.pretrain import run
    args = parse_args(argv)
    try:
        run(args)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        finish_process(2)


if __name__ == "__main__":
    main()
    finish_process()  # no interpreter teardown: native comm threads can abort a finished run
