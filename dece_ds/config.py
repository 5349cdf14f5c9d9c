"""DeceConfig: the validated ``"dece"`` section of a DeepSpeed JSON config.

Every field has its bounds here; cross-field rules live in one ``model_validator``. Errors name the
field and the bad value (pydantic's own messages do, and ours follow the same form), so a bad section
fails before any engine or process-group work.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

from pydantic import (BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, ValidationInfo, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

DS_SECTION = "dece"

Schedule = Literal["epoch", "continuous", "constant"]
Reduction = Literal["mean", "sum", "none"]

# Named settings: a preset fills the fields its section does not set; fields set explicitly win.
PRESETS: dict[str, dict[str, Any]] = {
    # The released code's defaults (arXiv 2407.08956).
    "paper": {"alpha_base": 0.99, "label_smoothing": 0.05, "prob_floor": 1e-7, "schedule": "epoch"},
    # The alpha_base chosen by the backdoor evaluation: see docs/backdoor.md ("What was chosen, and why").
    "backdoor_guard": {"alpha_base": 0.97, "label_smoothing": 0.05, "prob_floor": 1e-7, "schedule": "epoch"},
}
Preset = Literal[tuple(PRESETS)]  # the names above, nothing else

AlphaBase = Annotated[float, Field(gt=0.0, le=1.0)]
_ALPHA_BASE = TypeAdapter(AlphaBase, config=ConfigDict(strict=True))
# "auto" is measured from the model before training (dece_ds.auto_alpha); nothing trains on it unresolved.
ALPHA_AUTO_UNRESOLVED = ('dece.alpha_base: "auto" must be resolved before training '
                         '(dece_ds.auto_alpha.resolve_alpha_base)')


class DeceConfigError(ValueError):
    """A ``dece`` section that does not validate; the message names each bad field and value."""


class AuditConfig(BaseModel):
    """The poison audit's training-time recorder (``dece_ds.audit``; docs/audit.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    enabled: bool = Field(False, description="Record per-row log p_t of every trained token.")
    out: str = Field("audit", min_length=1, description="Folder of the rank-local record files (audit/rank00000.jsonl).")


class DeceConfig(BaseModel):
    """Settings of the DeCE loss and its alpha schedule.

    ``alpha = alpha_base ** e`` with ``e`` the epoch counted from 1 (``schedule="epoch"``), or
    ``e = 1 + step / steps_per_epoch`` (``"continuous"``), or ``alpha = alpha_base`` (``"constant"``);
    never below ``alpha_min``.
    """

    # strict: JSON true is not 1.0 and "yes" is not a bool (ints still pass as floats)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    enabled: bool = Field(
        True, description="Use DeCE; false leaves the pipeline's own loss untouched. In a DeepSpeed config: no "
                          "'dece' section = disabled, \"dece\": {} = enabled with these defaults, \"dece\": null "
                          "(or any non-object) = an error.")
    label_smoothing: float = Field(
        0.05, ge=0.0, lt=1.0,
        description="epsilon: the target keeps 1-eps, every other token gets eps/(V-1).")
    alpha_base: AlphaBase | Literal["auto"] = Field(
        0.99, description="alpha = alpha_base ** e; 1 gives label-smoothed CE. \"auto\": set before training from the "
                          "model's target-token probabilities and the run's epochs (dece_ds.auto_alpha.resolve_alpha_base).")
    schedule: Schedule = Field(
        "epoch", description="epoch: e = epoch from 1; continuous: e = 1 + step/steps_per_epoch; "
                             "constant: alpha = alpha_base.")
    steps_per_epoch: int | None = Field(
        None, ge=1, description="Optimizer steps per epoch; drives the epoch and continuous schedules.")
    prob_floor: float = Field(
        1e-7, ge=0.0, lt=1.0,
        description="softmax probabilities are clamped to >= prob_floor (released code: 1e-7; 0: exact).")
    ignore_index: int = Field(-100, description="Targets equal to this contribute no loss and no gradient.")
    reduction: Reduction = Field("mean", description="mean over non-ignored tokens, sum, or none.")
    chunk_size: int | None = Field(
        None, ge=1, description="Tokens per chunk of the fused loss; None picks one from the vocab size.")
    chunk_budget_mib: float | None = Field(
        None, gt=0.0, allow_inf_nan=False,
        description="MiB of [chunk, V] scratch that set the tokens per chunk (dece_ds.ops.chunk_budget); None: 16 "
                    "unfused, 128 fused (its logits; visits of the chunk add at most 16), bounded independently of "
                    "V. chunk_size wins when set.")
    z_loss: float = Field(
        0.0, ge=0.0, allow_inf_nan=False,
        description="PaLM z-loss: z_loss * lse^2 per token added to the loss (lse = log-sum-exp of the logits), "
                    "averaged like the loss. 0: off.")
    logit_softcap: float | None = Field(
        None, gt=0.0, allow_inf_nan=False,
        description="Gemma-2 soft-capping: logits -> cap * tanh(logits / cap) before the loss. None: off. The fused "
                    "hook takes a model's final_logit_softcapping by itself.")
    backend: Literal["eager", "compile"] = Field(
        "eager", description="eager: the loss's chunk stages as torch ops; compile: each stage one fused kernel "
                             "through torch.compile (C++ on CPU, Triton on GPU; the first step compiles, and a "
                             "C++ compiler must be installed). Same values to float rounding (dece_ds.ops.compiled).")
    fused_linear: bool = Field(
        False, description="Compute the loss from hidden states and the lm_head weight, never the full logits.")
    fused_weight_grad_walk: Literal["auto", "rows", "vocab"] = Field(
        "auto", description="How fused_linear forms the head's weight gradient: rows (every token chunk adds into "
                            "one fp32 [V, H] accumulator), vocab (the logits recomputed block by block of the "
                            "vocabulary, each gradient block written once in the weight's dtype) or auto (vocab "
                            "when the chunks are shorter than 128 tokens, or for a bf16 / fp16 head whose fp32 "
                            "accumulator would exceed its own gradient by more than the chunk budget; "
                            "dece_ds.ops.chunk_budget).")
    ce_warmup_epochs: int = Field(
        0, ge=0, description="Plain label-smoothed CE (alpha = 1) for the first N epochs, then DeCE.")
    alpha_min: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Floor on alpha: alpha = max(alpha_min, alpha_base ** e). 0 (default): the paper's schedule. "
                    "Keeps the late epochs' alpha from decaying further.")

    audit: AuditConfig | None = Field(
        None, description="Poison audit recorder: {\"enabled\": true, \"out\": \"DIR\"} writes per-row log p_t per "
                          "step to DIR/rankNNNNN.jsonl (docs/audit.md); the training loop passes row ids.")

    preset: Preset | None = Field(
        None, description="Named setting (dece_ds.config.PRESETS) that fills the fields not given: 'paper' "
                          "(alpha_base 0.99) or 'backdoor_guard' (alpha_base 0.97, chosen in docs/backdoor.md).")

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and isinstance(data.get("preset"), str) and data["preset"] in PRESETS:
            return {**PRESETS[data["preset"]], **data}
        return data

    @field_validator("alpha_base", mode="wrap")
    @classmethod
    def _alpha_base_or_auto(cls, value: Any, handler: Any) -> float | str:
        # one error naming the bound (not one per union member)
        if isinstance(value, str) and value == "auto":
            return value
        try:
            return _ALPHA_BASE.validate_python(value)
        except ValidationError as e:
            err = e.errors()[0]
            msg = err["msg"] if err["type"] in ("greater_than", "less_than_equal") else \
                'Input should be a number in (0, 1] or "auto"'
            raise PydanticCustomError(err["type"], msg) from None

    def require_alpha_resolved(self) -> "DeceConfig":
        """``self``; ``DeceConfigError`` (``ALPHA_AUTO_UNRESOLVED``) while ``alpha_base`` is still "auto"."""
        if self.alpha_base == "auto":
            raise DeceConfigError(ALPHA_AUTO_UNRESOLVED)
        return self

    @model_validator(mode="after")
    def _schedule_needs_steps(self, info: ValidationInfo) -> "DeceConfig":
        # context {"steps_per_epoch_later": True}: the caller fills steps_per_epoch in once it is known
        later = bool(info.context and info.context.get("steps_per_epoch_later"))
        if self.schedule == "continuous" and self.steps_per_epoch is None and not later:
            raise ValueError(
                "steps_per_epoch: required when schedule='continuous' (e = 1 + step / steps_per_epoch), got None")
        if self.alpha_base != "auto" and self.alpha_min > self.alpha_base:
            raise ValueError(f"alpha_min: must be <= alpha_base ({self.alpha_base}), got {self.alpha_min}")
        return self

    @classmethod
    def from_ds_config(cls, path_or_dict: str | os.PathLike | Mapping[str, Any] | None) -> "DeceConfig":
        """Read the top-level ``"dece"`` section of a DeepSpeed config (path to JSON, or a dict).

        One meaning everywhere (the CLI, the DeepSpeed and HF integrations, the launch scripts):

        - no ``"dece"`` key (or ``path_or_dict=None``): ``DeceConfig(enabled=False)``, DeCE is off;
        - ``"dece": {}``: enabled, every field at its default (``enabled`` defaults to true);
        - ``"dece": {"enabled": false, ...}``: off, the other fields still validated;
        - ``"dece": null`` or any other non-object: ``DeceConfigError`` naming ``dece`` (omit the section
          or set ``enabled: false`` to disable; ``null`` is not a third way to say it).

        A path is read by ``read_ds_config`` (one line naming the file when it is missing, a folder, not
        UTF-8, not JSON, or not a JSON object). Raises ``DeceConfigError`` naming each bad field
        (``dece.<field>``) and the value it got.
        """
        if path_or_dict is None:
            return cls(enabled=False)
        if isinstance(path_or_dict, (str, os.PathLike)):
            try:
                return cls._from_section(read_ds_config(path_or_dict))
            except DeceConfigError as e:
                where = f"{Path(path_or_dict)}: "
                raise DeceConfigError(str(e) if str(e).startswith(where) else where + str(e)) from None
        if isinstance(path_or_dict, Mapping):
            return cls._from_section(path_or_dict)
        raise DeceConfigError(f"ds_config: expected a path or a dict, got {type(path_or_dict).__name__}")

    @classmethod
    def _from_section(cls, ds_config: Mapping[str, Any]) -> "DeceConfig":
        if DS_SECTION not in ds_config:
            return cls(enabled=False)
        section = ds_config[DS_SECTION]
        if isinstance(section, DeceConfig):
            return section
        if not isinstance(section, Mapping):
            got = "null" if section is None else repr(section)
            raise DeceConfigError(f"{DS_SECTION}: expected an object; omit the section or set enabled: false "
                                  f"to disable (got {got})")
        return cls.from_dict(section)

    @classmethod
    def from_dict(cls, section: Mapping[str, Any], *, steps_per_epoch_later: bool = False) -> "DeceConfig":
        """Validate a ``dece`` section; ``steps_per_epoch_later``: it may be missing (the caller fills it in)."""
        try:
            return cls.model_validate(dict(section), context={"steps_per_epoch_later": steps_per_epoch_later})
        except ValidationError as e:
            raise DeceConfigError(format_validation_error(e, prefix=DS_SECTION)) from None

    def to_ds_section(self) -> dict[str, Any]:
        """The JSON-ready ``"dece"`` section that ``from_ds_config`` reads back to an equal config."""
        return self.model_dump(mode="json")


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


class _DuplicateKey(ValueError):
    pass


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def read_json_object(path: str | os.PathLike, what: str = "a DeepSpeed config") -> dict[str, Any]:
    """The JSON object in the file ``path``; ``DeceConfigError`` with one line naming the file otherwise.

    Refused, each with its own message: a missing file, a folder, an unreadable file, bytes that are not
    UTF-8, an empty file, invalid JSON (line and column), a key given twice in one object (DeepSpeed's
    own loader refuses that too), and a top level that is not an object (a list, a string, null, ...).
    ``what`` names the expected content in the messages ("a DeepSpeed config", "an experiment config").
    """
    path = Path(path)
    expected = f"expected {what} JSON file"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DeceConfigError(f"{path}: no such file ({expected})") from None
    except IsADirectoryError:
        raise DeceConfigError(f"{path}: is a directory ({expected})") from None
    except PermissionError:
        raise DeceConfigError(f"{path}: permission denied ({expected})") from None
    except OSError as e:
        raise DeceConfigError(f"{path}: cannot read it: {e.strerror or e} ({expected})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DeceConfigError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                              f"{expected}") from None
    if not text.strip():
        raise DeceConfigError(f"{path}: empty file; {expected}")
    try:
        data = json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
    except json.JSONDecodeError as e:
        raise DeceConfigError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except _DuplicateKey as e:
        raise DeceConfigError(f"{path}: key {e.args[0]!r} appears twice in one JSON object") from None
    if not isinstance(data, dict):
        raise DeceConfigError(f"{path}: expected a JSON object at the top level, got {_json_kind(data)}")
    return data


def read_ds_config(path: str | os.PathLike) -> dict[str, Any]:
    """A DeepSpeed JSON config file as a dict (``read_json_object``); the one reader every CLI uses."""
    return read_json_object(path, "a DeepSpeed config")


def format_validation_error(err: ValidationError, prefix: str) -> str:
    lines = [f"invalid '{prefix}' section ({err.error_count()} error(s)):"]
    for item in err.errors():
        loc = ".".join(str(p) for p in item["loc"])
        field = f"{prefix}.{loc}" if loc else prefix
        msg = item["msg"].removeprefix("Value error, ")
        head, sep, rest = msg.partition(": ")
        if not loc and sep and head in DeceConfig.model_fields:  # cross-field rule naming its field
            field, msg = f"{prefix}.{head}", rest
        if item["type"] == "extra_forbidden":
            allowed = ", ".join(DeceConfig.model_fields)
            msg = f"unknown key (allowed: {allowed})"
        lines.append(f"  {field}: {msg} (got {item.get('input')!r})")
    return "\n".join(lines)
