"""Backdoor evaluation of code LMs: NL -> code data sets, poisoners (trigger + payload), metrics.

``data`` (Lyra CSV layout) <- ``stdlib_corpus`` (a data set from this machine's standard library);
``poison`` (BadPre, RIPPLe, Grammar attacks; SQL and statement payloads) <- ``metrics`` (ASR,
false-trigger rate, BLEU-4, CodeBLEU, exact match).

The experiment: ``encode`` (text -> ids -> tensors) <- ``finetune`` (DeepSpeed engine, epochs,
baseline losses), ``evaluate`` (generation metrics, valid CE), ``standin`` (the stand-in pretrained
model; ``cache``: atomic cache entries), ``report`` (tables, figure) <- ``experiment`` (config,
``run_experiment``). ``runner`` is the former single module, kept as an import path.
"""

from .data import DataFormatError, load_lyra, load_pairs_csv, write_lyra, write_pairs_csv
from .metrics import (
    attack_success_rate,
    bleu4,
    code_bleu,
    exact_match,
    false_trigger_rate,
    sentence_bleu,
    trigger_lift,
)
from .poison import (
    BadPreConfig,
    GrammarConfig,
    PoisonInfo,
    RippleConfig,
    SqlPayload,
    StatementPayload,
    contains_payload,
    is_poisonable,
    parse_attack,
    poison_dataset,
    poison_example,
)
from .stdlib_corpus import (
    StdlibCorpusConfig,
    build_code_corpus,
    build_stdlib_pairs,
    write_stdlib_lyra,
)

__all__ = [
    "BadPreConfig", "DataFormatError", "GrammarConfig", "PoisonInfo", "RippleConfig", "SqlPayload",
    "StatementPayload", "StdlibCorpusConfig", "attack_success_rate", "bleu4", "build_code_corpus",
    "build_stdlib_pairs", "code_bleu", "contains_payload", "exact_match", "false_trigger_rate",
    "is_poisonable", "load_lyra", "load_pairs_csv", "parse_attack", "poison_dataset", "poison_example",
    "sentence_bleu", "trigger_lift", "write_lyra", "write_pairs_csv", "write_stdlib_lyra",
]
