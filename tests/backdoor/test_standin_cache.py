"""The stand-in cache (issue 15): weights in safetensors, never a pickle; entries complete or absent; two
runs with one key never break each other; the key of the entries cached so far unchanged.

The stand-in tests pretrain a one-layer, 16-wide GPT-2 on six task rows (no code corpus): a few seconds."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
import torch

from dece_ds.backdoor import cache
from dece_ds.backdoor.experiment import ExperimentConfig
from dece_ds.backdoor.standin import pretrain_stand_in, save_stand_in, stand_in_folder, stand_in_key

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[2]


def tiny_config(tmp_path, **over) -> ExperimentConfig:
    cfg = {"model": {"n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": 300, "max_len": 32, "max_src_tokens": 8},
           "pretrain": {"corpus_functions": 0, "epochs": 1, "batch_size": 2}, "threads": 1,
           "cache_dir": str(tmp_path / "cache"), **over}
    return ExperimentConfig.model_validate(cfg)


ROWS = [{"src": f"return the row with id {i}", "tgt": f"def f ( conn ) :\n\t return conn . get ( {i} )"}
        for i in range(6)]


def stand_in(cfg, messages=None):
    """pretrain_stand_in on the tiny rows; ``messages`` collects the log lines."""
    return pretrain_stand_in(cfg, ROWS[:3], ROWS[3:], (messages if messages is not None else []).append)


def _logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.arange(2, 12).unsqueeze(0)).logits


# ---- no pickle ------------------------------------------------------------------------------------------

def _torch_loads_without_weights_only(path: Path) -> list[int]:
    """Lines of ``torch.load(...)`` calls in ``path`` that do not pass ``weights_only=True``."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
            kw = {k.arg: k.value for k in node.keywords}
            if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                bad.append(node.lineno)
    return bad


def test_no_torch_load_without_weights_only_in_the_package():
    files = sorted((REPO / "dece_ds").rglob("*.py")) + [REPO / "benchmarks" / "backdoor_payload_probs.py"]
    bad = {str(f.relative_to(REPO)): lines for f in files if (lines := _torch_loads_without_weights_only(f))}
    assert not bad, f"torch.load without weights_only=True (unpickles arbitrary code): {bad}"


def test_safetensors_round_trip_keeps_the_model_and_its_tied_head(tmp_path):
    cfg = tiny_config(tmp_path)
    model, tok, info = stand_in(cfg)
    messages = []
    loaded, tok2, info2 = stand_in(cfg, messages)
    assert messages == [f"stand-in pretrained model from cache {stand_in_folder(cfg, 0)}"]
    assert info2 == info and tok2.vocab_size == tok.vocab_size
    assert torch.equal(_logits(model), _logits(loaded))
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


# ---- entries complete or absent --------------------------------------------------------------------------

def test_the_temporary_folder_never_survives(tmp_path):
    entry = tmp_path / "entry"
    assert cache.publish(entry, lambda tmp: (tmp / "a.txt").write_text("a"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]
    assert sorted(p.name for p in entry.iterdir()) == ["a.txt", cache.MARKER]
    assert json.loads((entry / cache.MARKER).read_text())["files"] == ["a.txt"]

    def fails(tmp):
        (tmp / "half.bin").write_bytes(b"12")
        raise KeyboardInterrupt  # killed politely, mid-write
    with pytest.raises(KeyboardInterrupt):
        cache.publish(tmp_path / "other", fails)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


def test_a_stand_in_leaves_nothing_but_its_entry(tmp_path):
    cfg = tiny_config(tmp_path)
    stand_in(cfg)
    assert [p.name for p in Path(cfg.cache_dir).iterdir()] == [stand_in_folder(cfg, 0).name]


def _publish_winner(entry: Path, text: str) -> None:
    assert cache.publish(entry, lambda tmp: (tmp / "a.txt").write_text(text))


def test_a_rename_race_keeps_the_winner_and_discards_the_loser(tmp_path):
    entry = tmp_path / "entry"

    def build(tmp):  # the other run finishes while this one is still writing
        (tmp / "a.txt").write_text("loser")
        _publish_winner(entry, "winner")
    assert cache.publish(entry, build) is False
    assert (entry / "a.txt").read_text() == "winner" and cache.is_complete(entry)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


def test_an_incomplete_entry_in_the_way_is_replaced(tmp_path):
    entry = tmp_path / "entry"
    entry.mkdir()
    (entry / "model.pt").write_bytes(b"half")                         # the old layout, or a killed write
    assert cache.publish(entry, lambda tmp: (tmp / "a.txt").write_text("new")) is True
    assert sorted(p.name for p in entry.iterdir()) == ["a.txt", cache.MARKER]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


def test_a_complete_entry_moved_aside_by_a_racer_is_put_back(tmp_path, monkeypatch):
    """Two runs find the same incomplete entry; the first replaces it; the second, still believing it
    incomplete, moves the first's complete entry aside: it must go back, and win."""
    entry = tmp_path / "entry"
    entry.mkdir()
    (entry / "model.pt").write_bytes(b"half")
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        if Path(dst).name.startswith(".entry.stale-") and not calls:
            calls.append(dst)          # just before our move aside, the other run replaces the stale entry
            real_rename(src, str(tmp_path / ".gone"))
            _publish_winner(entry, "first")
        return real_rename(src, dst)
    monkeypatch.setattr(os, "rename", rename)
    assert cache.publish(entry, lambda tmp: (tmp / "a.txt").write_text("second")) is False
    assert (entry / "a.txt").read_text() == "first" and cache.is_complete(entry)


def test_a_losing_stand_in_run_uses_the_winners_entry(tmp_path, monkeypatch):
    from dece_ds.backdoor import standin
    cfg = tiny_config(tmp_path)
    folder = stand_in_folder(cfg, 0)

    def save_and_lose(tmp, model, tok, info):
        save_stand_in(tmp, model, tok, info)
        cache.publish(folder, lambda other: save_stand_in(other, model, tok, {**info, "winner": True}))
    monkeypatch.setattr(standin, "save_stand_in", save_and_lose)
    messages = []
    _, _, info = stand_in(cfg, messages)
    assert info["winner"] is True and "using its copy" in messages[-1]
    assert sorted(p.name for p in Path(cfg.cache_dir).iterdir()) == [folder.name]


# ---- the key -------------------------------------------------------------------------------------------

def test_the_cache_key_is_unchanged():
    """Keys computed by the code before the split: cached stand-ins keep their folders."""
    assert stand_in_key(ExperimentConfig(), 2000) == "b38067d25a7e"
    assert stand_in_key(ExperimentConfig.model_validate(
        {"pretrain": {"lr_schedule": "constant"}, "seed": 3, "finetune_rows": 100}), 17) == "cea3dfbc4c21"


@pytest.mark.parametrize("name", ["lyra-badpre-10-C-x3", "lyra-badpre-10-full", "lyra-ripple-10-C",
                                  "stdlib-badpre-10"])
def test_committed_results_name_the_folder_the_key_gives(name):
    results = json.loads((REPO / "benchmarks" / "results" / "backdoor" / f"{name}.json").read_text())
    cfg = ExperimentConfig.model_validate({k: v for k, v in results["config"].items() if k != "attack_resolved"})
    folder = stand_in_folder(cfg, results["pretrain"]["corpus_functions"])
    assert str(folder) == results["pretrain"]["cache"]
