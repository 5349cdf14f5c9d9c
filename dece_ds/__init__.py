"""dece_ds: the DeCE loss for DeepSpeed / Megatron / HF training. Importing it patches nothing."""

from .auto_alpha import resolve_alpha_base
from .config import DeceConfig, DeceConfigError
from .loss import DeceLoss
from .ops.dece import DeceFunction, dece_loss
from .ops.vocab_parallel import vocab_parallel_dece
from .schedule import AlphaSchedule

__all__ = ["AlphaSchedule", "DeceConfig", "DeceConfigError", "DeceFunction", "DeceLoss", "dece_loss",
           "resolve_alpha_base", "vocab_parallel_dece"]
__version__ = "0.2.0"


def __getattr__(name):
    # Integrations import deepspeed / transformers; load them only when asked for.
    if name == "initialize":
        from .integrations.deepspeed import initialize
        return initialize
    if name == "fused_linear_dece":
        from .ops.fused_linear import fused_linear_dece
        return fused_linear_dece
    raise AttributeError(f"module 'dece_ds' has no attribute {name!r}")
