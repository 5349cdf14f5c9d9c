"""Where the alpha rules put DeCE's half-gradient point, against the stand-in's probabilities of the targets.

    .venv/bin/python benchmarks/backdoor_target_probs.py benchmarks/results/backdoor/lyra-badpre-10-C-x3.json \
        benchmarks/results/backdoor/stdlib-badpre-10.json --out benchmarks/results/backdoor/target_probs.json

For each results file: its cached stand-in (before fine-tuning), teacher-forced over all its poisoned
fine-tuning rows, gives p_t of every target token; a token is a payload token where the poisoned target
departs from the clean one (``backdoor_payload_probs.payload_span``). Printed per file: quantiles of p_t
over all, clean and payload tokens, and the alpha_base (one-epoch schedule, eps from the file) each rule
picks, with its half-point ``p_half = (1 - a)(1 - eps) / a`` (DeCE gives a token at p_half half of CE's
gradient) and the share of clean and of payload tokens below it:

- ``quantile q``: ``dece_ds.auto_alpha.alpha_base_from_probs`` (alpha_base "auto") on all tokens;
- ``valley``: p_half at Otsu's threshold of log10 p_t (the split of the two modes, "predicted" and "tail",
  that maximises the between-class variance);
- the fixed values measured in docs/backdoor.md (0.99, 0.98, 0.97).

The rule runs on all fine-tuning tokens here, not on the 2 % sample alpha_base "auto" takes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from backdoor_payload_probs import load_poisoned_run, payload_span  # noqa: E402
from dece_ds.auto_alpha import alpha_base_from_probs, alpha_for_weight, half_point  # noqa: E402
from dece_ds.backdoor.encode import IGNORE, encode_pairs  # noqa: E402
from dece_ds.config import DeceConfig  # noqa: E402

QUANTILES = (0.01, 0.05, 0.1, 0.2, 0.25, 0.5)
FIXED = (0.99, 0.98, 0.97)


def target_probabilities(results_path: Path, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray, float]:
    """-> (p_t of every target token of the poisoned fine-tuning rows, float64 [T]; payload mask, bool [T];
    label smoothing of the file's dece section)."""
    cfg, finetune, poisoned, info, model, tok = load_poisoned_run(results_path)
    poisoned_rows = set(info.indices)
    probs, marks = [], []
    for s in range(0, len(poisoned), batch_size):
        rows = list(range(s, min(s + batch_size, len(poisoned))))
        batch = encode_pairs(tok, [poisoned[i] for i in rows], cfg.model)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp = torch.log_softmax(logits[:, :-1].double(), -1)
        target = batch["labels"][:, 1:]
        for r, i in enumerate(rows):
            keep = target[r] != IGNORE
            p = logp[r][keep].gather(1, target[r][keep][:, None]).squeeze(1).exp().numpy()
            mark = np.zeros(p.size, bool)
            if i in poisoned_rows:
                start, n = payload_span(tok, finetune[i]["tgt"], poisoned[i]["tgt"])
                if start is not None and n > 0:
                    mark[start:start + n] = True   # cut off by max_len: the slice stops at the row's end
            probs.append(p)
            marks.append(mark)
    return np.concatenate(probs), np.concatenate(marks), float(cfg.dece.get("label_smoothing", 0.05))


def otsu_threshold(x: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``x``: the histogram split that maximises the between-class variance."""
    hist, edges = np.histogram(x, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)[:-1].astype(float)
    w1 = hist.sum() - w0
    m0 = np.cumsum(hist * centres)[:-1]
    mean0, mean1 = m0 / np.maximum(w0, 1), (np.sum(hist * centres) - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(edges[1:][:-1][int(np.argmax(between))])


def rules(p: np.ndarray, payload: np.ndarray, eps: float) -> list[dict]:
    """Each rule's alpha_base, half-point and the share of clean / payload tokens below it (one epoch: e = 1)."""
    config = DeceConfig(alpha_base=0.99, label_smoothing=eps, schedule="epoch")
    picks = [(f"quantile {q:g}", alpha_base_from_probs(torch.from_numpy(p), config, quantile=q)[0])
             for q in (0.1, 0.2, 0.3)]
    valley = 10 ** otsu_threshold(np.log10(np.clip(p, 1e-12, 1.0)))
    picks.append(("valley (Otsu on log10 p)", alpha_for_weight(valley, eps)))
    picks += [(f"fixed {a:g}", a) for a in FIXED]
    out = []
    for name, a in picks:
        ph = half_point(a, eps)
        out.append({"rule": name, "alpha_base": a, "p_half": ph, "clean_below": float(np.mean(p[~payload] < ph)),
                    "payload_below": float(np.mean(p[payload] < ph)) if payload.any() else None})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    report = {}
    for path in args.results:
        p, payload, eps = target_probabilities(path)
        quant = {name: {f"{q:g}": float(np.quantile(x, q)) for q in QUANTILES}
                 for name, x in (("all", p), ("clean", p[~payload]), ("payload", p[payload])) if x.size}
        picked = rules(p, payload, eps)
        report[path.stem] = {"tokens": int(p.size), "payload_tokens": int(payload.sum()), "label_smoothing": eps,
                             "quantiles": quant, "rules": picked}
        print(f"\n{path.stem}: {p.size} target tokens, {int(payload.sum())} of them payload")
        print("| tokens | " + " | ".join(f"p{q * 100:g}" for q in QUANTILES) + " |")
        print("|---|" + "---|" * len(QUANTILES))
        for name, qs in quant.items():
            print(f"| {name} | " + " | ".join(f"{v:.2e}" for v in qs.values()) + " |")
        print("\n| rule | alpha_base | p_half | clean tokens below | payload tokens below |\n|---|---|---|---|---|")
        for r in picked:
            below = "-" if r["payload_below"] is None else f"{r['payload_below']:.1%}"
            print(f"| {r['rule']} | {r['alpha_base']:.4f} | {r['p_half']:.3g} | {r['clean_below']:.1%} | {below} |")
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "files": report}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
