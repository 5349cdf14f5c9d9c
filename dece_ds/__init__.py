"""dece_ds: the DeCE loss for DeepSpeed / Megatron / HF training. Importing it patches nothing."""

from .config import DeceConfig, DeceConfigError
from .loss import DeceLoss
from .ops.dece import DeceFunction, dece_loss
from .ops.vocab_parallel import vocab_parallel_dece
from .schedule import AlphaSchedule

__all__ = ["AlphaSchedule", "DeceConfig", "DeceConfigError", "DeceFunction", "DeceLoss", "dece_loss",
           "vocab_parallel_dece"]
__version__ = "0.1.0"
