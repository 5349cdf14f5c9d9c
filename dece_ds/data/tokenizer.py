"""One byte-level BPE trainer for every tokenizer dece_ds trains itself (tiny models, the backdoor stand-in)."""

from __future__ import annotations

from typing import Iterable, Sequence


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str]):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts`` (no prefix space, ByteLevel decoder,
    the full byte alphabet, ``special_tokens`` first in the vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    return bpe
