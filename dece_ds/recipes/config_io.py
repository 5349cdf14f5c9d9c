"""Reading the DeepSpeed config of a recipe run and validating its ``dece`` section, once."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..config import DeceConfig, DeceConfigError
from .checkpoint import RecipeError


def load_ds_config(path: str | os.PathLike, *, steps_per_epoch_later: bool = False,
                   default_schedule: str | None = None) -> tuple[dict[str, Any], DeceConfig]:
    """The DeepSpeed config dict and its validated ``dece`` section, before any process-group work.

    ``default_schedule``: the schedule when the section names none (continued pretraining: continuous).
    Raises ``RecipeError`` naming the file and the field.
    """
    from ..integrations.deepspeed import dece_config_for_engine
    path = Path(path)
    try:
        ds_config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such DeepSpeed config file") from None
    except IsADirectoryError:
        raise RecipeError(f"{path}: is a directory; expected a DeepSpeed JSON config file") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not UTF-8 text; expected a DeepSpeed JSON config file") from None
    except json.JSONDecodeError as e:
        raise RecipeError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(ds_config, dict):
        raise RecipeError(f"{path}: expected a JSON object at the top level, got {type(ds_config).__name__}")
    section = ds_config.get("dece")
    if default_schedule and isinstance(section, dict) and "schedule" not in section:
        ds_config = {**ds_config, "dece": {**section, "schedule": default_schedule}}
    try:
        dece = dece_config_for_engine(ds_config, steps_per_epoch_later=steps_per_epoch_later)
    except DeceConfigError as e:
        raise RecipeError(f"{path}: {e}") from None
    return ds_config, dece
