"""The one byte-level BPE trainer: a tokenizer trained here, on the training text (no download).

Byte level (GPT-2's layout): every string is first mapped to bytes, each byte to one of 256 printable
characters (``pre_tokenizers.ByteLevel.alphabet()``), so the initial alphabet covers every input and
no text is ever unknown; ``add_prefix_space=False`` keeps a row's first word as written (code is
whitespace-sensitive); the ``ByteLevel`` decoder maps the ids back to the exact text. The special
tokens get the first ids, in the order given.

Used by the backdoor stand-in (``dece_ds.backdoor.encode.train_bpe``) and by the recipes'
``--tokenizer``-less tiny models.
"""

from __future__ import annotations

from typing import Iterable, Sequence


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str]):
    """Byte-level BPE of ``vocab_size`` ids (specials included, ids 0..len(special_tokens)-1) trained on
    ``texts`` (any iterable, read once). Returns a ``tokenizers.Tokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok
