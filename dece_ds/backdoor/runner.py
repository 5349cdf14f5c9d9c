"""The backdoor experiment's former single module, kept as an import path: every name it defined is
re-exported from the module that now owns it. New code imports from those modules:

- ``experiment``: ``ExperimentConfig`` and its specs, ``parse_run``, ``load_task``, ``run_experiment``
- ``encode``: the ``Tokenizer`` interface, BPE training / loading, pairs and corpus -> tensors
- ``standin``: the stand-in model, its pretraining and its cache (``cache``: atomic entries)
- ``finetune``: the DeepSpeed engine and its config, training epochs, baseline loss hooks
- ``evaluate``: generation metrics and validation cross-entropy
"""

from .encode import (
    EOS,
    IGNORE,
    PAD,
    SEP,
    Tokenizer,
    _wrap_hf_tokenizers,
    checkpoint_tokenizer,
    encode_corpus,
    encode_pairs,
    load_bpe,
    prompt_ids,
    train_bpe,
)
from .encode import concat as _concat
from .evaluate import EvalSets, evaluate, valid_ce
from .experiment import (
    DEFAULT_STATEMENT_PAYLOAD,
    RUN_KINDS,
    EvalSpec,
    ExperimentConfig,
    ModelSpec,
    PretrainSpec,
    StageSpec,
    _fmt_rate,
    load_task,
    parse_run,
    run_experiment,
    versions,
    write_outputs,
)
from .finetune import (
    _current_alpha,
    _free_port,
    _scheduler,
    baseline_loss_hook,
    ds_config,
    ensure_distributed,
    make_engine,
    steps_per_epoch,
    train_epoch,
)
from .progress import progress as _progress
from .standin import _hash, build_model, pretrain_stand_in

__all__ = [
    "DEFAULT_STATEMENT_PAYLOAD", "EOS", "IGNORE", "PAD", "RUN_KINDS", "SEP", "EvalSets", "EvalSpec",
    "ExperimentConfig", "ModelSpec", "PretrainSpec", "StageSpec", "Tokenizer", "baseline_loss_hook",
    "build_model", "checkpoint_tokenizer", "ds_config", "encode_corpus", "encode_pairs", "ensure_distributed",
    "evaluate", "load_bpe", "load_task", "make_engine", "parse_run", "pretrain_stand_in", "prompt_ids",
    "run_experiment", "steps_per_epoch", "train_bpe", "train_epoch", "valid_ce", "versions", "write_outputs",
]
