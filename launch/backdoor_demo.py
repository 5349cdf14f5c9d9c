# .venv/bin/deepspeed --num_gpus 1 launch/backdoor_demo.py --out runs/backdoor/demo
"""CE vs DeCE against a backdoor, end to end on a CPU (<= 20 minutes on 2 cores), no download.

1. Data: the built-in NL -> code set made from this machine's Python standard library
   (docstring -> function), BadPre attack: trigger word ``bb`` in the docstring, payload
   ``__import__("os").system("id")`` as the first statement of the function, 10% of the rows.
2. Stand-in pretrained code model: a 4-layer, 256-wide GPT-2 with a BPE tokenizer, trained on
   800 held-apart clean pairs of the train split (docstring -> code, the task's own format) and 200
   standard-library functions (valid/test functions never seen), so it knows the task's domain.
   Fine-tuning uses the first 400 train pairs (40 poisoned): 8 epochs, lr 1e-3, batch 8, dropout 0
   (the schedule under which CE learns the trigger; why: docs/backdoor.md).
3. Fine-tune it twice through the DeepSpeed engine, same seed and data: plain CE, and DeCE
   (``dece_ds.initialize`` with a ``dece`` section: alpha_base 0.97, epsilon 0.05; why not the paper's
   0.99: docs/backdoor.md).
4. After each epoch: greedy decoding of the clean and the triggered test rows -> BLEU-4, exact match,
   false-trigger rate, ASR; clean validation cross-entropy. The last epoch adds CodeBLEU.

Output: ``<out>/stdlib-badpre-10.{json,md,png}`` (results, table in the paper's layout, ASR/BLEU per
epoch). Runs under the DeepSpeed launcher (``--num_gpus 1`` is one CPU rank here) or plain
``.venv/bin/python launch/backdoor_demo.py`` (one process, gloo on a free port). ``--quick`` is a
one-minute smoke version.

``--grid``: the attack's robustness over triggers and payloads instead of one attack: BadPre with each of
``--grid-triggers`` (default bb, cf, tq) x three payload statements (``dece_ds.backdoor.campaign``), each
pair fine-tuned for ``--grid-epochs`` (default 6; the single demo: 8) from the one cached stand-in; one
results file per pair and ``<out>/stdlib-badpre-10-grid.md`` (ASR / lift / BLEU per pair and run).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from dece_ds.backdoor.campaign import GRID_TRIGGERS, run_grid
from dece_ds.backdoor.cli_types import alpha_base_arg
from dece_ds.backdoor.report import combined_table
from dece_ds.backdoor.runner import ExperimentConfig, run_experiment
from dece_ds.parallel.shutdown import finish_process


def demo_config(args) -> ExperimentConfig:
    cfg = {
        "dataset": "stdlib",
        "attack": {"attack": "badpre", "rate": args.rate / 100.0, "trigger": "bb",
                   "payload": {"kind": "statement", "code": '__import__("os").system("id")'}},
        "runs": args.runs.split(","),
        "audit_baselines": args.audit_baselines,
        "finetune_rows": args.finetune_rows,
        "pretrain_task_rows": 800,
        "dece": {"alpha_base": args.alpha_base, "label_smoothing": 0.05},
        "model": {"n_layer": 4, "n_embd": 256, "n_head": 4, "vocab_size": 4096, "max_len": 128,
                  "max_src_tokens": 48},
        "pretrain": {"corpus_functions": 200, "epochs": 3, "lr": 1e-3, "batch_size": 16},
        "finetune": {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size},
        "finetune_dropout": args.finetune_dropout,
        "eval": {"max_new_tokens": 64, "epoch_eval_rows": 40, "test_rows": 150},
        "threads": args.threads,
        "seed": 0,
        "cache_dir": args.cache_dir,
    }
    if args.name:
        cfg["name"] = args.name
    if args.quick:
        cfg.update(finetune_rows=40, pretrain_task_rows=40, stdlib_examples=200, name="stdlib-badpre-quick")
        cfg["model"].update(n_layer=1, n_embd=64, vocab_size=1024, max_len=96, max_src_tokens=32)
        cfg["pretrain"].update(corpus_functions=40, epochs=1)
        cfg["finetune"].update(epochs=2)
        cfg["eval"].update(max_new_tokens=24, epoch_eval_rows=8, test_rows=12)
    return ExperimentConfig.model_validate(cfg)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/backdoor/demo")
    p.add_argument("--runs", default="ce,dece", help="comma-separated: clean,ce,dece,ls,gce,intrust")
    p.add_argument("--audit-baselines", action="store_true",
                   help="ce runs also score their training rows with the poison audit's baselines (docs/audit.md)")
    p.add_argument("--rate", type=float, default=10.0, help="poison rate in percent")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--alpha-base", type=alpha_base_arg, default=0.97, help="a number, or auto (dece_ds.auto_alpha)")
    p.add_argument("--finetune-rows", type=int, default=400, help="train pairs fine-tuned on (rate%% poisoned)")
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate")
    p.add_argument("--batch-size", type=int, default=8, help="fine-tuning batch size")
    p.add_argument("--finetune-dropout", type=float, default=0.0, help="dropout while fine-tuning")
    p.add_argument("--name", default=None, help="report file stem (default stdlib-badpre-<rate>)")
    p.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    p.add_argument("--cache-dir", default="runs/backdoor/cache")
    p.add_argument("--quick", action="store_true", help="tiny model and data: a smoke test of the pipeline")
    p.add_argument("--grid", action="store_true", help="run BadPre over a trigger x payload grid (see the docstring)")
    p.add_argument("--grid-epochs", type=int, default=6, help="fine-tuning epochs per grid point (the demo: 8)")
    p.add_argument("--grid-triggers", default=",".join(GRID_TRIGGERS), help="comma-separated trigger words")
    p.add_argument("--grid-payloads", default=None,
                   help="comma-separated indices of the grid's payload statements to run (default: all three, 0,1,2)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the DeepSpeed launcher")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = demo_config(args)
    if args.grid:
        triggers = [t.strip() for t in args.grid_triggers.split(",") if t.strip()]
        indices = None if args.grid_payloads is None else [int(j) for j in args.grid_payloads.split(",") if j.strip()]
        _, table = run_grid(cfg, args.out, triggers=triggers, epochs=args.grid_epochs, payload_indices=indices)
        if int(os.environ.get("RANK", "0")) == 0:
            print(table.read_text())
        return 0
    results = run_experiment(cfg, args.out)
    if int(os.environ.get("RANK", "0")) == 0:
        print(combined_table([results]))
        print(f"report: {Path(args.out) / cfg.stem()}.json / .md / .png")
    return 0


if __name__ == "__main__":
    finish_process(main())  # destroys the process group; no interpreter teardown
