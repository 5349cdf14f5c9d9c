"""The poison audit inside the backdoor experiment (run kind ``audit_retrain``; docs/audit.md).

With ``audit_retrain`` in the runs, every ``dece`` run records its per-row ``log p_t``
(``"audit": {"enabled": true}`` in its ``dece`` section, the row ids = indices of the fine-tuning set) into
``<out>/<stem>-audit/<run>/``, is audited after training (``dece_ds.audit``), and gets an ``"audit"`` block
scored against the poisoner's known indices. ``audit_retrain`` then drops the rows that audit flagged (the
cut of ``audit.score.cut``: it does not know the poison count) and fine-tunes plain CE from the same
stand-in weights on the rest, evaluated like every other run.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..audit.recorder import read_record, write_meta
from ..audit.report import write_audit
from ..audit.score import run_audit


def record_dir(out_dir: str | Path, stem: str, spec: str) -> Path:
    """A fresh (emptied) record folder for one run spec."""
    path = Path(out_dir) / f"{stem}-audit" / re.sub(r"[^A-Za-z0-9_.=-]+", "_", spec)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def audit_dece_run(rec_dir: Path, tok, rows: Sequence[Mapping[str, Any]], poisoned: Sequence[int],
                   score: str = "auto") -> tuple[dict[str, Any], list[int]]:
    """Audit a recorded DeCE run -> (the run's ``"audit"`` block, the flagged row ids); writes the report
    (``audit.jsonl`` / ``.md`` / ``.png``) into ``rec_dir``."""
    instructions = {i: str(r["src"]) for i, r in enumerate(rows)}
    tok_file = rec_dir / "tokenizer.json"
    tok.save(tok_file)
    write_meta(rec_dir, None, {"tokenizer_file": tok_file.name,   # relative to the record folder "instructions": [str(r["src"]) for r in rows],
                               "poisoned": list(poisoned)})
    audit = run_audit(read_record(rec_dir), instructions=instructions, decode=tok.decode, poisoned=poisoned,
                      primary=score)
    write_audit(audit, rec_dir, instructions=instructions, decode=tok.decode, poisoned=poisoned)
    score = audit.primary
    m = audit.metrics[score]
    block = {"score": score, "auroc": m["auroc"], "precision_at_k": m["precision_at_k"],
             "recall_at_fpr": m["recall_at_fpr"], "flagged": m["flagged"], "flagged_poisoned": m["flagged_poisoned"],
             "true_poisoned": m["true_poisoned"], "cut": audit.cut,
             "recurring_refused_text": audit.recurring[:5],
             "recurring_refused_text_flagged": audit.recurring_flagged[:5], "scores": audit.metrics,
             "report": str(rec_dir)}
    return block, audit.flagged_ids()


def keep_rows(data: Mapping[str, torch.Tensor], drop: Sequence[int]) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The training tensors without the rows ``drop`` (indices into them) -> (tensors, kept indices)."""
    n = next(iter(data.values())).shape[0]
    dropped = set(drop)
    kept = [i for i in range(n) if i not in dropped]
    idx = torch.as_tensor(kept, dtype=torch.long)
    return {k: v[idx] for k, v in data.items()}, kept
