"""Where PrefixTuning's prefixes go: the shape each attention layer of a transformers model
writes to its cache, found by running a weightless twin of the model on one token (the
model's own answer, whatever its config calls it), else read from the config.

These are attach-time checks: a model whose cache is not one full-attention layer per
layer, or whose shape cannot be told, is refused by name before anything is built.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
import warnings
import weakref
from typing import NamedTuple

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ..errors import UnsupportedModuleError
from ._calls import CACHE_NAMES, CallNames, call_names, is_encoder_decoder, takes_cache


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
