"""One file per method: a spec dataclass, the math, and where it hooks."""

from .adapter import Adapter
from .compacter import Compacter
from .full import Full
from .lora import LoRA
from .low_rank_adapter import LowRankAdapter
from .parallel_adapter import ParallelAdapter
from .prefix_tuning import PrefixTuning
from .prompt_tuning import PromptTuning
from .reft import ReFT

__all__ = [
    "Adapter",
    "Compacter",
    "Full",
    "LoRA",
    "LowRankAdapter",
    "ParallelAdapter",
    "PrefixTuning",
    "PromptTuning",
    "ReFT",
]
