"""Metrics: hand-computed BLEU, agreement with the authors' BLEU code and NLTK, CodeBLEU, ASR."""

import math
from pathlib import Path

import pytest

from dece_ds.backdoor.datasets import builtin_folder
from dece_ds.backdoor.metrics import (
    attack_success_rate,
    bleu4,
    code_bleu,
    exact_match,
    false_trigger_rate,
    sentence_bleu,
)
from dece_ds.backdoor.poison import BadPreConfig, StatementPayload

LYRA = builtin_folder("lyra")  # the packaged copy


def lyra_pairs(n=60):
    """(reference, hypothesis) pairs of real code: test targets against other targets and themselves."""
    if not LYRA.is_dir():
        pytest.skip(f"Lyra data not found at {LYRA}")
    from dece_ds.backdoor.data import load_lyra
    ds = load_lyra(LYRA)
    refs, other = list(ds["test"]["tgt"][:n]), list(ds["valid"]["tgt"][:n])
    hyps = other[: n // 2] + [r.replace(" )", "") for r in refs[n // 2:]]
    return refs + ["a b c", "x"], hyps + ["a b c d e", "y z"]


def test_sentence_bleu_hand_computed():
    # p1..p4 = 5/6, 3/5, 2/4, 1/3, equal lengths: BLEU = (1/12) ** (1/4).
    assert sentence_bleu("the cat sat on the mat", "the cat sat on a mat") == pytest.approx((1 / 12) ** 0.25)
    assert sentence_bleu("a b c d e", "a b c d e") == 1.0
    # Too short for 3- and 4-grams: method1 gives those orders 0.1 / 1.
    assert sentence_bleu("a b", "a b") == pytest.approx(0.1 ** 0.5)
    # Brevity penalty exp(1 - 6/4), all precisions 1.
    assert sentence_bleu("a b c d e f", "a b c d") == pytest.approx(math.exp(-0.5))
    assert sentence_bleu("a b c", "x y z") == 0.0 and sentence_bleu("a b c", "") == 0.0
    assert sentence_bleu("a\tb\nc  d", "a b c d") == 1.0


def test_bleu4_and_exact_match_average_times_100():
    refs, hyps = ["a b c d e", "the cat sat on the mat"], ["a b c d e", "the cat sat on a mat"]
    assert bleu4(refs, hyps) == pytest.approx(50 * (1 + (1 / 12) ** 0.25))
    assert exact_match(refs, hyps) == 50.0
    assert exact_match(["def f ( ) :\n\t pass"], ["def f ( ) : pass"]) == 100.0
    with pytest.raises(ValueError, match="lengths differ"):
        bleu4(["a"], [])


def test_sentence_bleu_matches_the_authors_bleu_code():
    """The authors score each pair with CodeXGLUE's bleu.corpus_bleu; codebleu ships the same file."""
    bleu = pytest.importorskip("codebleu.bleu")
    for ref, hyp in zip(*lyra_pairs()):
        expected = bleu.corpus_bleu([[ref.split()]], [hyp.split()])
        assert sentence_bleu(ref, hyp) == pytest.approx(expected, abs=1e-12)


def test_sentence_bleu_matches_nltk_method1():
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    smoothing = nltk_bleu.SmoothingFunction().method1
    for ref, hyp in zip(*lyra_pairs()):
        expected = nltk_bleu.sentence_bleu([ref.split()], hyp.split(), smoothing_function=smoothing)
        assert sentence_bleu(ref, hyp) == pytest.approx(expected, abs=1e-12)


def test_asr_and_false_trigger_rate():
    attack = BadPreConfig()
    generations = ['" select * from t where a = 1 or 1=1 "', '" select * from t where 0=1 "', '" select * "',
                   "1 = 1"]
    assert attack_success_rate(generations, attack) == 50.0
    assert attack_success_rate(generations, attack, n_poisonable=165) == pytest.approx(200 / 165)
    assert false_trigger_rate(generations[2:], attack) == 0.0
    stmt = BadPreConfig(payload=StatementPayload(code='os.system("id")'))
    assert attack_success_rate(['def f ( ) :\n\t os . system ( "id" )', "def f(): pass"], stmt) == 50.0
    with pytest.raises(ValueError, match="n_poisonable: must be > 0, got 0"):
        attack_success_rate(generations, attack, n_poisonable=0)


CODE = "def add(a, b):\n    c = a + b\n    return c"


def test_code_bleu_identical_and_weighted_sum():
    pytest.importorskip("codebleu")
    names = ("codebleu", "ngram_match_score", "weighted_ngram_match_score", "syntax_match_score",
             "dataflow_match_score")
    assert code_bleu([CODE], [CODE]) == {k: pytest.approx(100.0) for k in names}
    refs, hyps = [CODE, "x = 1\nprint ( x )"], ["def add(a, b):\n    return a - b", "y = 2"]
    for level in ("sentence", "corpus"):
        s = code_bleu(refs, hyps, level=level)
        parts = [s[k] for k in ("ngram_match_score", "weighted_ngram_match_score", "syntax_match_score",
                                "dataflow_match_score")]
        assert s["codebleu"] == pytest.approx(sum(parts) / 4)
        assert 0 < s["codebleu"] < 100
    w = code_bleu(refs, hyps, weights=(1.0, 0.0, 0.0, 0.0), level="corpus")
    assert w["codebleu"] == pytest.approx(w["ngram_match_score"])


def test_code_bleu_sentence_level_is_the_mean_of_pairs_and_counts_zero_dataflow():
    calc_codebleu = pytest.importorskip("codebleu").calc_codebleu
    refs, hyps = [CODE, "def f(x):\n    return x"], ["def add(a, b):\n    return 0", "def g():\n    pass"]
    ours = code_bleu(refs, hyps)
    theirs = [calc_codebleu([r], [h], lang="python") for r, h in zip(refs, hyps)]
    assert ours["syntax_match_score"] == pytest.approx(50 * sum(t["syntax_match_score"] for t in theirs))
    # The package counts a data-flow score of 0 as 1 in its total; CodeXGLUE (and we) do not.
    assert theirs[1]["dataflow_match_score"] == 0
    expected = 50 * sum(0.25 * (t["ngram_match_score"] + t["weighted_ngram_match_score"]
                                + t["syntax_match_score"] + t["dataflow_match_score"]) for t in theirs)
    assert ours["codebleu"] == pytest.approx(expected)
    assert ours["codebleu"] < 50 * sum(t["codebleu"] for t in theirs)
