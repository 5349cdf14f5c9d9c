"""Scale planning: model shapes and per-GPU memory / collective estimates (``dece-ds plan``)."""

from .estimate import Plan, PlanInput, plan
from .shapes import BUILTIN_SHAPES, ModelShape, resolve_shape

__all__ = ["BUILTIN_SHAPES", "ModelShape", "Plan", "PlanInput", "plan", "resolve_shape"]
