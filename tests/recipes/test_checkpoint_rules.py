"""Checkpoint rules of the recipes: 'latest' names a complete checkpoint, its tag is never rewritten,
and a resume refuses a checkpoint of another run."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dece_ds.recipes import checkpoint as ck


class StubEngine:
    """Records save_checkpoint calls; writes the tag folder like DeepSpeed does."""

    def __init__(self, step):
        self.global_steps = step
        self.saved = []
        self.checkpoint_engine = SimpleNamespace(save=lambda *a, **k: None)

    def save_checkpoint(self, save_dir, tag, client_state, save_latest=True):
        self.saved.append((tag, save_latest))
        (ck.Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)


def test_save_points_latest_at_a_fresh_tag_and_never_rewrites_it(tmp_path):
    engine = StubEngine(4)
    assert ck.save_checkpoint(engine, tmp_path, {}) == "step4"
    assert (tmp_path / "latest").read_text() == "step4"
    assert engine.saved == [("step4", False)]  # DeepSpeed does not write 'latest' itself
    # a second save at the same step (end of a streaming corpus) goes elsewhere
    assert ck.save_checkpoint(engine, tmp_path, {}) == "step4.1"
    assert (tmp_path / "latest").read_text() == "step4.1"
    assert ck.save_checkpoint(engine, tmp_path, {}) == "step4"  # step4 is no longer what latest names
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_identity_differences_name_each_changed_key():
    saved = {"seed": 0, "data": ["a.jsonl"], "steps_per_epoch": 6, "world_size": 2}
    now = {"seed": 1, "data": ["a.jsonl"], "steps_per_epoch": 6, "world_size": 4, "seq_len": 64}
    diffs = ck.identity_differences(saved, now)
    assert diffs == ["seed: 0 in the checkpoint, 1 now", "world_size: 2 in the checkpoint, 4 now"]
    assert ck.identity_differences(None, now) == []


def test_resume_asked_by_path_without_a_checkpoint_is_an_error(tmp_path):
    with pytest.raises(ck.RecipeError, match="--resume: no checkpoint in"):
        ck.resume(StubEngine(0), str(tmp_path), tmp_path / "checkpoints", identity={}, allow_mismatch=False,
                  log_path=None)
    assert ck.resume(StubEngine(0), "auto", tmp_path / "checkpoints", identity={}, allow_mismatch=False,
                     log_path=None) is None
    assert ck.resume(StubEngine(0), None, tmp_path, identity={}, allow_mismatch=False, log_path=None) is None


class LoadingEngine(StubEngine):
    """load_checkpoint returns a saved client_state; the module carries a DeCE hook."""

    def __init__(self, step, client_state, dece_config):
        super().__init__(step)
        from dece_ds.integrations.hook import DeceHook
        self.client_state = client_state
        self.module = SimpleNamespace(loss_function=DeceHook(dece_config, step_source=lambda: self.global_steps))

    def load_checkpoint(self, load_dir):
        return f"{load_dir}/step{self.global_steps}", self.client_state


def _saved_run(tmp_path, run, dece):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "latest").write_text("step2")
    return {"run": run, "dece": {"enabled": True, "mode": "logits", "config": dece.to_ds_section()}}


def test_resume_refuses_another_run_and_names_the_override(tmp_path):
    from dece_ds.config import DeceConfig
    dece = DeceConfig(alpha_base=0.9, schedule="constant")
    state = _saved_run(tmp_path, {"seed": 0, "steps_per_epoch": 6}, dece)
    engine = LoadingEngine(2, state, dece.model_copy(update={"alpha_base": 0.8}))
    with pytest.raises(ck.RecipeError) as err:
        ck.resume(engine, "auto", tmp_path / "ck", identity={"seed": 1, "steps_per_epoch": 6},
                  allow_mismatch=False, log_path=None)
    message = str(err.value)
    assert "seed: 0 in the checkpoint, 1 now" in message
    assert "dece.alpha_base: 0.9 in the checkpoint, 0.8 now" in message
    assert "--allow-resume-mismatch" in message
    warnings = []
    got = ck.resume(engine, "auto", tmp_path / "ck", identity={"seed": 1, "steps_per_epoch": 6},
                    allow_mismatch=True, log_path=None, log0=warnings.append)
    assert got is state and any("seed" in w for w in warnings)


def test_resume_of_the_same_run_trims_the_log(tmp_path):
    from dece_ds.config import DeceConfig
    dece = DeceConfig(alpha_base=0.9, schedule="constant")
    state = _saved_run(tmp_path, {"seed": 0}, dece)
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    got = ck.resume(LoadingEngine(2, state, dece), "auto", tmp_path / "ck", identity={"seed": 0},
                    allow_mismatch=False, log_path=log, log0=lambda *a: None)
    assert got is state and log.read_text() == '{"step": 1}\n{"step": 2}\n'
