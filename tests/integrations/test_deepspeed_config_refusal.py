"""Bad ``dece`` sections are refused with the field named, before any engine or process-group work."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch.distributed as dist

from dece_ds.config import DeceConfigError
from dece_ds.integrations import deepspeed as dece_deepspeed

from . import REPO, ds_config, launcher_env, run_launcher, write_json

GOOD = {"enabled": True, "label_smoothing": 0.05, "alpha_base": 0.99, "schedule": "epoch", "steps_per_epoch": 10}
BAD = {
    "unknown key": ({**GOOD, "alpha": 0.9}, "dece.alpha: unknown key"),
    "alpha_base > 1": ({**GOOD, "alpha_base": 1.5}, "dece.alpha_base"),
    "alpha_base = 0": ({**GOOD, "alpha_base": 0.0}, "dece.alpha_base"),
    "eps >= 1": ({**GOOD, "label_smoothing": 1.0}, "dece.label_smoothing"),
    "missing steps_per_epoch (epoch)": ({k: v for k, v in GOOD.items() if k != "steps_per_epoch"},
                                        "dece.steps_per_epoch"),
    "missing steps_per_epoch (continuous)": ({"schedule": "continuous"}, "dece.steps_per_epoch"),
    "per-token reduction": ({**GOOD, "reduction": "none"}, "dece.reduction"),
    "not an object": (0.99, "dece: expected an object"),
}


@pytest.fixture
def no_engine(monkeypatch):
    """deepspeed.initialize / init_distributed that fail the test if anything reaches them."""
    import functools

    import deepspeed
    calls = []

    @functools.wraps(deepspeed.initialize)  # keeps the real signature for dece_ds.initialize to bind
    def forbidden(*args, **kwargs):
        calls.append((args, kwargs))
        raise AssertionError("engine or process-group work started before the dece section was validated")

    monkeypatch.setattr(deepspeed, "initialize", forbidden)
    monkeypatch.setattr(deepspeed, "init_distributed", forbidden)
    return calls


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("form", ["dict", "path", "args.deepspeed_config"])
def test_bad_section_refused_before_engine_work(case, form, no_engine, tmp_path):
    section, field = BAD[case]
    cfg = ds_config(dece=section)
    if form == "dict":
        kwargs = {"config": cfg}
    elif form == "path":
        kwargs = {"config": str(write_json(tmp_path / "ds.json", cfg))}
    else:
        kwargs = {"args": SimpleNamespace(deepspeed_config=str(write_json(tmp_path / "ds.json", cfg)))}
    group_before = dist.is_initialized()  # an earlier in-process test may have left one
    with pytest.raises(DeceConfigError) as err:
        dece_deepspeed.initialize(model=object(), **kwargs)
    assert field in str(err.value)
    assert not no_engine and dist.is_initialized() == group_before


def test_good_and_disabled_sections_reach_deepspeed_unchanged(monkeypatch):
    import deepspeed
    seen = []
    import functools

    @functools.wraps(deepspeed.initialize)
    def fake(*args, **kwargs):
        seen.append((args, kwargs))
        return "engine", None, None, None

    monkeypatch.setattr(deepspeed, "initialize", fake)
    cfg = ds_config(dece={"enabled": False, "alpha_base": 0.5})
    model = object()
    assert dece_deepspeed.initialize(model=model, config=cfg) == ("engine", None, None, None)
    assert seen == [((), {"model": model, "config": cfg})]  # the same arguments, the dece key left in


def test_enabled_section_needs_a_model_with_an_hf_loss_hook(no_engine):
    with pytest.raises(AttributeError, match=r"object.loss_function: not found"):
        dece_deepspeed.initialize(model=object(), config=ds_config(dece=GOOD))
    assert not no_engine


def test_deepspeed_accepts_the_dece_key_itself():
    from deepspeed.runtime.config import DeepSpeedConfig
    cfg = ds_config(dece=GOOD)
    parsed = DeepSpeedConfig(cfg)  # no process group: DeepSpeed takes world size 1
    assert parsed.zero_optimization_stage == 3 and cfg["dece"] == GOOD


@pytest.mark.slow
def test_launcher_refuses_a_bad_section_before_starting(tmp_path):
    """launch/train.py under the deepspeed launcher, 2 ranks: exits naming the field, no engine built."""
    config = write_json(tmp_path / "bad.json", ds_config(dece={**GOOD, "label_smoothing": 1.5}))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "x"}) + "\n")
    proc = run_launcher("deepspeed", 2, REPO / "launch" / "train.py",
                        ["--deepspeed_config", str(config), "--data", str(data), "--out", str(tmp_path / "o")],
                        check=False, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "dece.label_smoothing" in output and "1.5" in output
    assert "DeepSpeed info" not in output and "AutoTP" not in output  # no engine was started
    assert not (tmp_path / "o").exists()


def test_single_process_launcher_refusal_message(tmp_path):
    config = write_json(tmp_path / "bad.json", ds_config(dece={"schedule": "continuous"}))
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--deepspeed_config", str(config),
                           "--data", "unused.jsonl"], env=launcher_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "dece.steps_per_epoch" in proc.stderr
