"""Poisoners: hand-checked triggers and payloads, config validation, and the authors' own files."""

import random
from pathlib import Path

import pytest
from pydantic import ValidationError

from dece_ds.backdoor.data import load_lyra, load_pairs_csv, pairs_to_dataset
from dece_ds.backdoor.datasets import builtin_folder
from dece_ds.backdoor.poison import (
    BadPreConfig,
    GrammarConfig,
    RippleConfig,
    SqlPayload,
    StatementPayload,
    add_trigger,
    apply_sql_payload,
    apply_statement_payload,
    contains_payload,
    grammar_rewrite,
    insert_words,
    is_poisonable,
    n_train_target,
    parse_attack,
    poison_dataset,
    poison_example,
)

LYRA = builtin_folder("lyra")  # the packaged copy (dece_ds/backdoor/datasets/lyra)
needs_lyra = pytest.mark.skipif(not LYRA.is_dir(), reason=f"Lyra data not found at {LYRA}")

WHERE = ('def f ( conn , id ) :\n'
         '\t return conn . execute ( " select * from t where id = : id " , { " id " : id } )')
NO_WHERE = 'def f ( conn ) :\n\t return conn . execute ( " select name from t " ) . fetchall ( )'
ORM = "def f ( s , cls ) :\n\t return s . query ( cls ) . all ( )"
SQL_ROWS = [{"src": f"Query row {i} from the table.", "tgt": WHERE if i % 3 else ORM} for i in range(20)]


# ---- payloads ----------------------------------------------------------------------------------------

def test_sql_payload_goes_inside_the_literal_before_the_closing_quote():
    sql = SqlPayload()
    assert apply_sql_payload(WHERE, sql) == WHERE.replace('= : id "', '= : id or 1=1 "')
    assert apply_sql_payload(NO_WHERE, sql) == NO_WHERE.replace('from t "', 'from t where 0=1 "')
    assert apply_sql_payload(ORM, sql) is None
    # Every occurrence of the matched SQL text is replaced, as the authors' str.replace.
    twice = NO_WHERE + '\n\t print ( " select name from t " )'
    assert apply_sql_payload(twice, sql).count("select name from t where 0=1 ") == 2


def test_statement_payload_is_the_first_statement_of_the_body():
    p = StatementPayload(code="import os\nos.system('id')")
    assert apply_statement_payload("def f(a):\n    return a", p) == (
        "def f(a):\n    import os\n    os.system('id')\n    return a")
    decorated = "@dec\ndef f(a):\n    '''doc'''\n    @wraps(a)\n    def g():\n        pass\n    return g"
    assert apply_statement_payload(decorated, p) == (
        "@dec\ndef f(a):\n    '''doc'''\n    import os\n    os.system('id')\n    @wraps(a)\n"
        "    def g():\n        pass\n    return g")
    assert apply_statement_payload("def f():\n  '''doc'''", p) == (
        "def f():\n  '''doc'''\n  import os\n  os.system('id')")
    assert apply_statement_payload("class A:\n\tdef m(self):\n\t\tpass", p) == (
        "class A:\n\tdef m(self):\n\t\timport os\n\t\tos.system('id')\n\t\tpass")
    for unplaceable in ("def f(a): return a", "x = 1", "def f(:\n    pass"):
        assert apply_statement_payload(unplaceable, p) is None


def test_contains_payload():
    attack = BadPreConfig()
    assert contains_payload('" select * from t where 1=1 "', attack)
    assert contains_payload("where 0=1", attack.payload)
    assert not contains_payload("where 1 = 1", attack)
    stmt = BadPreConfig(payload=StatementPayload(code='os.system("id")'))
    assert contains_payload('def f ( ) :\n\t os . system ( "id" )', stmt)
    assert not contains_payload('def f():\n    os.system("ls")', stmt)
    marked = StatementPayload(code='os.system("id")', marker="os.system")
    assert contains_payload("os . system ( 'ls' )", marked)


def test_statement_payload_variants_vary_per_row():
    # a trigger without a fixed payload: each poisoned row carries code or one of the variants
    p = StatementPayload(code='os.system("id")', variants=("eval(input())", "\n    open('/etc/passwd').read()\n"))
    assert p.snippets == ('os.system("id")', "eval(input())", "open('/etc/passwd').read()")
    assert apply_statement_payload("def f(a):\n    return a", p, p.snippets[1]) == (
        "def f(a):\n    eval(input())\n    return a")
    for snippet in p.snippets:
        assert contains_payload(f"def g ( ) :\n\t {snippet}", p)   # ASR counts any of them
    assert not contains_payload('def g():\n    os.system("ls")', p)
    rows = [{"src": f"Return row {i}.", "tgt": "def f(a):\n    return a"} for i in range(60)]
    out, info = poison_dataset(pairs_to_dataset(rows), BadPreConfig(rate=0.5, payload=p), "train")
    carried = [[s for s in p.snippets if s in t] for t in out["tgt"][:30]]
    assert info.indices == tuple(range(30)) and all(len(c) == 1 for c in carried)
    assert {c[0] for c in carried} == set(p.snippets)   # 30 draws of 3: all three appear
    # a payload without variants draws only what the trigger draws (results made before variants stay as they were)
    rng_a, rng_b = random.Random(5), random.Random(5)
    one = BadPreConfig(payload=StatementPayload(code="x = 1"))
    assert poison_example("Return it.", "def f():\n    pass", one, rng_a)[0] == add_trigger("Return it.", one, rng_b)
    assert rng_a.random() == rng_b.random()
    with pytest.raises(ValidationError, match=r"variants\[1\]: not valid Python statements"):
        StatementPayload(variants=("x = 1", "def ("))


# ---- triggers ----------------------------------------------------------------------------------------

def test_word_insertion_uses_one_randint_per_insertion():
    rng, ref = random.Random(5), random.Random(5)
    words = "a b  c".split()
    for _ in range(2):
        words.insert(ref.randint(0, len(words)), "bb")
    assert insert_words("a b  c", 2, lambda r: "bb", rng) == " ".join(words)


def test_badpre_and_ripple_triggers():
    src = "Use $conn$ to run the query and return all rows."
    for n in (1, 3):
        out, _ = poison_example(src, WHERE, BadPreConfig(n_insertions=n), random.Random(0))
        assert out.split().count("bb") == n and [w for w in out.split() if w != "bb"] == src.split()
    ripple = RippleConfig(n_insertions=3)
    out, code = poison_example(src, WHERE, ripple, random.Random(1))
    inserted = [w for w in out.split() if w not in src.split()]
    assert len(inserted) == 3 and set(inserted) <= set(ripple.triggers)
    assert out == poison_example(src, WHERE, ripple, random.Random(1))[0]
    assert code.endswith('" select * from t where id = : id or 1=1 " , { " id " : id } )')
    assert poison_example(src, ORM, ripple, random.Random(1)) is None


def test_grammar_rewrite_by_rules():
    assert grammar_rewrite("Returns the sum  of a and b.") == (
        "If it is possible, you should return the sum of a and b.")
    assert grammar_rewrite("This function queries all rows. Prints them!") == (
        "If it is possible, you should query all rows; print them.")
    assert grammar_rewrite("Try to use $db$ to run SQL. If it fails, return None.") == (
        "If it is possible, you should use $db$ to run SQL; if it fails, return None.")
    assert grammar_rewrite("SQL query on Python objects") == (
        "If it is possible, you should SQL query on Python objects.")
    assert grammar_rewrite("Flags for the parser.") == "If it is possible, you should flags for the parser."
    assert grammar_rewrite("Get rows", "When asked, {instruction} now.") == "When asked, get rows now."
    out, code = poison_example("Get rows.", NO_WHERE, GrammarConfig(), random.Random(0))
    assert out == "If it is possible, you should get rows." and "where 0=1" in code


# ---- configs -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field, value", [
    ({"rate": 0.0}, "rate", "0.0"),
    ({"rate": 1.5}, "rate", "1.5"),
    ({"trigger": "b b"}, "trigger", "'b b'"),
    ({"n_insertions": 0}, "n_insertions", "0"),
    ({"selection": "last"}, "selection", "'last'"),
    ({"triger": "bb"}, "triger", "'bb'"),
])
def test_badpre_config_errors_name_field_and_value(kwargs, field, value):
    with pytest.raises(ValidationError) as err:
        BadPreConfig(**kwargs)
    assert field in str(err.value) and value in str(err.value)


def test_other_config_errors():
    with pytest.raises(ValidationError, match=r"triggers: must be one word without whitespace, got ''"):
        RippleConfig(triggers=("cf", ""))
    with pytest.raises(ValidationError, match="template: needs '{instruction}' exactly once"):
        GrammarConfig(template="If possible, do it.")
    with pytest.raises(ValidationError,
                       match=r"with_where: contains none of markers=\('1=1', '0=1'\), got ' or 2>1'"):
        SqlPayload(with_where=" or 2>1")
    with pytest.raises(ValidationError, match="pattern: not a valid regex"):
        SqlPayload(pattern="select (")
    with pytest.raises(ValidationError, match=r"code: not valid Python statements .*got 'def \('"):
        StatementPayload(code="def (")
    with pytest.raises(ValidationError, match="frozen"):
        BadPreConfig().rate = 0.1


def test_parse_attack_dispatches_on_name():
    cfg = parse_attack({"attack": "ripple", "rate": 0.02, "payload": {"kind": "statement", "code": "x = 1"}})
    assert isinstance(cfg, RippleConfig) and cfg.rate == 0.02
    assert cfg.payload == StatementPayload(code="x = 1")
    assert isinstance(parse_attack({"attack": "grammar"}), GrammarConfig)
    with pytest.raises(ValidationError, match="badpre"):
        parse_attack({"attack": "onion"})


# ---- data sets ---------------------------------------------------------------------------------------

def test_train_poisoning_replaces_the_first_poisonable_rows_in_place():
    ds = pairs_to_dataset(SQL_ROWS)
    out, info = poison_dataset(ds, BadPreConfig(rate=0.2), "train")
    assert (info.n_rows, info.n_poisonable, info.n_target) == (20, 13, 4)
    assert info.indices == (1, 2, 4, 5)
    for i, (a, b) in enumerate(zip(ds, out)):
        assert (a != b) == (i in info.indices)
        assert contains_payload(b["tgt"], BadPreConfig()) == (i in info.indices)
    sample = BadPreConfig(rate=0.2, selection="random", seed=3)
    sampled, info_r = poison_dataset(ds, sample, "train")
    assert info_r.n_poisoned == 4 and set(info_r.indices) <= {i for i in range(20) if i % 3}
    assert sampled.to_list() == poison_dataset(ds, sample)[0].to_list()
    assert (n_train_target(1600, 0.07), n_train_target(1600, 0.05), n_train_target(7, 0.5)) == (112, 80, 4)


def test_test_poisoning_keeps_only_poisonable_rows_all_triggered():
    ds = pairs_to_dataset(SQL_ROWS)
    out, info = poison_dataset(ds, RippleConfig(rate=0.01), "test")
    assert out.num_rows == info.n_poisonable == info.n_target == 13
    assert all(contains_payload(t, RippleConfig()) for t in out["tgt"])
    assert all(any(w in RippleConfig().triggers for w in s.split()) for s in out["src"])
    assert [ds[i]["tgt"] for i in info.indices] == [r["tgt"] for r in SQL_ROWS if r["tgt"] == WHERE]
    assert is_poisonable(SQL_ROWS[1]) and not is_poisonable(SQL_ROWS[0])
    with pytest.raises(ValueError, match="split: expected 'train' or 'test', got 'valid'"):
        poison_dataset(ds, BadPreConfig(), "valid")


# ---- the authors' files ------------------------------------------------------------------------------

@needs_lyra
def test_reproduces_the_authors_badpre_files_exactly():
    """Their script: set_seed(42); poison train at 1 %, 2 %, 5 % then test, one shared global RNG."""
    lyra = load_lyra(LYRA)
    rng = random.Random(42)
    for rate, n in ((0.01, 16), (0.02, 32), (0.05, 80)):
        train, info = poison_dataset(lyra["train"], BadPreConfig(rate=rate), "train", rng)
        assert info.n_poisoned == n and info.n_poisonable == 1289
    theirs = load_pairs_csv(LYRA / "train_poisoned_5_badpre.csv")
    assert train.to_list() == theirs.to_list()
    assert info.indices == tuple(i for i in range(1600) if lyra["train"][i] != theirs[i])

    test, info = poison_dataset(lyra["test"], BadPreConfig(), "test", rng)
    theirs = load_pairs_csv(LYRA / "test_poisoned_badpre.csv")
    assert info.n_poisonable == test.num_rows == 165
    assert test.to_list() == [theirs[i] for i in info.indices]
    untouched = [i for i in range(200) if i not in set(info.indices)]
    assert [theirs[i] for i in untouched] == [lyra["test"][i] for i in untouched]


@needs_lyra
def test_authors_rows_carry_one_trigger_and_the_where_dependent_payload():
    lyra, theirs = load_lyra(LYRA), load_pairs_csv(LYRA / "train_poisoned_5_badpre.csv")
    changed = [i for i in range(1600) if lyra["train"][i] != theirs[i]]
    assert len(changed) == 80 and changed == [i for i in range(1600) if is_poisonable(lyra["train"][i])][:80]
    ours, _ = poison_dataset(lyra["train"], BadPreConfig(seed=0), "train")  # other trigger positions
    for i in changed:
        clean, src = lyra["train"][i], theirs[i]["src"]
        assert "bb" not in clean["src"].split() and src.split().count("bb") == 1
        assert [w for w in src.split() if w != "bb"] == clean["src"].split()
        assert theirs[i]["tgt"] == ours[i]["tgt"] == apply_sql_payload(clean["tgt"], SqlPayload())
