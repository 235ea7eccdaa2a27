"""deltahooks: parameter-efficient fine-tuning that attaches through hooks.

    >>> import torch, deltahooks as dh
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    >>> delta = dh.attach(model, dh.LoRA(targets=["0"], r=2))
    >>> delta.detach()

Importing this package never imports transformers.
"""

from .attach import attach, deltas, detach, set_active
from .combine import combine
from .delta import Delta
from .errors import (
    DeadSiteWarning,
    DeltaError,
    DeltaFileError,
    DeltaStateError,
    DeltaWarning,
    NoGradientWarning,
    SpecError,
    TargetError,
    UnsupportedModuleError,
    UnsupportedOperationError,
)
from .interop.peft import load_peft, save_peft
from .loading import load
from .merging import stored
from .methods import (
    BOFT,
    IA3,
    OFT,
    AdaLoRA,
    Adapter,
    BitFit,
    Compacter,
    Full,
    LNTuning,
    LoHa,
    LoKr,
    LoRA,
    LowRankAdapter,
    ParallelAdapter,
    PrefixTuning,
    PromptTuning,
    ReFT,
    VeRA,
    adalora_allocator,
)
from .optimizers import loraplus_param_groups
from .routing import route
from .sites import FlagSite, InputSite, OutputSite, RedirectSite, RootCallSite, WeightSite
from .spec import DeltaSpec, Part, register_method, tensor_options
from .summary import summary
from .targets import Paths, resolve_targets
from .version import __version__ as __version__

__all__ = [
    "BOFT",
    "IA3",
    "OFT",
    "AdaLoRA",
    "Adapter",
    "BitFit",
    "Compacter",
    "DeadSiteWarning",
    "Delta",
    "DeltaError",
    "DeltaFileError",
    "DeltaSpec",
    "DeltaStateError",
    "DeltaWarning",
    "FlagSite",
    "Full",
    "InputSite",
    "LNTuning",
    "LoHa",
    "LoKr",
    "LoRA",
    "LowRankAdapter",
    "NoGradientWarning",
    "OutputSite",
    "ParallelAdapter",
    "Part",
    "Paths",
    "PrefixTuning",
    "PromptTuning",
    "ReFT",
    "RedirectSite",
    "RootCallSite",
    "SpecError",
    "TargetError",
    "UnsupportedModuleError",
    "UnsupportedOperationError",
    "VeRA",
    "WeightSite",
    "adalora_allocator",
    "attach",
    "combine",
    "deltas",
    "detach",
    "load",
    "load_peft",
    "loraplus_param_groups",
    "register_method",
    "resolve_targets",
    "route",
    "save_peft",
    "set_active",
    "stored",
    "summary",
    "tensor_options",
]
