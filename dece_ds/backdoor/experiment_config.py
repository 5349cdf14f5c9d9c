"""The backdoor experiment's configuration: ``ExperimentConfig`` (one pydantic model, every field named in the
errors it raises) and the run specs it holds (``parse_run``). ``experiment`` re-exports every name here.

A run spec is ``kind`` or ``kind:key=value,...`` (``"dece:alpha_base=0.95,ce_warmup_epochs=2"``); values are
read as JSON where they parse (numbers, booleans), else kept as strings (``alpha_base=auto``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from . import audit_run
from .audit_run import RETRAIN_KINDS
from .poison import parse_attack
from .specs import EvalSpec, ModelSpec, PretrainSpec, StageSpec

RUN_KINDS = ("clean", "ce", "dece", "ls", "gce", "intrust") + RETRAIN_KINDS
BASELINE_KINDS = ("ls", "gce", "intrust")
DEFAULT_STATEMENT_PAYLOAD = {"kind": "statement", "code": '__import__("os").system("id")'}


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    dataset: str = Field("stdlib", description="'stdlib' (built-in pairs), 'lyra' (the packaged Lyra CSVs) or a "
                                               "Lyra-layout folder.")
    stdlib_examples: int | None = Field(None, ge=10, description="Cap on the built-in pairs (all splits).")
    attack: dict = Field(default_factory=lambda: {"attack": "badpre", "rate": 0.05})
    finetune_rows: int | None = Field(None, ge=2, description="Train rows fine-tuned on; None: all.")
    pretrain_task_rows: int = Field(0, ge=0, description="Train rows held apart and pretrained on clean.")
    pretrain_task_from: Literal["after_finetune", "train_tail"] = Field(
        "after_finetune", description="Where the pretraining task rows come from: 'after_finetune' (the rows after "
        "the fine-tuning ones: disjoint sets) or 'train_tail' (the last rows of the train split, which the "
        "fine-tuning set may include, clean: the poison goes into its first rows and never into these).")
    runs: tuple[str, ...] = ("clean", "ce", "dece")
    audit_baselines: bool = Field(False, description="Every ce run also scores its training rows with the audit's "
                                  "baselines (CE loss, spectral signatures, n-gram naturalness; docs/audit.md); "
                                  "on whenever the runs include audit_retrain.")
    audit_from: str | None = Field(None, description="Retrain runs take the flagged rows from this audit.jsonl (or "
                                   "its folder) of an earlier run on the same rows, not from a dece run here.")
    auto_alpha_quantile: float = Field(
        0.1, gt=0.0, lt=1.0, description="dece runs with alpha_base 'auto': the quantile q of the stand-in's "
        "target-token probabilities that keeps half of CE's gradient (dece_ds.auto_alpha).")
    auto_alpha_final_half_point: float | None = Field(0.3, gt=0.0, lt=1.0, description="alpha_base 'auto': also cap "
                                                      "it so that p_half reaches this at the last epoch; None: off.")
    dece: dict = Field(default_factory=lambda: {"alpha_base": 0.99, "label_smoothing": 0.05},
                       description="Defaults of the dece runs (a DeceConfig section).")
    model: ModelSpec = Field(default_factory=ModelSpec)
    pretrain: PretrainSpec = Field(default_factory=PretrainSpec)
    finetune: StageSpec = Field(default_factory=StageSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    finetune_dropout: float | None = Field(
        None, ge=0.0, lt=1.0, description="Dropout while fine-tuning; None: the model's own.")
    seed: int = 0
    finetune_seed: int | None = Field(
        None, description="Seed of the fine-tuning batch order; None: seed. Varies the fine-tuning runs alone: "
                          "the stand-in (cached per seed) stays the same.")
    threads: int | None = Field(None, ge=1, description="torch.set_num_threads; None: leave as is.")
    cache_dir: str = "runs/backdoor/cache"
    name: str | None = Field(None, description="Results file stem; None: <dataset>-<attack>-<rate%>.")

    @field_validator("name")
    @classmethod
    def _name_stays_in_out(cls, v):
        from .report import check_stem
        return v if v is None else check_stem(v)  # the results files are <out>/<name>.json/.md/.png

    @field_validator("attack")
    @classmethod
    def _attack_parses(cls, v):
        parse_attack(v)  # names the bad attack field now, not after the stand-in's pretraining
        return v

    @field_validator("runs")
    @classmethod
    def _known_runs(cls, v):
        for spec in v:
            parse_run(spec)
        if len(set(v)) != len(v):
            raise ValueError(f"runs: duplicates in {v}")
        return v

    @model_validator(mode="after")
    def _retrain_has_an_audit(self):
        audit_run.check_retrain_has_an_audit([parse_run(spec)[0] for spec in self.runs], self.audit_from)
        return self

    def attack_config(self):
        attack = dict(self.attack)
        if self.dataset == "stdlib":
            attack.setdefault("payload", DEFAULT_STATEMENT_PAYLOAD)
        return parse_attack(attack)

    def dataset_name(self) -> str:
        return "stdlib" if self.dataset == "stdlib" else Path(self.dataset).name

    def dataset_folder(self) -> Path:
        """The Lyra-layout folder read (the packaged one for ``"lyra"``); not for ``"stdlib"``."""
        from .datasets import dataset_folder
        return dataset_folder(self.dataset)

    def stem(self) -> str:
        if self.name:
            return self.name
        a = self.attack_config()
        return f"{self.dataset_name()}-{a.attack}-{_fmt_rate(a.rate)}"


def _fmt_rate(rate: float) -> str:
    pct = 100.0 * rate
    return str(int(round(pct))) if abs(pct - round(pct)) < 1e-9 else f"{pct:g}"


def parse_run(spec: str) -> tuple[str, dict[str, Any]]:
    """``"dece:alpha_base=0.95,ce_warmup_epochs=2"`` -> ``("dece", {"alpha_base": 0.95, ...})``."""
    kind, _, rest = spec.partition(":")
    if kind not in RUN_KINDS:
        raise ValueError(f"run {spec!r}: kind must be one of {RUN_KINDS}, got {kind!r}")
    params: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"run {spec!r}: expected key=value, got {item!r}")
        try:
            params[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            params[key.strip()] = value
    return kind, params
