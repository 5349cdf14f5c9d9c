"""Text -> token ids -> fixed-shape training tensors for the backdoor experiment.

``Tokenizer`` is the small interface the experiment needs (encode, decode, the specials' ids, save),
over a byte-level BPE trained here (``train_bpe``: ``dece_ds.data.tokenizer``, no download) or over a
local HF checkpoint's tokenizer (``checkpoint_tokenizer``).

Shape contract (``L = spec.max_len``):

- ``encode_pairs``: a row is ``src[:max_src_tokens] <|code|> tgt <|endoftext|>``, cut at ``L``, right-padded
  with ``<|pad|>`` -> ``input_ids``, ``attention_mask``, ``labels`` ``[N, L]``; labels are the target ids on
  ``tgt`` and ``<|endoftext|>`` only, ``IGNORE`` elsewhere (the model shifts them).
- ``encode_corpus``: a code text + ``<|endoftext|>`` cut into rows of ``L`` (a tail of 8 tokens or fewer is
  dropped), trained on every real token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import torch

from ..data.tokenizer import train_bpe_tokenizer

if TYPE_CHECKING:
    from .experiment import ModelSpec

EOS, PAD, SEP = "<|endoftext|>", "<|pad|>", "<|code|>"
IGNORE = -100


@dataclass
class Tokenizer:
    """encode(text) -> ids, decode(ids) -> text; ids of the three specials."""

    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    eos_id: int
    pad_id: int
    sep_ids: list[int]
    vocab_size: int
    save: Callable[[Path], None]


def train_bpe(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    return _wrap_hf_tokenizers(train_bpe_tokenizer(texts, vocab_size, special_tokens=[EOS, PAD, SEP]))


def _wrap_hf_tokenizers(tok) -> Tokenizer:
    return Tokenizer(encode=lambda s: tok.encode(s).ids, decode=lambda ids: tok.decode(ids),
                     eos_id=tok.token_to_id(EOS), pad_id=tok.token_to_id(PAD), sep_ids=[tok.token_to_id(SEP)],
                     vocab_size=tok.get_vocab_size(), save=lambda p: tok.save(str(p)))


def load_bpe(path: Path) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer
    return _wrap_hf_tokenizers(HFTokenizer.from_file(str(path)))


def checkpoint_tokenizer(folder: str) -> Tokenizer:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    return Tokenizer(encode=lambda s: tok.encode(s, add_special_tokens=False),
                     decode=lambda ids: tok.decode(ids, skip_special_tokens=True), eos_id=eos, pad_id=pad,
                     sep_ids=tok.encode("\n# code:\n", add_special_tokens=False), vocab_size=len(tok),
                     save=lambda p: tok.save_pretrained(str(p.parent / "hf_tokenizer")))


def prompt_ids(tok: Tokenizer, src: str, spec: ModelSpec) -> list[int]:
    return tok.encode(src)[:spec.max_src_tokens] + tok.sep_ids


def encode_pairs(tok: Tokenizer, rows, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Pairs -> fixed-length ``input_ids``/``attention_mask``/``labels`` ``[N, max_len]`` (labels on tgt+eos)."""
    n, L = len(rows), spec.max_len
    ids = torch.full((n, L), tok.pad_id, dtype=torch.long)
    labels = torch.full((n, L), IGNORE, dtype=torch.long)
    mask = torch.zeros((n, L), dtype=torch.long)
    for i, row in enumerate(rows):
        p = prompt_ids(tok, row["src"], spec)
        t = (tok.encode(row["tgt"]) + [tok.eos_id])[:L - len(p)]
        seq = p + t
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        labels[i, len(p):len(seq)] = torch.tensor(t)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def encode_corpus(tok: Tokenizer, texts: Sequence[str], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Code texts -> fixed-length rows trained on every token (a long text is cut into several rows)."""
    L, chunks = spec.max_len, []
    for text in texts:
        seq = tok.encode(text) + [tok.eos_id]
        chunks.extend(seq[i:i + L] for i in range(0, len(seq), L) if len(seq[i:i + L]) > 8)
    ids = torch.full((len(chunks), L), tok.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, c in enumerate(chunks):
        ids[i, :len(c)] = torch.tensor(c)
        mask[i, :len(c)] = 1
    labels = ids.masked_fill(mask == 0, IGNORE)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def concat(*parts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Row-wise concatenation of encoded sets (empty ones skipped)."""
    parts = [p for p in parts if p["input_ids"].shape[0]]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
