"""Prompt tuning (Lester et al., 2021): learned embeddings put in front of the input.

A root-call site rewrites each call of the model: token ids become embeddings (through
``get_input_embeddings()``), the prompt goes in front, and every input that runs along the
sequence grows with it (attention mask: ones; position ids: the prompt takes 0..P-1 and
the given ones move up by P; token type ids: zeros; token labels: -100). A call that
continues a sequence through a non-empty cache (``generate()`` after its first step) gets
no second prompt: only its mask and positions shift past the one already cached. An
encoder-decoder model gets the prompt on its encoder input, also when ``generate()``
runs the encoder on its own. Nothing here can be merged into weights.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch import nn

from .. import validate
from ..errors import SpecError, UnsupportedModuleError
from ..ledger import join
from ..sites import RootCallSite, first_tensor
from ..spec import DeltaSpec, DeviceLike, Part, register_method
from ..targets import Target
from ..validate import name_of
from ._calls import (
    EMBEDS_NAMES,
    ROOT,
    CallNames,
    bind,
    cached,
    call_names,
    extend_mask,
    is_encoder_decoder,
    one_target,
    path_of,
    prepend,
    sequence,
)

INITS = ("random", "vocab", "text")
IGNORE_INDEX = -100  # transformers' loss ignores these label positions


# ----------------------------------------------------------------------- the call rewrites
def embedded(module: nn.Module, kwargs: dict, name: str) -> torch.Tensor | None:
    embeds = kwargs.get(name)
    if embeds is None and kwargs.get("input_ids") is not None:
        embeds = module.get_input_embeddings()(kwargs["input_ids"])
    return embeds


def with_prompt(prompt: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    front = prompt.to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
    return torch.cat((front, embeds), dim=1)


def prompt_call(names: CallNames, module: nn.Module, args: tuple, kwargs: dict, tensors):
    """Decoder-only and encoder-only models: the whole call, prompt and all."""
    (prompt,) = tensors
    count = prompt.shape[0]
    kwargs = bind(names.positional, args, kwargs)
    filled, past = cached(names.get_cache(kwargs))
    step = sequence(kwargs, names.embeds)
    if step is None:  # nothing to prompt (the model will say what it misses)
        return (), kwargs
    mask, positions = names.mask, names.positions
    if filled:  # continuing a sequence whose prompt is cached: shift past it
        # a cache of states only (Mamba) has no positions to shift past: its masks cover
        # the new tokens alone, and the model counts no positions
        if past is not None and mask in kwargs:
            kwargs[mask] = extend_mask(kwargs[mask], count, past + step.shape[1])
        if past is not None and kwargs.get(positions) is not None:
            kwargs[positions] = kwargs[positions] + count
        return (), kwargs
    embeds = embedded(module, kwargs, names.embeds)
    length = embeds.shape[1]
    if "input_ids" in kwargs:
        kwargs["input_ids"] = None
    kwargs[names.embeds] = with_prompt(prompt, embeds)
    if mask in kwargs:
        kwargs[mask] = extend_mask(kwargs[mask], count, count + length)
    for name in (positions, names.cache_positions):  # the prompt takes 0..count-1
        given = kwargs.get(name)
        if given is not None:
            front = torch.arange(count, dtype=given.dtype, device=given.device)
            front = front.expand(*given.shape[:-1], count)
            kwargs[name] = torch.cat((front, given + count), dim=-1)
    if kwargs.get("token_type_ids") is not None:
        kwargs["token_type_ids"] = prepend(kwargs["token_type_ids"], count, 0)
    labels = kwargs.get("labels")
    if (
        isinstance(labels, torch.Tensor)
        and labels.dim() == 2
        and not labels.is_floating_point()
        and labels.shape[1] == length
    ):
        kwargs["labels"] = prepend(labels, count, IGNORE_INDEX)
    return (), kwargs


def prompt_encoder(names: CallNames, encoder: nn.Module, args: tuple, kwargs: dict, tensors):
    """The encoder of an encoder-decoder model: the prompt in front of its input."""
    (prompt,) = tensors
    kwargs = bind(names.positional, args, kwargs)
    embeds = embedded(encoder, kwargs, names.embeds)
    if embeds is None:
        return (), kwargs
    count, length = prompt.shape[0], embeds.shape[1]
    if "input_ids" in kwargs:
        kwargs["input_ids"] = None
    kwargs[names.embeds] = with_prompt(prompt, embeds)
    if names.mask in kwargs:
        kwargs[names.mask] = extend_mask(kwargs[names.mask], count, count + length)
    return (), kwargs


def extend_cross_mask(
    count: int, names: CallNames, model: nn.Module, args: tuple, kwargs: dict, tensors
):
    """The encoder-decoder model's call: its encoder mask must cover the prompt too.

    The decoder attends to the encoder's output, prompt included, through this mask.
    """
    kwargs = bind(names.positional, args, kwargs)
    encoded = first_tensor(kwargs.get("encoder_outputs"))
    if encoded is not None:  # generate() ran the encoder (and its prompt) already
        total = encoded.shape[1]
    else:
        source = sequence(kwargs, names.embeds)
        if source is None:
            return (), kwargs
        total = count + source.shape[1]
    if names.mask in kwargs:
        kwargs[names.mask] = extend_mask(kwargs[names.mask], count, total)
    return (), kwargs


@torch.no_grad()
def initialise(prompt: torch.Tensor, weight: torch.Tensor, init: str, init_text) -> None:
    vocab = weight.shape[0]
    if init == "text":
        too_big = [i for i in init_text if i >= vocab]
        if too_big:
            raise SpecError(
                f"init_text holds token ids {too_big[:5]} outside the vocabulary of {vocab}; "
                "tokenize init_text with this model's tokenizer"
            )
    if prompt.is_meta or weight.is_meta:
        return  # a model on the meta device has no values to start from: dh.load brings them
    if init == "random":
        std = float(weight.float().std()) if weight.numel() > 1 else 1.0
        nn.init.normal_(prompt, std=std if math.isfinite(std) and std > 0 else 1.0)
        return
    if init == "vocab":
        ids = torch.randint(0, vocab, (prompt.shape[0],))
    else:
        repeats = -(-prompt.shape[0] // len(init_text))
        ids = torch.tensor((list(init_text) * repeats)[: prompt.shape[0]])
    prompt.copy_(weight[ids.to(weight.device)])


# ------------------------------------------------------------------ attach-time checks
def check_init_text(owner: object, init: str, init_text: object) -> None:
    if init != "text":
        if init_text is not None:
            raise SpecError(
                f"{name_of(owner)} init_text is used only with init='text' (init={init!r}); "
                "pass init='text' or drop init_text"
            )
        return
    if isinstance(init_text, str):
        raise SpecError(
            f"{name_of(owner)} init_text must be token ids, not text (deltahooks has no tokenizer): "
            "pass init_text=tokenizer(text)['input_ids']"
        )
    if (
        not isinstance(init_text, (list, tuple))
        or not init_text
        or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in init_text)
    ):
        raise SpecError(
            f"{name_of(owner)} init='text' needs init_text, a non-empty list of token ids "
            f"(non-negative integers), e.g. init_text=[464, 3290]; got {init_text!r}"
        )


def check_embeddings(owner: object, path: str, module: nn.Module) -> None:
    """The target must say where its token embeddings are."""
    getter = getattr(module, "get_input_embeddings", None)
    embedding = None
    if callable(getter):
        try:
            embedding = getter()
        except (NotImplementedError, AttributeError):
            embedding = None
    weight = getattr(embedding, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise UnsupportedModuleError(
            f"{name_of(owner)} needs the module it prompts to have get_input_embeddings() returning an "
            f"embedding layer, and {path or '<root>'!r} ({type(module).__name__}) has none; "
            "target the transformers model (the root, the default) or a module that has one"
        )


def takes_inputs_embeds(owner: object, where: str, module: nn.Module) -> None:
    if call_names(module).embeds not in inspect.signature(module.forward).parameters:
        raise UnsupportedModuleError(
            f"{name_of(owner)} feeds embeddings to {where} ({type(module).__name__}), but its forward "
            f"takes no embeddings argument (looked for {' or '.join(EMBEDS_NAMES)}); this model "
            "cannot be prompted through embeddings"
        )


def encoder_of(owner: object, path: str, module: nn.Module) -> nn.Module:
    getter = getattr(module, "get_encoder", None)
    encoder = getter() if callable(getter) else None
    if not isinstance(encoder, nn.Module) or encoder is module:
        raise UnsupportedModuleError(
            f"{name_of(owner)}: {path or '<root>'!r} ({type(module).__name__}) is an encoder-decoder "
            "model without get_encoder(), so the prompt has no encoder input to go in front of"
        )
    path_of(module, encoder)
    return encoder


@register_method
@dataclass(frozen=True, kw_only=True)
class PromptTuning(DeltaSpec):
    """Learned "soft prompt" embeddings prepended to every input sequence.

    Prompt tuning (Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt
    Tuning"; PEFT ``PromptTuningConfig``): ``num_tokens`` vectors of the model's embedding
    width are trained and put in front of the embedded input; the model itself is frozen
    and unchanged. Works on transformers models that have ``get_input_embeddings()`` and
    accept ``inputs_embeds``: decoder-only (GPT-2, Llama, OPT, ...), encoder-only (BERT)
    and encoder-decoder (T5: the prompt goes in front of the encoder input), including
    ``model.generate()`` with the default dynamic cache. Outputs keep the prompt's
    positions, as PEFT's do: a causal LM's logits have ``num_tokens + length`` positions,
    the first ``num_tokens`` of them belonging to the prompt. ``delta.merge()`` raises
    :class:`deltahooks.UnsupportedOperationError` (a prompt is an input, not a change of
    weights). Every argument is keyword-only and checked when the spec is created.

    The inputs that run along the sequence are extended to match: a 2-D
    ``attention_mask`` gets ones for the prompt; ``position_ids``, when given, get
    ``0..num_tokens-1`` for the prompt and the given ones shifted up by ``num_tokens``
    (PEFT drops given position ids instead; both agree when they count from 0);
    ``token_type_ids`` get zeros; integer ``labels`` as long as the input (causal-LM or
    token labels) get ``-100``, so the prompt adds no loss. Other labels (a class per
    sequence, decoder labels) are left alone. A call with a non-empty cache continues a
    sequence that already holds the prompt, so it gets no second one. Masks that are not
    2-D (a static cache's 4-D masks) raise :class:`deltahooks.DeltaStateError`.

    Args:
        targets: the module whose call gets the prompt: it must have
            ``get_input_embeddings()`` and take ``inputs_embeds``. Default: the model root
            (``dh.Paths([""])``), so ``dh.PromptTuning(num_tokens=8)`` works as is. Exactly
            one module; PEFT has no such option (it wraps the whole model).
        exclude: modules to leave out of ``targets``, same syntax. Default ``None``.
        num_tokens: how many prompt vectors, a positive integer. Default ``20``. Paper:
            prompt length; PEFT: ``num_virtual_tokens``. The delta has ``num_tokens ·
            hidden`` parameters; the model sees ``num_tokens`` more positions, so
            ``num_tokens + length`` must fit its position limit.
        init: how the prompt starts. ``"random"``: normal with the standard deviation of
            the embedding matrix, so the prompt has the scale of real token embeddings
            (PEFT ``RANDOM`` draws N(0, 1); Lester et al. draw uniform in [-0.5, 0.5]).
            ``"vocab"``: rows of the embedding matrix at token ids drawn uniformly from
            the vocabulary (PEFT ``SAMPLE_VOCAB``; Lester et al. draw from the 5,000 most
            common tokens). ``"text"``: the embeddings of ``init_text`` (PEFT ``TEXT``).
            Default ``"random"``. Draws use torch's global generator
            (``torch.manual_seed`` makes them repeatable).
        init_text: the token ids whose embeddings start the prompt when ``init="text"``:
            a non-empty list of non-negative integers below the vocabulary size, e.g.
            ``tokenizer("Classify the sentiment:")["input_ids"]`` (deltahooks has no
            tokenizer; PEFT's ``prompt_tuning_init_text`` is a string it tokenizes). As
            PEFT does, the ids are repeated when there are fewer than ``num_tokens`` and cut
            when there are more. Required with ``init="text"`` and refused otherwise.
            Default ``None``.

    Example:
        >>> import torch, transformers, deltahooks as dh
        >>> config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)
        >>> model = transformers.GPT2LMHeadModel(config).eval()
        >>> delta = dh.attach(model, dh.PromptTuning(num_tokens=4))
        >>> list(delta.state_dict()), tuple(delta.state_dict()["prompt_embeddings"].shape)
        (['prompt_embeddings'], (4, 16))
        >>> ids = torch.tensor([[1, 2, 3]])
        >>> model(input_ids=ids).logits.shape  # the prompt's positions are kept, as in PEFT
        torch.Size([1, 7, 50])
    """

    method = "prompt_tuning"
    targets: Target = ROOT
    num_tokens: int = 20
    init: Literal["random", "vocab", "text"] = "random"
    init_text: list[int] | None = None

    def validate(self) -> None:
        validate.positive_int(self, "num_tokens", self.num_tokens, example=20)
        validate.one_of(self, "init", self.init, INITS)
        check_init_text(self, self.init, self.init_text)

    def check_module(self, path: str, module: nn.Module) -> None:
        check_embeddings(self, path, module)
        if is_encoder_decoder(module):
            encoder = encoder_of(self, path, module)
            takes_inputs_embeds(self, f"the encoder of {path or '<root>'!r}", encoder)
        else:
            takes_inputs_embeds(self, repr(path or "<root>"), module)

    def check_targets(self, targets: list[tuple[str, nn.Module]]) -> None:
        one_target(self, targets)

    def make_part(
        self, path: str, module: nn.Module, root: nn.Module, *, device: DeviceLike = None
    ) -> Part:
        weight = module.get_input_embeddings().weight
        like = {"device": weight.device if device is None else device, "dtype": weight.dtype}
        prompt = torch.empty(self.num_tokens, weight.shape[1], **like)
        if self.real_build(device):
            initialise(prompt, weight, self.init, self.init_text)
        names = ("prompt_embeddings",)
        if is_encoder_decoder(module):
            encoder = module.get_encoder()
            at = join(path, path_of(module, encoder))
            sites = [
                RootCallSite(
                    partial(extend_cross_mask, self.num_tokens, call_names(module)), (), path
                ),
                RootCallSite(partial(prompt_encoder, call_names(encoder)), names, at),
            ]
        else:
            sites = [RootCallSite(partial(prompt_call, call_names(module)), names, path)]
        return Part(
            path,
            {"prompt_embeddings": prompt},
            sites,
            cannot_merge="a prompt is part of the input, not a change of weights",
        )
