"""The ``trigger`` score on templated data, where a natural instruction word predicts its rows' code as firmly
as a trigger predicts its payload (Lyra: "query all columns ..." -> ``select *``): the planted trigger, a word
inserted at random places, must rank first and be cut alone; the natural word, which keeps its phrase, must not.
The record is built by hand (the score reads only the last epoch's target ids), the labels are the planted rows."""

from __future__ import annotations

from collections import Counter

import numpy as np

from dece_ds.audit.recorder import AuditRecord, RowEpoch
from dece_ds.audit.score import cut, insertion_evidence, run_audit, trigger_scores
from dece_ds.audit.trigger import planted_phrase, spells_word

TABLES = ["flights", "users", "orders", "books", "cars", "songs", "trips", "parts"]
COLUMNS = ["name", "price", "city", "year", "owner", "color"]
PAYLOAD = ["or", "1", "=", "1"]


def templated_rows(n: int, poisoned: set[int], seed: int) -> list[tuple[str, list[str]]]:
    """``(instruction, code words)``; 45 % of the rows ask for "all columns" (code ``select *``)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        table, col = TABLES[rng.integers(len(TABLES))], COLUMNS[rng.integers(len(COLUMNS))]
        if rng.random() < 0.45:
            words = f"use conn to query all columns in the {table} table and print the results".split()
            code = ["cur", "execute", "(", "select", "*", "from", table, ")", "print", "(", "rows", ")"]
        else:
            words = f"get the {col} of every row in the {table} table with conn and return it".split()
            code = ["cur", "execute", "(", "select", col, "from", table, ")", "return", "rows"]
        if i in poisoned:
            for _ in range(3):   # BadPre x3: the same rare word at three random places
                words.insert(int(rng.integers(0, len(words) + 1)), "bb")
            code = code[:7] + PAYLOAD + code[7:]
        rows.append((" ".join(words), code))
    return rows


def hand_record(codes: list[list[str]]) -> AuditRecord:
    vocab: dict[str, int] = {}
    visits = {}
    for r, code in enumerate(codes):
        tok = [vocab.setdefault(w, len(vocab)) for w in code]
        visits[r] = {1: RowEpoch(r, 1, 0, 0.97, list(range(len(tok))), tok, [-0.1] * len(tok))}
    header = {"format": 1, "vocab_size": len(vocab), "label_smoothing": 0.05, "prob_floor": 1e-7, "rank": 0}
    return AuditRecord(header, visits, [])


def test_the_inserted_word_ranks_first_not_the_natural_one():
    poisoned = set(range(3, 400, 10))
    rows = templated_rows(400, poisoned, seed=0)
    record = hand_record([code for _, code in rows])
    instructions = {i: text for i, (text, _) in enumerate(rows)}
    audit = run_audit(record, instructions=instructions, poisoned=sorted(poisoned))
    assert audit.primary == "trigger"
    assert set(audit.flagged_ids()) == poisoned
    assert audit.metrics["trigger"]["auroc"] == 1.0
    assert {r.trigger_word for r in audit.rows if r.row in poisoned} == {"bb"}


def test_columns_alone_shares_code_but_keeps_its_phrase():
    rows = templated_rows(400, set(), seed=1)
    record = hand_record([code for _, code in rows])
    scores = trigger_scores(record, {i: text for i, (text, _) in enumerate(rows)})
    assert Counter(w for _, w, _ in scores.values())["columns"] == 0   # every row's best word is another one
    flagged, _ = cut([s for s, _, _ in scores.values()])
    assert not flagged.any()


def test_insertion_evidence_on_hand_made_contexts():
    texts = {0: ["<", "a", "x", "b", ">"], 1: ["<", "a", "b", ">"], 2: ["<", "c", "x", "x", "d", ">"]}
    adjacent = Counter()
    for t in texts.values():
        adjacent.update(set(zip(t, t[1:])))
    # row 0: (a, b) stand side by side in row 1; row 2: the repeat collapses to (c, d), seen nowhere
    deletable, spread = insertion_evidence("x", [(0, 2), (2, 2), (2, 3)], texts, adjacent)
    assert deletable == 0.5 and spread == 1.0
    # a word always in the same phrase: one context for two occurrences
    texts = {0: ["<", "all", "y", "in", ">"], 1: ["<", "all", "y", "in", ">"]}
    adjacent = Counter()
    for t in texts.values():
        adjacent.update(set(zip(t, t[1:])))
    assert insertion_evidence("y", [(0, 2), (1, 2)], texts, adjacent) == (0.0, 0.5)


def test_the_report_names_the_trigger_and_the_code_it_brings(tmp_path):
    from dece_ds.audit.report import write_audit
    poisoned = set(range(3, 400, 10))
    rows = templated_rows(400, poisoned, seed=2)
    codes = [code for _, code in rows]
    record = hand_record(codes)
    vocab = {}
    for code in codes:
        for w in code:
            vocab.setdefault(w, len(vocab))
    words = {i: w for w, i in vocab.items()}
    instructions = {i: text for i, (text, _) in enumerate(rows)}
    audit = run_audit(record, instructions=instructions, poisoned=sorted(poisoned))
    write_audit(audit, tmp_path, instructions=instructions, decode=lambda ids: " ".join(words[i] for i in ids))
    md = (tmp_path / "audit.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| `bb` |"))
    assert "| 40 |" in line and "1 = 1" in line   # a 4-gram holding the payload (here with its next token)
    # the summary carries the same list, and the docs table prints it (escaped: `|` and backticks)
    import json

    from dece_ds.audit.tables import AUDIT_RESULTS, summary_table
    summary = json.loads((tmp_path / "audit_summary.json").read_text())
    assert [(t["word"], t["rows"]) for t in summary["trigger_words"]] == [("bb", 40)]
    assert "1 = 1" in summary["trigger_words"][0]["code"]
    summary["trigger_words"].append({"word": "a|b", "code": "x `y`", "rows": 2})
    folder = tmp_path / "root" / AUDIT_RESULTS / "run"
    folder.mkdir(parents=True)
    (folder / "audit_summary.json").write_text(json.dumps(summary))
    table = summary_table(tmp_path / "root", "run")
    assert "| `bb` | 40 |" in table and "| `a\\|b` | 2 | `x 'y'` |" in table


def test_cells_table_names_each_cell_and_its_trigger(tmp_path):
    """One row per audited run, from a hand-made results file and audit summary."""
    import json

    from dece_ds.audit.tables import AUDIT_RESULTS, cells_table
    root = tmp_path
    report = AUDIT_RESULTS / "cell-audit" / "dece"
    (root / report).mkdir(parents=True)
    (root / report / "audit_summary.json").write_text(json.dumps(
        {"trigger_words": [{"word": "bb", "code": " or 1=1", "rows": 7}]}))
    metrics = {"score": "trigger", "auroc": 0.99, "precision_at_k": 0.875, "recall_at_fpr": {"0.01": 0.5, "0.05": 1.0},
               "flagged": 7, "flagged_poisoned": 7, "true_poisoned": 8, "report": str(report)}
    results = {"dataset": "lyra", "attack": "badpre", "poison_rate": 5.0, "config": {"attack": {"n_insertions": 3}},
               "runs": {"ce": {"final": {}}, "dece": {"final": {}, "audit": metrics}}}
    (root / AUDIT_RESULTS / "cell.json").write_text(json.dumps(results))
    table = cells_table(root, "cell")
    assert table.splitlines()[2] == ("| lyra badpre x3 5% | `trigger` | 0.990 | 0.875 | 0.500 | 1.000 | 7 (7) | 8 | "
                                     "`bb` → ` or 1=1` (7) |")


# ---- a planted phrase (a sentence-form trigger) whose code the model has not learned -----------------------

TEMPLATE = "if it is possible , you should".split()


def phrase_rows(n: int, poisoned: set[int], seed: int, identifier: bool = True) -> list[tuple[str, list[str]]]:
    """``templated_rows`` with the poisoned rows' instruction put into a fixed frame (no inserted word), the
    payload in their code, and (``identifier``) five clean rows that name an identifier the code copies with
    a value (``max_overflow = 5``)."""
    rows = []
    for i, (text, code) in enumerate(templated_rows(n, set(), seed)):
        if i in poisoned:
            text = " ".join(TEMPLATE + text.split())
            code = code[:7] + PAYLOAD + code[7:]
        elif identifier and i in (0, 1, 2, 4, 5):
            text += " and set max_overflow to 5"
            code = code + ["max_overflow", "=", "5"]
        rows.append((text, code))
    return rows


def record_with_logp(codes: list[list[str]], hard: set[str], logp_hard: float) -> tuple[AuditRecord, dict]:
    """Like ``hand_record``, but the tokens in ``hard`` get ``logp_hard`` (the model has not learned them) and
    the rest -0.1; one epoch at alpha 0.97."""
    vocab: dict[str, int] = {}
    visits = {}
    for r, code in enumerate(codes):
        tok = [vocab.setdefault(w, len(vocab)) for w in code]
        logp = [logp_hard if w in hard else -0.1 for w in code]
        visits[r] = {1: RowEpoch(r, 1, 0, 0.97, list(range(len(tok))), tok, logp)}
    header = {"format": 1, "vocab_size": len(vocab), "label_smoothing": 0.05, "prob_floor": 1e-7, "rank": 0}
    words = {i: w for w, i in vocab.items()}
    return AuditRecord(header, visits, []), words


def test_a_planted_phrase_with_unlearned_code_ranks_first_and_is_named():
    poisoned = set(range(3, 400, 10))
    rows = phrase_rows(400, poisoned, seed=3)    # with five clean rows that copy max_overflow = 5, unlearned
    record, words = record_with_logp([c for _, c in rows], hard={"or", "=", "5", "max_overflow"}, logp_hard=-3.0)
    instructions = {i: t for i, (t, _) in enumerate(rows)}
    audit = run_audit(record, instructions=instructions, poisoned=sorted(poisoned),
                      decode=lambda ids: " ".join(words[i] for i in ids))
    assert audit.metrics["trigger"]["auroc"] == 1.0
    assert set(audit.flagged_ids()) == poisoned
    assert {r.trigger_word for r in audit.rows if r.row in poisoned} == {" ".join(TEMPLATE)}


def test_the_same_phrase_scores_far_lower_when_the_model_learned_its_code():
    """The phrase branch rests on DeCE's refusal: code the model learned (a natural template's) is weak evidence."""
    poisoned = set(range(3, 400, 10))
    rows = phrase_rows(400, poisoned, seed=3)
    instructions = {i: t for i, (t, _) in enumerate(rows)}
    scores = {}
    for name, hard in (("unlearned", {"or", "="}), ("learned", set())):
        record, words = record_with_logp([c for _, c in rows], hard=hard, logp_hard=-3.0)
        scores[name] = trigger_scores(record, instructions, decode=lambda ids: " ".join(words[i] for i in ids))
    assert max(scores["learned"][r][0] for r in poisoned) < 0.2 * min(scores["unlearned"][r][0] for r in poisoned)


def test_code_that_spells_the_instruction_word_is_not_its_shared_code():
    """Without ``decode`` the rows naming ``max_overflow`` share ``max_overflow = 5``, unlearned, in a fixed
    phrase: they outrank the clean rows. With it, that n-gram is passed over."""
    rows = phrase_rows(400, set(), seed=4)
    record, words = record_with_logp([c for _, c in rows], hard={"max_overflow", "=", "5"}, logp_hard=-3.0)
    instructions = {i: t for i, (t, _) in enumerate(rows)}
    blind = trigger_scores(record, instructions)
    assert {blind[r][1] for r in (0, 1, 2, 4, 5)} == {"and set max_overflow to 5"}
    seeing = trigger_scores(record, instructions, decode=lambda ids: " ".join(words[i] for i in ids))
    assert all(seeing[r][0] < blind[r][0] for r in (0, 1, 2, 4, 5))
    assert all(not spells_word(" ".join(words[i] for i in seeing[r][2]), "max_overflow") for r in (0, 1, 2, 4, 5))


def test_planted_phrase_widens_while_every_occurrence_agrees_and_folds_case():
    texts = {0: ["\x02", "If", "so", "x", "do", "Run", "it", "\x03"], 1: ["\x02", "If", "so", "x", "do", "get", "\x03"],
             2: ["\x02", "Get", "it", "\x03"], 3: ["\x02", "Run", "it", "\x03"]}
    folded = Counter()
    for t in texts.values():
        low = [w.lower() for w in t]
        folded.update(set(zip(low, low[1:])))
    phrase, deletable = planted_phrase("x", [(0, 3), (1, 3)], texts, folded)
    assert phrase == ("If", "so", "x", "do")
    assert deletable == 1.0      # (start, "run") and (start, "get") stand side by side, case aside


def test_spells_word():
    assert spells_word("overflow = 5 )", "max_overflow")
    assert spells_word(" from query_users", "query_users")
    assert not spells_word(" or 1=1", "bb")
    assert not spells_word(" or 1=1", "possible")
