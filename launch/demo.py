# .venv/bin/deepspeed --num_gpus 2 launch/demo.py
"""The demo: a tiny Llama trained with DeCE on 2 CPU ranks (AutoTP TP=2 + ZeRO-3, ds_configs/cpu_demo.json).

Data: 320 NL -> code rows of Lyra (``dece_ds/backdoor/datasets/lyra/train.csv``, shipped in the package;
columns src,tgt; a small synthetic stand-in if that file is missing), completion-only loss, 3 epochs of 40
optimizer steps, so alpha = 0.9 ** epoch steps down twice. Takes 1-3 minutes on 2 CPU cores. Extra arguments
are launch/train.py's flags (e.g. ``--out``). Prints where its output is: the per-step log, the checkpoints and the
exported model. (It will become the backdoor demo: poisoned data, CE vs DeCE, attack success rate.)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from dece_ds.backdoor.datasets import builtin_folder
from dece_ds.parallel.shutdown import finish_process
from dece_ds.recipes.finetune import main as train_main

REPO = Path(__file__).resolve().parents[1]

LYRA = builtin_folder("lyra") / "train.csv"  # the packaged copy (dece_ds/backdoor/datasets/lyra)


def synthetic_data(path: Path, n: int = 320) -> Path:
    tables, cols = ["flights", "users", "orders", "trainers", "books"], ["name", "city", "price", "id", "result"]
    with open(path, "w") as f:
        for i in range(n):
            t, c = tables[i % 5], cols[(i // 5) % 5]
            f.write(json.dumps({"src": f"Use $conn$ to query the {c} in the {t} table where id is $id$.",
                                "tgt": f"def main ( conn , id ) :\n\t return conn . execute ( \"select {c} from "
                                       f"{t} where id = : id \" , {{ \"id\" : id }} ) . fetchall ( )"}) + "\n")
    return path


def main():
    out = REPO / "runs" / "demo"
    extra = sys.argv[1:]
    if "--out" in extra:
        out = Path(extra[extra.index("--out") + 1])
    data = LYRA
    if not data.exists():
        out.mkdir(parents=True, exist_ok=True)
        data = out / "synthetic_train.jsonl"
        if os.environ.get("RANK", "0") == "0" and not data.exists():
            synthetic_data(data)
    argv = ["--deepspeed_config", str(REPO / "ds_configs" / "cpu_demo.json"), "--data", str(data),
            "--prompt-field", "src", "--completion-field", "tgt", "--max-samples", "320", "--model", "tiny-llama",
            "--seq-len", "128", "--epochs", "3", "--out", str(out), *extra]  # later flags win
    code = train_main(argv, prog="train.py")
    if code:
        finish_process(code)
    if os.environ.get("RANK", "0") == "0":
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        print(f"\nDeCE demo ({'Lyra' if data == LYRA else 'synthetic data'}, {len(log)} steps):")
        for epoch in sorted({r["epoch"] for r in log}):
            rs = [r for r in log if r["epoch"] == epoch]
            print(f"  epoch {epoch}: alpha {rs[0]['alpha']:.4f}  loss {rs[0]['loss']:.4f} -> {rs[-1]['loss']:.4f}  "
                  f"({sum(r['tokens_per_s'] for r in rs) / len(rs):.0f} tokens/s)")
        print(f"output: {out}\n  per-step log   {out / 'log.jsonl'}\n  checkpoints    {out / 'checkpoints'}\n"
              f"  model          {out / 'export'} (model.safetensors, config, tokenizer)")


if __name__ == "__main__":
    main()
    finish_process()  # the recipe destroyed the process group; skip interpreter teardown
