"""Tables over several results files: fine-tuning seeds (mean ± std, DeCE's BLEU gap to CE), the
trigger x payload grid, and alpha_base "auto" against CE setting by setting (``auto_rows``).

Seeds. A *cell* is one data set / attack / trigger count / poison rate (``report.column_name``); results
files of one cell and one setting (stand-in size, rows, lengths, epochs: ``setting_key``) with different
fine-tuning seeds (``results["finetune_seed"]``; older files:
``config.finetune_seed``, else ``config.seed``) are its seeds. Files of one cell and one seed are merged
(split runs, ``--runs ce`` / ``--runs dece``). Per run spec and cell: mean ± sample standard deviation
(n - 1) over seeds of BLEU, ASR and lift.

The gap test (``gap_rows``): for every defended run spec (``DEFENDED_KINDS``: DeCE, and the poison audit's
retrain and repair), per seed s that has both, d_s = BLEU(spec, s) - BLEU(CE, s) (a paired difference: both
runs of a seed share the stand-in and the batch order). The seed-to-seed spread is the
pooled standard deviation of BLEU over seeds, s_pool = sqrt((s_CE^2 + s_DeCE^2) / 2). The gap is called
*larger than the spread* when |mean d| > 2 s_pool, and *within the spread* otherwise; with fewer than two
paired seeds there is no spread and no call. The table also gives the paired standard error sd(d)/sqrt(n).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import PurePath
from typing import Any, Mapping, NamedTuple, Sequence

from .report import MISSING, auto_alpha_note, column_name, run_label
from .specs import ModelSpec

DEFENDED_KINDS = ("dece", "audit_retrain", "audit_repair")


def finetune_seed(results: Mapping[str, Any]) -> int:
    if results.get("finetune_seed") is not None:
        return int(results["finetune_seed"])
    cfg = results.get("config") or {}
    seed = cfg.get("finetune_seed")
    return int(seed if seed is not None else cfg.get("seed", 0) or 0)


def cell_key(results: Mapping[str, Any]) -> str:
    return f"{results['dataset']} {column_name(results)}"


def by_cell_and_seed(results_list: Sequence[Mapping[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    """``{cell: {seed: {spec: run}}}`` in first-seen order; later files of a cell and seed add their runs.

    Files are grouped by their whole setting but the seed (``setting_key``: stand-in size, rows, lengths,
    epochs too), so two settings of one attack never pool as seeds; the label is the cell alone unless two
    groups share it, then the cell with the setting that tells them apart in parentheses."""
    groups: dict[Setting, dict[int, dict[str, Any]]] = {}
    for r in results_list:
        key = setting_key(r)._replace(seed=0)
        groups.setdefault(key, {}).setdefault(finetune_seed(r), {}).update(r["runs"])
    n_per_cell = Counter(key.cell for key in groups)
    return {(k.cell if n_per_cell[k.cell] == 1 else f"{k.cell} ({setting_label(k)})"): seeds
            for k, seeds in groups.items()}


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); std None for fewer than two values."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _ms(values: Sequence[float], digits: int) -> str:
    mean, std = mean_std(values)
    if mean is None:
        return MISSING
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def _values(seeds: Mapping[int, Mapping[str, Any]], spec: str, key: str) -> list[float]:
    out = []
    for runs in seeds.values():
        final = (runs.get(spec) or {}).get("final") or {}
        if final.get(key) is not None:
            out.append(float(final[key]))
    return out


def _specs(seeds: Mapping[int, Mapping[str, Any]]) -> list[str]:
    from .report import _row_rank
    specs: list[str] = []
    for runs in seeds.values():
        specs.extend(s for s in runs if s not in specs)
    return sorted(specs, key=_row_rank)


def seed_table(results_list: Sequence[Mapping[str, Any]]) -> str:
    """Per cell and run spec: seeds, BLEU, ASR, lift, clean validation CE as mean ± std over seeds (lift "–" where no
    file has it)."""
    lines = ["| cell | run | seeds | BLEU | ASR % | lift | valid CE |", "|---|---|---|---|---|---|---|"]
    for cell, seeds in by_cell_and_seed(results_list).items():
        for spec in _specs(seeds):
            have = sorted(s for s, runs in seeds.items() if spec in runs)
            lines.append(f"| {cell} | {run_label(spec)} | {','.join(map(str, have))} | "
                         f"{_ms(_values(seeds, spec, 'bleu'), 2)} | {_ms(_values(seeds, spec, 'asr'), 1)} | "
                         f"{_ms(_values(seeds, spec, 'lift'), 1)} | {_ms(_values(seeds, spec, 'valid_ce'), 3)} |")
    return "\n".join(lines)


def gap_rows(results_list: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per cell and defended run spec: the paired BLEU gap to CE over seeds and the call (module docstring)."""
    rows = []
    for cell, seeds in by_cell_and_seed(results_list).items():
        for spec in _specs(seeds):
            if spec.partition(":")[0] not in DEFENDED_KINDS:
                continue
            paired = [s for s, runs in seeds.items() if spec in runs and "ce" in runs]
            gaps = [seeds[s][spec]["final"]["bleu"] - seeds[s]["ce"]["final"]["bleu"] for s in paired]
            mean, sd = mean_std(gaps)
            _, s_ce = mean_std([seeds[s]["ce"]["final"]["bleu"] for s in paired])
            _, s_de = mean_std([seeds[s][spec]["final"]["bleu"] for s in paired])
            pooled = None if s_ce is None else math.sqrt((s_ce ** 2 + s_de ** 2) / 2)
            if mean is None or pooled is None:
                call = "no call (fewer than 2 paired seeds)"
            else:
                call = "larger than the spread" if abs(mean) > 2 * pooled else "within the spread"
            rows.append({"cell": cell, "spec": spec, "seeds": paired, "gap_mean": mean, "gap_sd": sd,
                         "gap_se": None if sd is None else sd / math.sqrt(len(gaps)), "pooled_std": pooled,
                         "call": call})
    return rows


def gap_table(results_list: Sequence[Mapping[str, Any]]) -> str:
    f = lambda x: MISSING if x is None else f"{x:+.2f}"  # noqa: E731
    g = lambda x: MISSING if x is None else f"{x:.2f}"  # noqa: E731
    lines = ["| cell | run | paired seeds | BLEU gap to CE: mean ± sd (se) | pooled seed std | "
             "\\|gap\\| vs 2 × pooled std |", "|---|---|---|---|---|---|"]
    for r in gap_rows(results_list):
        gap = f(r["gap_mean"]) + ("" if r["gap_sd"] is None else f" ± {g(r['gap_sd'])} ({g(r['gap_se'])})")
        lines.append(f"| {r['cell']} | {run_label(r['spec'])} | {','.join(map(str, r['seeds'])) or MISSING} | "
                     f"{gap} | {g(r['pooled_std'])} | {r['call']} |")
    return "\n".join(lines)


def has_several_seeds(results_list: Sequence[Mapping[str, Any]]) -> bool:
    return any(len(seeds) > 1 for seeds in by_cell_and_seed(results_list).values())


def seed_tables(results_list: Sequence[Mapping[str, Any]]) -> str:
    """Both seed tables with a heading line each (``dece-ds backdoor report`` prints them for several seeds)."""
    return ("Over fine-tuning seeds (mean ± sample std):\n\n" + seed_table(results_list)
            + "\n\nBLEU gap to CE of each defended run, paired per seed; 'larger than the spread' = |mean gap| > 2 × pooled "
              "seed std of BLEU:\n\n" + gap_table(results_list))


# ---- trigger x payload grid --------------------------------------------------------------------------

def grid_point(results: Mapping[str, Any]) -> tuple[str, str]:
    """(trigger, payload) of a results file, from its resolved attack."""
    attack = (results.get("config") or {}).get("attack_resolved") or {}
    trigger = attack.get("trigger") or ",".join(attack.get("triggers") or []) or attack.get("attack", "?")
    payload = attack.get("payload") or {}
    return trigger, payload.get("code") or payload.get("kind", "?")


def grid_table(results_list: Sequence[Mapping[str, Any]]) -> str:
    """One row per (trigger, payload) results file; per run spec ``ASR / lift / BLEU``; then per spec the mean
    and the worst (highest) ASR over the grid."""
    specs: list[str] = []
    for r in results_list:
        specs.extend(s for s in r["runs"] if s not in specs)
    from .report import _row_rank
    specs.sort(key=_row_rank)
    lines = ["| trigger | payload | " + " | ".join(f"{run_label(s)}: ASR / lift / BLEU" for s in specs) + " |",
             "|---|---|" + "---|" * len(specs)]
    for r in results_list:
        trigger, payload = grid_point(r)
        cells = []
        for s in specs:
            final = (r["runs"].get(s) or {}).get("final")
            lift = MISSING if final is None or final.get("lift") is None else f"{final['lift']:.1f}"
            cells.append("-" if final is None else
                         f"{final['asr']:.1f} / {lift} / {final['bleu']:.2f}" + auto_alpha_note(r["runs"][s]))
        lines.append(f"| `{trigger}` | `{payload}` | " + " | ".join(cells) + " |")
    summary = []
    for s in specs:
        asr = [r["runs"][s]["final"]["asr"] for r in results_list if s in r["runs"]]
        mean, _ = mean_std(asr)
        summary.append(MISSING if mean is None else f"mean {mean:.1f}, worst {max(asr):.1f}")
    lines.append("| all | ASR over the grid | " + " | ".join(summary) + " |")
    return "\n".join(lines)


# ---- alpha_base "auto" across settings ---------------------------------------------------------------

AUTO_CE_ASR_FLOOR = 30.0   # a cell tests the defence only where CE learned the backdoor at least this often
AUTO_HELD_ASR = 2.0        # "held": the auto run's ASR at most this


class Setting(NamedTuple):
    """What makes two results files one experiment (their CE and DeCE runs are then comparable)."""
    cell: str            # data set, attack column (``report.column_name``)
    stand_in: str        # layers x width, e.g. "4x256"
    rows: int | None     # fine-tuning rows
    max_len: int | None
    max_src_tokens: int | None
    epochs: int | None
    seed: int            # fine-tuning seed


def stand_in_name(model: Mapping[str, Any]) -> str:
    """A results file's ``config.model`` as ``"<layers>x<width>"`` (``ModelSpec``'s defaults for keys it lacks),
    or ``"checkpoint <folder name>"`` when it fine-tuned a local checkpoint."""
    if model.get("checkpoint"):
        return f"checkpoint {PurePath(model['checkpoint']).name}"
    defaults = ModelSpec.model_fields
    return f"{model.get('n_layer', defaults['n_layer'].default)}x{model.get('n_embd', defaults['n_embd'].default)}"


def setting_label(key: Setting) -> str:
    """``"4x256, 1600 rows, 96/192 tokens, 10 epochs"``: the setting without its cell and seed."""
    return f"{key.stand_in}, {key.rows} rows, {key.max_src_tokens}/{key.max_len} tokens, {key.epochs} epochs"


def setting_key(results: Mapping[str, Any]) -> Setting:
    cfg = results.get("config") or {}
    model, ft = cfg.get("model") or {}, cfg.get("finetune") or {}
    return Setting(cell_key(results), stand_in_name(model), results.get("data", {}).get("finetune_rows"),
                   model.get("max_len"), model.get("max_src_tokens"), ft.get("epochs"), finetune_seed(results))


def auto_rows(named: Sequence[tuple[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Per setting (``setting_key``) of the ``(stem, results)`` pairs: CE's ASR and BLEU, and each alpha_base
    "auto" DeCE run's pick, ASR, lift, BLEU, its BLEU gap to CE and the call: "held" (ASR ≤ 2 %), "learned",
    or no call where CE's ASR is below 30 % or there is no CE run."""
    stems: dict[Setting, list[str]] = {}
    runs: dict[Setting, dict[str, Any]] = {}
    for stem, r in named:
        key = setting_key(r)
        stems.setdefault(key, []).append(stem)
        runs.setdefault(key, {}).update(r["runs"])
    rows = []
    for key, setting_runs in runs.items():
        ce = (setting_runs.get("ce") or {}).get("final")
        for run in setting_runs.values():
            if not run.get("alpha_auto"):
                continue
            final = run["final"]
            if ce is None or ce.get("asr") is None:
                call = "no call (no CE run)"
            elif ce["asr"] < AUTO_CE_ASR_FLOOR:
                call = f"no call (CE below {AUTO_CE_ASR_FLOOR:g} %)"
            else:
                call = "held" if final["asr"] <= AUTO_HELD_ASR else "learned"
            rows.append({"cell": key.cell, "stand_in": key.stand_in, "rows": key.rows, "max_len": key.max_len,
                         "epochs": key.epochs, "seed": key.seed, "stems": stems[key],
                         "ce_asr": None if ce is None else ce.get("asr"),
                         "ce_bleu": None if ce is None else ce.get("bleu"),
                         "alpha_base": run["alpha_auto"]["alpha_base"], "asr": final["asr"],
                         "lift": final.get("lift"), "bleu": final["bleu"],
                         "gap": None if ce is None else final["bleu"] - ce["bleu"], "call": call})
    return rows


def auto_table(named: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """``auto_rows`` as markdown: one row per setting and auto run; ``ValueError`` when no file has an auto run."""
    rows = auto_rows(named)
    if not rows:
        raise ValueError("no DeCE run with alpha_base 'auto' in these files")
    f1 = lambda x: MISSING if x is None else f"{x:.1f}"  # noqa: E731
    f2 = lambda x: MISSING if x is None else f"{x:.2f}"  # noqa: E731
    lines = ["| cell | stand-in / rows / tokens / epochs | seed | results | CE: ASR % / BLEU | auto alpha_base | "
             "auto: ASR % / lift / BLEU | BLEU − CE | call |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['cell']} | {r['stand_in']} / {r['rows']} / {r['max_len']} / {r['epochs']} | {r['seed']} | "
                     f"{', '.join(f'`{s}`' for s in r['stems'])} | {f1(r['ce_asr'])} / {f2(r['ce_bleu'])} | "
                     f"{r['alpha_base']:.4f} | {f1(r['asr'])} / {f1(r['lift'])} / {f2(r['bleu'])} | "
                     f"{MISSING if r['gap'] is None else format(r['gap'], '+.2f')} | {r['call']} |")
    return "\n".join(lines)
