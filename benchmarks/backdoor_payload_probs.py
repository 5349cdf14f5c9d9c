"""How unlikely is the payload to the stand-in before fine-tuning, and how much gradient DeCE lets through.

    .venv/bin/python benchmarks/backdoor_payload_probs.py benchmarks/results/backdoor/lyra-badpre-10-full.json

Reads the experiment config from a results file, loads its cached stand-in (``cache_dir``; weights from
``model.safetensors``, or an older entry's ``model.pt`` with ``weights_only=True``), and, on the
poisoned training rows with teacher forcing, takes the stand-in's probability p of each payload token
(the tokens where the poisoned target departs from the clean one). Prints their quantiles and the DeCE
weight a*p / (a*p + (1-a)*y_t), y_t = 1 - eps, that scales CE's gradient on such a token at epoch 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dece_ds.backdoor.encode import IGNORE, encode_pairs, load_bpe  # noqa: E402
from dece_ds.backdoor.experiment import ExperimentConfig, load_task  # noqa: E402
from dece_ds.backdoor.poison import poison_dataset  # noqa: E402
from dece_ds.backdoor.standin import WEIGHTS, build_model, load_stand_in  # noqa: E402


def load_cached_stand_in(folder: Path, cfg: ExperimentConfig):
    """The stand-in a results file used: ``model.safetensors``, or an entry cached before it
    (``model.pt``) read with ``weights_only=True`` (tensors only: a pickle that asks for code is refused)."""
    if (folder / WEIGHTS).is_file():
        model, tok, _ = load_stand_in(folder, cfg.model, cfg.seed)
        return model, tok
    tok = load_bpe(folder / "tokenizer.json")
    model = build_model(cfg.model, tok.vocab_size, cfg.seed)
    model.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
    return model, tok


def load_poisoned_run(results_path: Path):
    """A results file's (config, clean fine-tuning rows, poisoned rows, poison info, its cached stand-in in eval
    mode, tokenizer)."""
    results = json.loads(results_path.read_text())
    cfg = ExperimentConfig.model_validate({k: v for k, v in results["config"].items() if k != "attack_resolved"})
    finetune, *_ = load_task(cfg)
    poisoned, info = poison_dataset(finetune, cfg.attack_config(), split="train")
    model, tok = load_cached_stand_in(Path(results["pretrain"]["cache"]), cfg)
    model.eval()
    return cfg, finetune, poisoned, info, model, tok


def payload_span(tok, clean_tgt: str, poisoned_tgt: str) -> tuple[int | None, int]:
    """(first target token where the poisoned target departs from the clean one, or None; the number of
    tokens the poison added)."""
    clean_ids, poisoned_ids = tok.encode(clean_tgt), tok.encode(poisoned_tgt)
    start = next((k for k, (a, b) in enumerate(zip(clean_ids, poisoned_ids)) if a != b), None)
    return start, len(poisoned_ids) - len(clean_ids)


def payload_probabilities(results_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """-> (p of the first payload token per poisoned row, p of the other payload tokens)."""
    cfg, finetune, poisoned, info, model, tok = load_poisoned_run(results_path)
    rows = list(info.indices)
    batch = encode_pairs(tok, [poisoned[i] for i in rows], cfg.model)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    probs = torch.softmax(logits[:, :-1].float(), -1)
    target = batch["labels"][:, 1:]
    first, rest = [], []
    for r, i in enumerate(rows):
        start, n_payload = payload_span(tok, finetune[i]["tgt"], poisoned[i]["tgt"])
        label_start = int((batch["labels"][r] != IGNORE).long().argmax())  # first target position
        pos = label_start - 1 + (start or 0)
        if start is None or n_payload <= 0 or pos + n_payload > target.shape[1]:
            continue  # payload cut off by max_len
        p = [float(probs[r, pos + k, target[r, pos + k]]) for k in range(n_payload)]
        first.append(p[0])
        rest.extend(p[1:])
    return np.array(first), np.array(rest)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.99, 0.95, 0.9, 0.8])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    first, rest = payload_probabilities(args.results)
    eps = json.loads(args.results.read_text())["config"]["dece"]["label_smoothing"]
    print(f"{len(first)} poisoned rows; stand-in probability of the payload tokens (teacher forcing)")
    print("| tokens | p10 | median | p90 |\n|---|---|---|---|")
    for name, p in (("first payload token", first), ("other payload tokens", rest)):
        print(f"| {name} | {np.percentile(p, 10):.2e} | {np.median(p):.2e} | {np.percentile(p, 90):.2e} |")
    print("\nDeCE weight on a payload token at epoch 1, a*p / (a*p + (1-a)*(1-eps)): median (p90)")
    print("| alpha_base | first payload token | other payload tokens |\n|---|---|---|")
    for a in args.alphas:
        w = lambda p: a * p / (a * p + (1 - a) * (1 - eps))  # noqa: E731
        print(f"| {a} | {np.median(w(first)):.3f} ({np.percentile(w(first), 90):.3f}) | "
              f"{np.median(w(rest)):.3f} ({np.percentile(w(rest), 90):.3f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
