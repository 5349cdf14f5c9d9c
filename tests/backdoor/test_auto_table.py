"""alpha_base "auto" against CE setting by setting (``aggregate.auto_rows`` / the ``backdoor-auto`` docs table): files
paired by their setting, the BLEU gap and the call, on tiny fake results files (no training)."""

import pytest

from dece_ds.backdoor.aggregate import auto_rows, auto_table
from dece_ds.docs_tables.common import TableError


def _file(*, seed=0, max_len=192, epochs=10, n_insertions=3, layers=None, runs):
    model = {"max_len": max_len, "max_src_tokens": 96}
    if layers is not None:
        model.update(n_layer=layers, n_embd=384)
    return {"dataset": "lyra", "attack": "badpre", "poison_rate": 10.0, "finetune_seed": seed,
            "data": {"finetune_rows": 1600},
            "config": {"attack": {"attack": "badpre", "rate": 0.1, "n_insertions": n_insertions},
                       "model": model, "finetune": {"epochs": epochs}},
            "runs": runs}


def _run(bleu, asr, alpha_auto=None, lift=None):
    run = {"final": {"bleu": bleu, "asr": asr, "lift": lift}}
    if alpha_auto is not None:
        run["alpha_auto"] = {"alpha_base": alpha_auto}
    return run


AUTO = "dece:alpha_base=auto"


def test_files_of_one_setting_pair_and_others_stay_apart():
    named = [
        ("c-ce", _file(runs={"ce": _run(45.0, 80.0)})),
        ("c-auto", _file(runs={AUTO: _run(44.25, 0.0, 0.9729, 0.0)})),
        ("c-auto-seed1", _file(seed=1, runs={AUTO: _run(44.0, 0.6, 0.9729, 0.6)})),     # no CE of seed 1
        ("b-ce", _file(max_len=160, n_insertions=1, runs={"ce": _run(44.9, 25.0)})),       # CE below 30 %
        ("b-auto", _file(max_len=160, n_insertions=1, runs={AUTO: _run(43.0, 5.0, 0.97, 4.0)})),
        ("a-both", _file(epochs=12, runs={"ce": _run(41.0, 41.8), AUTO: _run(42.5, 3.0, 0.9773, 2.0),
                                          "dece:alpha_base=0.97": _run(40.0, 0.0)})),
        ("big-ce", _file(layers=6, runs={"ce": _run(47.0, 90.0)})),                         # another stand-in
        ("big-auto", _file(layers=6, runs={AUTO: _run(46.0, 1.0, 0.9729, 1.0)})),
    ]
    rows = {tuple(r["stems"]): r for r in auto_rows(named)}
    assert set(rows) == {("c-ce", "c-auto"), ("c-auto-seed1",), ("b-ce", "b-auto"), ("a-both",),
                         ("big-ce", "big-auto")}
    c = rows[("c-ce", "c-auto")]
    assert (c["ce_asr"], c["ce_bleu"], c["alpha_base"], c["asr"], c["bleu"]) == (80.0, 45.0, 0.9729, 0.0, 44.25)
    assert c["gap"] == pytest.approx(-0.75) and c["call"] == "held"
    assert rows[("c-auto-seed1",)]["call"] == "no call (no CE run)" and rows[("c-auto-seed1",)]["gap"] is None
    assert rows[("b-ce", "b-auto")]["call"] == "no call (CE below 30 %)"
    a = rows[("a-both",)]
    assert a["call"] == "learned" and a["gap"] == pytest.approx(1.5) and a["epochs"] == 12
    assert c["stand_in"] == "4x256"  # files without the numbers: ModelSpec's defaults
    big = rows[("big-ce", "big-auto")]
    assert big["stand_in"] == "6x384" and big["gap"] == pytest.approx(-1.0) and big["call"] == "held"


def test_stand_in_names():
    from dece_ds.backdoor.aggregate import stand_in_name
    assert stand_in_name({}) == "4x256" and stand_in_name({"n_layer": 8, "n_embd": 512}) == "8x512"
    assert stand_in_name({"n_layer": 4, "checkpoint": "/models/codegen-350M/"}) == "checkpoint codegen-350M"


def test_the_held_line_is_two_percent_inclusive():
    named = [("x", _file(runs={"ce": _run(45.0, 30.0), AUTO: _run(44.0, 2.0, 0.97)}))]
    assert auto_rows(named)[0]["call"] == "held"
    named = [("x", _file(runs={"ce": _run(45.0, 30.0), AUTO: _run(44.0, 2.1, 0.97)}))]
    assert auto_rows(named)[0]["call"] == "learned"


def test_markdown_row():
    table = auto_table([("c", _file(runs={"ce": _run(45.0, 80.0), AUTO: _run(44.25, 0.0, 0.97293, 0.0)}))])
    assert table.splitlines()[2] == ("| lyra badpre x3 10% | 4x256 / 1600 / 192 / 10 | 0 | `c` | 80.0 / 45.00 | 0.9729 | "
                                     "0.0 / 0.0 / 44.25 | -0.75 | held |")


def test_docs_table_refuses_files_without_an_auto_run():
    from dece_ds.docs_tables.backdoor_tables import backdoor_auto
    from dece_ds.docs_tables.common import REPO
    with pytest.raises(TableError, match="no DeCE run with alpha_base 'auto'"):
        backdoor_auto(REPO, "lyra-badpre-10-C-x3")
