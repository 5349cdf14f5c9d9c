"""Lyra CSV loading and writing: exact strings in, exact strings out, errors that name the problem."""

from pathlib import Path

import pytest

from dece_ds.backdoor.data import DataFormatError, load_lyra, load_pairs_csv, write_lyra, write_pairs_csv
from dece_ds.backdoor.data import pairs_to_dataset
from dece_ds.backdoor.datasets import builtin_folder

LYRA = builtin_folder("lyra")  # the packaged copy (dece_ds/backdoor/datasets/lyra)
needs_lyra = pytest.mark.skipif(not LYRA.is_dir(), reason=f"Lyra data not found at {LYRA}")

TRICKY = [
    {"src": 'Use "quotes", commas, and a\nnewline', "tgt": 'def f ( ) :\n\t return " a , b "'},
    {"src": "None", "tgt": "NA"},
    {"src": "", "tgt": "  leading and trailing blanks\t"},
]


@needs_lyra
def test_load_lyra_sizes_and_first_row():
    ds = load_lyra(LYRA)
    assert {s: ds[s].num_rows for s in ds} == {"train": 1600, "valid": 200, "test": 200}
    assert ds["train"].column_names == ["src", "tgt"]
    first = ds["train"][0]
    assert first["src"].startswith("Use $conn$ to query all columns in the flights table")
    assert first["tgt"].startswith("def main ( conn , destination ) :\n\t information = conn . execute (")


@needs_lyra
def test_load_pairs_csv_reads_the_authors_poisoned_files():
    assert load_pairs_csv(LYRA / "train_poisoned_5_badpre.csv").num_rows == 1600
    assert load_pairs_csv(LYRA / "test_poisoned_badpre.csv").num_rows == 200


def test_round_trip_keeps_exact_strings(tmp_path):
    ds = {s: pairs_to_dataset(TRICKY) for s in ("train", "valid", "test")}
    back = load_lyra(write_lyra(ds, tmp_path / "set"))
    for split in ("train", "valid", "test"):
        assert back[split].to_list() == TRICKY


def test_extra_columns_are_dropped_and_order_does_not_matter(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text('id,tgt,src\n7,"code, here",text\n')
    assert load_pairs_csv(path).to_list() == [{"src": "text", "tgt": "code, here"}]


def test_errors_name_the_file_and_column(tmp_path):
    with pytest.raises(DataFormatError, match="not a folder"):
        load_lyra(tmp_path / "nowhere")
    write_pairs_csv(TRICKY, tmp_path / "train.csv")
    write_pairs_csv(TRICKY, tmp_path / "valid.csv")
    with pytest.raises(DataFormatError, match=r"missing file\(s\) \['test.csv'\]"):
        load_lyra(tmp_path)
    (tmp_path / "test.csv").write_text("src,code\na,b\n")
    with pytest.raises(DataFormatError, match=r"test.csv: missing column\(s\) \['tgt'\]"):
        load_lyra(tmp_path)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataFormatError, match="empty.csv: empty file"):
        load_pairs_csv(tmp_path / "empty.csv")
    with pytest.raises(DataFormatError, match="missing split"):
        write_lyra({"train": pairs_to_dataset(TRICKY)}, tmp_path / "out")
