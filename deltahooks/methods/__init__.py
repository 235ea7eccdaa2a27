"""One file per method: a spec dataclass, the math, and where it hooks."""

from .adalora import AdaLoRA
from .adalora_budget import adalora_allocator
from .adapter import Adapter
from .bitfit import BitFit
from .boft import BOFT
from .compacter import Compacter
from .full import Full
from .ia3 import IA3
from .ln_tuning import LNTuning
from .loha import LoHa
from .lokr import LoKr
from .lora import LoRA
from .low_rank_adapter import LowRankAdapter
from .oft import OFT
from .parallel_adapter import ParallelAdapter
from .prefix_tuning import PrefixTuning
from .prompt_tuning import PromptTuning
from .reft import ReFT
from .vera import VeRA

__all__ = [
    "BOFT",
    "IA3",
    "OFT",
    "AdaLoRA",
    "Adapter",
    "BitFit",
    "Compacter",
    "Full",
    "LNTuning",
    "LoHa",
    "LoKr",
    "LoRA",
    "LowRankAdapter",
    "ParallelAdapter",
    "PrefixTuning",
    "PromptTuning",
    "ReFT",
    "VeRA",
    "adalora_allocator",
]
