"""Call rewriting shared by the methods that change what a model is called with
(PromptTuning, PrefixTuning): naming positional arguments, reading a cache's length,
growing masks along the sequence, and the attach-time checks they share.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import DeltaStateError, SpecError, UnsupportedModuleError
from ..sites import first_tensor
from ..targets import Paths
from ..validate import name_of

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


def one_target(owner: object, targets: list[tuple[str, nn.Module]]) -> None:
    if len(targets) != 1:
        raise SpecError(
            f"{name_of(owner)} goes on one module, the one called with input_ids, but targets match "
            f"{len(targets)}: {[p or '<root>' for p, _ in targets][:5]}; leave targets at its "
            "default (the model root) or name one module"
        )


# Every spelling transformers has given a forward's cache argument: ``past_key_values``
# (4.x, 5.0-5.23), ``cache`` (5.24 on, which still reads the other two from **kwargs),
# ``cache_params`` (state-space models up to 5.23), ``layer_past`` and ``past`` (single
# layers and the oldest models). The first one a forward names is where its cache goes.
CACHE_NAMES = ("past_key_values", "cache", "cache_params", "layer_past", "past")
MASK_NAMES = ("attention_mask",)
POSITION_NAMES = ("position_ids",)
EMBEDS_NAMES = ("inputs_embeds", "input_embeds")


@dataclass(frozen=True)
class CallNames:
    """How one ``forward`` names the inputs that prompt and prefix tuning rewrite.

    Read once at attach from the forward's signature (:func:`call_names`), so the call
    rewrites follow the model's own spelling instead of one transformers release's.
    ``cache`` is ``None`` for a forward that takes no cache under any name.

    Example:
        >>> import transformers
        >>> from deltahooks.methods._calls import call_names
        >>> config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)
        >>> names = call_names(transformers.GPT2LMHeadModel(config))
        >>> names.cache in ("past_key_values", "cache"), names.mask  # "cache" from 5.24 on
        (True, 'attention_mask')
    """

    positional: tuple[str, ...]
    cache: str | None
    # where the cache's write positions go (transformers before 5.x's removal of it); the
    # prompt or prefix shifts them as it shifts position ids
    cache_positions: str = "cache_position"
    mask: str = "attention_mask"
    positions: str = "position_ids"
    embeds: str = "inputs_embeds"
    # the switch that asks for a cache, when the forward has one: a model may hand its
    # layers the cache only when it is on (Whisper's decoder)
    use_cache: str | None = None

    def get_cache(self, kwargs: dict):
        """The call's cache, under this forward's name or an older one it still accepts."""
        for name in (self.cache, *CACHE_NAMES):
            if name is not None and kwargs.get(name) is not None:
                return kwargs[name]
        return None

    def set_cache(self, kwargs: dict, cache) -> None:
        """Pass ``cache`` under this forward's name, dropping any other spelling of it."""
        if self.cache is None:
            raise UnsupportedModuleError(
                f"this forward takes no cache (looked for {', '.join(CACHE_NAMES)})"
            )
        for name in CACHE_NAMES:
            if name != self.cache:
                kwargs.pop(name, None)
        kwargs[self.cache] = cache


def parameters(module: nn.Module) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(module.forward).parameters)


def first_named(params: dict, candidates: tuple[str, ...], default: str | None) -> str | None:
    return next((name for name in candidates if name in params), default)


def call_names(module: nn.Module) -> CallNames:
    """Which keywords ``module.forward`` takes its cache, mask, positions and embeddings under."""
    params = parameters(module)
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return CallNames(
        positional=tuple(p.name for p in params.values() if p.kind in kinds),
        cache=first_named(params, CACHE_NAMES, None),
        mask=first_named(params, MASK_NAMES, MASK_NAMES[0]),
        positions=first_named(params, POSITION_NAMES, POSITION_NAMES[0]),
        embeds=first_named(params, EMBEDS_NAMES, EMBEDS_NAMES[0]),
        use_cache=first_named(params, ("use_cache",), None),
    )


def takes_cache(module: nn.Module) -> bool:
    """Whether ``module.forward`` names a cache argument under any known spelling."""
    return call_names(module).cache is not None


def arg_names(module: nn.Module) -> tuple[str, ...]:
    """The names of ``module.forward``'s positional parameters, to name positional args."""
    return call_names(module).positional


def bind(names: tuple[str, ...], args: tuple, kwargs: dict) -> dict:
    """All arguments by name: HF models are called with keywords, but positional ones work."""
    if not args:
        return dict(kwargs)
    if len(args) > len(names):
        raise TypeError(f"got {len(args)} positional arguments, the forward takes {len(names)}")
    return {**dict(zip(names, args)), **kwargs}


def state_filled(layer) -> bool:
    """Whether a state-space / linear-attention cache layer holds a state (it has no length)."""
    flags = ("has_previous_state", "is_conv_states_initialized", "is_recurrent_states_initialized")
    for flag in flags:
        value = getattr(layer, flag, None)
        if (isinstance(value, dict) and any(value.values())) or value is True:
            return True
    return False


def cached(cache) -> tuple[bool, int | None]:
    """``(filled, positions)`` of a transformers cache: whether it continues a sequence, and
    how many positions its attention layers hold (``None`` for a cache of states only, such
    as Mamba's, whose length nothing records). ``(False, 0)`` for none.
    """
    if cache is None:
        return False, 0
    length = getattr(cache, "get_seq_length", None)
    if not callable(length):
        raise DeltaStateError(
            f"the cache is a {type(cache).__name__}; prompt and prefix tuning need a "
            "transformers Cache (e.g. DynamicCache), which generate() passes by default"
        )
    try:
        return (held := int(length())) > 0, held
    except ValueError:  # only state layers (transformers: get_seq_length needs attention)
        layers = getattr(cache, "layers", None) or ()
        return any(state_filled(layer) for layer in layers), None


def cached_length(cache) -> int:
    """How many positions a transformers attention cache holds (0 for none)."""
    return cached(cache)[1] or 0


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


def sequence(kwargs: dict, embeds: str = "inputs_embeds") -> torch.Tensor | None:
    """The call's input ids or embeddings, whichever it has (batch x length first)."""
    ids = kwargs.get("input_ids")
    return ids if isinstance(ids, torch.Tensor) else first_tensor(kwargs.get(embeds))
