"""Tokenizer, model and engine for the recipes; the export of the trained weights.

Models: a local HF folder, or a named tiny Llama (``TINY_MODELS``) with a byte-level BPE tokenizer
trained on the training text (no downloads anywhere). Under ZeRO-3 the model is built through HF's
zero.Init path (``HfDeepSpeedConfig``), which initialises the partitioned weights.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.distributed as dist

from ..config import DeceConfig
from .runtime import is_main

TINY_MODELS = {
    "tiny-llama": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2),
    "tiny-llama-128": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2),
}
EOS, PAD = "<|endoftext|>", "<|pad|>"


def build_tokenizer(model: str, tokenizer: str | None, vocab_size: int, texts: Callable[[], Iterable[str]],
                    out: Path):
    """Rank 0 makes (or copies) the tokenizer into ``out/tokenizer``; every rank loads that copy.

    ``tokenizer`` (a local folder) or a local ``model`` folder gives it; for a tiny model a BPE of
    ``vocab_size`` is trained on ``texts()`` (called on rank 0 only).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from ..data.tokenizer import train_bpe_tokenizer
    tok_dir = out / "tokenizer"
    if is_main() and not (tok_dir / "tokenizer.json").exists():
        source = tokenizer or (model if model not in TINY_MODELS else None)
        if source:
            tok = AutoTokenizer.from_pretrained(source, local_files_only=True)
        else:
            bpe = train_bpe_tokenizer(texts(), vocab_size, [EOS, PAD])
            tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=PAD)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.save_pretrained(tok_dir)
    if dist.is_initialized():
        dist.barrier()
    return AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)


def build_model(model: str, ds_config: Mapping[str, Any], vocab_size: int, seq_len: int, seed: int):
    """(model, HF ZeRO-3 config to keep alive while training, whether it was built from scratch)."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.integrations import HfDeepSpeedConfig
    hf_ds = None
    if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        # Keeps HF's ZeRO-3 mode on while the model is built: weights are created partitioned and then
        # initialised gathered. A bare `with deepspeed.zero.Init(): from_config(...)` skips HF's
        # _init_weights (torch defaults remain).
        hf_ds = HfDeepSpeedConfig(dict(ds_config))
    torch.manual_seed(seed)
    if model in TINY_MODELS:
        padded = 64 * math.ceil(vocab_size / 64)  # even vocabulary shards for TP
        cfg = LlamaConfig(vocab_size=padded, max_position_embeddings=seq_len, tie_word_embeddings=False,
                          **TINY_MODELS[model])
        return AutoModelForCausalLM.from_config(cfg), hf_ds, True
    return AutoModelForCausalLM.from_pretrained(model, local_files_only=True), hf_ds, False


def build_engine(model_name: str, ds_config: Mapping[str, Any], dece: DeceConfig, *, vocab_size: int,
                 seq_len: int, seed: int, lr: float, gradient_checkpointing: bool = False):
    """The model wrapped by ``dece_ds.initialize`` with the already validated ``dece`` section:
    (engine, HF ZeRO-3 config to keep alive while training, whether the model was built from scratch)."""
    from ..integrations.deepspeed import initialize
    model, hf_ds, from_scratch = build_model(model_name, ds_config, vocab_size, seq_len, seed)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    optimizer = None if "optimizer" in ds_config else torch.optim.AdamW(model.parameters(), lr=lr)
    engine, _, _, _ = initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                 optimizer=optimizer, config=dict(ds_config), dece_config=dece)
    return engine, hf_ds, from_scratch


def export_safetensors(engine, tok, out: Path) -> Path | None:
    """Full weights (ZeRO-3 partitions and TP shards gathered) as ``out/export/model.safetensors``."""
    from safetensors.torch import save_file
    partitioned = engine.zero_optimization_partition_weights() or engine.autotp_size() > 1
    state = engine._consolidated_16bit_state_dict() if partitioned else engine.module.state_dict()
    if not is_main():
        return None
    path = out / "export"
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()},
              str(path / "model.safetensors"), metadata={"format": "pt"})
    engine.module.config.save_pretrained(path)
    tok.save_pretrained(path)
    return path
