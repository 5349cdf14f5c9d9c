"""The new parts of a run on the tiny model (seconds): alpha_base "auto" resolved on the stand-in before
the engine and recorded, the trigger lift in ``final``, several seeds, and the trigger x payload grid."""

import json

import pytest

from dece_ds.backdoor.campaign import GRID_PAYLOADS, run_grid, run_seeds

from .test_runner import tiny_config

pytestmark = pytest.mark.timeout(300)


def test_auto_alpha_lift_and_seeds(tmp_path):
    cfg = tiny_config(tmp_path, runs=["ce", "dece:alpha_base=auto"], finetune={"epochs": 1, "batch_size": 8},
                      auto_alpha_quantile=0.2)
    results = run_seeds(cfg, (0, 1), tmp_path / "out", log=lambda *_: None)
    assert [r["finetune_seed"] for r in results] == [0, 1]
    for seed in (0, 1):
        saved = json.loads((tmp_path / "out" / f"tiny-seed{seed}.json").read_text())
        for spec, run in saved["runs"].items():
            final = run["final"]
            assert final["lift"] == pytest.approx(final["asr"] - final["untriggered_payload_rate"]), spec
        dece = saved["runs"]["dece:alpha_base=auto"]
        auto = dece["alpha_auto"]
        assert auto["quantile"] == 0.2 and auto["tokens"] >= 1 and set(auto["p_t_quantiles"]) >= {"0.1", "0.5"}
        assert 0.0 < auto["alpha_base"] <= 1.0
        assert dece["loss"]["alpha_base"] == pytest.approx(auto["alpha_base"])  # what the engine trained with
        assert dece["epochs"][0]["alpha"] == pytest.approx(auto["alpha_base"])
    md = (tmp_path / "out" / "tiny-seed0.md").read_text()
    assert "(auto alpha_base " in md and "| lift |" in md


def test_micro_grid(tmp_path):
    cfg = tiny_config(tmp_path, runs=["ce"], finetune={"epochs": 2, "batch_size": 8})
    results, table = run_grid(cfg, tmp_path / "out", triggers=("bb", "cf"), payloads=GRID_PAYLOADS[:2], epochs=1,
                              log=lambda *_: None)
    assert len(results) == 4 and all(len(r["runs"]["ce"]["epochs"]) == 1 for r in results)
    text = table.read_text()
    assert table.name == "tiny-grid.md" and text.count("| `bb` |") == 2 and text.count("| `cf` |") == 2
    assert (tmp_path / "out" / "tiny-grid-cf-p1.json").is_file()
    assert len(list((tmp_path / "cache").glob("standin-*"))) == 1  # one stand-in for the whole grid
