"""Streaming packed corpora for continued pretraining: read, tokenize, pack, shard, resume exactly.

What is computed
    Local shards (json / jsonl / parquet / text files) are read with HF ``datasets`` in streaming
    mode (nothing is loaded into memory or written to a cache). Each row's text is tokenized when it is
    reached, an EOS id is appended, and the token stream is cut into fixed-length sequences of
    ``seq_len`` tokens (packing: a sequence may span several rows; the model sees the EOS between
    them). ``labels`` equal ``input_ids`` (the model shifts them); a final partial sequence is dropped,
    or with ``drop_last=False`` padded with ``pad_id`` and labels ``-100``.

Sharding across data-parallel ranks (no overlap, full coverage)
    Rows are split between ranks with ``datasets.distributed.split_dataset_by_node`` before
    tokenization: ``strategy="examples"`` (default) gives rank ``r`` the rows ``i`` with
    ``i % dp_world == r`` of the concatenated files (balanced; every rank reads every file but
    tokenizes only its own rows); ``"shards"`` gives each rank whole files (needs
    ``len(files) % dp_world == 0``; cheapest IO, balanced only if the files are). Either way each row
    belongs to exactly one rank, so the ranks' token streams are disjoint and together are the corpus
    (minus each rank's final partial sequence). Ranks end after different numbers of sequences when
    their token counts differ: the training loop must stop when the first rank runs out (an
    all-reduce of a "got a batch" flag), or every rank would wait for the missing one.

Position and exact resume
    The position is three integers: the index ``row`` (in this rank's row sub-stream) of the row that
    holds the first token of the next sequence, the ``offset`` of that token in the row's tokens, and
    the number of ``sequences`` yielded so far (plus the split it belongs to, checked on load).
    ``state_dict()`` returns it as a JSON-ready dict (it fits in DeepSpeed's ``client_state``);
    ``load_state_dict()`` on a fresh stream with the same files, tokenizer, ``seq_len`` and split makes
    the next sequences exactly those an uninterrupted stream would have produced. Resuming reads (does
    not tokenize) the rows before ``row`` again: O(rows) IO, no model-side cost. Tokenization must be
    deterministic (HF tokenizers are). Row order is the file order: shuffle shards offline, because an
    in-stream shuffle buffer is not part of this state.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import torch

FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".text": "text"}
STATE_VERSION = 1


def infer_format(files: Sequence[str | os.PathLike]) -> str:
    """The ``datasets`` builder name for the files' extension (all files must agree)."""
    formats = {FORMATS.get(Path(f).suffix.lower()) for f in files}
    if None in formats or len(formats) != 1:
        raise ValueError(f"files: cannot tell one format from the extensions of {[str(f) for f in files]} "
                         f"(known: {sorted(FORMATS)}); pass data_format")
    return formats.pop()


def _as_tokenize_fn(tokenizer) -> Callable[[str], list[int]]:
    """A callable ``text -> token ids``: an HF tokenizer (no special tokens added) or a plain function."""
    if hasattr(tokenizer, "eos_token_id") and callable(tokenizer):
        return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    if callable(tokenizer):
        return tokenizer
    raise TypeError(f"tokenizer: expected an HF tokenizer or a callable text -> ids, got {type(tokenizer).__name__}")


class StreamingPackedDataset(torch.utils.data.IterableDataset):
    """Packed ``seq_len`` sequences of one data-parallel rank, with a resumable position.

    Iterating yields ``{"input_ids": LongTensor[seq_len], "labels": LongTensor[seq_len],
    "attention_mask": LongTensor[seq_len]}`` from the current position on; ``next_batch(b)`` stacks
    ``b`` of them (``[b, seq_len]``) or returns None at the end. Iteration happens in the calling
    process (use ``num_workers=0`` with a DataLoader, or none at all): the position is this object's.
    """

    def __init__(self, files: Sequence[str | os.PathLike], tokenizer, seq_len: int, *,
                 text_field: str = "text", data_format: str | None = None, eos_id: int | None = None,
                 dp_rank: int = 0, dp_world: int = 1, strategy: Literal["examples", "shards"] = "examples",
                 drop_last: bool = True, pad_id: int | None = None):
        if not files:
            raise ValueError("files: need at least one data file")
        missing = [str(f) for f in files if not Path(f).exists()]
        if missing:
            raise FileNotFoundError(f"files: not found: {missing}")
        if seq_len < 1:
            raise ValueError(f"seq_len: must be >= 1, got {seq_len}")
        if not 0 <= dp_rank < dp_world:
            raise ValueError(f"dp_rank: must be in [0, dp_world={dp_world}), got {dp_rank}")
        if strategy not in ("examples", "shards"):
            raise ValueError(f"strategy: 'examples' or 'shards', got {strategy!r}")
        if strategy == "shards" and len(files) % dp_world:
            raise ValueError(f"strategy='shards': {len(files)} files do not split evenly over dp_world={dp_world}; "
                             "use strategy='examples'")
        if eos_id is None:
            eos_id = getattr(tokenizer, "eos_token_id", None)
        if eos_id is None:
            raise ValueError("eos_id: required (the tokenizer has no eos_token_id)")
        if not drop_last and pad_id is None:
            pad_id = getattr(tokenizer, "pad_token_id", None)
            pad_id = eos_id if pad_id is None else pad_id
        self.files = [str(Path(f).resolve()) for f in files]
        self.data_format = data_format or infer_format(files)
        self.text_field = "text" if self.data_format == "text" else text_field
        self.tokenize = _as_tokenize_fn(tokenizer)
        self.seq_len, self.eos_id, self.pad_id = int(seq_len), int(eos_id), pad_id
        self.dp_rank, self.dp_world, self.strategy, self.drop_last = dp_rank, dp_world, strategy, drop_last
        self.row, self.offset, self.sequences = 0, 0, 0  # the position (see the module docstring)
        self.tokens_yielded = 0  # non-pad tokens yielded (for a tokens-based alpha schedule and logs)
        self.exhausted = False
        self._iter: Iterator[dict[str, torch.Tensor]] | None = None

    # ------------------------------------------------------------------------------------ reading

    def _rank_rows(self) -> Iterator[Any]:
        """This rank's rows in order, as HF ``datasets`` streams them."""
        import datasets
        from datasets.distributed import split_dataset_by_node
        ds = datasets.load_dataset(self.data_format, data_files=self.files, split="train", streaming=True)
        if self.dp_world > 1:
            ds = split_dataset_by_node(ds, rank=self.dp_rank, world_size=self.dp_world, strategy=self.strategy)
        for row in ds:
            if self.text_field not in row:
                raise KeyError(f"text_field: column {self.text_field!r} not in {sorted(row)}")
            yield row[self.text_field]

    def _generate(self) -> Iterator[dict[str, torch.Tensor]]:
        L = self.seq_len
        buf: list[int] = []
        spans: list[list[int]] = []  # [row index, tokens of that row still in buf], buf order
        for index, text in enumerate(self._rank_rows()):
            if index < self.row:
                continue  # before the position: read, not tokenized
            tokens = self.tokenize(str(text) if text is not None else "") + [self.eos_id]
            if index == self.row:
                tokens = tokens[self.offset:]
            buf.extend(tokens)
            spans.append([index, len(tokens)])
            while len(buf) >= L:
                seq, buf = buf[:L], buf[L:]
                self._advance(spans, L)
                yield self._emit(seq, L)
        if buf and not self.drop_last:
            n = len(buf)
            self._advance(spans, n)
            yield self._emit(buf + [self.pad_id] * (L - n), n)
        self.exhausted = True

    def _advance(self, spans: list[list[int]], n: int) -> None:
        """Move the position past ``n`` tokens at the front of the buffer."""
        while n:
            take = min(n, spans[0][1])
            spans[0][1] -= take
            n -= take
            self.offset += take
            if spans[0][1] == 0:
                spans.pop(0)
                self.row, self.offset = (spans[0][0], 0) if spans else (self.row + 1, 0)
        if spans and spans[0][0] != self.row:
            self.row, self.offset = spans[0][0], 0

    def _emit(self, seq: list[int], n_real: int) -> dict[str, torch.Tensor]:
        self.sequences += 1
        self.tokens_yielded += n_real
        ids = torch.tensor(seq, dtype=torch.long)
        labels = ids.clone()
        mask = torch.ones_like(ids)
        labels[n_real:] = -100
        mask[n_real:] = 0
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    # ------------------------------------------------------------------------------- iteration API

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._iter is None:
            self._iter = self._generate()
        return self._iter

    def __next__(self) -> dict[str, torch.Tensor]:
        return next(iter(self))

    def next_batch(self, batch_size: int) -> dict[str, torch.Tensor] | None:
        """``batch_size`` sequences stacked to ``[batch_size, seq_len]``, or None if fewer remain.

        A short final batch is not returned and the position stays after the sequences read.
        """
        items = []
        for _ in range(batch_size):
            try:
                items.append(next(self))
            except StopIteration:
                return None
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}

    # ---------------------------------------------------------------------------------- position

    def _split(self) -> dict[str, Any]:
        return {"files": self.files, "data_format": self.data_format, "text_field": self.text_field,
                "seq_len": self.seq_len, "eos_id": self.eos_id, "dp_rank": self.dp_rank,
                "dp_world": self.dp_world, "strategy": self.strategy}

    def state_dict(self) -> dict[str, Any]:
        """The position after the last sequence yielded, JSON-ready."""
        return {"version": STATE_VERSION, "row": self.row, "offset": self.offset, "sequences": self.sequences,
                "tokens": self.tokens_yielded, "exhausted": self.exhausted, **self._split()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; the files, ``seq_len``, EOS id and rank split must be the same."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"state: version {state.get('version')!r}, this code reads {STATE_VERSION}")
        mine = self._split()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            detail = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"state: the stream differs from the one saved, so the position means other tokens "
                             f"({detail})")
        self.row, self.offset = int(state["row"]), int(state["offset"])
        self.sequences, self.tokens_yielded = int(state["sequences"]), int(state["tokens"])
        self.exhausted = bool(state["exhausted"])
        self._iter = iter(()) if self.exhausted else None


def count_tokens(files: Sequence[str | os.PathLike], tokenizer, *, text_field: str = "text",
                 data_format: str | None = None, eos_id: int | None = None) -> int:
    """Tokens in the corpus (rows' tokens + one EOS each): one streaming pass, for ``tokens_per_epoch``."""
    stream = StreamingPackedDataset(files, tokenizer, 1, text_field=text_field, data_format=data_format,
                                    eos_id=eos_id if eos_id is not None else getattr(tokenizer, "eos_token_id", 0))
    return sum(len(stream.tokenize(str(t) if t is not None else "")) + 1 for t in stream._rank_rows())
