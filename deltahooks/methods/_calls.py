"""Call rewriting shared by the methods that change what a model is called with
(PromptTuning, PrefixTuning): naming positional arguments, reading a cache's length,
growing masks along the sequence, and the attach-time checks they share.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..errors import DeltaStateError, SpecError, UnsupportedModuleError
from ..sites import first_tensor
from ..targets import Paths

ROOT = Paths([""])  # the default target of these methods: the model itself


def is_encoder_decoder(module: nn.Module) -> bool:
    return bool(getattr(getattr(module, "config", None), "is_encoder_decoder", False))


def path_of(root: nn.Module, module: nn.Module) -> str:
    for path, sub in root.named_modules():
        if sub is module:
            return path
    raise UnsupportedModuleError(
        f"{type(module).__name__} is not a submodule of {type(root).__name__}; cannot hook it"
    )


def one_target(owner: str, targets: list[tuple[str, nn.Module]]) -> None:
    if len(targets) != 1:
        raise SpecError(
            f"{owner} goes on one module, the one called with input_ids, but targets match "
            f"{len(targets)}: {[p or '<root>' for p, _ in targets][:5]}; leave targets at its "
            "default (the model root) or name one module"
        )


def arg_names(module: nn.Module) -> tuple[str, ...]:
    """The names of ``module.forward``'s positional parameters, to name positional args."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    parameters = inspect.signature(module.forward).parameters.values()
    return tuple(p.name for p in parameters if p.kind in kinds)


def bind(names: tuple[str, ...], args: tuple, kwargs: dict) -> dict:
    """All arguments by name: HF models are called with keywords, but positional ones work."""
    if not args:
        return dict(kwargs)
    if len(args) > len(names):
        raise TypeError(f"got {len(args)} positional arguments, the forward takes {len(names)}")
    return {**dict(zip(names, args)), **kwargs}


def cached_length(cache) -> int:
    """How many positions a transformers cache holds (0 for none)."""
    if cache is None:
        return 0
    length = getattr(cache, "get_seq_length", None)
    if not callable(length):
        raise DeltaStateError(
            f"past_key_values is a {type(cache).__name__}; prompt and prefix tuning need a "
            "transformers Cache (e.g. DynamicCache), which generate() passes by default"
        )
    return int(length())


def prepend(value: torch.Tensor, count: int, fill) -> torch.Tensor:
    """``value`` with ``count`` entries of ``fill`` in front along its last dimension."""
    front = value.new_full((*value.shape[:-1], count), fill)
    return torch.cat((front, value), dim=-1)


def extend_mask(mask, added: int, total: int):
    """A 2-D mask over the real tokens gets ``added`` ones in front so it covers ``total``.

    A mask that already covers ``total`` positions is left as it is.
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        kind = f"{mask.dim()}-D" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise DeltaStateError(
            f"prompt and prefix tuning extend 2-D attention masks (batch x tokens), got a {kind} "
            "mask; pass the 2-D padding mask (4-D masks come from static caches, which these "
            "methods do not support)"
        )
    if mask.shape[-1] + added == total:
        return prepend(mask, added, 1)
    return mask


def sequence(kwargs: dict) -> torch.Tensor | None:
    """The call's input ids or embeddings, whichever it has (batch x length first)."""
    ids = kwargs.get("input_ids")
    return ids if isinstance(ids, torch.Tensor) else first_tensor(kwargs.get("inputs_embeds"))
