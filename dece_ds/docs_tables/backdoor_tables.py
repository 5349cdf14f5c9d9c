"""Tables of ``benchmarks/results/backdoor/<stem>.json`` (written by ``dece-ds backdoor run``): a row per run
(``backdoor-runs``), ASR per epoch (``backdoor-epochs``), several files side by side (``backdoor-combined``),
CE against DeCE per file (``backdoor-headline``). Each takes ``KIND:STEM[,STEM...]``. ``backdoor-target-probs:STEM``
prints ``benchmarks/backdoor_target_probs.py``'s JSON (where each alpha rule puts the half-gradient point);
``backdoor-grid:STEM,...`` the trigger x payload grid (``dece-ds backdoor report --grid``);
``backdoor-seeds:STEM,...`` mean ± std over the files' fine-tuning seeds and each defended run's paired BLEU gap to
CE (``dece-ds backdoor report``); ``backdoor-climb:STEM,...`` every DeCE run's half-gradient point at its last
epoch against its ASR; ``backdoor-auto:STEM,...`` each alpha_base "auto" run against CE in the same setting.
A stem with a folder (``audit/NAME``) is read from ``benchmarks/results/``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from .common import RESULTS, TableError, fmt, load_json, md_table, split_stems

BACKDOOR = RESULTS / "backdoor"
HEADLINE_SPECS = ("ce", "dece:alpha_base=0.97")


def _backdoor(root: Path, stem: str) -> dict[str, Any]:
    """``benchmarks/results/backdoor/<stem>.json``, or ``benchmarks/results/<stem>.json`` for a stem with a folder
    (``audit/NAME``: the poison audit's results files, which ``dece-ds backdoor run`` writes too)."""
    if ".." in Path(stem).parts or Path(stem).is_absolute():
        raise TableError(f"{stem}: a results-file stem is a name or a folder/name under {RESULTS}")
    rel = (RESULTS if "/" in stem else BACKDOOR) / f"{stem}.json"
    results = load_json(root, rel)
    if not isinstance(results, dict) or "runs" not in results:
        raise TableError(f"{rel}: not a backdoor results file (no 'runs')")
    return results


def _run_label(spec: str, run: Mapping[str, Any]) -> str:
    """``report.run_label``, naming the alpha_base a bare ``dece`` spec resolved to (from the run's record), and
    the value an alpha_base "auto" picked."""
    from ..backdoor.report import auto_alpha_note, run_label
    kind, _, params = spec.partition(":")
    alpha = (run.get("loss") or {}).get("alpha_base")
    if kind == "dece" and "alpha_base=" not in params and "preset=" not in params and alpha is not None:
        spec = f"dece:alpha_base={'auto' if run.get('alpha_auto') else format(alpha, 'g')}" + (
            f",{params}" if params else "")
    return run_label(spec) + auto_alpha_note(run)


def _ordered_runs(results: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """The paper's row order (clean, CE, DeCE variants, baselines), whatever order the runs were merged in."""
    from ..backdoor.report import RUN_LABELS
    kinds = list(RUN_LABELS)

    def rank(spec: str) -> int:
        kind = spec.partition(":")[0]
        return kinds.index(kind) if kind in kinds else len(kinds)
    return sorted(results["runs"].items(), key=lambda item: rank(item[0]))


def backdoor_runs(root: Path, arg: str) -> str:
    """One results file: a row per run, final epoch on the whole test set."""
    from ..backdoor.report import MISSING, has_lift
    stems = split_stems(arg, "backdoor-runs")
    loaded = [_backdoor(root, stem) for stem in stems]
    lift = has_lift(loaded)  # results with the trigger lift get its column ("–" for older files beside them)
    rows = []
    for stem, results in zip(stems, loaded):
        for spec, run in _ordered_runs(results):
            f = run["final"]
            label = _run_label(spec, run)
            first = [f"`{stem}`", label] if len(stems) > 1 else [label]
            rows.append(first + [fmt(f["bleu"]), fmt(f.get("codebleu")), fmt(f["asr"], 1)]
                        + ([MISSING if f.get("lift") is None else fmt(f["lift"], 1)] if lift else [])
                        + [fmt(f["false_trigger"], 1), fmt(f.get("valid_ce"), 3)])
    head = ["results", "run"] if len(stems) > 1 else ["run"]
    return md_table(head + ["BLEU", "CodeBLEU", "ASR %"] + (["lift"] if lift else [])
                    + ["false trigger %", "valid CE"], rows)


def backdoor_epochs(root: Path, arg: str) -> str:
    """ASR % per fine-tuning epoch, a row per run (epochs before the last: the first eval rows only)."""
    stems = split_stems(arg, "backdoor-epochs")
    results = [_backdoor(root, s) for s in stems]
    n = max(len(run["epochs"]) for r in results for run in r["runs"].values())
    rows = []
    for stem, r in zip(stems, results):
        for spec, run in _ordered_runs(r):
            asr = [fmt(e["asr"], 1) for e in run["epochs"]]
            label = _run_label(spec, run)
            first = [f"`{stem}`", label] if len(stems) > 1 else [label]
            rows.append(first + asr + ["-"] * (n - len(asr)))
    head = ["results", "ASR % at epoch"] if len(stems) > 1 else ["ASR % at epoch"]
    return md_table(head + [str(i + 1) for i in range(n)], rows)


def backdoor_combined(root: Path, arg: str) -> str:
    """Several results files side by side in the paper's layout (``dece-ds backdoor report``)."""
    from ..backdoor.report import combined_table
    return combined_table([_backdoor(root, s) for s in split_stems(arg, "backdoor-combined")])


def backdoor_grid(root: Path, arg: str) -> str:
    """One row per grid point (trigger, payload): ASR / lift / BLEU per run, then each run's mean and worst ASR."""
    from ..backdoor.aggregate import grid_table
    return grid_table([_backdoor(root, s) for s in split_stems(arg, "backdoor-grid")])


def backdoor_headline(root: Path, arg: str) -> str:
    """CE against DeCE ``alpha_base=0.97`` (the ``backdoor_guard`` preset), one row per results file."""
    from ..backdoor.report import column_name
    rows = []
    for stem in split_stems(arg, "backdoor-headline"):
        r = _backdoor(root, stem)
        missing = [s for s in HEADLINE_SPECS if s not in r["runs"]]
        if missing:
            raise TableError(f"{stem}.json: no run {missing[0]!r} for the headline table")
        ce, dece = (r["runs"][s]["final"] for s in HEADLINE_SPECS)
        rows.append([f"{r['dataset']} {column_name(r)}", fmt(ce["asr"], 1), f"**{fmt(dece['asr'], 1)}**",
                     f"{fmt(ce['bleu'])} / {fmt(dece['bleu'])}"])
    return md_table(["attack, poison rate", "ASR % with CE", "ASR % with DeCE", "BLEU: CE / DeCE"], rows)


def backdoor_target_probs(root: Path, arg: str) -> str:
    """Per cell and rule: alpha_base, half-point p_half, share of clean and of payload tokens below it."""
    rows = []
    for stem in split_stems(arg, "backdoor-target-probs"):
        data = load_json(root, BACKDOOR / f"{stem}.json")
        if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
            raise TableError(f"{BACKDOOR / stem}.json: not a backdoor_target_probs.py file (no 'files')")
        for cell, figures in data["files"].items():
            for i, r in enumerate(figures["rules"]):
                below = "-" if r["payload_below"] is None else f"{100 * r['payload_below']:.1f} %"
                rows.append([f"`{cell}`" if i == 0 else "", r["rule"], f"{r['alpha_base']:.4f}", f"{r['p_half']:.3g}",
                             f"{100 * r['clean_below']:.1f} %", below])
    return md_table(["results file", "rule", "alpha_base", "p_half", "clean tokens below", "payload tokens below"],
                    rows)


def backdoor_seeds(root: Path, arg: str) -> str:
    """Over the fine-tuning seeds of the files: per cell and run, mean ± std of BLEU, ASR, lift and validation CE;
    then each defended run's BLEU gap to CE paired per seed, and whether it is larger than the seed spread."""
    from ..backdoor.aggregate import gap_table, seed_table
    loaded = [_backdoor(root, s) for s in split_stems(arg, "backdoor-seeds")]
    return seed_table(loaded) + "\n\n" + gap_table(loaded)


def backdoor_climb(root: Path, arg: str) -> str:
    """Every DeCE run of the files, ordered by the half-gradient point p_half = (1 - a)(1 - eps) / a at its last
    epoch (a: the alpha the run recorded for that epoch): how far the half-point climbed against the ASR."""
    from ..auto_alpha import half_point
    rows = []
    for stem in split_stems(arg, "backdoor-climb"):
        r = _backdoor(root, stem)
        ce = r["runs"].get("ce", {}).get("final", {}).get("asr")
        for spec, run in r["runs"].items():
            last = run["epochs"][-1] if run.get("epochs") else {}
            if run.get("kind", spec.partition(":")[0]) != "dece" or last.get("alpha") is None:
                continue
            p_half = half_point(last["alpha"], run["loss"]["label_smoothing"])
            rows.append((p_half, [f"`{stem}`", _run_label(spec, run), f"{run['loss']['alpha_base']:.4g}",
                                  str(len(run["epochs"])), f"{last['alpha']:.3f}", f"{p_half:.3f}",
                                  fmt(ce, 1), fmt(run["final"]["asr"], 1)]))
    if not rows:
        raise TableError(f"backdoor-climb:{arg}: no DeCE run with a recorded alpha")
    return md_table(["results", "run", "alpha_base", "epochs", "alpha at the last epoch", "p_half at the last epoch",
                     "CE's ASR %", "ASR %"], [row for _, row in sorted(rows, key=lambda x: x[0])])


def backdoor_auto(root: Path, arg: str) -> str:
    """Per setting of the files (``aggregate.setting_key``): CE, each alpha_base "auto" run, the gap and the call."""
    from ..backdoor.aggregate import auto_table
    stems = split_stems(arg, "backdoor-auto")
    try:
        return auto_table([(stem, _backdoor(root, stem)) for stem in stems])
    except ValueError as e:
        raise TableError(f"backdoor-auto:{arg}: {e}") from None
