"""``dece-ds plan`` and ``PlanInput`` name the field that is wrong: a count flag below 1 or not an integer,
``--tp`` that does not divide ``--world-size``, a model ``config.json`` with a size missing or not a
positive integer."""

from __future__ import annotations

import json

import pytest

from dece_ds.cli import main
from dece_ds.planning import PlanInput, resolve_shape


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(["plan", *argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("flag,value,expected", [
    ("--world-size", "0", "must be >= 1, got 0"), ("--world-size", "-1", "must be >= 1, got -1"),
    ("--world-size", "x", "must be an integer >= 1, got 'x'"), ("--tp", "0", "must be >= 1, got 0"),
    ("--tp", "-2", "must be >= 1, got -2"), ("--micro-batch", "0", "must be >= 1, got 0"),
    ("--micro-batch", "1.5", "must be an integer >= 1, got '1.5'"), ("--seq-len", "-5", "must be >= 1, got -5"),
    ("--seq-len", "", "must be an integer >= 1, got ''"),
])
def test_count_flags_name_the_flag(capsys, flag, value, expected):
    code, out, err = run_cli(capsys, "codellama-7b", flag, value)
    assert code == 2 and out == ""
    assert err.startswith(f"dece-ds plan: error: argument {flag}: {expected}"), err
    assert err.count("\n") == 1


def test_tp_that_does_not_divide_names_both_flags(capsys):
    code, out, err = run_cli(capsys, "codellama-7b", "--world-size", "8", "--tp", "3")
    assert (code, out) == (2, "")
    assert err == "dece-ds plan: error: --tp: must divide --world-size (8), got 3\n"


def test_cpu_offload_below_stage_2_names_both_flags(capsys):
    code, out, err = run_cli(capsys, "codellama-7b", "--offload", "cpu", "--zero-stage", "1")
    assert (code, out) == (2, "")
    assert err == "dece-ds plan: error: --offload cpu: needs --zero-stage 2 or 3, got 1\n"


@pytest.mark.parametrize("field,value,expected", [
    ("world_size", 0, "world_size: must be >= 1, got 0"), ("tp", -1, "tp: must be >= 1, got -1"),
    ("micro_batch", 0, "micro_batch: must be >= 1, got 0"), ("seq_len", -3, "seq_len: must be >= 1, got -3"),
    ("world_size", 2.5, "world_size: must be an integer >= 1, got 2.5"),
    ("seq_len", True, "seq_len: must be an integer >= 1, got True"),
    ("tp", 3, "tp: must divide world_size (8), got 3"),
])
def test_plan_input_names_the_field(field, value, expected):
    with pytest.raises(ValueError) as e:
        PlanInput(**{field: value})
    assert str(e.value) == expected


HF_CONFIG = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
             "vocab_size": 100, "intermediate_size": 128}


@pytest.mark.parametrize("change,expected", [
    ({"num_attention_heads": 0}, "num_attention_heads: expected an integer >= 1, got 0"),
    ({"hidden_size": "64"}, "hidden_size: expected an integer >= 1, got '64'"),
    ({"num_hidden_layers": 2.5}, "num_hidden_layers: expected an integer >= 1, got 2.5"),
    ({"vocab_size": None}, "none of ['vocab_size'] in the config"),
    ({"num_key_value_heads": -1}, "num_key_value_heads: expected an integer >= 1, got -1"),
])
def test_model_config_json_sizes_are_checked(tmp_path, capsys, change, expected):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**HF_CONFIG, **change}))
    with pytest.raises(ValueError, match=f"^{path}: "):
        resolve_shape(path)
    code, out, err = run_cli(capsys, str(path))
    assert (code, out) == (2, "")
    assert err.startswith(f"dece-ds plan: error: {path}: ") and expected in err and err.count("\n") == 1, err


def test_a_folder_without_config_json(tmp_path, capsys):
    code, _, err = run_cli(capsys, str(tmp_path))
    assert code == 2 and err == f"dece-ds plan: error: model: {tmp_path}: a folder without a config.json\n"
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
    assert resolve_shape(tmp_path).hidden_size == 64
