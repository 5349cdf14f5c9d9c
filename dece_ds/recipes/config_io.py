"""Reading the DeepSpeed config of a recipe run and validating its ``dece`` section, once."""

from __future__ import annotations

import os
from typing import Any

from ..config import DeceConfig, DeceConfigError, read_ds_config
from .checkpoint import RecipeError


def load_ds_config(path: str | os.PathLike, *, steps_per_epoch_later: bool = False,
                   default_schedule: str | None = None) -> tuple[dict[str, Any], DeceConfig]:
    """The DeepSpeed config dict and its validated ``dece`` section, before any process-group work.

    ``default_schedule``: the schedule when the section names none (continued pretraining: continuous).
    Raises ``RecipeError`` naming the file and the field.
    """
    from ..integrations.deepspeed import dece_config_for_engine
    try:
        ds_config = read_ds_config(path)
    except DeceConfigError as e:
        raise RecipeError(str(e)) from None
    section = ds_config.get("dece")
    if default_schedule and isinstance(section, dict) and "schedule" not in section:
        ds_config = {**ds_config, "dece": {**section, "schedule": default_schedule}}
    try:
        dece = dece_config_for_engine(ds_config, steps_per_epoch_later=steps_per_epoch_later)
    except DeceConfigError as e:
        raise RecipeError(f"{path}: {e}") from None
    return ds_config, dece
