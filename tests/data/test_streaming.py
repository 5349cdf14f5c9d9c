"""StreamingPackedDataset: packing against a hand-built stream, rank sharding (disjoint, covering), exact
resume from a JSON round-tripped position, for jsonl, parquet and text shards."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from dece_ds.data import StreamingPackedDataset

EOS = 0


def row_tokenizer(text: str) -> list[int]:
    """'7 7 7' -> [7, 7, 7]: every token names its row, so coverage can be checked token by token."""
    return [int(w) for w in text.split()]


def row_text(i: int) -> str:
    return " ".join([str(i + 1)] * (1 + (i * 7) % 11))  # ids from 1 (0 is EOS), lengths 1..11


def write_corpus(tmp_path, fmt: str, n_rows: int = 60, n_files: int = 3):
    """``n_files`` shards holding rows 0..n_rows-1 in order; the expected full token stream."""
    files, stream = [], []
    per_file = -(-n_rows // n_files)
    for f in range(n_files):
        rows = list(range(f * per_file, min(n_rows, (f + 1) * per_file)))
        texts = [row_text(i) for i in rows]
        for t in texts:
            stream += row_tokenizer(t) + [EOS]
        if fmt == "jsonl":
            path = tmp_path / f"shard{f}.jsonl"
            path.write_text("".join(json.dumps({"content": t, "id": i}) + "\n" for t, i in zip(texts, rows)))
        elif fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq
            path = tmp_path / f"shard{f}.parquet"
            pq.write_table(pa.table({"content": texts, "id": rows}), path)
        else:
            path = tmp_path / f"shard{f}.txt"
            path.write_text("".join(t + "\n" for t in texts))
        files.append(path)
    return files, stream


def make(files, fmt, seq_len=8, **kw):
    field = {} if fmt == "text" else {"text_field": "content"}
    return StreamingPackedDataset(files, row_tokenizer, seq_len, eos_id=EOS, **field, **kw)


def ids(stream, n=None):
    out = []
    for item in stream:
        out.append(item["input_ids"].tolist())
        if n is not None and len(out) == n:
            break
    return out


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "text"])
def test_single_rank_packs_the_concatenated_stream(tmp_path, fmt):
    files, stream = write_corpus(tmp_path, fmt)
    L = 8
    expected = [stream[i * L:(i + 1) * L] for i in range(len(stream) // L)]
    s = make(files, fmt, seq_len=L)
    got = ids(s)
    assert got == expected
    assert s.exhausted and s.tokens_yielded == len(expected) * L
    item = next(iter(make(files, fmt, seq_len=L)))
    assert item["labels"].tolist() == item["input_ids"].tolist() and item["attention_mask"].all()


@pytest.mark.parametrize("strategy,world", [("examples", 2), ("examples", 4), ("shards", 3)])
def test_ranks_are_disjoint_and_cover_the_corpus(tmp_path, strategy, world):
    files, stream = write_corpus(tmp_path, "jsonl", n_rows=61, n_files=3)
    rows_of_rank, tokens = [], Counter()
    for rank in range(world):
        s = make(files, "jsonl", seq_len=8, dp_rank=rank, dp_world=world, strategy=strategy, drop_last=False,
                 pad_id=-1)
        seqs = ids(s)
        assert seqs and all(len(q) == 8 for q in seqs)
        flat = [t for q in seqs for t in q if t != -1]
        assert -1 not in [t for q in seqs[:-1] for t in q]  # only the last sequence is padded
        rows_of_rank.append({t for t in flat if t != EOS})
        tokens.update(flat)
    for a in range(world):
        for b in range(a + 1, world):
            assert not rows_of_rank[a] & rows_of_rank[b], f"ranks {a} and {b} share rows"
    assert tokens == Counter(stream)  # every token of the corpus, exactly once


def test_shards_strategy_refuses_uneven_files(tmp_path):
    files, _ = write_corpus(tmp_path, "jsonl", n_files=3)
    with pytest.raises(ValueError, match="do not split evenly"):
        make(files, "jsonl", dp_rank=0, dp_world=2, strategy="shards")


@pytest.mark.parametrize("fmt,world,k", [("jsonl", 1, 5), ("parquet", 2, 7), ("text", 3, 3), ("jsonl", 2, 0)])
def test_exact_resume(tmp_path, fmt, world, k):
    files, _ = write_corpus(tmp_path, fmt)
    L = 5  # rows of 2..12 tokens: positions land inside rows and on row boundaries
    for rank in range(world):
        full = ids(make(files, fmt, seq_len=L, dp_rank=rank, dp_world=world))
        first = make(files, fmt, seq_len=L, dp_rank=rank, dp_world=world)
        head = ids(first, k) if k else []
        state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint's client_state holds
        assert state["sequences"] == k
        resumed = make(files, fmt, seq_len=L, dp_rank=rank, dp_world=world)
        resumed.load_state_dict(state)
        assert head + ids(resumed) == full
        assert resumed.tokens_yielded == len(full) * L


def test_resume_many_cut_points_and_batches(tmp_path):
    files, _ = write_corpus(tmp_path, "jsonl", n_rows=40)
    full = ids(make(files, "jsonl", seq_len=7))
    for k in range(0, len(full), 3):
        s = make(files, "jsonl", seq_len=7)
        for _ in range(k // 3):
            assert s.next_batch(3)["input_ids"].shape == (3, 7)
        r = make(files, "jsonl", seq_len=7)
        r.load_state_dict(s.state_dict())
        assert ids(r) == full[k:], f"cut after {k} sequences"


def test_state_of_another_split_is_refused(tmp_path):
    files, _ = write_corpus(tmp_path, "jsonl")
    s = make(files, "jsonl", dp_rank=0, dp_world=2)
    ids(s, 2)
    other = make(files, "jsonl", dp_rank=1, dp_world=2)
    with pytest.raises(ValueError, match="dp_rank: saved 0, now 1"):
        other.load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="seq_len"):
        make(files, "jsonl", seq_len=9, dp_world=2).load_state_dict(s.state_dict())


def test_exhausted_state_stays_exhausted(tmp_path):
    files, _ = write_corpus(tmp_path, "jsonl", n_rows=10)
    s = make(files, "jsonl")
    ids(s)
    r = make(files, "jsonl")
    r.load_state_dict(s.state_dict())
    assert ids(r) == [] and r.next_batch(1) is None


def test_hf_tokenizer_is_accepted(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<eos>": 0, **{str(i): i for i in range(1, 100)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<eos>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")
    files, stream = write_corpus(tmp_path, "jsonl", n_rows=20)
    s = StreamingPackedDataset(files, hf, 8, text_field="content")
    assert ids(s) == [stream[i * 8:(i + 1) * 8] for i in range(len(stream) // 8)]
