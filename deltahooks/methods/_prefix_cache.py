"""The caches PrefixTuning hands a model: each layer's prefixes laid out as its keys and
values, and, for a checkpointed training call, a cache that replays them.

Checkpointing runs a layer twice (forward, then again in backward), so a cache that grows
would hold the real tokens twice by the replay; the replaying cache stores nothing and
answers every write with the layer's prefixes, recomputed by the method's own function.
"""

from __future__ import annotations

from functools import cache, partial
from typing import NamedTuple

import torch
from torch import nn

from ..ledger import join
from ..sites import RootCallSite
from ._calls import call_names

# transformers' checkpointed layers drop the cache unless this is true on the layer
KEEPS_CACHE = "_can_checkpoint_with_cache"


class Layout(NamedTuple):
    layers: int
    heads: int
    key_dim: int
    value_dim: int
    encoder_decoder: bool


def split(prefixes: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's ``count × width`` → keys ``heads × count × key_dim`` and values
    ``heads × count × value_dim`` (keys first in each layer's columns, as PEFT lays them out).
    """
    count, heads = prefixes.shape[0], layout.heads
    keys, values = prefixes.split((heads * layout.key_dim, heads * layout.value_dim), dim=-1)
    keys = keys.view(count, heads, layout.key_dim).transpose(0, 1)
    values = values.view(count, heads, layout.value_dim).transpose(0, 1)
    return keys, values


def width_of(layout: Layout) -> int:
    return layout.heads * (layout.key_dim + layout.value_dim)


def fill(own, prefixes: torch.Tensor, layout: Layout, batch: int, update) -> None:
    """Write every layer's prefixes into the cache ``own`` through ``update``."""
    width = width_of(layout)
    for layer in range(layout.layers):
        key, value = split(prefixes[:, width * layer : width * (layer + 1)], layout)
        update(own, expand(key, batch), expand(value, batch), layer)


def expand(states: torch.Tensor, batch: int) -> torch.Tensor:
    return states.unsqueeze(0).expand(batch, *states.shape)


@cache
def replay_classes(dynamic: type) -> tuple[type, type]:
    """The two caches of a checkpointed training call, made once per ``DynamicCache`` class.

    Checkpointing runs a layer twice (forward, then again in backward), so a cache that
    grows would hold the real tokens twice by the replay. ``ReplayedPrefixes`` answers
    every ``update`` with the layer's prefixes (recomputed from the delta's tensors, so
    reentrant checkpointing, which replays with grad on, differentiates them within the
    layer) followed by the new keys and values, and keeps nothing; its layers hold the
    prefixes without grad, for the mask sizes and any code that reads them directly.
    ``PassThrough`` is the cross-attention cache of an encoder-decoder: it keeps nothing
    either, so the replay recomputes cross-attention keys from the encoder's output.
    """

    class ReplayedPrefixes(dynamic):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            self.updated.add(layer_idx)
            layout, batch = self.layout, key_states.shape[0]
            own = self.layer_prefixes(layer_idx, width_of(layout))
            key, value = split(own, layout)
            key = expand(key.to(key_states.dtype), batch)
            value = expand(value.to(value_states.dtype), batch)
            return torch.cat((key, key_states), -2), torch.cat((value, value_states), -2)

    class PassThrough(dynamic):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            return key_states, value_states

    return ReplayedPrefixes, PassThrough


class Forgetful(dict):
    """An ``is_updated`` map that never records a cross-attention cache as filled."""

    def __setitem__(self, key, value) -> None:
        pass


def replayed_cache(caches: tuple[type, type], layout: Layout, prefixes, layer_prefixes, batch: int):
    """The cache of a checkpointed training call (see :func:`replay_classes`): ``prefixes``
    are all layers' (held without grad), ``layer_prefixes(layer, width)`` recomputes one
    layer's from the delta's tensors at each write."""
    dynamic, encoder_decoder_cache = caches
    replayed_prefixes, pass_through = replay_classes(dynamic)
    own = replayed_prefixes()
    own.layer_prefixes, own.layout, own.updated = layer_prefixes, layout, set()
    fill(own, prefixes, layout, batch, dynamic.update)
    if not layout.encoder_decoder:
        return own, own
    whole = encoder_decoder_cache(own, pass_through())
    whole.is_updated = Forgetful()
    return whole, own


def checkpointed(module: nn.Module) -> bool:
    """Whether transformers will checkpoint (and so replay) some layer of ``module``."""
    return module.training and any(
        getattr(m, "gradient_checkpointing", False) is True for m in module.modules()
    )


def readers(path: str, module: nn.Module) -> tuple[str, ...]:
    """Paths of the layers that drop a cache under checkpointing unless told it is replayable.

    transformers' ``GradientCheckpointingLayer`` drops the cache argument for a
    checkpointed call unless the layer's ``_can_checkpoint_with_cache`` is true. The cache
    a checkpointed training call gets from us (:class:`ReplayedPrefixes`) stores nothing,
    so replaying a layer in the backward pass reads the same prefixes again: safe to keep.
    """
    return tuple(
        join(path, name)
        for name, sub in module.named_modules()
        if getattr(type(sub), KEEPS_CACHE, True) is False
    )


class InFlight:
    """The cache of the last checkpointed training call, for layers the model skips.

    Kept until the next call of the model: the backward pass replays checkpointed layers
    after the call has returned, and transformers before 5.23 runs a layer's hooks (so
    :func:`hand_cache`) inside that replay. It holds only the prefixes, as views of the
    delta's tensors, and stores none of the call's keys or values.
    """

    def __init__(self) -> None:
        self.cache = None

    def set(self, cache) -> None:
        self.cache = cache

    def get(self):
        return self.cache

    def __reduce__(self):
        return (InFlight, ())


def handing_sites(root: nn.Module, paths: tuple[str, ...], in_flight: InFlight) -> list:
    """A call site on each layer that takes a cache, to hand it the call's cache if skipped.

    A model may itself pass its layers no cache while checkpointing (GPT-2 does); with
    these, every layer that takes one gets the replayed prefixes all the same.
    """
    sites = []
    for path in paths:
        names = call_names(root.get_submodule(path))
        if names.cache is not None and names.cache in names.positional:
            position = names.positional.index(names.cache)
            hand = partial(hand_cache, in_flight, names.cache, position)
            sites.append(RootCallSite(hand, (), path))
    return sites


def hand_cache(in_flight: InFlight, name: str, position: int, layer, args, kwargs, tensors):
    """Pass the call's replayed cache to a checkpointed layer the model gave none."""
    if not (layer.training and getattr(layer, "gradient_checkpointing", False) is True):
        return None  # the call as it is
    cache = in_flight.get()
    if cache is None:
        return None
    if position < len(args):
        if args[position] is None:
            args = (*args[:position], cache, *args[position + 1 :])
    elif kwargs.get(name) is None:
        kwargs[name] = cache
    return args, kwargs
