"""Report of backdoor experiments: ``<stem>.json``, a markdown table in the paper's layout, PNG curves.

- ``<stem>.json``: the results dict of ``runner.run_experiment`` (schema in its docstring).
- ``<stem>.md``: the paper's table (rows clean / CE / DeCE / baselines; per attack the columns
  BLEU, CodeBLEU, ASR), then per run: false-trigger rate, exact match, clean validation CE, wall time.
- ``<stem>.png``: ASR and BLEU against epoch, one line per run (the "early learning" curve).
``combined_table(results_list)`` puts several results (attacks / rates) side by side as the paper does.

Trigger lift (``final.lift``: ASR minus the payload rate of the same prompts without the trigger) joins
the tables when any run has it; results written before it existed show "–". A DeCE run whose
alpha_base was "auto" shows the value picked (``alpha_auto.alpha_base``) beside its result. Over several
fine-tuning seeds: ``aggregate.seed_tables``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

RUN_LABELS = {"clean": "clean model", "ce": "CE on poisoned data", "dece": "DeCE on poisoned data",
              "ls": "label smoothing", "gce": "GCE (q=0.5)", "intrust": "In-trust (0.2 CE + 0.8 DCE)",
              "audit_retrain": "CE without the rows the audit flagged",
              "audit_repair": "CE with the flagged rows' payload masked"}


def run_label(spec: str) -> str:
    kind, _, params = spec.partition(":")
    label = RUN_LABELS.get(kind, kind)
    return f"{label} ({params})" if params else label


def check_stem(stem: str, field: str = "name") -> str:
    """``stem`` if it is a plain file name that stays inside the output folder; ``ValueError`` naming
    ``field`` otherwise (a path separator, ``..``, empty, a leading dot, a NUL byte)."""
    if not stem.strip() or stem.startswith(".") or any(c in stem for c in "/\\\0"):  # ".." starts with "."
        raise ValueError(f"{field}: must be a plain file name inside the output folder (no '/' or '\\', "
                         f"not empty, not starting with '.'), got {stem!r}")
    return stem


def _f(x, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


MISSING = "–"  # a key the results file predates (lift, untriggered payload rate)


def _opt(final, key: str, digits: int = 1) -> str:
    value = (final or {}).get(key)
    return MISSING if value is None else f"{value:.{digits}f}"


def has_lift(results_list: Sequence[Mapping[str, Any]]) -> bool:
    return any("lift" in (run.get("final") or {}) for r in results_list for run in r["runs"].values())


def auto_alpha_note(run: Mapping[str, Any]) -> str:
    """`` (auto alpha_base 0.9731)`` for a DeCE run whose alpha_base was "auto", else ``""``."""
    auto = run.get("alpha_auto")
    return "" if not auto else f" (auto alpha_base {auto['alpha_base']:.4f})"


def column_name(results: Mapping[str, Any]) -> str:
    """``"badpre 10%"``; ``"badpre x3 10%"`` when each instruction got more than one trigger word."""
    attack = (results.get("config") or {}).get("attack") or {}
    n = attack.get("n_insertions", 1)
    times = f" x{n}" if n and n > 1 else ""
    return f"{results['attack']}{times} {results['poison_rate']:g}%"


def _row_rank(spec: str) -> int:
    """clean, CE, DeCE variants, then the baselines in RUN_LABELS order, then anything else."""
    kinds = list(RUN_LABELS)
    kind = spec.partition(":")[0]
    return kinds.index(kind) if kind in kinds else len(kinds)


def combined_table(results_list: Sequence[Mapping[str, Any]]) -> str:
    """The paper's layout: a row per run, ``BLEU / CodeBLEU / ASR`` per (attack, trigger count, rate) column group."""
    specs: list[str] = []
    for r in results_list:
        specs.extend(s for s in r["runs"] if s not in specs)
    specs.sort(key=_row_rank)  # the paper's row order, whichever file a run came from
    lift = has_lift(results_list)
    what = "BLEU / CodeBLEU / ASR / lift" if lift else "BLEU / CodeBLEU / ASR"
    from .aggregate import finetune_seed, has_several_seeds
    seed = (lambda r: f" seed {finetune_seed(r)}") if has_several_seeds(results_list) else (lambda r: "")
    head = "| run | " + " | ".join(f"{column_name(r)}{seed(r)}: {what}" for r in results_list) + " |"
    lines = [head, "|---|" + "---|" * len(results_list)]
    for spec in specs:
        cells = []
        for r in results_list:
            run = r["runs"].get(spec, {})
            final = run.get("final")
            cells.append("-" if final is None else
                         f"{_f(final['bleu'])} / {_f(final.get('codebleu'))} / {_f(final['asr'], 1)}"
                         + (f" / {_opt(final, 'lift')}" if lift else "") + auto_alpha_note(run))
        lines.append(f"| {run_label(spec)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def detail_table(results: Mapping[str, Any]) -> str:
    lines = ["| run | BLEU | CodeBLEU | EM | ASR % | untriggered payload % | lift | false trigger % | valid CE "
             "| epochs | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for spec, run in results["runs"].items():
        f = run["final"]
        lines.append(f"| {run_label(spec)}{auto_alpha_note(run)} | {_f(f['bleu'])} | {_f(f.get('codebleu'))} | "
                     f"{_f(f.get('exact_match'), 1)} | {_f(f['asr'], 1)} | {_opt(f, 'untriggered_payload_rate')} | "
                     f"{_opt(f, 'lift')} | {_f(f['false_trigger'], 1)} | "
                     f"{_f(f.get('valid_ce'), 3)} | {len(run['epochs'])} | {run.get('wall_time_s', 0):.0f} |")
    return "\n".join(lines)


def curve_table(results: Mapping[str, Any]) -> str:
    """ASR / BLEU per epoch, a column per run (per-epoch rows may be a subset, see eval_rows)."""
    specs = list(results["runs"])
    n = max((len(r["epochs"]) for r in results["runs"].values()), default=0)
    lines = ["| epoch | " + " | ".join(f"{run_label(s)}: ASR / BLEU / valid CE" for s in specs) + " |",
             "|---|" + "---|" * len(specs)]
    for i in range(n):
        cells = []
        for s in specs:
            eps = results["runs"][s]["epochs"]
            cells.append("-" if i >= len(eps) else
                         f"{_f(eps[i]['asr'], 1)} / {_f(eps[i]['bleu'])} / {_f(eps[i].get('valid_ce'), 3)}")
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(results: Mapping[str, Any]) -> str:
    d = results.get("data", {})
    first_held, n_ft = d.get("held_apart_first_train_row"), d.get("finetune_rows")
    overlap = first_held is not None and n_ft is not None and first_held < n_ft
    pretrained = (f"the stand-in pretrained on {d.get('held_apart_rows')} clean task rows (train rows "
                  f"{first_held}+, also fine-tuned on, clean)" if overlap else
                  f"held-apart clean rows pretrained on {d.get('held_apart_rows')}")
    head = (f"## {results['dataset']} / {results['attack']} / {results['poison_rate']:g}% poisoned\n\n"
            f"Fine-tuning rows {n_ft} ({d.get('poisoned_rows')} poisoned), {pretrained}, test {d.get('test_rows')} clean / "
            f"{d.get('triggered_test_rows')} triggered (ASR denominator). Scores in %, greedy decoding; "
            f"valid CE = plain cross-entropy of the clean validation targets (nats/token).")
    return "\n\n".join([head, combined_table([results]), detail_table(results),
                        "Per epoch (early learning):", curve_table(results)]) + "\n"


def plot_curves(results: Mapping[str, Any], path: str | os.PathLike) -> Path | None:
    """ASR and BLEU against epoch, one line per run; None if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for spec, run in results["runs"].items():
        epochs = [e["epoch"] for e in run["epochs"]]
        axes[0].plot(epochs, [e["asr"] for e in run["epochs"]], marker="o", label=run_label(spec))
        axes[1].plot(epochs, [e["bleu"] for e in run["epochs"]], marker="o", label=run_label(spec))
    for ax, name in zip(axes, ("ASR (%)", "BLEU-4")):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(-2, 102)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{results['dataset']} / {results['attack']} / {results['poison_rate']:g}% poisoned")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results: Mapping[str, Any], out_dir: str | os.PathLike, stem: str) -> dict[str, Path]:
    """``out_dir/<stem>.json``, ``.md`` and ``.png``; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}
    paths["json"].write_text(json.dumps(results, indent=2, default=str))
    paths["md"].write_text(markdown_report(results))
    png = plot_curves(results, out_dir / f"{stem}.png")
    if png is not None:
        paths["png"] = png
    return paths


def merge_results(results_list: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One results dict from several of the same dataset / attack / trigger count / rate (parallel runs)."""
    first = dict(results_list[0])
    key = (first["dataset"], column_name(first))
    runs: dict[str, Any] = {}
    for r in results_list:
        if (r["dataset"], column_name(r)) != key:
            raise ValueError(f"merge: {r['dataset']} / {column_name(r)} differs from {key[0]} / {key[1]} "
                             "(dataset, attack, trigger count and poison rate must match)")
        runs.update(r["runs"])
    first["runs"] = runs
    first["merged_from"] = len(results_list)
    return first


RESULTS_KEYS = ("dataset", "attack", "poison_rate", "runs")


def load_results(paths: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """The results dicts of ``run_experiment``; ``DeceConfigError`` (a ``ValueError``) naming a file that is
    unreadable, not a JSON object, or without the results keys (``RESULTS_KEYS``, ``runs`` an object)."""
    from ..config import DeceConfigError, read_json_object
    loaded = []
    for p in paths:
        results = read_json_object(p, "a backdoor results")
        missing = [k for k in RESULTS_KEYS if k not in results]
        if missing or not isinstance(results["runs"], dict):
            raise DeceConfigError(f"{p}: not a results file of 'dece-ds backdoor run' "
                                  f"({'missing ' + ', '.join(missing) if missing else 'runs is not an object'})")
        loaded.append(results)
    return loaded
