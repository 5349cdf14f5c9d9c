"""Every shipped DeepSpeed config (ds_configs/**/*.json) parses: our dece section and DeepSpeed's own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dece_ds.config import DeceConfig
from dece_ds.integrations.deepspeed import dece_config_for_engine

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "ds_configs").glob("**/*.json"))


def test_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    assert {"cpu_demo.json", "gpu_zero3_tp_bf16.json", "gpu_zero3_offload_7b.json"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_dece_section_validates_for_the_engine(path):
    raw = json.loads(path.read_text())
    assert "dece" in raw, f"{path.name}: every shipped config has a dece section"
    cfg = DeceConfig.from_ds_config(path)
    assert cfg == DeceConfig.from_ds_config(raw) == dece_config_for_engine(str(path))
    assert DeceConfig.from_ds_config({"dece": cfg.to_ds_section()}) == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_deepspeed_parses_the_config(path):
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.tensor_parallel.config import get_tensor_parallel_config
    raw = json.loads(path.read_text())
    parsed = DeepSpeedConfig(str(path))  # no process group here: DeepSpeed takes world size 1
    assert parsed.zero_optimization_stage == raw["zero_optimization"]["stage"]
    tp = get_tensor_parallel_config(raw)
    assert tp.autotp_size == raw.get("tensor_parallel", {}).get("autotp_size", 0)
    if tp.autotp_size > 1:
        assert tp.vocab_parallel_lm_head is True  # DeCE then runs on the vocabulary shards
