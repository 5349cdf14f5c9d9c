"""The demo's command line -> ExperimentConfig: the schedule under which CE learns the trigger."""

import importlib.util
from pathlib import Path

DEMO = Path(__file__).resolve().parents[2] / "launch" / "backdoor_demo.py"


def _demo_module():
    spec = importlib.util.spec_from_file_location("backdoor_demo", DEMO)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_demo_defaults():
    mod = _demo_module()
    cfg = mod.demo_config(mod.build_parser().parse_args([]))
    assert cfg.dataset == "stdlib" and cfg.runs == ("ce", "dece")
    assert cfg.attack_config().rate == 0.10 and cfg.attack_config().trigger == "bb"
    assert (cfg.finetune.lr, cfg.finetune.batch_size, cfg.finetune.epochs, cfg.finetune_dropout) == (1e-3, 8, 8, 0.0)
    assert cfg.finetune_rows == 400 and cfg.pretrain_task_rows == 800
    assert cfg.dece["alpha_base"] == 0.97
    assert cfg.stem() == "stdlib-badpre-10"


def test_demo_flags_and_quick():
    mod = _demo_module()
    cfg = mod.demo_config(mod.build_parser().parse_args(
        ["--alpha-base", "0.99", "--lr", "5e-4", "--batch-size", "16", "--name", "x", "--runs", "clean,ce"]))
    assert (cfg.dece["alpha_base"], cfg.finetune.lr, cfg.finetune.batch_size, cfg.stem()) == (0.99, 5e-4, 16, "x")
    assert cfg.runs == ("clean", "ce")
    quick = mod.demo_config(mod.build_parser().parse_args(["--quick"]))
    assert quick.model.n_layer == 1 and quick.finetune.epochs == 2 and quick.stem() == "stdlib-badpre-quick"
