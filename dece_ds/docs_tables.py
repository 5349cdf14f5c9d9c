"""Generated tables of README.md and docs/*.md, and the ``dece-ds config-schema`` / ``dece-ds docs`` commands.

Every table in the documentation sits between two markers and is printed from a committed file:

    <!-- table:NAME -->
    | ... generated ... |
    <!-- /table:NAME -->

``NAME`` is ``KIND`` or ``KIND:ARG``; ``KIND`` picks a generator in ``GENERATORS`` and ``ARG`` names its
inputs (results-file stems, comma-separated). The sources:

- ``config``, ``config-presets``: ``dece_ds.config.DeceConfig.model_fields`` and ``PRESETS``, read at run
  time, so a new field appears in the README as soon as it exists.
- ``backdoor-*``: ``benchmarks/results/backdoor/<stem>.json`` (written by ``dece-ds backdoor run``).
- ``bench-*``, ``planner-validation``: ``benchmarks/results/*.json`` (written by ``benchmarks/*.py``).
- ``plan``: ``benchmarks/results/plan/<stem>.json`` (written by ``dece-ds plan ... --json``).
- ``alpha-targets``: arithmetic of the alpha schedule, no measurement.

    dece-ds docs tables --write      # rewrite every marked table in place
    dece-ds docs tables --check      # exit 1 and name each table that differs from what would be printed
    dece-ds docs tables --print NAME # print one table

``tests/docs/test_tables.py`` runs the check, so a table that drifts from its file fails the suite.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path("benchmarks") / "results"
BACKDOOR = RESULTS / "backdoor"

MARKER_RE = re.compile(r"(?P<open><!-- table:(?P<name>[^\s>]+) -->\n)(?P<body>.*?)(?P<close><!-- /table:(?P=name) -->)",
                       re.S)


class TableError(ValueError):
    """A marker that names no generator, or a generator whose results file is missing or malformed."""


# --- helpers ----------------------------------------------------------------------------------------

def _load(root: Path, rel: Path) -> Any:
    path = root / rel
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TableError(f"results file not found: {rel}") from None
    except json.JSONDecodeError as e:
        raise TableError(f"results file {rel} is not valid JSON: {e}") from None


def _md(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _f(x: Any, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _stems(arg: str, kind: str) -> list[str]:
    stems = [s.strip() for s in arg.split(",") if s.strip()]
    if not stems:
        raise TableError(f"table '{kind}' needs results-file stems: {kind}:STEM[,STEM...]")
    return stems


def _provenance_line(prov: Mapping[str, Any], extra: str = "") -> str:
    bits = []
    if prov.get("date"):
        bits.append(str(prov["date"])[:10])
    if prov.get("cpu"):
        cores = prov.get("cores", prov.get("cpu_count"))
        bits.append(f"{prov['cpu']}" + (f", {cores} cores" if cores else ""))
    if prov.get("torch_threads") is not None:
        bits.append(f"{prov['torch_threads']} thread(s) per process")
    if prov.get("load_average_1m") is not None:
        bits.append(f"load average {prov['load_average_1m']:.1f}")
    if prov.get("torch"):
        bits.append(f"torch {prov['torch']}")
    if prov.get("git_sha"):
        bits.append(f"git {str(prov['git_sha'])[:7]}")
    return "Measured: " + ", ".join(bits) + (f"; {extra}" if extra else "") + "."


# --- config -----------------------------------------------------------------------------------------

def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:  # a union member with its own bounds: float (> 0.0, ≤ 1.0) | "auto"
        inner, *meta = typing.get_args(annotation)
        bounds = ", ".join(b for b in (_bounds(types.SimpleNamespace(metadata=list(m.metadata) if hasattr(m, "metadata")
                                                                      else [m])) for m in meta) if b)
        return _type_name(inner) + (f" ({bounds})" if bounds else "")
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


_BOUNDS = (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))


def _bounds(field) -> str:
    parts = []
    for item in field.metadata:
        for attr, sym in _BOUNDS:
            value = getattr(item, attr, None)
            if value is not None:
                parts.append(f"{sym} {value}")
    return ", ".join(parts)


def config_table(root: Path | None = None, arg: str = "", model: type | None = None) -> str:
    """Every ``dece`` key of ``DeceConfig`` (or ``model``): type (with bounds), default, meaning."""
    if model is None:
        from .config import DeceConfig as model
    rows = []
    for name, field in model.model_fields.items():
        kind = _type_name(field.annotation)
        bounds = _bounds(field)
        if bounds:
            kind += f" ({bounds})"
        default = json.dumps(field.get_default(call_default_factory=True))
        meaning = (field.description or "").replace("|", "\\|")
        rows.append([f"`{name}`", kind, f"`{default}`", meaning])
    return _md(["key", "type", "default", "meaning"], rows)


def presets_table(root: Path | None = None, arg: str = "") -> str:
    """The named settings of ``dece_ds.config.PRESETS`` and the keys each fills."""
    from .config import PRESETS
    keys: list[str] = []
    for values in PRESETS.values():
        keys.extend(k for k in values if k not in keys)
    rows = [[f"`\"{name}\"`"] + [json.dumps(values[k]) if k in values else "-" for k in keys]
            for name, values in PRESETS.items()]
    return _md(["preset"] + [f"`{k}`" for k in keys], rows)


def config_schema_json() -> str:
    from .config import DeceConfig
    return json.dumps(DeceConfig.model_json_schema(), indent=2)


# --- backdoor results ---------------------------------------------------------------------------------

def _backdoor(root: Path, stem: str) -> dict[str, Any]:
    results = _load(root, BACKDOOR / f"{stem}.json")
    if not isinstance(results, dict) or "runs" not in results:
        raise TableError(f"{BACKDOOR / stem}.json: not a backdoor results file (no 'runs')")
    return results


def _run_label(spec: str, run: Mapping[str, Any]) -> str:
    """``report.run_label``, naming the alpha_base a bare ``dece`` spec resolved to (from the run's record), and
    the value an alpha_base "auto" picked."""
    from .backdoor.report import auto_alpha_note, run_label
    kind, _, params = spec.partition(":")
    alpha = (run.get("loss") or {}).get("alpha_base")
    if kind == "dece" and "alpha_base=" not in params and "preset=" not in params and alpha is not None:
        spec = f"dece:alpha_base={'auto' if run.get('alpha_auto') else format(alpha, 'g')}" + (
            f",{params}" if params else "")
    return run_label(spec) + auto_alpha_note(run)


def _ordered_runs(results: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """The paper's row order (clean, CE, DeCE variants, baselines), whatever order the runs were merged in."""
    from .backdoor.report import RUN_LABELS
    kinds = list(RUN_LABELS)

    def rank(spec: str) -> int:
        kind = spec.partition(":")[0]
        return kinds.index(kind) if kind in kinds else len(kinds)
    return sorted(results["runs"].items(), key=lambda item: rank(item[0]))


def backdoor_runs(root: Path, arg: str) -> str:
    """One results file: a row per run, final epoch on the whole test set."""
    from .backdoor.report import MISSING, has_lift
    stems = _stems(arg, "backdoor-runs")
    loaded = [_backdoor(root, stem) for stem in stems]
    lift = has_lift(loaded)  # results with the trigger lift get its column ("–" for older files beside them)
    rows = []
    for stem, results in zip(stems, loaded):
        for spec, run in _ordered_runs(results):
            f = run["final"]
            label = _run_label(spec, run)
            first = [f"`{stem}`", label] if len(stems) > 1 else [label]
            rows.append(first + [_f(f["bleu"]), _f(f.get("codebleu")), _f(f["asr"], 1)]
                        + ([MISSING if f.get("lift") is None else _f(f["lift"], 1)] if lift else [])
                        + [_f(f["false_trigger"], 1), _f(f.get("valid_ce"), 3)])
    head = ["results", "run"] if len(stems) > 1 else ["run"]
    return _md(head + ["BLEU", "CodeBLEU", "ASR %"] + (["lift"] if lift else []) + ["false trigger %", "valid CE"],
               rows)


def backdoor_epochs(root: Path, arg: str) -> str:
    """ASR % per fine-tuning epoch, a row per run (epochs before the last: the first eval rows only)."""
    stems = _stems(arg, "backdoor-epochs")
    results = [_backdoor(root, s) for s in stems]
    n = max(len(run["epochs"]) for r in results for run in r["runs"].values())
    rows = []
    for stem, r in zip(stems, results):
        for spec, run in _ordered_runs(r):
            asr = [_f(e["asr"], 1) for e in run["epochs"]]
            label = _run_label(spec, run)
            first = [f"`{stem}`", label] if len(stems) > 1 else [label]
            rows.append(first + asr + ["-"] * (n - len(asr)))
    head = ["results", "ASR % at epoch"] if len(stems) > 1 else ["ASR % at epoch"]
    return _md(head + [str(i + 1) for i in range(n)], rows)


def backdoor_combined(root: Path, arg: str) -> str:
    """Several results files side by side in the paper's layout (``dece-ds backdoor report``)."""
    from .backdoor.report import combined_table
    return combined_table([_backdoor(root, s) for s in _stems(arg, "backdoor-combined")])


HEADLINE_SPECS = ("ce", "dece:alpha_base=0.97")


def backdoor_headline(root: Path, arg: str) -> str:
    """CE against DeCE ``alpha_base=0.97`` (the ``backdoor_guard`` preset), one row per results file."""
    from .backdoor.report import column_name
    rows = []
    for stem in _stems(arg, "backdoor-headline"):
        r = _backdoor(root, stem)
        missing = [s for s in HEADLINE_SPECS if s not in r["runs"]]
        if missing:
            raise TableError(f"{stem}.json: no run {missing[0]!r} for the headline table")
        ce, dece = (r["runs"][s]["final"] for s in HEADLINE_SPECS)
        rows.append([f"{r['dataset']} {column_name(r)}", _f(ce["asr"], 1), f"**{_f(dece['asr'], 1)}**",
                     f"{_f(ce['bleu'])} / {_f(dece['bleu'])}"])
    return _md(["attack, poison rate", "ASR % with CE", "ASR % with DeCE", "BLEU: CE / DeCE"], rows)


# --- benchmarks -----------------------------------------------------------------------------------------

def bench_dece(root: Path, arg: str = "") -> str:
    stem = arg or "dece"
    data = _load(root, RESULTS / f"{stem}.json")
    by_case: dict[tuple, dict[str, dict]] = {}
    for row in data["rows"]:
        by_case.setdefault((row["dtype"], row["N"], row["V"]), {})[row["method"]] = row
    out = []
    for (dtype, n, v), m in by_case.items():
        def t(method):
            r = m.get(method, {})
            return f"{r['time_ms']:.0f}" if "time_ms" in r else "skipped (memory)"

        def buf(method):
            r = m.get(method, {})
            return _f(r.get("peak_nxv_fp32"))
        ratio = m.get("dece_ds", {}).get("time_vs_ce")
        out.append([dtype, str(n), str(v), t("naive"), t("F.cross_entropy"), t("dece_ds"), _f(ratio),
                    f"{buf('naive')} / {buf('F.cross_entropy')} / {buf('dece_ds')}"])
    table = _md(["dtype", "N", "V", "naive ms", "F.cross_entropy ms", "dece_ds ms", "dece_ds / CE time",
                 "peak extra, N×V fp32 buffers: naive / CE / dece_ds"], out)
    return table + "\n\n" + _provenance_line(data.get("provenance", {}), f"median of {data.get('reps')} reps")


def bench_vocab_parallel(root: Path, arg: str = "") -> str:
    data = _load(root, RESULTS / f"{arg or 'vocab_parallel'}.json")
    by_tp: dict[int, dict[str, dict]] = {}
    for row in data["rows"]:
        key = "megatron" if row["method"].startswith("megatron") else "dece"
        by_tp.setdefault(row["tp"], {})[key] = row
    rows = []
    for tp, m in sorted(by_tp.items()):
        meg, ours = m["megatron"], m["dece"]
        rows.append([str(tp), str(ours["N"]), str(ours["V"]), f"{meg['time_ms']:.0f}", f"{ours['time_ms']:.0f}",
                     _f(ours["time_ms"] / meg["time_ms"]),
                     f"{meg['fwd_collectives']} / {meg['bwd_collectives']}",
                     f"{ours['fwd_collectives']} / {ours['bwd_collectives']}"])
    table = _md(["TP", "N", "V", "megatron-core `vocab_parallel_cross_entropy` ms", "`vocab_parallel_dece` ms",
                 "ratio", "collectives fwd / bwd, megatron-core", "collectives fwd / bwd, ours"], rows)
    return table + "\n\n" + _provenance_line(data.get("provenance", {}), f"median of {data.get('reps')} steps")


FUSED_METHODS = {"lm_head+F.cross_entropy": "`lm_head` + `F.cross_entropy`",
                 "lm_head+dece_loss(unfused)": "`lm_head` + `dece_loss` (unfused)",
                 "fused_linear_dece": "`fused_linear_dece`"}


def bench_fused_linear(root: Path, arg: str = "") -> str:
    data = _load(root, RESULTS / f"{arg or 'fused_linear'}.json")
    rows = []
    for r in data["rows"]:
        method = FUSED_METHODS.get(r["method"], r["method"])
        if "time_ms" not in r:
            rows.append([str(r["H"]), str(r["V"]), method, r.get("error", "skipped"), "-", "-", "-"])
            continue
        rows.append([str(r["H"]), str(r["V"]), method, f"{r['time_ms']:.0f}", _f(r.get("time_vs_ce")),
                     f"{r['peak_extra_mib']:.0f}", _f(r.get("mem_ce_over_this"))])
    n = {r["N"] for r in data["rows"]}
    table = _md(["H", "V", "method", "time ms", "× CE time", "peak extra MiB", "CE's peak / this"], rows)
    return table + "\n\n" + _provenance_line(
        data.get("provenance", {}), f"N = {', '.join(map(str, sorted(n)))}, median of {data.get('reps')} rep(s)")


def bench_step_time(root: Path, arg: str = "") -> str:
    data = _load(root, RESULTS / f"{arg or 'step_time'}.json")
    step, loss = data["median_step_ms"], data["median_loss_fwd_bwd_ms"]
    rows = [["train step (ms)", _f(step["CE"], 1), _f(step["DeCE"], 1), _f(step["DeCE"] / step["CE"], 3)],
            ["loss forward+backward alone (ms)", _f(loss["CE"], 1), _f(loss["DeCE"], 1),
             _f(loss["DeCE"] / loss["CE"], 2)]]
    table = _md(["", "CE (DeepSpeed's `VocabParallelCausalLMLoss`)", "DeCE (`dece_ds`)", "DeCE / CE"], rows)
    p, s, it = data.get("provenance", {}), data.get("shapes", {}), data.get("iterations", {})
    load = p.get("loadavg_start") or [None]
    prov = {"cpu": p.get("cpu"), "cores": p.get("cpu_count"), "torch_threads": p.get("torch_threads"),
            "load_average_1m": load[0], "torch": p.get("torch"), "git_sha": p.get("git_sha")}
    extra = (f"{p.get('world_size')} ranks, TP {p.get('tp')}, ZeRO-{p.get('zero_stage')}, {p.get('dtype')}, "
             f"hidden {s.get('hidden')} × {s.get('layers')} layers, V {s.get('vocab')}, batch {s.get('batch')} × "
             f"{s.get('seq')}, median of {it.get('timed_per_loss')} steps per loss in {it.get('order')} order, "
             "slowest rank")
    return table + "\n\n" + _provenance_line(prov, extra)


def planner_validation(root: Path, arg: str = "") -> str:
    data = _load(root, RESULTS / f"{arg or 'planner_validation'}.json")
    cases: dict[str, dict[str, str]] = {}
    meta: dict[str, dict] = {}
    for r in data["rows"]:
        col = r["what"] if r["what"] != "activations" else f"activations {r['dtype']}"
        cases.setdefault(r["case"], {})[col] = f"{r['error_pct']:+.1f}%"
        meta.setdefault(r["case"], r)
    cols = ["step ce", "step dece", "step fused", "activations fp32", "activations bf16"]
    rows = [[f"{case} ({meta[case]['params_M']:.0f}M params, {meta[case]['tokens']} tokens)"]
            + [c.get(k, "-") for k in cols] for case, c in cases.items()]
    table = _md(["case (dominant term)", "CE step", "DeCE step", "fused step", "activations fp32",
                 "activations bf16"], rows)
    prov = {k: v for k, v in data.get("provenance", {}).items() if k != "torch_threads"}  # the parent's
    return table + "\n\n" + _provenance_line(prov, "each case in a forked child with one thread; "
                                                   "(planned − measured) / measured")


def plan_table(root: Path, arg: str) -> str:
    """Plans saved with ``dece-ds plan ... --json`` (GiB per GPU)."""
    gib = 2 ** 30
    rows = []
    for stem in _stems(arg, "plan"):
        for p in _load(root, RESULTS / "plan" / f"{stem}.json"):
            i = p["inputs"]
            lm, tot = p["loss_memory"], p["total"]
            rows.append([p["model"], f"{p['params_total'] / 1e9:.2f}", f"{i['tp']}x{i['world_size'] // i['tp']}",
                         str(i["zero_stage"]), "yes" if i.get("activation_checkpointing") else "no",
                         *(f"{p[k] / gib:.2f}" for k in ("parameters", "gradients", "optimizer", "activations")),
                         *(f"{lm[k] / gib:.2f}" for k in ("ce", "dece", "fused")),
                         *(f"{tot[k] / gib:.2f}" for k in ("ce", "dece", "fused"))])
    return _md(["model", "params (B)", "tp x dp", "ZeRO", "act. ckpt", "params", "grads", "optim", "activ.",
                "CE logits+loss", "DeCE logits+loss", "fused DeCE", "total CE", "total DeCE", "total fused"], rows)


def alpha_targets(root: Path | None = None, arg: str = "") -> str:
    """``alpha_base`` that ends one continuous epoch (alpha_base ** 2) at the alpha of k epochs at 0.99."""
    rows = []
    for k in (2, 5, 10, 20):
        target = 0.99 ** k
        rows.append([f"{target:.3f}", str(k), f"{target ** 0.5:.3f}"])
    return _md(["target α at the end", "= 0.99^k for k", "`alpha_base`"], rows)


def _audit(name: str) -> Callable[[Path, str], str]:
    """A table of docs/audit.md (``dece_ds.audit.tables``), imported when it is printed."""
    def generate(root: Path, arg: str) -> str:
        from .audit import tables
        return getattr(tables, name)(root, arg)
    return generate


GENERATORS: dict[str, Callable[[Path, str], str]] = {
    "config": config_table,
    "config-presets": presets_table,
    "backdoor-runs": backdoor_runs,
    "backdoor-epochs": backdoor_epochs,
    "backdoor-combined": backdoor_combined,
    "backdoor-headline": backdoor_headline,
    "bench-dece": bench_dece,
    "bench-vocab-parallel": bench_vocab_parallel,
    "bench-fused-linear": bench_fused_linear,
    "bench-step-time": bench_step_time,
    "planner-validation": planner_validation,
    "plan": plan_table,
    "alpha-targets": alpha_targets,
    "audit-scores": _audit("scores_table"),
    "audit-retrain": _audit("retrain_table"),
    "audit-recurring": _audit("recurring_table"),
}


# --- markers ----------------------------------------------------------------------------------------------

def render(name: str, root: Path = REPO) -> str:
    kind, _, arg = name.partition(":")
    if kind not in GENERATORS:
        raise TableError(f"unknown table '{name}' (kinds: {', '.join(GENERATORS)})")
    return GENERATORS[kind](Path(root), arg).rstrip("\n")


def doc_files(root: Path = REPO) -> list[Path]:
    root = Path(root)
    return [p for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))] if p.exists()]


def regenerate(text: str, root: Path = REPO) -> tuple[str, list[str]]:
    """``text`` with every marked table printed afresh; also the names of the tables that changed."""
    changed: list[str] = []

    def sub(m: re.Match) -> str:
        body = render(m["name"], root) + "\n"
        if body != m["body"]:
            changed.append(m["name"])
        return m["open"] + body + m["close"]
    return MARKER_RE.sub(sub, text), changed


def stale_tables(root: Path = REPO, files: Sequence[Path] | None = None) -> list[tuple[Path, str]]:
    out = []
    for path in files or doc_files(root):
        _, changed = regenerate(path.read_text(), root)
        out.extend((path, name) for name in changed)
    return out


def table_names(text: str) -> list[str]:
    return [m["name"] for m in MARKER_RE.finditer(text)]


# --- CLI ------------------------------------------------------------------------------------------------------

def _config_schema(args: argparse.Namespace) -> int:
    print(config_schema_json() if args.json else config_table())
    return 0


def _tables(args: argparse.Namespace) -> int:
    root = Path(args.root)
    try:
        if args.print:
            print(render(args.print, root))
            return 0
        files = [Path(f) for f in args.files] or doc_files(root)
        if args.write:
            for path in files:
                new, changed = regenerate(path.read_text(), root)
                if changed:
                    path.write_text(new)
                    print(f"{path}: rewrote {', '.join(changed)}")
            return 0
        stale = stale_tables(root, files)
    except TableError as e:
        print(f"error: docs tables: {e}", file=sys.stderr)
        return 2
    for path, name in stale:
        print(f"{path}: table '{name}' differs from its results file "
              "(regenerate: dece-ds docs tables --write)", file=sys.stderr)
    if not stale:
        n = sum(len(table_names(p.read_text())) for p in files)
        print(f"{n} tables in {len(files)} files match their sources")
    return 1 if stale else 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("config-schema", help="print every key of the 'dece' config section "
                                                    "(markdown table; --json: the JSON schema)")
    p.add_argument("--json", action="store_true", help="print the JSON schema instead of the table")
    p.set_defaults(func=_config_schema)

    d = subparsers.add_parser("docs", help="the generated tables of README.md and docs/")
    dsub = d.add_subparsers(dest="docs_command", required=True)
    t = dsub.add_parser("tables", help="check (default) or rewrite the tables between <!-- table:NAME --> markers")
    mode = t.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite every marked table in place")
    mode.add_argument("--check", action="store_true",
                      help="exit 1 if a table differs from what its results file gives (the default)")
    mode.add_argument("--print", metavar="NAME", help="print one table, e.g. backdoor-runs:lyra-badpre-10-C-x3")
    t.add_argument("--root", default=str(REPO), help="repository root holding benchmarks/results (default: this "
                                                     "checkout)")
    t.add_argument("files", nargs="*", help="markdown files (default: README.md and docs/*.md)")
    t.set_defaults(func=_tables)
