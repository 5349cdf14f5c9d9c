"""``dece-ds backdoor run|report`` with bad input: one line ``dece-ds backdoor <cmd>: error: ...``, exit 2,
before any pretraining (run specs, each run's loss settings, the folders a run reads and writes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dece_ds.cli import main

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "backdoor"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(["backdoor", *argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(result, command: str, expected: str) -> None:
    code, out, err = result
    assert (code, out) == (2, ""), err
    assert err.startswith(f"dece-ds backdoor {command}: error: "), err
    assert expected in err and err.count("\n") == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("runs,expected", [
    ("foo", "argument --runs: run 'foo': kind must be one of"),
    (",", "argument --runs: give at least one run spec"),
    ("", "argument --runs: give at least one run spec"),
    ("dece:alpha_base", "argument --runs: run 'dece:alpha_base': expected key=value, got 'alpha_base'"),
    ("ce,ce", "runs: duplicates in ('ce', 'ce')"),
    ("dece:alpha_base=2", "--runs 'dece:alpha_base=2': dece.alpha_base: Input should be less than or equal to 1"),
    ("dece:sheduel=epoch", "--runs 'dece:sheduel=epoch': dece.sheduel: unknown key"),
    ("dece:reduction=none", "--runs 'dece:reduction=none': dece.reduction: the engine's backward needs a scalar"),
    ("gce:q=2", "--runs 'gce:q=2': q: expected 0 < q <= 1, got 2"),
    ("gce:x=1", "--runs 'gce:x=1': gce_loss() got an unexpected keyword argument 'x'"),
    ("ls:label_smoothing=abc", "--runs 'ls:label_smoothing=abc': label_smoothing: expected a number, got 'abc'"),
    ("ce:lr=1", "--runs 'ce:lr=1': takes no parameters, got {'lr': 1}"),
])
def test_bad_run_specs_fail_before_pretraining(capsys, runs, expected):
    assert_one_line(run_cli(capsys, "run", "--runs", runs, "--print-config"), "run", expected)


def test_good_run_specs_still_pass(capsys):
    code, out, _ = run_cli(capsys, "run", "--runs", "clean,ce,dece:alpha_base=0.95,ce_warmup_epochs=2,ls,"
                           "gce:q=0.7,intrust:delta=0.5,dece:preset=backdoor_guard", "--print-config")
    assert code == 0
    assert json.loads(out)["runs"] == ["clean", "ce", "dece:alpha_base=0.95,ce_warmup_epochs=2", "ls", "gce:q=0.7",
                                       "intrust:delta=0.5", "dece:preset=backdoor_guard"]


@pytest.mark.parametrize("flags,expected", [
    (["--alpha-base", "2"], "--runs 'dece': dece.alpha_base: Input should be less than or equal to 1 (got 2.0)"),
    (["--rate", "150"], "attack.badpre.rate: Input should be less than or equal to 1 (got 1.5)"),
    (["--epochs", "0"], "finetune.epochs: Input should be greater than or equal to 1 (got 0)"),
    (["--threads", "0"], "threads: Input should be greater than or equal to 1 (got 0)"),
    (["--rate", "x"], "argument --rate: invalid float value: 'x'"),
    (["--name", "../../x"], "name: must be a plain file name inside the output folder"),
    (["--width", "30"], "--width 30: must be a multiple of model.n_head (4)"),
    (["--seed", "-1"], "--seed: must be >= 0, got -1"),
    (["--finetune-seed", "-5"], "--finetune-seed: must be >= 0, got -5"),
    (["--lr", "inf"], "--lr: must be finite, got inf"),
    (["--lr", "nan"], "finetune.lr: Input should be greater than 0 (got nan)"),
])
def test_bad_numbers_and_names_are_one_line(capsys, flags, expected):
    assert_one_line(run_cli(capsys, "run", *flags, "--print-config"), "run", expected)


@pytest.mark.parametrize("config,expected", [
    ({"finetune": 3}, "finetune: expected an object, got 3"),
    ({"attack": "badpre"}, 'attack: expected an object, got "badpre"'),
    ({"dece": None}, "dece: expected an object, got null"),
    ({"model": [1]}, "model: expected an object, got [1]"),
])
def test_config_file_sections_of_the_wrong_type(tmp_path, capsys, config, expected):
    path = tmp_path / "exp.json"
    path.write_text(json.dumps(config))
    assert_one_line(run_cli(capsys, "run", "--config", str(path), "--epochs", "2", "--print-config"), "run",
                    f"{path}: {expected}")


def test_config_file_fields_are_named_one_per_line(tmp_path, capsys):
    path = tmp_path / "exp.json"
    path.write_text(json.dumps({"seed": "x", "epochz": 3}))
    code, out, err = run_cli(capsys, "run", "--config", str(path), "--print-config")
    assert (code, out) == (2, "")
    assert err.splitlines() == ["dece-ds backdoor run: error: seed: Input should be a valid integer, unable to "
                                "parse string as an integer (got 'x')",
                                "dece-ds backdoor run: error: epochz: Extra inputs are not permitted (got 3)"]


def test_missing_folders_fail_before_any_work(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    (tmp_path / "lyra").mkdir()
    (tmp_path / "lyra" / "train.csv").write_text("src,tgt\n")
    for flags, expected in [
        (["--dataset", str(tmp_path / "nope")], f"--dataset {tmp_path / 'nope'}: not 'stdlib' and not a folder"),
        (["--dataset", str(tmp_path / "lyra")], f"--dataset {tmp_path / 'lyra'}: missing valid.csv, test.csv"),
        (["--checkpoint", str(tmp_path)], f"--checkpoint {tmp_path}: not a local Hugging Face model folder"),
        (["--out", str(tmp_path / "a_file")], f"--out {tmp_path / 'a_file'}: exists and is not a folder"),
        (["--cache-dir", str(tmp_path / "a_file")], f"--cache-dir {tmp_path / 'a_file'}: exists and is not a folder"),
    ]:
        out = [] if "--out" in flags else ["--out", str(tmp_path / "out")]
        assert_one_line(run_cli(capsys, "run", *flags, *out), "run", expected)
    assert not (tmp_path / "out").exists()


def test_a_data_set_file_that_does_not_parse(tmp_path, capsys):
    lyra = tmp_path / "lyra"
    lyra.mkdir()
    for split in ("train", "valid", "test"):
        (lyra / f"{split}.csv").write_text("src,tgt\nfind x,select x\n")
    (lyra / "test.csv").write_bytes("src,tgt\ncaf\u00e9,x\n".encode("latin-1"))
    argv = ["run", "--dataset", str(lyra), "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    assert_one_line(run_cli(capsys, *argv), "run", f"--dataset {lyra}: test.csv: not UTF-8 text (byte 0xe9")
    (lyra / "test.csv").write_text("")  # found by the loader, the first thing a run does
    assert_one_line(run_cli(capsys, *argv), "run", f"{lyra / 'test.csv'}: empty file, expected a header")
    assert not (tmp_path / "out").exists()


def test_report_bad_inputs(tmp_path, capsys):
    good = str(RESULTS / "lyra-badpre-10-C.json")
    (tmp_path / "other.json").write_text(json.dumps({"dataset": "lyra"}))
    (tmp_path / "runs_list.json").write_text(json.dumps({"dataset": "lyra", "attack": "badpre",
                                                         "poison_rate": 10, "runs": []}))
    for argv, expected in [
        ([str(tmp_path / "other.json")], "other.json: not a results file of 'dece-ds backdoor run' (missing attack, "
                                         "poison_rate, runs)"),
        ([str(tmp_path / "runs_list.json")], "runs_list.json: not a results file of 'dece-ds backdoor run' "
                                             "(runs is not an object)"),
        ([good, str(RESULTS / "lyra-badpre-1-C-x3.json"), "--merge", "m"], "merge: lyra / badpre x3 1% differs"),
        ([good, "--merge", "../m"], "--merge: must be a plain file name inside the output folder"),
        ([good, "--out", str(tmp_path)], f"--out {tmp_path}: cannot write it: Is a directory"),
        ([good, "--out", str(tmp_path / "no" / "t.md")], "cannot write it: No such file or directory"),
    ]:
        assert_one_line(run_cli(capsys, "report", *argv), "report", expected)
    code, out, _ = run_cli(capsys, "report", good)
    assert code == 0 and out.startswith("| run |")
