"""One file per method: a spec dataclass, the math, and where it hooks."""

from .adapter import Adapter
from .full import Full
from .lora import LoRA
from .reft import ReFT

__all__ = ["Adapter", "Full", "LoRA", "ReFT"]
