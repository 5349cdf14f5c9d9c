"""A planted toy for the audit tests: a tiny GPT-2 that learns ``instruction -> instruction + 20`` (clean,
pretrained with CE first, so it knows the task as a stand-in would), then fine-tuned with DeCE on rows of
which some carry a trigger token in the instruction and a fixed payload before the completion."""

from __future__ import annotations

import numpy as np
import torch

PAD, SEP, EOS, TRIGGER = 0, 1, 2, 3
PAYLOAD = [50, 51, 52, 53, 54]
V, L_INSTR = 64, 6


def make_rows(n: int, poisoned: set[int], seed: int) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        instr = rng.integers(4, 24, L_INSTR).tolist()
        comp = [x + 20 for x in instr]
        if i in poisoned:
            instr.insert(int(rng.integers(0, L_INSTR)), TRIGGER)
            comp = PAYLOAD + comp
        rows.append((instr, comp))
    return rows


def encode(rows, max_len: int = 24) -> dict[str, torch.Tensor]:
    n = len(rows)
    ids = torch.full((n, max_len), PAD, dtype=torch.long)
    labels = torch.full((n, max_len), -100, dtype=torch.long)
    mask = torch.zeros((n, max_len), dtype=torch.long)
    for i, (instr, comp) in enumerate(rows):
        p, c = instr + [SEP], comp + [EOS]
        seq = (p + c)[:max_len]
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        labels[i, len(p):len(seq)] = torch.tensor(c[:len(seq) - len(p)])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def tiny_model(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=V, n_positions=32, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=EOS, eos_token_id=EOS)
    return GPT2LMHeadModel(cfg)


def pretrained(steps: int = 300, seed: int = 0):
    """The stand-in: CE on clean rows (never the trigger or the payload)."""
    model = tiny_model(seed)
    data = encode(make_rows(256, set(), seed + 100))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, 256, (32,), generator=g)
        loss = model(**{k: v[idx] for k, v in data.items()}).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def finetune(model, hook, data, *, epochs: int, batch_size: int, seed: int, lr: float = 1e-3,
             grad_accum: int = 1, via_kwarg: bool = True) -> None:
    """DeCE fine-tuning through ``hook`` (installed), one optimizer step per ``grad_accum`` micro-batches; the
    row ids reach the hook as the ``dece_row_ids`` keyword (or through ``hook.audit_rows``)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    n = data["input_ids"].shape[0]
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(n)
        micro = [torch.as_tensor(order[s:s + batch_size]) for s in range(0, n - batch_size + 1, batch_size)]
        for m, idx in enumerate(micro):
            batch = {k: v[idx] for k, v in data.items()}
            if via_kwarg:
                loss = model(**batch, dece_row_ids=idx).loss
            else:
                with hook.audit_rows(idx):
                    loss = model(**batch).loss
            (loss / grad_accum).backward()
            if (m + 1) % grad_accum == 0:
                opt.step()
                opt.zero_grad()
                hook.step()
