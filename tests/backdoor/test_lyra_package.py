"""The packaged Lyra (``--dataset lyra``): found through importlib.resources, offline, in an editable install
and in a wheel; the same stand-in cache key and results naming as the folder the committed results used;
stand-in size presets leave the default's key alone."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib import resources
from pathlib import Path

import pytest

from dece_ds.backdoor.data import load_lyra, load_pairs_csv
from dece_ds.backdoor.datasets import builtin_folder, content_digest
from dece_ds.backdoor.experiment import MODEL_SIZES, ExperimentConfig, ModelSpec
from dece_ds.backdoor.standin import LYRA_KEY, dataset_key, stand_in_key

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results" / "backdoor"
FILES = ("train.csv", "valid.csv", "test.csv", "train_poisoned_5_badpre.csv", "test_poisoned_badpre.csv",
         "LICENSE-DeCE-repo.txt", "SOURCE.md")


def test_lyra_found_through_importlib_resources():
    root = resources.files("dece_ds.backdoor.datasets") / "lyra"
    for name in FILES:
        assert (root / name).is_file(), name
    assert "Apache License" in (root / "LICENSE-DeCE-repo.txt").read_text()
    assert "DeCE authors' released repository" in (root / "SOURCE.md").read_text()
    assert builtin_folder("lyra") == Path(str(root))
    with pytest.raises(ValueError, match="no built-in data set named 'lyraa'"):
        builtin_folder("lyraa")


def test_lyra_loads_offline_from_the_package(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    ds = load_lyra(builtin_folder("lyra"))
    assert [ds[s].num_rows for s in ("train", "valid", "test")] == [1600, 200, 200]
    assert load_pairs_csv(builtin_folder("lyra") / "train_poisoned_5_badpre.csv").num_rows == 1600
    cfg = ExperimentConfig(dataset="lyra", attack={"attack": "badpre", "rate": 0.05})
    assert cfg.dataset_folder() == builtin_folder("lyra")
    assert cfg.dataset_name() == "lyra" and cfg.stem() == "lyra-badpre-5"


def _committed_config(stem: str, **update) -> tuple[ExperimentConfig, dict]:
    results = json.loads((RESULTS / f"{stem}.json").read_text())
    cfg = dict(results["config"])
    cfg.pop("attack_resolved")
    cfg.update(update)
    return ExperimentConfig.model_validate(cfg), results


@pytest.mark.parametrize("stem", ["lyra-badpre-10-C-x3", "lyra-badpre-10-full"])
def test_dataset_lyra_hits_the_committed_stand_in_key(stem, tmp_path):
    old, results = _committed_config(stem)
    recorded = Path(results["pretrain"]["cache"]).name.removeprefix("standin-")
    n_corpus = results["pretrain"]["corpus_functions"]
    assert old.dataset == "../shared/data/lyra" == LYRA_KEY
    new, _ = _committed_config(stem, dataset="lyra")
    assert stand_in_key(old, n_corpus) == stand_in_key(new, n_corpus) == recorded
    assert new.dataset_name() == old.dataset_name() == results["dataset"] == "lyra"
    copy = tmp_path / "lyra"  # any folder with the same bytes: the same stand-in
    shutil.copytree(builtin_folder("lyra"), copy)
    assert dataset_key(str(copy)) == LYRA_KEY
    assert stand_in_key(ExperimentConfig.model_validate({**new.model_dump(), "dataset": str(copy)}), n_corpus) == recorded


def test_other_folders_and_stdlib_keep_their_keys(tmp_path):
    other = tmp_path / "mine"
    shutil.copytree(builtin_folder("lyra"), other)
    (other / "test.csv").write_text("src,tgt\na,b\n")
    assert content_digest(other) != content_digest(builtin_folder("lyra"))
    assert dataset_key(str(other)) == str(other)  # the path, as before
    assert dataset_key(str(tmp_path / "missing")) == str(tmp_path / "missing")
    stdlib, results = _committed_config("stdlib-badpre-10")
    assert stand_in_key(stdlib, results["pretrain"]["corpus_functions"]) == "4ef60d147bbf"
    assert stand_in_key(ExperimentConfig(), 2000) == "b38067d25a7e"  # the default, before this change


def test_model_size_presets():
    assert ModelSpec(size="4x256") == ModelSpec()  # the default is the 4x256 preset
    big = ModelSpec(size="8x512")
    assert (big.n_layer, big.n_embd, big.n_head) == (8, 512, 8)
    assert ModelSpec(size="8x512", n_layer=6).n_layer == 6  # keys given win
    assert "size" not in big.model_dump()  # not stored: the cache key sees only the numbers
    assert set(MODEL_SIZES) == {"4x256", "6x384", "8x512"}
    from dece_ds.backdoor.cli_types import MODEL_SIZE_NAMES
    assert MODEL_SIZE_NAMES == tuple(MODEL_SIZES)
    with pytest.raises(ValueError, match="size: expected one of 4x256, 6x384, 8x512, got '2x2'"):
        ModelSpec(size="2x2")
    from dece_ds.backdoor.standin import build_model
    n_params = [sum(p.numel() for p in build_model(ModelSpec(size=size, max_len=192), 4096, 0).parameters())
                for size in ("4x256", "6x384", "8x512")]
    # 6x384 about 2.9 times, 8x512 about 6.4 times the default (docs/backdoor.md, "A larger stand-in")
    assert n_params == [4_259_328, 12_297_216, 27_419_648]
    a = ExperimentConfig(model={"size": "8x512"})
    b = ExperimentConfig(model={"n_layer": 8, "n_embd": 512, "n_head": 8})
    assert stand_in_key(a, 10) == stand_in_key(b, 10) != stand_in_key(ExperimentConfig(), 10)


def _cli(*args, cwd=REPO):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dece_ds.cli", "backdoor", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


def test_cli_dataset_lyra_and_model_size(tmp_path):
    out = _cli("run", "--dataset", "lyra", "--model-size", "8x512", "--alpha-base", "auto", "--print-config")
    assert out.returncode == 0, out.stderr
    cfg = json.loads(out.stdout)
    assert cfg["dataset"] == "lyra" and (cfg["model"]["n_layer"], cfg["model"]["n_embd"]) == (8, 512)
    assert cfg["dece"]["alpha_base"] == "auto"
    out = _cli("run", "--dataset", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert out.returncode == 2 and "--dataset" in out.stderr and "not 'stdlib' and not a folder" in out.stderr


def test_wheel_ships_lyra(tmp_path):
    """A fresh-clone-like check: build a wheel from the tracked and new files, install it into an empty
    folder, import from there (not from this checkout) and read Lyra through importlib.resources."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    src = tmp_path / "clone"
    for rel in files:
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("dece_ds-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for name in FILES:
        assert f"dece_ds/backdoor/datasets/lyra/{name}" in names, name
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    probe = ("import dece_ds.backdoor.datasets as d; from dece_ds.backdoor.data import load_lyra; "
             "f = d.builtin_folder('lyra'); print(d.__file__); print(load_lyra(f)['train'].num_rows)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         env={**env, "PYTHONPATH": str(site), "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    where, rows = out.stdout.split()[-2:]
    assert where.startswith(str(site)) and rows == "1600"
