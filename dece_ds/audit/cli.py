"""``dece-ds audit``: rank the training rows of a run by suspicion, from its audit record or post hoc.

    dece-ds audit RUN_OUT                      the record of a run trained with "dece": {"audit": {...}}
    dece-ds audit RUN_OUT --score trigger      rank by another score (recurrence, trigger, persistence, ...)
    dece-ds audit --model DIR --data train.jsonl --prompt-field src --completion-field tgt --out DIR
                                               post hoc: one forward pass of a trained local HF model

Writes ``audit.jsonl``, ``audit.md``, ``audit.png`` and ``audit_summary.json`` into ``--out`` (default: the
run folder). ``--labels poisoned.json`` (a JSON list of row ids, or the record's meta ``"poisoned"``)
adds AUROC, precision@k and recall at 1 % / 5 % FPR.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROG = "dece-ds audit"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("audit", help="name the training rows DeCE refused to learn (docs/audit.md)")
    p.add_argument("run_out", nargs="?", help="run folder (or its audit record folder)")
    p.add_argument("--score", default="auto",
                   choices=["auto", "recurrence", "trigger", "persistence", "max_nll", "refusal"],
                   help="ranking and cut score (auto: trigger when the instructions are known, else recurrence)")
    p.add_argument("--out", help="output folder (default: RUN_OUT)")
    p.add_argument("--labels", help="JSON list of the poisoned row ids (adds AUROC etc.)")
    post = p.add_argument_group("post hoc (no training-time record)")
    post.add_argument("--model", help="local HF causal-LM folder (with its tokenizer)")
    post.add_argument("--data", help="json/jsonl/csv data file, one row per training example")
    post.add_argument("--prompt-field", default="src")
    post.add_argument("--completion-field", default="tgt")
    post.add_argument("--alpha", type=float, default=0.9,
                      help="alpha whose refusal threshold marks a token refused (default 0.9)")
    post.add_argument("--label-smoothing", type=float, default=0.05)
    post.add_argument("--seq-len", type=int, default=256)
    post.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=_main)


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def _read_data(paths: list[str], fmt: str | None, max_samples: int | None, out: Path):
    import datasets
    fmt = fmt or {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(
        Path(paths[0]).suffix.lower())
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise ValueError(f"data file(s) not found: {missing}")
    if fmt is None:
        raise ValueError(f"cannot tell the format of {paths[0]}")
    ds = datasets.load_dataset(fmt, data_files=[str(Path(p).resolve()) for p in paths], split="train",
                               cache_dir=str(out / ".hf_datasets"))
    if max_samples:
        ds = ds.select(range(min(max_samples, len(ds))))
    return ds


def context_from_meta(record, meta: dict, out: Path, record_dir: Path | None = None):
    """(instructions, decode, poisoned) from a record's meta.json; checks the data matches the record."""
    instructions, decode = meta.get("instructions"), None
    if isinstance(instructions, list):
        instructions = dict(enumerate(instructions))
    tok_file = Path(record_dir or ".") / meta["tokenizer_file"] if meta.get("tokenizer_file") else None
    if tok_file is not None and not tok_file.is_file():
        print(f"note: {tok_file}: no tokenizer; refused spans are shown as token ids", file=sys.stderr)
    elif tok_file is not None:
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(tok_file))
        decode = tok.decode
    elif meta.get("tokenizer") and Path(meta["tokenizer"]).is_dir():
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(meta["tokenizer"])
        decode = tok.decode
        if meta.get("data") and meta.get("prompt_field"):
            ds = _read_data(meta["data"], meta.get("data_format"), meta.get("max_samples"), out)
            check_data_matches(record, ds, meta["prompt_field"], meta["completion_field"],
                               lambda s: tok(s, add_special_tokens=False)["input_ids"])
            instructions = {i: str(r[meta["prompt_field"]]) for i, r in enumerate(ds)}
    return instructions, decode, meta.get("poisoned")


def check_data_matches(record, ds, prompt_field: str, completion_field: str, encode, sample: int = 20) -> None:
    """The record's row ids index ``ds`` and its recorded target ids start like the completion's tokens."""
    from .recorder import AuditRecordError
    if record.rows and record.rows[-1] >= len(ds):
        raise AuditRecordError(f"the data has {len(ds)} rows, the record names row {record.rows[-1]}: "
                               "not the data this run trained on")
    bad = []
    for r in record.rows[:: max(1, len(record.rows) // sample)]:
        visit = record.visits[r][max(record.visits[r])]
        want = encode(str(ds[r][completion_field]))
        k = min(len(want), len(visit.tok), 8)
        if k and list(visit.tok[:k]) != list(want[:k]):
            bad.append(r)
    if bad:
        raise AuditRecordError(f"row(s) {bad[:5]}: the recorded target tokens differ from the data's "
                               f"'{completion_field}': not the data (or tokenizer) this run trained on")


def post_hoc_record(args, out: Path):
    """One forward pass of ``--model`` over ``--data`` -> a record folder ``out/posthoc_record``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..recipes.finetune import tokenize
    from .recorder import AuditRecorder
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"--model {args.model}: not a local HF model folder (no config.json)")
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ds = _read_data([args.data], None, None, out)
    for f in (args.prompt_field, args.completion_field):
        if f not in ds.column_names:
            raise ValueError(f"--data {args.data}: no column {f!r} (columns: {ds.column_names})")
    ns = argparse.Namespace(seq_len=args.seq_len, prompt_field=args.prompt_field,
                            completion_field=args.completion_field, text_field=None)
    ids, labels, mask = tokenize(ns, ds, tok)
    rec_dir = out / "posthoc_record"
    for old in rec_dir.glob("rank*.jsonl"):
        old.unlink()
    rec = AuditRecorder(rec_dir, vocab_size=model.config.vocab_size, label_smoothing=args.label_smoothing,
                        prob_floor=1e-7)
    with torch.no_grad():
        for s in range(0, len(ids), args.batch_size):
            sl = slice(s, s + args.batch_size)
            logits = model(input_ids=ids[sl], attention_mask=mask[sl]).logits.float()
            target = torch.nn.functional.pad(labels[sl], (0, 1), value=-100)[:, 1:]
            logp = logits.log_softmax(-1).gather(-1, target.clamp_min(0)[..., None]).squeeze(-1)
            rec.observe(torch.arange(s, s + ids[sl].shape[0]), target, logp.masked_fill(target < 0, 0.0),
                        ignore_index=-100, alpha=args.alpha, step=0, epoch=1)
    rec.close()
    instructions = {i: str(r[args.prompt_field]) for i, r in enumerate(ds)}
    return rec_dir, instructions, tok.decode


def _main(args: argparse.Namespace) -> int:
    from .recorder import AuditRecordError, find_record_dir, read_meta, read_record
    from .report import write_audit
    from .score import run_audit
    try:
        if args.model:
            if not args.data:
                return _error("--model needs --data")
            out = Path(args.out or args.run_out or "audit_posthoc")
            out.mkdir(parents=True, exist_ok=True)
            rec_dir, instructions, decode = post_hoc_record(args, out)
            record, poisoned = read_record(rec_dir), None
        else:
            if not args.run_out:
                return _error("give RUN_OUT (a run folder with an audit record) or --model and --data")
            rec_dir = find_record_dir(args.run_out)
            out = Path(args.out or args.run_out)
            record = read_record(rec_dir)
            instructions, decode, poisoned = context_from_meta(record, read_meta(rec_dir), out, rec_dir)
        if args.labels:
            poisoned = json.loads(Path(args.labels).read_text(encoding="utf-8"))
            if not isinstance(poisoned, list) or not all(isinstance(x, int) for x in poisoned):
                return _error(f"--labels {args.labels}: expected a JSON list of row ids")
        audit = run_audit(record, instructions=instructions, decode=decode, poisoned=poisoned, primary=args.score)
    except (AuditRecordError, ValueError, OSError) as e:
        return _error(str(e))
    if record.torn:
        print(f"note: {record.torn} torn last line(s) skipped (a run killed mid-write)", file=sys.stderr)
    paths = write_audit(audit, out, instructions=instructions, decode=decode, poisoned=poisoned)
    print(f"{len(audit.rows)} rows, {int(audit.flagged.sum())} flagged ({audit.cut['rule']})")
    for text, n in (audit.recurring_flagged or audit.recurring)[:5]:
        print(f"  refused in {n} {'flagged ' if audit.recurring_flagged else ''}rows: {text!r}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
