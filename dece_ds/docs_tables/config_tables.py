"""Tables printed from the code, no measurement: every ``dece`` key of ``DeceConfig`` (``config``), the
presets (``config-presets``), the ``alpha_base`` arithmetic (``alpha-targets``); and the JSON schema of
``dece-ds config-schema --json``."""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any

from .common import md_table


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:  # a union member with its own bounds: float (> 0.0, ≤ 1.0) | "auto"
        inner, *meta = typing.get_args(annotation)
        bounds = ", ".join(b for b in (_bounds(types.SimpleNamespace(metadata=list(m.metadata) if hasattr(m, "metadata")
                                                                      else [m])) for m in meta) if b)
        return _type_name(inner) + (f" ({bounds})" if bounds else "")
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


_BOUNDS = (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))


def _bounds(field) -> str:
    parts = []
    for item in field.metadata:
        for attr, sym in _BOUNDS:
            value = getattr(item, attr, None)
            if value is not None:
                parts.append(f"{sym} {value}")
    return ", ".join(parts)


def config_table(root: Path | None = None, arg: str = "", model: type | None = None) -> str:
    """Every ``dece`` key of ``DeceConfig`` (or ``model``): type (with bounds), default, meaning."""
    if model is None:
        from ..config import DeceConfig as model
    rows = []
    for name, field in model.model_fields.items():
        kind = _type_name(field.annotation)
        bounds = _bounds(field)
        if bounds:
            kind += f" ({bounds})"
        default = json.dumps(field.get_default(call_default_factory=True))
        meaning = (field.description or "").replace("|", "\\|")
        rows.append([f"`{name}`", kind, f"`{default}`", meaning])
    return md_table(["key", "type", "default", "meaning"], rows)


def presets_table(root: Path | None = None, arg: str = "") -> str:
    """The named settings of ``dece_ds.config.PRESETS`` and the keys each fills."""
    from ..config import PRESETS
    keys: list[str] = []
    for values in PRESETS.values():
        keys.extend(k for k in values if k not in keys)
    rows = [[f"`\"{name}\"`"] + [json.dumps(values[k]) if k in values else "-" for k in keys]
            for name, values in PRESETS.items()]
    return md_table(["preset"] + [f"`{k}`" for k in keys], rows)


def config_schema_json() -> str:
    from ..config import DeceConfig
    return json.dumps(DeceConfig.model_json_schema(), indent=2)


def alpha_targets(root: Path | None = None, arg: str = "") -> str:
    """``alpha_base`` that ends one continuous epoch (alpha_base ** 2) at the alpha of k epochs at 0.99."""
    rows = []
    for k in (2, 5, 10, 20):
        target = 0.99 ** k
        rows.append([f"{target:.3f}", str(k), f"{target ** 0.5:.3f}"])
    return md_table(["target α at the end", "= 0.99^k for k", "`alpha_base`"], rows)
