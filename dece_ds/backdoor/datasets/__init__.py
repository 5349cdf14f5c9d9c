"""Data sets shipped inside the package, found through ``importlib.resources`` (editable install or wheel).

- ``lyra/``: the Lyra NL -> Python-with-SQL set (train/valid/test, 1600/200/200 rows) and the authors'
  poisoned files (``train_poisoned_5_badpre.csv``, ``test_poisoned_badpre.csv``), as released in the DeCE
  authors' repository (Yang et al., arXiv 2407.08956) under the Apache License 2.0:
  ``lyra/LICENSE-DeCE-repo.txt`` is that repository's licence, kept with the files. ``lyra/SOURCE.md``
  names the source and the files' SHA-256.

``--dataset lyra`` (or ``"dataset": "lyra"`` in an experiment config) reads ``lyra/`` from here.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

BUILTIN = ("lyra",)
SPLIT_FILES = ("train.csv", "valid.csv", "test.csv")


def builtin_folder(name: str) -> Path:
    """The folder of a shipped data set (``"lyra"``) as a file-system path; ``ValueError`` for another name.

    The package is installed as plain files (editable or wheel, never zipped), so the traversable is a
    real folder.
    """
    if name not in BUILTIN:
        raise ValueError(f"dataset: no built-in data set named {name!r} (built in: {', '.join(BUILTIN)})")
    folder = Path(str(resources.files(__name__) / name))
    if not all((folder / f).is_file() for f in SPLIT_FILES):
        raise FileNotFoundError(f"{folder}: the packaged {name} files are missing (expected {', '.join(SPLIT_FILES)}); "
                                "reinstall dece_ds (package data: pyproject.toml [tool.setuptools.package-data])")
    return folder


def dataset_folder(dataset: str) -> Path:
    """The Lyra-layout folder of an experiment's ``dataset``: the packaged one for a built-in name, else the path."""
    if dataset == "stdlib":
        raise ValueError("dataset: 'stdlib' is built from the standard library, not read from a folder")
    return builtin_folder(dataset) if dataset in BUILTIN else Path(dataset)


def content_digest(folder: str | Path) -> str:
    """SHA-256 over the three split files of a Lyra-layout folder (name and bytes of each, in split order)."""
    h = hashlib.sha256()
    for name in SPLIT_FILES:
        h.update(name.encode() + b"\0")
        h.update((Path(folder) / name).read_bytes())
    return h.hexdigest()
