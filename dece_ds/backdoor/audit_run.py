"""The poison audit inside the backdoor experiment (run kind ``audit_retrain``; docs/audit.md).

With ``audit_retrain`` in the runs, every ``dece`` run records its per-row ``log p_t``
(``"audit": {"enabled": true}`` in its ``dece`` section, the row ids = indices of the fine-tuning set) into
``<out>/<stem>-audit/<run>/``, is audited after training (``dece_ds.audit``), and gets an ``"audit"`` block
scored against the poisoner's known indices. ``audit_retrain`` then drops the rows that audit flagged (the
cut of ``audit.score.cut``: it does not know the poison count) and fine-tunes plain CE from the same
stand-in weights on the rest, evaluated like every other run. ``audit_repair`` keeps every row and masks, in the
flagged rows, the payload their trigger shares (``audit.repair``); flagged rows without a named payload are
dropped. Both read the ``audit.jsonl`` of the latest audited dece run, or ``audit_from`` (an earlier run on the
same rows: its instructions are checked against this run's).

Baselines (``--audit-baselines``, or ``audit_retrain`` in the runs): every ``ce`` run gets an
``"audit_baselines"`` block after training: the per-row CE loss and spectral signatures of the trained model
(``audit.baselines``, one forward pass over its training rows) and the n-gram naturalness detector
(``audit.naturalness``, from the data alone), each scored against the same poisoned indices with the same
metrics and cut as the audit (``baselines_block``).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..audit.recorder import read_record, write_meta
from ..audit.repair import repair_from_file
from ..audit.report import audit_lines, flagged_rows, write_audit
from ..audit.score import AuditRecordError, auroc, cut, label_metrics, run_audit


RETRAIN_KINDS = ("audit_retrain", "audit_repair")   # CE after an audit: drop the flagged rows / mask their payload


def check_retrain_has_an_audit(kinds: Sequence[str], audit_from: str | None) -> None:
    """``ValueError`` when a retrain kind comes before any dece run and no ``audit_from`` is given."""
    first = min((kinds.index(k) for k in RETRAIN_KINDS if k in kinds), default=None)
    if first is not None and "dece" not in kinds[:first] and audit_from is None:
        raise ValueError(f"runs: {kinds[first]} needs an audit: put a dece run before it, or give "
                         f"audit_from (got {tuple(kinds)})")


def retrain_rows(kind: str, data: Mapping[str, torch.Tensor], audit_file: Path, decode,
                 log, encode=None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The training rows of a retrain ``kind`` (``drop_flagged`` / ``repair_flagged``) -> (tensors, the run's extra
    keys: ``audit_file``, ``dropped_rows``; for audit_repair also ``repaired_rows``, ``payloads``,
    ``masked_tokens``); ``log`` gets one line; ``encode`` (text -> ids) reads an older ``audit.jsonl``
    (``audit.repair.read_flagged``)."""
    if kind == "audit_retrain":
        data, kept, extra = drop_flagged(data, audit_file)
        log(f"dropped {len(extra['dropped_rows'])} flagged row(s), CE on the {len(kept)} left")
    else:
        data, kept, extra = repair_flagged(data, audit_file, decode, encode)
        log(f"masked the payload of {len(extra['repaired_rows'])} flagged row(s) ({extra['masked_tokens']} tokens: "
            f"{extra['payloads']}), dropped {len(extra['dropped_rows'])}, CE on {len(kept)} rows")
    return data, extra


def record_dir(out_dir: str | Path, stem: str, spec: str) -> Path:
    """A fresh (emptied) record folder for one run spec."""
    path = Path(out_dir) / f"{stem}-audit" / re.sub(r"[^A-Za-z0-9_.=-]+", "_", spec)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def audit_dece_run(rec_dir: Path, tok, rows: Sequence[Mapping[str, Any]], poisoned: Sequence[int],
                   score: str = "auto", log=lambda _m: None) -> tuple[dict[str, Any], Path]:
    """Audit a recorded DeCE run -> (the run's ``"audit"`` block, its ``audit.jsonl``); writes the report
    (``audit.jsonl`` / ``.md`` / ``.png``) into ``rec_dir``; ``log`` gets one line."""
    instructions = {i: str(r["src"]) for i, r in enumerate(rows)}
    tok_file = rec_dir / "tokenizer.json"
    tok.save(tok_file)
    write_meta(rec_dir, None, {"tokenizer_file": tok_file.name,   # relative to the record folder
                               "instructions": [str(r["src"]) for r in rows], "poisoned": list(poisoned)})
    audit = run_audit(read_record(rec_dir), instructions=instructions, decode=tok.decode, poisoned=poisoned,
                      primary=score)
    paths = write_audit(audit, rec_dir, instructions=instructions, decode=tok.decode, poisoned=poisoned)
    score = audit.primary
    m = audit.metrics[score]
    block = {"score": score, "auroc": m["auroc"], "precision_at_k": m["precision_at_k"],
             "recall_at_fpr": m["recall_at_fpr"], "flagged": m["flagged"], "flagged_poisoned": m["flagged_poisoned"],
             "true_poisoned": m["true_poisoned"], "cut": audit.cut,
             "recurring_refused_text": audit.recurring[:5],
             "recurring_refused_text_flagged": audit.recurring_flagged[:5], "scores": audit.metrics,
             "report": str(rec_dir)}
    log(f"audit: AUROC {block['auroc']} flagged {block['flagged']} ({block['flagged_poisoned']} poisoned of "
        f"{block['true_poisoned']})")
    return block, paths["jsonl"]


def audit_file_for(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """``audit_from`` (an ``audit.jsonl`` or a folder holding one) checked against this experiment's training
    rows: every row it lists must exist here with the same instruction. ``AuditRecordError`` otherwise."""
    p = Path(path)
    p = p / "audit.jsonl" if p.is_dir() else p
    if not p.is_file():
        raise AuditRecordError(f"audit_from: {p}: no such audit file (expected the audit.jsonl of `dece-ds audit`)")
    for _, rec in audit_lines(p):
        row = rec["row"]
        if not 0 <= row < len(rows):
            raise AuditRecordError(f"audit_from: {p}: row {row} is out of range for the {len(rows)} training rows "
                                   f"of this experiment (an audit of other data?)")
        if rec.get("instruction") is not None and rec["instruction"] != str(rows[row]["src"]):
            raise AuditRecordError(f"audit_from: {p}: row {row}'s instruction differs from this experiment's "
                                   f"(an audit of other data, or another poison seed?)")
    return p


def drop_flagged(data: Mapping[str, torch.Tensor], audit_file: Path) -> tuple[dict[str, torch.Tensor], list[int],
                                                                                dict[str, Any]]:
    """``audit_retrain``: the training tensors without the rows ``audit_file`` flagged -> (tensors, kept row
    indices, the run's extra keys ``audit_file`` and ``dropped_rows``)."""
    flagged = flagged_rows(audit_file)
    data, kept = keep_rows(data, flagged)
    return data, kept, {"audit_file": str(audit_file), "dropped_rows": sorted(flagged)}


def repair_flagged(data: Mapping[str, torch.Tensor], audit_file: Path, decode,
                   encode=None) -> tuple[dict[str, torch.Tensor], list[int], dict[str, Any]]:
    """``audit_repair``: the training tensors with the flagged rows' payload masked (``audit.repair``) -> (tensors,
    kept row indices, the run's extra keys ``audit_file``, ``repaired_rows``, ``dropped_rows``, ``payloads``
    {trigger word: payload text}, ``masked_tokens``)."""
    data, kept, plan, masked = repair_from_file(data, audit_file, encode=encode)
    return data, kept, {"audit_file": str(audit_file), "repaired_rows": sorted(plan.payloads),
                        "dropped_rows": plan.drop, "masked_tokens": masked,
                        "payloads": {w: decode(list(ids)) for w, ids in plan.triggers.items()}}


def keep_rows(data: Mapping[str, torch.Tensor], drop: Sequence[int]) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The training tensors without the rows ``drop`` (indices into them) -> (tensors, kept indices)."""
    n = next(iter(data.values())).shape[0]
    dropped = set(drop)
    kept = [i for i in range(n) if i not in dropped]
    idx = torch.as_tensor(kept, dtype=torch.long)
    return {k: v[idx] for k, v in data.items()}, kept


def _metrics(scores, labels: np.ndarray) -> dict[str, Any]:
    """The audit's metric keys for one score, its flags from the audit's own cut (``audit.score.cut``)."""
    flagged, info = cut(scores)
    return {**label_metrics(scores, labels, flagged), "cut": info}


def ngram_scores(data: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor] | None,
                 ignore_index: int = -100) -> tuple[np.ndarray, str]:
    """The n-gram naturalness scores ``[N]`` of the training rows' target ids (``audit.naturalness``), the model
    fitted on ``reference``'s targets (clean rows) when it has rows, else on the training rows; -> (scores,
    what it was fitted on: ``"held_apart_clean"`` or ``"training_rows"``)."""
    from ..audit.naturalness import naturalness_scores, target_tokens
    rows = target_tokens(data["labels"], ignore_index)
    if reference is not None and reference["labels"].shape[0]:
        return naturalness_scores(rows, target_tokens(reference["labels"], ignore_index)), "held_apart_clean"
    return naturalness_scores(rows), "training_rows"


def baselines_block(model, data: Mapping[str, torch.Tensor], poisoned: Sequence[int],
                    ngram: tuple[np.ndarray, str], batch_size: int = 32, log=lambda _m: None) -> dict[str, Any]:
    """A ``ce`` run's ``"audit_baselines"``: ``ce_loss`` (high loss = suspicious; ``auroc_low`` is the other
    direction), ``spectral`` and ``ngram`` (``fit_on`` says which rows its model was fitted on), each with the
    audit block's metric keys (``auroc``, ``precision_at_k``, ``recall_at_fpr``, ``flagged``,
    ``flagged_poisoned``, ``true_poisoned``, ``cut``). ``model``: the trained HF model; ``data``: its training
    tensors ``[N, L]``; ``ngram``: ``ngram_scores``'s result on the same rows."""
    from ..audit.baselines import row_features, spectral_scores
    nll, reps = row_features(model, data, batch_size)
    labels = np.isin(np.arange(nll.shape[0]), list(poisoned))
    loss = nll.double().numpy()
    ng, fit_on = ngram
    block = {"ce_loss": {**_metrics(loss, labels), "auroc_low": auroc(-loss, labels)},
             "spectral": _metrics(spectral_scores(reps).numpy(), labels),
             "ngram": {**_metrics(ng, labels), "fit_on": fit_on}}
    log("audit baselines: " + ", ".join(f"{k} AUROC {v['auroc']}" for k, v in block.items()))
    return block
