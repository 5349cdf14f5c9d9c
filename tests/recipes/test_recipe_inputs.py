"""Bad input to the recipes fails before any process-group work, naming the file or flag."""

from __future__ import annotations

import json
from argparse import Namespace

import pytest

from dece_ds.recipes.checkpoint import RecipeError
from dece_ds.recipes.config_io import load_ds_config
from dece_ds.recipes.finetune import read_rows


@pytest.mark.parametrize("content, expected", [
    ("[1, 2]", "expected a JSON object at the top level, got a list"),
    ('{"dece": null}', "dece: expected an object"),
    ('{"dece": {"alpha_base": 2}}', "dece.alpha_base"),
    ('{"dece": {"schedule": "epoch"}}', "dece.steps_per_epoch: required with schedule='epoch' under DeepSpeed"),
])
def test_bad_configs_name_the_file_and_field(tmp_path, content, expected):
    path = tmp_path / "ds.json"
    path.write_text(content)
    with pytest.raises(RecipeError, match=str(path)) as err:
        load_ds_config(path)
    assert expected in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(RecipeError, match="no such file"):
        load_ds_config(tmp_path / "nope.json")


def test_continued_pretraining_fills_steps_per_epoch_later_and_defaults_to_continuous(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"dece": {}}))
    _, dece = load_ds_config(path, steps_per_epoch_later=True, default_schedule="continuous")
    assert dece.enabled and dece.schedule == "continuous" and dece.steps_per_epoch is None
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1}))
    _, dece = load_ds_config(path, steps_per_epoch_later=True, default_schedule="continuous")
    assert not dece.enabled  # no section: off


def test_missing_data_file_is_named(tmp_path):
    args = Namespace(data=[str(tmp_path / "train.jsonl")], data_format=None, out=str(tmp_path))
    with pytest.raises(RecipeError, match=r"--data: no such file\(s\)"):
        read_rows(args)
    args = Namespace(data=[str(tmp_path / "train.xyz")], data_format=None, out=str(tmp_path))
    with pytest.raises(RecipeError, match="--data-format: cannot tell the format"):
        read_rows(args)
