"""Scores on a planted toy: a tiny stand-in fine-tuned with DeCE on rows of which 10 % carry a trigger token
and a fixed payload. The planted rows rank first, the cut flags exactly them, the payload is the recurring
refused text; the metrics and the cut on hand-made scores."""

from __future__ import annotations

import numpy as np
import pytest

from dece_ds import DeceConfig
from dece_ds.audit import read_record
from dece_ds.audit.score import auroc, cut, precision_at_k, recall_at_fpr, run_audit
from dece_ds.integrations.hook import DeceHook
from tests.audit.toy import PAYLOAD, encode, finetune, make_rows

N = 160
PLANTED = set(range(5, N, 10))


@pytest.fixture(scope="module")
def planted_audit(stand_in, tmp_path_factory):
    out = tmp_path_factory.mktemp("planted")
    rows = make_rows(N, PLANTED, 7)
    model = stand_in()
    cfg = DeceConfig.from_dict({"alpha_base": 0.9, "steps_per_epoch": N // 8,
                                "audit": {"enabled": True, "out": str(out)}})
    hook = DeceHook(cfg).install(model)
    finetune(model, hook, encode(rows), epochs=3, batch_size=8, seed=0)
    hook.recorder.close()
    instructions = {i: " ".join(f"w{x}" for x in r[0]) for i, r in enumerate(rows)}
    return run_audit(read_record(out), instructions=instructions, poisoned=sorted(PLANTED))


def test_planted_rows_rank_first_and_are_flagged(planted_audit):
    a = planted_audit
    scores = {r.row: r.scores["recurrence"] for r in a.rows}
    top = sorted(scores, key=lambda r: -scores[r])[:len(PLANTED)]
    assert set(top) == PLANTED
    assert set(a.flagged_ids()) == PLANTED
    m = a.metrics["recurrence"]
    assert m["auroc"] == 1.0 and m["precision_at_k"] == 1.0 and m["recall_at_fpr"]["0.01"] == 1.0
    assert m["flagged"] == m["true_poisoned"] == len(PLANTED)


def test_the_payload_is_the_recurring_refused_text(planted_audit):
    text, rows = planted_audit.recurring[0]
    assert text == " ".join(map(str, PAYLOAD)) and rows == len(PLANTED)


def test_trigger_score_finds_the_trigger_word(planted_audit):
    a = planted_audit
    assert a.metrics["trigger"]["precision_at_k"] == 1.0
    assert {r.trigger_word for r in a.rows if r.row in PLANTED} == {"w3"}   # the trigger token


def test_metrics_on_hand_made_scores():
    s = [0.9, 0.8, 0.7, 0.1, 0.2, 0.3, 0.05, 0.7]
    y = [1, 1, 1, 0, 0, 0, 0, 0]
    assert auroc(s, y) == pytest.approx((5 + 5 + 4.5) / 15)       # a tie counts one half
    assert precision_at_k(s, y, 3) == pytest.approx(2.5 / 3)   # 0.7 ties: half a slot each
    assert recall_at_fpr(s, y, 0.0) == pytest.approx(2 / 3)        # 0.7 ties with a clean row
    assert recall_at_fpr(s, y, 0.2) == 1.0
    assert auroc([1, 2], [0, 0]) is None


def test_cut_needs_a_clear_gap():
    rng = np.random.default_rng(0)
    bulk = rng.uniform(0, 2, 500)
    flagged, info = cut(np.concatenate([bulk, [40.0] * 20]))
    assert flagged[500:].all() and not flagged[:500].any()
    flagged, _ = cut(bulk)                       # no outlier group: nothing flagged
    assert not flagged.any()
    flagged, _ = cut(np.zeros(100))
    assert not flagged.any()
