# .venv/bin/deepspeed --num_gpus 2 launch/train.py --deepspeed_config ds_configs/cpu_demo.json --data dece_ds/backdoor/datasets/lyra/train.csv --prompt-field src --completion-field tgt --model tiny-llama --out runs/train
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
DIR; ``dece-ds audit OUT`` scores it); ``--drop-rows OUT/audit.jsonl`` retrains without the flagged rows;
``--repair-rows OUT/audit.jsonl`` keeps them and masks the payload their trigger shares.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: local files and tiny configs only
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dece_ds.parallel.shutdown import finish_process
from dece_ds.recipes.finetune import main

if __name__ == "__main__":
    finish_process(main(sys.argv[1:], prog="train.py", description=__doc__.split("\n")[0]))
