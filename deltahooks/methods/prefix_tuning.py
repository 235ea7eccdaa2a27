"""Prefix tuning (Li & Liang, 2021): learned keys and values ahead of every attention layer's own.

A root-call site on the model (or on its backbone, transformers' ``base_model``, when
only that names ``past_key_values``) hands it a cache that already holds the prefixes, so every attention layer attends to them before the
real tokens; a 2-D attention mask gets ones for them and given position ids move up past
them. A call that continues a non-empty cache (``generate()`` after its first step) only
shifts its mask and positions. Encoder-decoder models get prefixes in the decoder's
self-attention (their encoders take no cache). With ``reparameterize`` the prefixes are a
small MLP's output while training; files store the prefixes alone.
"""

from __future__ import annotations

import inspect
import math
import sys
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .. import validate
from ..errors import DeltaStateError, UnsupportedModuleError
from ..ledger import join
from ..sites import RootCallSite, first_tensor
from ..spec import DeltaSpec, DeviceLike, Part, register_method, tensor_options
from ..targets import Target
from ._calls import (
    ROOT,
    arg_names,
    bind,
    cached_length,
    extend_mask,
    is_encoder_decoder,
    one_target,
    path_of,
    sequence,
)

MLP = ("prefix_embedding", "mlp_in", "mlp_in_bias", "mlp_out", "mlp_out_bias")
DISCARDED = "_deltahooks_discarded"  # on a cache made for a call with use_cache=False


@register_method
@dataclass(frozen=True, kw_only=True)
class PrefixTuning(DeltaSpec):
    """Learned key/value prefixes in every attention layer, through transformers' cache API.

    Prefix tuning (Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
    Generation"; PEFT ``PrefixTuningConfig``): each attention layer gets ``num_tokens``
    trained keys and values in front of those of the real tokens, as if a prefix had
    been run through the frozen model. The model (or its backbone, when only that takes
    ``past_key_values``) is called with a transformers ``DynamicCache`` that already holds them, so it works on models whose
    attention layers all read a full-attention cache: decoder-only (GPT-2, Llama, OPT,
    ...), encoder-only (BERT) and encoder-decoder (T5: the decoder's self-attention; an
    encoder takes no cache, and a cross-attention cache is filled from the encoder's
    output, as in PEFT), including ``model.generate()``. Outputs have the real tokens'
    length. ``delta.merge()`` raises :class:`deltahooks.UnsupportedOperationError`.
    Every argument is keyword-only and checked when the spec is created.

    Along the sequence: a 2-D ``attention_mask`` (``decoder_attention_mask`` for an
    encoder-decoder) gets ones for the prefix; given ``position_ids`` move up by
    ``num_tokens``, and the model counts the cached prefix into the positions it makes
    itself, so real tokens start at position ``num_tokens`` (as in PEFT). A call with a
    non-empty cache continues a sequence that already holds the prefixes.

    Training under gradient checkpointing is refused (:class:`deltahooks.DeltaStateError`
    at the forward): transformers drops the cache inside checkpointed layers, which would
    drop the prefixes (PEFT refuses prefix tuning on such a model altogether; here
    inference still works, since checkpointing is idle outside training). Masks that are not 2-D (a
    static cache's 4-D masks) raise :class:`deltahooks.DeltaStateError` too.

    Files: with ``reparameterize=True`` the delta trains an embedding and an MLP, but
    ``delta.save`` stores only the prefixes they compute, under a spec with
    ``reparameterize=False``; ``dh.load`` attaches that spec, which holds the prefixes
    directly (as PEFT's saved prefix-tuning adapters do). Training a loaded delta further
    trains the prefixes themselves. ``delta.state_dict()`` holds the live (MLP) tensors.

    Args:
        targets: the transformers model that gets the prefixes. Default: the model root
            (``dh.Paths([""])``), so ``dh.PrefixTuning(num_tokens=8)`` works as is. Exactly
            one module, with a ``config``, whose forward (or its ``base_model``'s) takes
            ``past_key_values``. A model whose cache has anything but full-attention
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
        layers, heads, head_dim, callee = geometry(path, module)
        width, like = heads * head_dim, tensor_options(module, device)
        flat = layers * 2 * width
        if self.reparameterize:
            shapes = [(self.num_tokens, width), (self.hidden, width), (self.hidden,)]
            shapes += [(flat, self.hidden), (flat,)]
            tensors = {name: torch.empty(shape, **like) for name, shape in zip(MLP, shapes)}
        else:
            tensors = {"prefixes": torch.empty(self.num_tokens, flat, **like)}
        if device is None:  # a real build; a plan (device="meta") needs shapes only
            initialise(tensors)
        transformers = sys.modules["transformers"]
        caches = (transformers.DynamicCache, transformers.EncoderDecoderCache)
        layout = (layers, heads, head_dim, is_encoder_decoder(module))
        call = partial(prefix_call, layout, arg_names(callee), caches)
        at = join(path, path_of(module, callee))
        return Part(
            path,
            tensors,
            [RootCallSite(call, tuple(tensors), at)],
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
def takes(module: nn.Module, name: str) -> bool:
    return name in inspect.signature(module.forward).parameters


def geometry(path: str, module: nn.Module) -> tuple[int, int, int, nn.Module]:
    """``(layers, key/value heads, head size, callee)`` of a transformers model, or why not.

    ``callee`` is the module whose call gets the cache: the model, or its backbone.

    Read from the config's standard names (``num_hidden_layers``, ``num_attention_heads``,
    ``num_key_value_heads``, ``head_dim``, ``hidden_size``); the cache transformers builds
    from the same config must hold full-attention layers only, one per layer.
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
    callee = module if takes(module, "past_key_values") else backbone
    if not isinstance(callee, nn.Module) or not takes(callee, "past_key_values"):
        raise UnsupportedModuleError(
            f"PrefixTuning needs {where} or its base_model to take past_key_values, and neither "
            "forward does; this model cannot hold prefixes"
        )
    decoder = config
    if is_encoder_decoder(module) and callable(getattr(module, "get_decoder", None)):
        decoder = getattr(module.get_decoder(), "config", config)
    if callable(getattr(decoder, "get_text_config", None)):
        decoder = decoder.get_text_config(decoder=True)
    layers = getattr(decoder, "num_hidden_layers", None)
    heads = getattr(decoder, "num_attention_heads", None)
    kv_heads = getattr(decoder, "num_key_value_heads", None) or heads
    head_dim = getattr(decoder, "head_dim", None)
    if not head_dim and heads:
        head_dim = getattr(decoder, "hidden_size", 0) // heads
    if not all(isinstance(n, int) and n > 0 for n in (layers, heads, kv_heads, head_dim)):
        raise UnsupportedModuleError(
            f"PrefixTuning cannot read the attention shape of {where} from its config "
            "(num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim or "
            "hidden_size); this model is not supported"
        )
    try:
        kinds = [type(layer) for layer in transformers.DynamicCache(config=decoder).layers]
    except (AttributeError, TypeError, ValueError, KeyError) as err:
        raise UnsupportedModuleError(
            f"PrefixTuning cannot build a transformers cache from the config of {where} ({err}); "
            "this model is not supported"
        ) from None
    odd = sorted({kind.__name__ for kind in kinds if kind is not transformers.DynamicLayer})
    if odd or (kinds and len(kinds) != layers):
        raise UnsupportedModuleError(
            f"PrefixTuning needs every attention layer of {where} to keep a full-attention "
            f"cache, but its cache has {odd or f'{len(kinds)} layers for {layers}'} (sliding "
            "windows, linear attention or shared keys/values); this model is not supported"
        )
    return layers, kv_heads, head_dim, callee


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
    """transformers' checkpointed layers drop the cache, prefixes and all."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in module.modules())


def decoder_sequence(kwargs: dict) -> torch.Tensor | None:
    """An encoder-decoder call's decoder input (labels stand in: the model shifts them)."""
    for name in ("decoder_input_ids", "decoder_inputs_embeds", "labels"):
        value = first_tensor(kwargs.get(name))
        if value is not None:
            return value
    return None


def prefix_call(layout, names, caches, backbone: nn.Module, args: tuple, kwargs: dict, tensors):
    """Hand the backbone a cache holding the prefixes (first call) and stretch the mask."""
    layers, heads, head_dim, encoder_decoder = layout
    kwargs = bind(names, args, kwargs)
    if backbone.training and torch.is_grad_enabled() and checkpointed(backbone):
        raise DeltaStateError(
            "PrefixTuning cannot train under gradient checkpointing: transformers drops the "
            "cache (and the prefixes in it) inside checkpointed layers; call "
            "model.gradient_checkpointing_disable()"
        )
    step = decoder_sequence(kwargs) if encoder_decoder else sequence(kwargs)
    if step is None:
        return (), kwargs
    count = tensors[0].shape[0]
    cache = kwargs.get("past_key_values")
    if getattr(cache, DISCARDED, False):
        cache = None  # made by us for a call that asked for no cache: it continues nothing
    past = cached_length(cache)
    if past == 0:
        dynamic, encoder_decoder_cache = caches
        if cache is None:
            cache = encoder_decoder_cache(dynamic(), dynamic()) if encoder_decoder else dynamic()
            # some models hand the cache back even with use_cache=False; generate() would
            # then pass it with the whole sequence again
            setattr(cache, DISCARDED, kwargs.get("use_cache") is False)
        own = getattr(cache, "self_attention_cache", cache)
        prefixes = final_prefixes(tensors).view(count, layers * 2, heads, head_dim)
        keys_values = prefixes.permute(1, 2, 0, 3)  # (layers · 2) × heads × count × head_dim
        shape = (step.shape[0], heads, count, head_dim)
        for layer in range(layers):
            key, value = keys_values[2 * layer], keys_values[2 * layer + 1]
            own.update(key.expand(shape), value.expand(shape), layer)
        kwargs["past_key_values"] = cache
        past = count
    mask = "decoder_attention_mask" if encoder_decoder else "attention_mask"
    if mask in kwargs:
        kwargs[mask] = extend_mask(kwargs[mask], count, past + step.shape[1])
    if not encoder_decoder and kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + count
    return (), kwargs
