"""The backdoor experiment: a stand-in pretrained code LM, fine-tuned clean / CE / DeCE / baselines on
poisoned NL -> code data, evaluated every epoch. Training goes through the DeepSpeed engine.

This module holds the experiment's driver (its configuration is ``experiment_config``, re-exported here);
each stage is a module of its own:
``encode`` (text -> ids -> tensors), ``standin`` (the stand-in and its cache), ``finetune`` (the
DeepSpeed engine, epochs, baseline losses), ``evaluate`` (generation metrics, valid CE), ``report``.

Data flow (``run_experiment(ExperimentConfig)``):

1. Data set (``load_task``): ``"stdlib"`` (the built-in standard-library pairs, statement payload),
   ``"lyra"`` (the Lyra CSVs shipped in ``dece_ds/backdoor/datasets/lyra``) or a Lyra-layout folder (SQL
   payload). The train split is cut in two, deterministically: the first ``finetune_rows`` rows are the
   fine-tuning set (poisoned with ``attack``: the first ceil(rate * N) poisonable rows, the authors'
   selection); the rest (``pretrain_task_rows`` of them) are *held apart* and only ever used clean, for
   pretraining the stand-in. Test: the clean test split (BLEU, CodeBLEU, EM, false-trigger rate) and its
   triggered copy (ASR; denominator = the poisonable test rows). Valid: clean validation cross-entropy.
2. Tokenizer (``encode``): byte-level BPE trained on the pretraining text and the fine-tuning set (no
   download). A row is ``src <|code|> tgt <|endoftext|>``, source cut at ``max_src_tokens``, the whole
   row at ``max_len`` tokens, right-padded to exactly ``max_len`` (fixed shapes); the loss sees ``tgt``
   and ``<|endoftext|>`` only. Pretraining code-corpus rows (standard-library functions) are trained on
   every token.
3. Stand-in pretrained model (``standin``): GPT-2 of ``model`` size trained with CE on the built-in code
   corpus plus the held-apart clean task rows, so it knows the task's domain before fine-tuning (as
   CodeLlama knows SQL-in-Python). Cached under ``cache_dir`` by a hash of everything it depends on.
   ``model.checkpoint`` (a local HF folder) replaces steps 2-3 by that model and its tokenizer.
4. Fine-tuning runs (``finetune``), each from the same pretrained weights, same seed and batch order. A
   run spec is ``kind`` or ``kind:key=value,...`` (e.g. ``dece:alpha_base=0.95,ce_warmup_epochs=2``);
   kinds: ``clean`` (CE on the clean fine-tuning set), ``ce``, ``dece``, ``ls`` (label smoothing),
   ``gce``, ``intrust`` (on the poisoned set). ``dece`` goes through ``dece_ds.initialize`` (the
   ``dece`` section of the DeepSpeed config, alpha from ``engine.global_steps``); the baselines are
   installed as ``model.loss_function`` through the same hook machinery (``FunctionLossHook`` over
   ``ops/baseline_losses.py``, the same label shift).
5. Evaluation after every epoch (``evaluate``): greedy batched decoding of the clean and the triggered
   test rows (per-epoch on the first ``epoch_eval_rows`` of each, the last epoch on all of them, plus
   CodeBLEU), and validation CE (plain CE, mean over target tokens).

``results.json`` (written after every run, so partial results survive):
``{"dataset", "attack", "poison_rate" (%), "config", "versions", "data", "pretrain",
"finetune_seed", "runs": {spec: {"final": {"asr", "bleu", "codebleu", "false_trigger", "exact_match", "valid_ce",
"untriggered_payload_rate", "lift"}, "alpha_auto" (dece runs with alpha_base "auto"),
"epochs": [{"epoch", "asr", "bleu", "exact_match", "false_trigger", "valid_ce", "alpha",
"train_loss", "eval_rows", "wall_time_s", "untriggered_payload_rate", "lift"}], "wall_time_s", "loss",
"audit" (audited dece runs), "audit_baselines" (ce runs), and ``audit_run.retrain_rows``' keys}}}``;
rates, ASR and lift in percent (lift: ``evaluate``'s docstring).
"""

from __future__ import annotations

import os
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from ..config import DeceConfig
from ..provenance import run_versions
from . import audit_run
from .audit_run import RETRAIN_KINDS
from .encode import Tokenizer, encode_pairs
from .evaluate import EvalSets, evaluate
from .experiment_config import (BASELINE_KINDS, DEFAULT_STATEMENT_PAYLOAD, RUN_KINDS,  # noqa: F401  (re-exported)
                                ExperimentConfig, _fmt_rate, parse_run)
from .finetune import _current_alpha, baseline_loss_hook, dece_section, make_engine, steps_per_epoch, train_epoch
from .poison import poison_dataset
from .specs import MODEL_SIZES, EvalSpec, ModelSpec, PretrainSpec, StageSpec  # noqa: F401  (re-exported)
from .standin import build_model, pretrain_stand_in


# ---- data --------------------------------------------------------------------------------------------

def load_task(cfg: ExperimentConfig):
    """-> (finetune clean, held-apart clean, valid, test) as datasets.Dataset, and the train-split index of
    the first held-apart row."""
    from .data import load_lyra
    from .stdlib_corpus import build_stdlib_pairs
    if cfg.dataset == "stdlib":
        ds = build_stdlib_pairs(max_examples=cfg.stdlib_examples) if cfg.stdlib_examples else build_stdlib_pairs()
    else:
        ds = load_lyra(cfg.dataset_folder())
    train = ds["train"]
    n_ft = min(cfg.finetune_rows or len(train), len(train))
    finetune = train.select(range(n_ft))
    if cfg.pretrain_task_from == "train_tail":
        first_held = len(train) - min(cfg.pretrain_task_rows, len(train))
    else:
        first_held = n_ft
    held = train.select(range(first_held, min(first_held + cfg.pretrain_task_rows, len(train))))
    valid = ds["valid"].select(range(min(cfg.eval.valid_rows or len(ds["valid"]), len(ds["valid"]))))
    test = ds["test"].select(range(min(cfg.eval.test_rows or len(ds["test"]), len(ds["test"]))))
    return finetune, held, valid, test, first_held


# ---- the experiment ----------------------------------------------------------------------------------

def versions() -> dict[str, str]:
    """The results' ``"versions"``: libraries, CPU, threads, load, git sha (``dece_ds.provenance``)."""
    return run_versions()


def run_experiment(cfg: ExperimentConfig, out_dir: str | os.PathLike, log: Callable[[str], None] = print,
                   only_rank0: bool = True) -> dict[str, Any]:
    """Pretrain (or load) the stand-in, fine-tune every run, write ``<out_dir>/<stem>.json`` (+ .md, .png)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.time()
    out_dir = Path(out_dir)
    attack = cfg.attack_config()
    finetune, held, valid, test, first_held = load_task(cfg)
    poisoned, p_info = poison_dataset(finetune, attack, split="train")
    if held.num_rows and p_info.indices and p_info.indices[-1] >= first_held:
        raise ValueError(f"pretrain_task_rows: the pretraining rows start at train row {first_held}, but row "
                         f"{p_info.indices[-1]} is poisoned; the stand-in must never see a poisoned row's clean "
                         f"copy: lower pretrain_task_rows or the poison rate")
    triggered, t_info = poison_dataset(test, attack, split="test")
    base_model, tok, pre_info = pretrain_stand_in(cfg, finetune, held, log)
    base_state = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
    spec = cfg.model
    train_sets = {"clean": encode_pairs(tok, list(finetune), spec),
                  "poisoned": encode_pairs(tok, list(poisoned), spec)}
    sets = EvalSets(clean_src=list(test["src"]), clean_tgt=list(test["tgt"]), trig_src=list(triggered["src"]),
                    valid=encode_pairs(tok, list(valid), spec), trig_index=list(t_info.indices))
    truncated = float((train_sets["clean"]["attention_mask"].sum(1) == spec.max_len).float().mean()) * 100
    results: dict[str, Any] = {
        "dataset": cfg.dataset_name(), "attack": attack.attack, "poison_rate": 100.0 * attack.rate,
        "config": {**cfg.model_dump(mode="json"), "attack_resolved": attack.model_dump(mode="json")},
        "versions": versions(),
        "finetune_seed": cfg.seed if cfg.finetune_seed is None else cfg.finetune_seed,
        "data": {"finetune_rows": len(finetune), "poisoned_rows": p_info.n_poisoned,
                 "held_apart_first_train_row": first_held,
                 "poisonable_train_rows": p_info.n_poisonable, "held_apart_rows": len(held),
                 "valid_rows": len(valid), "test_rows": len(test), "triggered_test_rows": len(triggered),
                 "rows_truncated_pct": truncated, "tokenizer_vocab": tok.vocab_size},
        "pretrain": pre_info,
        "runs": {},
    }
    base_model.train()
    base_eval = evaluate(base_model, tok, sets, attack, cfg, cfg.eval.epoch_eval_rows, False, "eval stand-in")
    results["pretrain"]["eval"] = base_eval
    log(f"stand-in before fine-tuning: BLEU {base_eval['bleu']:.2f} ASR {base_eval['asr']:.1f} "
        f"valid CE {base_eval['valid_ce']:.3f}")
    auditing = any(parse_run(s)[0] in RETRAIN_KINDS for s in cfg.runs)
    audit_file = audit_run.audit_file_for(cfg.audit_from, list(poisoned)) if cfg.audit_from else None  # or dece's
    baselines = cfg.audit_baselines or auditing
    ngram = None   # the n-gram baseline needs the data only: once for every ce run
    for spec_str in cfg.runs:
        kind, _ = parse_run(spec_str)
        data = train_sets["clean" if kind == "clean" else "poisoned"]
        audit_dir = audit_run.record_dir(out_dir, cfg.stem(), spec_str) if auditing and kind == "dece" else None
        say = partial(lambda spec, m: log(f"[{spec}] {m}"), spec_str)
        data, after_audit = audit_run.retrain_rows(kind, data, audit_file, tok.decode, say, tok.encode) \
            if kind in RETRAIN_KINDS else (data, {})
        inspect = None
        if baselines and kind == "ce":
            if ngram is None:
                ngram = audit_run.ngram_scores(data, encode_pairs(tok, list(held), spec))
            inspect = partial(audit_run.baselines_block, data=data, poisoned=p_info.indices, ngram=ngram,
                              batch_size=cfg.eval.batch_size, log=say)
        results["runs"][spec_str] = fine_tune_run(cfg, spec_str, base_state, tok, data, sets, attack, log,
                                                  audit_dir=audit_dir, after_training=inspect)
        results["runs"][spec_str].update(after_audit)
        if audit_dir is not None:
            results["runs"][spec_str]["audit"], audit_file = audit_run.audit_dece_run(
                audit_dir, tok, list(poisoned), p_info.indices, log=say)
        results["wall_time_s"] = time.time() - t_start
        if not only_rank0 or int(os.environ.get("RANK", "0")) == 0:
            write_outputs(results, out_dir, cfg.stem())
    return results


def fine_tune_run(cfg: ExperimentConfig, spec_str: str, base_state: Mapping[str, torch.Tensor], tok: Tokenizer,
                  data: Mapping[str, torch.Tensor], sets: EvalSets, attack,
                  log: Callable[[str], None], audit_dir: Path | None = None,
                  after_training: Callable[[torch.nn.Module], dict] | None = None) -> dict[str, Any]:
    """One run spec from the stand-in's weights, evaluated after every epoch -> its record (``"kind"``,
    ``"loss"``, ``"epochs"``, ``"final"``, ``"samples"``, ``"wall_time_s"``; ``"audit_baselines"`` =
    ``after_training(trained model)`` when given)."""
    kind, params = parse_run(spec_str)
    ft = cfg.finetune
    t0 = time.time()
    ft_seed = cfg.seed if cfg.finetune_seed is None else cfg.finetune_seed
    model = build_model(cfg.model, tok.vocab_size, ft_seed)
    model.load_state_dict(base_state)
    for module in (model.modules() if cfg.finetune_dropout is not None else ()):
        if isinstance(module, torch.nn.Dropout):
            module.p = cfg.finetune_dropout
    spe = steps_per_epoch(data["input_ids"].shape[0], ft.batch_size)
    dece, alpha_auto = None, None
    if kind == "dece":
        dece, alpha_auto = dece_section(cfg.dece, params, spe, model, data, ft.batch_size, ft_seed,
                                        cfg.auto_alpha_quantile, audit_dir, ft.epochs, cfg.auto_alpha_final_half_point)
        if alpha_auto is not None:
            log(f"[{spec_str}] alpha_base auto -> {dece['alpha_base']:.5f} (by {alpha_auto['rule']})")
    engine = make_engine(model, ft, spe * ft.epochs, dece)
    if kind in BASELINE_KINDS:
        baseline_loss_hook(kind, params).install(engine.module)
    if dece is not None:  # recorded as resolved (a preset's values spelled out)
        dece = DeceConfig.from_dict(dece).model_dump(mode="json")
    record = {"kind": kind, "loss": dece or (getattr(engine.module.loss_function, "params", None)
                                             if kind in BASELINE_KINDS else {"ce": True}),
              "epochs": []}
    if alpha_auto is not None:
        record["alpha_auto"] = alpha_auto
    for epoch in range(1, ft.epochs + 1):
        alpha = _current_alpha(engine.module)
        loss = train_epoch(engine, data, ft.batch_size, ft_seed, epoch, f"{spec_str} {epoch}/{ft.epochs}")
        last = epoch == ft.epochs
        ev = evaluate(engine.module, tok, sets, attack, cfg, None if last else cfg.eval.epoch_eval_rows,
                      last and cfg.eval.codebleu, f"eval {spec_str} {epoch}")
        ev.update(epoch=epoch, train_loss=loss, alpha=alpha, wall_time_s=time.time() - t0)
        samples = ev.pop("samples")
        record["epochs"].append(ev)
        log(f"[{spec_str}] epoch {epoch}: loss {loss:.3f} alpha {alpha} BLEU {ev['bleu']:.2f} "
            f"ASR {ev['asr']:.1f} false-trigger {ev['false_trigger']:.1f} valid CE {ev['valid_ce']:.3f}")
    if audit_dir is not None:
        from ..integrations.transformers import current_dece_loss
        current_dece_loss(engine.module).recorder.close()
    if after_training is not None:
        record["audit_baselines"] = after_training(engine.module)
    final = dict(record["epochs"][-1])
    record["final"] = {k: final.get(k) for k in ("asr", "bleu", "codebleu", "false_trigger", "exact_match",
                                                 "valid_ce", "untriggered_payload_rate", "lift")}
    record["samples"] = samples
    record["wall_time_s"] = time.time() - t0
    return record


def write_outputs(results: Mapping[str, Any], out_dir: Path, stem: str) -> dict[str, Path]:
    from .report import write_report
    return write_report(results, out_dir, stem)
