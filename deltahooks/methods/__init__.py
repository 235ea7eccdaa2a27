"""One file per method: a spec dataclass, the math, and where it hooks."""

from .adapter import Adapter
from .full import Full
from .lora import LoRA
from .prefix_tuning import PrefixTuning
from .prompt_tuning import PromptTuning

__all__ = ["Adapter", "Full", "LoRA", "PrefixTuning", "PromptTuning"]
