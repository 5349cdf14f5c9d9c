"""Tables of docs/audit.md, printed from the committed results under ``benchmarks/results/audit/`` by
``dece-ds docs tables --write`` (registered in ``dece_ds.docs_tables.GENERATORS``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .report import code_cell

AUDIT_RESULTS = Path("benchmarks") / "results" / "audit"


def _results(root: Path, stem: str) -> dict[str, Any]:
    from ..docs_tables import TableError, _load
    results = _load(root, AUDIT_RESULTS / f"{stem}.json")
    audited = [(spec, run) for spec, run in results.get("runs", {}).items() if "audit" in run]
    if not audited:
        raise TableError(f"{AUDIT_RESULTS / stem}.json: no audited dece run (no 'audit' block)")
    return results


def scores_table(root: Path, arg: str) -> str:
    """Per score, against the poisoner's indices: AUROC, precision@k, recall at 1 % / 5 % FPR, the cut."""
    from ..docs_tables import _f, _md
    results = _results(root, arg)
    rows = []
    for spec, run in results["runs"].items():
        block = run.get("audit")
        if not block:
            continue
        for name, m in block["scores"].items():
            label = f"**{name}**" if name == block["score"] else name
            rows.append([spec, label, _f(m["auroc"], 3), _f(m["precision_at_k"], 3), _f(m["recall_at_fpr"]["0.01"], 3),
                         _f(m["recall_at_fpr"]["0.05"], 3), f"{m['flagged']} ({m['flagged_poisoned']})",
                         str(m["true_poisoned"])])
    return _md(["run", "score", "AUROC", "precision@k", "recall @1% FPR", "recall @5% FPR",
                "flagged (of them poisoned)", "poisoned rows"], rows)


def cells_table(root: Path, arg: str) -> str:
    """One row per audited DeCE run of one or more results files (stems): the cell (attack, trigger words per
    row, rate), the ranking score against the poisoner's indices, what the cut flagged, and the trigger words
    named for the flagged rows with the code their rows share. Metrics and names come from the run's
    ``audit_summary.json``, the latest scoring of its record (``dece-ds audit`` on the record rewrites it),
    and fall back to the results file's ``audit`` block."""
    from ..backdoor.report import column_name
    from ..docs_tables import _f, _load, _md, _stems
    rows = []
    for stem in _stems(arg, "audit-cells"):
        results = _results(root, stem)
        for spec, run in results["runs"].items():
            if "audit" not in run:
                continue
            m = run["audit"]
            summary = _load(root, Path(m["report"]) / "audit_summary.json")
            # the latest scoring of the record: the run's own, or `dece-ds audit` run on it again since
            score = summary.get("score", m["score"])
            m = {**m, **(summary.get("metrics") or {}).get(score, {}), "score": score}
            named = ", ".join(f"{code_cell(t['word'], None)} → {code_cell(t['code'], None)} ({t['rows']})"
                              for t in (summary.get("trigger_words") or [])[:4]) or "none"
            rows.append([f"{results.get('dataset', '')} {column_name(results)}".strip(), f"`{m['score']}`", _f(m["auroc"], 3), _f(m["precision_at_k"], 3),
                         _f(m["recall_at_fpr"]["0.01"], 3), _f(m["recall_at_fpr"]["0.05"], 3),
                         f"{m['flagged']} ({m['flagged_poisoned']})", str(m["true_poisoned"]), named])
    return _md(["cell", "score", "AUROC", "precision@k", "recall @1% FPR", "recall @5% FPR",
                "flagged (of them poisoned)", "poisoned rows", "trigger word → shared code (flagged rows)"], rows)


def retrain_table(root: Path, arg: str) -> str:
    """A row per run (final epoch, whole test set) of one or more results files (one of them with an audited
    dece run), with the rows each trained on."""
    from ..backdoor.report import run_label
    from ..docs_tables import TableError, _f, _load, _md, _stems
    rows = []
    stems = _stems(arg, "audit-retrain")
    files = {stem: _load(root, AUDIT_RESULTS / f"{stem}.json") for stem in stems}
    if not any("audit" in run or "audit_file" in run for results in files.values()
               for run in results.get("runs", {}).values()):
        raise TableError(f"{', '.join(stems)}: no audited dece run and no run after an audit (no 'audit' or "
                         f"'audit_file' key)")
    for stem, results in files.items():   # e.g. the audited dece + audit_retrain file and the ce file
        n = results["data"]["finetune_rows"]
        for spec, run in results["runs"].items():
            f = run["final"]
            label = run_label(spec)
            trained = n - len(run.get("dropped_rows", []))
            rows.append([f"`{stem}`", label, str(trained), _f(f["bleu"]), _f(f.get("codebleu")), _f(f["asr"], 1),
                         _f(f["false_trigger"], 1), _f(f.get("valid_ce"), 3)])
    return _md(["results", "run", "rows trained on", "BLEU", "CodeBLEU", "ASR %", "false trigger %", "valid CE"],
               rows)


def recurring_table(root: Path, arg: str) -> str:
    """The refused text recurring in the most rows of each audited run, among the flagged rows and among all
    (from the run's ``audit_summary.json``, written by ``dece-ds audit`` on its record folder)."""
    import re

    from ..docs_tables import _load, _md
    results = _results(root, arg)
    rows = []
    for spec, run in results["runs"].items():
        if "audit" not in run:
            continue
        folder = AUDIT_RESULTS / f"{arg}-audit" / re.sub(r"[^A-Za-z0-9_.=-]+", "_", spec)
        summary = _load(root, folder / "audit_summary.json")
        for where, key in (("flagged rows", "recurring_refused_text_flagged"), ("all rows", "recurring_refused_text")):
            for text, count in (summary.get(key) or [])[:5]:
                rows.append([spec, where, code_cell(text, None), str(count)])
    return _md(["run", "among", "refused text", "rows"], rows)


BASELINE_LABELS = {"ce_loss": "per-row CE loss (high = suspicious)", "spectral": "spectral signature",
                   "ngram": "n-gram naturalness"}
FIT_ON = {"held_apart_clean": "held-apart clean rows", "training_rows": "training rows"}


def baselines_table(root: Path, arg: str) -> str:
    """The audit against the baseline detectors on the same rows, per results file (one or more stems): the
    audit's ranking score of each audited ``dece`` run (its ``"audit"`` block) and the three baselines of each
    ``ce`` run (its ``"audit_baselines"`` block, ``dece-ds backdoor run --audit-baselines``; some file must have
    one), against the poisoner's indices: AUROC, precision@k, recall at 1 % / 5 % FPR, the audit's cut."""
    from ..backdoor.report import run_label
    from ..docs_tables import TableError, _f, _load, _md, _stems
    rows = []

    def row(stem, spec, detector, m):
        rows.append([f"`{stem}`", run_label(spec), detector, _f(m["auroc"], 3), _f(m["precision_at_k"], 3),
                     _f(m["recall_at_fpr"]["0.01"], 3), _f(m["recall_at_fpr"]["0.05"], 3),
                     f"{m['flagged']} ({m['flagged_poisoned']})", str(m["true_poisoned"])])

    stems = _stems(arg, "audit-baselines")
    all_runs = {stem: _load(root, AUDIT_RESULTS / f"{stem}.json").get("runs", {}) for stem in stems}
    if not any("audit_baselines" in run for runs in all_runs.values() for run in runs.values()):
        raise TableError(f"{', '.join(stems)}: no ce run with an 'audit_baselines' block "
                         f"(dece-ds backdoor run --audit-baselines)")
    for stem, runs in all_runs.items():   # a file may hold only the audited dece run, another the ce run
        for spec, run in runs.items():
            if "audit" in run:
                row(stem, spec, f"audit (`{run['audit']['score']}`)", run["audit"])
            for name, m in run.get("audit_baselines", {}).items():
                label = BASELINE_LABELS.get(name, name)
                if name == "ce_loss" and m.get("auroc_low") is not None:
                    label += f"; low = suspicious: AUROC {m['auroc_low']:.3f}"
                if name == "ngram" and m.get("fit_on"):
                    label += f" (fitted on the {FIT_ON.get(m['fit_on'], m['fit_on'])})"
                row(stem, spec, label, m)
    return _md(["results", "run", "detector", "AUROC", "precision@k", "recall @1% FPR", "recall @5% FPR",
                "flagged (of them poisoned)", "poisoned rows"], rows)


def summary_table(root: Path, arg: str) -> str:
    """Every score of one record folder's ``audit_summary.json`` (``arg``: the folder under
    ``benchmarks/results/audit/``, as written by ``dece-ds audit`` on it), the ranking score in bold, and the
    trigger words of its flagged rows with the code those rows share (its ``"trigger_words"``)."""
    from ..docs_tables import TableError, _f, _load, _md
    folder = AUDIT_RESULTS / arg
    summary = _load(root, folder / "audit_summary.json")
    if not summary.get("metrics"):
        raise TableError(f"{folder}/audit_summary.json: no metrics (audit it with the poisoned rows' labels)")
    rows = []
    for name, m in summary["metrics"].items():
        label = f"**{name}**" if name == summary["score"] else name
        rows.append([label, _f(m["auroc"], 3), _f(m["precision_at_k"], 3), _f(m["recall_at_fpr"]["0.01"], 3),
                     _f(m["recall_at_fpr"]["0.05"], 3), f"{m['flagged']} ({m['flagged_poisoned']})",
                     str(m["true_poisoned"])])
    table = _md(["score", "AUROC", "precision@k", "recall @1% FPR", "recall @5% FPR", "flagged (of them poisoned)",
                 "poisoned rows"], rows)
    triggers = summary.get("trigger_words") or []
    if triggers:
        table += "\n\n" + _md(["trigger word of flagged rows", "flagged rows", "code those rows share"],
                              [[code_cell(t["word"], None), str(t["rows"]), code_cell(t["code"], None)]
                               for t in triggers[:5]])
    return table
