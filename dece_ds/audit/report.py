"""The audit's outputs: ``audit.jsonl`` (one line per row, most suspicious first), ``audit.md`` (the cut, the
top rows with their refused spans, the recurring refused text), ``audit.png`` (score distribution; ROC
when the poisoned rows are known) and ``audit_summary.json`` (the cut and, with labels, the metrics)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .score import Audit, AuditRecordError

TOP_ROWS = 30


def audit_lines(audit_file: str | os.PathLike) -> list[tuple[int, dict]]:
    """``(line number, row dict)`` of every row of an ``audit.jsonl``, each with an int ``row`` and a bool
    ``flagged``; ``AuditRecordError`` naming the file (and line) for a missing file or a bad line."""
    path = Path(audit_file)
    if not path.is_file():
        raise AuditRecordError(f"{path}: no such audit file (expected the audit.jsonl of `dece-ds audit`)")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            rec["row"], rec["flagged"] = int(rec["row"]), bool(rec["flagged"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise AuditRecordError(f"{path}: line {n} is not an audit row ({e})") from None
        out.append((n, rec))
    return out


def flagged_rows(audit_file: str | os.PathLike) -> list[int]:
    """The row ids an ``audit.jsonl`` flagged (``"flagged": true``); ``AuditRecordError`` for a bad file."""
    return [rec["row"] for _, rec in audit_lines(audit_file) if rec["flagged"]]


def write_audit(audit: Audit, out_dir: str | os.PathLike, *, instructions: Mapping[int, str] | None = None,
                decode: Callable[[list[int]], str] | None = None, poisoned: Sequence[int] | None = None,
                extra: Mapping[str, Any] | None = None) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = decode or (lambda ids: " ".join(map(str, ids)))
    instructions = instructions or {}
    labels = set(poisoned) if poisoned is not None else None
    order = np.argsort([-r.scores[audit.primary] for r in audit.rows], kind="stable")
    lines = []
    for i in order:
        r, f = audit.rows[i], bool(audit.flagged[i])
        rec = {"row": r.row, "score": r.scores[audit.primary], "flagged": f, "scores": r.scores,
               "refused_spans": [text(list(s)) for s in r.refused_spans], "refused_positions": r.refused_positions,
               "instruction": instructions.get(r.row), "trigger_word": r.trigger_word,
               "trigger_code": None if r.trigger_code is None else text(list(r.trigger_code)),
               "trigger_code_ids": None if r.trigger_code is None else [int(t) for t in r.trigger_code]}
        if labels is not None:
            rec["poisoned"] = r.row in labels
        lines.append(json.dumps(rec))
    paths = {"jsonl": out_dir / "audit.jsonl", "md": out_dir / "audit.md", "summary": out_dir / "audit_summary.json"}
    paths["jsonl"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = {"score": audit.primary, "rows": len(audit.rows), "flagged": audit.flagged_ids(), "cut": audit.cut,
               "recurring_refused_text": audit.recurring, "recurring_refused_text_flagged": audit.recurring_flagged,
               "trigger_words": [{"word": w, "code": text(list(code)), "rows": n} for (w, code), n in trigger_words(audit)],
               "metrics": audit.metrics, **dict(extra or {})}
    paths["summary"].write_text(json.dumps(summary, indent=1), encoding="utf-8")
    paths["md"].write_text(markdown(audit, order, text, instructions, labels), encoding="utf-8")
    png = plot(audit, out_dir / "audit.png", labels)
    if png is not None:
        paths["png"] = png
    return paths


def _cell(s: str | None, width: int | None = 90) -> str:
    """``s`` as the text of a markdown table cell: ``|`` escaped, newlines shown as ⏎, cut at ``width``
    (``None``: not cut)."""
    s = (s or "").replace("|", "\\|").replace("\n", "⏎")
    return s if width is None or len(s) <= width else s[:width - 1] + "…"


def code_cell(s: str | None, width: int | None = 90) -> str:
    """``s`` in backticks as a markdown table cell (``_cell``; a backtick inside is shown as ')."""
    return f"`{_cell((s or '').replace('`', chr(39)), width)}`"


def markdown(audit: Audit, order, text, instructions, labels) -> str:
    c = audit.cut
    out = [f"# Poison audit: {len(audit.rows)} rows, score `{audit.primary}`", "",
           f"Cut: {c.get('rule')}; largest gap {c.get('gap', 0):.3f}, threshold score {c.get('threshold')}: "
           f"**{int(audit.flagged.sum())} row(s) flagged**.", ""]
    if audit.metrics:
        out += ["| score | AUROC | precision@k | recall @1% FPR | recall @5% FPR | flagged (poisoned) | true poisoned |",
                "|---|---|---|---|---|---|---|"]
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        for name, m in audit.metrics.items():
            out.append(f"| {name} | {fmt(m['auroc'])} | {fmt(m['precision_at_k'])} | {fmt(m['recall_at_fpr']['0.01'])} "
                       f"| {fmt(m['recall_at_fpr']['0.05'])} | {m['flagged']} ({m['flagged_poisoned']}) "
                       f"| {m['true_poisoned']} |")
        out.append("")
    triggers = trigger_words(audit)
    if triggers:
        out += ["## Trigger words of the flagged rows", "",
                "| word | flagged rows | code those rows share, that the others lack |", "|---|---|---|"]
        out += [f"| `{_cell(w)}` | {n} | `{_cell(text(list(code)))}` |" for (w, code), n in triggers]
        out.append("")
    if audit.recurring_flagged:
        out += ["## Refused text recurring in the flagged rows (rows)", "", "| refused text | rows |", "|---|---|"]
        out += [f"| `{_cell(t)}` | {n} |" for t, n in audit.recurring_flagged[:10]]
        out.append("")
    out += ["## Recurring refused text, all rows (rows)", "", "| refused text | rows |", "|---|---|"]
    out += [f"| `{_cell(t)}` | {n} |" for t, n in audit.recurring[:15]]
    out += ["", f"## Top {TOP_ROWS} rows", "",
            "| row | score | flagged | " + ("poisoned | " if labels is not None else "") + "refused spans | instruction |",
            "|---|---|---|" + ("---|" if labels is not None else "") + "---|---|"]
    for i in order[:TOP_ROWS]:
        r = audit.rows[i]
        spans = " · ".join(text(list(s)) for s in r.refused_spans)
        lab = f"{'yes' if r.row in labels else 'no'} | " if labels is not None else ""
        out.append(f"| {r.row} | {r.scores[audit.primary]:.2f} | {'yes' if audit.flagged[i] else ''} | {lab}"
                   f"`{_cell(spans, 60)}` | {_cell(instructions.get(r.row), 60)} |")
    return "\n".join(out) + "\n"


def trigger_words(audit: Audit) -> list[tuple[tuple[str, tuple[int, ...]], int]]:
    """``((word, shared code ids), flagged rows)`` of the flagged rows' trigger words, most rows first."""
    from collections import Counter
    counts = Counter((r.trigger_word, r.trigger_code) for r, f in zip(audit.rows, audit.flagged)
                     if f and r.trigger_word is not None and r.trigger_code)
    return counts.most_common(10)


def plot(audit: Audit, path: Path, labels) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    s = np.log1p(np.maximum([r.scores[audit.primary] for r in audit.rows], 0.0))
    y = None if labels is None else np.isin([r.row for r in audit.rows], list(labels))
    fig, axes = plt.subplots(1, 2 if y is not None else 1, figsize=(10 if y is not None else 5, 3.6))
    ax = axes[0] if y is not None else axes
    bins = np.linspace(0, max(float(s.max()), 1e-3), 40)
    if y is None:
        ax.hist(s, bins=bins, color="tab:blue")
    else:
        ax.hist([s[~y], s[y]], bins=bins, stacked=True, color=["tab:blue", "tab:red"], label=["clean", "poisoned"])
        ax.legend()
    if audit.cut.get("threshold") is not None:
        ax.axvline(np.log1p(audit.cut["threshold"]), color="k", ls="--", lw=1, label="cut")
    ax.set_xlabel(f"log(1 + {audit.primary})")
    ax.set_ylabel("rows")
    ax.set_yscale("log")
    if y is not None:
        ax2 = axes[1]
        for name in (audit.metrics or {}):
            sc = np.asarray([r.scores[name] for r in audit.rows])
            thr = np.unique(sc)[::-1]
            tpr = [((sc >= t) & y).sum() / max(1, y.sum()) for t in thr]
            fpr = [((sc >= t) & ~y).sum() / max(1, (~y).sum()) for t in thr]
            ax2.plot([0] + fpr, [0] + tpr, label=f"{name} ({audit.metrics[name]['auroc']:.3f})")
        ax2.plot([0, 1], [0, 1], color="grey", lw=0.5)
        ax2.set_xlabel("false-positive rate")
        ax2.set_ylabel("recall")
        ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
