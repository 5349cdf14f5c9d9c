"""The stand-in pretrained code LM: a small GPT-2, its byte-level BPE, pretrained here and cached.

What it is trained on: the built-in code corpus (standard-library functions, every token) plus the
held-apart clean task rows (target tokens only), so it knows the task's domain before fine-tuning (as
CodeLlama knows SQL-in-Python). The tokenizer sees that text and the clean fine-tuning set, never
valid/test. ``model.checkpoint`` (a local HF folder) replaces all of it by that model and its tokenizer.

The cache: ``<cache_dir>/standin-<key>/`` holds ``model.safetensors`` (weights only: loading it runs no
code, unlike a pickle), ``tokenizer.json``, ``info.json`` and ``complete.json`` (written last; see
``cache.py``: entries are published by one atomic rename, a racer with the same key uses the
winner's). ``key`` hashes everything the stand-in depends on (``stand_in_key``); it is the key of the
earlier ``model.pt`` entries, which are now rebuilt once (a pickle is never loaded).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from . import cache
from .encode import Tokenizer, checkpoint_tokenizer, concat, encode_corpus, encode_pairs, load_bpe, train_bpe
from .finetune import make_engine, steps_per_epoch, train_epoch

if TYPE_CHECKING:
    from .experiment import ExperimentConfig, ModelSpec

WEIGHTS, TOKENIZER, INFO = "model.safetensors", "tokenizer.json", "info.json"


def build_model(spec: ModelSpec, vocab_size: int, seed: int):
    """GPT-2 of ``spec``'s size (vocabulary rounded up to a multiple of 64), or ``spec.checkpoint``."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    if spec.checkpoint:
        return AutoModelForCausalLM.from_pretrained(spec.checkpoint, local_files_only=True)
    cfg = GPT2Config(vocab_size=64 * math.ceil(vocab_size / 64), n_positions=spec.max_len + 8,
                     n_embd=spec.n_embd, n_layer=spec.n_layer, n_head=spec.n_head,
                     resid_pdrop=spec.dropout, embd_pdrop=spec.dropout, attn_pdrop=spec.dropout,
                     bos_token_id=0, eos_token_id=0, pad_token_id=1)
    return GPT2LMHeadModel(cfg)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def stand_in_key(cfg: ExperimentConfig, n_corpus: int) -> str:
    """The cache key: model, pretraining stage, data set (``dataset_key``), data selection, seed, corpus size.
    Unchanged since v2 for every config that ran before (the packaged Lyra keeps its old folder's key)."""
    pt = cfg.pretrain
    # lr_schedule joined the key only when not the default, so stand-ins cached before it existed stay valid.
    pt_key = pt.model_dump(exclude={"lr_schedule"} if pt.lr_schedule == "decay" else None)
    return _hash({"model": cfg.model.model_dump(), "pretrain": pt_key, "dataset": dataset_key(cfg.dataset),
                  "stdlib_examples": cfg.stdlib_examples, "finetune_rows": cfg.finetune_rows,
                  "held": cfg.pretrain_task_rows, "held_from": cfg.pretrain_task_from, "seed": cfg.seed,
                  "n_corpus": n_corpus, "v": 2})


# The packaged Lyra's identity in the key: the path the committed Lyra results (settings B-D) were cached
# under, so their keys stay what those results record. Any folder holding the same three files maps to it.
LYRA_KEY = "../shared/data/lyra"


def dataset_key(dataset: str) -> str:
    """The data set as the cache key names it: ``"stdlib"``; for ``"lyra"`` or any folder whose train/valid/test
    files are byte-identical to the packaged Lyra, ``LYRA_KEY`` (so ``--dataset lyra`` and a copy's path share
    one stand-in); any other folder: its path as given (as before)."""
    from .datasets import content_digest
    if dataset == "stdlib":
        return dataset
    if dataset == "lyra":
        return LYRA_KEY
    try:
        same = content_digest(dataset) == _packaged_lyra_digest()
    except OSError:  # not a readable Lyra-layout folder: the run fails later, naming it
        same = False
    return LYRA_KEY if same else dataset


def _packaged_lyra_digest() -> str:
    from .datasets import builtin_folder, content_digest
    global _LYRA_DIGEST
    if _LYRA_DIGEST is None:
        _LYRA_DIGEST = content_digest(builtin_folder("lyra"))
    return _LYRA_DIGEST


_LYRA_DIGEST: str | None = None


def stand_in_folder(cfg: ExperimentConfig, n_corpus: int) -> Path:
    return Path(cfg.cache_dir) / f"standin-{stand_in_key(cfg, n_corpus)}"


def save_stand_in(folder: Path, model, tok: Tokenizer, info: dict) -> None:
    from safetensors.torch import save_model
    save_model(model, str(folder / WEIGHTS))  # tied weights (lm_head = wte) stored once
    tok.save(folder / TOKENIZER)
    (folder / INFO).write_text(json.dumps(info, indent=2))


def load_stand_in(folder: Path, spec: ModelSpec, seed: int) -> tuple[Any, Tokenizer, dict]:
    """A cached stand-in: model (weights through safetensors' ``load_file``, strict but for tied weights),
    tokenizer, info."""
    from safetensors.torch import load_model
    tok = load_bpe(folder / TOKENIZER)
    model = build_model(spec, tok.vocab_size, seed)
    load_model(model, str(folder / WEIGHTS))
    return model, tok, json.loads((folder / INFO).read_text())


def pretrain_stand_in(cfg: ExperimentConfig, finetune, held, log: Callable[[str], None]) -> tuple[Any, Tokenizer, dict]:
    """The stand-in pretrained model and tokenizer (cached), and a record of how they were made."""
    from .stdlib_corpus import build_code_corpus
    spec, pt = cfg.model, cfg.pretrain
    if spec.checkpoint:
        return build_model(spec, 0, cfg.seed), checkpoint_tokenizer(spec.checkpoint), {"checkpoint": spec.checkpoint}
    corpus = build_code_corpus(max_functions=pt.corpus_functions) if pt.corpus_functions else []
    folder = stand_in_folder(cfg, len(corpus))
    if cache.is_complete(folder):
        log(f"stand-in pretrained model from cache {folder}")
        return load_stand_in(folder, spec, cfg.seed)
    t0 = time.time()
    # The tokenizer sees the pretraining text and the (clean) fine-tuning set, never valid/test.
    tok = train_bpe(list(corpus) + [r["src"] for d in (held, finetune) for r in d]
                    + [r["tgt"] for d in (held, finetune) for r in d], spec.vocab_size)
    model = build_model(spec, tok.vocab_size, cfg.seed)
    data = concat(encode_corpus(tok, corpus, spec), encode_pairs(tok, list(held), spec))
    n = data["input_ids"].shape[0]
    info = {"corpus_functions": len(corpus), "held_apart_task_rows": len(held), "rows": n,
            "epochs": pt.epochs, "lr": pt.lr, "cache": str(folder)}
    log(f"pretraining the stand-in: {len(corpus)} code-corpus functions + {len(held)} held-apart clean task "
        f"rows = {n} rows of {spec.max_len} tokens, {pt.epochs} epochs")
    engine = make_engine(model, pt, steps_per_epoch(n, pt.batch_size) * pt.epochs)
    losses = [train_epoch(engine, data, pt.batch_size, cfg.seed, e, f"pretrain {e}/{pt.epochs}")
              for e in range(1, pt.epochs + 1)]
    info.update(train_loss=losses, wall_time_s=time.time() - t0)
    model = engine.module
    model.eval()
    if not cache.publish(folder, lambda tmp: save_stand_in(tmp, model, tok, info)):
        log(f"another run cached this stand-in first: using its copy {folder}")
        return load_stand_in(folder, spec, cfg.seed)
    return model, tok, info
