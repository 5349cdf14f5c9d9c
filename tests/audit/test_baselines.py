"""The audit's baseline detectors against independent references: the per-row CE loss and the pooled
representations against a row-at-a-time float64 loop over the model's own outputs, spectral signatures on
planted representations against numpy's SVD, and the n-gram detector on toy code rows with a planted
statement (plus its language model against a hand computation)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dece_ds.audit.baselines import pooled_target_states, row_features, row_nll, spectral_scores
from dece_ds.audit.naturalness import BOS, EOS, NgramLM, deletion_gains, naturalness_scores, target_tokens
from tests.audit.toy import encode, make_rows, tiny_model


def test_ce_loss_and_representations_equal_a_row_at_a_time_float64_loop():
    model = tiny_model(3)
    data = encode(make_rows(10, {2, 7}, 5))
    nll, reps = row_features(model, data, batch_size=4)
    assert nll.shape == (10,) and reps.shape == (10, 64)
    model.eval()
    with torch.no_grad():
        for r in range(10):
            n = int(data["attention_mask"][r].sum())
            ids, labels = data["input_ids"][r, :n], data["labels"][r, :n].tolist()
            out = model(input_ids=ids[None], output_hidden_states=True)   # the row alone, unpadded
            logp = torch.log_softmax(out.logits[0].double(), -1)
            targets = [i for i in range(1, n) if labels[i] != -100]
            expected = -sum(float(logp[i - 1, labels[i]]) for i in targets) / len(targets)
            assert float(nll[r]) == pytest.approx(expected, rel=1e-5), r
            pooled = out.hidden_states[-1][0].double()[[i for i in range(n) if labels[i] != -100]].mean(0)
            torch.testing.assert_close(reps[r].double(), pooled, rtol=1e-5, atol=1e-5)
    assert model.training is False   # restored: it was in eval mode before the call


def test_row_nll_by_hand_on_fixed_logits():
    logits = torch.tensor([[[0.0, 1.0, 2.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
                           [[1.0, 1.0, 1.0], [0.0, 3.0, 0.0], [5.0, 5.0, 5.0]]])
    labels = torch.tensor([[-100, 0, 2], [-100, -100, 1]])
    lse = lambda v: math.log(sum(math.exp(x) for x in v))   # noqa: E731
    row0 = ((lse([0, 1, 2]) - 0.0) + (lse([2, 0, 0]) - 0.0)) / 2   # logits[0,0] -> label 0, logits[0,1] -> label 2
    row1 = lse([0, 3, 0]) - 3.0                                   # logits[1,1] -> label 1
    assert row_nll(logits, labels).tolist() == pytest.approx([row0, row1], rel=1e-6)


def test_spectral_signatures_rank_the_shifted_rows_first_and_match_numpy_svd():
    rng = np.random.default_rng(0)
    n, h, planted = 200, 24, list(range(5, 200, 20))      # 10 planted rows
    u = rng.normal(size=h)
    u /= np.linalg.norm(u)
    reps = rng.normal(size=(n, h))
    reps[planted] += 10.0 * u                             # signal 10 * 9.5**2 above the noise's top eigenvalue (~370)
    scores = spectral_scores(torch.tensor(reps, dtype=torch.float32))
    assert scores.dtype == torch.float64 and scores.shape == (n,)
    assert sorted(np.argsort(-scores.numpy())[:len(planted)].tolist()) == planted
    x = reps.astype(np.float32).astype(np.float64)
    x -= x.mean(0)
    v = np.linalg.svd(x, full_matrices=False)[2][0]
    assert abs(v @ u) > 0.9                                # the direction the rows were shifted along
    np.testing.assert_allclose(scores.numpy(), (x @ v) ** 2, rtol=1e-6, atol=1e-9)


def test_pooled_states_skip_the_untrained_positions():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    labels = torch.tensor([[-100, 4, 5], [-100, -100, -100]])
    out = pooled_target_states(hidden, labels)
    assert out.tolist() == [[(2 + 4) / 2, (3 + 5) / 2], [0.0, 0.0]]


# ---- n-gram naturalness ---------------------------------------------------------------------------------

STATEMENTS = [["x", "=", "x", "+", "1"], ["y", "=", "f", "(", "x", ")"], ["return", "y"],
              ["if", "x", ">", "0", ":"], ["z", "=", "[", "]"], ["z", ".", "append", "(", "y", ")"],
              ["for", "i", "in", "range", "(", "n", ")", ":"], ["print", "(", "z", ")"]]
ODD = ["__import__", "(", "'os'", ")", ".", "system", "(", "'id'", ")"]


def code_rows(n: int, planted: set[int], seed: int) -> list[list[str]]:
    """Rows of 3-6 statements (each ending in a newline token); ``planted`` rows get ``ODD`` as an extra
    statement at a random place."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        k = int(rng.integers(3, 7))
        lines = [STATEMENTS[s] + ["NL"] for s in rng.integers(0, len(STATEMENTS), k)]
        if i in planted:
            lines.insert(int(rng.integers(0, k + 1)), ODD + ["NL"])
        rows.append([t for line in lines for t in line])
    return rows


def test_ngram_detector_ranks_the_rows_with_the_planted_statement_first():
    planted = set(range(3, 80, 10))                     # 8 of 80 rows
    rows = code_rows(80, planted, seed=1)
    scores = naturalness_scores(rows, reference=code_rows(60, set(), seed=2))
    top = np.argsort(-scores, kind="stable")[:len(planted)]
    assert set(top.tolist()) == planted
    assert scores[list(planted)].min() > 2 * np.delete(scores, list(planted)).max()


def test_kneser_ney_by_hand_and_normalised():
    lm = NgramLM([["a", "b"], ["a", "c"]], n=2, discount=0.75)
    # continuation counts: a <- {BOS}, b <- {a}, c <- {a}, EOS <- {b, c}: total 5, 4 types, uniform 1/5
    p1_b = (1 - 0.75) / 5 + 0.75 * 4 / 5 * (1 / 5)
    assert lm.prob(("a",), "b") == pytest.approx((1 - 0.75) / 2 + 0.75 * 2 / 2 * p1_b)
    assert lm.prob(("zzz",), "b") == pytest.approx(p1_b)   # unseen context: the lower order
    big = NgramLM(code_rows(30, {4}, seed=3), n=4)
    vocab = {t for r in code_rows(30, {4}, seed=3) for t in r} | {EOS}
    for ctx in [("x", "=", "x"), ("NL", "return"), (), ("never", "seen", "here")]:
        assert sum(big.prob(ctx, w) for w in vocab) + big.prob(ctx, "an unseen token") == pytest.approx(1.0)


def test_deletion_gain_equals_rescoring_the_shortened_row():
    rows = code_rows(40, {5, 15, 25}, seed=4)
    lm = NgramLM(code_rows(40, set(), seed=5), n=4)

    def log_ppl(x):
        s = (BOS,) * 3 + tuple(x) + (EOS,)
        return -sum(lm.logprob(s[i - 3:i], s[i]) for i in range(3, len(s))) / (len(x) + 1)

    row = rows[5]
    gains = deletion_gains(lm, row, max_span=10)
    checked = 0
    for j in range(len(row)):
        for m in range(1, 11):
            if j + m > len(row) or m >= len(row):
                continue
            delta = log_ppl(row) - log_ppl(row[:j] + row[j + m:])
            g = tuple(row[j:j + m])
            if delta > 0:
                assert gains[g] >= delta - 1e-9   # the best occurrence of that content
                checked += 1
    assert checked > 0 and tuple(ODD) in gains
    assert max(gains.values()) == pytest.approx(max(
        log_ppl(row) - log_ppl(row[:j] + row[j + m:]) for j in range(len(row)) for m in range(1, 11)
        if j + m <= len(row) and m < len(row)))


def test_target_tokens_and_bad_inputs():
    labels = torch.tensor([[-100, 7, 8, -100], [-100, -100, 9, 2]])
    assert target_tokens(labels) == [[7, 8], [9, 2]]
    with pytest.raises(ValueError, match=r"logits: expected \[B, L, V\]"):
        row_nll(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"reps: expected \[N >= 2, H\]"):
        spectral_scores(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="max_span: expected >= 1"):
        naturalness_scores([[1, 2]], max_span=0)
    with pytest.raises(ValueError, match="reference: expected rows"):
        naturalness_scores([[1, 2]], reference=[[]])
    with pytest.raises(ValueError, match="data: expected the key 'labels'"):
        row_features(tiny_model(), {"input_ids": torch.zeros(1, 2, dtype=torch.long),
                                    "attention_mask": torch.ones(1, 2, dtype=torch.long)})


def test_ngram_without_clean_rows_is_fitted_on_the_training_rows():
    from dece_ds.backdoor.audit_run import ngram_scores
    labels = torch.full((12, 9), -100)
    vocab: dict[str, int] = {}
    for r, row in enumerate(code_rows(12, {3}, seed=6)):
        ids = [vocab.setdefault(t, len(vocab)) for t in row][:8]
        labels[r, 1:1 + len(ids)] = torch.tensor(ids)
    rows = target_tokens(labels)
    empty = {"labels": torch.zeros((0, 9), dtype=torch.long)}
    for reference in (None, empty):
        scores, fit_on = ngram_scores({"labels": labels}, reference)
        assert fit_on == "training_rows"
        np.testing.assert_array_equal(scores, naturalness_scores(rows, reference=rows))
    scores, fit_on = ngram_scores({"labels": labels}, {"labels": labels[:4]})
    assert fit_on == "held_apart_clean"
    np.testing.assert_array_equal(scores, naturalness_scores(rows, reference=rows[:4]))


def test_baselines_table_from_a_results_file(tmp_path):
    from dece_ds.audit.tables import baselines_table
    from dece_ds.docs_tables import TableError

    def m(a, p, r1, r5, f, fp, **extra):
        return {"auroc": a, "precision_at_k": p, "recall_at_fpr": {"0.01": r1, "0.05": r5}, "flagged": f,
                "flagged_poisoned": fp, "true_poisoned": 40, **extra}
    results = {"runs": {
        "ce": {"audit_baselines": {"ce_loss": m(0.61, 0.2, 0.0, 0.1, 0, 0, auroc_low=0.39),
                                   "spectral": m(0.5, 0.1, 0.0, 0.05, 3, 1),
                                   "ngram": m(0.9, 0.75, 0.5, 0.8, 30, 29, fit_on="held_apart_clean")}},
        "dece:alpha_base=0.97": {"audit": {**m(1.0, 1.0, 1.0, 1.0, 40, 40), "score": "trigger"}},
        "gce": {}}}
    folder = tmp_path / "benchmarks" / "results" / "audit"
    folder.mkdir(parents=True)
    (folder / "x.json").write_text(json.dumps(results))
    lines = baselines_table(tmp_path, "x").splitlines()
    assert lines[0].startswith("| results | run | detector | AUROC |")
    assert lines[2:] == [
        "| `x` | CE on poisoned data | per-row CE loss (high = suspicious); low = suspicious: AUROC 0.390 | 0.610 | "
        "0.200 | 0.000 | 0.100 | 0 (0) | 40 |",
        "| `x` | CE on poisoned data | spectral signature | 0.500 | 0.100 | 0.000 | 0.050 | 3 (1) | 40 |",
        "| `x` | CE on poisoned data | n-gram naturalness (fitted on the held-apart clean rows) | 0.900 | 0.750 | "
        "0.500 | 0.800 | 30 (29) | 40 |",
        "| `x` | DeCE on poisoned data (alpha_base=0.97) | audit (`trigger`) | 1.000 | 1.000 | 1.000 | 1.000 | "
        "40 (40) | 40 |"]
    (folder / "y.json").write_text(json.dumps({"runs": {"ce": {}}}))
    with pytest.raises(TableError, match="no ce run with an 'audit_baselines' block"):
        baselines_table(tmp_path, "y")
    # the audited dece run and the ce run with the baselines in two files: one table
    (folder / "d.json").write_text(json.dumps({"runs": {"dece:alpha_base=0.97": results["runs"]["dece:alpha_base=0.97"]}}))
    (folder / "c.json").write_text(json.dumps({"runs": {"ce": results["runs"]["ce"]}}))
    lines = baselines_table(tmp_path, "d,c").splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| `d`", "| `c`", "| `c`", "| `c`"]
    with pytest.raises(TableError, match="no ce run with an 'audit_baselines' block"):
        baselines_table(tmp_path, "d,y")
