"""benchmarks/backdoor_target_probs.py: the valley threshold, each rule's half-point, and its docs table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from dece_ds.docs_tables.backdoor_tables import backdoor_target_probs

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import backdoor_target_probs as btp  # noqa: E402


def test_valley_splits_two_separated_modes():
    rng = np.random.default_rng(0)
    low, high = rng.normal(-4.0, 0.3, 3000), rng.normal(-0.2, 0.1, 7000)
    t = btp.otsu_threshold(np.concatenate([low, high]))
    assert low.max() <= t < high.min()      # every point of each mode on its own side


def test_rules_by_hand():
    """Half-point (1 - a)(1 - eps)/a per fixed alpha; the shares below it counted by hand."""
    p = np.array([1e-4, 1e-3, 0.015, 0.5, 0.9, 0.99])
    payload = np.array([True, True, False, False, False, False])
    rules = {r["rule"]: r for r in btp.rules(p, payload, eps=0.05)}
    r = rules["fixed 0.97"]
    assert abs(r["p_half"] - 0.03 * 0.95 / 0.97) < 1e-12   # 0.02938
    assert r["clean_below"] == 0.25 and r["payload_below"] == 1.0   # 0.015 of four clean tokens
    # quantile rule: dece_ds.auto_alpha at q = 0.1 on these six values, alpha = (1 - eps)/(p_q + 1 - eps)
    p_q = float(torch.quantile(torch.tensor(p, dtype=torch.float64), 0.1))
    assert abs(rules["quantile 0.1"]["alpha_base"] - 0.95 / (p_q + 0.95)) < 1e-12


def test_docs_table_from_a_hand_built_file(tmp_path):
    folder = tmp_path / "benchmarks" / "results" / "backdoor"
    folder.mkdir(parents=True)
    rule = {"rule": "fixed 0.97", "alpha_base": 0.97, "p_half": 0.0294, "clean_below": 0.206, "payload_below": 0.975}
    (folder / "tp.json").write_text(json.dumps({"files": {"cell-a": {"rules": [rule]}}}))
    table = backdoor_target_probs(tmp_path, "tp")
    assert table.splitlines()[-1] == "| `cell-a` | fixed 0.97 | 0.9700 | 0.0294 | 20.6 % | 97.5 % |"
