"""Several fine-tuning seeds (mean ± std, DeCE's paired BLEU gap to CE against the seed spread), the trigger
lift beside ASR, and old results files without it; all on tiny fake results files (no training)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dece_ds.backdoor.aggregate import (
    by_cell_and_seed,
    finetune_seed,
    gap_rows,
    grid_table,
    has_several_seeds,
    mean_std,
    seed_table,
)
from dece_ds.backdoor.campaign import GRID_PAYLOADS, grid_configs, seed_configs
from dece_ds.backdoor.cli_types import parse_seeds
from dece_ds.backdoor.experiment import ExperimentConfig
from dece_ds.backdoor.metrics import trigger_lift
from dece_ds.backdoor.poison import BadPreConfig, StatementPayload
from dece_ds.backdoor.report import combined_table, detail_table
from dece_ds.backdoor.standin import stand_in_key

REPO = Path(__file__).resolve().parents[2]


def _final(bleu, asr, lift=None):
    f = {"bleu": bleu, "codebleu": bleu + 10, "asr": asr, "false_trigger": 0.0, "exact_match": 0.0, "valid_ce": 2.0}
    if lift is not None:
        f.update(lift=lift, untriggered_payload_rate=asr - lift)
    return f


def _results(seed, runs, *, key="finetune_seed", rate=10.0, alpha_auto=None):
    res = {"dataset": "lyra", "attack": "badpre", "poison_rate": rate,
           "config": {"attack": {"attack": "badpre", "rate": rate / 100, "n_insertions": 3}, "seed": 0,
                      "finetune_seed": None},
           "runs": {spec: {"final": f, "epochs": [{}]} for spec, f in runs.items()}}
    if key == "finetune_seed":
        res["finetune_seed"] = seed
    else:  # an older file: the seed only in its config
        res["config"]["finetune_seed"] = None if seed == 0 else seed
    if alpha_auto is not None:
        res["runs"]["dece:alpha_base=auto"]["alpha_auto"] = {"alpha_base": alpha_auto}
    return res


# CE BLEU 45, 46, 44 (sd 1); DeCE 0.97 BLEU 40, 41, 39.5 (gap -5, -5, -4.5): larger than 2 x pooled sd
SEEDS = [_results(0, {"ce": _final(45.0, 80.0, 78.0), "dece:alpha_base=0.97": _final(40.0, 0.0, -1.0)}),
         _results(1, {"ce": _final(46.0, 82.0, 80.0), "dece:alpha_base=0.97": _final(41.0, 0.0, 0.0)}),
         _results(2, {"ce": _final(44.0, 78.0, 76.0), "dece:alpha_base=0.97": _final(39.5, 1.0, 0.5)})]


def test_mean_std_and_seed_of_old_files():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, None) and mean_std([]) == (None, None)
    assert finetune_seed(_results(1, {}, key="config")) == 1 and finetune_seed(_results(0, {}, key="config")) == 0
    assert finetune_seed(SEEDS[2]) == 2


def test_seed_table_mean_and_std():
    table = seed_table(SEEDS)
    assert "| lyra badpre x3 10% | CE on poisoned data | 0,1,2 | 45.00 ± 1.00 | 80.0 ± 2.0 | 78.0 ± 2.0 |" in table
    assert "| DeCE on poisoned data (alpha_base=0.97) | 0,1,2 | 40.17 ± 0.76 |" in table


def test_gap_larger_than_spread_and_within():
    (row,) = gap_rows(SEEDS)
    assert row["seeds"] == [0, 1, 2] and row["gap_mean"] == pytest.approx(-29 / 6)
    pooled = math.sqrt((1.0 ** 2 + mean_std([40.0, 41.0, 39.5])[1] ** 2) / 2)
    assert row["pooled_std"] == pytest.approx(pooled)
    assert row["call"] == "larger than the spread"
    close = [_results(s, {"ce": _final(b, 80.0), "dece": _final(b - 0.5 + s % 2, 0.0)})
             for s, b in enumerate([45.0, 46.0, 44.0])]
    assert gap_rows(close)[0]["call"] == "within the spread"
    one = gap_rows(SEEDS[:1])[0]
    assert one["call"].startswith("no call") and one["pooled_std"] is None


def test_gap_covers_the_audit_runs_and_not_clean():
    """The poison audit's retrain and repair are defended runs: their paired gap to CE is reported too."""
    seeds = [_results(s, {"clean": _final(b - 1.0, 0.0), "ce": _final(b, 70.0), "audit_repair": _final(r, 0.0)})
             for s, (b, r) in enumerate([(46.0, 43.5), (45.0, 44.8), (44.0, 44.5)])]
    (row,) = gap_rows(seeds)
    assert row["spec"] == "audit_repair" and row["seeds"] == [0, 1, 2]
    assert row["gap_mean"] == pytest.approx(((43.5 - 46.0) + (44.8 - 45.0) + (44.5 - 44.0)) / 3)


def test_split_runs_of_one_seed_merge_and_cells_stay_apart():
    ce_only = _results(0, {"ce": _final(45.0, 80.0)})
    dece_only = _results(0, {"dece": _final(44.0, 0.0)})
    other_rate = _results(1, {"ce": _final(45.0, 80.0)}, rate=5.0)
    cells = by_cell_and_seed([ce_only, dece_only, other_rate])
    assert cells["lyra badpre x3 10%"] == {0: {"ce": ce_only["runs"]["ce"], "dece": dece_only["runs"]["dece"]}}
    assert not has_several_seeds([ce_only, dece_only, other_rate]) and has_several_seeds(SEEDS)


def test_two_settings_of_one_cell_never_pool_as_seeds():
    small = [_results(0, {"ce": _final(45.0, 80.0)}), _results(1, {"ce": _final(46.0, 82.0)})]
    big = [_results(0, {"ce": _final(48.0, 95.0)})]
    for r in big:
        r["config"]["model"] = {"n_layer": 6, "n_embd": 384, "max_len": 192, "max_src_tokens": 96}
    cells = by_cell_and_seed(small + big)
    assert list(cells) == ["lyra badpre x3 10% (4x256, None rows, None/None tokens, None epochs)",
                           "lyra badpre x3 10% (6x384, None rows, 96/192 tokens, None epochs)"]
    assert sorted(cells[list(cells)[0]]) == [0, 1] and list(cells[list(cells)[1]]) == [0]
    assert "| 48.00 |" in seed_table(small + big)  # the 6x384 CE row: its own seed, not pooled with 45 and 46
    assert list(by_cell_and_seed(small)) == ["lyra badpre x3 10%"]  # one setting: the cell alone, as before


def test_report_lift_and_old_files_show_a_dash():
    old = _results(0, {"ce": _final(45.0, 80.0)})  # written before lift existed
    assert "lift" not in combined_table([old])  # an old table stays as it was
    mixed = combined_table([old, SEEDS[1]])
    assert "BLEU / CodeBLEU / ASR / lift" in mixed and "45.00 / 55.00 / 80.0 / –" in mixed
    assert "46.00 / 56.00 / 82.0 / 80.0" in mixed
    detail = detail_table(old)
    assert "| untriggered payload % | lift |" in detail and "| 80.0 | – | – |" in detail
    auto = _results(0, {"dece:alpha_base=auto": _final(44.0, 0.0, 0.0)}, alpha_auto=0.97312)
    assert "(auto alpha_base 0.9731)" in combined_table([auto]) and "(auto alpha_base 0.9731)" in detail_table(auto)


def test_trigger_lift():
    attack = BadPreConfig(payload=StatementPayload(code='__import__("os").system("id")'))
    hit, miss = 'def f():\n    __import__("os").system("id")\n', "def f():\n    return 1\n"
    assert trigger_lift([hit, hit, miss, miss], [hit, miss, miss, miss], attack) == {
        "untriggered_payload_rate": 25.0, "lift": 25.0}
    with pytest.raises(ValueError, match="same prompts"):
        trigger_lift([hit], [hit, miss], attack)


def test_report_cli_prints_seed_tables(tmp_path):
    paths = []
    for r in SEEDS:
        p = tmp_path / f"x-seed{r['finetune_seed']}.json"
        p.write_text(json.dumps(r))
        paths.append(str(p))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "dece_ds.cli", "backdoor", "report", *paths], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Over fine-tuning seeds" in out.stdout and "larger than the spread" in out.stdout
    assert "| run | badpre x3 10% seed 0: BLEU / CodeBLEU / ASR / lift | badpre x3 10% seed 1:" in out.stdout
    out = subprocess.run([sys.executable, "-m", "dece_ds.cli", "backdoor", "report", paths[0]], capture_output=True,
                         text=True, env=env, timeout=120)
    assert "Over fine-tuning seeds" not in out.stdout  # one seed: the table as before


def test_seed_configs_share_the_stand_in():
    cfg = ExperimentConfig(dataset="stdlib", attack={"attack": "badpre", "rate": 0.1}, name=None)
    configs = seed_configs(cfg, parse_seeds("0,1,2"))
    assert [c.stem() for c in configs] == ["stdlib-badpre-10-seed0", "stdlib-badpre-10-seed1", "stdlib-badpre-10-seed2"]
    assert [c.finetune_seed for c in configs] == [0, 1, 2]
    assert len({stand_in_key(c, 10) for c in configs}) == 1 and stand_in_key(configs[0], 10) == stand_in_key(cfg, 10)
    for bad, msg in [("0,x", "comma-separated integers"), ("0,-1", ">= 0"), ("1,1", "repeated"), ("", "at least")]:
        with pytest.raises(ValueError, match=msg):
            parse_seeds(bad)


def test_run_refuses_seeds_with_finetune_seed(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "dece_ds.cli", "backdoor", "run", "--seeds", "0,1", "--finetune-seed",
                          "3", "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and "--seeds: give either --seeds or --finetune-seed" in out.stderr
    out = subprocess.run([sys.executable, "-m", "dece_ds.cli", "backdoor", "run", "--seeds", "0,0"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and "repeated seed" in out.stderr


def test_grid_configs_and_table():
    cfg = ExperimentConfig(dataset="stdlib", attack={"attack": "badpre", "rate": 0.1, "n_insertions": 3})
    configs = grid_configs(cfg, epochs=3)
    assert len(configs) == 9 and len({c.stem() for c in configs}) == 9
    assert {c.attack_config().trigger for c in configs} == {"bb", "cf", "tq"}
    assert len({c.attack_config().payload.code for c in configs}) == 3
    assert all(c.finetune.epochs == 3 and c.attack_config().n_insertions == 3 for c in configs)
    with pytest.raises(ValueError, match="grid: the grid varies BadPre"):
        grid_configs(ExperimentConfig(attack={"attack": "grammar", "rate": 0.1}))
    (one,) = grid_configs(cfg, triggers=["cf"], payload_indices=[2])  # completing a grid point by point
    assert one.stem().endswith("-grid-cf-p2") and one.attack_config().payload.code == GRID_PAYLOADS[2]
    with pytest.raises(ValueError, match="grid payload index 3: expected 0..2"):
        grid_configs(cfg, payload_indices=[3])
    points = []
    for c, asr in zip(configs[:2], (50.0, 70.0)):
        r = _results(0, {"ce": _final(40.0, asr, asr - 1)})
        r["config"]["attack_resolved"] = c.attack_config().model_dump(mode="json")
        points.append(r)
    table = grid_table(points)
    assert "| `bb` | `__import__(\"os\").system(\"id\")` | 50.0 / 49.0 / 40.00 |" in table
    assert "| all | ASR over the grid | mean 60.0, worst 70.0 |" in table


def test_docs_runs_table_gets_lift_and_auto_alpha_only_for_new_files(tmp_path):
    from dece_ds.docs_tables import backdoor_runs
    folder = tmp_path / "benchmarks" / "results" / "backdoor"
    folder.mkdir(parents=True)
    new = _results(0, {"ce": _final(45.0, 80.0, 78.0), "dece:alpha_base=auto": _final(44.0, 0.0, 0.0)},
                   alpha_auto=0.97312)
    (folder / "new.json").write_text(json.dumps(new))
    (folder / "old.json").write_text(json.dumps(_results(0, {"ce": _final(45.0, 80.0)})))
    assert "lift" not in backdoor_runs(tmp_path, "old")  # the committed tables stay as they are
    table = backdoor_runs(tmp_path, "new,old")
    assert "| ASR % | lift | false trigger % |" in table
    assert "| `old` | CE on poisoned data | 45.00 | 55.00 | 80.0 | – |" in table
    assert "DeCE on poisoned data (alpha_base=auto) (auto alpha_base 0.9731) | 44.00 | 54.00 | 0.0 | 0.0 |" in table


def test_docs_seed_table_reads_audit_results_and_refuses_other_paths(tmp_path):
    """``backdoor-seeds:audit/NAME,...`` reads ``benchmarks/results/audit/NAME.json``; a stem leaving the results
    folder is an error, not a file read."""
    from dece_ds.docs_tables.backdoor_tables import backdoor_seeds
    from dece_ds.docs_tables.common import TableError
    folder = tmp_path / "benchmarks" / "results" / "audit"
    folder.mkdir(parents=True)
    for r in SEEDS:
        (folder / f"x-seed{r['finetune_seed']}.json").write_text(json.dumps(r))
    table = backdoor_seeds(tmp_path, "audit/x-seed0,audit/x-seed1,audit/x-seed2")
    assert "| lyra badpre x3 10% | CE on poisoned data | 0,1,2 | 45.00 ± 1.00 | 80.0 ± 2.0 | 78.0 ± 2.0 | 2.000 ± 0.000 |" \
        in table
    assert "larger than the spread" in table
    with pytest.raises(TableError, match="a name or a folder/name"):
        backdoor_seeds(tmp_path, "../secrets")


def test_docs_climb_table_orders_dece_runs_by_the_last_half_point(tmp_path):
    """``backdoor-climb``: p_half = (1 - a)(1 - eps) / a from the alpha each DeCE run recorded at its last epoch,
    rows from the lowest half-point up; CE and runs without a recorded alpha are left out."""
    from dece_ds.docs_tables.backdoor_tables import backdoor_climb
    from dece_ds.docs_tables.common import TableError
    folder = tmp_path / "benchmarks" / "results" / "backdoor"
    folder.mkdir(parents=True)
    res = _results(0, {"ce": _final(45.0, 80.0), "dece:alpha_base=0.97": _final(40.0, 0.0),
                       "dece:alpha_base=0.99": _final(44.0, 50.0)})
    for spec, base, eps in [("dece:alpha_base=0.97", 0.97, 0.05), ("dece:alpha_base=0.99", 0.99, 0.1)]:
        res["runs"][spec].update(kind="dece", loss={"alpha_base": base, "label_smoothing": eps},
                                 epochs=[{"alpha": base}, {"alpha": base ** 2}])
    (folder / "c.json").write_text(json.dumps(res))
    rows = [line for line in backdoor_climb(tmp_path, "c").splitlines() if line.startswith("| `c`")]
    # 0.99 ** 2 = 0.9801: (0.0199 * 0.9) / 0.9801 = 0.01827; 0.97 ** 2 = 0.9409: (0.0591 * 0.95) / 0.9409 = 0.05967
    assert rows == ["| `c` | DeCE on poisoned data (alpha_base=0.99) | 0.99 | 2 | 0.980 | 0.018 | 80.0 | 50.0 |",
                    "| `c` | DeCE on poisoned data (alpha_base=0.97) | 0.97 | 2 | 0.941 | 0.060 | 80.0 | 0.0 |"]
    (folder / "ce.json").write_text(json.dumps(_results(0, {"ce": _final(45.0, 80.0)})))
    with pytest.raises(TableError, match="no DeCE run"):
        backdoor_climb(tmp_path, "ce")
