"""train_bpe_tokenizer: the one byte-level BPE trainer (the backdoor stand-in's, launch/train.py's)."""

from __future__ import annotations

import pytest

from dece_ds.data.tokenizer import train_bpe_tokenizer

TEXTS = ["def add(a, b):\n    return a + b\n", "select * from users where id = 3", "  indented\ttabs",
         "naïve café ünïcode ✓"] * 20
SPECIALS = ["<|endoftext|>", "<|pad|>", "<|code|>"]


def _inline_trainer(texts, vocab_size, specials):
    """The trainer runner.train_bpe and launch/train.py's build_tokenizer each spelled out before."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


@pytest.mark.parametrize("specials", [SPECIALS, SPECIALS[:2]])
def test_same_tokenizer_as_the_copies_it_replaces(specials):
    assert train_bpe_tokenizer(TEXTS, 320, specials).to_str() == _inline_trainer(TEXTS, 320, specials).to_str()


def test_specials_first_any_text_round_trips_and_the_vocabulary_is_capped():
    tok = train_bpe_tokenizer(iter(TEXTS), 300, SPECIALS)       # any iterable, read once
    assert [tok.token_to_id(s) for s in SPECIALS] == [0, 1, 2]
    assert tok.get_vocab_size() <= 300
    for text in ["unseen: 你好 \x00 ☃", " leading space", "def f():\n\treturn 1"]:
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text                           # byte level: nothing is unknown
    assert tok.encode("<|code|>").ids == [2]
