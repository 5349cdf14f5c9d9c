"""NL -> code pair data sets in the Lyra CSV layout.

A data set is a folder with ``train.csv``, ``valid.csv`` and ``test.csv``; each file has a header
row and the columns ``src`` (the natural-language instruction) and ``tgt`` (the code). Fields may
span lines (quoted, ``"`` doubled), as pandas' ``to_csv`` writes them. In memory a data set is a
``datasets.DatasetDict`` with the splits ``train``/``valid``/``test``, each a ``datasets.Dataset``
with two ``string`` columns ``src`` and ``tgt``.

The files are read with the standard ``csv`` module and turned into ``Dataset.from_dict``: every
field stays the exact string in the file (pandas, which ``load_dataset("csv")`` uses, would turn
``"None"``, ``"NA"`` or an empty field into a missing value), nothing is cached under
``~/.cache/huggingface`` and nothing touches the network.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Iterable, Mapping

from datasets import Dataset, DatasetDict, Features, Value

COLUMNS = ("src", "tgt")
SPLITS = ("train", "valid", "test")
FEATURES = Features({"src": Value("string"), "tgt": Value("string")})


class DataFormatError(ValueError):
    """A data file or folder that is not in the Lyra layout; the message names the file and the column."""


def pairs_to_dataset(rows: Iterable[Mapping[str, str]]) -> Dataset:
    """Rows with ``src`` and ``tgt`` strings -> a ``Dataset`` with exactly those two columns."""
    src, tgt = [], []
    for row in rows:
        src.append(row["src"])
        tgt.append(row["tgt"])
    return Dataset.from_dict({"src": src, "tgt": tgt}, features=FEATURES)


def load_pairs_csv(path: str | os.PathLike) -> Dataset:
    """One CSV file with a header naming ``src`` and ``tgt`` -> ``Dataset`` (other columns dropped).

    Raises ``DataFormatError`` naming the file when it is missing, has no header, lacks a column, or
    has a row with too few fields.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DataFormatError(f"{path}: empty file, expected a header with columns {list(COLUMNS)}")
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise DataFormatError(
                f"{path}: missing column(s) {missing}; header is {header}, expected {list(COLUMNS)}")
        i_src, i_tgt = header.index("src"), header.index("tgt")
        src, tgt = [], []
        for line_no, fields in enumerate(reader, start=2):
            if len(fields) <= max(i_src, i_tgt):
                raise DataFormatError(f"{path}: record {line_no} has {len(fields)} field(s): {fields!r}")
            src.append(fields[i_src])
            tgt.append(fields[i_tgt])
    return Dataset.from_dict({"src": src, "tgt": tgt}, features=FEATURES)


def load_lyra(folder: str | os.PathLike) -> DatasetDict:
    """A folder with ``train.csv``, ``valid.csv``, ``test.csv`` -> ``DatasetDict`` (train/valid/test).

    Lyra itself has 1600/200/200 rows. Raises ``DataFormatError`` naming the missing folder, file or
    column.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataFormatError(f"{folder}: not a folder (expected {', '.join(s + '.csv' for s in SPLITS)})")
    missing = [f"{s}.csv" for s in SPLITS if not (folder / f"{s}.csv").is_file()]
    if missing:
        raise DataFormatError(f"{folder}: missing file(s) {missing}")
    return DatasetDict({s: load_pairs_csv(folder / f"{s}.csv") for s in SPLITS})


def write_pairs_csv(dataset: Dataset | Iterable[Mapping[str, str]], path: str | os.PathLike) -> Path:
    """Write ``src``/``tgt`` rows to one CSV file in the layout ``load_pairs_csv`` reads; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        # pandas' to_csv layout, as the authors' files were written: minimal quoting, "\n" line ends.
        writer = csv.writer(f, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        writer.writerow(COLUMNS)
        for row in dataset:
            writer.writerow((row["src"], row["tgt"]))
    return path


def write_lyra(dataset: DatasetDict | Mapping[str, Dataset], folder: str | os.PathLike) -> Path:
    """Write the splits train/valid/test to ``folder/{split}.csv``; ``load_lyra(folder)`` reads them back."""
    folder = Path(folder)
    missing = [s for s in SPLITS if s not in dataset]
    if missing:
        raise DataFormatError(f"dataset: missing split(s) {missing}; has {list(dataset)}")
    for split in SPLITS:
        write_pairs_csv(dataset[split], folder / f"{split}.csv")
    return folder
