"""The backdoor experiment's stage specifications: the stand-in model (``ModelSpec``, size presets
``MODEL_SIZES``), a training stage (``StageSpec``, ``PretrainSpec``) and the evaluation (``EvalSpec``).
``experiment_config.ExperimentConfig`` holds one of each; every name is re-exported from ``experiment``.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, model_validator


MODEL_SIZES: dict[str, dict[str, int]] = {
    # layers x width; heads of 64 dimensions. "4x256" is the default stand-in (ModelSpec's own defaults).
    "4x256": {"n_layer": 4, "n_embd": 256, "n_head": 4},
    "6x384": {"n_layer": 6, "n_embd": 384, "n_head": 6},
    "8x512": {"n_layer": 8, "n_embd": 512, "n_head": 8},
}


class ModelSpec(BaseModel):
    """The stand-in model (GPT-2 layout) and its tokenizer, or a local HF checkpoint.

    ``{"size": "8x512"}`` fills ``n_layer``, ``n_embd``, ``n_head`` from ``MODEL_SIZES`` (keys given win); the
    name is not stored, so a preset and the same numbers spelled out are one config (and one cache key).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _expand_size(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "size" in data:
            data = dict(data)
            size = data.pop("size")
            if size not in MODEL_SIZES:
                raise ValueError(f"size: expected one of {', '.join(MODEL_SIZES)}, got {size!r}")
            data = {**MODEL_SIZES[size], **data}
        return data

    n_layer: int = Field(4, ge=1)
    n_embd: int = Field(256, ge=16)
    n_head: int = Field(4, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    vocab_size: int = Field(4096, ge=300, description="BPE vocabulary trained here (specials included).")
    max_len: int = Field(160, ge=16, description="Tokens per row (fixed-length padding).")
    max_src_tokens: int = Field(64, ge=4, description="Instruction tokens kept (its head).")
    checkpoint: str | None = Field(None, description="Local HF causal-LM folder: skip the stand-in pretraining.")


class StageSpec(BaseModel):
    """One training stage through the DeepSpeed engine (AdamW, linear warm-up, then linear decay to 0 or constant)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    epochs: int = Field(10, ge=1)
    lr: float = Field(5e-4, gt=0.0)
    batch_size: int = Field(16, ge=1)
    warmup_frac: float = Field(0.1, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    lr_schedule: Literal["decay", "constant"] = Field(
        "decay", description="After the warm-up: 'decay' (linear to 0 at the last step, DeepSpeed WarmupDecayLR) "
        "or 'constant' (lr held, DeepSpeed WarmupLR).")


class PretrainSpec(StageSpec):
    """The stand-in's pretraining: built-in code corpus + held-apart clean task rows."""

    corpus_functions: int = Field(2000, ge=0, description="Standard-library functions (train split only).")
    epochs: int = Field(4, ge=1)
    lr: float = Field(1e-3, gt=0.0)


class EvalSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    max_new_tokens: int = Field(128, ge=1)
    batch_size: int = Field(50, ge=1)
    epoch_eval_rows: int | None = Field(None, ge=1, description="Per-epoch eval on this many rows; last epoch: all.")
    test_rows: int | None = Field(None, ge=1, description="Cap on the clean test rows (and so the triggered ones).")
    valid_rows: int | None = Field(None, ge=1)
    codebleu: bool = True
