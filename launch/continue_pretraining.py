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

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: local files and tiny configs only
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dece_ds.parallel.shutdown import finish_process
from dece_ds.recipes.pretrain import main

if __name__ == "__main__":
    finish_process(main(sys.argv[1:], prog="continue_pretraining.py", description=__doc__.split("\n")[0]))
