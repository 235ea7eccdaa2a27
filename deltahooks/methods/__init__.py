"""One file per method: a spec dataclass, the math, and where it hooks."""

from .adapter import Adapter
from .bitfit import BitFit
from .full import Full
from .ia3 import IA3
from .ln_tuning import LNTuning
from .lora import LoRA

__all__ = ["IA3", "Adapter", "BitFit", "Full", "LNTuning", "LoRA"]
