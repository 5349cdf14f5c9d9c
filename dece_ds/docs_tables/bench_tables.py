"""Tables of the benchmark scripts' results, ``benchmarks/results/<stem>.json`` (written by
``benchmarks/*.py``; ``arg`` picks another stem): the loss benchmarks (``bench-*``), the planner against
measurement (``planner-validation``), and plans saved by ``dece-ds plan ... --json`` under
``benchmarks/results/plan/`` (``plan:STEM[,STEM...]``)."""

from __future__ import annotations

from pathlib import Path

from .common import RESULTS, fmt, load_json, md_table, provenance_line, split_stems


def _dece_cases(root: Path, stem: str) -> tuple[dict, dict[tuple, dict[str, dict]]]:
    """A ``bench_dece.py`` file -> (its data, ``{(dtype, N, V): {method: row}}``)."""
    data = load_json(root, RESULTS / f"{stem}.json")
    by_case: dict[tuple, dict[str, dict]] = {}
    for row in data["rows"]:
        by_case.setdefault((row["dtype"], row["N"], row["V"]), {})[row["method"]] = row
    return data, by_case


def bench_dece(root: Path, arg: str = "") -> str:
    data, by_case = _dece_cases(root, arg or "dece")
    out = []
    for (dtype, n, v), m in by_case.items():
        def t(method):
            r = m.get(method, {})
            return f"{r['time_ms']:.0f}" if "time_ms" in r else "skipped (memory)"

        def buf(method):
            r = m.get(method, {})
            return fmt(r.get("peak_nxv_fp32"))
        ratio = m.get("dece_ds", {}).get("time_vs_ce")
        out.append([dtype, str(n), str(v), t("naive"), t("F.cross_entropy"), t("dece_ds"), fmt(ratio),
                    f"{buf('naive')} / {buf('F.cross_entropy')} / {buf('dece_ds')}"])
    table = md_table(["dtype", "N", "V", "naive ms", "F.cross_entropy ms", "dece_ds ms", "dece_ds / CE time",
                      "peak extra, N×V fp32 buffers: naive / CE / dece_ds"], out)
    return table + "\n\n" + provenance_line(data.get("provenance", {}), f"median of {data.get('reps')} reps")


def bench_dece_backends(root: Path, arg: str) -> str:
    """``F.cross_entropy`` against ``dece_loss`` with the eager and the compiled backend, from a ``bench_dece.py
    --methods F.cross_entropy dece_ds "dece_ds(compile)"`` file (``arg``: its stem)."""
    data, by_case = _dece_cases(root, arg)
    out = []
    for (dtype, n, v), m in by_case.items():
        def t(method):
            r = m.get(method, {})
            return f"{r['time_ms']:.0f} ({fmt(r.get('time_vs_ce'))}×)" if "time_ms" in r else "-"
        out.append([dtype, str(n), str(v), t("F.cross_entropy").split(" ")[0], t("dece_ds"), t("dece_ds(compile)")])
    table = md_table(["dtype", "N", "V", "F.cross_entropy ms", "dece_ds eager ms (× CE)",
                      "dece_ds `backend=\"compile\"` ms (× CE)"], out)
    return table + "\n\n" + provenance_line(data.get("provenance", {}), f"median of {data.get('reps')} reps")


def bench_vocab_parallel(root: Path, arg: str = "") -> str:
    data = load_json(root, RESULTS / f"{arg or 'vocab_parallel'}.json")
    by_tp: dict[int, dict[str, dict]] = {}
    for row in data["rows"]:
        key = "megatron" if row["method"].startswith("megatron") else "dece"
        by_tp.setdefault(row["tp"], {})[key] = row
    rows = []
    for tp, m in sorted(by_tp.items()):
        meg, ours = m["megatron"], m["dece"]
        rows.append([str(tp), str(ours["N"]), str(ours["V"]), f"{meg['time_ms']:.0f}", f"{ours['time_ms']:.0f}",
                     fmt(ours["time_ms"] / meg["time_ms"]),
                     f"{meg['fwd_collectives']} / {meg['bwd_collectives']}",
                     f"{ours['fwd_collectives']} / {ours['bwd_collectives']}"])
    table = md_table(["TP", "N", "V", "megatron-core `vocab_parallel_cross_entropy` ms", "`vocab_parallel_dece` ms",
                      "ratio", "collectives fwd / bwd, megatron-core", "collectives fwd / bwd, ours"], rows)
    return table + "\n\n" + provenance_line(data.get("provenance", {}), f"median of {data.get('reps')} steps")


FUSED_METHODS = {"lm_head+F.cross_entropy": "`lm_head` + `F.cross_entropy`",
                 "lm_head+dece_loss(unfused)": "`lm_head` + `dece_loss` (unfused)",
                 "fused_linear_dece": "`fused_linear_dece`"}


def bench_fused_linear(root: Path, arg: str = "") -> str:
    data = load_json(root, RESULTS / f"{arg or 'fused_linear'}.json")
    rows = []
    for r in data["rows"]:
        method = FUSED_METHODS.get(r["method"], r["method"])
        if "time_ms" not in r:
            rows.append([str(r["H"]), str(r["V"]), method, r.get("error", "skipped"), "-", "-", "-"])
            continue
        rows.append([str(r["H"]), str(r["V"]), method, f"{r['time_ms']:.0f}", fmt(r.get("time_vs_ce")),
                     f"{r['peak_extra_mib']:.0f}", fmt(r.get("mem_ce_over_this"))])
    n = {r["N"] for r in data["rows"]}
    table = md_table(["H", "V", "method", "time ms", "× CE time", "peak extra MiB", "CE's peak / this"], rows)
    return table + "\n\n" + provenance_line(
        data.get("provenance", {}), f"N = {', '.join(map(str, sorted(n)))}, median of {data.get('reps')} rep(s)")


def bench_step_time(root: Path, arg: str = "") -> str:
    data = load_json(root, RESULTS / f"{arg or 'step_time'}.json")
    step, loss = data["median_step_ms"], data["median_loss_fwd_bwd_ms"]
    fused = "DeCE fused" in step    # the third arm (fused-linear DeCE on the vocab-parallel head), when run
    rows = [["train step (ms)", fmt(step["CE"], 1), fmt(step["DeCE"], 1), fmt(step["DeCE"] / step["CE"], 3)]
            + ([fmt(step["DeCE fused"], 1), fmt(step["DeCE fused"] / step["CE"], 3)] if fused else []),
            ["loss forward+backward alone (ms)", fmt(loss["CE"], 1), fmt(loss["DeCE"], 1),
             fmt(loss["DeCE"] / loss["CE"], 2)] + (["-", "-"] if fused else [])]
    table = md_table(["", "CE (DeepSpeed's `VocabParallelCausalLMLoss`)", "DeCE (`dece_ds`)", "DeCE / CE"]
                     + (["DeCE fused-linear (`fused_linear: true`)", "fused / CE"] if fused else []), rows)
    p, s, it = data.get("provenance", {}), data.get("shapes", {}), data.get("iterations", {})
    load = p.get("loadavg_start") or [None]
    prov = {"cpu": p.get("cpu"), "cores": p.get("cpu_count"), "torch_threads": p.get("torch_threads"),
            "load_average_1m": load[0], "torch": p.get("torch"), "git_sha": p.get("git_sha")}
    extra = (f"{p.get('world_size')} ranks, TP {p.get('tp')}, ZeRO-{p.get('zero_stage')}, {p.get('dtype')}, "
             f"hidden {s.get('hidden')} × {s.get('layers')} layers, V {s.get('vocab')}, batch {s.get('batch')} × "
             f"{s.get('seq')}, median of {it.get('timed_per_loss')} steps per loss in {it.get('order')} order, "
             "slowest rank")
    return table + "\n\n" + provenance_line(prov, extra)


VS_TORCH_METHODS = {"torch chunked linear_cross_entropy": "torch chunked `linear_cross_entropy` (CE)",
                    "fused_linear_dece": "`fused_linear_dece` (α 0.99, ε 0.05)",
                    "fused_linear_dece(alpha=1)": "`fused_linear_dece` (α 1, ε 0: CE)",
                    "lm_head+F.cross_entropy": "`lm_head` + `F.cross_entropy` (CE)",
                    "three matmuls alone": "the three matmuls alone (a floor)",
                    "fused_linear_dece(rows walk)": "`fused_linear_dece` (α 0.99), rows walk forced",
                    "fused_linear_dece(vocab walk)": "`fused_linear_dece` (α 0.99), vocabulary walk forced",
                    "fused_linear_dece(compile)": "`fused_linear_dece` (α 0.99), `backend=\"compile\"`"}


def matmul_gflops(n: int, hidden: int, vocab: int, time_ms: float) -> float:
    """The rate a linear cross-entropy's time implies for its three ``N x H x V`` matmuls (logits, hidden
    gradient, weight gradient: ``6 N H V`` flops), in GFLOP/s; every exact method does at least these."""
    return 6.0 * n * hidden * vocab / (time_ms * 1e-3) / 1e9


CHUNK_MATMULS = ("logits_gflops", "grad_hidden_gflops", "grad_weight_gflops")


def bench_chunk_matmul(root: Path, arg: str = "") -> str:
    """``benchmarks/bench_chunk_matmul.py``: GFLOP/s of the fused loss's three matmuls by chunk rows, and a
    square matmul as a reference rate."""
    data = load_json(root, RESULTS / f"{arg or 'chunk_matmul'}.json")
    rows = [[str(r["rows"]), str(r["H"]), str(r["V"])]
            + [f"{r[k]:.0f}" for k in (*CHUNK_MATMULS, "all_three_gflops")] for r in data["rows"]]
    table = md_table(["chunk rows", "H", "V", "logits GFLOP/s", "hidden gradient GFLOP/s",
                      "weight gradient GFLOP/s", "all three GFLOP/s"], rows)
    square = data.get("peak_square")
    if square:
        best = max(r[k] for r in data["rows"] for k in CHUNK_MATMULS)
        n = square["n"]
        table += (f"\n\nFor reference, a square fp32 [{n}, {n}] @ [{n}, {n}] matmul runs at {square['gflops']:.0f} "
                  f"GFLOP/s; the fastest matmul in the table at {best:.0f}.")
    return table + "\n\n" + provenance_line(data.get("provenance", {}),
                                             f"fp32, best of {data.get('repeats')} after one warm-up, "
                                             f"{data.get('threads')} thread(s)")


def bench_vs_torch(root: Path, arg: str = "") -> str:
    """``benchmarks/bench_vs_torch.py``: each method's time and peak extra memory, and both relative to torch's
    chunked ``linear_cross_entropy`` in the same cell; skipped methods show why. The rate column is the three
    matmuls' flops (``6 N H V``) over the method's whole time, to read beside the CPU's matmul rate
    (``bench_chunk_matmul``)."""
    data = load_json(root, RESULTS / f"{arg or 'vs_torch'}.json")
    rows = []
    for r in data["rows"]:
        cell = [r["dtype"], str(r["N"]), str(r["H"]), str(r["V"]), VS_TORCH_METHODS.get(r["method"], r["method"])]
        if "time_ms" not in r:
            rows.append(cell + [r.get("error") or r.get("note") or "skipped", "-", "-", "-", "-", "-"])
            continue
        goal = "-" if "goal_time" not in r else f"{r['goal_time']} / {r['goal_mem']}"
        rows.append(cell + [f"{r['time_ms']:.0f}", fmt(r.get("time_vs_torch")),
                            f"{matmul_gflops(r['N'], r['H'], r['V'], r['time_ms']):.0f}",
                            f"{r['peak_extra_mib']:.0f}", fmt(r.get("mem_vs_torch")), goal])
    g = data.get("goal", {})
    table = md_table(["dtype", "N", "H", "V", "method", "time ms", "× torch time", "GFLOP/s (6·N·H·V / time)",
                      "peak extra MiB", "× torch memory",
                      f"goal ≤ {g.get('time_vs_torch_max')}× time / ≤ {g.get('mem_vs_torch_max')}× memory"], rows)
    text = table + "\n\n" + provenance_line(
        data.get("provenance", {}), f"median of {data.get('repeats')} run(s) after {data.get('warmup')} warm-up, "
                                    f"{data.get('threads')} thread(s), {data.get('ignore_every') and 100 // data['ignore_every']} % "
                                    "ignored targets")
    parts: dict[tuple, list[str]] = {}    # (git sha, CPU, threads, repeats) -> dates of its cells
    for r in data["rows"]:
        m = r.get("measured")
        if m:
            cpu = m.get("cpu") or "CPU not recorded"
            if m.get("native_bf16_matmul") is False and r["dtype"] != "float32":
                cpu += " (no native bf16 matmul: fused_linear_dece multiplies bf16 in fp32)"
            key = (str(m.get("git_sha"))[:7], cpu, m.get("threads"),
                   f"{m.get('repeats')}" + (" interleaved rounds" if m.get("interleaved") else ""))
            parts.setdefault(key, []).append(str(m.get("date"))[:10])
    if len(parts) > 1:
        text += "\nCells measured in parts (`--update`): " + "; ".join(
            f"git {sha}, {cpu}, {threads} thread(s), median of {rep}, {min(d)} to {max(d)}"
            for (sha, cpu, threads, rep), d in parts.items()) + "."
    if data.get("missing"):
        text += "\nNot measured yet: " + ", ".join(f"{d} N {n} H {h} V {v}" for d, n, h, v in data["missing"]) + "."
    return text


def planner_validation(root: Path, arg: str = "") -> str:
    data = load_json(root, RESULTS / f"{arg or 'planner_validation'}.json")
    cases: dict[str, dict[str, str]] = {}
    meta: dict[str, dict] = {}
    for r in data["rows"]:
        col = r["what"] if r["what"] != "activations" else f"activations {r['dtype']}"
        cases.setdefault(r["case"], {})[col] = f"{r['error_pct']:+.1f}%"
        meta.setdefault(r["case"], r)
    cols = ["step ce", "step dece", "step fused", "activations fp32", "activations bf16"]
    rows = [[f"{case} ({meta[case]['params_M']:.0f}M params, {meta[case]['tokens']} tokens)"]
            + [c.get(k, "-") for k in cols] for case, c in cases.items()]
    table = md_table(["case (dominant term)", "CE step", "DeCE step", "fused step", "activations fp32",
                      "activations bf16"], rows)
    prov = {k: v for k, v in data.get("provenance", {}).items() if k != "torch_threads"}  # the parent's
    return table + "\n\n" + provenance_line(prov, "each case in a forked child with one thread; "
                                                  "(planned − measured) / measured")


def plan_table(root: Path, arg: str) -> str:
    """Plans saved with ``dece-ds plan ... --json`` (GiB per GPU)."""
    gib = 2 ** 30
    rows = []
    for stem in split_stems(arg, "plan"):
        for p in load_json(root, RESULTS / "plan" / f"{stem}.json"):
            i = p["inputs"]
            lm, tot = p["loss_memory"], p["total"]
            rows.append([p["model"], f"{p['params_total'] / 1e9:.2f}", f"{i['tp']}x{i['world_size'] // i['tp']}",
                         str(i["zero_stage"]), "yes" if i.get("activation_checkpointing") else "no",
                         *(f"{p[k] / gib:.2f}" for k in ("parameters", "gradients", "optimizer", "activations")),
                         *(f"{lm[k] / gib:.2f}" for k in ("ce", "dece", "fused")),
                         *(f"{tot[k] / gib:.2f}" for k in ("ce", "dece", "fused"))])
    return md_table(["model", "params (B)", "tp x dp", "ZeRO", "act. ckpt", "params", "grads", "optim", "activ.",
                     "CE logits+loss", "DeCE logits+loss", "fused DeCE", "total CE", "total DeCE", "total fused"],
                    rows)


AUDIT_OVERHEAD_ROWS = {"loss_fwd_bwd_ms": "`dece_loss` forward + backward",
                       "fused_linear_fwd_bwd_ms": "`fused_linear_dece` forward + backward",
                       "train_step_ms": "Llama training step (forward, backward, AdamW)"}


def audit_overhead(root: Path, arg: str = "") -> str:
    """``benchmarks/bench_audit_overhead.py``: each timing with the poison audit's recorder off and on."""
    data = load_json(root, RESULTS / f"{arg or 'audit_overhead'}.json")
    rows = [[label, fmt(data["median_ms"][k]["off"], 1), fmt(data["median_ms"][k]["on"], 1),
             f"{data['overhead_pct'][k]:+.1f} %"] for k, label in AUDIT_OVERHEAD_ROWS.items()]
    sh, it = data["shapes"], data["iterations"]
    table = md_table(["timing (median)", "audit off (ms)", "audit on (ms)", "overhead"], rows)
    return table + "\n\n" + provenance_line(
        data.get("provenance", {}), f"N {sh['tokens']}, V {sh['vocab']}; Llama {sh['layers']} x {sh['hidden']}, "
                                    f"batch {sh['batch']} x {sh['seq']}; {it['timed_per_setting']} timed runs per "
                                    f"setting, {it['order']} order")
