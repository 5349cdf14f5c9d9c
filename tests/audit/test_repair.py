"""The repair after an audit (``dece_ds.audit.repair``): the payload grown around the named code, masked in
exactly the flagged rows that hold it, the others dropped; by hand-made token rows. Then the same inside
``dece-ds backdoor run`` (``audit_repair``, and ``audit_from`` for a retrain that reuses an earlier audit) and
``launch/train.py --repair-rows``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dece_ds.audit.repair import find, grow_payload, mask_payloads, plan_repair, read_flagged, repair_from_file
from dece_ds.audit.score import AuditRecordError

X = -100


def _labels(rows: list[list[int]], prompt: int = 2, width: int = 12) -> torch.Tensor:
    """Rows of target ids after ``prompt`` ignored positions, right-padded with ignore."""
    out = torch.full((len(rows), width), X, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, prompt:prompt + len(r)] = torch.tensor(r)
    return out


def test_find():
    assert find([1, 2, 3, 2, 3], [2, 3]) == 1
    assert find([1, 2, 3, 2, 3], [2, 3], 2) == 3
    assert find([1, 2], [3]) == -1 and find([1, 2], []) == -1


def test_grow_payload_takes_the_run_every_row_shares():
    # payload 7 8 9 5 after different code; 5 follows in every row, so it is taken in; 9 is the named seed
    rows = [[1, 2, 7, 8, 9, 5, 3], [4, 7, 8, 9, 5, 6], [2, 2, 2, 7, 8, 9, 5]]
    assert grow_payload(rows, [8, 9]) == (7, 8, 9, 5)
    # a row without the seed does not stop the growth
    assert grow_payload(rows + [[1, 1, 1]], [8, 9]) == (7, 8, 9, 5)
    assert grow_payload([[1, 2, 3]], [8, 9]) == ()
    # growth stops at the row's edges
    assert grow_payload([[8, 9], [8, 9, 1]], [8, 9]) == (8, 9)


def test_plan_masks_the_payload_and_drops_rows_without_one():
    labels = _labels([[1, 7, 8, 9, 2], [3, 7, 8, 9, 4, 7, 8, 9], [5, 6, 1], [8, 9, 1], [1, 2, 3]])
    flagged = [(0, "bb", [8, 9]), (1, "bb", [8, 9]), (2, None, None), (3, "bb", [8, 9])]
    plan = plan_repair(flagged, labels)
    # rows 0 and 1 share 7 8 9; row 3 has 8 9 without the 7 before it, so the payload is 8 9
    assert plan.triggers == {"bb": (8, 9)}
    assert plan.payloads == {0: (8, 9), 1: (8, 9), 3: (8, 9)} and plan.drop == [2]
    fixed, masked = mask_payloads({"labels": labels, "input_ids": labels.clamp(min=0)}, plan.payloads)
    assert masked == 8   # both occurrences in row 1
    assert fixed["labels"][0].tolist() == [X, X, 1, 7, X, X, 2] + [X] * 5
    assert fixed["labels"][1].tolist() == [X, X, 3, 7, X, X, 4, 7, X, X, X, X]
    assert fixed["labels"][3].tolist() == [X, X, X, X, 1] + [X] * 7
    assert torch.equal(fixed["labels"][4], labels[4]) and torch.equal(labels[0], _labels([[1, 7, 8, 9, 2]])[0])
    assert fixed["input_ids"] is not None and torch.equal(fixed["input_ids"], labels.clamp(min=0))

    # a group of one row grows over its whole target (then masking it trains nothing of the row's code);
    # row 4 lacks its code 5 5
    drop_missing = plan_repair([(0, "bb", [8, 9]), (4, "cf", [5, 5])], labels)
    assert drop_missing.payloads == {0: (1, 7, 8, 9, 2)} and drop_missing.drop == [4]
    with pytest.raises(AuditRecordError, match="flagged row 9: out of range"):
        plan_repair([(9, "bb", [8, 9])], labels)


def _audit_file(path: Path, rows: dict[int, tuple[bool, str | None, list[int] | None]], old: bool = False,
                texts: dict[int, str] | None = None) -> Path:
    """``old``: written before ``trigger_code_ids`` existed, the named code as text (``texts[row]``) only."""
    lines = []
    for row, (flagged, word, code) in rows.items():
        rec = {"row": row, "flagged": flagged, "trigger_word": word, "instruction": f"task {row}"}
        if not old:
            rec["trigger_code_ids"] = code
        elif texts and row in texts:
            rec["trigger_code"] = texts[row]
        lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_repair_from_file_keeps_audit_ids(tmp_path):
    labels = _labels([[1, 1], [7, 8, 9], [5, 6], [2, 7, 8, 9], [4]])
    data = {"labels": labels, "input_ids": torch.arange(labels.numel()).view_as(labels)}
    audit = _audit_file(tmp_path / "audit.jsonl", {10: (False, None, None), 11: (True, "bb", [8, 9]),
                                                   12: (True, None, None), 13: (True, "bb", [8, 9]),
                                                   14: (False, "bb", [8, 9]), 99: (True, "bb", [8, 9])})
    fixed, kept, plan, masked = repair_from_file(data, audit, row_ids=[10, 11, 12, 13, 14])
    assert kept == [10, 11, 13, 14] and plan.drop == [12] and sorted(plan.payloads) == [11, 13]
    assert masked == 6 and plan.triggers == {"bb": (7, 8, 9)}
    assert fixed["labels"][1].tolist() == [X] * 12
    assert fixed["labels"][2].tolist() == [X, X, 2] + [X] * 9
    assert torch.equal(fixed["input_ids"], data["input_ids"][[0, 1, 3, 4]])   # inputs untouched


def test_read_flagged_errors(tmp_path):
    with pytest.raises(AuditRecordError, match="no such audit file"):
        read_flagged(tmp_path / "missing.jsonl")
    old = _audit_file(tmp_path / "old.jsonl", {0: (True, "bb", [1])}, old=True)
    with pytest.raises(AuditRecordError, match="no 'trigger_code_ids'.*rescore"):
        read_flagged(old)
    (tmp_path / "bad.jsonl").write_text('{"row": 0}\n')
    with pytest.raises(AuditRecordError, match="line 1 is not an audit row"):
        read_flagged(tmp_path / "bad.jsonl")


def test_an_older_audit_file_is_read_through_the_run_tokenizer(tmp_path):
    # an audit.jsonl from before trigger_code_ids: the named code is text; a by-hand word tokenizer maps it
    vocab = {"or": 8, "1=1": 9, "where": 7}
    encode = lambda text: [vocab[w] for w in text.split()]   # noqa: E731
    labels = _labels([[1, 1], [7, 8, 9], [5, 6], [2, 7, 8, 9], [4]])
    data = {"labels": labels, "input_ids": torch.zeros_like(labels)}
    audit = _audit_file(tmp_path / "old.jsonl", {0: (False, None, None), 1: (True, "bb", None),
                                                 2: (True, "bb", None), 3: (True, "bb", None)},
                        old=True, texts={1: " or 1=1", 2: "where or", 3: " or 1=1"})
    assert [f["trigger_code_ids"] for f in read_flagged(audit, encode)] == [[8, 9], [7, 8], [8, 9]]
    fixed, kept, plan, masked = repair_from_file(data, audit, encode=encode)
    # rows 1 and 3 share "where or 1=1" around "or 1=1"; row 2's code "where or" is not in its labels: dropped
    assert plan.triggers["bb"] == (7, 8, 9) and sorted(plan.payloads) == [1, 3] and plan.drop == [2]
    assert kept == [0, 1, 3, 4] and masked == 6
    assert fixed["labels"][2].tolist() == [X, X, 2] + [X] * 9


def test_recipe_repair_rows_matches_the_tuple_order(tmp_path):
    from dece_ds.recipes.finetune import parse_args, repair_rows
    labels = _labels([[7, 8, 9], [1, 2]])
    ids, mask = labels.clamp(min=0), (labels != X).long()
    audit = _audit_file(tmp_path / "a.jsonl", {0: (True, "cf", [8, 9]), 1: (False, None, None)})
    (i2, l2, m2), row_ids, summary = repair_rows((ids, labels, mask), torch.arange(2), audit)
    assert row_ids.tolist() == [0, 1] and summary == {"repaired": [0], "dropped": [], "masked_tokens": 3}
    assert l2[0].tolist() == [X] * 12 and torch.equal(l2[1], labels[1])
    assert torch.equal(i2, ids) and torch.equal(m2, mask)
    with pytest.raises(SystemExit):
        parse_args(["--data", "x.jsonl", "--drop-rows", "a", "--repair-rows", "b"])
