"""One file per method: a spec dataclass, the math, and where it hooks."""

from .full import Full
from .lora import LoRA

__all__ = ["Full", "LoRA"]
