"""Prefix tuning (Li & Liang, 2021): learned keys and values ahead of every attention layer's own.

A root-call site on the model (or on its backbone, transformers' ``base_model``, when
only that takes a cache) hands it a cache that already holds the prefixes,
so every attention layer attends to them before the real tokens; a 2-D attention mask
gets ones for them and given position ids move up past them. A call that continues a
non-empty cache (``generate()`` after its first step) only shifts its mask and
positions. Encoder-decoder models get prefixes in the decoder's self-attention (their
encoders take no cache). With ``reparameterize`` the prefixes are a small MLP's output
while training; files store the prefixes alone. A checkpointed training call gets a
cache that replays the same prefixes instead (see :func:`replay_classes`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import sys
import warnings
import weakref
from dataclasses import dataclass, replace
from functools import cache, partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from .. import validate
from ..errors import DeltaStateError, UnsupportedModuleError
from ..ledger import join
from ..sites import FlagSite, RootCallSite, first_tensor
from ..spec import DeltaSpec, DeviceLike, Part, register_method, tensor_options
from ..targets import Target
from ._calls import (
    CACHE_NAMES,
    ROOT,
    CallNames,
    bind,
    cached_length,
    call_names,
    extend_mask,
    is_encoder_decoder,
    one_target,
    path_of,
    sequence,
    takes_cache,
)

MLP = ("prefix_embedding", "mlp_in", "mlp_in_bias", "mlp_out", "mlp_out_bias")
DISCARDED = "_deltahooks_discarded"  # on a cache made for a call with use_cache=False
# transformers' checkpointed layers drop the cache unless this is true on the layer
KEEPS_CACHE = "_can_checkpoint_with_cache"


@register_method
@dataclass(frozen=True, kw_only=True)
class PrefixTuning(DeltaSpec):
    """Learned key/value prefixes in every attention layer, through transformers' cache API.

    Prefix tuning (Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
    Generation"; PEFT ``PrefixTuningConfig``): each attention layer gets ``num_tokens``
    trained keys and values in front of those of the real tokens, as if a prefix had
    been run through the frozen model. The model (or its backbone, when only that takes
    a cache) is called with a transformers ``DynamicCache`` that already holds them, so
    it works on models whose attention layers all read a full-attention cache:
    decoder-only (GPT-2, Llama, OPT, Qwen3, Falcon, DeepSeek-V3, ...), encoder-only (BERT)
    and encoder-decoder (T5: the decoder's self-attention; an encoder takes no cache, and
    a cross-attention cache is filled from the encoder's output, as in PEFT), including
    ``model.generate()``. The prefixes have the shape each layer writes to its cache,
    found at attach by running a weightless (fake-tensor) copy of the model on one token:
    one key/value head under multi-query attention, the compressed latents under
    DeepSeek's multi-head latent attention. Outputs have the real tokens'
    length. ``delta.merge()`` raises :class:`deltahooks.UnsupportedOperationError`.
    Every argument is keyword-only and checked when the spec is created.

    Along the sequence: a 2-D ``attention_mask`` (``decoder_attention_mask`` for an
    encoder-decoder) gets ones for the prefix; given ``position_ids`` move up by
    ``num_tokens``, and the model counts the cached prefix into the positions it makes
    itself, so real tokens start at position ``num_tokens`` (as in PEFT). A call with a
    non-empty cache continues a sequence that already holds the prefixes.

    Training under gradient checkpointing works, reentrant or not, with the gradients of
    an unchecked run: the call gets a cache that stores nothing and recomputes each
    layer's prefixes from the delta's tensors (a checkpointed layer runs twice, and a
    growing cache would hold its tokens twice), the checkpointed layers keep it while the
    delta is active (transformers' ``_can_checkpoint_with_cache``), and a layer the model
    passes no cache while checkpointing (GPT-2) is handed it. Continuing a filled cache in
    such a call raises :class:`deltahooks.DeltaStateError`, as do masks that are not 2-D
    (a static cache's 4-D masks).

    Files: with ``reparameterize=True`` the delta trains an embedding and an MLP, but
    ``delta.save`` stores only the prefixes they compute, under a spec with
    ``reparameterize=False``; ``dh.load`` attaches that spec, which holds the prefixes
    directly (as PEFT's saved prefix-tuning adapters do). Training a loaded delta further
    trains the prefixes themselves. ``delta.state_dict()`` holds the live (MLP) tensors.

    Args:
        targets: the transformers model that gets the prefixes. Default: the model root
            (``dh.Paths([""])``), so ``dh.PrefixTuning(num_tokens=8)`` works as is. Exactly
            one module, with a ``config``, whose forward (or its ``base_model``'s) takes a
            cache (``past_key_values``, ``cache`` from transformers 5.24, or another name
            transformers has used). A model whose cache has anything but full-attention
            layers (sliding windows, linear attention, shared key/values) raises
            :class:`deltahooks.UnsupportedModuleError` at attach.
        exclude: modules to leave out of ``targets``, same syntax. Default ``None``.
        num_tokens: the prefix length, a positive integer. Default ``20``. Paper: prefix
            length; PEFT: ``num_virtual_tokens``.
        reparameterize: train the prefixes as ``MLP(embedding)``: an embedding of
            ``num_tokens × kv`` (``kv`` = key/value heads × head size) through ``Linear(kv,
            hidden) → tanh → Linear(hidden, layers · 2 · kv)``, which Li & Liang found
            more stable than training the prefixes directly; ``False`` trains
            ``num_tokens × layers · 2 · kv`` prefixes directly. Default ``True``. PEFT:
            ``prefix_projection`` (default ``False`` there).
        hidden: the MLP's hidden width, a positive integer, used with
            ``reparameterize``. Default ``512``. PEFT: ``encoder_hidden_size``.

    Example:
        >>> import torch, transformers, deltahooks as dh
        >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50)
        >>> model = transformers.GPT2LMHeadModel(config).eval()
        >>> delta = dh.attach(model, dh.PrefixTuning(num_tokens=4, hidden=8))
        >>> {key: tuple(t.shape) for key, t in delta.state_dict().items()}  # doctest: +NORMALIZE_WHITESPACE
        {'prefix_embedding': (4, 16), 'mlp_in': (8, 16), 'mlp_in_bias': (8,),
         'mlp_out': (64, 8), 'mlp_out_bias': (64,)}
        >>> model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape  # the real tokens only
        torch.Size([1, 3, 50])
    """

    method = "prefix_tuning"
    targets: Target = ROOT
    num_tokens: int = 20
    reparameterize: bool = True
    hidden: int = 512

    def validate(self) -> None:
        validate.positive_int("PrefixTuning", "num_tokens", self.num_tokens, example=20)
        validate.flag("PrefixTuning", "reparameterize", self.reparameterize)
        validate.positive_int("PrefixTuning", "hidden", self.hidden, example=512)

    def check_module(self, path: str, module: nn.Module) -> None:
        geometry(path, module)

    def check_targets(self, targets: list[tuple[str, nn.Module]]) -> None:
        one_target("PrefixTuning", targets)

    def make_part(
        self, path: str, module: nn.Module, root: nn.Module, *, device: DeviceLike = None
    ) -> Part:
        shape, callee = geometry(path, module)
        like = tensor_options(module, device)
        width = shape.heads * (shape.key_dim + shape.value_dim)  # one layer's keys and values
        flat = shape.layers * width
        if self.reparameterize:
            token = shape.heads * shape.key_dim  # the embedding's width (PEFT: token_dim)
            shapes = [(self.num_tokens, token), (self.hidden, token), (self.hidden,)]
            shapes += [(flat, self.hidden), (flat,)]
            tensors = {name: torch.empty(shape, **like) for name, shape in zip(MLP, shapes)}
        else:
            tensors = {"prefixes": torch.empty(self.num_tokens, flat, **like)}
        if device is None:  # a real build; a plan (device="meta") needs shapes only
            initialise(tensors)
        transformers = sys.modules["transformers"]
        caches = (transformers.DynamicCache, transformers.EncoderDecoderCache)
        layout = Layout(*shape, is_encoder_decoder(module))
        in_flight = InFlight()
        call = partial(prefix_call, layout, call_names(callee), caches, in_flight)
        at = join(path, path_of(module, callee))
        layers_paths = readers(path, module)
        sites = [RootCallSite(call, tuple(tensors), at), FlagSite(KEEPS_CACHE, layers_paths)]
        # an encoder-decoder's encoder layers take no cache: hand none
        if not layout.encoder_decoder:
            sites += handing_sites(root, layers_paths, in_flight)
        return Part(
            path,
            tensors,
            sites,
            cannot_merge="prefixes are extra keys and values, not a change of weights",
        )

    def saved(
        self, tensors: dict[str, torch.Tensor]
    ) -> tuple[PrefixTuning, dict[str, torch.Tensor]]:
        """A file keeps the prefixes the MLP computes, under ``reparameterize=False``."""
        if not self.reparameterize:
            return self, tensors
        stored = {}
        for key in tensors:
            owner, _, local = key.rpartition(".")
            if local == MLP[0]:
                own = tuple(tensors[join(owner, name)] for name in MLP)
                stored[join(owner, "prefixes")] = final_prefixes(own)
        return replace(self, reparameterize=False), stored


# ------------------------------------------------------------------ attach-time checks
class Shape(NamedTuple):
    """What each attention layer writes to its cache per position, as the model writes it.

    ``heads × key_dim`` keys and ``heads × value_dim`` values: the key/value heads and head
    size for most models, one head for multi-query attention (Falcon-7B), compressed
    latents for multi-head latent attention (DeepSeek-V3 caches its key/value latent as
    "keys" and its rotary key as "values").
    """

    layers: int
    heads: int
    key_dim: int
    value_dim: int


class Layout(NamedTuple):
    layers: int
    heads: int
    key_dim: int
    value_dim: int
    encoder_decoder: bool


def geometry(path: str, module: nn.Module) -> tuple[Shape, nn.Module]:
    """``(shape, callee)`` of a transformers model, or why it cannot hold prefixes.

    ``callee`` is the module whose call gets the cache: the model, or its backbone. The
    shape is what the model's own layers write to a cache (:func:`probe_shape`, on a
    weightless twin), else read from the config's standard names; the cache transformers
    builds from the same config must hold full-attention layers only, one per layer.
    """
    where = f"{path or '<root>'!r} ({type(module).__name__})"
    transformers = sys.modules.get("transformers")
    config = getattr(module, "config", None)
    if transformers is None or config is None:
        raise UnsupportedModuleError(
            f"PrefixTuning works through transformers' cache API, and {where} is not a "
            "transformers model (it has no config); target the transformers model"
        )
    # the model itself where its forward names the cache (a head may call its backbone's
    # inner modules directly, as OPTForCausalLM calls model.decoder), else its backbone (a
    # classification head whose forward does not name the cache)
    backbone = getattr(module, "base_model", None)
    callee = module if takes_cache(module) else backbone
    if not isinstance(callee, nn.Module) or not takes_cache(callee):
        raise UnsupportedModuleError(
            f"PrefixTuning needs {where} or its base_model to take a cache (an argument named "
            f"{' or '.join(CACHE_NAMES)}), and neither forward does; this model cannot hold "
            "prefixes"
        )
    decoder = config
    if is_encoder_decoder(module) and callable(getattr(module, "get_decoder", None)):
        decoder = getattr(module.get_decoder(), "config", config)
    if callable(getattr(decoder, "get_text_config", None)):
        decoder = decoder.get_text_config(decoder=True)
    try:
        kinds = [type(layer) for layer in transformers.DynamicCache(config=decoder).layers]
    except (AttributeError, TypeError, ValueError, KeyError) as err:
        raise UnsupportedModuleError(
            f"PrefixTuning cannot build a transformers cache from the config of {where} ({err}); "
            "this model is not supported"
        ) from None
    declared = getattr(decoder, "num_hidden_layers", None)
    layers = len(kinds) or declared
    odd = sorted({kind.__name__ for kind in kinds if kind is not transformers.DynamicLayer})
    if odd or (kinds and isinstance(declared, int) and len(kinds) != declared):
        raise UnsupportedModuleError(
            f"PrefixTuning needs every attention layer of {where} to keep a full-attention "
            f"cache (DynamicLayer), but its cache has {odd or f'{len(kinds)} layers for {declared}'}"
            " (sliding windows, linear attention or state-space layers, shared keys/values); "
            "this model has no full-attention cache for prefixes to go into. PromptTuning "
            "works on it instead"
        )
    shape = probed(callee, layers) or config_shape(decoder)
    if shape is None:
        raise UnsupportedModuleError(
            f"PrefixTuning cannot tell the key/value shape of {where}: a weightless copy of it "
            "did not run, and its config lacks num_hidden_layers, num_attention_heads (and "
            "num_key_value_heads, head_dim or hidden_size); this model is not supported"
        )
    return shape, callee


def config_shape(config) -> Shape | None:
    """The standard config names: key/value heads × head size (keys and values alike)."""
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None)
    if not head_dim and isinstance(heads, int) and heads:
        head_dim = getattr(config, "hidden_size", 0) // heads
    if not all(isinstance(n, int) and n > 0 for n in (layers, heads, kv_heads, head_dim)):
        return None
    return Shape(layers, kv_heads, head_dim, head_dim)


class Probed(Exception):
    """Stops a probe once every layer has written to its cache."""


PROBED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def probed(callee: nn.Module, layers) -> Shape | None:
    """:func:`probe_shape`, once per model and config (attach checks, then builds)."""
    try:
        key = (layers, callee.config.to_json_string())
    except (AttributeError, TypeError, ValueError):
        return probe_shape(callee, call_names(callee), layers)
    known = PROBED.get(callee)
    if known is None or known[0] != key:
        known = PROBED[callee] = (key, probe_shape(callee, call_names(callee), layers))
    return known[1]


def probe_shape(callee: nn.Module, names: CallNames, layers) -> Shape | None:
    """Run a weightless twin of ``callee`` (built from its config under torch's fake
    tensors, else on the meta device) on one token and record what each layer writes to
    the cache: the model's own answer, whatever its config calls it and however this
    transformers release lays the cache out.

    The model itself is not touched. ``None`` where no twin runs far enough to write to the
    cache (a model that does data-dependent work before its first attention layer).
    """
    transformers = sys.modules["transformers"]
    if not isinstance(layers, int) or layers <= 0 or names.cache is None:
        return None
    written: dict[int, tuple[torch.Size, torch.Size]] = {}

    class Recorder(transformers.DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            written[layer_idx] = (key_states.shape, value_states.shape)
            if len(written) == layers:
                raise Probed
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    for run in (fake_run, meta_run):
        written.clear()
        run(callee, names, Recorder)
        shapes = {(k[1], k[3], v[1], v[3]) for k, v in written.values() if len(k) == len(v) == 4}
        if len(shapes) == 1:  # layers that differ (or none seen): the config's shape, if any
            heads, key_dim, value_heads, value_dim = shapes.pop()
            if heads == value_heads:
                return Shape(layers, heads, key_dim, value_dim)
    return None


def twin_call(callee: nn.Module, names: CallNames, recorder: type, device) -> None:
    """Build ``callee``'s twin and call it on one token with a ``recorder`` cache."""
    transformers = sys.modules["transformers"]
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    kwargs = {"input_ids": token, "use_cache": True}
    if is_encoder_decoder(callee):
        cache = transformers.EncoderDecoderCache(recorder(), transformers.DynamicCache())
        kwargs["decoder_input_ids"] = token
    else:
        cache = recorder()
    names.set_cache(kwargs, cache)
    config = copy.deepcopy(callee.config)
    with contextlib.suppress(AttributeError, TypeError, ValueError):
        config._attn_implementation = "eager"  # flash kernels need a real GPU tensor
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = type(callee)(config).eval()
    with torch.no_grad():
        twin(**kwargs)


def quietly(run):
    """Run a twin with transformers' and torch's own logging held back: their complaints
    about a twin are not the user's; any failure means "ask the config"."""

    def quiet(*args) -> None:
        transformers = sys.modules["transformers"]
        level = transformers.logging.get_verbosity()
        fake_log = logging.getLogger("torch._subclasses.fake_tensor")
        fake_level = fake_log.level
        transformers.logging.set_verbosity_error()
        fake_log.setLevel(logging.CRITICAL)
        try:
            with torch.random.fork_rng(devices=[]):  # the twin's init draws nothing for real
                run(*args)
        except Probed:
            pass
        except Exception:  # any failure of the twin: what it recorded so far, if anything
            pass
        finally:
            transformers.logging.set_verbosity(level)
            fake_log.setLevel(fake_level)

    return quiet


@quietly
def fake_run(callee: nn.Module, names: CallNames, recorder: type) -> None:
    """The twin on fake CPU tensors: shapes without memory, and a real device type."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        twin_call(callee, names, recorder, "cpu")


@quietly
def meta_run(callee: nn.Module, names: CallNames, recorder: type) -> None:
    with torch.device("meta"):
        twin_call(callee, names, recorder, "meta")


@torch.no_grad()
def initialise(tensors: dict[str, torch.Tensor]) -> None:
    """As PEFT: embeddings (or direct prefixes) N(0, 1); linear layers as ``nn.Linear``."""
    for name, tensor in tensors.items():
        if name in ("prefix_embedding", "prefixes"):
            nn.init.normal_(tensor)
        elif name in ("mlp_in", "mlp_out"):
            nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
        else:
            fan_in = tensors["mlp_in" if name == "mlp_in_bias" else "mlp_out"].shape[1]
            nn.init.uniform_(tensor, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))


# ----------------------------------------------------------------------- the call rewrite
def final_prefixes(tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``num_tokens × (layers · 2 · kv)``: stored directly, or the MLP of the embedding."""
    if len(tensors) == 1:
        return tensors[0]
    embedding, w_in, b_in, w_out, b_out = tensors
    return F.linear(torch.tanh(F.linear(embedding, w_in, b_in)), w_out, b_out)


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


def layer_prefixes(tensors: tuple[torch.Tensor, ...], layer: int, width: int) -> torch.Tensor:
    """One layer's ``num_tokens × width`` slice of :func:`final_prefixes`, computed alone."""
    columns = slice(width * layer, width * (layer + 1))
    if len(tensors) == 1:
        return tensors[0][:, columns]
    embedding, w_in, b_in, w_out, b_out = tensors
    return F.linear(torch.tanh(F.linear(embedding, w_in, b_in)), w_out[columns], b_out[columns])


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
            own = layer_prefixes(self.tensors, layer_idx, width_of(layout))
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


def replayed_cache(caches: tuple[type, type], layout: Layout, tensors, batch: int):
    """The cache of a checkpointed training call (see :func:`replay_classes`)."""
    dynamic, encoder_decoder_cache = caches
    replayed_prefixes, pass_through = replay_classes(dynamic)
    own = replayed_prefixes()
    own.tensors, own.layout, own.updated = tensors, layout, set()
    with torch.no_grad():
        prefixes = final_prefixes(tensors)
    fill(own, prefixes, layout, batch, dynamic.update)
    if not layout.encoder_decoder:
        return own, own
    whole = encoder_decoder_cache(own, pass_through())
    whole.is_updated = Forgetful()
    return whole, own


def decoder_sequence(kwargs: dict) -> torch.Tensor | None:
    """An encoder-decoder call's decoder input (labels stand in: the model shifts them)."""
    for name in ("decoder_input_ids", "decoder_inputs_embeds", "labels"):
        value = first_tensor(kwargs.get(name))
        if value is not None:
            return value
    return None


def asks_for_cache(names: CallNames, kwargs: dict, backbone: nn.Module) -> bool:
    """Whether the call wants a cache back: its ``use_cache``, else the model config's."""
    asked = kwargs.get(names.use_cache) if names.use_cache else None
    if asked is None:
        asked = getattr(getattr(backbone, "config", None), "use_cache", True)
    return bool(asked)


def hand_over(names: CallNames, kwargs: dict, cache) -> None:
    """Pass ``cache`` with the cache switch on: Whisper's decoder gives its layers the cache
    only when ``use_cache`` is, and they must see the prefixes in every call."""
    names.set_cache(kwargs, cache)
    if names.use_cache is not None:
        kwargs[names.use_cache] = True


def prefix_call(
    layout: Layout,
    names: CallNames,
    caches,
    in_flight,
    backbone: nn.Module,
    args: tuple,
    kwargs: dict,
    tensors,
):
    """Hand the backbone a cache holding the prefixes (first call) and stretch the mask."""
    encoder_decoder = layout.encoder_decoder
    kwargs = bind(names.positional, args, kwargs)
    in_flight.set(None)  # a new call: the last one's replayed cache is no longer needed
    step = decoder_sequence(kwargs) if encoder_decoder else sequence(kwargs, names.embeds)
    if step is None:
        return (), kwargs
    count = tensors[0].shape[0]
    cache = names.get_cache(kwargs)
    if getattr(cache, DISCARDED, False):
        cache = None  # made by us for a call that asked for no cache: it continues nothing
    past = cached_length(cache)
    if past == 0 and kwargs.get(names.cache_positions) is not None:
        # counted from an empty cache (transformers < 5.x): the prefixes come first
        kwargs[names.cache_positions] = kwargs[names.cache_positions] + count
    if checkpointed(backbone):
        if past:
            raise DeltaStateError(
                "PrefixTuning cannot continue a filled cache in a training call under gradient "
                "checkpointing (the backward pass would replay the layers' writes to it); call "
                "without a cache, or use model.eval() for generation"
            )
        cache, own = replayed_cache(caches, layout, tensors, step.shape[0])
        setattr(cache, DISCARDED, True)
        in_flight.set(cache)
        hand_over(names, kwargs, cache)
        past = count
    elif past == 0:
        dynamic, encoder_decoder_cache = caches
        if cache is None:
            cache = encoder_decoder_cache(dynamic(), dynamic()) if encoder_decoder else dynamic()
            # the call asked for no cache: the one made here holds the prefixes only for
            # this call, and the model may hand it back all the same; generate() would then
            # pass it with the whole sequence again
            setattr(cache, DISCARDED, not asks_for_cache(names, kwargs, backbone))
        own = getattr(cache, "self_attention_cache", cache)
        fill(own, final_prefixes(tensors), layout, step.shape[0], type(own).update)
        hand_over(names, kwargs, cache)
        past = count
    mask = "decoder_attention_mask" if encoder_decoder else names.mask
    if mask in kwargs:
        kwargs[mask] = extend_mask(kwargs[mask], count, past + step.shape[1])
    if not encoder_decoder and kwargs.get(names.positions) is not None:
        kwargs[names.positions] = kwargs[names.positions] + count
    return (), kwargs
