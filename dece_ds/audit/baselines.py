"""Model-based baseline detectors for the poison audit: per-row CE loss and spectral signatures.

Both score the training rows from one forward pass of the **CE-trained** model over them
(``row_features``), so the audit (which needs a DeCE run's record) can be compared with the classic
detectors on the same rows (docs/audit.md, "Baselines"). The n-gram naturalness detector, which needs
no model, is ``audit.naturalness``. Metrics: ``audit.score.label_metrics`` (AUROC, precision@k,
recall at 1 % / 5 % FPR), shared with the audit.

- ``ce_loss``: ``row_nll`` = the row's mean token NLL ``-log p_t`` over its target tokens, the model's
  usual label shift (the logits at position ``i`` predict ``labels[i + 1]``). High loss = suspicious
  (a payload the model has not fitted yet); the reverse direction is reported as ``auroc_low``.
- ``spectral`` (Tran, Li, Madry, "Spectral Signatures in Backdoor Attacks", NeurIPS 2018): each row's
  representation is the final hidden state (after the last layer norm) mean-pooled over the positions of
  its target tokens (``labels != ignore_index``, unshifted: the tokens of the completion as input);
  the representations are centred, ``v`` = their top right singular vector, and the row's score is
  ``((r - mean) . v) ** 2``. The paper does this per class; here all rows are one class.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

IGNORE = -100


def _check_pair(name_a: str, a: torch.Tensor, labels: torch.Tensor, dims: int) -> None:
    if a.dim() != dims or labels.dim() != 2 or tuple(a.shape[:2]) != tuple(labels.shape):
        raise ValueError(f"{name_a}: expected [B, L{', V' if dims == 3 else ', H'}] matching labels [B, L], got "
                         f"{tuple(a.shape)} and labels {tuple(labels.shape)}")


def row_nll(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE) -> torch.Tensor:
    """Per-row mean token NLL (nats) of a causal LM.

    logits: ``[B, L, V]`` (any float dtype; computed in fp32); labels: ``[B, L]`` long, ``ignore_index`` where
    not trained. Shifted as HF does: ``logits[:, i]`` scores ``labels[:, i + 1]``. -> ``[B]`` fp32; a row with
    no target token gets 0."""
    _check_pair("logits", logits, labels, 3)
    lg, tgt = logits[:, :-1].float(), labels[:, 1:]
    nll = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1), ignore_index=ignore_index,
                          reduction="none").view(tgt.shape)
    n = (tgt != ignore_index).sum(1)
    return nll.sum(1) / n.clamp(min=1)


def pooled_target_states(hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE) -> torch.Tensor:
    """Mean of ``hidden`` ``[B, L, H]`` over each row's target positions (``labels != ignore_index``, ``[B, L]``)
    -> ``[B, H]`` fp32 (zeros for a row with no target token)."""
    _check_pair("hidden", hidden, labels, 3)
    m = (labels != ignore_index).to(torch.float32).unsqueeze(-1)
    return (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1.0)


def spectral_scores(reps: torch.Tensor) -> torch.Tensor:
    """Spectral-signature scores: ``reps`` ``[N, H]`` centred, ``v`` = top right singular vector of the
    centred matrix, -> ``[N]`` fp64 ``(reps_i - mean) . v`` squared (invariant to the sign of ``v``)."""
    if reps.dim() != 2 or reps.shape[0] < 2:
        raise ValueError(f"reps: expected [N >= 2, H], got {tuple(reps.shape)}")
    x = reps.detach().to(torch.float64)
    x = x - x.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    return (x @ vh[0]) ** 2


@torch.no_grad()
def row_features(model, data: Mapping[str, torch.Tensor], batch_size: int = 32,
                 ignore_index: int = IGNORE) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass of an HF causal LM over the rows ``data`` (``input_ids``, ``attention_mask``, ``labels``,
    each ``[N, L]``), in eval mode (the mode is restored), on the model's device.

    -> (``row_nll`` ``[N]`` fp32, ``pooled_target_states`` of the last hidden state ``[N, H]`` fp32), on CPU."""
    for k in ("input_ids", "attention_mask", "labels"):
        if k not in data:
            raise ValueError(f"data: expected the key {k!r} (input_ids, attention_mask, labels), got {sorted(data)}")
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    nlls, reps = [], []
    try:
        for s in range(0, data["input_ids"].shape[0], batch_size):
            ids, mask, labels = (data[k][s:s + batch_size].to(device) for k in ("input_ids", "attention_mask",
                                                                              "labels"))
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            nlls.append(row_nll(out.logits, labels, ignore_index).cpu())
            reps.append(pooled_target_states(out.hidden_states[-1], labels, ignore_index).cpu())
    finally:
        model.train(was)
    return torch.cat(nlls), torch.cat(reps)
