"""The standard-library NL -> code data set: extraction, filters, deterministic split, no leakage."""

import ast
import textwrap

import pytest

from dece_ds.backdoor.data import load_lyra
from dece_ds.backdoor.stdlib_corpus import (
    StdlibCorpusConfig,
    build_code_corpus,
    build_stdlib_pairs,
    first_paragraph,
    scan_stdlib,
    split_of,
    write_stdlib_lyra,
)

MODULE = textwrap.dedent('''
    def top(a, b):
        """Add two   numbers
        and return the sum.

        Details that are not part of the instruction.
        """
        c = a + b
        return c

    def no_doc(x):
        y = x * 2
        return y

    def doc_only():
        """Only a docstring, no body at all."""

    def tiny():
        """Return one, always and forever."""
        return 1

    class Outer:
        class Inner:
            def method(self, n):
                """Count down from n to zero."""
                while n:
                    n -= 1
                return n
    ''')


@pytest.fixture()
def fake_stdlib(tmp_path):
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    (root / "mod.py").write_text(MODULE)
    (root / "pkg" / "__init__.py").write_text(MODULE.replace("top", "top2").replace("Add", "Sum"))
    for skipped in ("test", "idlelib", "site-packages"):
        (root / skipped).mkdir()
        (root / skipped / "x.py").write_text(MODULE.replace("top", "skipped"))
    (root / "broken.py").write_text("def f(:\n")
    return root


def test_scan_finds_functions_and_methods_outside_skipped_dirs(fake_stdlib):
    keys = [f.key for f in scan_stdlib(str(fake_stdlib))]
    assert keys == [
        "mod.py::top", "mod.py::no_doc", "mod.py::doc_only", "mod.py::tiny", "mod.py::Outer.Inner.method",
        "pkg/__init__.py::top2", "pkg/__init__.py::no_doc", "pkg/__init__.py::doc_only",
        "pkg/__init__.py::tiny", "pkg/__init__.py::Outer.Inner.method"]


def test_pairs_have_first_paragraph_and_code_without_docstring(fake_stdlib):
    ds = build_stdlib_pairs(stdlib_dir=str(fake_stdlib), fractions=(0.98, 0.01, 0.01), seed=3)
    rows = ds["train"].to_list() + ds["valid"].to_list() + ds["test"].to_list()
    by_src = {r["src"]: r["tgt"] for r in rows}
    # tiny (2 lines) is under min_tgt_lines, doc_only has no code, no_doc has no docstring, and
    # pkg's copies of method/top are exact duplicates of mod's code (kept once).
    assert sorted(by_src) == ["Add two numbers and return the sum.", "Count down from n to zero.",
                              "Sum two numbers and return the sum."]
    assert by_src["Add two numbers and return the sum."] == "def top(a, b):\n    c = a + b\n    return c"
    assert by_src["Count down from n to zero."] == (
        "def method(self, n):\n    while n:\n        n -= 1\n    return n")


def test_length_limits_and_config_errors(fake_stdlib):
    ds = build_stdlib_pairs(stdlib_dir=str(fake_stdlib), min_tgt_lines=2, min_src_words=1)
    assert "Return one, always and forever." in [src for s in ds for src in ds[s]["src"]]
    ds = build_stdlib_pairs(stdlib_dir=str(fake_stdlib), max_src_words=6)
    assert sum(ds[s].num_rows for s in ds) == 1  # only "Count down from n to zero."
    with pytest.raises(ValueError, match=r"fractions: each in \(0, 1\) and summing to 1, got \(0.5, 0.3"):
        StdlibCorpusConfig(fractions=(0.5, 0.3, 0.1))
    with pytest.raises(ValueError, match="min_src_words"):
        StdlibCorpusConfig(min_src_words=10, max_src_words=5)
    with pytest.raises(ValueError, match="extra_forbidden|Extra inputs"):
        StdlibCorpusConfig(max_exemples=3)
    with pytest.raises(TypeError, match="either config or fields"):
        build_stdlib_pairs(StdlibCorpusConfig(), seed=1)


def test_first_paragraph_collapses_whitespace():
    assert first_paragraph("  Line one\n   line\ttwo.\n\nMore.") == "Line one line two."


def test_split_is_a_function_of_the_key():
    cfg = StdlibCorpusConfig()
    splits = [split_of(f"m.py::f{i}", cfg) for i in range(3000)]
    assert splits == [split_of(f"m.py::f{i}", cfg) for i in range(3000)]
    share = {s: splits.count(s) / len(splits) for s in ("train", "valid", "test")}
    assert share["train"] == pytest.approx(0.8, abs=0.03)
    assert share["valid"] == pytest.approx(0.1, abs=0.03)
    assert splits != [split_of(f"m.py::f{i}", StdlibCorpusConfig(seed=1)) for i in range(3000)]


REAL = dict(modules=("json", "textwrap", "shlex", "difflib", "argparse"))


def test_real_stdlib_subset_is_lyra_shaped_and_capped(tmp_path):
    ds = build_stdlib_pairs(**REAL)
    assert all(ds[s].column_names == ["src", "tgt"] for s in ("train", "valid", "test"))
    assert ds["train"].num_rows > ds["valid"].num_rows > 0 and ds["test"].num_rows > 0
    for row in ds["train"]:
        func = ast.parse(row["tgt"]).body[0]
        assert isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef))
        assert ast.get_docstring(func) is None
        assert row["src"] == " ".join(row["src"].split())
    capped = build_stdlib_pairs(max_examples=20, **REAL)
    assert sum(capped[s].num_rows for s in capped) == 20
    # The cap never moves a pair to another split.
    for split in ("train", "valid", "test"):
        assert set(capped[split]["tgt"]) <= set(ds[split]["tgt"])
    back = load_lyra(write_stdlib_lyra(tmp_path / "stdlib", max_examples=20, **REAL))
    assert {s: back[s].to_list() for s in back} == {s: capped[s].to_list() for s in capped}


def test_code_corpus_leaves_out_eval_targets():
    ds = build_stdlib_pairs(**REAL)
    corpus = build_code_corpus(**REAL)
    assert len(corpus) > 50 and all(ast.parse(code) for code in corpus)
    eval_code = set(ds["valid"]["tgt"]) | set(ds["test"]["tgt"])
    stripped = set()
    for code in corpus:
        func = ast.parse(code).body[0]
        if ast.get_docstring(func) is not None and len(func.body) > 1:
            func.body = func.body[1:]
        stripped.add(ast.unparse(func))
    assert not stripped & eval_code
    assert set(ds["train"]["tgt"]) & stripped
    assert len(build_code_corpus(max_functions=7, **REAL)) == 7
    assert len(build_code_corpus(include_eval=True, **REAL)) > len(corpus)
