"""The recorder: row ids survive shuffling, gradient accumulation, both ways of naming rows, two
data-parallel ranks and a kill-and-resume; the recorded log p_t is the model's."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from dece_ds import DeceConfig
from dece_ds.audit import AuditRecorder, keep_steps_before, read_record
from dece_ds.integrations.hook import DeceHook
from tests.audit.toy import encode, finetune, make_rows
from tests.parallel.spawn import run_distributed

N_ROWS = 48


def _hook(out, spe, **kw):
    cfg = DeceConfig.from_dict({"alpha_base": 0.9, "steps_per_epoch": spe, "audit": {"enabled": True, "out": str(out)},
                                **kw})
    return DeceHook(cfg)


def _targets(data, r):
    lab = data["labels"][r]
    t = torch.nn.functional.pad(lab, (0, 1), value=-100)[1:]
    keep = (t != -100).nonzero().flatten()
    return keep.tolist(), t[keep].tolist()


def _check_rows(record, data, epochs):
    assert record.rows == list(range(data["input_ids"].shape[0]))
    for r in record.rows:
        assert sorted(record.visits[r]) == list(range(1, epochs + 1))
        pos, tok = _targets(data, r)
        for v in record.visits[r].values():
            assert (v.pos, v.tok) == (pos, tok), f"row {r}: recorded tokens are another row's"


def test_row_ids_survive_shuffle_and_grad_accumulation(tmp_path, stand_in):
    data = encode(make_rows(N_ROWS, {3, 9}, 1))
    for via_kwarg, ga in ((True, 2), (False, 1)):
        out = tmp_path / f"rec-{via_kwarg}"
        model = stand_in()
        hook = _hook(out, spe=N_ROWS // 8 // ga).install(model)
        finetune(model, hook, data, epochs=2, batch_size=8, seed=5, grad_accum=ga, via_kwarg=via_kwarg)
        hook.recorder.close()
        record = read_record(out)
        _check_rows(record, data, epochs=2)
        steps = sorted({v.step for r in record.rows for v in record.visits[r].values()})
        assert steps[-1] == 2 * N_ROWS // 8 // ga - 1   # the 0-based optimizer step, shared by a step's micro-batches
        hook.remove()


@pytest.mark.parametrize("fused", [False, True])
def test_recorded_log_p_is_the_models(tmp_path, stand_in, fused):
    """Full logits and the fused-linear head (hidden states + lm_head weight): the model's own log p_t."""
    data = encode(make_rows(8, set(), 2))
    model = stand_in()
    hook = _hook(tmp_path, spe=1, fused_linear=fused).install(model)
    assert hook.mode == ("hidden" if fused else "logits")
    model.eval()
    idx = torch.arange(8)
    with torch.no_grad():
        logits = model(**{k: v[idx] for k, v in data.items() if k != "labels"}).logits
        model(**{k: v[idx] for k, v in data.items()}, dece_row_ids=idx)
    hook.recorder.close()
    record = read_record(tmp_path)
    lp = logits.double().log_softmax(-1)
    for r in range(8):
        v = record.visits[r][1]
        ref = [float(lp[r, p, t]) for p, t in zip(v.pos, v.tok)]
        assert max(abs(a - b) for a, b in zip(v.logp, ref)) < 2e-4   # 4 decimals stored


def test_forward_without_row_ids_records_nothing_and_kwarg_is_harmless_without_audit(tmp_path, stand_in):
    data = encode(make_rows(8, set(), 2))
    model = stand_in()
    hook = _hook(tmp_path / "a", spe=1).install(model)
    model(**data)                                  # e.g. an evaluation forward
    assert hook.recorder.lines == 0
    hook.remove()
    plain = DeceHook(DeceConfig.from_dict({"alpha_base": 0.9})).install(model)
    assert plain.recorder is None
    model(**data, dece_row_ids=torch.arange(8))    # popped, not passed to GPT-2's forward
    plain.remove()


def _dp_rank(rank, world, out, state):
    from tests.audit.toy import tiny_model
    model = tiny_model()
    model.load_state_dict(state)
    data = encode(make_rows(N_ROWS, {3}, 1))
    mine = list(range(rank, N_ROWS, world))      # this rank's shard of the rows
    hook = _hook(out, spe=len(mine) // 4).install(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for epoch in range(2):
        order = torch.as_tensor(mine)[torch.randperm(len(mine), generator=torch.Generator().manual_seed(epoch))]
        for s in range(0, len(order), 4):
            idx = order[s:s + 4]
            loss = model(**{k: v[idx] for k, v in data.items()}, dece_row_ids=idx).loss
            loss.backward()
            for p in model.parameters():
                dist.all_reduce(p.grad)
            opt.step()
            opt.zero_grad()
            hook.step()
    hook.recorder.close()
    assert hook.recorder.path.name == f"rank{rank:05d}.jsonl"


def test_two_data_parallel_ranks(tmp_path, stand_in):
    run_distributed(_dp_rank, 2, str(tmp_path), stand_in().state_dict())
    assert sorted(p.name for p in tmp_path.glob("rank*.jsonl")) == ["rank00000.jsonl", "rank00001.jsonl"]
    _check_rows(read_record(tmp_path), encode(make_rows(N_ROWS, {3}, 1)), epochs=2)


def _write_steps(rec, steps, data):
    for s in steps:
        idx = torch.tensor([2 * s % N_ROWS, (2 * s + 1) % N_ROWS])
        t = torch.nn.functional.pad(data["labels"][idx], (0, 1), value=-100)[:, 1:]
        rec.observe(idx, t, torch.full(t.shape, -0.5 - s), ignore_index=-100, alpha=0.9, step=s, epoch=1 + s // 6)


def test_kill_and_resume_drops_the_redone_steps(tmp_path):
    """A run killed after step 7 (mid-write of step 8) and resumed from the checkpoint of step 5 ends with the
    record an uninterrupted run writes."""
    data = encode(make_rows(N_ROWS, set(), 1))
    kw = dict(vocab_size=64, label_smoothing=0.05, prob_floor=1e-7)
    whole = AuditRecorder(tmp_path / "whole", **kw)
    _write_steps(whole, range(12), data)
    whole.close()
    killed = AuditRecorder(tmp_path / "killed", **kw)
    _write_steps(killed, range(8), data)
    killed.close()
    with open(killed.path, "a") as f:
        f.write('{"step": 8, "epoch": 2, "rows": [16')            # torn by the kill
    assert read_record(tmp_path / "killed").torn == 1
    assert keep_steps_before(tmp_path / "killed", 5) == 3           # steps 5, 6, 7 are redone
    resumed = AuditRecorder(tmp_path / "killed", **kw)
    _write_steps(resumed, range(5, 12), data)
    resumed.close()
    a, b = read_record(tmp_path / "whole"), read_record(tmp_path / "killed")
    assert a.visits == b.visits and b.torn == 0
    steps = [json.loads(x).get("step") for x in (tmp_path / "killed" / "rank00000.jsonl").read_text().splitlines()]
    assert [s for s in steps if s is not None] == list(range(12))
