"""Prefix tuning (Li & Liang, 2021): learned keys and values ahead of every attention layer's own.

A root-call site on the model (or on its backbone, transformers' ``base_model``, when
only that takes a cache) hands it a cache that already holds the prefixes,
so every attention layer attends to them before the real tokens; a 2-D attention mask
gets ones for them and given position ids move up past them. A call that continues a
non-empty cache (``generate()`` after its first step) only shifts its mask and
positions. Encoder-decoder models get prefixes in the decoder's self-attention (their
encoders take no cache). With ``reparameterize`` the prefixes are a small MLP's output
while training; files store the prefixes alone. A checkpointed training call gets a
cache that replays the same prefixes instead (see :mod:`deltahooks.methods._prefix_cache`).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .. import validate
from ..errors import DeltaStateError
from ..ledger import join
from ..sites import FlagSite, RootCallSite, first_tensor
from ..spec import DeltaSpec, DeviceLike, Part, register_method, tensor_options
from ..targets import Target
from ._calls import (
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
)
from ._prefix_cache import (
    KEEPS_CACHE,
    InFlight,
    Layout,
    checkpointed,
    fill,
    handing_sites,
    readers,
    replayed_cache,
)
from ._prefix_geometry import geometry

MLP = ("prefix_embedding", "mlp_in", "mlp_in_bias", "mlp_out", "mlp_out_bias")
DISCARDED = "_deltahooks_discarded"  # on a cache made for a call with use_cache=False


def final_prefixes(tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``num_tokens × (layers · 2 · kv)``: stored directly, or the MLP of the embedding."""
    if len(tensors) == 1:
        return tensors[0]
    embedding, w_in, b_in, w_out, b_out = tensors
    return F.linear(torch.tanh(F.linear(embedding, w_in, b_in)), w_out, b_out)


def layer_prefixes(tensors: tuple[torch.Tensor, ...], layer: int, width: int) -> torch.Tensor:
    """One layer's ``num_tokens × width`` slice of :func:`final_prefixes`, computed alone."""
    columns = slice(width * layer, width * (layer + 1))
    if len(tensors) == 1:
        return tensors[0][:, columns]
    embedding, w_in, b_in, w_out, b_out = tensors
    return F.linear(torch.tanh(F.linear(embedding, w_in, b_in)), w_out[columns], b_out[columns])


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
        validate.positive_int(self, "num_tokens", self.num_tokens, example=20)
        validate.flag(self, "reparameterize", self.reparameterize)
        validate.positive_int(self, "hidden", self.hidden, example=512)

    def check_module(self, path: str, module: nn.Module) -> None:
        geometry(path, module)

    def check_targets(self, targets: list[tuple[str, nn.Module]]) -> None:
        one_target(self, targets)

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
        if self.real_build(device):
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


# ----------------------------------------------------------------------- the call rewrite
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
        with torch.no_grad():
            prefixes = final_prefixes(tensors)
        cache, own = replayed_cache(
            caches, layout, prefixes, partial(layer_prefixes, tensors), step.shape[0]
        )
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
