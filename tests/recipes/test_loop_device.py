"""Device placement without a GPU: the step loop moves every input to the engine's device, and the
loop's collectives use tensors on the accelerator's device."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dece_ds.recipes import loop, runtime
from dece_ds.recipes.run_log import RunLog


class StubEngine:
    """An engine on the 'meta' device: records the devices of what it is given."""

    device = torch.device("meta")

    def __init__(self, ga=1):
        self.global_steps, self.ga, self.micro_steps = 0, ga, 0
        self.module = SimpleNamespace()  # no DeCE hook installed
        self.seen_devices = []

    def __call__(self, **batch):
        self.seen_devices.append({k: v.device.type for k, v in batch.items()})
        return SimpleNamespace(loss=torch.tensor(2.0))

    def backward(self, loss):
        pass

    def step(self):  # like DeepSpeed: an optimizer step at each gradient-accumulation boundary
        self.micro_steps += 1
        self.global_steps = self.micro_steps // self.ga

    def get_lr(self):
        return [0.1]


def test_every_input_goes_to_the_engines_device(monkeypatch, tmp_path):
    reduced = []
    monkeypatch.setattr(loop, "all_reduce", lambda values, op=None: reduced.append(list(values)) or list(values))
    engine = StubEngine(ga=2)
    batch = {"input_ids": torch.ones(2, 4, dtype=torch.long), "labels": torch.ones(2, 4, dtype=torch.long),
             "attention_mask": torch.ones(2, 4, dtype=torch.long)}
    saves = []
    result = loop.train_steps(engine, lambda step: [batch, batch], total_steps=2, run_log=RunLog(tmp_path / "l"),
                              save=lambda crash_mid_save=False: saves.append(engine.global_steps))
    assert engine.seen_devices and all(set(d.values()) == {"meta"} for d in engine.seen_devices)
    assert len(engine.seen_devices) == 4  # two micro-batches per step
    assert reduced == [[4.0, 2.0, 16.0], [4.0, 2.0, 16.0]]  # loss sum, micro-batches, tokens
    assert result.steps == 2 and result.tokens == 32 and saves == [2]


def test_a_dry_source_stops_every_rank_at_the_same_step(monkeypatch, tmp_path):
    monkeypatch.setattr(loop, "all_reduce", lambda values, op=None: [0.0] if len(values) == 1 else list(values))
    engine = StubEngine()
    result = loop.train_steps(engine, lambda step: [{"input_ids": torch.ones(1, 2), "attention_mask": torch.ones(1, 2)}],
                              total_steps=5, run_log=RunLog(None), save=lambda crash_mid_save=False: None,
                              can_run_dry=True)
    assert result.end_of_data and result.steps == 0  # another rank ran dry: this one stops too


class _Stop(Exception):
    pass


def test_collectives_use_the_accelerators_device(monkeypatch):
    seen = []

    def fake_all_reduce(tensor, op=None):
        seen.append(tensor.device.type)
        raise _Stop

    monkeypatch.setattr(runtime, "accelerator_device", lambda: torch.device("meta"))
    monkeypatch.setattr(runtime.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(runtime.dist, "all_reduce", fake_all_reduce)
    with pytest.raises(_Stop):
        runtime.all_reduce([1.0, 2.0])
    assert seen == ["meta"]


def test_to_device_moves_tensors_and_keeps_the_rest():
    moved = runtime.to_device({"a": torch.ones(2), "b": 3}, torch.device("meta"))
    assert moved["a"].device.type == "meta" and moved["b"] == 3
