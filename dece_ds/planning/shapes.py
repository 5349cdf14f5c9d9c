"""Model shapes for the planner: a built-in table of public code models, or a local HF ``config.json``.

The table is written from the models' published ``config.json`` files (no downloads here). Parameter
counts derived from it match the model cards: StarCoder2 3.03B / 7.17B / 15.96B (3B and 7B tie the
head to the embedding, 15B does not), CodeLlama 6.74B / 13.0B / 33.7B, Qwen2.5-Coder 7.62B / 32.8B
(``tests/planning`` checks these totals).

Architecture flags decide the parameter count and the activation count:
    gated_mlp   SwiGLU (gate, up, down: 3 matrices) vs GELU MLP (c_fc, c_proj: 2 matrices)
    qkv_bias    q/k/v projections carry biases (Qwen2)
    all_bias    every linear and norm carries a bias (StarCoder2)
    norm        "rms" (one weight vector) or "layer" (weight and bias)
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    tie_embeddings: bool
    gated_mlp: bool = True
    qkv_bias: bool = False
    all_bias: bool = False
    norm: str = "rms"
    head_dim: int | None = None  # default hidden_size // num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_size

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_size

    # parameter counts, split by how tensor parallelism treats them --------------------------------
    def layer_params(self) -> dict[str, int]:
        """One decoder layer: ``tp`` (linear weights split by TP) and ``replicated`` (norms, and the
        biases of row-parallel layers, which every rank keeps)."""
        h, i = self.hidden_size, self.intermediate_size
        attn = h * self.q_size + 2 * h * self.kv_size + self.q_size * h
        mlp = (3 if self.gated_mlp else 2) * h * i
        split_bias = 0
        if self.qkv_bias or self.all_bias:
            split_bias += self.q_size + 2 * self.kv_size
        if self.all_bias:
            split_bias += i if not self.gated_mlp else 2 * i
        norm = (2 if self.norm == "layer" else 1) * h
        replicated = 2 * norm + (2 * h if self.all_bias else 0)  # two norms; o_proj and down biases
        return {"tp": attn + mlp + split_bias, "replicated": replicated}

    def params(self) -> dict[str, int]:
        """The whole model: ``embedding``, ``lm_head`` (0 when tied), ``layers_tp``, ``replicated``."""
        layer = self.layer_params()
        final_norm = (2 if self.norm == "layer" else 1) * self.hidden_size
        embedding = self.vocab_size * self.hidden_size
        return {"embedding": embedding, "lm_head": 0 if self.tie_embeddings else embedding,
                "layers_tp": self.num_layers * layer["tp"],
                "replicated": self.num_layers * layer["replicated"] + final_norm}

    def total_params(self) -> int:
        return sum(self.params().values())

    def as_dict(self) -> dict:
        return asdict(self)


def _llama(name, h, layers, heads, kv, inter, vocab, tie=False, **kw) -> ModelShape:
    return ModelShape(name, h, layers, heads, kv, inter, vocab, tie, **kw)


def _starcoder2(name, h, layers, heads, kv, inter, tie) -> ModelShape:
    return ModelShape(name, h, layers, heads, kv, inter, 49152, tie, gated_mlp=False, all_bias=True, norm="layer")


BUILTIN_SHAPES: dict[str, ModelShape] = {s.name: s for s in [
    _starcoder2("starcoder2-3b", 3072, 30, 24, 2, 12288, tie=True),
    _starcoder2("starcoder2-7b", 4608, 32, 36, 4, 18432, tie=True),
    _starcoder2("starcoder2-15b", 6144, 40, 48, 4, 24576, tie=False),
    _llama("codellama-7b", 4096, 32, 32, 32, 11008, 32016),
    _llama("codellama-13b", 5120, 40, 40, 40, 13824, 32016),
    _llama("codellama-34b", 8192, 48, 64, 8, 22016, 32000),
    _llama("qwen2.5-coder-7b", 3584, 28, 28, 4, 18944, 152064, qkv_bias=True),
    _llama("qwen2.5-coder-32b", 5120, 64, 40, 8, 27648, 152064, qkv_bias=True),
]}

ALIASES = {"bigcode/starcoder2-3b": "starcoder2-3b", "bigcode/starcoder2-7b": "starcoder2-7b",
           "bigcode/starcoder2-15b": "starcoder2-15b", "codellama/codellama-7b-hf": "codellama-7b",
           "codellama/codellama-13b-hf": "codellama-13b", "codellama/codellama-34b-hf": "codellama-34b",
           "qwen/qwen2.5-coder-7b": "qwen2.5-coder-7b", "qwen/qwen2.5-coder-32b": "qwen2.5-coder-32b"}

GELU_MODEL_TYPES = {"starcoder2", "gpt_bigcode", "gpt2", "gpt_neox", "phi"}


def shape_from_hf_config(config: dict, name: str = "config.json") -> ModelShape:
    """A ``ModelShape`` from the fields of an HF ``config.json`` (Llama/Qwen2/Mistral/StarCoder2 keys)."""
    def count(key, value):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: {key}: expected an integer >= 1, got {value!r}")
        return value

    def need(*keys):
        for k in keys:
            if config.get(k) is not None:
                return count(k, config[k])
        raise ValueError(f"{name}: none of {list(keys)} in the config (keys: {sorted(config)})")

    def optional(*keys):
        for k in keys:
            if config.get(k) is not None:
                return count(k, config[k])
        return None

    model_type = config.get("model_type", "")
    h = need("hidden_size", "n_embd")
    heads = need("num_attention_heads", "n_head")
    gated = model_type not in GELU_MODEL_TYPES
    inter = optional("intermediate_size", "n_inner") or 4 * h
    starcoder_like = model_type in ("starcoder2", "gpt_bigcode", "gpt2")
    return ModelShape(
        name=name, hidden_size=h, num_layers=need("num_hidden_layers", "n_layer"), num_heads=heads,
        num_kv_heads=optional("num_key_value_heads") or heads, intermediate_size=inter,
        vocab_size=need("vocab_size"), tie_embeddings=bool(config.get("tie_word_embeddings", True)),
        gated_mlp=gated, qkv_bias=bool(config.get("attention_bias", model_type == "qwen2")),
        all_bias=bool(config.get("use_bias", starcoder_like)),
        norm="layer" if starcoder_like or model_type in ("gpt_neox", "phi") else "rms",
        head_dim=optional("head_dim"))


def resolve_shape(model: str | os.PathLike) -> ModelShape:
    """A built-in name (or its hub id), a ``config.json`` path, or a folder holding one.

    Raises ``ValueError`` naming the model or file: an unknown name, a folder without ``config.json``, a
    ``.json`` that is missing, unreadable or not a JSON object (``dece_ds.config.read_json_object``), a
    config whose sizes are missing or not integers >= 1."""
    key = str(model).lower()
    key = ALIASES.get(key, key)
    if key in BUILTIN_SHAPES:
        return BUILTIN_SHAPES[key]
    from ..config import read_json_object
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"model: {model}: a folder without a config.json")
    if path.is_file() or path.suffix == ".json":  # a .json that is missing or unreadable: say which
        shape = shape_from_hf_config(read_json_object(path, "a Hugging Face model config"), name=str(model))
        return replace(shape, name=Path(model).name if Path(model).name != "config.json" else Path(model).parent.name
                       or "config.json")
    raise ValueError(f"model: {model!r} is neither a built-in shape ({', '.join(BUILTIN_SHAPES)}) nor a "
                     "config.json file or folder")
