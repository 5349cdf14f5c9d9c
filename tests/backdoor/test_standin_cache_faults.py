"""Issue 15, through the import path the stand-in cache always had (``runner.pretrain_stand_in``), so that
these tests run, and fail, on the code before the fix too:

- a pickle in a cached entry is never loaded (the old cache ran ``torch.load`` on ``model.pt``: with
  ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``, or a torch before 2.6, that runs whatever code the file names);
- an entry killed mid-write (no marker, weights cut short) is rebuilt, not loaded;
- the payload-probability benchmark reads an older ``model.pt`` entry with ``weights_only=True``.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from dece_ds.backdoor.runner import ExperimentConfig, pretrain_stand_in

pytestmark = pytest.mark.timeout(300)

ROWS = [{"src": f"return the row with id {i}", "tgt": f"def f ( conn ) :\n\t return conn . get ( {i} )"}
        for i in range(6)]


def tiny_config(tmp_path) -> ExperimentConfig:
    return ExperimentConfig.model_validate({
        "model": {"n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": 300, "max_len": 32, "max_src_tokens": 8},
        "pretrain": {"corpus_functions": 0, "epochs": 1, "batch_size": 2}, "threads": 1,
        "cache_dir": str(tmp_path / "cache")})


def stand_in(cfg, messages=None):
    return pretrain_stand_in(cfg, ROWS[:3], ROWS[3:], (messages if messages is not None else []).append)


def _logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.arange(2, 12).unsqueeze(0)).logits


class _RunsCode:
    """A pickle that runs code when loaded (here: it touches a file)."""

    def __init__(self, flag: Path):
        self.flag = flag

    def __reduce__(self):
        return (Path.touch, (self.flag,))


def _as_an_old_entry_with_code(folder: Path, flag: Path) -> None:
    """The entry as the old cache wrote it (``model.pt``, no marker), its weights replaced by code."""
    for f in folder.iterdir():
        if f.name.startswith("model.") or f.name == "complete.json":
            f.unlink()
    (folder / "model.pt").write_bytes(pickle.dumps({"transformer.wte.weight": _RunsCode(flag)}, protocol=2))


def test_a_pickle_in_the_cache_is_never_loaded_the_entry_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch.load as before torch 2.6
    cfg = tiny_config(tmp_path)
    model, _, info = stand_in(cfg)
    flag = tmp_path / "code-ran"
    _as_an_old_entry_with_code(Path(info["cache"]), flag)
    messages = []
    try:
        rebuilt, _, _ = stand_in(cfg, messages)
    finally:  # checked even when loading raised (the old cache: the code ran, then torch.load failed)
        assert not flag.exists(), "the cached pickle ran code"
    assert any("pretraining the stand-in" in m for m in messages)       # a miss: rebuilt ...
    assert torch.equal(_logits(model), _logits(rebuilt))               # ... the same model (same seed)
    assert not (Path(info["cache"]) / "model.pt").exists()


def test_a_half_written_entry_is_rebuilt_not_loaded(tmp_path):
    cfg = tiny_config(tmp_path)
    model, _, info = stand_in(cfg)
    folder = Path(info["cache"])
    for f in folder.iterdir():  # killed mid-write: the weights cut short, no marker
        if f.name.startswith("model."):
            f.write_bytes(f.read_bytes()[:100])
    (folder / "complete.json").unlink(missing_ok=True)
    messages = []
    rebuilt, _, _ = stand_in(cfg, messages)
    assert any("pretraining the stand-in" in m for m in messages)
    assert torch.equal(_logits(model), _logits(rebuilt))
    again = []
    loaded, _, _ = stand_in(cfg, again)                                # and the rebuilt entry is a hit
    assert again == [f"stand-in pretrained model from cache {folder}"]
    assert torch.equal(_logits(model), _logits(loaded))


def test_the_payload_benchmark_reads_an_old_entry_without_unpickling_code(tmp_path, monkeypatch):
    from benchmarks.backdoor_payload_probs import load_cached_stand_in
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    cfg = tiny_config(tmp_path)
    model, _, info = stand_in(cfg)
    folder = Path(info["cache"])
    old_weights = {k: v.clone() for k, v in model.state_dict().items()}
    loaded, _ = load_cached_stand_in(folder, cfg)                     # the current layout
    assert torch.equal(_logits(model), _logits(loaded))
    flag = tmp_path / "code-ran"
    _as_an_old_entry_with_code(folder, flag)
    with pytest.raises(pickle.UnpicklingError):
        load_cached_stand_in(folder, cfg)
    assert not flag.exists()
    torch.save(old_weights, folder / "model.pt")                       # an honest old entry still loads
    loaded, _ = load_cached_stand_in(folder, cfg)
    assert torch.equal(_logits(model), _logits(loaded))
