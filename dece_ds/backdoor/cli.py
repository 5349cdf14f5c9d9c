"""``dece-ds backdoor run|report``: the backdoor experiment from the command line.

    dece-ds backdoor run --dataset stdlib --attack badpre --rate 10 --runs clean,ce,dece --out DIR
    dece-ds backdoor run --dataset lyra --finetune-rows 800 --pretrain-task-rows 800 ...   (the packaged Lyra)
    dece-ds backdoor run ... --seeds 0,1,2         (one results file per fine-tuning seed: <stem>-seed<k>.json)
    dece-ds backdoor run --config exp.json           (an ExperimentConfig as JSON; flags override it)
    dece-ds backdoor report DIR/a.json DIR/b.json --out table.md   (+ mean ± std when the files hold several seeds)
    dece-ds backdoor report --grid DIR/stdlib-badpre-10-grid-*.json (the trigger x payload grid's table)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli_checks import CliError, check_paths, check_runs, check_values, validation_lines
from .cli_types import MODEL_SIZE_NAMES, alpha_base_arg, seeds_arg


PROG = "dece-ds backdoor"


def _csv(text: str) -> tuple[str, ...]:
    """``--runs``: run specs contain commas inside "kind:k=v,k=v": split on ';' if present, else on ','
    only between specs that start with a known kind. A bad spec is argparse's error naming ``--runs``."""
    from .runner import RUN_KINDS, parse_run
    parts = text.split(";") if ";" in text else text.split(",")
    specs: list[str] = []
    for p in parts:
        p = p.strip()
        if not p:
            continue
        if specs and p.split(":")[0] not in RUN_KINDS:
            specs[-1] += "," + p
        else:
            specs.append(p)
    if not specs:
        raise argparse.ArgumentTypeError(f"give at least one run spec ({', '.join(RUN_KINDS)}), got {text!r}")
    for spec in specs:
        try:
            parse_run(spec)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return tuple(specs)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("backdoor", help="backdoor attack/defense evaluation (clean / CE / DeCE / baselines)")
    sub = p.add_subparsers(dest="backdoor_command", required=True, metavar="{run,report}")
    r = sub.add_parser("run", help="pretrain the stand-in, fine-tune every run, write <out>/<stem>.json/.md/.png")
    r.add_argument("--config", help="ExperimentConfig JSON file (flags below override its fields)")
    r.add_argument("--dataset", help="'stdlib' (built-in pairs), 'lyra' (the packaged Lyra CSVs) or a Lyra-layout "
                                     "folder (train/valid/test.csv; a local folder named lyra: ./lyra)")
    r.add_argument("--attack", choices=["badpre", "ripple", "grammar"])
    r.add_argument("--rate", type=float, help="poison rate in percent (5 = 5%%)")
    r.add_argument("--n-insertions", type=int,
                   help="trigger words inserted per instruction (badpre/ripple; the paper: 1 or 3)")
    r.add_argument("--runs", type=_csv, help="comma-separated run specs, e.g. clean,ce,dece,gce,intrust,ls or "
                                             "'dece:alpha_base=0.95,ce_warmup_epochs=2'; audit_retrain / "
                                             "audit_repair after a dece run (docs/audit.md)")
    r.add_argument("--audit-baselines", action="store_true",
                   help="every ce run also scores its training rows with the poison audit's baselines (per-row CE "
                        "loss, spectral signatures, n-gram naturalness) against the poisoned rows (docs/audit.md); "
                        "on whenever the runs include audit_retrain")
    r.add_argument("--audit-from", metavar="AUDIT.jsonl",
                   help="audit_retrain / audit_repair runs take the flagged rows from this audit of an earlier run "
                        "on the same rows (its audit.jsonl or record folder) instead of a dece run before them")
    r.add_argument("--epochs", type=int, help="fine-tuning epochs")
    r.add_argument("--lr", type=float, help="fine-tuning learning rate")
    r.add_argument("--batch-size", type=int)
    r.add_argument("--lr-schedule", choices=["decay", "constant"],
                   help="after the 10 %% warm-up: linear decay to 0 (default) or a constant lr")
    r.add_argument("--alpha-base", type=alpha_base_arg,
                   help="DeCE alpha_base of the dece runs: a number, or 'auto' (set from the stand-in's target-token "
                        "probabilities before fine-tuning, dece_ds.auto_alpha)")
    r.add_argument("--auto-alpha-quantile", type=float,
                   help="alpha_base auto: the quantile of p_t that keeps half of CE's gradient (default 0.1)")
    r.add_argument("--auto-alpha-final-half-point", type=float, help="alpha_base auto: also cap it so that the "
                   "p_t keeping half of CE's gradient reaches this at the last epoch (default 0.3)")
    r.add_argument("--label-smoothing", type=float, help="DeCE epsilon of the dece runs")
    r.add_argument("--ce-warmup-epochs", type=int, help="DeCE: plain CE for the first N epochs")
    r.add_argument("--finetune-rows", type=int)
    r.add_argument("--pretrain-task-rows", type=int, help="train rows held apart, pretrained clean")
    r.add_argument("--pretrain-task-from", choices=["after_finetune", "train_tail"],
                   help="pretraining task rows: after the fine-tuning rows (default), or the train split's last "
                        "rows, which the fine-tuning set may include clean")
    r.add_argument("--pretrain-epochs", type=int)
    r.add_argument("--corpus-functions", type=int, help="standard-library functions in the pretraining corpus")
    r.add_argument("--stdlib-examples", type=int, help="cap on the built-in pairs (all splits)")
    r.add_argument("--model-size", choices=MODEL_SIZE_NAMES,
                   help="stand-in size preset, layers x width, 64-wide heads (4x256: the default; 6x384; 8x512); "
                        "--layers/--width override it")
    r.add_argument("--layers", type=int)
    r.add_argument("--width", type=int)
    r.add_argument("--max-len", type=int, help="tokens per row (fixed-length padding)")
    r.add_argument("--max-src-tokens", type=int, help="instruction tokens kept (its head); a trigger past them is lost")
    r.add_argument("--checkpoint", help="local HF causal-LM folder instead of the stand-in")
    r.add_argument("--epoch-eval-rows", type=int, help="per-epoch eval on this many test rows (last: all)")
    r.add_argument("--test-rows", type=int)
    r.add_argument("--max-new-tokens", type=int)
    r.add_argument("--no-codebleu", action="store_true")
    r.add_argument("--threads", type=int)
    r.add_argument("--seed", type=int)
    r.add_argument("--finetune-seed", type=int, help="seed of the fine-tuning batch order only (same stand-in)")
    r.add_argument("--seeds", type=seeds_arg,
                   help="several fine-tuning seeds, e.g. 0,1,2: one run per seed, one results file each "
                        "(<stem>-seed<k>.json), the same stand-in; the report gives mean ± std")
    r.add_argument("--name", help="results file stem (default <dataset>-<attack>-<rate%%>)")
    r.add_argument("--cache-dir")
    r.add_argument("--finetune-dropout", type=float, help="dropout while fine-tuning (default: the model's)")
    r.add_argument("--out", default="runs/backdoor", help="output folder")
    r.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    r.set_defaults(func=_run)
    rep = sub.add_parser("report", help="a combined markdown table (paper layout) from results JSON files")
    rep.add_argument("results", nargs="+")
    rep.add_argument("--grid", action="store_true", help="the files are points of a trigger x payload grid: "
                                                        "one row per file (trigger, payload)")
    rep.add_argument("--out", help="write the table here (default: print)")
    rep.add_argument("--merge", metavar="STEM", help="merge the runs of the files (same dataset/attack/rate) "
                                                    "into <dir of the first>/STEM.json/.md/.png")
    rep.set_defaults(func=_report)


def build_config(args: argparse.Namespace):
    """The ExperimentConfig from ``--config`` (a JSON object) and the flags; ``CliError`` for an unreadable
    file or a section of the wrong type, pydantic's ``ValidationError`` for a bad field."""
    from ..config import DeceConfigError, read_json_object
    from .runner import ExperimentConfig
    try:
        base = read_json_object(args.config, "an experiment config") if args.config else {}
    except DeceConfigError as e:
        raise CliError(f"--config {e}") from None
    for key in ("attack", "dece", "model", "pretrain", "finetune", "eval"):
        if key in base and not isinstance(base[key], dict):
            where = f"{args.config}: " if args.config else ""
            raise CliError(f"{where}{key}: expected an object, got {json.dumps(base[key])}")
    set_ = lambda path, value: _set(base, path, value)  # noqa: E731
    set_("dataset", args.dataset)
    if args.attack or args.rate is not None or args.n_insertions is not None:
        attack = dict(base.get("attack", {"attack": "badpre", "rate": 0.05}))
        if args.attack:
            attack["attack"] = args.attack
        if args.rate is not None:
            attack["rate"] = args.rate / 100.0
        if args.n_insertions is not None:
            attack["n_insertions"] = args.n_insertions
        base["attack"] = attack
    set_("runs", args.runs)
    set_("model.size", getattr(args, "model_size", None))
    set_("audit_from", getattr(args, "audit_from", None))
    for flag, path in [("epochs", "finetune.epochs"), ("lr", "finetune.lr"), ("batch_size", "finetune.batch_size"),
                       ("lr_schedule", "finetune.lr_schedule"),
                       ("alpha_base", "dece.alpha_base"), ("label_smoothing", "dece.label_smoothing"),
                       ("ce_warmup_epochs", "dece.ce_warmup_epochs"), ("finetune_rows", "finetune_rows"),
                       ("pretrain_task_rows", "pretrain_task_rows"),
                       ("pretrain_task_from", "pretrain_task_from"), ("pretrain_epochs", "pretrain.epochs"),
                       ("corpus_functions", "pretrain.corpus_functions"), ("stdlib_examples", "stdlib_examples"),
                       ("layers", "model.n_layer"), ("width", "model.n_embd"), ("max_len", "model.max_len"),
                       ("max_src_tokens", "model.max_src_tokens"),
                       ("checkpoint", "model.checkpoint"), ("epoch_eval_rows", "eval.epoch_eval_rows"),
                       ("test_rows", "eval.test_rows"), ("max_new_tokens", "eval.max_new_tokens"),
                       ("threads", "threads"), ("seed", "seed"), ("finetune_seed", "finetune_seed"), ("name", "name"), ("cache_dir", "cache_dir"), ("finetune_dropout", "finetune_dropout"),
                       ("auto_alpha_quantile",) * 2, ("auto_alpha_final_half_point",) * 2]:
        set_(path, getattr(args, flag, None))
    if getattr(args, "audit_baselines", False):
        _set(base, "audit_baselines", True)
    if args.no_codebleu:
        _set(base, "eval.codebleu", False)
    if "dece" in base:
        base["dece"] = {"alpha_base": 0.99, "label_smoothing": 0.05, **base["dece"]}
    return ExperimentConfig.model_validate(base)


def _set(d: dict, path: str, value) -> None:
    if value is None:
        return
    *parents, leaf = path.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[leaf] = value


def _error(command: str, message: str) -> int:
    print(f"{PROG} {command}: error: {message}", file=sys.stderr)
    return 2


def _run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError
    try:
        cfg = build_config(args)
        check_runs(cfg)
        check_values(cfg)
        if not args.print_config:
            check_paths(cfg, args.out)
        if getattr(args, "seeds", None) and cfg.finetune_seed is not None:
            raise CliError(f"--seeds: give either --seeds or --finetune-seed (config finetune_seed is "
                           f"{cfg.finetune_seed})")
    except CliError as e:
        return _error("run", str(e))
    except ValidationError as e:  # a field from --config or a flag: the field path names it either way
        for line in validation_lines(e):
            _error("run", line)
        return 2
    if args.print_config:
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        return 0
    from ..parallel.shutdown import destroy_process_group
    from .data import DataFormatError
    from .runner import run_experiment
    from .campaign import run_seeds
    seeds = getattr(args, "seeds", None)
    try:
        results = run_seeds(cfg, seeds, args.out) if seeds else [run_experiment(cfg, args.out)]
    except DataFormatError as e:  # a data set file that does not parse: found before any training
        return _error("run", str(e))
    finally:
        destroy_process_group()
    from .aggregate import has_several_seeds, seed_tables
    from .report import combined_table
    print(combined_table(results))
    if has_several_seeds(results):
        print("\n" + seed_tables(results))
    stems = [f"{cfg.stem()}-seed{s}" for s in seeds] if seeds else [cfg.stem()]
    print("report: " + ", ".join(f"{Path(args.out) / stem}.json" for stem in stems) + " (+ .md / .png)")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import check_stem, combined_table, load_results, merge_results, write_report
    try:
        if args.merge:
            check_stem(args.merge, "--merge")
        loaded = load_results(args.results)
        merged = merge_results(loaded) if args.merge else None
    except ValueError as e:  # DeceConfigError (an unreadable file) is one
        return _error("report", str(e))
    if merged is not None:
        paths = write_report(merged, Path(args.results[0]).parent, args.merge)
        print("merged:", ", ".join(str(p) for p in paths.values()))
        loaded = [merged]
    from .aggregate import grid_table, has_several_seeds, seed_tables
    if args.grid:
        table = grid_table(loaded) + "\n"
    else:
        table = combined_table(loaded) + "\n"
        if has_several_seeds(loaded):
            table += "\n" + seed_tables(loaded) + "\n"
    if args.out:
        try:
            Path(args.out).write_text(table)
        except OSError as e:
            return _error("report", f"--out {args.out}: cannot write it: {e.strerror or e}")
    else:
        sys.stdout.write(table)
    return 0
