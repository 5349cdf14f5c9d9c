"""A long benchmark grid measured in parts: ``bench_vs_torch.py --update`` keeps the cells an earlier run
measured, replaces the ones measured again, and the docs table says which cells are still missing and
that the cells come from several runs."""

from __future__ import annotations

import json

from benchmarks import bench_vs_torch as bench
from dece_ds.docs_tables.bench_tables import bench_vs_torch as table

METHODS = list(bench.methods())


def rows(dtype, n, h, v, ms, sha="aaaaaaa", cpu=None):
    measured = {"date": "2026-12-03T10:00:00+0000", "git_sha": sha, "threads": 2, "repeats": 1,
                "load_average_1m": 2.0}
    if cpu is not None:
        measured["cpu"] = cpu
    return [{"dtype": dtype, "N": n, "H": h, "V": v, "method": m, "time_ms": ms, "peak_extra_mib": 100.0,
             "measured": measured} for m in METHODS]


def test_merge_replaces_the_cells_measured_again_and_keeps_the_rest_in_grid_order():
    kept = rows("bfloat16", 4096, 1024, 32000, 1.0) + rows("float32", 8192, 1024, 32000, 2.0) \
        + rows("float32", 4096, 1024, 32000, 3.0)
    new = rows("float32", 8192, 1024, 32000, 9.0, sha="bbbbbbb")
    merged = bench.merge_rows(kept, new)
    assert len(merged) == 3 * len(METHODS)
    assert [(r["dtype"], r["N"], r["time_ms"]) for r in merged[::len(METHODS)]] == [
        ("float32", 4096, 3.0), ("float32", 8192, 9.0), ("bfloat16", 4096, 1.0)]
    assert [r["method"] for r in merged[:len(METHODS)]] == METHODS


def test_merge_of_some_methods_keeps_the_others_and_forms_the_ratios_again():
    kept = rows("float32", 4096, 1024, 151936, 10.0)
    new = [{**r, "method": "fused_linear_dece(vocab walk)", "time_ms": 5.0, "peak_extra_mib": 50.0}
           for r in rows("float32", 4096, 1024, 151936, 5.0, sha="bbbbbbb")[:1]]
    merged = bench.merge_rows(kept, new)
    assert len(merged) == len(METHODS) + 1
    walk = next(r for r in merged if r["method"] == "fused_linear_dece(vocab walk)")
    # against torch's row of the earlier run: 5 / 10 ms, 50 / 100 MiB
    assert walk["time_vs_torch"] == 0.5 and walk["mem_vs_torch"] == 0.5 and walk["goal_time"] == "yes"
    assert [r["method"] for r in merged][-1] == "fused_linear_dece(vocab walk)"


def test_missing_cells_of_the_grid():
    have = rows("float32", 4096, 1024, 32000, 1.0)
    grid = {"n": [4096], "h": [1024, 2048], "v": [32000], "dtype": ["float32", "bfloat16"]}
    assert bench.missing_cells(have, grid) == [["float32", 4096, 2048, 32000], ["bfloat16", 4096, 1024, 32000],
                                               ["bfloat16", 4096, 2048, 32000]]


def test_previous_rows_keep_the_file_provenance_and_a_missing_file_is_none(tmp_path):
    out = tmp_path / "vs_torch.json"
    assert bench.previous_rows(out) == []
    old = [{k: v for k, v in r.items() if k != "measured"} for r in rows("float32", 4096, 1024, 32000, 1.0)]
    out.write_text(json.dumps({"provenance": {"git_sha": "ccccccc", "date": "2026-12-02T00:00:00+0000", "cpu": "Xeon"},
                               "threads": 1, "repeats": 2, "warmup": 1, "rows": old}))
    back = bench.previous_rows(out)
    assert {r["measured"]["git_sha"] for r in back} == {"ccccccc"}
    assert {r["measured"]["threads"] for r in back} == {1}
    assert {r["measured"]["cpu"] for r in back} == {"Xeon"}  # the file's CPU, which measured every row of it


def test_the_table_names_the_parts_and_the_missing_cells(tmp_path):
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    data = {"provenance": {"git_sha": "bbbbbbb"}, "repeats": 1, "warmup": 1, "threads": 2, "ignore_every": 10,
            "goal": {"time_vs_torch_max": 0.75, "mem_vs_torch_max": 1.0},
            "rows": rows("float32", 4096, 1024, 32000, 1.0)
            + rows("float32", 8192, 1024, 32000, 2.0, sha="bbbbbbb", cpu="AMD EPYC"),
            "missing": [["bfloat16", 4096, 1024, 32000]]}
    (results / "parts.json").write_text(json.dumps(data))
    text = table(tmp_path, "parts")
    assert "Cells measured in parts (`--update`): git aaaaaaa, CPU not recorded, 2 thread(s)" in text
    assert "git bbbbbbb, AMD EPYC, 2 thread(s)" in text
    assert text.rstrip().endswith("Not measured yet: bfloat16 N 4096 H 1024 V 32000.")


def test_the_table_says_where_bf16_was_multiplied_in_fp32(tmp_path):
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    emulated = [{**r, "measured": {**r["measured"], "native_bf16_matmul": False}}
                for r in rows("bfloat16", 8192, 1024, 32000, 2.0, sha="bbbbbbb", cpu="AMD EPYC")
                + rows("float32", 8192, 1024, 32000, 2.0, sha="bbbbbbb", cpu="AMD EPYC")]
    data = {"provenance": {"git_sha": "bbbbbbb"}, "repeats": 1, "warmup": 1, "threads": 2, "ignore_every": 10,
            "goal": {"time_vs_torch_max": 0.75, "mem_vs_torch_max": 1.0},
            "rows": rows("bfloat16", 4096, 1024, 32000, 1.0, cpu="Xeon") + emulated}
    (results / "parts.json").write_text(json.dumps(data))
    text = table(tmp_path, "parts")
    note = "AMD EPYC (no native bf16 matmul: fused_linear_dece multiplies bf16 in fp32)"
    assert text.count(note) == 1          # the bf16 rows of that machine; its fp32 rows are a part of their own
    assert "git bbbbbbb, AMD EPYC, 2 thread(s)" in text and "git aaaaaaa, Xeon, 2 thread(s)" in text


def test_the_compiled_method_is_named_and_judged_against_the_goal():
    assert bench.COMPILED in bench.methods(compiled=True) and bench.COMPILED not in bench.methods()
    cell = rows("float32", 4096, 1024, 32000, 10.0)
    cell.append({**cell[-1], "method": bench.COMPILED, "time_ms": 7.0})
    bench.add_ratios(cell)
    assert cell[-1]["time_vs_torch"] == 0.7 and cell[-1]["goal_time"] == "yes"


def test_the_rate_column_is_the_three_matmuls_flops_over_the_time(tmp_path):
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    data = {"provenance": {}, "repeats": 1, "warmup": 1, "threads": 2, "ignore_every": 10,
            "goal": {"time_vs_torch_max": 0.75, "mem_vs_torch_max": 1.0},
            "rows": rows("float32", 4096, 1024, 32000, 1000.0)}
    (results / "rate.json").write_text(json.dumps(data))
    text = table(tmp_path, "rate")
    assert "GFLOP/s (6·N·H·V / time)" in text
    # 6 * 4096 * 1024 * 32000 = 805.3e9 flops in one second
    assert "| 805 | 100 |" in text   # the rate, then the peak extra MiB


def test_the_chunk_matmul_table_names_the_square_reference_and_the_fastest_matmul(tmp_path):
    from dece_ds.docs_tables.bench_tables import bench_chunk_matmul
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    data = {"provenance": {"cpu": "AMD EPYC"}, "threads": 2, "repeats": 3,
            "peak_square": {"n": 4096, "ms": 800.0, "gflops": 171.8},
            "rows": [{"rows": 9, "H": 1024, "V": 151936, "logits_gflops": 17.6, "grad_hidden_gflops": 26.4,
                      "grad_weight_gflops": 56.1, "all_three_gflops": 26.6}]}
    (results / "cm.json").write_text(json.dumps(data))
    text = bench_chunk_matmul(tmp_path, "cm")
    assert "| 9 | 1024 | 151936 | 18 | 26 | 56 | 27 |" in text
    assert "[4096, 4096] @ [4096, 4096] matmul runs at 172 GFLOP/s; the fastest matmul in the table at 56." in text


def test_the_parts_line_names_interleaved_rounds(tmp_path):
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    later = rows("float32", 8192, 1024, 32000, 2.0, sha="bbbbbbb", cpu="AMD EPYC")
    for r in later:
        r["measured"] = {**r["measured"], "repeats": 3, "interleaved": True}
    data = {"provenance": {"git_sha": "bbbbbbb"}, "repeats": 1, "warmup": 1, "threads": 2, "ignore_every": 10,
            "goal": {"time_vs_torch_max": 0.75, "mem_vs_torch_max": 1.0},
            "rows": rows("float32", 4096, 1024, 32000, 1.0) + later}
    (results / "il.json").write_text(json.dumps(data))
    text = table(tmp_path, "il")
    assert "git aaaaaaa, CPU not recorded, 2 thread(s), median of 1, 2026-12-03" in text
    assert "git bbbbbbb, AMD EPYC, 2 thread(s), median of 3 interleaved rounds, 2026-12-03" in text
