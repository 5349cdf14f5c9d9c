"""Evaluation of a fine-tuned (or the stand-in) model: generation metrics and validation cross-entropy.

``evaluate`` decodes greedily, in one batched pass, the first ``rows`` clean test prompts and the first
``rows`` triggered ones (all of them when ``rows`` is None), then scores: ASR on the triggered
generations (denominator: the poisonable test rows), BLEU-4, exact match and the false-trigger rate on
the clean ones (references: the clean targets), CodeBLEU on request, and ``valid_ce``. Rates in percent.

Trigger lift: ``untriggered_payload_rate`` is the payload rate of the clean generations for the same
poisonable test rows the triggered set was made from (``EvalSets.trig_index``: row i of the triggered set
is clean row ``trig_index[i]``), so no extra generation is needed; ``lift = asr - untriggered_payload_rate``.
Both are None when the clean rows decoded this time do not cover the triggered ones (a per-epoch
evaluation on the first rows of each set), or when ``trig_index`` is not given.
Prompts are left-padded to the fixed ``max_src_tokens + len(sep)`` (see ``generate.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import torch
import torch.nn.functional as F

from .encode import IGNORE, Tokenizer, prompt_ids
from .generate import greedy_generate
from .metrics import attack_success_rate, bleu4, code_bleu, exact_match, false_trigger_rate, trigger_lift
from .progress import progress

if TYPE_CHECKING:
    from .experiment import ExperimentConfig


@dataclass
class EvalSets:
    clean_src: list[str]
    clean_tgt: list[str]
    trig_src: list[str]
    valid: dict[str, torch.Tensor]
    trig_index: list[int] | None = None  # clean test row of each triggered row (PoisonInfo.indices)


@torch.no_grad()
def valid_ce(model, data: Mapping[str, torch.Tensor], batch_size: int = 50) -> float:
    """Plain CE (nats per target token) of the clean validation rows."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for s in range(0, data["input_ids"].shape[0], batch_size):
        ids, mask, labels = (data[k][s:s + batch_size].to(device) for k in ("input_ids", "attention_mask", "labels"))
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        tgt = labels[:, 1:]
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                       ignore_index=IGNORE, reduction="sum"))
        count += int((tgt != IGNORE).sum())
    model.train(was)
    return total / max(count, 1)


def evaluate(model, tok: Tokenizer, sets: EvalSets, attack, cfg: ExperimentConfig, rows: int | None,
             with_codebleu: bool, desc: str) -> dict[str, Any]:
    spec, ev = cfg.model, cfg.eval
    n_clean = min(rows or len(sets.clean_src), len(sets.clean_src))
    n_trig = min(rows or len(sets.trig_src), len(sets.trig_src))
    prompts = ([prompt_ids(tok, s, spec) for s in sets.clean_src[:n_clean]]
               + [prompt_ids(tok, s, spec) for s in sets.trig_src[:n_trig]])
    plen = spec.max_src_tokens + len(tok.sep_ids)
    with progress(total=len(prompts), desc=desc, leave=False) as bar:
        out = greedy_generate(model, prompts, eos_id=tok.eos_id, pad_id=tok.pad_id,
                              max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size, prompt_len=plen,
                              progress=bar)
    gens = [tok.decode(ids) for ids in out]
    clean_gen, trig_gen = gens[:n_clean], gens[n_clean:]
    refs = sets.clean_tgt[:n_clean]
    result = {
        "asr": attack_success_rate(trig_gen, attack),
        "bleu": bleu4(refs, clean_gen),
        "exact_match": exact_match(refs, clean_gen),
        "false_trigger": false_trigger_rate(clean_gen, attack),
        "valid_ce": valid_ce(model, sets.valid, ev.batch_size),
        "eval_rows": {"clean": n_clean, "triggered": n_trig},
        "untriggered_payload_rate": None, "lift": None,
    }
    if sets.trig_index is not None and all(i < n_clean for i in sets.trig_index[:n_trig]):
        same_untriggered = [clean_gen[i] for i in sets.trig_index[:n_trig]]
        result.update(trigger_lift(trig_gen, same_untriggered, attack))
    if with_codebleu:
        try:
            result["codebleu"] = code_bleu(refs, clean_gen)["codebleu"]
        except Exception as e:  # noqa: BLE001 -- report why instead of losing the run
            result["codebleu"] = None
            result["codebleu_error"] = f"{type(e).__name__}: {e}"
    result["samples"] = {"clean": clean_gen[:3], "triggered": trig_gen[:3]}
    return result
